"""One evaluated variant as a typed record: :class:`Variant`, read from its ``metrics.json`` and from the quantizer
manifest or candidate record beside its model.

:func:`variant_from_metrics` reads one evaluation that :func:`lowbit.report_inputs.read_metrics` accepted:

* its numbers (mAP, ORT latency, provider, Q/DQ pairs and dtypes) are copied from ``metrics.json``;
* for the evaluated model (metrics ``model.path``, found by :func:`lowbit.report_inputs.find_model_file`), its
  ``<stem>.manifest.json`` of kind ``quantize`` (:mod:`lowbit.quantize`) when it lies beside the model and
  describes the same file (``extra.output_sha256`` equals the evaluated ``model.sha256``): quantization settings,
  excluded nodes, quantized node count, the source model's sha256 and the exclusion scheme;
* for a budget-search candidate without one, its ``<stem>.inputs.json`` record of kind ``candidate``
  (:class:`lowbit.candidates.CandidateStore`, same ``model_sha256``): the nodes put in float, and the quantizer
  manifest of the full Q/DQ model it was cut from (the record's ``full_model``, checked against its
  ``build.full_model_sha256`` as above) for the quantization settings.

A record that cannot be used is not an error here: the row says "unknown" and carries a note naming the file.
What the row was read from, by content, is kept in :class:`VariantSource` (never written to report.json).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from lowbit import records
from lowbit.errors import UserError
from lowbit.report_inputs import Hasher, find_model_file, model_places, rel_path
from lowbit.runs import REPO_ROOT

__all__ = [
    "QUANTIZER_KIND",
    "Candidate",
    "Variant",
    "VariantSource",
    "resolve_model_file",
    "short_provider",
    "variant_from_metrics",
]

QUANTIZER_KIND = "quantize"  # the "kind" of the quantizer's <stem>.manifest.json
# the materializer's and the search's <model>-<mode>-k{K}[_random{SEED}] names, and the revert pass's -k{K}_revert{NN}
_STEM_K = re.compile(r"-k(\d+)(?:_random(\d+)|_revert(\d+))?$")


@dataclass(frozen=True)
class Candidate:
    """A model with its K most sensitive nodes (or K random ones) left in float."""

    k: int
    random_seed: Any = None  # a random control's seed (as its scheme wrote it); None for a ranking's top K
    ranking_source: str | None = None  # the sensitivity report the scheme came from ("onnx", "torch"), when known
    scheme: str | None = None  # the exclusion scheme file; None when only the model's file name told K
    revert_try: int | None = None  # the revert pass's try that left these K nodes in float (lowbit.search_revert)

    def to_dict(self) -> dict[str, Any]:
        """``{k, random_seed, ranking_source, scheme, revert_try}``, as report.json's ``candidate``."""
        return {
            "k": self.k,
            "random_seed": self.random_seed,
            "ranking_source": self.ranking_source,
            "scheme": self.scheme,
            "revert_try": self.revert_try,
        }


@dataclass(frozen=True)
class VariantSource:
    """What a row was read from, by content: the checks of :mod:`lowbit.report_inputs` run on these fields.

    Never written to report.json (its ``provenance.records`` lists the files used). A new hash belongs here, so
    that the row's fields and report.json stay as they are.
    """

    metrics_file: Path  # the metrics.json as found under the run dir
    metrics_sha256: str
    dataset: dict[str, Any]  # metrics.json's "dataset": ann_file, ann_sha256, image_ids, ...
    postprocess: dict[str, Any]  # metrics.json's "postprocess": mode, conf, iou, max_det, imgsz
    manifest_files: tuple[Path, ...] = ()  # the quantizer manifest or candidate record, and its full model's manifest
    model_problem: str | None = None  # why the model file is not the evaluated one; None when it is
    derived: str | None = None  # "full" | "requantized": a budget-search candidate; None otherwise
    detections_sha256: str | None = None  # metrics.json's sha256 of the detections.json beside it (newer evaluators)
    num_detections: int | None = None  # metrics.json's metrics.num_detections


