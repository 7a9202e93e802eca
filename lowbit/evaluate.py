"""COCO bbox evaluation of a YOLOv10 ONNX model on ONNX Runtime, with inference latency.

The evaluator runs four stages, each timed (the shape of ultralytics' validator):

1. **prepare**: check the settings, the annotation file, the images and the model; build the
   ONNX Runtime session (:func:`lowbit.ort_session.build_session`). Every input error is raised
   here, before any output exists.
2. **infer**: the images are read and letterboxed (:mod:`lowbit.preprocess`, the same
   preprocessing as the calibration builder) in ``workers`` prefetch threads while the calling
   thread only feeds ``session.run``; ``warmup_runs`` untimed runs come first.
3. **postprocess**: each output is checked for NaN/Inf (a broken model must never look merely
   inaccurate), decoded (:mod:`lowbit.decode`: raw head, decoded or end-to-end layout; one-to-one
   top-k by default, NMS for one-to-many heads), and its boxes mapped back to original pixels, in
   ``POST_THREADS`` threads of their own, overlapped with inference (records keep the image order).
4. **score**: COCO bbox metrics on the evaluated image ids (:func:`lowbit.coco_eval.evaluate_bbox`,
   faster-coco-eval).

Images are the first ``max_images`` ids of the annotation file in ascending order.

Outputs, all in the folder of ``out`` (default ``tmp/yolov10m_onnx_coco/<time>/metrics.json``):

* ``metrics.json`` (written last, atomically; a failed run leaves none; every record is described in
  docs/records.md), keys:
    - ``schema_version`` (1), ``kind`` ("metrics", what its readers look for), ``script``
      ("eval_yolov10m_onnx_coco.py", informational), ``status`` ("ok"), ``created_at``
    - ``model``: ``path``, ``sha256``, ``input`` {name, shape, dtype}, ``output`` {name, shape,
      layout, num_classes}, ``qdq`` {qdq_pairs, quant_dtypes, is_fp8, is_qdq}
    - ``dataset``: ``images_dir``, ``ann_file``, ``ann_sha256``, ``num_images_in_set``,
      ``max_images``, ``num_images_selected``, ``num_images_evaluated``, ``image_ids`` (evaluated,
      ascending), ``num_images_skipped``, ``images_skipped`` [{id, file, reason}],
      ``num_categories``, ``category_ids``, ``notes``
    - ``postprocess``: ``mode`` ("topk" | "nms" | "end2end"), ``conf``, ``iou`` (NMS only),
      ``max_det``, ``imgsz``
    - ``metrics``: ``map50_95``, ``map50``, ``map75``, ``map_small``, ``map_medium``,
      ``map_large``, ``ar1``, ``ar10``, ``ar100``, ``ar_small``, ``ar_medium``, ``ar_large``
      (COCOeval stats, 0..1; -1 where no ground truth), ``per_class_ap`` {name: AP50-95 or
      null}, ``num_detections``
    - ``latency_ms``: ``session.run`` wall time (:func:`lowbit.latency.latency_stats`: ``n``,
      ``warmup_runs``, ``skipped``, ``mean``, ``median`` = ``p50``, ``p90``, ``p95``, ``p99``,
      ``min``, ``max``, ``std``; null when no sample is left), plus ``provider`` (the execution
      provider the latency was measured on: the first one ONNX Runtime placed nodes on) and
      ``cpu_nodes`` (nodes placed on the CPU EP although a GPU provider was requested; null when
      the session factory does not report it or only the CPU EP was requested)
    - ``stages_ms``: per image ``decode``, ``preprocess`` (in prefetch threads), ``inference``,
      ``postprocess`` (in the postprocessing threads), ``wait`` (main thread waiting for a prepared image):
      {mean, total_s}
    - ``throughput``: ``images``, ``loop_wall_s``, ``images_per_s`` (end to end, prefetch
      included, warm-up and COCO scoring excluded), ``workers``
    - ``providers``: every key of the session factory's info (``providers_requested``,
      ``providers_used``, ``provider_options``, ``session_config``, ``graph_optimization_level``,
      ``node_placement``, ``cpu_nodes`` ... where reported) and ``disable_cpu_fallback``
    - ``timing_s``: the stages ``prepare`` (``session_create`` of it), ``warmup``, ``infer``,
      ``postprocess`` (summed; it overlaps ``infer``), ``score``, and ``total``
    - ``args`` (the :class:`EvalSettings`), ``versions``
    - ``warnings``: conditions that make the numbers untrustworthy, e.g. float16 QuantizeLinear
      inputs on an onnxruntime CPU EP that rounds them toward zero (``lowbit.qdq_inspect``)
* ``detections.json``: plain COCO result records [{image_id, category_id, bbox [x,y,w,h], score}].
* ``manifest.json``: run manifest (``kind`` "evaluate", argv, git commit, versions, input sha256, status).
* ``eval.log``: the run's log; ``ort_cache/``: TensorRT engine and timing caches.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lowbit import model_input, records
from lowbit.cli import check_imgsz
from lowbit.errors import UserError
from lowbit.latency import latency_stats
from lowbit.logs import LOGGER_NAME, get_logger
from lowbit.runs import (
    REPO_ROOT,
    atomic_write_json,
    atomic_write_records,
    check_input_file,
    manifest_run,
    new_run_dir,
    package_versions,
    resolve_repo_path,
)
from lowbit.runs import (
    check_output_path as runs_check_output_path,
)

SCRIPT = "eval_yolov10m_onnx_coco.py"  # metrics.json's and the manifest's informational "script"
KIND = "metrics"  # metrics.json's "kind": what its readers look for
SCHEMA_VERSION = records.SCHEMA_VERSIONS[KIND]
MANIFEST_KIND = "evaluate"
POST_WINDOW = 8  # model outputs allowed to wait for postprocessing (each ~5 MB for yolov10m at 640)
# Postprocessing threads. One took 3.2-4.2 ms per image on an H200 host, longer than the CUDA EP's 3 ms
# session.run of the demo detector; two do 1.7x the images of one in isolation (2 cores). In the whole loop
# on the H200 (500 images, 4 prefetch workers, two runs each) two gave 223 and 215 images/s, one 200 and 200.
POST_THREADS = 2
DEFAULT_OUTPUT_ROOT = Path("tmp/yolov10m_onnx_coco")
log = get_logger("evaluate")


# Prefetch threads: one per core, at most 8. Measured with bench_eval_pipeline.py (500 demo images): on an
# H200 host (16 cores, CUDA EP) 2/4/8 workers gave 1.03/0.98/0.97 of bare session.run's images/s; on
# 2 CPU cores (CPU EP) 2 workers gave 0.98.
DEFAULT_WORKERS = min(8, os.cpu_count() or 1)


@dataclass
class EvalSettings:
    """What to evaluate and how; field names are the CLI's flags (``--onnx-path`` -> ``onnx_path``)."""

    onnx_path: Path  # ONNX model (float or Q/DQ), input [1,3,H,W]
    data_root: Path = Path("datasets/coco2017/source-data")  # holds val2017/ and annotations/
    images_dir: Path | None = None  # None: DATA_ROOT/val2017
    ann_file: Path | None = None  # None: DATA_ROOT/annotations/instances_val2017.json
    max_images: int | None = None  # first N image ids, ascending; None: all
    providers: list[str] = field(default_factory=lambda: ["CPUExecutionProvider"])  # ORT EPs, in priority order
    disable_cpu_fallback: bool = False  # fail if any node would run on the CPU EP
    cudnn_conv_algo_search: str = "EXHAUSTIVE"  # CUDA EP: EXHAUSTIVE | HEURISTIC (lowbit.ort_session.provider_options)
    warmup_runs: int = 10  # untimed session.run calls before timing
    skip_latency: int = 10  # first timed samples dropped from the latency statistics
    imgsz: int = 640  # square letterbox side, pixels (multiple of 32)
    out: Path | None = None  # metrics.json path; None: tmp/yolov10m_onnx_coco/<time>/metrics.json
    nms: bool = False  # class-aware NMS (one-to-many heads) instead of the one-to-one top-k
    conf: float = 0.001  # score threshold (strict >), ultralytics' val default
    iou: float = 0.7  # NMS IoU threshold (only with nms)
    max_det: int = 300  # detections kept per image
    skip_missing: bool = False  # skip (and record) missing or unreadable images instead of failing
    workers: int = DEFAULT_WORKERS  # prefetch threads for decode + preprocess (0: inline)
    overwrite: bool = False  # replace an existing metrics.json at out


