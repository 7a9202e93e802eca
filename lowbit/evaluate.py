"""COCO bbox evaluation of a YOLOv10 ONNX model on ONNX Runtime, with inference latency.

The evaluator runs four stages, each timed (the shape of ultralytics' validator):

1. **prepare** (:mod:`lowbit.evaluate_prepare`): check the settings, the annotation file, the images and
   the model; build the ONNX Runtime session (:func:`lowbit.ort_session.build_session`). Every input
   error is raised here, before any output exists.
2. **infer**: the images are read and letterboxed (:mod:`lowbit.preprocess`, the same
   preprocessing as the calibration builder) in ``workers`` prefetch threads while the calling
   thread only feeds ``session.run``; ``warmup_runs`` untimed runs come first. With ``sessions`` > 1 (the
   CPU EP; two by default there) that many sessions of the model take the images side by side, with the same
   detections (:func:`run_loop`).
3. **postprocess**: each output is checked for NaN/Inf (a broken model must never look merely
   inaccurate), decoded (:mod:`lowbit.decode`: raw head, decoded or end-to-end layout; one-to-one
   top-k by default, NMS for one-to-many heads), and its boxes mapped back to original pixels, in
   ``POST_THREADS`` threads of their own, overlapped with inference (records keep the image order).
4. **score**: COCO bbox metrics on the evaluated image ids (:func:`lowbit.coco_eval.evaluate_bbox`,
   faster-coco-eval).

Images are the first ``max_images`` ids of the annotation file in ascending order, after the first ``skip_images``.

Outputs, all in the folder of ``out`` (default ``tmp/yolov10m_onnx_coco/<time>/metrics.json``):

* ``metrics.json`` (built by :mod:`lowbit.evaluate_record`, written last, atomically; a failed run leaves
  none; every record is described in docs/records.md), keys:
    - ``schema_version`` (1), ``kind`` ("metrics", what its readers look for), ``script``
      ("eval_yolov10m_onnx_coco.py", informational), ``status`` ("ok"), ``created_at``
    - ``model``: ``path``, ``sha256``, ``input`` {name, shape, dtype}, ``output`` {name, shape,
      layout, num_classes}, ``qdq`` {qdq_pairs, quant_dtypes, is_fp8, is_qdq}
    - ``dataset``: ``images_dir``, ``ann_file``, ``ann_sha256``, ``num_images_in_set``,
      ``max_images``, ``skip_images``, ``num_images_selected``, ``num_images_evaluated``, ``image_ids`` (evaluated,
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
      the session factory does not report it or only the CPU EP was requested) and ``sessions`` (sessions
      timed side by side)
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
    - ``detections_sha256``: sha256 of the ``detections.json`` written beside it (readers check it)
    - ``warnings``: conditions that make the numbers untrustworthy, e.g. float16 QuantizeLinear
      inputs on an onnxruntime CPU EP that rounds them toward zero (``lowbit.qdq_inspect``)
* ``detections.json``: plain COCO result records [{image_id, category_id, bbox [x,y,w,h], score}].
* ``manifest.json``: run manifest (``kind`` "evaluate", argv, git commit, versions, input sha256, status).
* ``eval.log``: the run's log; ``ort_cache/``: TensorRT engine and timing caches.
"""

from __future__ import annotations

import queue
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lowbit.errors import UserError
from lowbit.evaluate_prepare import (
    DEFAULT_OUTPUT_ROOT,
    DEFAULT_WORKERS,
    MANIFEST_KIND,
    EvalPlan,
    EvalSettings,
    prepare,
    resolve_data_paths,
    validate_settings,
)
from lowbit.evaluate_record import SCRIPT, build_record, latency_provider, settings_dict
from lowbit.logs import get_logger, log_to_file
from lowbit.runs import REPO_ROOT, atomic_write_json, atomic_write_records, manifest_run, new_run_dir, sha256_file

__all__ = [
    "DEFAULT_WORKERS",
    "EvalLoop",
    "EvalResult",
    "EvalSettings",
    "NonFiniteOutputError",
    "check_finite",
    "evaluate",
    "latency_provider",
    "resolve_data_paths",
    "run_loop",
    "validate_settings",
]

POST_WINDOW = 8  # model outputs allowed to wait for postprocessing (each ~5 MB for yolov10m at 640)
# Postprocessing threads. One took 3.2-4.2 ms per image on an H200 host, longer than the CUDA EP's 3 ms
# session.run of the demo detector; two do 1.7x the images of one in isolation (2 cores). In the whole loop
# on the H200 (500 images, 4 prefetch workers, two runs each) two gave 223 and 215 images/s, one 200 and 200.
POST_THREADS = 2
log = get_logger("evaluate")


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
class EvalLoop:
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


def _postprocess_one(plan: EvalPlan, output: np.ndarray, item) -> tuple[list[dict], float]:
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


def _accept(plan: EvalPlan, loop: EvalLoop, item) -> bool:
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


