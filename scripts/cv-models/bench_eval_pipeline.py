"""Benchmark of the COCO evaluator (lowbit.evaluate): its metric step and its end-to-end speed.

Example (on a GPU machine, sweeping the prefetch worker count):

    python scripts/cv-models/bench_eval_pipeline.py \
      --onnx-path models/cv-models/yolov10n-demo-shapes/yolov10n-demo-shapes.onnx \
      --data-root datasets/demo-shapes --max-images 300 --imgsz 640 \
      --providers CUDAExecutionProvider --disable-cpu-fallback --workers 1 2 4 8

Prints, from one run on the same images and model:

(a) the metric step: faster-coco-eval (what the evaluator uses) against pycocotools on the same
    detections, seconds each, the speed-up (goal >= 5x) and the largest difference of the 12 COCO
    stats (goal: identical, <= 1e-4);
(b) end to end: the evaluator's images/s (prefetch, inference and postprocessing; warm-up and
    scoring excluded) against bare ``session.run`` images/s over the same, already preprocessed
    inputs on the same providers (goal >= 0.9), one row per ``--workers`` count.

Writes ``bench.json`` (``--out``) and each evaluator run under ``eval-w<N>/`` beside it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lowbit.cli import add_coco_paths, cli_entry, imgsz, make_parser, non_negative_int, positive_int
from lowbit.evaluate import DEFAULT_WORKERS, EvalSettings, resolve_data_paths
from lowbit.evaluate_bench import END_TO_END_GOAL, METRIC_SPEEDUP_GOAL, run_bench
from lowbit.logs import setup_logging
from lowbit.runs import (
    REPO_ROOT,
    atomic_write_json,
    check_input_file,
    check_output_path,
    new_run_dir,
    resolve_repo_path,
)


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(__doc__)
    parser.add_argument("--onnx-path", type=Path, required=True, help="ONNX model, input [1,3,H,W]")
    add_coco_paths(parser)
    parser.add_argument("--max-images", type=positive_int, default=50, help="first N image ids (ascending)")
    parser.add_argument("--imgsz", type=imgsz, default=640, help="square letterbox side, pixels")
    parser.add_argument("--providers", nargs="+", default=["CPUExecutionProvider"], help="ORT providers, in order")
    parser.add_argument("--disable-cpu-fallback", action="store_true", help="fail if any node would run on CPU")
    parser.add_argument(
        "--workers",
        type=non_negative_int,
        nargs="+",
        default=[DEFAULT_WORKERS],
        help="prefetch worker counts to sweep; one evaluator run each",
    )
    parser.add_argument(
        "--warmup-runs", type=non_negative_int, default=3, help="untimed session.run calls before each timing"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="bench.json path; None means tmp/bench_eval_pipeline/<time>/bench.json"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing bench.json")
    return parser


def validate(args: argparse.Namespace) -> Path:
    """Check the flags and return the bench.json path (nothing is written)."""
    check_input_file(resolve_repo_path(args.onnx_path), "--onnx-path")
    resolve_data_paths(eval_settings(args, args.workers[0], None))
    if args.out is None:
        return new_run_dir(REPO_ROOT / "tmp" / "bench_eval_pipeline") / "bench.json"
    out = args.out if args.out.is_absolute() else Path.cwd() / args.out
    check_output_path(out, "--out", args.overwrite, suffix=".json")
    return out


def eval_settings(args: argparse.Namespace, workers: int, out: Path) -> EvalSettings:
    return EvalSettings(
        onnx_path=args.onnx_path,
        data_root=args.data_root,
        images_dir=args.images_dir,
        ann_file=args.ann_file,
        max_images=args.max_images,
        providers=list(args.providers),
        disable_cpu_fallback=args.disable_cpu_fallback,
        warmup_runs=args.warmup_runs,
        skip_latency=0,
        imgsz=args.imgsz,
        out=out,
        workers=workers,
        overwrite=True,
    )


def format_summary(bench: dict, out: Path) -> str:
    metric, bare = bench["metric_step"], bench["session_run"]
    providers = ", ".join(bare["providers_used"])
    verdict = "identical" if metric["identical"] else "DIFFERENT"
    lines = [
        f"model        {bench['model']}  ({bare['images']} images, imgsz {bench['imgsz']}, {providers})",
        f"(a) metric   faster-coco-eval {metric['faster_coco_eval_s']:.3f} s, pycocotools {metric['pycocotools_s']:.3f} s"
        + f" -> {metric['speedup']}x (goal >= {METRIC_SPEEDUP_GOAL:g}x); {metric['detections']} detections,"
        + f" max |stat diff| {metric['max_abs_stat_diff']:.1e} ({verdict})",
        f"(b) session.run alone {bare['images_per_s']:.1f} images/s; evaluator end to end (goal >= {END_TO_END_GOAL}):",
    ]
    for row in bench["end_to_end"]:
        lines.append(
            f"    workers {row['workers']:>2}  {row['eval_images_per_s']:.1f} images/s  "
            f"ratio {row['ratio_to_session_run']}  wait {row['stage_means_ms']['wait']} ms/image  "
            f"(latency on {row['latency_provider']})"
        )
    lines += [f"best workers {bench['best_workers']}", f"bench.json   {out}"]
    return "\n".join(lines)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    out = validate(args)
    bench = run_bench(eval_settings(args, args.workers[0], None), args.workers, out)
    atomic_write_json(out, bench)
    print(format_summary(bench, out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
