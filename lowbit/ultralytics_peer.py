"""Ultralytics as a peer: run its own validation offline, and score its detections with our COCO code.

Used to verify the evaluator: the same weights, the same images, the same square letterbox
(``rect=False``, batch 1), the same head (``nms=False`` selects YOLOv10's one-to-one head, which is
what the raw-head ONNX export outputs). Ultralytics' own mAP uses its own interpolation and keeps
up to 300 detections per image where COCO's AP uses 100, so besides its own number we also score
its saved detections with pycocotools: that isolates pre/post-processing differences from metric
differences.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def offline_environment(settings_dir: Path) -> None:
    """Environment that keeps ultralytics off the network; set it before ultralytics is imported."""
    os.environ["YOLO_OFFLINE"] = "1"  # ultralytics.utils.is_online() -> False: no downloads, sync, update checks
    os.environ["YOLO_AUTOINSTALL"] = "false"  # never pip-install at run time
    os.environ["YOLO_CONFIG_DIR"] = str(settings_dir)  # fresh default settings, none of the user's integrations
    os.environ.setdefault("MPLBACKEND", "Agg")


def write_val_subset(work_dir: Path, image_paths: list[Path], names: list[str]) -> Path:
    """An ultralytics data.yaml whose val split is exactly ``image_paths`` (labels found beside via /images/->/labels/)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    listing = work_dir / "val_images.txt"
    # absolute but not resolved: ultralytics finds labels from the path as written (.../images/... -> .../labels/...)
    listing.write_text("".join(f"{Path(p).absolute()}\n" for p in image_paths))
    data_yaml = work_dir / "data.yaml"
    lines = [f"path: {work_dir.absolute()}", f"train: {listing.absolute()}", f"val: {listing.absolute()}", "names:"]
    lines += [f"  {i}: {json.dumps(name)}" for i, name in enumerate(names)]
    data_yaml.write_text("\n".join(lines) + "\n")
    return data_yaml


def ultralytics_val(
    weights: Path,
    data_yaml: Path,
    work_dir: Path,
    imgsz: int = 640,
    one2one: bool = True,
    device: str = "cpu",
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Run ``YOLO(weights).val`` with square letterbox and batch 1; return (its metrics, its detections).

    Detections are ultralytics' ``predictions.json`` records: ``image_id`` (int file stem),
    ``category_id`` 1..nc (contiguous index + 1), ``bbox`` xywh in original pixels, ``score``.
    """
    offline_environment(work_dir / "ultralytics-settings")
    from ultralytics import YOLO

    results = YOLO(str(weights)).val(
        data=str(data_yaml),
        imgsz=imgsz,
        batch=1,
        rect=False,
        nms=False if one2one else None,
        conf=0.001,
        iou=0.7,
        max_det=300,
        save_json=True,
        plots=False,
        device=device,
        project=str(work_dir),
        name="val",
        exist_ok=True,
        verbose=False,
        workers=0,
    )
    metrics = {"map50_95": float(results.box.map), "map50": float(results.box.map50)}
    records = json.loads((Path(results.save_dir) / "predictions.json").read_text())
    return metrics, records


def remap_categories(records: list[dict[str, Any]], category_ids: list[int]) -> list[dict[str, Any]]:
    """Ultralytics' custom-dataset category ids are index + 1; map them to the annotation file's ids."""
    return [{**r, "category_id": category_ids[int(r["category_id"]) - 1]} for r in records]
