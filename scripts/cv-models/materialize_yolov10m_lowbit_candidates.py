"""Materialize low-bit candidates from exclusion schemes: one ModelOpt Q/DQ model per K, optionally evaluated.

For each K, reads ``<schemes-dir>/scheme_k{K}.json`` (from make_yolov10m_candidate_schemes.py), runs
``quantize_yolov10m_onnx.py`` with its exclusions into ``<run-root>/onnx/yolov10m-<mode>-k{K}.onnx``,
and with ``--eval`` evaluates it with ``eval_yolov10m_onnx_coco.py`` into
``<run-root>/<mode>-k{K}-coco/metrics.json``. ``--include-random`` also materializes the
``scheme_k{K}_random{SEED}.json`` controls, to check whether the ranking beats a random choice of
the same number of nodes. A summary table (``<run-root>/candidates-<mode>/summary.json`` and
``.md``) lists each candidate's excluded nodes, Q/DQ pairs and, when evaluated, mAP.

FP8 uses ``max`` calibration (ModelOpt derives FP8 scales assuming max ranges); INT8 uses entropy
unless ``--calibration-method`` says otherwise. A candidate whose model and metrics already exist is
skipped (and reported as such) unless ``--overwrite``.

Example (what ``materialize_yolov10m_lowbit_candidates.sh`` runs)::

    python scripts/cv-models/materialize_yolov10m_lowbit_candidates.py \
        --run-root tmp/yolov10m_lowbit/run --calib-path tmp/yolov10m_lowbit/run/calib/calib_yolov10m_640.npy \
        --ks 0 5 10 20 --quant-mode fp8 --eval
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lowbit.logs import get_logger, setup_logging
from lowbit.runs import (
    CARD_ONNX_PATH,
    UserError,
    atomic_write_json,
    atomic_write_text,
    check_input_file,
    load_script,
    manifest_run,
)
from lowbit.cli import cli_entry

HERE = Path(__file__).resolve().parent
DEFAULT_ONNX = CARD_ONNX_PATH
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
    parser.add_argument("--onnx-path", type=Path, default=DEFAULT_ONNX, help="FP32 ONNX model")
    parser.add_argument("--ks", type=int, nargs="+", default=[0, 5, 10, 20], help="which scheme_k{K}.json to build")
    parser.add_argument("--quant-mode", choices=("fp8", "int8", "int4"), default="fp8")
    parser.add_argument("--calibration-method", choices=("entropy", "max"), default=None,
                        help="default: max for fp8, entropy for int8")
    parser.add_argument("--high-precision-dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    parser.add_argument("--calibration-eps", nargs="+", default=["cpu"], help="passed to the quantizer")
    parser.add_argument("--include-random", action="store_true", help="also build scheme_k{K}_random*.json controls")
    parser.add_argument("--eval", action="store_true", help="evaluate every candidate (card: EVAL=1)")
    parser.add_argument("--data-root", type=Path, default=Path("datasets/coco2017/source-data"))
    parser.add_argument("--max-images", type=int, default=100)
    parser.add_argument("--providers", nargs="+", default=["CPUExecutionProvider"])
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--warmup-runs", type=int, default=10)
    parser.add_argument("--skip-latency", type=int, default=10)
    parser.add_argument("--overwrite", action="store_true", help="rebuild candidates that already exist")
    return parser


def scheme_files(schemes_dir: Path, ks: list[int], include_random: bool) -> list[tuple[str, Path]]:
    """``(candidate tag, scheme path)`` for each K (and its random controls), validated up front."""
    found, missing = [], []
    for k in ks:
        path = schemes_dir / f"scheme_k{k}.json"
        if not path.is_file():
            missing.append(path.name)
            continue
        found.append((f"k{k}", path))
        if include_random and k > 0:
            found += [(p.stem.removeprefix("scheme_"), p) for p in sorted(schemes_dir.glob(f"scheme_k{k}_random*.json"))]
    if missing:
        raise UserError(f"--schemes-dir: {schemes_dir} lacks {', '.join(missing)} (run make_yolov10m_candidate_schemes.py)")
    return found


def _ok(manifest_path: Path) -> bool:
    try:
        return json.loads(manifest_path.read_text()).get("status") == "ok"
    except (OSError, ValueError):
        return False


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    onnx_path = check_input_file(args.onnx_path, "--onnx-path")
    calib_path = check_input_file(args.calib_path, "--calib-path")
    schemes_dir = args.schemes_dir or args.run_root / "schemes"
    if not schemes_dir.is_dir():
        raise UserError(f"--schemes-dir: {schemes_dir} does not exist (run make_yolov10m_candidate_schemes.py)")
    if args.quant_mode == "int4":
        raise UserError(
            "--quant-mode int4: ModelOpt's INT4 mode quantizes only Gemm/MatMul nodes with constant weights; "
            "YOLOv10 is Conv-dominated, so there is nothing to materialize (quantize_yolov10m_onnx.py "
            "--quantize-mode int4 reports the count)"
        )
    schemes = scheme_files(schemes_dir, args.ks, args.include_random)
    if args.eval and not (args.data_root / "annotations" / "instances_val2017.json").is_file():
        raise UserError(f"--data-root: {args.data_root}/annotations/instances_val2017.json not found (needed by --eval)")
    out_dir = args.run_root / f"candidates-{args.quant_mode}"
    setup_logging(out_dir / "materialize.log")
    quantizer = load_script(HERE / "quantize_yolov10m_onnx.py")
    evaluator = load_script(HERE / "eval_yolov10m_onnx_coco.py") if args.eval else None

    rows = []
    with manifest_run(out_dir / "manifest.json", "materialize_yolov10m_lowbit_candidates.py", vars(args)) as manifest:
        manifest.add_input(onnx_path)
        manifest.add_input(calib_path)
        for tag, scheme_path in schemes:
            scheme = json.loads(scheme_path.read_text())
            model_path = args.run_root / "onnx" / f"yolov10m-{args.quant_mode}-{tag}.onnx"
            model_manifest = model_path.with_suffix(".manifest.json")
            if model_path.exists() and _ok(model_manifest) and not args.overwrite:
                log.info("%s: %s exists, skipped", tag, model_path)
            else:
                quant_argv = [
                    "--onnx-path", str(onnx_path), "--calib-path", str(calib_path), "--output-path", str(model_path),
                    "--quantize-mode", args.quant_mode, "--high-precision-dtype", args.high_precision_dtype,
                    "--exclude-json", str(scheme_path), "--calibration-eps", *args.calibration_eps,
                ]
                if args.calibration_method:
                    quant_argv += ["--calibration-method", args.calibration_method]
                if args.overwrite:
                    quant_argv.append("--overwrite")
                log.info("%s: quantizing with %d excluded nodes", tag, len(scheme["nodes_to_exclude"]))
                rc = quantizer.main(quant_argv)
                setup_logging(out_dir / "materialize.log")  # the sub-script pointed the logger at its own file
                if rc != 0:
                    raise RuntimeError(f"quantization of candidate {tag} failed; see {model_path.with_suffix('.log')}")
            quant = json.loads(model_manifest.read_text())["extra"]
            row = {
                "candidate": f"{args.quant_mode}-{tag}",
                "k": scheme["k"],
                "random_control": "random" in tag,
                "scheme": str(scheme_path),
                "model": str(model_path),
                "excluded_nodes": scheme["nodes_to_exclude"],
                "qdq_pairs": quant["qdq_pairs"],
                "num_quantized_nodes": quant["num_quantized_nodes"],
                "model_bytes": model_path.stat().st_size,
            }
            if evaluator is not None:
                metrics_path = args.run_root / f"{args.quant_mode}-{tag}-coco" / "metrics.json"
                if not (metrics_path.exists() and not args.overwrite):
                    eval_argv = [
                        "--onnx-path", str(model_path), "--data-root", str(args.data_root),
                        "--max-images", str(args.max_images), "--providers", *args.providers,
                        "--warmup-runs", str(args.warmup_runs), "--skip-latency", str(args.skip_latency),
                        "--imgsz", str(args.imgsz), "--out", str(metrics_path), "--overwrite",
                    ]
                    rc = evaluator.main(eval_argv)
                    setup_logging(out_dir / "materialize.log")
                    if rc != 0:
                        raise RuntimeError(f"evaluation of candidate {tag} failed")
                result = json.loads(metrics_path.read_text())
                row.update(
                    metrics=str(metrics_path),
                    map50_95=result["metrics"]["map50_95"],
                    map50=result["metrics"]["map50"],
                    latency_ms_p50=result["latency_ms"]["p50"],
                )
            rows.append(row)
            manifest.update(candidates=rows)
        atomic_write_json(out_dir / "summary.json", {"quant_mode": args.quant_mode, "candidates": rows})
        atomic_write_text(out_dir / "summary.md", summary_markdown(rows))
        manifest.add_output("summary", out_dir / "summary.json")
    print(summary_markdown(rows))
    return 0


def summary_markdown(rows: list[dict]) -> str:
    lines = ["| candidate | excluded | Q/DQ pairs | mAP50-95 | mAP50 | p50 ms |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        fmt = lambda key: f"{r[key]:.4f}" if r.get(key) is not None else "-"  # noqa: E731
        p50 = f"{r['latency_ms_p50']:.1f}" if r.get("latency_ms_p50") is not None else "-"  # None: too few timed runs
        lines.append(
            f"| {r['candidate']} | {len(r['excluded_nodes'])} | {r['qdq_pairs']} | {fmt('map50_95')} | {fmt('map50')} | {p50} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
