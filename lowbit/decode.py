"""Turn a YOLOv10 ONNX output into detections (numpy only).

Three output layouts are understood, told apart by shape (``A`` = number of anchors for the
input size, ``nc`` = number of classes):

* ``raw``      ``[1, 4*reg_max + nc, A]``: the head before decoding (the card's yolov10m ONNX,
  ``[1, 144, 8400]`` at 640). Channels ``0 .. 4*reg_max-1`` are the DFL logits, side-major
  (left, top, right, bottom; ``reg_max`` bins each); the remaining ``nc`` are class logits.
  Anchors are ordered P3 (stride 8), P4 (16), P5 (32), each row-major over its grid.
* ``decoded``  ``[1, 4 + nc, A]``: boxes as (cx, cy, w, h) in input pixels, then sigmoid class
  scores (ultralytics' one-to-many ONNX export).
* ``end2end``  ``[1, K, 6]``: rows (x1, y1, x2, y2, score, class_index) in input pixels
  (ultralytics' YOLOv10 end-to-end export, K = max_det = 300).

Selection (``raw`` and ``decoded``):

* default, one-to-one head: NMS-free top-k exactly as ultralytics' ``v10Detect.postprocess`` /
  ``Detect.get_topk_index``: keep the ``max_det`` anchors with the highest best-class score,
  then the ``max_det`` best (anchor, class) pairs among them; no IoU suppression. Then, as
  ultralytics' validator does for end-to-end outputs, keep rows with ``score > conf``.
* ``nms=True``, one-to-many head: ultralytics' ``non_max_suppression`` with ``multi_label=True``:
  every (anchor, class) pair with ``score > conf``, at most ``max_nms`` = 30000 by score,
  class-aware NMS at IoU ``iou`` (boxes offset by ``class * 7680``), at most ``max_det`` kept.

Defaults follow ultralytics' ``val``: ``conf=0.001``, ``iou=0.7``, ``max_det=300``.

All boxes returned here are xyxy in model-input (letterboxed) pixels; map them back with
:func:`lowbit.preprocess.scale_boxes_xyxy_to_original`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from lowbit.errors import UserError

__all__ = [
    "CONF_DEFAULT",
    "IOU_DEFAULT",
    "LAYOUTS",
    "MAX_DET_DEFAULT",
    "MAX_NMS",
    "MAX_WH",
    "REG_MAX",
    "STRIDES",
    "Detections",
    "OutputLayout",
    "decode_raw",
    "decode_raw_boxes",
    "detect_layout",
    "dfl_expectation",
    "grid_sizes",
    "make_anchors",
    "nms_class_aware",
    "num_anchors",
    "postprocess",
    "topk_one2one",
    "xywh_to_xyxy",
]

REG_MAX = 16  # DFL bins per box side in YOLOv8/v10 heads
STRIDES = (8, 16, 32)  # P3, P4, P5
CONF_DEFAULT = 0.001  # ultralytics val default
IOU_DEFAULT = 0.7  # ultralytics val default (only used with nms=True)
MAX_DET_DEFAULT = 300
MAX_NMS = 30000  # candidates kept before NMS, as ultralytics
MAX_WH = 7680  # per-class box offset for class-aware NMS, as ultralytics

LAYOUTS = ("raw", "decoded", "end2end")


@dataclass(frozen=True)
class OutputLayout:
    """What a model output is: ``kind`` in LAYOUTS, ``num_classes``, ``num_anchors`` (rows for end2end)."""

    kind: str
    num_classes: int | None
    num_anchors: int


@dataclass
class Detections:
    """Detections of one image.

    Attributes:
        boxes: float32 ``[N, 4]`` (x1, y1, x2, y2), model-input pixels unless stated otherwise.
        scores: float32 ``[N]`` in [0, 1], descending for the top-k path.
        classes: int64 ``[N]`` contiguous class indices ``0 .. nc-1``.
    """

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    @staticmethod
    def empty() -> Detections:
        return Detections(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), np.zeros((0,), np.int64))


def grid_sizes(imgsz: int, strides: tuple[int, ...] = STRIDES) -> list[tuple[int, int]]:
    """Feature-map (h, w) per level for a square input: ``ceil(imgsz / stride)``, as the backbone's stride-2
    convs (kernel 3, pad 1: ``out = ceil(in / 2)``) give; equal to ``imgsz // stride`` at multiples of 32."""
    return [(math.ceil(imgsz / s), math.ceil(imgsz / s)) for s in strides]


