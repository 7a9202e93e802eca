"""Fixed-K candidates from scheme files (``materialize_yolov10m_lowbit_candidates.py``): each scheme's model built,
optionally evaluated, recorded beside it, and listed in one summary.

A candidate is ModelOpt's re-quantization of the FP32 model with the scheme's ``nodes_to_exclude``, or, with
``from_full_model``, that calibrated full Q/DQ model with the scheme's nodes' Q/DQ pairs removed
(:mod:`lowbit.candidates_build`). Files, under ``run_root``:

    onnx/<model>-<mode>-k{K}[_random{SEED}].onnx           the candidate
    onnx/<model>-<mode>-k{K}[_random{SEED}].inputs.json    its record (``kind`` "scheme-candidate", docs/records.md):
                                                           ``build`` (sha256 of the ONNX model, calibration tensor
                                                           and scheme; the quantization settings), ``evaluation``,
                                                           ``model_sha256``, ``metrics_sha256``
    <mode>-k{K}[_random{SEED}]-coco/metrics.json           its evaluation (``eval``)
    candidates-<mode>/summary.json, summary.md, manifest.json, materialize.log

A rerun keeps a candidate whose record matches; one built from other inputs or settings is an error naming
``--overwrite`` (:func:`plan_candidates`), unless ``overwrite`` rebuilds every candidate.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lowbit import records
from lowbit.candidates import EvalConfig, candidate_files, inputs_record_path, record_or_reason
from lowbit.candidates_build import RequantizeConfig, build_from_full_model
from lowbit.errors import UserError
from lowbit.logs import get_logger
from lowbit.runs import atomic_write_json, atomic_write_text, manifest_run, sha256_file
from lowbit.schemes import Scheme, check_k_list, find_schemes

__all__ = [
    "MATERIALIZE_CONV_ALGO_SEARCH",
    "SCHEME_RECORD_KIND",
    "SCHEME_RECORD_SCHEMA_VERSION",
    "SCRIPT",
    "MaterializeSettings",
    "SchemeCandidate",
    "check_materialize_settings",
    "check_schemes_fit",
    "materialize_candidates",
    "materialize_one",
    "plan_candidates",
    "summary_markdown",
    "summary_row",
]

log = get_logger("candidates")

SCRIPT = "materialize_yolov10m_lowbit_candidates.py"  # the manifest's ``script``
SCHEME_RECORD_KIND = "scheme-candidate"  # the record beside a fixed-K candidate
SCHEME_RECORD_SCHEMA_VERSION = records.SCHEMA_VERSIONS[SCHEME_RECORD_KIND]
# The summary reports each candidate's latency, so cuDNN benchmarks its convolution algorithms (the evaluator's
# default); the budget search's probes only need accuracy (EvalConfig's HEURISTIC). Never a setting of the
# materializer, so its records leave it out.
MATERIALIZE_CONV_ALGO_SEARCH = "EXHAUSTIVE"


@dataclass(frozen=True)
class MaterializeSettings:
    """One run of the materializer: its flags, the input files already checked to exist."""

    run_root: Path  # run directory: onnx/, <mode>-k{K}-coco/ and candidates-<mode>/ go here
    schemes_dir: Path  # holds scheme_k{K}.json (make_yolov10m_candidate_schemes.py)
    ks: tuple[int, ...]  # which scheme_k{K}.json to build, each >= 0
    quant_mode: str  # fp8 | int8 (int4 is refused with the reason)
    quantizer: RequantizeConfig  # FP32 model (its stem names the outputs), calibration tensor, ModelOpt settings
    evaluation: EvalConfig  # how candidates are evaluated (with ``eval``)
    eval: bool = False  # evaluate every candidate (card: EVAL=1)
    include_random: bool = False  # also build the scheme_k{K}_random*.json controls
    from_full_model: Path | None = None  # remove Q/DQ pairs from this calibrated full Q/DQ model instead of ModelOpt
    overwrite: bool = False  # rebuild every candidate, also those built from other inputs or settings
    compare_dir: Path | None = None  # where --compare-requantize writes (lowbit.candidates_compare)

    @property
    def onnx_path(self) -> Path:
        return self.quantizer.onnx_path

    @property
    def calib_path(self) -> Path:
        return self.quantizer.calib_path


@dataclass
class SchemeCandidate:
    """One scheme to materialize: where its files go, what it must be built from, and what to redo."""

    scheme: Scheme
    name: str  # <mode>-k{K}[_random{SEED}]
    model_path: Path
    metrics_path: Path
    build: dict  # the inputs and settings the model must come from
    evaluation: dict | None  # the evaluation settings its metrics must come from (None without --eval)
    record: dict | None  # the record of an earlier build, when it matches
    quantize: bool = True
    evaluate: bool = False

    @property
    def record_path(self) -> Path:
        return inputs_record_path(self.model_path)


def _eval_settings(settings: MaterializeSettings, model_path: Path, out: Path):
    """The :class:`lowbit.evaluate.EvalSettings` of one candidate's evaluation."""
    evaluation = replace(settings.evaluation, cudnn_conv_algo_search=MATERIALIZE_CONV_ALGO_SEARCH)
    return evaluation.eval_settings(model_path, out)