@dataclass(frozen=True, kw_only=True)
class Variant:
    """One evaluation: a row of the report. The field order is the key order of its report.json entry
    (:meth:`to_dict`; the keys are documented in :mod:`lowbit.report_json`); ``source`` is not written.

    Records are never changed in place: the report's steps make new ones with :func:`dataclasses.replace`
    (``delta_ap`` once the baseline is known, ``tensorrt`` once engines are timed, ``mac_share`` and ``notes``).
    """

    label: str  # "FP32", "INT8 K=12", "FP8 K=29 random control (seed 0)", ...
    role: str  # "baseline" | "fp32_repeat" | "quantized" | "random_control"
    quant_mode: str  # "fp32" | "fp16" | "int8" | "fp8" | "int8+fp8" | "int4" | "qdq"
    map50_95: float  # 0..1, copied from metrics.json
    map50: float
    delta_ap: float | None = None  # (map50_95 - baseline's) x 100, AP points; None until the baseline is known
    delta_ap50: float | None = None
    # the paired bootstrap interval of delta_ap (lowbit.report_intervals): {ci_low, ci_high, std_error, n_boot,
    # confidence, seed, n_images}, AP points, variant − FP32; None with a note when it could not be computed
    delta_ap_ci: dict[str, Any] | None = None
    # a budget search's pick: its loss on the confirmation slice (lowbit.report_confirm), variant − FP32; else None
    confirmation: dict[str, Any] | None = None
    latency_ms: dict[str, Any] = field(default_factory=dict)  # ORT session.run {p50, p90, mean, n}, copied
    provider: str | None = None  # first of providers_used
    providers_used: tuple[str, ...] = ()
    tensorrt: dict[str, Any] | None = None  # lowbit.trt.benchmark_engine's result ("status" always set) once timed
    model_path: str = ""  # as metrics.json records it
    model_file: Path | None = None  # where that file is now, when it is still the evaluated one
    model_sha256: str = ""
    source_model_sha256: str | None = None  # the float model it was quantized from, per its manifest
    model_bytes: int | None = None
    weight_bytes: int | None = None  # initializers at their deployed width: Q/DQ weights 1 byte (report_costs)
    qdq_pairs: int | None = None
    quant_dtypes: tuple[str, ...] = ()
    excluded_nodes: int | None = None  # count; None when unknown
    excluded_node_names: tuple[str, ...] | None = None
    num_quantized_nodes: int | None = None
    quant_settings: dict[str, Any] | None = None  # the quantizer's extra.settings
    candidate: Candidate | None = None
    metrics_path: str = ""  # the metrics.json, as rel_path writes it
    model_manifest: str | None = None  # the quantizer manifest or candidate record read
    derived_from_full_model: bool = False  # a search candidate cut from the full Q/DQ model
    run_dir: str = ""
    notes: tuple[str, ...] = ()
    mac_share: float | None = None  # low-precision share of Conv/MatMul/Gemm MACs, 0..1 (lowbit.mac_share)
    low_precision_macs: int | None = None
    total_macs: int | None = None
    source: VariantSource | None = None  # None only for rows built by hand (tests)

    def to_dict(self) -> dict[str, Any]:
        """The row as report.json writes it: every field but ``source``, in field order, as plain JSON values."""
        row: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "source":
                continue
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, Candidate):
                value = value.to_dict()
            elif isinstance(value, Path):
                value = str(value)
            row[f.name] = value
        return row

    def with_note(self, note: str) -> Variant:
        """This row with ``note`` added to its notes."""
        return replace(self, notes=(*self.notes, note))


def short_provider(provider: str | None) -> str:
    """``CPUExecutionProvider`` -> ``CPU EP``; ``TensorrtExecutionProvider`` -> ``TensorRT EP``."""
    if not provider:
        return "unknown provider"
    name = provider.removesuffix("ExecutionProvider")
    return {"Tensorrt": "TensorRT"}.get(name, name) + " EP"


