"""Confidence intervals for COCO mAP50-95 and for a paired ΔAP between two models, by a bootstrap over images.

What the interval means: the evaluated images are treated as a sample from an image distribution;
each replicate redraws ``n`` images with replacement (one multiset, shared by both models in the
paired case) and recomputes COCO's mAP50-95 on it. The percentile interval and the standard error
describe how much the number (or the difference) moves with *which images* were drawn from that
distribution. They say nothing about annotation noise, about the detector's own randomness, or
about other image distributions (a different dataset may shift the difference by more than this).
Paired means the same images for both models in every replicate, so the image-to-image variation
both models share cancels and the interval of the difference is much narrower than two separate
intervals would suggest.

How: faster-coco-eval matches detections to ground truth once per model (``evaluate()``, area
range "all", at most 100 detections per image and category, the 10 IoU thresholds). The matching
is read from ``COCOeval_faster._evalImgs_cpp`` (``separate_eval`` mode; the pickle state of its
``ImageEvaluation`` objects, layout of faster-coco-eval 1.8.0, checked). A replicate is then COCO's
``accumulate`` with integer per-image weights (the replicate's multiplicities), vectorized over
replicates in numpy. With all weights 1 it equals COCOeval's ``stats[0]`` (tests: within 1e-12; on
the demo's four runs within 1.2e-16). With integer weights it equals evaluating the multiset with
the repeated images copied, except where two different detections have exactly the same score
(COCO orders those by image, itself arbitrary): on the demo, 1e-9 AP apart. The point estimates
reported are COCOeval's own numbers.

Cost, from ``scripts/cv-models/bench_ap_bootstrap.py`` on the 500-image demo (~112k detections
per model; 2 CPU cores shared with other work, so six runs spread): one ``evaluate_bbox`` takes
0.93-1.36 s; the paired interval with 1000 replicates 6.2-9.0 s (matching both models 2.7-3.7 s,
replicates 1.7-2.6 s per model), i.e. 5.6-7.8x one evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lowbit.errors import UserError

__all__ = [
    "ApInterval",
    "ImageMatches",
    "PairedDelta",
    "PairedReference",
    "ap_ci",
    "bootstrap_weights",
    "match_images",
    "match_recorded",
    "paired_delta_ci",
    "paired_delta_ci_from_matches",
    "weighted_map",
]

# Replicates accumulated at once: bounds the [replicates, detections] work arrays (float64) to a
# few tens of MB for COCO-sized categories.
MAP_TOLERANCE = 1e-9  # |mAP50-95 from detections.json − metrics.json's|: the two describe one evaluation
REPLICATE_CHUNK = 250


@dataclass(frozen=True)
class CategoryMatches:
    """One category's detections over all images, in COCO's accumulate order.

    Attributes:
        image_index: int64 ``[N]`` position in ``ImageMatches.image_ids`` of each detection.
        true_positive: bool ``[T, N]`` matched to a non-ignored ground truth at IoU threshold t.
        counted: bool ``[T, N]`` not ignored at IoU threshold t (true or false positive).
        num_gt: int64 ``[I]`` non-ignored ground-truth boxes of this category per image.
    """

    image_index: np.ndarray
    true_positive: np.ndarray
    counted: np.ndarray
    num_gt: np.ndarray


@dataclass(frozen=True)
class ImageMatches:
    """A model's per-image matching on a fixed image list (input to :func:`weighted_map`).

    Attributes:
        image_ids: the evaluated image ids, ascending; weights index this order.
        categories: one :class:`CategoryMatches` per category id (ascending), trimmed after the
            last true positive (later detections change no sampled precision).
        recall_thresholds: float64 ``[R]`` COCO's 101 recall points.
        map50_95: COCOeval's mAP50-95 on these images (fraction, as ``stats[0]``).
    """

    image_ids: tuple[int, ...]
    categories: tuple[CategoryMatches, ...]
    recall_thresholds: np.ndarray
    map50_95: float


@dataclass(frozen=True)
class ApInterval:
    """One model's mAP50-95 with a percentile-bootstrap interval; AP values in points (×100)."""

    ap: float
    ci_low: float
    ci_high: float
    std_error: float
    n_images: int
    n_boot: int
    confidence: float
    seed: int


