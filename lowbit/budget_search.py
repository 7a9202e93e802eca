"""The search for the smallest number of float layers (K) whose evaluated accuracy loss fits a budget.

Candidates along a ranking are indexed by K: the K most sensitive nodes run in float, the rest
quantized (K = 0: the fully quantized model; ``ks_max``: every ranked node in float). Each probe
is one real evaluation ``evaluate(K) -> map`` on the evaluation slice; nothing is interpolated and
no K is evaluated twice (every result is cached).

Units: ``baseline`` (FP32 accuracy), ``evaluate``'s return and ``budget`` share one unit. The
project passes AP points, i.e. COCO mAP@0.5:0.95 x 100 (``--budget-ap 0.5`` = half an AP point).
``delta = baseline - map``; a candidate meets the budget when ``delta <= budget``, or, with ``std_error`` and
``z`` given, when ``delta + z * std_error(K) <= budget``: the one-sided upper confidence bound of the loss
(``z = Φ⁻¹(confidence)``, ``std_error`` a paired standard error of the loss over images) is within the budget.

Search (lowest-bracket bisection)
---------------------------------
1. Probe K = 0 (stop when it already meets the budget), then any ``seed_ks`` (e.g. fixed anchors
   5, 10, 20), then ``ks_max``. With ``parallel = p`` the Ks of this round run together, and when
   they are fewer than ``p`` the spare probes split ``[0, ks_max]`` into equal parts.
2. Let P be the smallest probed K that meets the budget and L the largest probed K below P that
   does not. While ``P - L > 1`` probe ``(L + P) // 2``. On a monotone curve this is plain
   bisection: at most ``ceil(log2(ks_max))`` probes after the end points.
   With ``parallel = p > 1`` each round probes ``p`` Ks at once, splitting ``[L, P]`` into ``p + 1``
   equal parts (``L + i * (P - L) // (p + 1)``, i = 1..p; p = 1 is the bisection above): about
   ``log(ks_max) / log(p + 1)`` rounds, each as long as one probe when the probes run side by side.
3. Bisection assumes that more float layers never lose more accuracy. Measured curves are noisy, so
   the cached points are checked: a *monotone violation* is a pair of neighbouring probed Ks where
   the smaller meets the budget and the larger does not. When there is one, the Ks below P that were
   never probed (the ones bisection skipped by assuming monotonicity) are scanned in ascending order
   until one meets the budget, which becomes the answer, or ``max_probes`` is reached (``p`` at a
   time with ``parallel = p``; the smallest meeting one of them is the answer).

When nothing probed meets the budget the result has ``found=False`` and reports the probed point
with the smallest loss; ``reason`` says so.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from lowbit.errors import UserError

__all__ = ["DEFAULT_MAX_PROBES", "Probe", "SearchResult", "default_max_probes", "judge", "search_smallest_k"]

# Probes allowed by default: end points + bisection over ~100 ranked nodes + a few scan probes.
DEFAULT_MAX_PROBES = 12


@dataclass
class Probe:
    """One evaluated candidate: ``k`` float layers, its ``map`` and ``delta = baseline - map`` (same units);
    ``std_error`` of ``delta`` (None when not measured) and ``margin = z * std_error`` (0 without)."""

    k: int
    map: float
    delta: float
    meets: bool
    std_error: float | None = None
    margin: float = 0.0


def judge(
    k: int, value: float, baseline: float, budget: float, std_error: float | None = None, z: float = 0.0
) -> Probe:
    """The probe of K with accuracy ``value``: ``delta = baseline - value`` meets the budget when
    ``delta + z * std_error <= budget`` (``delta <= budget`` without a standard error)."""
    delta = float(baseline) - float(value)
    margin = 0.0 if std_error is None else float(z) * std_error
    return Probe(int(k), float(value), delta, delta + margin <= float(budget), std_error, margin)


@dataclass
class SearchResult:
    """Outcome of :func:`search_smallest_k`.

    Attributes:
        k: the smallest probed K meeting the budget; when ``found`` is False, the probed K with the
            smallest delta (ties: smaller K).
        found: some probed K meets the budget.
        map: accuracy of candidate ``k``; ``delta``: ``baseline - map``.
        budget, baseline, ks_max: the inputs.
        probes: every evaluation in the order it ran (given ``known`` points excluded).
        known: pre-evaluated points passed in (not re-run).
        monotone_violations: ``[(k_meets, k_fails)]`` neighbouring probed Ks, smaller one meeting the budget.
        scanned: a linear scan below ``k`` ran because of violations.
        exhaustive_below: every K < ``k`` was evaluated (so ``k`` is the smallest, whatever the curve's shape).
        reason: one sentence on how the search ended.
    """

    k: int
    found: bool
    map: float
    delta: float
    budget: float
    baseline: float
    ks_max: int
    probes: list[Probe] = field(default_factory=list)
    known: list[Probe] = field(default_factory=list)
    monotone_violations: list[tuple[int, int]] = field(default_factory=list)
    scanned: bool = False
    exhaustive_below: bool = False
    reason: str = ""

    @property
    def order(self) -> list[int]:
        """The Ks in the order they were evaluated."""
        return [p.k for p in self.probes]

    def curve(self) -> list[Probe]:
        """Every evaluated point (probes and known), sorted by K: the ΔAP-against-K curve."""
        return sorted(self.probes + self.known, key=lambda p: p.k)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict; ``order`` and ``curve`` added."""
        out = asdict(self)
        out["monotone_violations"] = [list(pair) for pair in self.monotone_violations]
        out["order"] = self.order
        out["curve"] = [asdict(p) for p in self.curve()]
        return out


def default_max_probes(parallel: int = 1) -> int:
    """The probe cap for ``parallel`` probes per round: the rounds the serial default allows, ``parallel`` wide."""
    return DEFAULT_MAX_PROBES * max(1, parallel)


def _validate(
    ks_max: int, budget: float, max_probes: int, seed_ks: Iterable[int], known: dict[int, float], parallel: int
) -> None:
    if not budget > 0:  # also rejects NaN
        raise UserError(f"--budget-ap must be > 0 (AP points lost against FP32), got {budget}", flag="--budget-ap")
    if ks_max < 0:
        raise ValueError(f"ks_max must be >= 0, got {ks_max}")
    if max_probes < 1:
        raise ValueError(f"max_probes must be >= 1, got {max_probes}")
    if parallel < 1:
        raise ValueError(f"parallel must be >= 1, got {parallel}")
    outside = sorted(k for k in list(seed_ks) + list(known) if not 0 <= k <= ks_max)
    if outside:
        raise ValueError(f"K values {outside} are outside 0..{ks_max}")


class _Cache:
    """Evaluations by K; refuses to evaluate a K twice or to exceed the probe budget."""

    def __init__(self, evaluate, baseline, budget, max_probes, known, parallel=1, std_error=None, z=0.0):
        self.evaluate, self.baseline, self.budget, self.max_probes = evaluate, baseline, budget, max_probes
        self.parallel, self.std_error, self.z = int(parallel), std_error, float(z)
        self.known = [self._point(k, m) for k, m in sorted(known.items())]
        self.points: dict[int, Probe] = {p.k: p for p in self.known}
        self.probes: list[Probe] = []

    def _point(self, k: int, value: float) -> Probe:
        se = None if self.std_error is None else float(self.std_error(int(k)))
        return judge(k, value, self.baseline, self.budget, se, self.z)

    @property
    def exhausted(self) -> bool:
        return len(self.probes) >= self.max_probes

    def probe(self, k: int) -> Probe | None:
        """The point at ``k``, evaluating it if new; None when the probe budget is spent."""
        if k in self.points:
            return self.points[k]
        if self.exhausted:
            return None
        point = self._point(k, self.evaluate(k))
        self.points[k] = point
        self.probes.append(point)
        return point

    def probe_many(self, ks: Iterable[int]) -> None:
        """Evaluate the new Ks among ``ks``, up to ``parallel`` at a time, within the probe budget.

        Results are recorded in the order of ``ks`` whatever order the evaluations finish in.
        """
        new = [k for k in dict.fromkeys(ks) if k not in self.points][: max(0, self.max_probes - len(self.probes))]
        if self.parallel == 1 or len(new) <= 1:
            for k in new:
                self.probe(k)
            return
        with ThreadPoolExecutor(min(self.parallel, len(new)), thread_name_prefix="probe") as pool:
            values = list(pool.map(self.evaluate, new))  # the first failure is raised here
        for k, value in zip(new, values):
            self.points[k] = self._point(k, value)
            self.probes.append(self.points[k])

    def smallest_meeting(self) -> Probe | None:
        return min((p for p in self.points.values() if p.meets), key=lambda p: p.k, default=None)

    def violations(self) -> list[tuple[int, int]]:
        ordered = sorted(self.points.values(), key=lambda p: p.k)
        return [(a.k, b.k) for a, b in itertools.pairwise(ordered) if a.meets and not b.meets]


def _bisect_lowest_bracket(cache: _Cache) -> bool:
    """Narrow [largest failing K below P, P] to width 1; False when the probe budget ran out first."""
    while True:
        best = cache.smallest_meeting()
        # K=0 was probed first and misses the budget, so a failing K below P always exists.
        low = max(k for k, p in cache.points.items() if k < best.k and not p.meets)
        width = best.k - low
        if width <= 1:
            return True
        if cache.exhausted:
            return False
        parts = cache.parallel + 1
        cache.probe_many(sorted({low + i * width // parts for i in range(1, parts)} - {low}))


def _scan_below(cache: _Cache) -> bool:
    """Probe the unprobed Ks below P in ascending order until one meets; False when the budget ran out."""
    best = cache.smallest_meeting()
    todo = [k for k in range(best.k) if k not in cache.points]
    for start in range(0, len(todo), cache.parallel):
        if cache.exhausted:
            return False
        chunk = todo[start : start + cache.parallel]
        cache.probe_many(chunk)
        if any(cache.points[k].meets for k in chunk if k in cache.points):
            return True
    return True


def _result(cache: _Cache, ks_max: int, reason: str, scanned: bool) -> SearchResult:
    best = cache.smallest_meeting()
    found = best is not None
    if not found:
        best = min(cache.points.values(), key=lambda p: (p.delta, p.k))
    exhaustive = all(k in cache.points for k in range(best.k))
    return SearchResult(
        k=best.k,
        found=found,
        map=best.map,
        delta=best.delta,
        budget=cache.budget,
        baseline=cache.baseline,
        ks_max=ks_max,
        probes=list(cache.probes),
        known=list(cache.known),
        monotone_violations=cache.violations(),
        scanned=scanned,
        exhaustive_below=exhaustive,
        reason=reason,
    )


def search_smallest_k(
    evaluate: Callable[[int], float],
    ks_max: int,
    budget: float,
    baseline: float,
    *,
    max_probes: int = DEFAULT_MAX_PROBES,
    seed_ks: Iterable[int] = (),
    known: dict[int, float] | None = None,
    parallel: int = 1,
    std_error: Callable[[int], float] | None = None,
    z: float = 0.0,
) -> SearchResult:
    """Find the smallest K in ``0..ks_max`` whose evaluated loss ``baseline - evaluate(K)`` is within ``budget``.

    Args:
        evaluate: builds and evaluates the candidate with the top-K ranked nodes in float; returns its
            accuracy in the unit of ``baseline`` (AP points in this project). Called at most once per K.
        ks_max: the largest K (the number of ranked nodes).
        budget: allowed loss, > 0, same unit (``--budget-ap``).
        baseline: FP32 accuracy.
        max_probes: cap on calls of ``evaluate``.
        seed_ks: Ks to evaluate right after K = 0 (e.g. the fixed anchors); they let the search see a
            non-monotone curve.
        known: ``{K: accuracy}`` already evaluated elsewhere; used as cached points, never re-run.
        parallel: Ks probed per round, ``evaluate`` called from that many threads at once (it must
            be thread-safe then); 1 is plain bisection.
        std_error: ``K -> standard error of delta(K)``, called once per point after ``evaluate(K)`` (and for
            each ``known`` K) in the calling thread; None: points are judged by ``delta`` alone.
        z: with ``std_error``, a point meets the budget when ``delta + z * std_error(K) <= budget``.

    Returns:
        A :class:`SearchResult` (see the module docstring for the algorithm).

    Raises:
        UserError: ``budget <= 0`` (flag ``--budget-ap``).
        ValueError: ``ks_max < 0``, ``max_probes < 1``, ``parallel < 1``, a seed or known K outside ``0..ks_max``.
    """
    known = dict(known or {})
    seed_ks = list(seed_ks)
    _validate(ks_max, budget, max_probes, seed_ks, known, parallel)
    cache = _Cache(evaluate, float(baseline), float(budget), int(max_probes), known, parallel, std_error, z)
    cache.probe(0)
    if cache.points[0].meets:
        return _result(cache, ks_max, "K=0 (every node quantized) already meets the budget", False)
    first = set(seed_ks) | {ks_max}
    spare = parallel - len(first)  # a first round of parallel probes also splits [0, ks_max] with the spare ones
    first |= {i * ks_max // (spare + 1) for i in range(1, spare + 1)} - {0} if spare > 0 else set()
    cache.probe_many(sorted(first))
    if cache.smallest_meeting() is None:
        probed = sorted(cache.points)
        cut = " before K=ks_max was reached (probe budget spent)" if ks_max not in cache.points else ""
        reason = f"no evaluated K meets the budget{cut} (probed K={probed}); the point with the smallest loss is kept"
        return _result(cache, ks_max, reason, False)
    complete = _bisect_lowest_bracket(cache)
    scanned = False
    if complete and cache.violations():
        scanned = True
        complete = _scan_below(cache)
    if not complete:
        reason = (
            f"probe budget of {max_probes} spent: K is the smallest evaluated K meeting the budget, not proven smallest"
        )
    elif scanned:
        reason = "non-monotone curve: every K below the answer was evaluated and misses the budget"
    else:
        reason = "bisection converged: K meets the budget and K-1 does not"
    return _result(cache, ks_max, reason, scanned)
