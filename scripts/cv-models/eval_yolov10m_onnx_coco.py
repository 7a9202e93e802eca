"""COCO 2017 val bbox evaluation of a YOLOv10 ONNX model on ONNX Runtime, with inference latency.

Example (the model card's baseline, step 1):

    python scripts/cv-models/eval_yolov10m_onnx_coco.py \
      --onnx-path models/cv-models/yolov10m/checkpoints/yolov10m.onnx \
      --data-root datasets/coco2017/source-data --max-images 100 \
      --providers TensorrtExecutionProvider CUDAExecutionProvider --disable-cpu-fallback \
      --warmup-runs 10 --skip-latency 10 --imgsz 640 --out tmp/yolov10m_lowbit/RUN/baseline-coco/metrics.json

Pipeline per image: decode (OpenCV) -> letterbox to a square ``--imgsz`` (lowbit.preprocess, the
same preprocessing as the calibration builder) -> ``session.run`` -> decode the output
(lowbit.decode: raw head, decoded or end-to-end layout; one-to-one top-k by default, ``--nms``
for one-to-many heads) -> boxes back to original pixels -> pycocotools bbox metrics on the
evaluated image ids. Images are the first ``--max-images`` ids of the annotation file in ascending
order. Decoding/preprocessing of the next images runs in ``--workers`` threads and postprocessing
of the previous outputs in one more thread, while the main thread only feeds ``session.run``.

Outputs, all next to ``--out``:

* ``metrics.json`` (``--out``; written last, atomically; a failed run leaves none), keys:
    - ``schema_version`` (1), ``script``, ``status`` ("ok"), ``created_at``
    - ``model``: ``path``, ``sha256``, ``input`` {name, shape, dtype}, ``output`` {name, shape,
      layout, num_classes}, ``qdq`` {qdq_pairs, quant_dtypes, is_fp8, is_qdq}
    - ``dataset``: ``images_dir``, ``ann_file``, ``ann_sha256``, ``num_images_in_set``,
      ``max_images``, ``num_images_selected``, ``num_images_evaluated``, ``image_ids`` (evaluated,
      ascending), ``num_images_skipped``, ``images_skipped`` [{id, file, reason}],
      ``num_categories``, ``category_ids``
    - ``postprocess``: ``mode`` ("topk" | "nms" | "end2end"), ``conf``, ``iou`` (NMS only),
      ``max_det``, ``imgsz``
    - ``metrics``: ``map50_95``, ``map50``, ``map75``, ``map_small``, ``map_medium``,
      ``map_large``, ``ar1``, ``ar10``, ``ar100``, ``ar_small``, ``ar_medium``, ``ar_large``
      (pycocotools stats, 0..1; -1 where no ground truth), ``per_class_ap`` {name: AP50-95 or
      null}, ``num_detections``
    - ``latency_ms``: ``session.run`` wall time after ``warmup_runs`` untimed runs, first
      ``skipped`` timed samples dropped: ``n``, ``warmup_runs``, ``skipped``, ``mean``,
      ``median`` (= ``p50``), ``p90``, ``p95``, ``p99``, ``min``, ``max``, ``std``; null values
      when no sample is left
    - ``stages_ms``: per image ``decode``, ``preprocess`` (in prefetch threads), ``inference``,
      ``postprocess`` (in its own thread), ``wait`` (main thread waiting for a prepared image):
      {mean, total_s}
    - ``throughput``: ``images``, ``loop_wall_s``, ``images_per_s`` (end to end, prefetch
      included, COCO scoring excluded), ``workers``
    - ``providers``: ``providers_requested``, ``providers_used``, ``provider_options``,
      ``session_config``, ``graph_optimization_level``, ``disable_cpu_fallback``
    - ``timing_s``: ``session_create``, ``warmup``, ``loop``, ``coco_eval``, ``total``
    - ``args``, ``versions``
    - ``warnings``: conditions that make the numbers untrustworthy, e.g. float16 QuantizeLinear
      inputs on an onnxruntime CPU EP that rounds them toward zero (``lowbit.qdq_inspect``)
* ``detections.json``: COCO result records [{image_id, category_id, bbox [x,y,w,h], score}].
* ``manifest.json``: run manifest (argv, git commit, versions, input sha256, status).
* ``eval.log``: the run's log; ``ort_cache/``: TensorRT engine and timing caches.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from lowbit.logs import get_logger, setup_logging
from lowbit.runs import (
    REPO_ROOT,
    UserError,
    atomic_write_json,
    check_input_file,
    manifest_run,
    new_run_dir,
    package_versions,
    resolve_repo_path,
)
from lowbit.cli import cli_entry

SCRIPT = "eval_yolov10m_onnx_coco.py"
SCHEMA_VERSION = 1
POST_WINDOW = 8  # model outputs allowed to wait for postprocessing (each ~5 MB for yolov10m at 640)
log = get_logger("eval_coco")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="COCO bbox evaluation + latency of a YOLOv10 ONNX model on ONNX Runtime.",
        allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--onnx-path", type=Path, required=True, help="ONNX model (float or Q/DQ), input [1,3,H,W]")
    parser.add_argument(
        "--data-root",
        type=Path,
        default=Path("datasets/coco2017/source-data"),
        help="COCO root holding val2017/ and annotations/instances_val2017.json",
    )
    parser.add_argument("--images-dir", type=Path, default=None, help="image folder; None means DATA_ROOT/val2017")
    parser.add_argument(
        "--ann-file",
        type=Path,
        default=None,
        help="instances json; None means DATA_ROOT/annotations/instances_val2017.json",
    )
    parser.add_argument(
        "--max-images", type=int, default=None, help="evaluate the first N image ids (ascending); None means all"
    )
    parser.add_argument(
        "--providers",
        nargs="+",
        default=["CPUExecutionProvider"],
        help="ONNX Runtime execution providers, highest priority first",
    )
    parser.add_argument(
        "--disable-cpu-fallback",
        action="store_true",
        help="fail if any node would run on the CPU EP (GPU-only runs); do not list CPUExecutionProvider with it",
    )
    parser.add_argument("--warmup-runs", type=int, default=10, help="untimed session.run calls before timing")
    parser.add_argument("--skip-latency", type=int, default=10, help="first timed samples dropped from latency stats")
    parser.add_argument("--imgsz", type=int, default=640, help="square letterbox side, pixels (multiple of 32)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="metrics.json path; None means tmp/yolov10m_onnx_coco/<time>/metrics.json",
    )
    parser.add_argument("--nms", action="store_true", help="class-aware NMS (one-to-many heads) instead of top-k")
    parser.add_argument("--conf", type=float, default=0.001, help="score threshold (strict >), ultralytics val default")
    parser.add_argument("--iou", type=float, default=0.7, help="NMS IoU threshold (only with --nms)")
    parser.add_argument("--max-det", type=int, default=300, help="detections kept per image")
    parser.add_argument(
        "--skip-missing",
        action="store_true",
        help="skip (and record) missing or unreadable images instead of failing",
    )
    parser.add_argument("--workers", type=int, default=4, help="prefetch threads for decode+preprocess (0: inline)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing metrics.json at --out")
    return parser


# ----------------------------------------------------------------------------------------------------------------------
# validation (cheap, before any output is created)


def validate_args(args: argparse.Namespace) -> None:
    if args.max_images is not None and args.max_images < 1:
        raise UserError(f"--max-images must be >= 1, got {args.max_images}")
    if args.warmup_runs < 0:
        raise UserError(f"--warmup-runs must be >= 0, got {args.warmup_runs}")
    if args.skip_latency < 0:
        raise UserError(f"--skip-latency must be >= 0, got {args.skip_latency}")
    if args.imgsz < 32 or args.imgsz % 32:
        raise UserError(f"--imgsz must be a positive multiple of 32 (the P5 stride), got {args.imgsz}")
    if not 0.0 <= args.conf < 1.0:
        raise UserError(f"--conf must be in [0, 1), got {args.conf}")
    if not 0.0 < args.iou <= 1.0:
        raise UserError(f"--iou must be in (0, 1], got {args.iou}")
    if args.max_det < 1:
        raise UserError(f"--max-det must be >= 1, got {args.max_det}")
    if args.workers < 0:
        raise UserError(f"--workers must be >= 0, got {args.workers}")


def resolve_data_paths(args: argparse.Namespace) -> tuple[Path, Path]:
    """``(images_dir, ann_file)`` from --data-root and the overrides; errors name the flag to fix."""
    data_root = resolve_repo_path(args.data_root)
    if (args.images_dir is None or args.ann_file is None) and not data_root.is_dir():
        raise UserError(
            f"--data-root: {data_root} does not exist; place COCO 2017 val there (val2017/ and "
            "annotations/instances_val2017.json, see datasets/README.md) or pass --images-dir and --ann-file"
        )
    images_dir = resolve_repo_path(args.images_dir) if args.images_dir else data_root / "val2017"
    default_ann = data_root / "annotations" / "instances_val2017.json"
    ann_file = resolve_repo_path(args.ann_file) if args.ann_file else default_ann
    images_flag = "--images-dir" if args.images_dir else "--data-root"
    ann_flag = "--ann-file" if args.ann_file else "--data-root"
    if not images_dir.is_dir():
        raise UserError(f"{images_flag}: image folder {images_dir} does not exist")
    check_input_file(ann_file, ann_flag)
    return images_dir, ann_file


def latency_stats(samples_s: list[float], skip: int, warmup_runs: int) -> dict:
    """Latency summary in milliseconds of the samples after the first ``skip``."""
    kept = np.asarray(samples_s[skip:], dtype=np.float64) * 1000.0
    stats: dict = {"n": int(kept.size), "warmup_runs": warmup_runs, "skipped": min(skip, len(samples_s))}
    keys = ("mean", "median", "p50", "p90", "p95", "p99", "min", "max", "std")
    if kept.size == 0:
        return {**stats, **{k: None for k in keys}}
    p50, p90, p95, p99 = np.percentile(kept, [50, 90, 95, 99])
    values = {
        "mean": kept.mean(),
        "median": p50,
        "p50": p50,
        "p90": p90,
        "p95": p95,
        "p99": p99,
        "min": kept.min(),
        "max": kept.max(),
        "std": kept.std(),
    }
    return {**stats, **{k: round(float(v), 4) for k, v in values.items()}}


def _stage(values_s: list[float]) -> dict:
    arr = np.asarray(values_s, dtype=np.float64)
    return {"mean": round(float(arr.mean() * 1000), 4) if arr.size else None, "total_s": round(float(arr.sum()), 4)}


def _check_output_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise UserError(f"--out: {out} already exists; pass --overwrite to replace it")
    manifest = out.parent / "manifest.json"
    if manifest.is_file() and not overwrite:
        try:
            owner = json.loads(manifest.read_text(encoding="utf-8")).get("script")
        except (OSError, json.JSONDecodeError):
            owner = None
        if owner not in (None, SCRIPT):
            raise UserError(
                f"--out: {out.parent} holds the manifest of another script ({owner}); "
                "choose a separate folder or pass --overwrite"
            )


# ----------------------------------------------------------------------------------------------------------------------
# the evaluation


def run_eval(args: argparse.Namespace, argv: list[str] | None) -> tuple[dict, Path]:
    """Validate, evaluate, write the outputs; returns ``(metrics_dict, metrics_path)``."""
    from lowbit import coco_eval, decode, ort_session
    from lowbit.preprocess import iter_prepared, scale_boxes_xyxy_to_original

    validate_args(args)
    ort_session.check_providers(args.providers, args.disable_cpu_fallback, "--providers")
    onnx_path = check_input_file(resolve_repo_path(args.onnx_path), "--onnx-path")
    images_dir, ann_file = resolve_data_paths(args)
    out = None
    if args.out is not None:
        out = args.out if args.out.is_absolute() else Path.cwd() / args.out
        _check_output_dir(out, args.overwrite)

    coco = coco_eval.load_coco(ann_file, "--ann-file" if args.ann_file else "--data-root")
    category_ids, _ = coco_eval.category_mapping(coco)
    all_ids = coco_eval.select_image_ids(coco, None)
    selected = coco_eval.select_image_ids(coco, args.max_images)
    notes = []
    if args.max_images is not None and args.max_images > len(all_ids):
        notes.append(f"--max-images {args.max_images} is larger than the set; using all {len(all_ids)} images")

    items, skipped = [], []
    for image_id in selected:
        path = images_dir / coco.imgs[image_id]["file_name"]
        if path.is_file():
            items.append((image_id, path))
        else:
            skipped.append({"id": image_id, "file": str(path), "reason": "file does not exist"})
    if skipped and not args.skip_missing:
        first = skipped[0]["file"]
        raise UserError(
            f"{len(skipped)} of {len(selected)} images listed in {ann_file} are missing under {images_dir} "
            f"(first: {first}); fix the dataset or pass --skip-missing"
        )
    if not items:
        raise UserError(f"none of the {len(selected)} selected images exists under {images_dir}")

    # Inputs are valid: from here on the run has a folder, a log and a manifest.
    if out is None:
        out = new_run_dir(REPO_ROOT / "tmp" / "yolov10m_onnx_coco") / "metrics.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    detections_path = out.parent / "detections.json"
    if args.overwrite:  # results of an earlier run must not survive a failed rerun
        out.unlink(missing_ok=True)
        detections_path.unlink(missing_ok=True)
    setup_logging(out.parent / "eval.log")
    for note in notes:
        log.warning(note)
    if skipped:
        log.warning("skipping %d missing images (--skip-missing), first: %s", len(skipped), skipped[0]["file"])
    t_start = time.perf_counter()

    with manifest_run(out.parent / "manifest.json", SCRIPT, vars(args), argv) as manifest:
        model_sha = manifest.add_input(onnx_path)
        ann_sha = manifest.add_input(ann_file)

        t0 = time.perf_counter()
        session, session_info = ort_session.build_session(
            onnx_path,
            args.providers,
            disable_cpu_fallback=args.disable_cpu_fallback,
            cache_dir=out.parent / "ort_cache",
            flag="--providers",
        )
        session_create_s = time.perf_counter() - t0
        log.info("session on %s (%.2f s)", ", ".join(session_info["providers_used"]), session_create_s)
        run_warnings: list[str] = []
        if session_info["qdq"]["is_qdq"] and ort_session.CPU in session_info["providers_used"]:
            from lowbit.qdq_inspect import fp16_quantize_hazard

            hazard = fp16_quantize_hazard(onnx_path)
            if hazard is not None:
                log.warning("%s", hazard["message"])
                run_warnings.append(hazard["message"])
        input_name, input_shape, input_dtype = ort_session.check_image_input(session, args.imgsz, onnx_path)
        input_np_dtype = np.float16 if input_dtype == "tensor(float16)" else np.float32
        output_meta = session.get_outputs()
        if len(output_meta) > 1:
            log.warning("the model has %d outputs; using the first, %s", len(output_meta), output_meta[0].name)
        output_name = output_meta[0].name
        static_shape = list(output_meta[0].shape)
        layout = None
        if all(isinstance(d, int) for d in static_shape[1:]):
            layout = decode.detect_layout(static_shape, args.imgsz, len(category_ids))

        records: list[dict] = []
        evaluated_ids: list[int] = []
        latencies: list[float] = []
        stage = {"decode": [], "preprocess": [], "inference": [], "postprocess": [], "wait": []}
        warmup_s = 0.0
        output_shape = static_shape

        def postprocess_one(output: np.ndarray, item) -> tuple[list[dict], float]:
            t_post = time.perf_counter()
            dets = decode.postprocess(
                output, layout, args.imgsz, conf=args.conf, max_det=args.max_det, nms=args.nms, iou=args.iou
            )
            boxes = scale_boxes_xyxy_to_original(dets.boxes, item.info)
            recs = coco_eval.detections_to_records(item.key, boxes, dets.scores, dets.classes, category_ids)
            return recs, time.perf_counter() - t_post

        def collect(future) -> None:
            recs, post_s = future.result()  # re-raises a postprocessing error here, in the main thread
            records.extend(recs)
            stage["postprocess"].append(post_s)

        # Postprocessing runs in one thread of its own so session.run (which releases the GIL) is never
        # held up by it; at most POST_WINDOW outputs wait, which bounds memory if it falls behind.
        post_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="postprocess")
        pending: deque = deque()
        t_loop = time.perf_counter()
        prepared_iter = iter_prepared(items, args.imgsz, args.workers)
        first = True
        try:
            while True:
                t_wait = time.perf_counter()
                item = next(prepared_iter, None)
                if item is None:
                    break
                stage["wait"].append(time.perf_counter() - t_wait)
                if item.error is not None:
                    if not args.skip_missing:
                        raise UserError(f"{item.error}; fix the dataset or pass --skip-missing")
                    log.warning("skipping image %s: %s", item.key, item.error.reason)
                    skipped.append({"id": int(item.key), "file": str(item.path), "reason": item.error.reason})
                    continue
                stage["decode"].append(item.decode_s)
                stage["preprocess"].append(item.preprocess_s)
                feed = {input_name: item.chw[None].astype(input_np_dtype, copy=False)}
                if first:
                    t_w = time.perf_counter()
                    for _ in range(args.warmup_runs):
                        session.run([output_name], feed)
                    warmup_s = time.perf_counter() - t_w
                    t_loop += warmup_s  # warm-up is not part of the end-to-end throughput
                    first = False
                t_inf = time.perf_counter()
                output = session.run([output_name], feed)[0]
                dt = time.perf_counter() - t_inf
                latencies.append(dt)
                stage["inference"].append(dt)

                if layout is None:  # symbolic output shape: decided by the first real output
                    output_shape = list(output.shape)
                    layout = decode.detect_layout(output_shape, args.imgsz, len(category_ids))
                pending.append(post_pool.submit(postprocess_one, output, item))
                evaluated_ids.append(int(item.key))
                while len(pending) > POST_WINDOW:
                    collect(pending.popleft())
            while pending:
                collect(pending.popleft())
        finally:
            post_pool.shutdown(wait=True, cancel_futures=True)
        loop_s = time.perf_counter() - t_loop
        if not evaluated_ids:
            raise UserError(
                f"none of the {len(selected)} selected images could be read (see {out.parent / 'eval.log'})"
            )
        if args.nms and layout.kind == "end2end":
            log.warning("--nms has no effect on an end-to-end output; rows were only filtered by --conf")

        t_eval = time.perf_counter()
        metrics, summary_text = coco_eval.evaluate_bbox(coco, records, evaluated_ids)
        coco_eval_s = time.perf_counter() - t_eval
        log.debug("pycocotools summary:\n%s", summary_text)

        n_images = len(evaluated_ids)
        result = {
            "schema_version": SCHEMA_VERSION,
            "script": SCRIPT,
            "status": "ok",
            "created_at": _dt.datetime.now().isoformat(timespec="seconds"),
            "model": {
                "path": str(onnx_path),
                "sha256": model_sha,
                "input": {"name": input_name, "shape": input_shape, "dtype": input_dtype},
                "output": {
                    "name": output_name,
                    "shape": output_shape,
                    "layout": layout.kind,
                    "num_classes": layout.num_classes,
                },
                "qdq": session_info["qdq"],
            },
            "dataset": {
                "images_dir": str(images_dir),
                "ann_file": str(ann_file),
                "ann_sha256": ann_sha,
                "num_images_in_set": len(all_ids),
                "max_images": args.max_images,
                "num_images_selected": len(selected),
                "num_images_evaluated": n_images,
                "image_ids": sorted(evaluated_ids),
                "num_images_skipped": len(skipped),
                "images_skipped": skipped,
                "num_categories": len(category_ids),
                "category_ids": category_ids,
                "notes": notes,
            },
            "postprocess": {
                "mode": "end2end" if layout.kind == "end2end" else ("nms" if args.nms else "topk"),
                "conf": args.conf,
                "iou": args.iou if args.nms and layout.kind != "end2end" else None,
                "max_det": args.max_det,
                "imgsz": args.imgsz,
            },
            "metrics": metrics,
            "latency_ms": latency_stats(latencies, args.skip_latency, args.warmup_runs),
            "stages_ms": {name: _stage(values) for name, values in stage.items()},
            "throughput": {
                "images": n_images,
                "loop_wall_s": round(loop_s, 4),
                "images_per_s": round(n_images / loop_s, 3) if loop_s > 0 else None,
                "workers": args.workers,
            },
            "providers": {
                **{k: v for k, v in session_info.items() if k != "qdq"},
                "disable_cpu_fallback": args.disable_cpu_fallback,
            },
            "timing_s": {
                "session_create": round(session_create_s, 4),
                "warmup": round(warmup_s, 4),
                "loop": round(loop_s, 4),
                "coco_eval": round(coco_eval_s, 4),
                "total": round(time.perf_counter() - t_start, 4),
            },
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "versions": package_versions(),
            "warnings": run_warnings,
        }
        if result["latency_ms"]["n"] == 0:
            log.warning(
                "no latency sample left: %d timed runs, --skip-latency %d", len(latencies), args.skip_latency
            )
        atomic_write_json(detections_path, records)
        atomic_write_json(out, result)  # last: its presence means the run completed
        manifest.add_output("metrics", out)
        manifest.add_output("detections", detections_path)
        manifest.add_output("log", out.parent / "eval.log")
        manifest.update(map50_95=metrics["map50_95"], map50=metrics["map50"], images=n_images)
    return result, out


def format_summary(result: dict, out: Path) -> str:
    m, lat, thr = result["metrics"], result["latency_ms"], result["throughput"]
    ds, prov = result["dataset"], result["providers"]

    def ms(value):
        return "n/a" if value is None else f"{value:.2f} ms"

    lines = [
        f"model      {result['model']['path']}  ({result['model']['output']['layout']} output, "
        f"{result['postprocess']['mode']})",
        f"providers  {', '.join(prov['providers_used'])}",
        f"images     {ds['num_images_evaluated']} evaluated"
        + (f", {ds['num_images_skipped']} skipped" if ds["num_images_skipped"] else "")
        + f" (first {ds['num_images_selected']} of {ds['num_images_in_set']} ids)",
        f"mAP50-95   {m['map50_95']:.4f}   mAP50 {m['map50']:.4f}   mAP75 {m['map75']:.4f}",
        f"APs/m/l    {m['map_small']:.4f} / {m['map_medium']:.4f} / {m['map_large']:.4f}   "
        f"AR1/10/100 {m['ar1']:.4f} / {m['ar10']:.4f} / {m['ar100']:.4f}",
        f"latency    mean {ms(lat['mean'])}  p50 {ms(lat['p50'])}  p90 {ms(lat['p90'])}  p99 {ms(lat['p99'])}  "
        f"(n={lat['n']}, warmup {lat['warmup_runs']}, skipped {lat['skipped']})",
        f"throughput {thr['images_per_s']} images/s end to end ({thr['workers']} prefetch workers)",
        f"metrics    {out}",
    ]
    return "\n".join(lines)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result, out = run_eval(args, argv)
    print(format_summary(result, out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