def _read_json(path: Path | None, notes: list[str] | None = None) -> Any:
    """An optional JSON file beside a model (manifest, record, scheme): None when absent; unreadable, truncated or
    non-finite -> None and a note naming it (:func:`lowbit.records.read_json`)."""
    if path is None or not Path(path).is_file():
        return None
    try:
        return records.read_json(path)
    except UserError as e:
        if notes is not None:
            notes.append(f"{e}; not used")
        return None


def _mode_from_dtypes(dtypes: Iterable[str]) -> str:
    dtypes = [str(d).lower() for d in dtypes]
    if any(d.startswith(("float8", "fp8")) for d in dtypes):
        return "fp8" if not any(d in ("int8", "uint8") for d in dtypes) else "int8+fp8"
    if any(d in ("int8", "uint8") for d in dtypes):
        return "int8"
    if any(d in ("int4", "uint4") for d in dtypes):
        return "int4"
    return "qdq"


def resolve_model_file(model_path: str, metrics_path: Path, run_dir: Path) -> Path | None:
    """Where a recorded model is now (the first of :func:`lowbit.report_inputs.model_places` that exists)."""
    return next((place for place in model_places(model_path, metrics_path, run_dir) if place.is_file()), None)


# ----------------------------------------------------------------------------------------------------------------------
# what the quantizer manifest or the candidate record says about a model


@dataclass(frozen=True)
class _ModelRecord:
    """What the quantizer manifest or candidate record beside an evaluated model says about it."""

    path: Path  # the file read: <stem>.manifest.json or <stem>.inputs.json
    settings: dict | None = None  # the quantizer's extra.settings
    excluded_nodes: list | None = None  # nodes left in float; None when the record does not say
    num_quantized_nodes: int | None = None
    source_model_sha256: str | None = None  # the float model it was quantized from
    exclude_json: str | None = None  # the quantizer's args.exclude_json: the scheme it was built from
    derived: str | None = None  # "full" | "requantized": a budget-search candidate
    full_manifest: Path | None = None  # the full Q/DQ model's quantizer manifest (a candidate cut from it)


def _load_model_manifest(model_file: Path | None, sha: str, notes: list[str]) -> tuple[dict | None, Path | None]:
    if model_file is None:
        return None, None
    path = model_file.with_suffix(".manifest.json")
    manifest = _read_json(path, notes)
    if not isinstance(manifest, dict) or manifest.get("kind") != QUANTIZER_KIND:
        return None, None
    if manifest.get("status") != "ok":
        notes.append(f"quantizer manifest {rel_path(path)} has status {manifest.get('status')!r}; not used")
        return None, None
    if (manifest.get("extra") or {}).get("output_sha256") != sha:
        notes.append(f"quantizer manifest {rel_path(path)} describes another file than the evaluated model; not used")
        return None, None
    return manifest, path


def _describe_manifest(manifest: dict, path: Path) -> _ModelRecord:
    """A quantizer manifest's settings, excluded nodes and source model (``inputs[args.onnx_path]``)."""
    extra = manifest.get("extra") or {}
    args = manifest.get("args") or {}
    source = manifest.get("source_model_sha256")
    if source is None:
        source = (manifest.get("inputs") or {}).get(str(args.get("onnx_path")))
    return _ModelRecord(
        path=path,
        settings=extra.get("settings"),
        excluded_nodes=extra.get("excluded_nodes"),
        num_quantized_nodes=extra.get("num_quantized_nodes"),
        source_model_sha256=source,
        exclude_json=args.get("exclude_json"),
        derived=manifest.get("derived"),
    )


