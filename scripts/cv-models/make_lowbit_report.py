"""Comparison report of low-bit variants: report.md, report.json and pareto.png from existing evaluations.

Reads every ``metrics.json`` written by ``eval_yolov10m_onnx_coco.py`` under the ``--run-dir`` folders
(the FP32 baseline and each INT8/FP8 variant, e.g. ``baseline-coco/``, ``int8-coco/``,
``fp8-k5-coco/``) and the quantizer manifests beside the evaluated models, then writes into
``--out-dir``:

* ``report.md``: the recommendation and its reason, one table row per variant (mAP50-95, mAP50,
  ΔAP vs FP32, latency p50/p90 and provider, TensorRT GPU time, model size, Q/DQ pairs, excluded
  and quantized nodes, quantization settings), the metrics file of each row, notes;
* ``report.json``: the same, keys documented in ``lowbit/report.py``;
* ``pareto.png``: ΔAP vs latency and vs model size, budget line, recommended variant marked;
* ``report.manifest.json`` and ``report.log``.

The recommendation: among quantized variants that lose at most ``--budget-ap`` AP points
(mAP50-95 × 100) against FP32, the fastest TensorRT GPU compute time when TensorRT was measured
(latencies within ``--latency-tie-pct`` % are timing noise: ties go to the more accurate variant);
without TensorRT, the largest share of Conv/MatMul MACs in low precision (``lowbit.mac_share``),
then the more accurate. ONNX Runtime latencies are listed with their provider but never rank
variants. FP32 when none is within budget.

Only records of this run are used (``lowbit/report_inputs.py``): an evaluation scored on other
annotations or images than the FP32 baseline, whose model file changed since, or quantized from
another model, and a ``search.json`` that is not a search of this run, are left out and listed under
"Dropped" in report.md (``dropped`` in report.json) with the reason. An unusable FP32 baseline, no
usable quantized variant, or an annotation file that changed since the run was scored (``--data-root``,
else the run's ``workflow.json``, else the file the baseline names) stop the report with one error.
With budget-search results (``search-<mode>/search.json``) in the run dir, ``search-curves.png``
plots ΔAP against K per mode with the random controls and the budget line.

With ``--tensorrt auto`` and ``trtexec`` installed, one engine per variant is built under
``<out-dir>/tensorrt/`` (FP16 for the float model, strongly typed for Q/DQ models) and timed the way
ModelOpt's examples do (``lowbit/trt.py``); a rerun reuses an engine result whose model and settings
are unchanged (delete ``<out-dir>/tensorrt/`` to re-measure). Without TensorRT every TensorRT cell
reads "not measured: TensorRT not installed".

Example (the workflow's last step; any set of run dirs works)::

    python scripts/cv-models/make_lowbit_report.py --run-dir tmp/yolov10m_lowbit/2026-11-27_10-31-05
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from lowbit import records, trt
from lowbit import report as lowbit_report
from lowbit.cli import cli_entry, positive_float
from lowbit.errors import UserError
from lowbit.logs import get_logger, setup_logging
from lowbit.run_lock import hold_run_folder
from lowbit.runs import atomic_write_bytes, atomic_write_json, atomic_write_text, manifest_run, resolve_repo_path

SCRIPT = "make_lowbit_report.py"
OUTPUT_FILES = ("report.json", "report.md", "pareto.png", "search-curves.png")
log = get_logger("make_report")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--run-dir", type=Path, nargs="+", required=True,
        help="run dir(s) holding */metrics.json evaluations (one model, one image set)",
    )
    parser.add_argument("--out-dir", type=Path, default=None, help="where the report goes; None means the first --run-dir")
    parser.add_argument(
        "--budget-ap", type=positive_float, default=lowbit_report.DEFAULT_BUDGET_AP,
        help="largest accepted mAP50-95 loss vs FP32, AP points (mAP x 100; finite, > 0)",
    )
    parser.add_argument(
        "--data-root", type=Path, default=None,
        help="dataset whose annotations/instances_val2017.json must still be the file the run was scored on; "
        "None means the run's workflow.json, then the annotation file the FP32 metrics name (checked when present)",
    )
    parser.add_argument(
        "--latency-tie-pct", type=float, default=lowbit_report.DEFAULT_LATENCY_TIE_PCT,
        help="latencies within this percentage of the fastest tie; the most accurate of them is recommended",
    )
    parser.add_argument(
        "--tensorrt", choices=("auto", "off"), default="auto",
        help="auto: build and time a TensorRT engine per variant when trtexec exists; off: never",
    )
    parser.add_argument(
        "--trtexec", type=Path, default=None,
        help="trtexec executable; None means PATH, then /usr/src/tensorrt/bin/trtexec",
    )
    parser.add_argument(
        "--trt-qdq-mode", choices=trt.QDQ_MODES, default="stronglyTyped",
        help="TensorRT build of Q/DQ models: stronglyTyped (tensor types as in the graph, as ModelOpt's examples) "
        "or mixed (--fp16 plus --int8/--fp8: TensorRT may run non-quantized layers in FP16)",
    )
    parser.add_argument("--trt-iterations", type=int, default=trt.DEFAULT_ITERATIONS, help="timed trtexec inferences (minimum)")
    parser.add_argument("--trt-warmup-ms", type=int, default=trt.DEFAULT_WARMUP_MS, help="trtexec warm-up, milliseconds")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report in --out-dir")
    parser.add_argument("--verbose", action="store_true", help="debug logging on the console")
    return parser


def validate_args(args: argparse.Namespace) -> None:
    if not args.latency_tie_pct >= 0:
        raise UserError(f"--latency-tie-pct must be >= 0, got {args.latency_tie_pct}", flag="--latency-tie-pct")
    if args.trt_iterations < 1:
        raise UserError(f"--trt-iterations must be >= 1, got {args.trt_iterations}", flag="--trt-iterations")
    if args.trt_warmup_ms < 0:
        raise UserError(f"--trt-warmup-ms must be >= 0, got {args.trt_warmup_ms}", flag="--trt-warmup-ms")
    if args.trtexec is not None and trt.find_trtexec(args.trtexec) is None:
        raise UserError(f"--trtexec: {args.trtexec} is not an executable file", flag="--trtexec")


def _read_json(path: Path):
    """A TensorRT result kept from an earlier report, or None (missing or damaged: measured again)."""
    try:
        return records.read_json(path)
    except UserError:
        return None


def _slug(label: str, used: set[str]) -> str:
    base = re.sub(r"[^a-z0-9._-]+", "_", label.lower()).strip("_") or "variant"
    slug, i = base, 2
    while slug in used:
        slug, i = f"{base}_{i}", i + 1
    used.add(slug)
    return slug


def run_tensorrt(collected: dict, args: argparse.Namespace, out_dir: Path) -> dict:
    """Engine + GPU compute time per variant when trtexec exists; the report's ``tensorrt`` input."""
    if args.tensorrt == "off":
        return {"status": lowbit_report.TRT_DISABLED, "trtexec": None, "tensorrt_python": None, "results": {}}
    found = trt.tensorrt_status(args.trtexec)
    info = {"trtexec": found["trtexec"], "tensorrt_python": found["tensorrt_python"], "qdq_mode": args.trt_qdq_mode}
    if found["trtexec"] is None:
        log.info("TensorRT latency %s", found["status"])
        return {**info, "status": found["status"], "results": {}}
    trt_dir = out_dir / "tensorrt"
    results, used = {}, set()
    for v in collected["variants"]:
        name = _slug(v["label"], used)
        if v["model_file"] is None:
            results[v["metrics_path"]] = {"status": "not measured: the evaluated model file is not available"}
            continue
        precision = trt.engine_precision(v["quant_dtypes"], args.trt_qdq_mode)
        key = {
            "model_sha256": v["model_sha256"], "precision": precision, "iterations": args.trt_iterations,
            "warmup_ms": args.trt_warmup_ms, "trtexec": found["trtexec"],
        }
        record = trt_dir / f"{name}.json"
        previous = _read_json(record)
        if (
            isinstance(previous, dict) and previous.get("status") == "measured"
            and previous.get("key") == key and Path(str(previous.get("engine_path"))).is_file()
        ):
            log.info("TensorRT %s: unchanged since %s, reused", v["label"], record)
            results[v["metrics_path"]] = {**previous, "reused": True}
            continue
        result = trt.benchmark_engine(
            v["model_file"], trt_dir, name, precision, timing_cache=trt_dir / "timing.cache",
            trtexec=found["trtexec"], iterations=args.trt_iterations, warmup_ms=args.trt_warmup_ms,
        )
        result["key"] = key
        atomic_write_json(record, result)
        log.info("TensorRT %s (%s): %s", v["label"], precision, result["status"])
        results[v["metrics_path"]] = result
    return {**info, "status": "measured", "results": results}


