"""The budget search's uncertainty and its check on new images: paired intervals of a candidate's loss on one
slice, and the pick confirmed on a slice the search never saw.

**Paired intervals** (:class:`SliceIntervals`). On one image slice, the FP32 detections are matched to the
ground truth once; each candidate's ΔAP against FP32 then gets a paired bootstrap interval over those images
(:mod:`lowbit.ap_bootstrap`). Detections are read only when their sha256 equals the one its ``metrics.json``
records and they give back the mAP that ``metrics.json`` records: a result is never paired with another's.
The search judges a probe "within budget" when its loss plus ``z(confidence) * SE`` is (the one-sided upper
bound, :func:`z_score`), so ``--confidence 0.5`` is the bare point estimate.

**Confirmation** (:func:`confirm_pick`). The pick K is evaluated on the confirmation slice (``--confirm-skip``
image ids left out, the next ``--confirm-images``: the demo's ids 601..1100, after the 500-image search slice
and the 100 calibration images). It is confirmed when its loss there against FP32 on the same images is within
the budget. Otherwise the search moves up by ``step = max(1, ceil(ks_max / 20))`` float nodes: the next K must
first meet the search slice's test (evaluated there when it was not probed), then is confirmed the same way,
up to ``max_attempts`` confirmations. The confirmation slice decides only whether to move on; the search slice
alone decides where the search goes, so a confirmed number is an honest estimate for new images.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lowbit import records
from lowbit.ap_bootstrap import PairedDelta, PairedReference, match_recorded
from lowbit.errors import UserError
from lowbit.interval_cache import IntervalCache, interval_key
from lowbit.logs import get_logger
from lowbit.runs import sha256_file

__all__ = [
    "CI_REPLICATES",
    "DEFAULT_CONFIDENCE",
    "ConfirmConfig",
    "IntervalJob",
    "SliceIntervals",
    "checked_detections",
    "confirm_pick",
    "confirm_step",
    "evaluated_files",
    "interval_in_worker",
    "z_score",
]

log = get_logger("search_confirm")

DEFAULT_CONFIDENCE = 0.8  # one-sided: a K counts when its loss + 0.84 SE is within the budget
CI_REPLICATES = 1000  # bootstrap replicates of every interval (seed 0): the SE of a loss to about 2 %


def z_score(confidence: float, flag: str = "--confidence") -> float:
    """``Φ⁻¹(confidence)``: the one-sided margin in standard errors (0 at 0.5, 0.84 at 0.8, 1.64 at 0.95)."""
    from scipy.stats import norm

    if not 0.5 <= confidence < 1.0:
        raise UserError(f"{flag} must be in [0.5, 1), got {confidence}", flag=flag)
    return float(norm.ppf(confidence))


def checked_detections(metrics_path: Path, flag: str) -> tuple[dict[str, Any], Path]:
    """``(metrics record, detections path)`` of one evaluation: the ``detections.json`` beside ``metrics_path``,
    only when its sha256 is the one the record names (it is read only when an interval must be computed).

    Raises:
        UserError(flag): no usable record, no recorded sha256 (an older evaluator: evaluate again), or a
            detections file that is missing or changed.
    """
    metrics = records.read_record(metrics_path, "metrics", flag=flag)
    path = Path(metrics_path).parent / "detections.json"
    recorded = metrics.get("detections_sha256")
    if not recorded:
        raise UserError(
            f"{flag}: {metrics_path} records no detections_sha256 (written by an older evaluator); evaluate it again",
            flag=flag,
        )
    if not path.is_file() or sha256_file(path) != recorded:
        why = "is missing" if not path.is_file() else "is not the file its metrics.json was computed with"
        raise UserError(f"{flag}: {path} {why}; evaluate {metrics_path.parent} again", flag=flag)
    return metrics, path


class SliceIntervals:
    """Paired intervals against one FP32 evaluation on its slice (its replicates computed once, when first needed).

    Args:
        coco: ground truth (``lowbit.coco_eval.load_coco``) of the annotation file both evaluations used.
        baseline_metrics: the FP32 ``metrics.json`` on this slice.
        flag: the flag that named it (errors name it).
        ann_sha256: the sha256 of the annotation file ``coco`` was read from (part of a cached interval's key).
        cache: where intervals are kept by content (:mod:`lowbit.interval_cache`; the report reuses them).
        n_boot, seed: the bootstrap's replicates and seed.
    """

    def __init__(
        self,
        coco,
        baseline_metrics: Path,
        flag: str,
        ann_sha256: str,
        cache: IntervalCache | None = None,
        n_boot: int = CI_REPLICATES,
        seed: int = 0,
    ):
        self.coco, self.ann_sha256, self.n_boot, self.seed = coco, ann_sha256, n_boot, seed
        self.cache = cache or IntervalCache(None)
        self.metrics, self._detections = checked_detections(baseline_metrics, flag)
        self.path, self.flag = baseline_metrics, flag
        self.image_ids = [int(i) for i in self.metrics["dataset"]["image_ids"]]
        self.baseline_map50_95 = float(self.metrics["metrics"]["map50_95"])  # FP32's, as matching gives it back
        self._paired: PairedReference | None = None

    def _matches(self, metrics: dict, detections: Path, path: Path, flag: str):
        """Match the checked ``detections`` file of the evaluation ``path`` (its ``metrics``)."""
        dets = json.loads(detections.read_text(encoding="utf-8"))
        try:
            return match_recorded(self.coco, dets, self.image_ids, metrics["metrics"]["map50_95"], str(path))
        except UserError as e:
            raise UserError(f"{flag}: {e}", flag=flag) from e

    def _reference(self) -> PairedReference:
        """FP32's matching and replicates (computed on the first interval the cache does not hold)."""
        if self._paired is None:
            reference = self._matches(self.metrics, self._detections, self.path, self.flag)
            self._paired = PairedReference(reference, self.n_boot, self.seed)
        return self._paired

    def paired(self, metrics_path: Path, confidence: float = 0.95, flag: str = "candidate metrics") -> PairedDelta:
        """ΔAP (candidate − FP32, AP points) with its two-sided ``confidence`` interval and standard error.

        Raises:
            UserError(flag): unusable detections, or an evaluation of other images than the FP32 one.
        """
        metrics, detections = checked_detections(metrics_path, flag)
        ids = [int(i) for i in metrics["dataset"]["image_ids"]]
        if ids != self.image_ids:
            raise UserError(f"{flag}: {metrics_path} scored other images than its FP32 reference", flag=flag)
        key, parts = interval_key(
            metrics["detections_sha256"],
            metrics["metrics"]["map50_95"],
            self.metrics["detections_sha256"],
            self.metrics["metrics"]["map50_95"],
            ids,
            self.ann_sha256,
            self.n_boot,
            self.seed,
            confidence,
        )
        cached = self.cache.get(key, parts)
        if cached is not None:
            return cached
        value = self._reference().delta(self._matches(metrics, detections, metrics_path, flag), confidence)
        self.cache.put(key, parts, value)
        return value


@dataclass(frozen=True)
class IntervalJob:
    """A slice's paired interval, as a worker process computes it right after evaluating a candidate there.

    The search's worker processes (``--parallel-probes`` > 1) evaluate the probes of a round side by side; each
    then computes its candidate's interval and puts it in the run's interval cache, under the key the search
    process asks for (same FP32 metrics, annotation file, replicates, seed and confidence). The search process
    then reads the round's intervals instead of computing them one after another (3.7 s each on an H100 host,
    against about 5 s for the evaluation itself).
    """

    baseline_metrics: Path
    flag: str  # the flag that named baseline_metrics
    ann_file: Path
    ann_sha256: str
    run_root: Path
    confidence: float
    n_boot: int = CI_REPLICATES


_WORKER_INTERVALS: dict[IntervalJob, SliceIntervals] = {}  # per worker process: FP32's replicates computed once


def interval_in_worker(job: IntervalJob, metrics_path: Path) -> None:
    """Compute and cache the paired interval of the evaluation ``metrics_path`` (in a worker, after evaluating it).

    An input the interval cannot use is only logged here: the search process computes the interval again and
    raises the error there, naming its flag.
    """
    from lowbit.coco_eval import load_coco

    try:
        intervals = _WORKER_INTERVALS.get(job)
        if intervals is None:
            coco = load_coco(job.ann_file, "--data-root")
            cache = IntervalCache(job.run_root)
            intervals = SliceIntervals(coco, job.baseline_metrics, job.flag, job.ann_sha256, cache, job.n_boot)
            _WORKER_INTERVALS[job] = intervals
        intervals.paired(metrics_path, job.confidence, "candidate")
    except UserError as e:
        log.warning("interval of %s left to the search process: %s", metrics_path, e)


@dataclass(frozen=True)
class ConfirmConfig:
    """The confirmation slice: ``count`` image ids after the first ``skip``; FP32 evaluated there."""

    baseline_metrics: Path
    count: int
    skip: int
    max_attempts: int = 3


def confirm_step(ks_max: int) -> int:
    """Float nodes added after a failed confirmation: a twentieth of the ranked nodes, at least one."""
    return max(1, math.ceil(ks_max / 20))


RULE = (
    "the pick is confirmed when its loss against FP32 on the confirmation slice is within the budget; "
    "otherwise K grows by max(1, ceil(ranked nodes / 20)), the new K must pass the search slice's test first, "
    "and is confirmed the same way, up to {attempts} confirmations"
)


def confirm_pick(
    k: int,
    ks_max: int,
    budget: float,
    cfg: ConfirmConfig,
    search_point: Callable[[int], Any],
    evaluate_confirm: Callable[[int], Any],
    confirm_intervals: SliceIntervals,
    confidence: float,
) -> dict[str, Any]:
    """Confirm the search's pick ``k`` (see the module docstring); ``search.json``'s ``confirmation`` block.

    Args:
        search_point: ``K -> lowbit.budget_search.Probe`` on the search slice (evaluated when new).
        evaluate_confirm: ``K -> lowbit.candidates.Evaluated`` on the confirmation slice.
        confirm_intervals: paired intervals against FP32 on the confirmation slice.
        confidence: two-sided level of the intervals reported.
    """
    step, attempts, final = confirm_step(ks_max), [], None
    while k <= ks_max and len(attempts) < cfg.max_attempts:
        point = search_point(k)
        if not point.meets:
            log.info("confirmation: K=%d misses the budget on the search slice; K=%d next", k, k + step)
            k += step
            continue
        ev = evaluate_confirm(k)
        paired = confirm_intervals.paired(ev.metrics_path, confidence)
        loss = -paired.delta_ap
        within = loss <= budget
        log.info(
            "confirmation: K=%d ΔAP %+.2f [%+.2f, %+.2f] on %d new images: %s",
            k,
            paired.delta_ap,
            paired.ci_low,
            paired.ci_high,
            paired.n_images,
            "within the budget" if within else "outside the budget",
        )
        attempts.append(_attempt(ev, point, paired, within))
        if within:
            final = k
            break
        k += step
    return {
        "images": {"skip": cfg.skip, "count": cfg.count},
        "baseline_metrics": str(cfg.baseline_metrics),
        "baseline_ap": confirm_intervals.baseline_map50_95 * 100.0,
        "rule": RULE.format(attempts=cfg.max_attempts),
        "step": step,
        "attempts": attempts,
        "k": final,
        "confirmed": final is not None,
    }


def evaluated_files(ev) -> dict[str, Any]:
    """A :class:`lowbit.candidates.Evaluated` candidate's files by path and sha256, and its AP (a record's keys)."""
    return {
        "name": ev.name,
        "model_path": str(ev.model_path),
        "model_sha256": ev.model_sha256,
        "metrics_path": str(ev.metrics_path),
        "metrics_sha256": ev.metrics_sha256,
        "ap": ev.ap,
    }


def _attempt(ev, point, paired: PairedDelta, within: bool) -> dict[str, Any]:
    return {
        "k": ev.k,
        **evaluated_files(ev),
        "delta_ap": -paired.delta_ap,  # loss convention, like the search's candidates
        "paired_delta": asdict(paired),
        "search_delta_ap": point.delta,
        "search_std_error": point.std_error,
        "within_budget": within,
    }