def _load_candidate_record(model_file: Path | None, sha: str, run_dir: Path, notes: list[str]) -> _ModelRecord | None:
    """A budget-search candidate's record (``<stem>.inputs.json`` of kind ``candidate``, written by
    :class:`lowbit.candidates.CandidateStore`) and the quantizer manifest of the full Q/DQ model it was cut from
    (``build.method == "full"``), when both describe it.

    Returns the full model's manifest adjusted to the candidate (``excluded_nodes`` = the nodes put in float,
    ``num_quantized_nodes`` reduced by them), or the re-quantization settings of ``build.method == "requantize"``;
    None when there is no such record.
    """
    if model_file is None:
        return None
    path = model_file.with_name(model_file.stem + ".inputs.json")
    if not path.is_file():
        return None
    try:
        record = records.read_record(path, "candidate")
    except UserError as e:  # unreadable, no kind (an older record), a fixed-K candidate's record ...
        notes.append(f"{e}; not used")
        return None
    if not isinstance(record.get("build"), dict):
        return None
    if record.get("model_sha256") != sha:
        notes.append(f"candidate record {rel_path(path)} describes another file than the evaluated model; not used")
        return None
    build, nodes = record["build"], list(record["build"].get("nodes") or [])
    if build.get("method") == "requantize":
        q = build.get("quantize") or {}
        settings = {
            "quantize_mode": q.get("mode"),
            "calibration_method": q.get("calibration_method"),
            "high_precision_dtype": q.get("high_precision_dtype"),
            "nodes_to_exclude": nodes,
        }
        source = build.get("onnx_sha256")
        return _ModelRecord(path, settings, nodes, source_model_sha256=source, derived="requantized")
    full_file = resolve_model_file(record["full_model"], path, run_dir) if record.get("full_model") else None
    full, full_path = _load_model_manifest(full_file, build.get("full_model_sha256"), notes)
    if full is None:
        notes.append(
            f"candidate record {rel_path(path)}: no quantizer manifest of its full model "
            f"{record.get('full_model')}; quantization settings unknown"
        )
        return _ModelRecord(path, excluded_nodes=nodes, derived="full")
    described = _describe_manifest(full, path)
    quantized = described.num_quantized_nodes
    return replace(
        described,
        excluded_nodes=nodes,
        num_quantized_nodes=quantized - len(nodes) if quantized is not None else None,
        derived="full",
        full_manifest=full_path,
    )


def _scheme_info(exclude_json: str | None, model_path: str, run_dir: Path, notes: list[str]) -> Candidate | None:
    """K, seed, ranking source and scheme of a candidate built from an exclusion scheme, else None."""
    scheme_path = None
    if exclude_json:
        recorded = Path(exclude_json)
        for candidate in (recorded, REPO_ROOT / recorded, run_dir / "schemes" / recorded.name):
            if candidate.is_file():
                scheme_path = candidate
                break
    scheme = _read_json(scheme_path, notes)
    if isinstance(scheme, dict) and "k" in scheme:
        source = None
        summary = _read_json(scheme_path.parent / "schemes_summary.json", notes)
        if isinstance(summary, dict):
            source = summary.get("report_source")
        if source is None and scheme.get("report"):
            report = _read_json(Path(scheme["report"])) or _read_json(REPO_ROOT / scheme["report"])
            if isinstance(report, dict):
                source = report.get("source")
        return Candidate(int(scheme["k"]), scheme.get("random_seed"), source, rel_path(scheme_path))
    match = _STEM_K.search(Path(model_path).stem)
    if match:  # the file naming: <model>-<mode>-k{K}[_random{SEED}|_revert{NN}].onnx
        seed, revert = (int(g) if g else None for g in match.group(2, 3))
        return Candidate(int(match.group(1)), seed, revert_try=revert)
    return None


def _label(metrics: dict, mode: str, settings: dict | None, candidate: Candidate | None, stem: str) -> tuple[str, str]:
    """(label, role) of one evaluation."""
    if not metrics["model"]["qdq"].get("is_qdq"):
        dtype = str(metrics["model"].get("input", {}).get("dtype", ""))
        return ("FP16" if "float16" in dtype else "FP32"), "baseline"
    mode_text = mode.upper()
    if candidate is not None:
        k = candidate.k
        if candidate.random_seed is not None:
            return f"{mode_text} K={k} random control (seed {candidate.random_seed})", "random_control"
        if candidate.revert_try is not None:
            return f"{mode_text} K={k} (revert pass)", "quantized"
        source = candidate.ranking_source
        return f"{mode_text} K={k}" + (f" ({source} ranking)" if source and k > 0 else ""), "quantized"
    if settings:
        label = f"{mode_text} {settings.get('calibration_method')}/{settings.get('high_precision_dtype')}"
        excluded = len(settings.get("nodes_to_exclude") or [])
        return label + (f" excl {excluded}" if excluded else ""), "quantized"
    return f"{mode_text} ({stem})", "quantized"