@dataclass(frozen=True)
class PairedDelta:
    """Paired ΔAP = AP(variant) − AP(reference) on the same images, in mAP50-95 points (×100).

    ``delta_ap`` is the difference of the two COCOeval ``stats[0]`` ×100; ``ci_low``/``ci_high`` the
    percentile-bootstrap interval at ``confidence``; ``std_error`` the replicates' standard deviation.
    """

    delta_ap: float
    ci_low: float
    ci_high: float
    std_error: float
    n_images: int
    n_boot: int
    confidence: float
    seed: int


def _evaluated(coco_gt, records: list[dict], image_ids: list[int]):
    """COCOeval_faster after ``evaluate()`` on ``image_ids``, area "all" and 100 detections only."""
    from faster_coco_eval import COCOeval_faster

    from lowbit.coco_eval import results_dataset

    image_set = {int(i) for i in image_ids}
    kept = [r for r in records if int(r["image_id"]) in image_set]
    evaluator = COCOeval_faster(
        coco_gt, results_dataset(coco_gt, kept), iouType="bbox", print_function=lambda *_: None, separate_eval=True
    )
    params = evaluator.params
    params.imgIds = sorted(image_set)
    # Only the "all" area range and the 100-detection cut enter mAP50-95; the other buckets would
    # only cost time. The precision array of this one setting is the same as in the full evaluation.
    params.areaRng, params.areaRngLbl, params.maxDets = [params.areaRng[0]], ["all"], [100]
    evaluator.evaluate()
    return evaluator


def _category_matches(states: list[tuple], num_thresholds: int) -> CategoryMatches:
    """Concatenate one category's per-image ``ImageEvaluation`` states and sort as COCO does.

    A state is ``(dt_matches [T*D], gt_matches, dt_scores [D], gt_ignore [G], dt_ignore [T*D], pairs)``
    with D already sorted by score and cut at 100 (faster-coco-eval's EvaluateImages).
    """
    scores, image_index, matches, ignores = [], [], [], []
    num_gt = np.zeros(len(states), dtype=np.int64)
    for i, state in enumerate(states):
        num_gt[i] = len(state[3]) - sum(state[3])
        if state[2]:
            scores.append(np.asarray(state[2], dtype=np.float64))
            image_index.append(np.full(len(state[2]), i, dtype=np.int64))
            matches.append(np.asarray(state[0], dtype=np.int64).reshape(num_thresholds, -1))
            ignores.append(np.asarray(state[4], dtype=bool).reshape(num_thresholds, -1))
    if not scores:
        empty = np.zeros((num_thresholds, 0), dtype=bool)
        return CategoryMatches(np.zeros(0, dtype=np.int64), empty, empty, num_gt)
    # COCO's accumulate: stable sort by descending score over the image-ordered concatenation.
    order = np.argsort(-np.concatenate(scores), kind="stable")
    matched = np.concatenate(matches, axis=1)[:, order]
    counted = ~np.concatenate(ignores, axis=1)[:, order]
    true_positive = (matched > 0) & counted
    hits = np.flatnonzero(true_positive.any(axis=0))
    keep = hits[-1] + 1 if hits.size else 0
    return CategoryMatches(
        np.concatenate(image_index)[order][:keep], true_positive[:, :keep], counted[:, :keep], num_gt
    )