@dataclass
class EvalResult:
    """A finished evaluation: the metrics.json record and where it and the detections were written."""

    record: dict[str, Any]
    path: Path
    detections_path: Path

    @property
    def map50_95(self) -> float:
        return float(self.record["metrics"]["map50_95"])

    @property
    def map50(self) -> float:
        return float(self.record["metrics"]["map50"])

    @property
    def run_dir(self) -> Path:
        return self.path.parent


class NonFiniteOutputError(UserError):
    """The model produced NaN or Inf: a broken model, reported as an error, never as a low mAP."""


@dataclass
class _Plan:
    """Everything the prepare stage checked: inputs, selected images, the session."""

    settings: EvalSettings
    onnx_path: Path
    images_dir: Path
    ann_file: Path
    images_flag: str
    coco: Any
    category_ids: list[int]
    num_images_in_set: int
    selected: list[int]
    items: list[tuple[int, Path]]
    skipped: list[dict]
    notes: list[str]
    out: Path | None
    session: Any = None
    session_info: dict = field(default_factory=dict)
    session_create_s: float = 0.0
    input_spec: tuple = ()
    output_name: str = ""
    output_shape: list = field(default_factory=list)
    layout: Any = None
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Loop:
    """What the infer + postprocess stages produced."""

    records: list[dict] = field(default_factory=list)
    evaluated_ids: list[int] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)
    stage_s: dict = field(
        default_factory=lambda: {"decode": [], "preprocess": [], "inference": [], "postprocess": [], "wait": []}
    )
    warmup_s: float = 0.0
    loop_s: float = 0.0


