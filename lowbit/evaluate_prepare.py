"""The evaluator's prepare stage: its settings, every check of them, and the plan the later stages run on.

:func:`prepare` checks the settings, the annotation file, the images and the model, then builds the ONNX
Runtime session (:func:`lowbit.ort_session.build_session`); every input error is raised here, before any
output exists, with ``.flag`` naming the flag to fix. :mod:`lowbit.evaluate` runs the other stages.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowbit import model_input
from lowbit.cli import check_imgsz
from lowbit.errors import UserError
from lowbit.runs import REPO_ROOT, check_input_file, new_run_dir, resolve_repo_path
from lowbit.runs import check_output_path as runs_check_output_path

__all__ = [
    "DEFAULT_OUTPUT_ROOT",
    "DEFAULT_WORKERS",
    "MANIFEST_KIND",
    "EvalPlan",
    "EvalSettings",
    "auto_sessions",
    "check_output_path",
    "check_sessions",
    "plan_sessions",
    "prepare",
    "resolve_data_paths",
    "validate_settings",
]

MANIFEST_KIND = "evaluate"  # the run manifest's "kind"; an --out folder holding another kind belongs to another step
DEFAULT_OUTPUT_ROOT = Path("tmp/yolov10m_onnx_coco")


# Prefetch threads: one per core, at most 8. Measured with bench_eval_pipeline.py (500 demo images): on an
# H200 host (16 cores, CUDA EP) 2/4/8 workers gave 1.03/0.98/0.97 of bare session.run's images/s; on
# 2 CPU cores (CPU EP) 2 workers gave 0.98.
DEFAULT_WORKERS = min(8, os.cpu_count() or 1)


def auto_sessions(providers: list[str]) -> int:
    """``--sessions`` when not given: 2 on the CPU EP alone with at least 2 cores, else 1.

    One ``session.run`` of the demo detector on 2 cores: FP32 88.7 ms with 1 intra-op thread, 54.7 ms with 2;
    FP8 K=0 261 ms and 165 ms. Two 1-thread sessions side by side ran FP8 K=0 at 257 ms each, i.e. 1.31x the
    images/s of one 2-thread session; their outputs were bit-identical to the 2-thread session's (FP32, INT8 and
    FP8 models). GPU providers keep one session: the device is the shared resource there.
    """
    return 2 if list(providers) == ["CPUExecutionProvider"] and (os.cpu_count() or 1) >= 2 else 1


@dataclass
class EvalSettings:
    """What to evaluate and how; field names are the CLI's flags (``--onnx-path`` -> ``onnx_path``)."""

    onnx_path: Path  # ONNX model (float or Q/DQ), input [1,3,H,W]
    data_root: Path = Path("datasets/coco2017/source-data")  # holds val2017/ and annotations/
    images_dir: Path | None = None  # None: DATA_ROOT/val2017
    ann_file: Path | None = None  # None: DATA_ROOT/annotations/instances_val2017.json
    max_images: int | None = None  # first N image ids, ascending (after skip_images); None: all
    skip_images: int = 0  # image ids (ascending) left out before max_images counts
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
    # ORT sessions of the model run side by side on the images (CPU EP only), each with cores // sessions intra-op
    # threads; the detections are those of one session (lowbit.evaluate.run_loop). None: auto_sessions(providers).
    sessions: int | None = None
    overwrite: bool = False  # replace an existing metrics.json at out


@dataclass
class EvalPlan:
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
    replicas: list = field(default_factory=list)  # the other sessions of --sessions > 1 (same model and options)
    session_info: dict = field(default_factory=dict)
    session_create_s: float = 0.0
    input_spec: tuple = ()
    output_name: str = ""
    output_shape: list = field(default_factory=list)
    layout: Any = None
    warnings: list[str] = field(default_factory=list)