def variant_from_metrics(metrics: dict, metrics_path: Path, run_dir: Path, hasher: Hasher) -> Variant:
    """One row of the report from an evaluation read by :func:`lowbit.report_inputs.read_metrics`.

    ``source.model_problem`` says why its model file is not the evaluated one (None when it is); ``model_file`` is
    then None and the row is dropped (a quantized variant) or noted (the baseline) by the collection step.
    ``delta_ap``, ``tensorrt`` and ``mac_share`` are filled by later steps.
    """
    model = metrics["model"]
    qdq = model.get("qdq") or {}
    notes: list[str] = []
    model_file, model_problem = find_model_file(model["path"], model["sha256"], metrics_path, run_dir, hasher)
    model_bytes = model_file.stat().st_size if model_file else None
    manifest, manifest_path = _load_model_manifest(model_file, model["sha256"], notes)
    described = _describe_manifest(manifest, manifest_path) if manifest is not None else None
    if described is None:  # a budget-search candidate: its record names the nodes in float and the full model
        described = _load_candidate_record(model_file, model["sha256"], run_dir, notes)
    settings = described.settings if described else None
    is_qdq = bool(qdq.get("is_qdq"))
    mode = (
        "fp32"
        if not is_qdq
        else ((settings or {}).get("quantize_mode") or _mode_from_dtypes(qdq.get("quant_dtypes", [])))
    )
    exclude_json = described.exclude_json if described else None
    candidate = _scheme_info(exclude_json, model["path"], run_dir, notes) if is_qdq else None
    label, role = _label(metrics, mode, settings, candidate, Path(model["path"]).stem)
    if not is_qdq and label == "FP16":
        mode = "fp16"
    excluded = described.excluded_nodes if described else None
    if excluded is None and settings is not None:
        excluded = settings.get("nodes_to_exclude")
    providers_used = (metrics.get("providers") or {}).get("providers_used") or []
    latency = metrics.get("latency_ms") or {}
    manifest_files = (described.path, described.full_manifest) if described else ()
    return Variant(
        label=label,
        role=role,
        quant_mode=mode,
        map50_95=metrics["metrics"]["map50_95"],
        map50=metrics["metrics"]["map50"],
        latency_ms={k: latency.get(k) for k in ("p50", "p90", "mean", "n", "sessions")},
        provider=providers_used[0] if providers_used else None,
        providers_used=tuple(providers_used),
        model_path=model["path"],
        model_file=model_file,
        model_sha256=model["sha256"],
        source_model_sha256=described.source_model_sha256 if described else None,
        model_bytes=model_bytes,
        qdq_pairs=qdq.get("qdq_pairs"),
        quant_dtypes=tuple(qdq.get("quant_dtypes") or []),
        excluded_nodes=len(excluded) if excluded is not None else (0 if not is_qdq else None),
        excluded_node_names=tuple(excluded) if excluded is not None else None,
        num_quantized_nodes=described.num_quantized_nodes if described else (0 if not is_qdq else None),
        quant_settings=settings,
        candidate=candidate,
        metrics_path=rel_path(metrics_path),
        model_manifest=rel_path(described.path) if described else None,
        derived_from_full_model=bool(described and described.derived == "full"),
        run_dir=rel_path(run_dir),
        notes=tuple(notes),
        source=VariantSource(
            metrics_file=metrics_path,
            metrics_sha256=hasher(metrics_path),
            dataset=metrics["dataset"],
            postprocess=metrics.get("postprocess") or {},
            manifest_files=tuple(p for p in manifest_files if p is not None),
            model_problem=model_problem,
            derived=described.derived if described else None,
            detections_sha256=metrics.get("detections_sha256"),
            num_detections=(metrics.get("metrics") or {}).get("num_detections"),
        ),
    )
