"""COCO-format ground truth, detection records and COCO bbox evaluation (faster-coco-eval).

Class mapping: contiguous class index ``i`` (what the model predicts) is the ``i``-th category of
the annotation file sorted by category id. For COCO 2017 this is the usual 80 -> 91 mapping
(index 0 -> id 1 "person", index 79 -> id 90 "toothbrush"); any other category set works the same.

Evaluation runs faster-coco-eval's ``COCOeval_faster(iouType="bbox")`` (pycocotools' algorithm in
C++; pycocotools itself is kept as the reference in the tests) with ``params.imgIds`` restricted to the evaluated
images, so a 100-image slice is scored against those 100 images' annotations only (images
without annotations still count: their detections are false positives).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from lowbit.errors import UserError

__all__ = [
    "STAT_KEYS",
    "category_mapping",
    "check_instances",
    "detections_to_records",
    "evaluate_bbox",
    "image_slice",
    "load_coco",
    "per_class_ap",
    "pycocotools_stats",
    "results_dataset",
    "round_like_python",
    "select_image_ids",
]

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
    """Load an instances json as a ``faster_coco_eval.COCO`` ground truth, with clear errors.

    The file is checked before it is indexed, so a malformed entry is one message naming the file
    and the entry rather than a ``KeyError`` deep inside the metric: ``images`` (each with an
    ``id`` and a ``file_name``), ``categories`` (each with an ``id``) and at least one annotation
    (each with ``id``, ``image_id``, ``category_id`` and ``bbox`` [x, y, w, h]). A ground truth
    without a single box gives -1 for every metric, which would read as a result; it is refused.
    Annotations without ``area`` get the box area (pycocotools needs it for the size buckets).

    Raises:
        UserError: with ``flag`` set to ``flag``: missing file, invalid json, missing or malformed
            ``images``/``categories``/``annotations``.
    """
    from faster_coco_eval import COCO

    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise UserError(f"{flag}: annotation file {ann_file} does not exist", flag=flag)
    try:
        with open(ann_file, encoding="utf-8") as f:
            dataset = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{flag}: {ann_file} is not a readable json file ({exc})", flag=flag) from exc
    check_instances(dataset, ann_file, flag)
    coco = COCO()
    coco.dataset = dataset
    coco.createIndex()
    return coco


def _entry_error(ann_file: Path, flag: str, what: str, index: int, problem: str) -> UserError:
    return UserError(f"{flag}: {ann_file}: {what}[{index}] {problem}; expected COCO instances json", flag=flag)


def check_instances(dataset: Any, ann_file: Path, flag: str) -> None:
    """Validate the parts of a COCO instances dict that bbox evaluation reads (see :func:`load_coco`)."""
    if not isinstance(dataset, dict) or not dataset.get("images") or not dataset.get("categories"):
        raise UserError(
            f"{flag}: {ann_file} has no 'images' or no 'categories'; expected COCO instances json", flag=flag
        )
    for key in ("images", "categories", "annotations"):
        if not isinstance(dataset.get(key, []), list):
            raise UserError(f"{flag}: {ann_file}: '{key}' is not a list", flag=flag)
    for i, image in enumerate(dataset["images"]):
        if not isinstance(image, dict) or not isinstance(image.get("id"), int):
            raise _entry_error(ann_file, flag, "images", i, "has no integer 'id'")
        if not isinstance(image.get("file_name"), str) or not image["file_name"]:
            raise _entry_error(ann_file, flag, "images", i, f"(id {image['id']}) has no 'file_name'")
    for i, category in enumerate(dataset["categories"]):
        if not isinstance(category, dict) or not isinstance(category.get("id"), int):
            raise _entry_error(ann_file, flag, "categories", i, "has no integer 'id'")
    annotations = dataset.get("annotations") or []
    if not annotations:
        raise UserError(
            f"{flag}: {ann_file} has {len(dataset['images'])} images but no annotations: there is no ground "
            "truth to score against (every metric would be -1)",
            flag=flag,
        )
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict) or any(k not in ann for k in ("id", "image_id", "category_id", "bbox")):
            raise _entry_error(ann_file, flag, "annotations", i, "lacks one of id, image_id, category_id, bbox")
        box = ann["bbox"]
        if not isinstance(box, list) or len(box) != 4 or not all(isinstance(v, (int, float)) for v in box):
            raise _entry_error(ann_file, flag, "annotations", i, f"has bbox {box!r}, not [x, y, w, h]")
        ann.setdefault("area", float(box[2]) * float(box[3]))


def category_mapping(coco) -> tuple[list[int], list[str]]:
    """``(category_ids, names)`` sorted by id: contiguous index i -> ``category_ids[i]``."""
    cats = sorted(coco.dataset["categories"], key=lambda c: c["id"])
    return [int(c["id"]) for c in cats], [str(c.get("name", c["id"])) for c in cats]


def select_image_ids(coco, max_images: int | None, skip: int = 0) -> list[int]:
    """:func:`image_slice` of the ground truth's image ids."""
    return image_slice(coco.getImgIds(), max_images, skip)