def summary_text(report: dict, out_dir: Path) -> str:
    axis = report["latency_axis"]
    ds = report["dataset"]
    rows = [
        f"report: {out_dir / 'report.md'} (+ report.json, pareto.png)",
        f"{ds['name']}: {ds['num_images']} images; latency: {axis['description']}; TensorRT: {report['tensorrt']['status']}",
        f"  {'variant':<44} {'mAP50-95':>8} {'ΔAP':>7} {'p50 ms':>9} {'size MB':>8}",
    ]
    for v in report["variants"]:
        lat = lowbit_report.variant_latency(v, axis)
        size = f"{v['model_bytes'] / 1e6:.2f}" if v["model_bytes"] else "unknown"
        mark = " *" if v["label"] == report["recommended"]["variant"] else ""
        rows.append(
            f"  {(v['label'] + mark)[:44]:<44} {v['map50_95']:>8.4f} {v['delta_ap']:>+7.2f} "
            f"{('-' if lat is None else f'{lat:.2f}'):>9} {size:>8}"
        )
    rows.append(f"recommended (*): {report['recommended']['variant']} — {report['recommended']['reason']}")
    if report["dropped"]:
        rows.append(f"left out ({len(report['dropped'])}, see report.md 'Dropped'): "
                    + ", ".join(d["path"] for d in report["dropped"]))
    return "\n".join(rows)


