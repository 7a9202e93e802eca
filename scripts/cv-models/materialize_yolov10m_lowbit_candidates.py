"""Materialize low-bit candidates from exclusion schemes: one ModelOpt Q/DQ model per K, optionally evaluated.

For each K, reads ``<schemes-dir>/scheme_k{K}.json`` (from make_yolov10m_candidate_schemes.py), quantizes
``--onnx-path`` with its exclusions (``lowbit.quantize.quantize_onnx``) into
``<run-root>/onnx/<model>-<mode>-k{K}.onnx`` (``<model>``: the file stem of ``--onnx-path``, ``yolov10m``
for the card's checkpoint), and with ``--eval`` evaluates it (``lowbit.evaluate.evaluate``) into
``<run-root>/<mode>-k{K}-coco/metrics.json``. ``--include-random`` also materializes the
``scheme_k{K}_random{SEED}.json`` controls, to check whether the ranking beats a random choice of
the same number of nodes. A summary table (``<run-root>/candidates-<mode>/summary.json`` and
``.md``) lists each candidate's excluded nodes, Q/DQ pairs and, when evaluated, mAP.

FP8 uses ``max`` calibration (ModelOpt derives FP8 scales assuming max ranges); INT8 uses entropy
unless ``--calibration-method`` says otherwise.

Every setting, scheme and the evaluation inputs are checked before anything is quantized. Each
candidate records what it was built from in ``<model>-<mode>-k{K}.inputs.json`` beside the model
(sha256 of the ONNX model, the calibration tensor and the scheme; the quantization and evaluation
settings; the sha256 of the model and metrics it produced). A rerun skips a candidate whose record
matches; a candidate built from other inputs or settings is an error unless ``--overwrite``
(``OVERWRITE=1``), which rebuilds every candidate.

Example (what ``materialize_yolov10m_lowbit_candidates.sh`` runs)::

    python scripts/cv-models/materialize_yolov10m_lowbit_candidates.py \\
        --run-root tmp/yolov10m_lowbit/run --calib-path tmp/yolov10m_lowbit/run/calib/calib_yolov10m_640.npy \\
        --ks 0 5 10 20 --quant-mode fp8 --eval
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from lowbit.cli import cli_entry
from lowbit.logs import get_logger, setup_logging
from lowbit.ort_session import MODELOPT_CALIBRATION_EPS
from lowbit.runs import (
    CARD_ONNX_PATH,
    UserError,
    atomic_write_json,
    atomic_write_text,
    check_input_file,
    manifest_run,
    sha256_file,
)
from lowbit.schemes import Scheme, find_schemes

SCRIPT = "materialize_yolov10m_lowbit_candidates.py"
RECORD_SCHEMA_VERSION = 1
log = get_logger("materialize")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--run-root", type=Path, required=True, help="run directory (card: RUN_ROOT)")
    parser.add_argument("--calib-path", type=Path, required=True, help="calibration .npy (card: CALIB_PATH)")
    parser.add_argument("--schemes-dir", type=Path, default=None, help="default: <run-root>/schemes")
    parser.add_argument("--onnx-path", type=Path, default=CARD_ONNX_PATH, help="FP32 ONNX model; its stem names the outputs")
    parser.add_argument("--ks", type=int, nargs="+", default=[0, 5, 10, 20], help="which scheme_k{K}.json to build")
    parser.add_argument("--quant-mode", choices=("fp8", "int8", "int4"), default="fp8", help="int4 is refused with the reason")
    parser.add_argument("--calibration-method", choices=("entropy", "max"), default=None,
                        help="default: max for fp8, entropy for int8")  # fmt: skip
    parser.add_argument("--high-precision-dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    parser.add_argument("--calibration-eps", nargs="+", choices=MODELOPT_CALIBRATION_EPS, default=["cpu"],
                        help="ModelOpt calibration EPs, in order")  # fmt: skip
    parser.add_argument("--include-random", action="store_true", help="also build scheme_k{K}_random*.json controls")
    parser.add_argument("--eval", action="store_true", help="evaluate every candidate (card: EVAL=1)")
    parser.add_argument("--data-root", type=Path, default=Path("datasets/coco2017/source-data"))
    parser.add_argument("--max-images", type=int, default=100)
    parser.add_argument("--providers", nargs="+", default=["CPUExecutionProvider"])
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--warmup-runs", type=int, default=10)
    parser.add_argument("--skip-latency", type=int, default=10)
    parser.add_argument("--overwrite", action="store_true",
                        help="rebuild every candidate, also those built from other inputs or settings")  # fmt: skip
    return parser


@dataclass
class Candidate:
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
        return self.model_path.with_suffix(".inputs.json")


# ----------------------------------------------------------------------------------------------------------------------
# checks, all before anything is quantized


def check_settings(args: argparse.Namespace) -> None:
    """Numbers and modes; with ``--eval`` the evaluator's own checks of the evaluation settings."""
    from lowbit.quantize import refuse_int4

    if not args.ks or min(args.ks) < 0:
        raise UserError(f"--ks values must be >= 0, got {args.ks}", flag="--ks")
    refuse_int4(args.quant_mode, "--quant-mode")
    if args.eval:
        from lowbit.evaluate import resolve_data_paths, validate_settings
        from lowbit.ort_session import check_providers

        settings = eval_settings(args, args.onnx_path, args.run_root / "check" / "metrics.json")
        validate_settings(settings)
        resolve_data_paths(settings)
        check_providers(args.providers, disable_cpu_fallback=False, flag="--providers")


