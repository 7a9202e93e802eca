"""COCO-format ground truth, detection records and pycocotools bbox evaluation.

Class mapping: contiguous class index ``i`` (what the model predicts) is the ``i``-th category of
the annotation file sorted by category id. For COCO 2017 this is the usual 80 -> 91 mapping
(index 0 -> id 1 "person", index 79 -> id 90 "toothbrush"); any other category set works the same.

Evaluation runs ``COCOeval(iouType="bbox")`` with ``params.imgIds`` restricted to the evaluated
images, so a 100-image slice is scored against those 100 images' annotations only (images
without annotations still count: their detections are false positives).
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from lowbit.runs import UserError

# Keys of the metrics dict, in COCOeval.stats order; stable, documented in metrics.json.
STAT_KEYS = (
    "map50_95",
    "map50",
    "map75",
    "map_small",
    "map_medium",
    "map_large",
    "ar1",
    "ar10",
    "ar100",
    "ar_small",
    "ar_medium",
    "ar_large",
)


def load_coco(ann_file: Path, flag: str = "--ann-file"):
    """Load an instances json as a ``pycocotools.coco.COCO`` (quietly), with clear errors.

    Raises:
        UserError: missing file, invalid json, or no ``images``/``categories``.
    """
    from pycocotools.coco import COCO

    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise UserError(f"{flag}: annotation file {ann_file} does not exist")
    try:
        with open(ann_file, encoding="utf-8") as f:
            dataset = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{flag}: {ann_file} is not a readable json file ({exc})") from exc
    if not isinstance(dataset, dict) or not dataset.get("images") or not dataset.get("categories"):
        raise UserError(f"{flag}: {ann_file} has no 'images' or no 'categories'; expected COCO instances json")
    dataset.setdefault("annotations", [])
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def category_mapping(coco) -> tuple[list[int], list[str]]:
    """``(category_ids, names)`` sorted by id: contiguous index i -> ``category_ids[i]``."""
    cats = sorted(coco.dataset["categories"], key=lambda c: c["id"])
    return [int(c["id"]) for c in cats], [str(c.get("name", c["id"])) for c in cats]


def select_image_ids(coco, max_images: int | None) -> list[int]:
    """The first ``max_images`` image ids in ascending order (all when None or larger than the set)."""
    ids = sorted(int(i) for i in coco.getImgIds())
    return ids if max_images is None else ids[:max_images]


def detections_to_records(
    image_id: int,
    boxes_xyxy: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray,
    category_ids: list[int],
) -> list[dict[str, Any]]:
    """COCO result records for one image.

    Args:
        image_id: COCO image id.
        boxes_xyxy: ``[N, 4]`` (x1, y1, x2, y2) in original-image pixels.
        scores: ``[N]``.
        classes: ``[N]`` contiguous class indices.
        category_ids: from :func:`category_mapping`.

    Returns:
        ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}, ...]``; bbox rounded to
        3 decimals and score to 5, as ultralytics writes predictions.json.

    Raises:
        UserError: a class index outside the category list (model/annotation mismatch).
    """
    records = []
    n_cats = len(category_ids)
    for box, score, cls in zip(np.asarray(boxes_xyxy, dtype=np.float64), np.asarray(scores), np.asarray(classes)):
        cls = int(cls)
        if not 0 <= cls < n_cats:
            raise UserError(
                f"the model predicted class index {cls}, but the annotation file has only {n_cats} categories"
            )
        x1, y1, x2, y2 = (float(v) for v in box)
        records.append(
            {
                "image_id": int(image_id),
                "category_id": category_ids[cls],
                "bbox": [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)],
                "score": round(float(score), 5),
            }
        )
    return records


def _empty_results(coco_gt):
    from pycocotools.coco import COCO

    coco_dt = COCO()
    coco_dt.dataset = {
        "images": list(coco_gt.dataset["images"]),
        "categories": list(coco_gt.dataset["categories"]),
        "annotations": [],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt.createIndex()
    return coco_dt


def evaluate_bbox(coco_gt, records: list[dict[str, Any]], image_ids: list[int]) -> tuple[dict[str, Any], str]:
    """Run pycocotools bbox evaluation on ``image_ids`` only.

    Args:
        coco_gt: ground truth from :func:`load_coco`.
        records: detection records (:func:`detections_to_records`).
        image_ids: images that were evaluated (detections of other images are ignored).

    Returns:
        ``(metrics, summary_text)``: metrics has STAT_KEYS (floats; -1.0 where COCO has no ground
        truth for that bucket, as pycocotools reports) plus ``per_class_ap`` ``{name: AP50-95 or
        None when the class has no ground truth in these images}`` and ``num_detections``;
        summary_text is pycocotools' printed table.
    """
    from pycocotools.cocoeval import COCOeval

    image_set = set(int(i) for i in image_ids)
    records = [r for r in records if int(r["image_id"]) in image_set]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        coco_dt = coco_gt.loadRes(records) if records else _empty_results(coco_gt)
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        evaluator.params.imgIds = sorted(image_set)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = [float(s) for s in evaluator.stats]
    metrics: dict[str, Any] = dict(zip(STAT_KEYS, stats))

    # precision: [T iou thresholds, R recall points, K categories, A area ranges, M maxDets]
    precision = evaluator.eval["precision"]
    cat_ids, names = category_mapping(coco_gt)
    per_class: dict[str, float | None] = {}
    name_by_id = dict(zip(cat_ids, names))
    for k, cat_id in enumerate(evaluator.params.catIds):  # sorted category ids, as category_mapping
        name = name_by_id[cat_id]
        if name in per_class:  # duplicate category names: keep both, told apart by id
            name = f"{name}#{cat_id}"
        p = precision[:, :, k, 0, -1]  # area "all", maxDets 100
        valid = p[p > -1]
        per_class[name] = float(valid.mean()) if valid.size else None
    metrics["per_class_ap"] = per_class
    metrics["num_detections"] = len(records)
    return metrics, buf.getvalue()