def _evaluation_record(settings: MaterializeSettings) -> dict[str, Any] | None:
    """The evaluation settings a candidate's metrics must come from (None without ``eval``)."""
    if not settings.eval:
        return None
    return {key: value for key, value in settings.evaluation.record().items() if key != "cudnn_conv_algo_search"}


# ----------------------------------------------------------------------------------------------------------------------
# checks, all before anything is quantized


def check_materialize_settings(settings: MaterializeSettings) -> list[int]:
    """Numbers and modes; with ``eval`` the evaluator's own checks of the evaluation settings. Returns the Ks
    sorted, without repeats."""
    from lowbit.quantize import refuse_int4

    ks = check_k_list(list(settings.ks), "--ks")
    refuse_int4(settings.quant_mode, "--quant-mode")
    if settings.eval:
        from lowbit.evaluate import resolve_data_paths, validate_settings
        from lowbit.ort_providers import check_providers

        evaluation = _eval_settings(settings, settings.onnx_path, settings.run_root / "check" / "metrics.json")
        validate_settings(evaluation)
        resolve_data_paths(evaluation)
        check_providers(settings.evaluation.providers, disable_cpu_fallback=False, flag="--providers")
    return ks


def _quantize_settings(settings: MaterializeSettings, candidate: SchemeCandidate):
    return settings.quantizer.quantize_settings(
        settings.quant_mode, candidate.model_path, exclude_json=candidate.scheme.path
    )


def check_schemes_fit(settings: MaterializeSettings, candidates: list[SchemeCandidate]) -> None:
    """Every candidate the quantizer will run on passes its checks (the calibration tensor is read once)."""
    from lowbit.quantize import validate_settings

    todo = [c for c in candidates if c.quantize]
    if not todo or settings.from_full_model:  # remove_qdq_for_nodes names unknown nodes itself
        return
    node_names = {n.name for n in validate_settings(_quantize_settings(settings, todo[0])).model.graph.node}
    for c in todo[1:]:
        unknown = [n for n in c.scheme.nodes_to_exclude if n not in node_names]
        if unknown:
            raise UserError(
                f"--schemes-dir: {c.scheme.path} excludes {len(unknown)} node(s) that --onnx-path does not have "
                f"(first: {unknown[0]}); were the schemes made for another model?",
                flag="--schemes-dir",
            )


# ----------------------------------------------------------------------------------------------------------------------
# what to (re)build


def plan_candidates(
    settings: MaterializeSettings, schemes: list[Scheme], digests: dict[str, str]
) -> list[SchemeCandidate]:
    """One SchemeCandidate per scheme, each marked to quantize and/or evaluate.

    Without ``overwrite`` a candidate whose record matches is kept, and one whose model, record or
    metrics disagree with this run's inputs or settings is an error naming ``--overwrite``: nothing is
    quantized then, and no summary claims inputs that the candidates were not built from.
    """
    q = settings.quantizer
    quant = {
        "quant_mode": settings.quant_mode,
        "high_precision_dtype": q.high_precision_dtype,
        "calibration_method": q.calibration_method,
        "calibration_eps": list(q.calibration_eps),
    }
    evaluation = _evaluation_record(settings)
    candidates, stale = [], []
    for scheme in schemes:
        name = f"{settings.quant_mode}-{scheme.tag}"
        build = {
            "onnx_sha256": digests["onnx"],
            "calib_sha256": digests["calib"],
            "scheme_sha256": sha256_file(scheme.path),
            "quantize": quant,
        }
        if digests.get("full_model"):  # built by removing Q/DQ pairs from this model, not by ModelOpt
            build["from_full_model_sha256"] = digests["full_model"]
        model_path, metrics_path = candidate_files(settings.run_root, settings.onnx_path.stem, name)
        c = SchemeCandidate(scheme, name, model_path, metrics_path, build, evaluation, None)
        if settings.overwrite:
            c.evaluate = evaluation is not None
            problems = []
        else:
            problems = _stale_parts(c)
        if problems:
            stale.append(f"{name} ({', '.join(problems)})")
        candidates.append(c)
    if stale:
        raise UserError(
            f"--run-root {settings.run_root} holds candidates built from other inputs or settings than this run's: "
            f"{'; '.join(stale)}. Pass --overwrite (OVERWRITE=1) to rebuild them, or use another --run-root",
            flag="--overwrite",
        )
    return candidates