def eval_settings(args: argparse.Namespace, model_path: Path, out: Path):
    from lowbit.evaluate import EvalSettings

    return EvalSettings(
        onnx_path=model_path, data_root=args.data_root, max_images=args.max_images, providers=list(args.providers),
        warmup_runs=args.warmup_runs, skip_latency=args.skip_latency, imgsz=args.imgsz, out=out, overwrite=True,
    )  # fmt: skip


def quantize_settings(args: argparse.Namespace, candidate: Candidate):
    from lowbit.quantize import QuantizeSettings

    return QuantizeSettings(
        onnx_path=args.onnx_path, calib_path=args.calib_path, output_path=candidate.model_path,
        quantize_mode=args.quant_mode, calibration_method=args.calibration_method,
        calibration_eps=list(args.calibration_eps), high_precision_dtype=args.high_precision_dtype,
        exclude_json=candidate.scheme.path, overwrite=True,
    )  # fmt: skip


def check_schemes_fit(args: argparse.Namespace, candidates: list[Candidate]) -> None:
    """Every candidate the quantizer will run on passes its checks (the calibration tensor is read once)."""
    from lowbit.quantize import validate_settings

    todo = [c for c in candidates if c.quantize]
    if not todo:
        return
    node_names = {n.name for n in validate_settings(quantize_settings(args, todo[0])).model.graph.node}
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