# ----------------------------------------------------------------------------------------------------------------------
# prepare


def validate_settings(s: EvalSettings) -> None:
    """Range checks of the numeric settings; each error names its flag."""
    from lowbit.ort_session import CUDNN_CONV_ALGO_SEARCH

    checks = [
        ("--max-images", s.max_images is None or s.max_images >= 1, f"must be >= 1, got {s.max_images}"),
        ("--warmup-runs", s.warmup_runs >= 0, f"must be >= 0, got {s.warmup_runs}"),
        ("--skip-latency", s.skip_latency >= 0, f"must be >= 0, got {s.skip_latency}"),
        ("--conf", 0.0 <= s.conf < 1.0, f"must be in [0, 1), got {s.conf}"),
        ("--iou", 0.0 < s.iou <= 1.0, f"must be in (0, 1], got {s.iou}"),
        ("--max-det", s.max_det >= 1, f"must be >= 1, got {s.max_det}"),
        ("--workers", s.workers >= 0, f"must be >= 0, got {s.workers}"),
        (
            "--cudnn-conv-algo-search",
            s.cudnn_conv_algo_search in CUDNN_CONV_ALGO_SEARCH,
            f"must be one of {', '.join(CUDNN_CONV_ALGO_SEARCH)}, got {s.cudnn_conv_algo_search!r}",
        ),
    ]
    for flag, ok, problem in checks:
        if not ok:
            raise UserError(f"{flag} {problem}", flag=flag)
    check_imgsz(s.imgsz)


@contextlib.contextmanager
def _about(flag: str):
    """Give a UserError raised inside, that does not say which input it is about, ``flag``."""
    try:
        yield
    except UserError as exc:
        if getattr(exc, "flag", None) is None:
            exc.flag = flag
        raise


def resolve_data_paths(s: EvalSettings) -> tuple[Path, Path, str]:
    """``(images_dir, ann_file, ann_flag)`` from ``data_root`` and the overrides; errors name the flag to fix."""
    data_root = resolve_repo_path(s.data_root)
    if (s.images_dir is None or s.ann_file is None) and not data_root.is_dir():
        raise UserError(
            f"--data-root: {data_root} does not exist; place COCO 2017 val there (val2017/ and "
            "annotations/instances_val2017.json, see datasets/README.md) or pass --images-dir and --ann-file",
            flag="--data-root",
        )
    images_dir = resolve_repo_path(s.images_dir) if s.images_dir else data_root / "val2017"
    ann_file = resolve_repo_path(s.ann_file) if s.ann_file else data_root / "annotations" / "instances_val2017.json"
    images_flag = "--images-dir" if s.images_dir else "--data-root"
    ann_flag = "--ann-file" if s.ann_file else "--data-root"
    if not images_dir.is_dir():
        raise UserError(f"{images_flag}: image folder {images_dir} does not exist", flag=images_flag)
    with _about(ann_flag):
        check_input_file(ann_file, ann_flag)
    return images_dir, ann_file, ann_flag