def _stale_parts(c: SchemeCandidate) -> list[str]:
    """Mark what ``c`` needs; returns what disagrees with an earlier build (empty: nothing is stale)."""
    exists = c.model_path.exists() or c.record_path.exists()
    if not exists:
        c.evaluate = c.evaluation is not None
        return []
    record, why = record_or_reason(c.record_path, SCHEME_RECORD_KIND) if c.record_path.exists() else (None, None)
    if record is None:
        return ["no record of its inputs" + (f" ({why})" if why else "")]
    if not c.model_path.is_file():
        return ["model file missing"]
    recorded = record.get("build") or {}
    differences = [key for key in c.build if c.build[key] != recorded.get(key)]
    if record.get("model_sha256") != sha256_file(c.model_path):
        differences.append("model file changed")
    if differences:
        return [_INPUT_NAMES.get(d, d) for d in differences]
    c.record, c.quantize = record, False
    if c.evaluation is None:
        return []
    metrics_ok = c.metrics_path.is_file() and record.get("metrics_sha256") == sha256_file(c.metrics_path)
    if metrics_ok and record.get("evaluation") == c.evaluation:
        return []
    if c.metrics_path.exists() or record.get("evaluation") is not None:
        return ["evaluation settings or metrics differ"]
    c.evaluate = True
    return []


_INPUT_NAMES = {
    "onnx_sha256": "--onnx-path / ONNX_PATH differs",
    "calib_sha256": "--calib-path / CALIB_PATH differs",
    "scheme_sha256": "its scheme differs",
    "quantize": "quantization settings differ",
}


# ----------------------------------------------------------------------------------------------------------------------
# building, evaluating, summarizing


def _build_scheme_model(settings: MaterializeSettings, c: SchemeCandidate) -> tuple[int, int]:
    """Write candidate ``c``'s model; returns ``(Q/DQ pairs, quantized nodes)`` of the result."""
    if settings.from_full_model:
        import onnx

        from lowbit.qdq_graph import qdq_summary

        log.info("%s: removing the Q/DQ pairs of %d nodes from %s", c.name, c.scheme.k, settings.from_full_model)
        c.model_path.parent.mkdir(parents=True, exist_ok=True)
        full = onnx.load(str(settings.from_full_model))
        build_from_full_model(full, c.scheme.nodes_to_exclude, c.model_path, flag="--schemes-dir")
        summary = qdq_summary(onnx.load(str(c.model_path)).graph)
        return int(summary.get("qdq_pairs", 0)), len(summary.get("quantized_nodes", []))
    from lowbit.quantize import quantize_onnx

    log.info("%s: quantizing with %d excluded nodes", c.name, c.scheme.k)
    result = quantize_onnx(_quantize_settings(settings, c), argv=None)
    return result.qdq_pairs, len(result.quantized_nodes)


def materialize_one(settings: MaterializeSettings, c: SchemeCandidate) -> dict:
    """Quantize and/or evaluate ``c`` as planned; returns its record (also written beside the model)."""
    from lowbit.evaluate import evaluate

    record = dict(c.record or {})
    if c.quantize:
        c.record_path.unlink(missing_ok=True)  # a failed rebuild must not leave the old record looking current
        pairs, quantized = _build_scheme_model(settings, c)
        record = {
            **records.header(SCHEME_RECORD_KIND),
            "candidate": c.name,
            "build": c.build,
            "model_sha256": sha256_file(c.model_path),
            "qdq_pairs": pairs,
            "num_quantized_nodes": quantized,
            "evaluation": None,
            "metrics_sha256": None,
        }
        atomic_write_json(c.record_path, record)
    else:
        log.info("%s: %s was built from these inputs, kept", c.name, c.model_path)
    if c.evaluate:
        log.info("%s: evaluating", c.name)
        evaluate(_eval_settings(settings, c.model_path, c.metrics_path))
        record.update(evaluation=c.evaluation, metrics_sha256=sha256_file(c.metrics_path))
        atomic_write_json(c.record_path, record)
    return record