def num_anchors(imgsz: int, strides: tuple[int, ...] = STRIDES) -> int:
    """Anchor count ``A`` for a square input (the head output's last dim), e.g. 8400 at 640, 84 at 64, 189 at 90.

    The one count in the package: the exporter checks its graph against it and :func:`detect_layout` reads
    outputs with it.
    """
    return sum(h * w for h, w in grid_sizes(imgsz, strides))


@functools.lru_cache(maxsize=8)
def make_anchors(imgsz: int, strides: tuple[int, ...] = STRIDES) -> tuple[np.ndarray, np.ndarray]:
    """Anchor centres in grid units and their strides, as ultralytics' ``make_anchors(offset=0.5)``.

    Returns:
        ``(points, stride)``: float32 ``[A, 2]`` (x + 0.5, y + 0.5) per cell, row-major per level,
        levels in ``strides`` order; float32 ``[A]`` stride of each anchor. Cached per size:
        treat the arrays as read-only.
    """
    points, stride_list = [], []
    for (h, w), s in zip(grid_sizes(imgsz, strides), strides):
        sy, sx = np.meshgrid(np.arange(h, dtype=np.float32) + 0.5, np.arange(w, dtype=np.float32) + 0.5, indexing="ij")
        points.append(np.stack((sx, sy), -1).reshape(-1, 2))
        stride_list.append(np.full(h * w, s, dtype=np.float32))
    return np.concatenate(points), np.concatenate(stride_list)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """float32 logistic function; large negative logits give 0 (exp overflow to inf is expected)."""
    x = np.asarray(x, dtype=np.float32)
    with np.errstate(over="ignore"):
        return (np.float32(1.0) / (np.float32(1.0) + np.exp(-x))).astype(np.float32, copy=False)