def check_output_path(out: Path, overwrite: bool) -> None:
    """Refuse an ``out`` that :func:`lowbit.runs.check_output_path` refuses, or that sits in another step's run:
    a ``manifest.json`` whose ``kind`` is not ``evaluate`` (none: written before manifests named their kind)."""
    runs_check_output_path(out, "--out", overwrite)
    manifest = out.parent / "manifest.json"
    if manifest.is_file() and not overwrite:
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = None
        if isinstance(data, dict) and data.get("kind") != MANIFEST_KIND:
            owner = f"kind {data['kind']!r}" if "kind" in data else "it names no kind"
            raise UserError(
                f"--out: {out.parent} holds the manifest of another run ({owner}); "
                "choose a separate folder or pass --overwrite",
                flag="--out",
            )


def _select_images(plan: _Plan) -> None:
    """Fill ``plan.items`` with the selected images that exist; missing ones fail or are recorded."""
    s, coco = plan.settings, plan.coco
    for image_id in plan.selected:
        path = plan.images_dir / coco.imgs[image_id]["file_name"]
        if path.is_file():
            plan.items.append((image_id, path))
        else:
            plan.skipped.append({"id": image_id, "file": str(path), "reason": "file does not exist"})
    if plan.skipped and not s.skip_missing:
        raise UserError(
            f"{len(plan.skipped)} of {len(plan.selected)} images listed in {plan.ann_file} are missing under "
            f"{plan.images_dir} (first: {plan.skipped[0]['file']}); fix the dataset or pass --skip-missing",
            flag=plan.images_flag,
        )
    if not plan.items:
        raise UserError(
            f"none of the {len(plan.selected)} selected images exists under {plan.images_dir}", flag=plan.images_flag
        )


def _load_dataset(s: EvalSettings) -> _Plan:
    """Checks that need no session: settings, paths, annotations, the images selected."""
    from lowbit import coco_eval, ort_session
    from lowbit.onnx_stats import load_model_proto

    validate_settings(s)
    with _about("--providers"):
        ort_session.check_providers(list(s.providers), s.disable_cpu_fallback, "--providers")
    with _about("--onnx-path"):
        onnx_path = check_input_file(resolve_repo_path(s.onnx_path), "--onnx-path")
        load_model_proto(onnx_path, "--onnx-path")  # a non-model fails here, before any output exists
    images_dir, ann_file, ann_flag = resolve_data_paths(s)
    out = None
    if s.out is not None:
        out = Path(s.out) if Path(s.out).is_absolute() else Path.cwd() / s.out
        check_output_path(out, s.overwrite)
    coco = coco_eval.load_coco(ann_file, ann_flag)
    category_ids, _ = coco_eval.category_mapping(coco)
    all_ids = coco_eval.select_image_ids(coco, None)
    selected = coco_eval.select_image_ids(coco, s.max_images)
    if not any(coco.imgToAnns.get(i) for i in selected):
        raise UserError(
            f"--max-images: none of the first {len(selected)} images of {ann_file} has an annotation; "
            "there is no ground truth to score against (raise --max-images)",
            flag="--max-images",
        )
    notes = []
    if s.max_images is not None and s.max_images > len(all_ids):
        notes.append(f"--max-images {s.max_images} is larger than the set; using all {len(all_ids)} images")
    images_flag = "--images-dir" if s.images_dir else "--data-root"
    plan = _Plan(
        s, onnx_path, images_dir, ann_file, images_flag, coco, category_ids, len(all_ids), selected, [], [], notes, out
    )
    _select_images(plan)
    return plan