def match_images(coco_gt, records: list[dict], image_ids: list[int]) -> ImageMatches:
    """Match one model's detections to the ground truth on ``image_ids`` (once; replicates reuse it).

    Args:
        coco_gt: ground truth from ``lowbit.coco_eval.load_coco``.
        records: COCO result records (detections.json); records of other images are ignored.
        image_ids: the evaluated images (as metrics.json ``dataset.image_ids``).

    Returns:
        The matching, with COCOeval's own mAP50-95 on these images.

    Raises:
        UserError: no image ids, or no ground truth in these images (COCO's AP would be -1).
    """
    if len(image_ids) == 0:
        raise UserError("the bootstrap needs at least one image id", flag="image_ids")
    evaluator = _evaluated(coco_gt, records, image_ids)
    params = evaluator.params
    num_images, num_thresholds = len(params.imgIds), len(params.iouThrs)
    states = [e.__getstate__() for e in evaluator._evalImgs_cpp]  # [K * A * I], A = 1 here
    if len(states) != len(params.catIds) * num_images or (states and len(states[0]) != 6):
        raise RuntimeError("faster-coco-eval's per-image evaluation layout changed (written for 1.8.0)")
    categories = tuple(
        _category_matches(states[k * num_images : (k + 1) * num_images], num_thresholds)
        for k in range(len(params.catIds))
    )
    evaluator.accumulate()
    precision = np.asarray(evaluator.eval["precision"])[:, :, :, 0, -1]
    valid = precision[precision > -1]
    if valid.size == 0:
        raise UserError(f"the {num_images} images have no ground-truth box: AP is undefined", flag="image_ids")
    return ImageMatches(
        image_ids=tuple(int(i) for i in params.imgIds),
        categories=categories,
        recall_thresholds=np.asarray(params.recThrs, dtype=np.float64),
        map50_95=float(np.mean(valid)),
    )


def match_recorded(coco_gt, records: list[dict], image_ids: list[int], recorded_map50_95: float, where: str):
    """:func:`match_images`, only when the detections give back the mAP50-95 their metrics record (within
    ``MAP_TOLERANCE``): the detections and the record describe one evaluation of these images.

    Raises:
        UserError: as :func:`match_images`, or another mAP50-95 than ``recorded_map50_95`` (``where`` names the
            metrics file).
    """
    matches = match_images(coco_gt, records, image_ids)
    if abs(matches.map50_95 - float(recorded_map50_95)) > MAP_TOLERANCE:
        raise UserError(
            f"the detections beside {where} give mAP50-95 {matches.map50_95:.6f}, its metrics.json "
            f"{float(recorded_map50_95):.6f}: they are not one evaluation of these images",
            flag=str(where),
        )
    return matches


def _category_ap(category: CategoryMatches, weights: np.ndarray, recall_thresholds: np.ndarray) -> np.ndarray:
    """One category's AP50-95 per replicate (nan where the replicate has none of its ground truth).

    Precision is only sampled at true positives' positions (the first detection reaching a recall
    point is one), and the monotone envelope's maxima lie there, so only those positions are kept;
    the running count of counted detections still runs over every detection before them.

    Args:
        category: the category's matches.
        weights: float64 ``[B, I]`` image multiplicities.
        recall_thresholds: ``[R]``.

    Returns:
        float64 ``[B]``.
    """
    num_gt = weights @ category.num_gt.astype(np.float64)  # [B]
    ap = np.full(weights.shape[0], np.nan)
    has_gt = num_gt > 0
    if not has_gt.any():
        return ap
    ap[has_gt] = 0.0
    if category.image_index.size == 0:
        return ap
    weights, num_gt = weights[has_gt], num_gt[has_gt]
    per_detection = weights[:, category.image_index]  # [B, N]
    # Recall points reached with v true positives, for every v a row can have: COCO's
    # searchsorted(side="left") of the thresholds in recall = v / num_gt (the same float division as
    # faster-coco-eval's C++), tabulated once per category instead of searched per IoU threshold.
    counts = np.arange(int(num_gt.max()) + 1, dtype=np.float64)
    reached_at = np.searchsorted(recall_thresholds, (counts / num_gt[:, None]).ravel(), side="right")
    reached_at = reached_at.reshape(len(num_gt), -1)  # [B, max num_gt + 1]
    same_counted = bool((category.counted == category.counted[0]).all())
    total = np.zeros(weights.shape[0])
    for t in range(category.true_positive.shape[0]):
        if t == 0 or not same_counted:
            counted_cum = np.cumsum(per_detection * category.counted[t], axis=1)
        positions = np.flatnonzero(category.true_positive[t])
        if positions.size == 0:
            continue
        tp_cum = np.cumsum(per_detection[:, positions], axis=1)  # [B, J]
        seen = counted_cum[:, positions]
        precision = np.divide(tp_cum, seen, out=np.zeros_like(tp_cum), where=seen > 0)
        envelope = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
        reached = np.take_along_axis(reached_at, tp_cum.astype(np.intp), axis=1)
        newly = np.diff(reached, axis=1, prepend=0)  # recall points first reached at each true positive
        total += (envelope * newly).sum(axis=1) / recall_thresholds.size
    ap[has_gt] = total / category.true_positive.shape[0]
    return ap


