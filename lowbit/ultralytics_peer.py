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

from lowbit.errors import UserError

__all__ = [
    "check_data_yaml",
    "offline_environment",
    "parity_record",
    "remap_categories",
    "ultralytics_val",
    "write_val_subset",
]


def offline_environment(settings_dir: Path) -> None:
    """Environment that keeps ultralytics off the network; set it before ultralytics is imported."""
    os.environ["YOLO_OFFLINE"] = "1"  # ultralytics.utils.is_online() -> False: no downloads, sync, update checks
    os.environ["YOLO_AUTOINSTALL"] = "false"  # never pip-install at run time
    os.environ["YOLO_CONFIG_DIR"] = str(settings_dir)  # fresh default settings, none of the user's integrations
    os.environ.setdefault("MPLBACKEND", "Agg")


def check_data_yaml(data: Path, flag: str, generate_hint: str) -> None:
    """Refuse an ultralytics data.yaml that is missing, unreadable, or names a missing or empty train/val split.

    ultralytics resolves the splits relative to the yaml's directory (or its ``path`` key); checking them here
    gives one clear message instead of ultralytics' own.

    Args:
        data: the data.yaml.
        flag: the flag that named it, for the messages and ``UserError.flag``.
        generate_hint: the command that makes the data, quoted in the messages.
    """
    if not data.is_file():
        raise UserError(f"{flag}: {data} does not exist; generate it with {generate_hint}", flag=flag)
    import yaml  # lazy: only the training script reads a data.yaml

    try:
        spec = yaml.safe_load(data.read_text(encoding="utf-8")) or {}
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise UserError(f"{flag}: {data} is not a readable YAML file ({exc})", flag=flag) from exc
    if not isinstance(spec, dict):
        raise UserError(f"{flag}: {data} is not an ultralytics data.yaml (a mapping)", flag=flag)
    base = Path(spec["path"]) if spec.get("path") else data.parent
    for key in ("train", "val"):
        if not spec.get(key):
            raise UserError(f"{flag}: {data} has no '{key}' entry", flag=flag)
        split_dir = base / spec[key]
        if not split_dir.is_dir() or not any(split_dir.iterdir()):
            raise UserError(
                f"{flag}: {key} images {split_dir} are missing or empty; generate them with {generate_hint}", flag=flag
            )


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


def parity_record(
    settings, weights: Path, coco, image_ids: list[int], yolo_images: Path, work_dir: Path, device: str
) -> dict[str, Any]:
    """The evaluator against ultralytics' own validation of the same weights on the same images (parity.json).

    Args:
        settings: the :class:`lowbit.evaluate.EvalSettings` of our run (its ``imgsz`` is ultralytics' too).
        weights: the ultralytics ``.pt`` the evaluated ONNX was exported from.
        coco: the ground truth (:func:`lowbit.coco_eval.load_coco`) that ``image_ids`` are of.
        yolo_images: the same images under an ultralytics ``images/`` folder with ``labels/`` beside it.
        work_dir: ultralytics' run goes to ``work_dir/ultralytics``.
        device: torch device for ultralytics' val.

    Returns:
        ``images``, ``image_ids_first_last``, ``head``, ``letterbox``, then ``map50_95`` and ``map50`` of ``ours``,
        ``ultralytics_detections_same_metric`` (its detections scored by our metric code, which isolates
        pre/post-processing) and ``ultralytics_own_metric``, and their ``diff_ap_points`` (ours minus theirs, x100).
    """
    from lowbit.coco_eval import category_mapping, evaluate_bbox
    from lowbit.evaluate import evaluate  # lazy: the evaluator pulls in onnxruntime

    category_ids, names = category_mapping(coco)
    files = {img["id"]: img["file_name"] for img in coco.dataset["images"]}
    ours = evaluate(settings).record["metrics"]
    data_yaml = write_val_subset(work_dir / "ultralytics", [yolo_images / files[i] for i in image_ids], names)
    own, records = ultralytics_val(
        weights, data_yaml, (work_dir / "ultralytics").absolute(), imgsz=settings.imgsz, one2one=True, device=device
    )
    theirs_coco, _ = evaluate_bbox(coco, remap_categories(records, category_ids), image_ids)
    keys = ("map50_95", "map50")
    return {
        "images": len(image_ids),
        "image_ids_first_last": [image_ids[0], image_ids[-1]],
        "head": "one-to-one (ultralytics nms=False)",
        "letterbox": f"square {settings.imgsz}, batch 1 (ultralytics rect=False)",
        "ours": {k: ours[k] for k in keys},
        "ultralytics_detections_same_metric": {k: theirs_coco[k] for k in keys},
        "ultralytics_own_metric": own,
        "diff_ap_points": {
            "vs_ultralytics_detections": {k: round(100 * (ours[k] - theirs_coco[k]), 3) for k in keys},
            "vs_ultralytics_own_metric": {k: round(100 * (ours[k] - own[k]), 3) for k in keys},
        },
    }