def _check_input_size(session, imgsz: int) -> None:
    """A static input side that differs from ``imgsz`` is an ``--imgsz`` error (the model is fine)."""
    inputs = session.get_inputs()
    shape = list(inputs[0].shape) if len(inputs) == 1 else []
    for dim in shape[2:4] if len(shape) == 4 else []:
        if isinstance(dim, int) and dim != imgsz:
            raise UserError(
                f"--imgsz {imgsz} does not match the model input {inputs[0].name!r} of shape {shape}; "
                f"pass --imgsz {dim}",
                flag="--imgsz",
            )


def _open_session(plan: _Plan) -> None:
    """Build the session and check the model's input and output against the settings."""
    from lowbit import decode, ort_session

    s = plan.settings
    cache_dir = None
    if ort_session.TRT in s.providers:  # TensorRT engines are cached beside the results
        if plan.out is None:
            plan.out = new_run_dir(REPO_ROOT / DEFAULT_OUTPUT_ROOT) / "metrics.json"
        cache_dir = plan.out.parent / "ort_cache"
    t0 = time.perf_counter()
    with _about("--providers"):
        plan.session, plan.session_info = ort_session.build_session(
            plan.onnx_path, list(s.providers), disable_cpu_fallback=s.disable_cpu_fallback, cache_dir=cache_dir,
            flag="--providers", cudnn_conv_algo_search=s.cudnn_conv_algo_search,
        )  # fmt: skip
    plan.session_create_s = time.perf_counter() - t0
    _check_input_size(plan.session, s.imgsz)
    with _about("--onnx-path"):
        plan.input_spec = model_input.check_image_input(plan.session, s.imgsz, plan.onnx_path)
    outputs = plan.session.get_outputs()
    if len(outputs) > 1:
        plan.warnings.append(f"the model has {len(outputs)} outputs; using the first, {outputs[0].name}")
    plan.output_name = outputs[0].name
    plan.output_shape = list(outputs[0].shape)
    if all(isinstance(d, int) for d in plan.output_shape[1:]):
        plan.layout = decode.detect_layout(plan.output_shape, s.imgsz, len(plan.category_ids))
    if plan.session_info["qdq"]["is_qdq"] and ort_session.CPU in plan.session_info["providers_used"]:
        from lowbit.qdq_inspect import fp16_quantize_hazard

        hazard = fp16_quantize_hazard(plan.onnx_path)
        if hazard is not None:
            plan.warnings.append(hazard["message"])


def prepare(s: EvalSettings) -> _Plan:
    """The prepare stage: every check, then the session. Nothing is written (TensorRT caches aside)."""
    plan = _load_dataset(s)
    _open_session(plan)
    return plan


# ----------------------------------------------------------------------------------------------------------------------
# infer + postprocess


def check_finite(output: np.ndarray, model_path: Path, image_id: int, image_path: Path) -> None:
    """Raise :class:`NonFiniteOutputError` naming the model and the image when ``output`` holds NaN/Inf."""
    finite = np.isfinite(output)
    if finite.all():
        return
    nan = int(np.isnan(output).sum())
    raise NonFiniteOutputError(
        f"--onnx-path: {model_path} produced non-finite outputs ({nan} NaN, {int(output.size - finite.sum()) - nan} "
        f"Inf of {output.size} values) on image {image_id} ({image_path}), the first such image; the model is "
        "broken (e.g. a failed quantization), not merely inaccurate, so no metrics are written",
        flag="--onnx-path",
    )


def _postprocess_one(plan: _Plan, output: np.ndarray, item) -> tuple[list[dict], float]:
    """Check, decode and map one output to COCO records; returns ``(records, seconds)``."""
    from lowbit import coco_eval, decode
    from lowbit.preprocess import scale_boxes_xyxy_to_original

    s = plan.settings
    t0 = time.perf_counter()
    check_finite(output, plan.onnx_path, int(item.key), item.path)
    dets = decode.postprocess(output, plan.layout, s.imgsz, conf=s.conf, max_det=s.max_det, nms=s.nms, iou=s.iou)
    boxes = scale_boxes_xyxy_to_original(dets.boxes, item.info)
    records = coco_eval.detections_to_records(item.key, boxes, dets.scores, dets.classes, plan.category_ids)
    return records, time.perf_counter() - t0