def summary_row(settings: MaterializeSettings, c: SchemeCandidate, record: dict) -> dict:
    """``summary.json``'s row of one candidate: its scheme, files, Q/DQ counts and, with ``eval``, its scores."""
    row = {
        "candidate": c.name,
        "k": c.scheme.k,
        "random_control": c.scheme.random_seed is not None,
        "scheme": str(c.scheme.path),
        "model": str(c.model_path),
        "inputs_record": str(c.record_path),
        "excluded_nodes": c.scheme.nodes_to_exclude,
        "qdq_pairs": record["qdq_pairs"],
        "num_quantized_nodes": record["num_quantized_nodes"],
        "model_bytes": c.model_path.stat().st_size,
    }
    if settings.eval:
        result = records.read_record(c.metrics_path, "metrics")
        row.update(
            metrics=str(c.metrics_path),
            map50_95=result["metrics"]["map50_95"],
            map50=result["metrics"]["map50"],
            latency_ms_p50=result["latency_ms"]["p50"],
        )
    return row


def summary_markdown(rows: list[dict]) -> str:
    """``summary.md``: one table row per candidate (mAP and p50 latency as ``-`` where not evaluated)."""
    lines = ["| candidate | excluded | Q/DQ pairs | mAP50-95 | mAP50 | p50 ms |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        ap, ap50 = (f"{r[key]:.4f}" if r.get(key) is not None else "-" for key in ("map50_95", "map50"))
        p50 = f"{r['latency_ms_p50']:.1f}" if r.get("latency_ms_p50") is not None else "-"  # None: too few timed runs
        lines.append(f"| {r['candidate']} | {len(r['excluded_nodes'])} | {r['qdq_pairs']} | {ap} | {ap50} | {p50} |")
    return "\n".join(lines) + "\n"


def materialize_candidates(
    settings: MaterializeSettings, manifest_args: dict[str, Any], argv: list[str] | None
) -> list[dict]:
    """Build (and with ``eval`` evaluate) every scheme's candidate, holding ``run_root``; writes the summary and
    returns its rows.

    Args:
        manifest_args: the script's flags as the manifest records them.
        argv: the script's command line (None: ``sys.argv``).
    """
    from lowbit.run_lock import hold_run_folder

    with hold_run_folder(settings.run_root, "--run-root"):  # one writer per run folder (a no-op inside the workflow)
        return _materialize(settings, manifest_args, argv)


def _materialize(settings: MaterializeSettings, manifest_args: dict[str, Any], argv: list[str] | None) -> list[dict]:
    from lowbit.logs import setup_logging

    ks = check_materialize_settings(settings)
    schemes = find_schemes(settings.schemes_dir, ks, settings.include_random, "--schemes-dir")
    digests = {"onnx": sha256_file(settings.onnx_path), "calib": sha256_file(settings.calib_path)}
    if settings.from_full_model:
        digests["full_model"] = sha256_file(settings.from_full_model)
    candidates = plan_candidates(settings, schemes, digests)
    check_schemes_fit(settings, candidates)
    out_dir = settings.run_root / f"candidates-{settings.quant_mode}"
    setup_logging(out_dir / "materialize.log")
    rows = []
    with manifest_run(out_dir / "manifest.json", SCRIPT, manifest_args, argv, kind="materialize") as manifest:
        manifest.add_input(settings.onnx_path, digests["onnx"])
        manifest.add_input(settings.calib_path, digests["calib"])
        for name in ("summary.json", "summary.md"):  # an earlier summary must not outlive a failed rerun
            (out_dir / name).unlink(missing_ok=True)
        for c in candidates:
            manifest.add_input(c.scheme.path, c.build["scheme_sha256"])
            rows.append(summary_row(settings, c, materialize_one(settings, c)))
            manifest.update(candidates=rows)
        atomic_write_json(out_dir / "summary.json", {"quant_mode": settings.quant_mode, "candidates": rows})
        atomic_write_text(out_dir / "summary.md", summary_markdown(rows))
        manifest.add_output("summary", out_dir / "summary.json")
    return rows
