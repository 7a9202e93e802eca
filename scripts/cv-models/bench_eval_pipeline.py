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
import json
import os
import time
from pathlib import Path

import numpy as np

from lowbit.cli import add_coco_paths, cli_entry, imgsz, non_negative_int, positive_int
from lowbit.evaluate import DEFAULT_WORKERS, EvalSettings, evaluate, resolve_data_paths
from lowbit.logs import get_logger, setup_logging
from lowbit.runs import (
    REPO_ROOT,
    atomic_write_json,
    check_input_file,
    check_output_path,
    new_run_dir,
    package_versions,
    resolve_repo_path,
)

log = get_logger("bench_eval")
METRIC_SPEEDUP_GOAL = 5.0
END_TO_END_GOAL = 0.9
STAT_TOLERANCE = 1e-4


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Evaluator benchmark: metric step vs pycocotools, end to end vs bare session.run.",
        allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
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


def metric_step(coco, records: list[dict], image_ids: list[int]) -> dict:
    """(a): time faster-coco-eval and pycocotools on the same detections and compare their stats."""
    from lowbit import coco_eval

    t0 = time.perf_counter()
    metrics, _ = coco_eval.evaluate_bbox(coco, records, image_ids)
    faster_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    reference = coco_eval.pycocotools_stats(coco, records, image_ids)
    pycocotools_s = time.perf_counter() - t0
    ours = np.array([metrics[k] for k in coco_eval.STAT_KEYS])
    diff = float(np.abs(ours - reference).max())
    return {
        "images": len(image_ids),
        "detections": len(records),
        "faster_coco_eval_s": round(faster_s, 4),
        "pycocotools_s": round(pycocotools_s, 4),
        "speedup": round(pycocotools_s / faster_s, 2) if faster_s > 0 else None,
        "max_abs_stat_diff": diff,
        "identical": diff <= STAT_TOLERANCE,
        "goal_speedup": METRIC_SPEEDUP_GOAL,
    }


def bare_session_run(args: argparse.Namespace, onnx_path: Path, items: list[tuple[int, Path]], cache: Path) -> dict:
    """images/s of ``session.run`` alone over preprocessed inputs (measured twice, averaged)."""
    from lowbit import model_input, ort_session
    from lowbit.preprocess import prepare_image

    session, info = ort_session.build_session(
        onnx_path, list(args.providers), args.disable_cpu_fallback, cache_dir=cache, flag="--providers"
    )
    input_name, _, input_dtype = model_input.check_image_input(session, args.imgsz, onnx_path)
    dtype = np.float16 if input_dtype == "tensor(float16)" else np.float32
    tensors = [prepare_image(key, path, args.imgsz).chw[None].astype(dtype) for key, path in items]
    output_name = session.get_outputs()[0].name
    for _ in range(args.warmup_runs):
        session.run([output_name], {input_name: tensors[0]})
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        for x in tensors:
            session.run([output_name], {input_name: x})
        times.append(time.perf_counter() - t0)
    seconds = sum(times) / len(times)
    return {
        "images": len(tensors),
        "seconds": round(seconds, 4),
        "runs_s": [round(t, 4) for t in times],
        "images_per_s": round(len(tensors) / seconds, 3),
        "providers_used": info["providers_used"],
    }


def sweep_workers(args: argparse.Namespace, out: Path) -> tuple[list[dict], object]:
    """(b): one evaluator run per worker count; returns the rows (ratios still empty) and the first result."""
    rows, first = [], None
    for workers in args.workers:
        result = evaluate(eval_settings(args, workers, out.parent / f"eval-w{workers}" / "metrics.json"))
        first = first or result
        rate = result.record["throughput"]["images_per_s"]
        rows.append(
            {
                "workers": workers,
                "eval_images_per_s": rate,
                "ratio_to_session_run": None,
                "latency_provider": result.record["latency_ms"]["provider"],
                "stage_means_ms": {k: v["mean"] for k, v in result.record["stages_ms"].items()},
                "metrics_path": str(result.path),
            }
        )
        log.info("workers %d: %.1f images/s end to end", workers, rate or 0.0)
    return rows, first


def run_bench(args: argparse.Namespace, out: Path) -> dict:
    from lowbit import coco_eval

    onnx_path = resolve_repo_path(args.onnx_path)
    _, ann_file, ann_flag = resolve_data_paths(eval_settings(args, args.workers[0], out))
    coco = coco_eval.load_coco(ann_file, ann_flag)
    rows, first = sweep_workers(args, out)
    image_ids = first.record["dataset"]["image_ids"]
    images_dir = Path(first.record["dataset"]["images_dir"])
    items = [(i, images_dir / coco.imgs[i]["file_name"]) for i in image_ids]
    bare = bare_session_run(args, onnx_path, items, out.parent / "ort_cache")
    for row in rows:  # the ratio needs the bare rate, measured after the sweep on a warm page cache
        rate = row["eval_images_per_s"]
        row["ratio_to_session_run"] = round(rate / bare["images_per_s"], 3) if rate else None
    records = json.loads(first.detections_path.read_text())
    best = max(rows, key=lambda r: r["eval_images_per_s"] or 0.0)
    return {
        "model": str(onnx_path),
        "imgsz": args.imgsz,
        "providers_requested": list(args.providers),
        "metric_step": metric_step(coco, records, image_ids),
        "session_run": bare,
        "end_to_end": rows,
        "best_workers": best["workers"],
        "goal_end_to_end_ratio": END_TO_END_GOAL,
        "host_cpus": os.cpu_count(),
        "versions": package_versions(),
    }


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
    bench = run_bench(args, out)
    atomic_write_json(out, bench)
    print(format_summary(bench, out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