def _accept(plan: _Plan, loop: _Loop, item) -> bool:
    """Record a prepared image's stage times; an unreadable one fails the run or is skipped."""
    if item.error is not None:
        if not plan.settings.skip_missing:
            raise UserError(f"{item.error}; fix the dataset or pass --skip-missing", flag=plan.images_flag)
        log.warning("skipping image %s: %s", item.key, item.error.reason)
        plan.skipped.append({"id": int(item.key), "file": str(item.path), "reason": item.error.reason})
        return False
    loop.stage_s["decode"].append(item.decode_s)
    loop.stage_s["preprocess"].append(item.preprocess_s)
    return True


def _infer_one(plan: _Plan, loop: _Loop, feed: dict) -> np.ndarray:
    """One timed ``session.run``, preceded by the warm-up runs on the first image."""
    from lowbit import decode

    if not loop.evaluated_ids and not loop.latencies_s:
        t0 = time.perf_counter()
        for _ in range(plan.settings.warmup_runs):
            plan.session.run([plan.output_name], feed)
        loop.warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    output = plan.session.run([plan.output_name], feed)[0]
    elapsed = time.perf_counter() - t0
    loop.latencies_s.append(elapsed)
    loop.stage_s["inference"].append(elapsed)
    if plan.layout is None:  # symbolic output shape: decided by the first real output
        plan.output_shape = list(output.shape)
        plan.layout = decode.detect_layout(plan.output_shape, plan.settings.imgsz, len(plan.category_ids))
    return output


def run_loop(plan: _Plan) -> _Loop:
    """The infer stage, with postprocessing overlapped in ``POST_THREADS`` threads of its own.

    ``session.run`` releases the GIL, so decoding in the prefetch threads and postprocessing in
    its threads proceed while the model runs; at most ``POST_WINDOW`` outputs wait for
    postprocessing, which bounds memory if it falls behind. Results are collected in submission
    order, so the records (and the first error) follow the image order.
    """
    from lowbit.preprocess import iter_prepared

    s, loop = plan.settings, _Loop()
    input_name, _, input_dtype = plan.input_spec
    input_np_dtype = np.float16 if input_dtype == "tensor(float16)" else np.float32
    pending: deque = deque()

    def collect() -> None:
        records, post_s = pending.popleft().result()  # re-raises a postprocessing error in this thread
        loop.records.extend(records)
        loop.stage_s["postprocess"].append(post_s)

    post_pool = ThreadPoolExecutor(max_workers=POST_THREADS, thread_name_prefix="postprocess")
    t_loop = time.perf_counter()
    prepared = iter_prepared(plan.items, s.imgsz, s.workers)
    try:
        while True:
            t_wait = time.perf_counter()
            item = next(prepared, None)
            if item is None:
                break
            loop.stage_s["wait"].append(time.perf_counter() - t_wait)
            if not _accept(plan, loop, item):
                continue
            output = _infer_one(plan, loop, {input_name: item.chw[None].astype(input_np_dtype, copy=False)})
            pending.append(post_pool.submit(_postprocess_one, plan, output, item))
            loop.evaluated_ids.append(int(item.key))
            while len(pending) > POST_WINDOW:
                collect()
        while pending:
            collect()
    finally:
        prepared.close()  # stops the prefetch threads when an error ends the loop early
        post_pool.shutdown(wait=True, cancel_futures=True)
    loop.loop_s = time.perf_counter() - t_loop - loop.warmup_s  # warm-up is not part of the throughput
    return loop


# ----------------------------------------------------------------------------------------------------------------------
# the metrics.json record


def _stage(values_s: list[float]) -> dict:
    arr = np.asarray(values_s, dtype=np.float64)
    return {"mean": round(float(arr.mean() * 1000), 4) if arr.size else None, "total_s": round(float(arr.sum()), 4)}


def latency_provider(info: dict) -> str:
    """The provider a latency was measured on: the first used provider that holds nodes.

    With ``node_placement`` ({provider: node count}) from the session factory, a provider that was
    created but given no node does not count; without it, the first provider ONNX Runtime kept.
    """
    used = list(info.get("providers_used") or [])
    placement = info.get("node_placement") or {}
    for name in used:
        if placement.get(name):
            return name
    return used[0] if used else "unknown"


