"""Benchmark of the COCO evaluator: its metric step against pycocotools, its end-to-end speed against bare
``session.run`` (what ``scripts/cv-models/bench_eval_pipeline.py`` prints and writes to ``bench.json``)."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np

from lowbit.evaluate import EvalResult, EvalSettings, evaluate, resolve_data_paths
from lowbit.logs import get_logger
from lowbit.runs import package_versions, resolve_repo_path

__all__ = [
    "END_TO_END_GOAL",
    "METRIC_SPEEDUP_GOAL",
    "STAT_TOLERANCE",
    "bare_session_run",
    "metric_step",
    "run_bench",
    "sweep_workers",
]

log = get_logger("bench_eval")
METRIC_SPEEDUP_GOAL = 5.0  # faster-coco-eval's speed-up over pycocotools on the same detections
END_TO_END_GOAL = 0.9  # the evaluator's images/s over bare session.run's
STAT_TOLERANCE = 1e-4  # largest difference of the 12 COCO stats that still counts as identical


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


def bare_session_run(settings: EvalSettings, onnx_path: Path, items: list[tuple[int, Path]], cache: Path) -> dict:
    """images/s of ``session.run`` alone over preprocessed inputs (measured twice, averaged), on the providers,
    input size and warm-up count of ``settings``."""
    from lowbit import model_input, ort_session
    from lowbit.preprocess import prepare_image

    session, info = ort_session.build_session(
        onnx_path, list(settings.providers), settings.disable_cpu_fallback, cache_dir=cache, flag="--providers"
    )
    input_name, _, input_dtype = model_input.check_image_input(session, settings.imgsz, onnx_path)
    dtype = np.float16 if input_dtype == "tensor(float16)" else np.float32
    tensors = [prepare_image(key, path, settings.imgsz).chw[None].astype(dtype) for key, path in items]
    output_name = session.get_outputs()[0].name
    for _ in range(settings.warmup_runs):
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


def sweep_workers(settings: EvalSettings, workers: list[int], out: Path) -> tuple[list[dict], EvalResult]:
    """(b): one evaluator run of ``settings`` per worker count, each into ``eval-w<N>/`` beside ``out``; returns
    the rows (ratios still empty) and the first result."""
    rows, first = [], None
    for count in workers:
        run_out = out.parent / f"eval-w{count}" / "metrics.json"
        result = evaluate(dataclasses.replace(settings, workers=count, out=run_out))
        first = first or result
        rate = result.record["throughput"]["images_per_s"]
        rows.append(
            {
                "workers": count,
                "eval_images_per_s": rate,
                "ratio_to_session_run": None,
                "latency_provider": result.record["latency_ms"]["provider"],
                "stage_means_ms": {k: v["mean"] for k, v in result.record["stages_ms"].items()},
                "metrics_path": str(result.path),
            }
        )
        log.info("workers %d: %.1f images/s end to end", count, rate or 0.0)
    return rows, first


def run_bench(settings: EvalSettings, workers: list[int], out: Path) -> dict:
    """Both benchmarks of ``settings`` (its ``workers`` and ``out`` are replaced by each run's); the bench.json dict."""
    from lowbit import coco_eval

    onnx_path = resolve_repo_path(settings.onnx_path)
    _, ann_file, ann_flag = resolve_data_paths(settings)
    coco = coco_eval.load_coco(ann_file, ann_flag)
    rows, first = sweep_workers(settings, workers, out)
    image_ids = first.record["dataset"]["image_ids"]
    images_dir = Path(first.record["dataset"]["images_dir"])
    items = [(i, images_dir / coco.imgs[i]["file_name"]) for i in image_ids]
    bare = bare_session_run(settings, onnx_path, items, out.parent / "ort_cache")
    for row in rows:  # the ratio needs the bare rate, measured after the sweep on a warm page cache
        rate = row["eval_images_per_s"]
        row["ratio_to_session_run"] = round(rate / bare["images_per_s"], 3) if rate else None
    records = json.loads(first.detections_path.read_text())
    best = max(rows, key=lambda r: r["eval_images_per_s"] or 0.0)
    return {
        "model": str(onnx_path),
        "imgsz": settings.imgsz,
        "providers_requested": list(settings.providers),
        "metric_step": metric_step(coco, records, image_ids),
        "session_run": bare,
        "end_to_end": rows,
        "best_workers": best["workers"],
        "goal_end_to_end_ratio": END_TO_END_GOAL,
        "host_cpus": os.cpu_count(),
        "versions": package_versions(),
    }
