"""Computes the paired bootstrap interval of every ΔAP the report shows (:func:`compute_intervals`), from the
``detections.json`` beside each ``metrics.json``, with :mod:`lowbit.ap_bootstrap`.

The FP32 baseline is matched to the ground truth once and its replicates are reused for every variant
(:class:`lowbit.ap_bootstrap.PairedReference`); the same for the FP32 evaluation of each confirmation slice
(:mod:`lowbit.report_confirm`). An interval is ΔAP = AP(variant) − AP(FP32), AP points, negative = loss: a
two-sided percentile interval over replicates that redraw the evaluated images with replacement, the same draw
for both models. What it does and does not cover: docs/uncertainty.md.

Nothing is read blindly. A ``detections.json`` is used only when its sha256 equals the ``detections_sha256`` its
``metrics.json`` records; an older evaluation that records none is used when its detections are all of the
evaluated images, are as many as ``metrics.num_detections`` says, and (for every file) the mAP50-95 they give is
the one ``metrics.json`` records (within 1e-9). Otherwise that row gets no interval and a reason.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowbit.ap_bootstrap import ImageMatches, PairedDelta, PairedReference, match_recorded
from lowbit.errors import UserError
from lowbit.interval_cache import IntervalCache, interval_key
from lowbit.logs import get_logger
from lowbit.report_inputs import Hasher, rel_path
from lowbit.report_variant import Variant

__all__ = [
    "CONFIDENCE",
    "DEFAULT_N_BOOT",
    "METHOD",
    "SEED",
    "IntervalResult",
    "ci_dict",
    "compute_intervals",
]

DEFAULT_N_BOOT = 1000  # replicates per interval; 0 = no intervals
CONFIDENCE = 0.95  # two-sided level of the percentile interval
SEED = 0  # numpy default_rng seed of the image draws (the same draws for every variant)
METHOD = (
    "paired percentile bootstrap over the evaluated images (lowbit.ap_bootstrap): each replicate redraws the "
    "images with replacement, the same draw for the variant and FP32, and recomputes COCO mAP50-95"
)
log = get_logger("make_report")


class _NoInterval(Exception):
    """Why one evaluation gets no interval."""


@dataclass
class IntervalResult:
    """The intervals of one report: per evaluation (by ``metrics_path``) a :class:`PairedDelta` or the reason none."""

    paired: dict[str, PairedDelta] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    block: dict[str, Any] = field(default_factory=dict)  # report.json's "intervals"

    def ci(self, v: Variant) -> dict[str, Any] | None:
        """``v``'s ``delta_ap_ci`` (:func:`ci_dict`), or None."""
        paired = self.paired.get(v.metrics_path)
        return ci_dict(paired) if paired is not None else None


def ci_dict(p: PairedDelta) -> dict[str, Any]:
    """report.json's ``delta_ap_ci``: ``{ci_low, ci_high, std_error, n_boot, confidence, seed, n_images}``."""
    return {
        "ci_low": p.ci_low,
        "ci_high": p.ci_high,
        "std_error": p.std_error,
        "n_boot": p.n_boot,
        "confidence": p.confidence,
        "seed": p.seed,
        "n_images": p.n_images,
    }


class _Matcher:
    """Reads an evaluation's checked detections and matches them to the ground truth."""

    def __init__(self, gt, hasher: Hasher):
        self.gt, self.hasher = gt, hasher
        self.unnamed: list[str] = []  # metrics files that record no detections_sha256

    def _records(self, v: Variant) -> list[dict]:
        path = Path(v.source.metrics_file).parent / "detections.json"
        if not path.is_file():
            raise _NoInterval(f"no detections.json beside {v.metrics_path}")
        recorded = v.source.detections_sha256
        if recorded and self.hasher(path) != recorded:
            raise _NoInterval(
                f"{rel_path(path)} has sha256 {self.hasher(path)[:12]}, not the {recorded[:12]} its metrics.json "
                "was computed with"
            )
        try:
            dets = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(dets, list) or not all(isinstance(d, dict) and "image_id" in d for d in dets):
                raise ValueError("not a list of COCO result records")
        except (OSError, ValueError) as e:
            raise _NoInterval(f"{rel_path(path)} cannot be read ({e})") from e
        if not recorded:
            ids = set(v.source.dataset.get("image_ids") or [])
            if any(int(d["image_id"]) not in ids for d in dets):
                raise _NoInterval(f"{rel_path(path)} holds detections of images its metrics.json did not evaluate")
            if v.source.num_detections is not None and len(dets) != v.source.num_detections:
                raise _NoInterval(
                    f"{rel_path(path)} holds {len(dets)} detections, its metrics.json {v.source.num_detections}"
                )
            self.unnamed.append(v.label)
        return dets

    def matches(self, v: Variant) -> ImageMatches:
        ids = [int(i) for i in v.source.dataset.get("image_ids") or []]
        try:
            return match_recorded(self.gt, self._records(v), ids, v.map50_95, v.metrics_path)
        except UserError as e:
            raise _NoInterval(str(e)) from e