def _latency_section(plan: _Plan, loop: _Loop) -> dict:
    s, info = plan.settings, plan.session_info
    cpu_nodes = info.get("cpu_nodes")
    return {
        **latency_stats(loop.latencies_s, s.skip_latency, s.warmup_runs),
        "provider": latency_provider(info),
        "cpu_nodes": len(cpu_nodes) if cpu_nodes is not None else None,
    }


def _model_section(plan: _Plan, model_sha: str) -> dict:
    name, shape, dtype = plan.input_spec
    return {
        "path": str(plan.onnx_path),
        "sha256": model_sha,
        "input": {"name": name, "shape": shape, "dtype": dtype},
        "output": {
            "name": plan.output_name,
            "shape": plan.output_shape,
            "layout": plan.layout.kind,
            "num_classes": plan.layout.num_classes,
        },
        "qdq": plan.session_info["qdq"],
    }


def _dataset_section(plan: _Plan, loop: _Loop, ann_sha: str) -> dict:
    return {
        "images_dir": str(plan.images_dir),
        "ann_file": str(plan.ann_file),
        "ann_sha256": ann_sha,
        "num_images_in_set": plan.num_images_in_set,
        "max_images": plan.settings.max_images,
        "num_images_selected": len(plan.selected),
        "num_images_evaluated": len(loop.evaluated_ids),
        "image_ids": sorted(loop.evaluated_ids),
        "num_images_skipped": len(plan.skipped),
        "images_skipped": plan.skipped,
        "num_categories": len(plan.category_ids),
        "category_ids": plan.category_ids,
        "notes": plan.notes,
    }


def build_record(plan: _Plan, loop: _Loop, metrics: dict, timing_s: dict, shas: tuple[str, str]) -> dict:
    """The metrics.json dict (keys in the module docstring)."""
    s = plan.settings
    end2end = plan.layout.kind == "end2end"
    n_images = len(loop.evaluated_ids)
    return {
        **records.header(KIND),
        "script": SCRIPT,
        "status": "ok",
        "created_at": _dt.datetime.now().isoformat(timespec="seconds"),
        "model": _model_section(plan, shas[0]),
        "dataset": _dataset_section(plan, loop, shas[1]),
        "postprocess": {
            "mode": "end2end" if end2end else ("nms" if s.nms else "topk"),
            "conf": s.conf,
            "iou": s.iou if s.nms and not end2end else None,
            "max_det": s.max_det,
            "imgsz": s.imgsz,
        },
        "metrics": metrics,
        "latency_ms": _latency_section(plan, loop),
        "stages_ms": {name: _stage(values) for name, values in loop.stage_s.items()},
        "throughput": {
            "images": n_images,
            "loop_wall_s": round(loop.loop_s, 4),
            "images_per_s": round(n_images / loop.loop_s, 3) if loop.loop_s > 0 else None,
            "workers": s.workers,
        },
        "providers": {
            **{k: v for k, v in plan.session_info.items() if k != "qdq"},
            "disable_cpu_fallback": s.disable_cpu_fallback,
        },
        "timing_s": {k: round(v, 4) for k, v in timing_s.items()},
        "args": settings_dict(s),
        "versions": package_versions(),
        "warnings": list(plan.warnings),
    }