def _infer_one(plan: EvalPlan, loop: EvalLoop, feed: dict) -> np.ndarray:
    """One timed ``session.run``, preceded by the warm-up runs of every session on the first image."""
    from lowbit import decode

    if not loop.evaluated_ids and not loop.latencies_s:
        t0 = time.perf_counter()

        def warm(session) -> None:
            for _ in range(plan.settings.warmup_runs):
                session.run([plan.output_name], feed)

        sessions = [plan.session, *plan.replicas]
        with ThreadPoolExecutor(len(sessions), thread_name_prefix="warmup") as pool:  # side by side, as they run
            list(pool.map(warm, sessions))
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


def _infer_and_postprocess(
    plan: EvalPlan, idle: queue.SimpleQueue, feed: dict, item
) -> tuple[list[dict], float, float]:
    """A replica's task: ``session.run`` on a free session, then the postprocessing; ``(records, post_s, run_s)``."""
    session = idle.get()
    try:
        t0 = time.perf_counter()
        output = session.run([plan.output_name], feed)[0]
        run_s = time.perf_counter() - t0
    finally:
        idle.put(session)
    records, post_s = _postprocess_one(plan, output, item)
    return records, post_s, run_s


def _accepted(plan: EvalPlan, loop: EvalLoop, prepared):
    """The prepared images that are run, in order, each one's wait timed (unreadable ones: :func:`_accept`)."""
    while True:
        t_wait = time.perf_counter()
        item = next(prepared, None)
        if item is None:
            return
        loop.stage_s["wait"].append(time.perf_counter() - t_wait)
        if _accept(plan, loop, item):
            yield item


def run_loop(plan: EvalPlan) -> EvalLoop:
    """The infer stage, with postprocessing overlapped in threads of its own.

    One session: the calling thread feeds ``session.run`` and ``POST_THREADS`` threads postprocess. ``session.run``
    releases the GIL, so decoding in the prefetch threads and postprocessing proceed while the model runs; at most
    ``POST_WINDOW`` outputs wait for postprocessing, which bounds memory if it falls behind.

    ``--sessions`` N > 1 (the CPU EP): after the first image (run alone: the warm-up of every session, the output
    layout), each image is a task of a pool of N threads that runs it on an idle session, then postprocesses it.
    Each session has cores // N intra-op threads. The outputs are those of one session (ONNX Runtime's CPU kernels
    split the work of an operator across threads, not its sums; a test compares the detections), and
    ``latency_ms`` is then the time of one ``session.run`` beside N - 1 others.

    Results are collected in submission order, so the records, latencies and the first error follow the image
    order.
    """
    from lowbit.preprocess import iter_prepared

    s, loop = plan.settings, EvalLoop()
    input_name, _, input_dtype = plan.input_spec
    input_np_dtype = np.float16 if input_dtype == "tensor(float16)" else np.float32
    pending: deque = deque()
    idle: queue.SimpleQueue = queue.SimpleQueue()
    for session in (plan.session, *plan.replicas) if plan.replicas else ():
        idle.put(session)

    def collect() -> None:
        records, post_s, *run_s = pending.popleft().result()  # re-raises a worker's error in this thread
        loop.records.extend(records)
        loop.stage_s["postprocess"].append(post_s)
        loop.latencies_s.extend(run_s)
        loop.stage_s["inference"].extend(run_s)

    threads = len(plan.replicas) + 1 if plan.replicas else POST_THREADS
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="postprocess")
    t_loop = time.perf_counter()
    prepared = iter_prepared(plan.items, s.imgsz, s.workers)
    try:
        for item in _accepted(plan, loop, prepared):
            feed = {input_name: item.chw[None].astype(input_np_dtype, copy=False)}
            if plan.replicas and loop.evaluated_ids:
                pending.append(pool.submit(_infer_and_postprocess, plan, idle, feed, item))
            else:
                output = _infer_one(plan, loop, feed)
                pending.append(pool.submit(_postprocess_one, plan, output, item))
            loop.evaluated_ids.append(int(item.key))
            while len(pending) > POST_WINDOW + len(plan.replicas):
                collect()
        while pending:
            collect()
    finally:
        prepared.close()  # stops the prefetch threads when an error ends the loop early
        pool.shutdown(wait=True, cancel_futures=True)
    loop.loop_s = time.perf_counter() - t_loop - loop.warmup_s  # warm-up is not part of the throughput
    return loop


# ----------------------------------------------------------------------------------------------------------------------
# the run


def _make_output_dir(plan: EvalPlan) -> Path:
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


def _log_start(plan: EvalPlan) -> None:
    info = plan.session_info
    log.info("session on %s (%.2f s)", ", ".join(info["providers_used"]), plan.session_create_s)
    if info.get("cpu_nodes"):
        log.warning("%d nodes run on the CPU EP: %s", len(info["cpu_nodes"]), ", ".join(info["cpu_nodes"][:10]))
    for note in plan.notes + plan.warnings:
        log.warning("%s", note)
    if plan.skipped:
        first = plan.skipped[0]["file"]
        log.warning("skipping %d missing images (--skip-missing), first: %s", len(plan.skipped), first)


def _score_and_write(plan: EvalPlan, loop: EvalLoop, manifest, timing_s: dict, t_start: float) -> EvalResult:
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
    record["detections_sha256"] = sha256_file(detections_path)  # what the per-image intervals may read
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
        log_to_file(out.parent / "eval.log"),
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