def _cached(
    matcher: _Matcher, reference: Variant, v: Variant, n_boot: int, cache: IntervalCache, ann_sha256: str
) -> tuple[PairedDelta | None, tuple[str, dict] | None]:
    """``(interval, None)`` from the cache, or ``(None, (key, parts))`` to compute and keep (``(None, None)``:
    detections not named by sha256, or another image list than the reference's: computed, never cached)."""
    ids = [int(i) for i in v.source.dataset.get("image_ids") or []]
    if ids != [int(i) for i in reference.source.dataset.get("image_ids") or []]:
        return None, None  # PairedReference.delta refuses the pair and says why
    digests = []
    for x in (v, reference):
        path = Path(x.source.metrics_file).parent / "detections.json"
        recorded = x.source.detections_sha256
        if not recorded or not path.is_file() or matcher.hasher(path) != recorded:
            return None, None
        digests.append(recorded)
    key, parts = interval_key(
        digests[0], v.map50_95, digests[1], reference.map50_95, ids, ann_sha256, n_boot, SEED, CONFIDENCE
    )
    return cache.get(key, parts), (key, parts)


def _against(
    matcher: _Matcher,
    reference: Variant,
    variants: Iterable[Variant],
    n_boot: int,
    out: IntervalResult,
    cache: IntervalCache,
    ann_sha256: str,
) -> None:
    """Paired intervals of ``variants`` against ``reference`` (matched once, when the cache misses) into ``out``."""
    variants, ref = list(variants), None
    for v in variants:
        hit, entry = _cached(matcher, reference, v, n_boot, cache, ann_sha256)
        if hit is not None:
            out.paired[v.metrics_path] = hit
            continue
        try:
            if ref is None:
                try:
                    ref = PairedReference(matcher.matches(reference), n_boot, SEED)
                except _NoInterval as e:
                    for w in variants:
                        if w.metrics_path not in out.paired:
                            out.reasons.setdefault(
                                w.metrics_path, f"FP32 reference {reference.metrics_path} unusable: {e}"
                            )
                    return
            out.paired[v.metrics_path] = ref.delta(matcher.matches(v), CONFIDENCE)
            if entry is not None:
                cache.put(*entry, out.paired[v.metrics_path])
        except _NoInterval as e:
            out.reasons[v.metrics_path] = str(e)
        except UserError as e:  # matched on other images than the reference
            out.reasons[v.metrics_path] = str(e)


def compute_intervals(
    baseline: Variant,
    variants: Sequence[Variant],
    confirmation_slices: Sequence[tuple[Variant, Sequence[Variant]]],
    ann_file: Path | None,
    n_boot: int = DEFAULT_N_BOOT,
    hasher: Hasher | None = None,
    cache_root: Path | None = None,
) -> IntervalResult:
    """The paired interval of every row's ΔAP against ``baseline``, and of each confirmation attempt against its
    slice's FP32 evaluation; timed (``block["seconds"]``).

    Args:
        baseline: the FP32 evaluation on the report's images.
        variants: the rows (the baseline among them is skipped).
        confirmation_slices: ``(FP32 evaluation, attempts)`` per checked confirmation.
        ann_file: the annotation file with the baseline's ``ann_sha256`` (None: not found, no intervals).
        n_boot: replicates (0: no intervals; else >= 2).
        cache_root: the run dir whose ``intervals/`` keeps intervals by content (:mod:`lowbit.interval_cache`;
            the budget search's are there); None: compute every interval.

    Raises:
        UserError: ``n_boot`` is 1 or negative.
    """
    if n_boot != 0 and n_boot < 2:
        raise UserError(f"n_boot must be 0 (no intervals) or >= 2, got {n_boot}", flag="--ci-replicates")
    start = time.perf_counter()
    out = IntervalResult()
    others = [v for v in variants if v is not baseline and v.role != "baseline"]
    attempts = [a for _, slice_attempts in confirmation_slices for a in slice_attempts]
    why = None
    if n_boot == 0:
        why = "intervals not computed (0 replicates asked for)"
    elif ann_file is None:
        why = "no annotation file with the sha256 the baseline was scored on was found (pass --data-root)"
    gt, cache = None, IntervalCache(cache_root)
    if why is None:
        from lowbit.coco_eval import load_coco  # faster-coco-eval: loaded only when intervals are computed

        try:
            gt = load_coco(ann_file, flag=str(ann_file))
        except UserError as e:
            why = f"the annotation file cannot be read: {e}"
    if why is not None:
        out.reasons.update({v.metrics_path: why for v in others + attempts})
    else:
        matcher = _Matcher(gt, hasher or Hasher())
        ann_sha256 = matcher.hasher(ann_file)
        _against(matcher, baseline, others, n_boot, out, cache, ann_sha256)
        for reference, slice_attempts in confirmation_slices:
            _against(matcher, reference, slice_attempts, n_boot, out, cache, ann_sha256)
        if matcher.unnamed:
            out.notes.append(
                "detections.json of " + ", ".join(dict.fromkeys(matcher.unnamed)) + " is not named by sha256 in "
                "its metrics.json (an older evaluator): each was checked by its image ids, its count and the "
                "mAP50-95 it gives against metrics.json before its interval was computed"
            )
    seconds = time.perf_counter() - start
    computed = len(out.paired)
    log.info(
        "ΔAP intervals: %d (%d of them kept from the search), %d without, %.1f s (%d replicates)",
        computed,
        cache.hits,
        len(out.reasons),
        seconds,
        n_boot,
    )
    out.block = {
        "n_boot": n_boot,
        "confidence": CONFIDENCE,
        "seed": SEED,
        "seconds": round(seconds, 3),
        "computed": computed,
        "cached": cache.hits,
        "method": METHOD,
        "status": "computed" if why is None else why,
    }
    return out