def settings_dict(s: EvalSettings) -> dict:
    """The settings as JSON values (paths as strings)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(s).items()}


# ----------------------------------------------------------------------------------------------------------------------
# the run


@contextlib.contextmanager
def _log_to(log_file: Path):
    """Also send the package's log records to ``log_file`` while the run lasts (the caller's handlers stay)."""
    logger = logging.getLogger(LOGGER_NAME)
    handler = logging.FileHandler(log_file, encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    level = logger.level
    if level == logging.NOTSET or level > logging.DEBUG:
        logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()
        logger.setLevel(level)


def _make_output_dir(plan: _Plan) -> Path:
    """Create the run folder; an unwritable place is a clear error, not a traceback."""
    out = plan.out or new_run_dir(REPO_ROOT / DEFAULT_OUTPUT_ROOT) / "metrics.json"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if plan.settings.overwrite:  # results of an earlier run must not survive a failed rerun
            out.unlink(missing_ok=True)
            (out.parent / "detections.json").unlink(missing_ok=True)
        (out.parent / "eval.log").touch()
    except OSError as exc:
        raise UserError(f"--out: cannot write into {out.parent} ({exc.strerror or exc})", flag="--out") from exc
    plan.out = out
    return out


def _log_start(plan: _Plan) -> None:
    info = plan.session_info
    log.info("session on %s (%.2f s)", ", ".join(info["providers_used"]), plan.session_create_s)
    if info.get("cpu_nodes"):
        log.warning("%d nodes run on the CPU EP: %s", len(info["cpu_nodes"]), ", ".join(info["cpu_nodes"][:10]))
    for note in plan.notes + plan.warnings:
        log.warning("%s", note)
    if plan.skipped:
        first = plan.skipped[0]["file"]
        log.warning("skipping %d missing images (--skip-missing), first: %s", len(plan.skipped), first)


def _score_and_write(plan: _Plan, loop: _Loop, manifest, timing_s: dict, t_start: float) -> EvalResult:
    """The score stage, then detections.json and (last) metrics.json."""
    from lowbit import coco_eval

    if not loop.evaluated_ids:
        raise UserError(
            f"none of the {len(plan.selected)} selected images could be read (see {plan.out.parent / 'eval.log'})",
            flag=plan.images_flag,
        )
    if plan.settings.nms and plan.layout.kind == "end2end":
        log.warning("--nms has no effect on an end-to-end output; rows were only filtered by --conf")
    t0 = time.perf_counter()
    metrics, summary_text = coco_eval.evaluate_bbox(plan.coco, loop.records, loop.evaluated_ids)
    timing_s["score"] = time.perf_counter() - t0
    log.debug("COCO summary:\n%s", summary_text)
    timing_s["total"] = time.perf_counter() - t_start
    shas = (manifest.data["inputs"][str(plan.onnx_path)], manifest.data["inputs"][str(plan.ann_file)])
    record = build_record(plan, loop, metrics, timing_s, shas)
    if record["latency_ms"]["n"] == 0:
        runs, skip = len(loop.latencies_s), plan.settings.skip_latency
        log.warning("no latency sample left: %d timed runs, --skip-latency %d", runs, skip)
    detections_path = plan.out.parent / "detections.json"
    atomic_write_records(detections_path, loop.records)
    atomic_write_json(plan.out, record)  # last: its presence means the run completed
    manifest.add_output("metrics", plan.out)
    manifest.add_output("detections", detections_path)
    manifest.add_output("log", plan.out.parent / "eval.log")
    manifest.update(map50_95=metrics["map50_95"], map50=metrics["map50"], images=len(loop.evaluated_ids))
    return EvalResult(record, plan.out, detections_path)


def evaluate(settings: EvalSettings, argv: list[str] | None = None) -> EvalResult:
    """Evaluate ``settings.onnx_path`` on COCO and write metrics.json (keys in the module docstring).

    Args:
        settings: what to evaluate; see :class:`EvalSettings`.
        argv: the command line recorded in the manifest (None: ``sys.argv``).

    Returns:
        The :class:`EvalResult` (``.record`` is what metrics.json holds).

    Raises:
        UserError: bad input, with ``.flag`` naming the flag to fix; raised before any output
            exists when a check needs no session. :class:`NonFiniteOutputError` when the model
            outputs NaN/Inf. No metrics.json exists after any error.
    """
    t_start = time.perf_counter()
    plan = prepare(settings)
    timing_s = {"prepare": time.perf_counter() - t_start, "session_create": plan.session_create_s}
    out = _make_output_dir(plan)
    with (
        _log_to(out.parent / "eval.log"),
        manifest_run(
            out.parent / "manifest.json", SCRIPT, settings_dict(settings), argv, kind=MANIFEST_KIND
        ) as manifest,
    ):
        _log_start(plan)
        manifest.add_input(plan.onnx_path)
        manifest.add_input(plan.ann_file)
        loop = run_loop(plan)
        timing_s.update(warmup=loop.warmup_s, infer=loop.loop_s, postprocess=sum(loop.stage_s["postprocess"]))
        return _score_and_write(plan, loop, manifest, timing_s, t_start)