def write_report(collected: dict, args: argparse.Namespace, argv: list[str] | None, out_dir: Path) -> dict:
    """report.json, report.md and the plots in ``out_dir`` (held by this process); returns the report."""
    existing = [name for name in OUTPUT_FILES if (out_dir / name).exists()]
    if existing and not args.overwrite:
        raise UserError(
            f"--out-dir: {out_dir} already holds {', '.join(existing)}; pass --overwrite to replace them",
            flag="--overwrite",
        )
    setup_logging(out_dir / "report.log", args.verbose)
    for d in collected["dropped"]:
        log.warning("left out %s: %s", d["path"], d["reason"])
    with manifest_run(out_dir / "report.manifest.json", SCRIPT, vars(args), argv, kind="report") as manifest:
        for name in OUTPUT_FILES:  # --overwrite: a failed rebuild must not leave the old report looking current
            (out_dir / name).unlink(missing_ok=True)
        for path, digest in collected["provenance"]["records"].items():
            manifest.add_input(path, digest)
        log.info("%d evaluations under %s", len(collected["variants"]), ", ".join(collected["run_dirs"]))
        tensorrt = run_tensorrt(collected, args, out_dir)
        report = lowbit_report.build_report(collected, args.budget_ap, args.latency_tie_pct, tensorrt)
        atomic_write_bytes(out_dir / "pareto.png", lowbit_report.plot_pareto(report))
        if report["search"]:
            atomic_write_bytes(out_dir / lowbit_report.SEARCH_PLOT, lowbit_report.plot_search_curves(report))
            manifest.add_output(lowbit_report.SEARCH_PLOT, out_dir / lowbit_report.SEARCH_PLOT)
        atomic_write_text(out_dir / "report.md", lowbit_report.report_markdown(report))
        atomic_write_json(out_dir / "report.json", report)  # last: its presence means the report is complete
        for name in OUTPUT_FILES[:3]:
            manifest.add_output(name, out_dir / name)
        manifest.update(
            recommended=report["recommended"]["variant"],
            variants=len(report["variants"]),
            dropped=len(report["dropped"]),
            tensorrt_status=report["tensorrt"]["status"],
        )
    return report


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    validate_args(args)
    run_dirs = [resolve_repo_path(d) for d in args.run_dir]
    for given, run_dir in zip(args.run_dir, run_dirs):
        if not run_dir.is_dir():
            raise UserError(f"--run-dir: {given} is not a directory", flag="--run-dir")
    # every record is read and checked before anything is written
    collected = lowbit_report.collect_variants(run_dirs, args.data_root)
    out_dir = args.out_dir if args.out_dir is not None else run_dirs[0]
    with hold_run_folder(out_dir, "--out-dir"):
        report = write_report(collected, args, argv, out_dir)
    print(summary_text(report, out_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