def image_slice(image_ids, max_images: int | None, skip: int = 0) -> list[int]:
    """The image ids in ascending order, the first ``skip`` left out, then the first ``max_images`` of the rest
    (all when None or larger than what is left): every evaluated slice (search, confirmation) is chosen this way."""
    ids = sorted(int(i) for i in image_ids)[skip:]
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
    boxes = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    cls = np.asarray(classes).astype(np.int64).reshape(-1)
    outside = (cls < 0) | (cls >= len(category_ids))
    if outside.any():
        raise UserError(
            f"the model predicted class index {int(cls[outside][0])}, but the annotation file has only "
            f"{len(category_ids)} categories",
            flag="--ann-file",
        )
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
    bboxes = round_like_python(xywh, 3).tolist()
    scores_r = round_like_python(np.asarray(scores, dtype=np.float64).reshape(-1), 5).tolist()
    image_id = int(image_id)
    return [
        {"image_id": image_id, "category_id": category_ids[c], "bbox": bbox, "score": score}
        for c, bbox, score in zip(cls.tolist(), bboxes, scores_r)
    ]


def round_like_python(values: np.ndarray, ndigits: int) -> np.ndarray:
    """``round(v, ndigits)`` of every element, vectorized and equal to Python's.

    ``rint(v * 10**n) / 10**n`` picks the same integer as Python's correctly rounded ``round`` except
    where ``v * 10**n`` lies within float error of a half (the product's error is below 1e-10 for
    pixel coordinates); those elements go through ``round`` itself. Postprocessing runs this for every
    detection beside ``session.run``, where a Python loop over the values held the GIL for over a
    millisecond per image.
    """
    values = np.asarray(values, dtype=np.float64)
    scale = 10.0**ndigits
    scaled = values * scale
    out = np.rint(scaled) / scale
    near_half = np.abs(scaled - np.floor(scaled) - 0.5) < 1e-6
    if near_half.any():
        out[near_half] = [round(v, ndigits) for v in values[near_half].tolist()]
    return out


def results_dataset(coco_gt, records: list[dict[str, Any]]):
    """A detections ``COCO`` built from copies of ``records`` (the records themselves stay plain).

    pycocotools' and faster-coco-eval's ``loadRes`` add ``id``, ``area``, ``iscrowd`` and a
    segmentation polygon to the very dicts they are given; the evaluator writes those dicts to
    detections.json, so they are copied here, with what bbox scoring needs (``area`` is the box
    area, as ``loadRes`` computes it).
    """
    from faster_coco_eval import COCO

    annotations = []
    for index, record in enumerate(records, start=1):
        w, h = record["bbox"][2], record["bbox"][3]
        annotations.append({**record, "id": index, "area": w * h, "iscrowd": 0})
    coco_dt = COCO()
    coco_dt.dataset = {
        "images": list(coco_gt.dataset["images"]),
        "categories": list(coco_gt.dataset["categories"]),
        "annotations": annotations,
    }
    coco_dt.createIndex()
    return coco_dt