def _read_record(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("schema_version") == RECORD_SCHEMA_VERSION else None


def _differences(expected: dict, recorded: dict | None) -> list[str]:
    recorded = recorded or {}
    return [key for key in expected if expected[key] != recorded.get(key)]


def plan_candidates(args: argparse.Namespace, schemes: list[Scheme], digests: dict[str, str]) -> list[Candidate]:
    """One Candidate per scheme, each marked to quantize and/or evaluate.

    Without ``--overwrite`` a candidate whose record matches is kept, and one whose model, record or
    metrics disagree with this run's inputs or settings is an error naming ``--overwrite``: nothing is
    quantized then, and no summary claims inputs that the candidates were not built from.
    """
    stem = args.onnx_path.stem
    quant = {"quant_mode": args.quant_mode, "high_precision_dtype": args.high_precision_dtype,
             "calibration_method": args.calibration_method, "calibration_eps": list(args.calibration_eps)}  # fmt: skip
    evaluation = ({"data_root": str(args.data_root), "max_images": args.max_images, "providers": list(args.providers),
                   "imgsz": args.imgsz, "warmup_runs": args.warmup_runs, "skip_latency": args.skip_latency}
                  if args.eval else None)  # fmt: skip
    candidates, stale = [], []
    for scheme in schemes:
        name = f"{args.quant_mode}-{scheme.tag}"
        build = {"onnx_sha256": digests["onnx"], "calib_sha256": digests["calib"],
                 "scheme_sha256": sha256_file(scheme.path), "quantize": quant}  # fmt: skip
        c = Candidate(scheme, name, args.run_root / "onnx" / f"{stem}-{name}.onnx",
                      args.run_root / f"{name}-coco" / "metrics.json", build, evaluation, None)  # fmt: skip
        if args.overwrite:
            c.evaluate = evaluation is not None
            problems = []
        else:
            problems = _stale_parts(c)
        if problems:
            stale.append(f"{name} ({', '.join(problems)})")
        candidates.append(c)
    if stale:
        raise UserError(
            f"--run-root {args.run_root} holds candidates built from other inputs or settings than this run's: "
            f"{'; '.join(stale)}. Pass --overwrite (OVERWRITE=1) to rebuild them, or use another --run-root",
            flag="--overwrite",
        )
    return candidates


def _stale_parts(c: Candidate) -> list[str]:
    """Mark what ``c`` needs; returns what disagrees with an earlier build (empty: nothing is stale)."""
    record = _read_record(c.record_path)
    exists = c.model_path.exists() or c.record_path.exists()
    if not exists:
        c.evaluate = c.evaluation is not None
        return []
    if record is None or not c.model_path.is_file():
        return ["no record of its inputs" if record is None else "model file missing"]
    differences = _differences(c.build, record.get("build"))
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


def materialize(args: argparse.Namespace, c: Candidate) -> dict:
    """Quantize and/or evaluate ``c`` as planned; returns its record (also written beside the model)."""
    from lowbit.evaluate import evaluate
    from lowbit.quantize import quantize_onnx

    record = dict(c.record or {})
    if c.quantize:
        c.record_path.unlink(missing_ok=True)  # a failed rebuild must not leave the old record looking current
        log.info("%s: quantizing with %d excluded nodes", c.name, c.scheme.k)
        result = quantize_onnx(quantize_settings(args, c), argv=None)
        record = {"schema_version": RECORD_SCHEMA_VERSION, "candidate": c.name, "build": c.build,
                  "model_sha256": sha256_file(result.output_path), "qdq_pairs": result.qdq_pairs,
                  "num_quantized_nodes": len(result.quantized_nodes), "evaluation": None, "metrics_sha256": None}  # fmt: skip
        atomic_write_json(c.record_path, record)
    else:
        log.info("%s: %s was built from these inputs, kept", c.name, c.model_path)
    if c.evaluate:
        log.info("%s: evaluating", c.name)
        evaluate(eval_settings(args, c.model_path, c.metrics_path))
        record.update(evaluation=c.evaluation, metrics_sha256=sha256_file(c.metrics_path))
        atomic_write_json(c.record_path, record)
    return record


def summary_row(args: argparse.Namespace, c: Candidate, record: dict) -> dict:
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
    if args.eval:
        result = json.loads(c.metrics_path.read_text(encoding="utf-8"))
        row.update(metrics=str(c.metrics_path), map50_95=result["metrics"]["map50_95"],
                   map50=result["metrics"]["map50"], latency_ms_p50=result["latency_ms"]["p50"])  # fmt: skip
    return row


def summary_markdown(rows: list[dict]) -> str:
    lines = ["| candidate | excluded | Q/DQ pairs | mAP50-95 | mAP50 | p50 ms |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        ap, ap50 = (f"{r[key]:.4f}" if r.get(key) is not None else "-" for key in ("map50_95", "map50"))
        p50 = f"{r['latency_ms_p50']:.1f}" if r.get("latency_ms_p50") is not None else "-"  # None: too few timed runs
        lines.append(f"| {r['candidate']} | {len(r['excluded_nodes'])} | {r['qdq_pairs']} | {ap} | {ap50} | {p50} |")
    return "\n".join(lines) + "\n"


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.onnx_path = check_input_file(args.onnx_path, "--onnx-path")
    args.calib_path = check_input_file(args.calib_path, "--calib-path")
    args.schemes_dir = args.schemes_dir or args.run_root / "schemes"
    check_settings(args)
    schemes = find_schemes(args.schemes_dir, sorted(set(args.ks)), args.include_random, "--schemes-dir")
    digests = {"onnx": sha256_file(args.onnx_path), "calib": sha256_file(args.calib_path)}
    candidates = plan_candidates(args, schemes, digests)
    check_schemes_fit(args, candidates)

    out_dir = args.run_root / f"candidates-{args.quant_mode}"
    setup_logging(out_dir / "materialize.log")
    rows = []
    with manifest_run(out_dir / "manifest.json", SCRIPT, vars(args), argv) as manifest:
        manifest.add_input(args.onnx_path, digests["onnx"])
        manifest.add_input(args.calib_path, digests["calib"])
        for name in ("summary.json", "summary.md"):  # an earlier summary must not outlive a failed rerun
            (out_dir / name).unlink(missing_ok=True)
        for c in candidates:
            manifest.add_input(c.scheme.path, c.build["scheme_sha256"])
            rows.append(summary_row(args, c, materialize(args, c)))
            manifest.update(candidates=rows)
        atomic_write_json(out_dir / "summary.json", {"quant_mode": args.quant_mode, "candidates": rows})
        atomic_write_text(out_dir / "summary.md", summary_markdown(rows))
        manifest.add_output("summary", out_dir / "summary.json")
    print(summary_markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
