"""The evaluator's metrics.json record: one dict built from what the stages checked, measured and scored.

Its keys are listed in :mod:`lowbit.evaluate`'s module docstring (and docs/records.md).
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lowbit import records
from lowbit.latency import latency_stats
from lowbit.runs import package_versions

if TYPE_CHECKING:  # annotations only: lowbit.evaluate imports this module
    from lowbit.evaluate import EvalLoop
    from lowbit.evaluate_prepare import EvalPlan, EvalSettings

__all__ = ["KIND", "SCHEMA_VERSION", "SCRIPT", "build_record", "latency_provider", "settings_dict"]

SCRIPT = "eval_yolov10m_onnx_coco.py"  # metrics.json's and the manifest's informational "script"
KIND = "metrics"  # metrics.json's "kind": what its readers look for
SCHEMA_VERSION = records.SCHEMA_VERSIONS[KIND]


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


def _latency_section(plan: EvalPlan, loop: EvalLoop) -> dict:
    s, info = plan.settings, plan.session_info
    cpu_nodes = info.get("cpu_nodes")
    return {
        **latency_stats(loop.latencies_s, s.skip_latency, s.warmup_runs),
        "provider": latency_provider(info),
        "cpu_nodes": len(cpu_nodes) if cpu_nodes is not None else None,
        "sessions": int(info.get("sessions", 1)),  # runs timed side by side (--sessions)
    }


def _model_section(plan: EvalPlan, model_sha: str) -> dict:
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


def _dataset_section(plan: EvalPlan, loop: EvalLoop, ann_sha: str) -> dict:
    return {
        "images_dir": str(plan.images_dir),
        "ann_file": str(plan.ann_file),
        "ann_sha256": ann_sha,
        "num_images_in_set": plan.num_images_in_set,
        "max_images": plan.settings.max_images,
        "skip_images": plan.settings.skip_images,
        "num_images_selected": len(plan.selected),
        "num_images_evaluated": len(loop.evaluated_ids),
        "image_ids": sorted(loop.evaluated_ids),
        "num_images_skipped": len(plan.skipped),
        "images_skipped": plan.skipped,
        "num_categories": len(plan.category_ids),
        "category_ids": plan.category_ids,
        "notes": plan.notes,
    }


def build_record(plan: EvalPlan, loop: EvalLoop, metrics: dict, timing_s: dict, shas: tuple[str, str]) -> dict:
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