def per_class_ap(precision: np.ndarray, eval_cat_ids, coco_gt) -> dict[str, float | None]:
    """AP50-95 per category name from COCOeval's ``precision`` [T, R, K, A, M] (area all, maxDets 100).

    None where the class has no ground truth in the evaluated images (COCO's -1 entries).
    Duplicate category names are kept apart as ``name#id``.
    """
    cat_ids, names = category_mapping(coco_gt)
    name_by_id = dict(zip(cat_ids, names))
    per_class: dict[str, float | None] = {}
    for k, cat_id in enumerate(eval_cat_ids):  # sorted category ids, as category_mapping
        name = name_by_id[int(cat_id)]
        if name in per_class:
            name = f"{name}#{int(cat_id)}"
        p = precision[:, :, k, 0, -1]
        valid = p[p > -1]
        per_class[name] = float(valid.mean()) if valid.size else None
    return per_class


def evaluate_bbox(coco_gt, records: list[dict[str, Any]], image_ids: list[int]) -> tuple[dict[str, Any], str]:
    """COCO bbox metrics of ``records`` on ``image_ids`` only, computed by faster-coco-eval.

    ``COCOeval_faster`` is a C++ implementation of pycocotools' ``COCOeval``: same matching,
    same 101-point interpolation, same stats (the tests hold it to pycocotools within 1e-4), at a
    fraction of the time. ``records`` are not modified.

    Args:
        coco_gt: ground truth from :func:`load_coco`.
        records: detection records (:func:`detections_to_records`).
        image_ids: images that were evaluated (detections of other images are ignored).

    Returns:
        ``(metrics, summary_text)``: metrics has STAT_KEYS (floats; -1.0 where COCO has no ground
        truth for that bucket, as pycocotools reports) plus ``per_class_ap`` ``{name: AP50-95 or
        None when the class has no ground truth in these images}`` and ``num_detections``;
        summary_text is the printed COCO table.
    """
    from faster_coco_eval import COCOeval_faster

    image_set = {int(i) for i in image_ids}
    records = [r for r in records if int(r["image_id"]) in image_set]
    lines: list[str] = []
    evaluator = COCOeval_faster(coco_gt, results_dataset(coco_gt, records), iouType="bbox", print_function=lines.append)
    evaluator.params.imgIds = sorted(image_set)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    metrics: dict[str, Any] = dict(zip(STAT_KEYS, (float(s) for s in evaluator.stats)))
    metrics["per_class_ap"] = per_class_ap(np.asarray(evaluator.eval["precision"]), evaluator.params.catIds, coco_gt)
    metrics["num_detections"] = len(records)
    return metrics, "\n".join(str(line) for line in lines)


def pycocotools_stats(coco_gt, records: list[dict[str, Any]], image_ids: list[int]) -> np.ndarray:
    """The 12 COCOeval stats from pycocotools itself: the reference :func:`evaluate_bbox` is held to.

    Used by the tests and the evaluation benchmark only. The records are copied first, since
    pycocotools' ``loadRes`` writes into them.

    Args:
        coco_gt: ground truth from :func:`load_coco` (its dataset dict is re-indexed by pycocotools).
        records: detection records.
        image_ids: images to score.

    Returns:
        float64 ``[12]`` in STAT_KEYS order.
    """
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    image_set = {int(i) for i in image_ids}
    copies = [dict(r, bbox=list(r["bbox"])) for r in records if int(r["image_id"]) in image_set]
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt = COCO()
        gt.dataset = coco_gt.dataset
        gt.createIndex()
        dt = gt.loadRes(copies) if copies else _pycocotools_empty(gt)
        evaluator = COCOeval(gt, dt, iouType="bbox")
        evaluator.params.imgIds = sorted(image_set)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return np.asarray(evaluator.stats, dtype=np.float64)


def _pycocotools_empty(coco_gt):
    from pycocotools.coco import COCO

    empty = COCO()
    empty.dataset = {
        "images": coco_gt.dataset["images"],
        "categories": coco_gt.dataset["categories"],
        "annotations": [],
    }
    empty.createIndex()
    return empty