def dfl_expectation(box_logits: np.ndarray, reg_max: int = REG_MAX) -> np.ndarray:
    """Distribution focal loss decode: softmax over ``reg_max`` bins per side, then the expected bin.

    Args:
        box_logits: float ``[4 * reg_max, A]``, side-major (l bins, t bins, r bins, b bins).

    Returns:
        float32 ``[4, A]`` distances (l, t, r, b) in grid units.
    """
    anchors = box_logits.shape[-1]
    x = box_logits.astype(np.float32, copy=False).reshape(4, reg_max, anchors)
    x = x - x.max(axis=1, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(axis=1, keepdims=True)
    bins = np.arange(reg_max, dtype=np.float32)
    return np.einsum("sba,b->sa", x, bins).astype(np.float32, copy=False)


def decode_raw_boxes(
    raw: np.ndarray, imgsz: int, anchor_idx: np.ndarray | None = None, reg_max: int = REG_MAX
) -> np.ndarray:
    """DFL-decode the boxes of a raw head output, for all anchors or a subset.

    Args:
        raw: float ``[1, 4*reg_max + nc, A]`` or ``[4*reg_max + nc, A]``.
        imgsz: square model-input side, pixels (fixes the anchor grid).
        anchor_idx: int ``[K]`` anchors to decode (None: all ``A``).

    Returns:
        float32 ``[K, 4]`` (x1, y1, x2, y2) in input pixels: ``(ax - l, ay - t, ax + r, ay + b) * stride``.
    """
    raw = raw[0] if raw.ndim == 3 else raw
    points, strides = make_anchors(imgsz)
    if raw.shape[1] != points.shape[0]:
        raise ValueError(f"raw output has {raw.shape[1]} anchors; imgsz {imgsz} gives {points.shape[0]}")
    box_logits = raw[: 4 * reg_max]
    if anchor_idx is not None:
        box_logits, points, strides = box_logits[:, anchor_idx], points[anchor_idx], strides[anchor_idx]
    dist = dfl_expectation(box_logits, reg_max)  # [4, K]
    boxes = np.empty((points.shape[0], 4), dtype=np.float32)
    boxes[:, 0] = (points[:, 0] - dist[0]) * strides
    boxes[:, 1] = (points[:, 1] - dist[1]) * strides
    boxes[:, 2] = (points[:, 0] + dist[2]) * strides
    boxes[:, 3] = (points[:, 1] + dist[3]) * strides
    return boxes


def decode_raw(raw: np.ndarray, imgsz: int, reg_max: int = REG_MAX) -> tuple[np.ndarray, np.ndarray]:
    """Decode a raw head output into boxes and class scores for every anchor.

    Args:
        raw: float ``[1, 4*reg_max + nc, A]`` or ``[4*reg_max + nc, A]``.
        imgsz: square model-input side, pixels (fixes the anchor grid).

    Returns:
        ``(boxes, scores)``: float32 ``[A, 4]`` (x1, y1, x2, y2) in input pixels; float32 ``[A, nc]``
        sigmoid scores.
    """
    raw = raw[0] if raw.ndim == 3 else raw
    boxes = decode_raw_boxes(raw, imgsz, None, reg_max)
    return boxes, _sigmoid(np.ascontiguousarray(raw[4 * reg_max :].T))


def _raw_topk(raw: np.ndarray, imgsz: int, max_det: int, reg_max: int = REG_MAX) -> Detections:
    """:func:`topk_one2one` on a raw output without decoding every anchor.

    Ranks exactly as ultralytics does (on sigmoid scores: the best score of an anchor is the sigmoid
    of its best logit), but applies the sigmoid to ``A + k*nc`` values instead of ``A*nc`` and
    DFL-decodes only the ``<= k`` anchors kept.
    """
    raw = raw[0] if raw.ndim == 3 else raw
    logits = raw[4 * reg_max :]  # [nc, A]
    nc, anchors = logits.shape
    k = min(max_det, anchors)
    anchor_idx = _top_indices(_sigmoid(logits.max(axis=0)), k)
    sub = _sigmoid(logits[:, anchor_idx].T)  # [k, nc]
    flat_idx = _top_indices(sub.reshape(-1), k)
    rows = anchor_idx[flat_idx // nc]
    boxes = decode_raw_boxes(raw, imgsz, rows, reg_max)
    return Detections(boxes, sub.reshape(-1)[flat_idx], (flat_idx % nc).astype(np.int64))


def _raw_candidates(raw: np.ndarray, imgsz: int, conf: float, reg_max: int = REG_MAX) -> tuple[np.ndarray, np.ndarray]:
    """Boxes ``[M, 4]`` and sigmoid scores ``[M, nc]`` of the anchors whose best score is ``> conf``."""
    raw = raw[0] if raw.ndim == 3 else raw
    logits = raw[4 * reg_max :]
    keep = np.flatnonzero(_sigmoid(logits.max(axis=0)) > conf)
    return decode_raw_boxes(raw, imgsz, keep, reg_max), _sigmoid(np.ascontiguousarray(logits[:, keep].T))


def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """``[N, 4]`` (cx, cy, w, h) -> ``[N, 4]`` (x1, y1, x2, y2)."""
    out = np.empty_like(boxes, dtype=np.float32)
    half = boxes[:, 2:4] / 2
    out[:, :2] = boxes[:, :2] - half
    out[:, 2:] = boxes[:, :2] + half
    return out


def _top_indices(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries of a 1-D array, largest first."""
    if k >= values.shape[0]:
        return np.argsort(-values, kind="stable")
    part = np.argpartition(-values, k - 1)[:k]
    return part[np.argsort(-values[part], kind="stable")]


def topk_one2one(boxes: np.ndarray, scores: np.ndarray, max_det: int = MAX_DET_DEFAULT) -> Detections:
    """YOLOv10 NMS-free selection (ultralytics ``Detect.get_topk_index``, non-agnostic).

    Args:
        boxes: ``[A, 4]`` xyxy.
        scores: ``[A, nc]`` sigmoid scores.
        max_det: k.

    Returns:
        ``min(max_det, A)`` detections, scores descending (no confidence filter applied).
    """
    anchors, nc = scores.shape
    k = min(max_det, anchors)
    anchor_idx = _top_indices(scores.max(axis=1), k)  # best anchors by their best class
    sub = scores[anchor_idx]  # [k, nc]
    flat_idx = _top_indices(sub.reshape(-1), k)
    cls = flat_idx % nc
    rows = anchor_idx[flat_idx // nc]
    scores_k = sub.reshape(-1)[flat_idx].astype(np.float32)
    return Detections(boxes[rows].astype(np.float32), scores_k, cls.astype(np.int64))


def _greedy_nms(boxes: np.ndarray, scores: np.ndarray, iou: float, max_keep: int) -> np.ndarray:
    """Indices kept by greedy NMS (highest score first, drop IoU > ``iou``), stopping after ``max_keep``.

    Same rule as ``torchvision.ops.nms``; stopping early is exact because later picks cannot
    change earlier ones, and it bounds the cost at ``max_keep`` vectorised passes.
    """
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = (boxes[:, i] for i in range(4))
    areas = (x2 - x1) * (y2 - y1)
    keep: list[int] = []
    remaining = order
    while remaining.size and len(keep) < max_keep:
        i = remaining[0]
        keep.append(int(i))
        others = remaining[1:]
        inter_w = np.clip(np.minimum(x2[i], x2[others]) - np.maximum(x1[i], x1[others]), 0, None)
        inter_h = np.clip(np.minimum(y2[i], y2[others]) - np.maximum(y1[i], y1[others]), 0, None)
        inter = inter_w * inter_h
        union = areas[i] + areas[others] - inter
        overlap = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        remaining = others[overlap <= iou]
    return np.asarray(keep, dtype=np.int64)


def nms_class_aware(
    boxes: np.ndarray,
    scores: np.ndarray,
    conf: float = CONF_DEFAULT,
    iou: float = IOU_DEFAULT,
    max_det: int = MAX_DET_DEFAULT,
    max_nms: int = MAX_NMS,
) -> Detections:
    """Class-aware NMS as ultralytics' ``non_max_suppression(multi_label=True)``.

    Args:
        boxes: ``[A, 4]`` xyxy.
        scores: ``[A, nc]`` scores in [0, 1].
        conf: keep (anchor, class) pairs with ``score > conf``.
        iou: suppress same-class boxes overlapping a kept one with IoU ``> iou``.
        max_det: detections kept after NMS.
        max_nms: candidates kept (by score) before NMS.

    Returns:
        Detections sorted by score, descending.
    """
    cand = scores.max(axis=1) > conf
    boxes, scores = boxes[cand], scores[cand]
    rows, cls = np.nonzero(scores > conf)
    if rows.size == 0:
        return Detections.empty()
    cand_boxes = boxes[rows].astype(np.float32)
    cand_scores = scores[rows, cls].astype(np.float32)
    if cand_scores.shape[0] > max_nms:
        top = _top_indices(cand_scores, max_nms)
        cand_boxes, cand_scores, cls = cand_boxes[top], cand_scores[top], cls[top]
    # offsetting each class by MAX_WH pixels keeps boxes of different classes from ever overlapping
    offset_boxes = cand_boxes + (cls.astype(np.float32) * MAX_WH)[:, None]
    keep = _greedy_nms(offset_boxes, cand_scores, iou, max_det)
    return Detections(cand_boxes[keep], cand_scores[keep], cls[keep].astype(np.int64))


def detect_layout(
    shape: list | tuple,
    imgsz: int,
    num_classes: int | None = None,
    reg_max: int = REG_MAX,
    flag: str = "--onnx-path",
) -> OutputLayout:
    """Identify the layout of a model output from its shape.

    Args:
        shape: output shape (ints; a symbolic batch dimension is accepted).
        imgsz: square input side, fixes the expected anchor count.
        num_classes: classes the output must carry (e.g. from the annotation file); resolves the
            raw/decoded ambiguity. None: any ``C > 4*reg_max`` is taken as raw.
        reg_max: DFL bins per box side.
        flag: the flag that named the model, carried by the error.

    Raises:
        UserError: the shape fits none of the layouts; the message names the shape.
    """
    shape = list(shape)
    expected_anchors = num_anchors(imgsz)
    hint = (
        f"expected raw [1, {4 * reg_max}+nc, {expected_anchors}], decoded [1, 4+nc, {expected_anchors}] "
        f"or end-to-end [1, K, 6] for --imgsz {imgsz}"
    )
    if num_classes is not None:
        hint += f" with nc={num_classes}"
    if len(shape) != 3 or (isinstance(shape[0], int) and shape[0] != 1):
        raise UserError(f"unknown model output layout {shape}: {hint}", flag=flag)
    channels, anchors = shape[1], shape[2]
    if not isinstance(channels, int) or not isinstance(anchors, int):
        raise UserError(f"model output shape {shape} is not static; {hint}", flag=flag)
    if anchors == 6 and channels != expected_anchors:
        return OutputLayout("end2end", None, channels)
    if anchors != expected_anchors:
        raise UserError(f"unknown model output layout {shape}: {hint}", flag=flag)
    if num_classes is not None:
        if channels == 4 * reg_max + num_classes:
            return OutputLayout("raw", num_classes, anchors)
        if channels == 4 + num_classes:
            return OutputLayout("decoded", num_classes, anchors)
        raise UserError(f"unknown model output layout {shape}: {hint}", flag=flag)
    if channels > 4 * reg_max:
        return OutputLayout("raw", channels - 4 * reg_max, anchors)
    if channels > 4:
        return OutputLayout("decoded", channels - 4, anchors)
    raise UserError(f"unknown model output layout {shape}: {hint}", flag=flag)


def postprocess(
    output: np.ndarray,
    layout: OutputLayout,
    imgsz: int,
    conf: float = CONF_DEFAULT,
    max_det: int = MAX_DET_DEFAULT,
    nms: bool = False,
    iou: float = IOU_DEFAULT,
) -> Detections:
    """Select the detections of one image from one model output.

    Args:
        output: the output tensor, shaped as ``layout`` says (batch 1).
        layout: from :func:`detect_layout`.
        imgsz: square input side.
        conf: score threshold (strict ``>``).
        max_det: detections kept.
        nms: class-aware NMS instead of the one-to-one top-k (raw/decoded only).
        iou: NMS IoU threshold.

    Returns:
        Detections in model-input pixels, xyxy.
    """
    if layout.kind == "end2end":
        rows = output.reshape(-1, 6)
        rows = rows[rows[:, 4] > conf][:max_det]
        return Detections(rows[:, :4].astype(np.float32), rows[:, 4].astype(np.float32), rows[:, 5].astype(np.int64))
    if layout.kind == "raw":
        if nms:
            boxes, scores = _raw_candidates(output, imgsz, conf)
            return nms_class_aware(boxes, scores, conf=conf, iou=iou, max_det=max_det)
        dets = _raw_topk(output, imgsz, max_det)
        keep = dets.scores > conf
        return Detections(dets.boxes[keep], dets.scores[keep], dets.classes[keep])
    if layout.kind == "decoded":
        out = output.reshape(output.shape[-2], output.shape[-1])
        boxes = xywh_to_xyxy(np.ascontiguousarray(out[:4].T, dtype=np.float32))
        scores = np.ascontiguousarray(out[4:].T, dtype=np.float32)
    else:
        raise ValueError(f"unknown layout {layout.kind!r}")
    if nms:
        return nms_class_aware(boxes, scores, conf=conf, iou=iou, max_det=max_det)
    dets = topk_one2one(boxes, scores, max_det)
    keep = dets.scores > conf
    return Detections(dets.boxes[keep], dets.scores[keep], dets.classes[keep])