def weighted_map(matches: ImageMatches, weights: np.ndarray) -> np.ndarray:
    """mAP50-95 (fraction) of each weighting of the images: COCO's accumulate with image multiplicities.

    Args:
        matches: from :func:`match_images`.
        weights: ``[B, I]`` or ``[I]`` non-negative integers, columns in ``matches.image_ids`` order
            (all ones: COCOeval's ``stats[0]``).

    Returns:
        float64 ``[B]`` (one float for ``[I]``); nan where a row weights no ground truth at all.
    """
    weights = np.asarray(weights, dtype=np.float64)
    single = weights.ndim == 1
    weights = np.atleast_2d(weights)
    if weights.shape[1] != len(matches.image_ids):
        raise ValueError(f"weights have {weights.shape[1]} columns, expected {len(matches.image_ids)} images")
    result = np.empty(weights.shape[0])
    for start in range(0, weights.shape[0], REPLICATE_CHUNK):
        chunk = weights[start : start + REPLICATE_CHUNK]
        per_category = np.stack(
            [_category_ap(c, chunk, matches.recall_thresholds) for c in matches.categories], axis=1
        )  # [b, K]
        valid = ~np.isnan(per_category)
        count = valid.sum(axis=1)
        summed = np.where(valid, per_category, 0.0).sum(axis=1)
        result[start : start + REPLICATE_CHUNK] = np.divide(
            summed, count, out=np.full(len(chunk), np.nan), where=count > 0
        )
    return result[0] if single else result


def bootstrap_weights(n_images: int, n_boot: int, seed: int) -> np.ndarray:
    """Image multiplicities of ``n_boot`` resamples of ``n_images`` images with replacement.

    Returns:
        int64 ``[n_boot, n_images]``, each row summing to ``n_images``; deterministic in ``seed``.
    """
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_images, size=(n_boot, n_images))
    flat = (draws + np.arange(n_boot)[:, None] * n_images).ravel()
    return np.bincount(flat, minlength=n_boot * n_images).reshape(n_boot, n_images)


def _interval(values: np.ndarray, confidence: float) -> tuple[float, float, float]:
    """(low, high, std) of finite bootstrap values: percentile interval and standard error."""
    finite = values[np.isfinite(values)]
    if finite.size < 2:
        return float("nan"), float("nan"), float("nan")
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(finite, [tail, 100.0 - tail])
    return float(low), float(high), float(np.std(finite, ddof=1))


def _check(n_boot: int, confidence: float) -> None:
    if n_boot < 2:
        raise UserError(f"n_boot must be >= 2, got {n_boot}", flag="n_boot")
    if not 0.0 < confidence < 1.0:
        raise UserError(f"confidence must be in (0, 1), got {confidence}", flag="confidence")


def paired_delta_ci_from_matches(
    reference: ImageMatches, variant: ImageMatches, n_boot: int = 1000, confidence: float = 0.95, seed: int = 0
) -> PairedDelta:
    """Paired ΔAP (variant − reference) with its bootstrap interval, from two matchings of the same images.

    Raises:
        UserError: the two matchings are on different images, or bad ``n_boot``/``confidence``.
    """
    _check(n_boot, confidence)
    return PairedReference(reference, n_boot, seed).delta(variant, confidence)