def validate_settings(s: EvalSettings) -> None:
    """Range checks of the numeric settings; each error names its flag."""
    from lowbit.ort_session import CUDNN_CONV_ALGO_SEARCH

    checks = [
        ("--max-images", s.max_images is None or s.max_images >= 1, f"must be >= 1, got {s.max_images}"),
        ("--skip-images", s.skip_images >= 0, f"must be >= 0, got {s.skip_images}"),
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
    check_sessions(s.sessions, s.providers)
    check_imgsz(s.imgsz)


def check_sessions(sessions: int | None, providers: list[str]) -> None:
    """``--sessions``: None (auto), 1, or more on the CPU EP alone; otherwise one error naming the flag."""
    if sessions is None:
        return
    if sessions < 1:
        raise UserError(f"--sessions must be >= 1, got {sessions}", flag="--sessions")
    if sessions > 1 and list(providers) != ["CPUExecutionProvider"]:
        raise UserError(
            f"--sessions {sessions} applies to the CPU EP alone (--providers CPUExecutionProvider), got "
            f"--providers {' '.join(providers)}",
            flag="--sessions",
        )


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


def _select_images(plan: EvalPlan) -> None:
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


def _load_dataset(s: EvalSettings) -> EvalPlan:
    """Checks that need no session: settings, paths, annotations, the images selected."""
    from lowbit import coco_eval, ort_providers
    from lowbit.onnx_stats import load_model_proto

    validate_settings(s)
    with _about("--providers"):
        ort_providers.check_providers(list(s.providers), s.disable_cpu_fallback, "--providers")
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
    selected = coco_eval.select_image_ids(coco, s.max_images, s.skip_images)
    if not selected:
        raise UserError(
            f"--skip-images: {ann_file} has {len(all_ids)} images; skipping {s.skip_images} leaves none to evaluate",
            flag="--skip-images",
        )
    if not any(coco.imgToAnns.get(i) for i in selected):
        raise UserError(
            f"--max-images: none of the {len(selected)} selected images of {ann_file} has an annotation; "
            "there is no ground truth to score against (raise --max-images)",
            flag="--max-images",
        )
    notes = []
    if s.max_images is not None and s.max_images > len(all_ids) - s.skip_images:
        left = f"the {len(all_ids) - s.skip_images} images after --skip-images {s.skip_images}"
        notes.append(
            f"--max-images {s.max_images} is larger than the set; using all {len(all_ids)} images"
            if not s.skip_images
            else f"--max-images {s.max_images} is larger than {left}; using those {len(selected)}"
        )
    images_flag = "--images-dir" if s.images_dir else "--data-root"
    plan = EvalPlan(
        s, onnx_path, images_dir, ann_file, images_flag, coco, category_ids, len(all_ids), selected, [], [], notes, out
    )
    _select_images(plan)
    return plan


def _open_session(plan: EvalPlan) -> None:
    """Build the session and check the model's input and output against the settings."""
    from lowbit import decode, ort_session

    s = plan.settings
    cache_dir = None
    if ort_session.TRT in s.providers:  # TensorRT engines are cached beside the results
        if plan.out is None:
            plan.out = new_run_dir(REPO_ROOT / DEFAULT_OUTPUT_ROOT) / "metrics.json"
        cache_dir = plan.out.parent / "ort_cache"
    sessions = plan_sessions(s)
    threads = max(1, (os.cpu_count() or 1) // sessions) if sessions > 1 else 0
    t0 = time.perf_counter()
    with _about("--providers"):
        built = [
            ort_session.build_session(
                plan.onnx_path,
                list(s.providers),
                disable_cpu_fallback=s.disable_cpu_fallback,
                cache_dir=cache_dir,
                intra_op_threads=threads,
                flag="--providers",
                cudnn_conv_algo_search=s.cudnn_conv_algo_search,
            )
            for _ in range(sessions)
        ]
    plan.session, plan.session_info = built[0]
    plan.replicas = [session for session, _ in built[1:]]
    plan.session_info["sessions"] = sessions
    plan.session_create_s = time.perf_counter() - t0
    with _about("--onnx-path"):  # a static H/W other than imgsz is an --imgsz error (flag set), the model is fine
        plan.input_spec = model_input.check_image_input(plan.session, s.imgsz, plan.onnx_path)
    outputs = plan.session.get_outputs()
    if len(outputs) > 1:
        plan.warnings.append(f"the model has {len(outputs)} outputs; using the first, {outputs[0].name}")
    plan.output_name = outputs[0].name
    plan.output_shape = list(outputs[0].shape)
    if all(isinstance(d, int) for d in plan.output_shape[1:]):
        plan.layout = decode.detect_layout(plan.output_shape, s.imgsz, len(plan.category_ids))
    if plan.session_info["qdq"]["is_qdq"] and ort_session.CPU in plan.session_info["providers_used"]:
        from lowbit.qdq_fp16 import fp16_quantize_hazard

        hazard = fp16_quantize_hazard(plan.onnx_path)
        if hazard is not None:
            plan.warnings.append(hazard["message"])


def plan_sessions(s: EvalSettings) -> int:
    """How many sessions ``s`` runs: ``sessions``, or :func:`auto_sessions` when None."""
    return auto_sessions(s.providers) if s.sessions is None else int(s.sessions)


def prepare(s: EvalSettings) -> EvalPlan:
    """The prepare stage: every check, then the session. Nothing is written (TensorRT caches aside)."""
    plan = _load_dataset(s)
    _open_session(plan)
    return plan