class PairedReference:
    """A reference model's bootstrap replicates, computed once and paired with any number of variants.

    ``PairedReference(reference, n_boot, seed).delta(variant, confidence)`` equals
    ``paired_delta_ci_from_matches(reference, variant, n_boot, confidence, seed)`` exactly (the same
    weights, the same arithmetic); only the reference's replicates are not recomputed per variant.

    Raises:
        UserError: bad ``n_boot`` (here) or ``confidence`` (in :meth:`delta`), or a variant matched on other images.
    """

    def __init__(self, reference: ImageMatches, n_boot: int = 1000, seed: int = 0):
        _check(n_boot, 0.95)
        self.reference, self.n_boot, self.seed = reference, n_boot, seed
        self.weights = bootstrap_weights(len(reference.image_ids), n_boot, seed)
        self.reference_maps = weighted_map(reference, self.weights)

    def delta(self, variant: ImageMatches, confidence: float = 0.95) -> PairedDelta:
        """Paired ΔAP (variant − reference), AP points, with its ``confidence`` percentile interval."""
        _check(self.n_boot, confidence)
        if self.reference.image_ids != variant.image_ids:
            raise UserError("the two models were matched on different image ids; pass the same list", flag="image_ids")
        deltas = (weighted_map(variant, self.weights) - self.reference_maps) * 100.0
        low, high, std_error = _interval(deltas, confidence)
        return PairedDelta(
            delta_ap=(variant.map50_95 - self.reference.map50_95) * 100.0,
            ci_low=low,
            ci_high=high,
            std_error=std_error,
            n_images=len(self.reference.image_ids),
            n_boot=self.n_boot,
            confidence=confidence,
            seed=self.seed,
        )


def paired_delta_ci(
    gt,
    detections_ref: list[dict],
    detections_var: list[dict],
    image_ids: list[int],
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> PairedDelta:
    """Paired ΔAP = mAP50-95(var) − mAP50-95(ref) on ``image_ids``, ×100, with a bootstrap interval.

    Args:
        gt: ground truth from ``lowbit.coco_eval.load_coco``.
        detections_ref: the reference's records (FP32 detections.json).
        detections_var: the variant's records.
        image_ids: the evaluated images (metrics.json ``dataset.image_ids``).
        n_boot: bootstrap replicates (>= 2).
        confidence: two-sided level of the percentile interval.
        seed: ``numpy.random.default_rng`` seed; equal inputs and seed give equal results.

    Returns:
        :class:`PairedDelta`; ``delta_ap`` equals the difference of the two metrics.json
        ``map50_95`` ×100 for the same images.
    """
    _check(n_boot, confidence)
    reference = match_images(gt, detections_ref, image_ids)
    variant = match_images(gt, detections_var, image_ids)
    return paired_delta_ci_from_matches(reference, variant, n_boot, confidence, seed)


def ap_ci(
    gt, detections: list[dict], image_ids: list[int], n_boot: int = 1000, confidence: float = 0.95, seed: int = 0
) -> ApInterval:
    """One model's mAP50-95 ×100 on ``image_ids`` with a percentile-bootstrap interval (arguments as
    :func:`paired_delta_ci`). Unpaired: use it to read one number, not to compare two models."""
    _check(n_boot, confidence)
    matches = match_images(gt, detections, image_ids)
    values = weighted_map(matches, bootstrap_weights(len(matches.image_ids), n_boot, seed)) * 100.0
    low, high, std_error = _interval(values, confidence)
    return ApInterval(
        ap=matches.map50_95 * 100.0,
        ci_low=low,
        ci_high=high,
        std_error=std_error,
        n_images=len(matches.image_ids),
        n_boot=n_boot,
        confidence=confidence,
        seed=seed,
    )
