"""Budget search over K (lowbit.budget_search): pure logic on synthetic accuracy curves."""

from __future__ import annotations

import json
import math
import threading
import time

import pytest

from lowbit import budget_search
from lowbit.budget_search import default_max_probes, search_smallest_k
from lowbit.errors import UserError

BASELINE = 50.0  # FP32 mAP in AP points


class Curve:
    """``evaluate`` over a table of losses (AP points) by K; records every call."""

    def __init__(self, deltas):
        self.deltas = list(deltas)
        self.calls: list[int] = []

    def __call__(self, k: int) -> float:
        self.calls.append(k)
        return BASELINE - self.deltas[k]


def monotone(ks_max: int = 80, start: float = 1.4, rate: float = 0.1):
    return Curve([start * math.exp(-rate * k) for k in range(ks_max + 1)])


def test_monotone_curve_bisects_to_the_smallest_k():
    curve = monotone()
    result = search_smallest_k(curve, ks_max=80, budget=0.5, baseline=BASELINE)
    expected = next(k for k, d in enumerate(curve.deltas) if d <= 0.5)
    assert result.found and result.k == expected
    assert result.delta == pytest.approx(curve.deltas[expected]) and result.map == pytest.approx(
        BASELINE - result.delta
    )
    assert result.order[:2] == [0, 80] and result.order == curve.calls
    assert expected - 1 in curve.calls  # K-1 evaluated and misses: nothing assumed at the answer
    assert not result.monotone_violations and not result.scanned
    assert len(curve.calls) <= 2 + math.ceil(math.log2(80))
    json.dumps(result.to_dict())


@pytest.mark.parametrize("budget", [0.05, 0.3, 0.5, 1.0, 1.39])
def test_probe_count_is_logarithmic_and_no_k_twice(budget):
    curve = monotone(ks_max=100)
    result = search_smallest_k(curve, ks_max=100, budget=budget, baseline=BASELINE)
    assert len(curve.calls) == len(set(curve.calls)), "a K was evaluated twice"
    assert len(curve.calls) <= 2 + math.ceil(math.log2(100))
    assert result.found and result.k == next(k for k, d in enumerate(curve.deltas) if d <= budget)


def test_k0_already_meets_the_budget_with_one_probe():
    curve = monotone(start=0.4)
    result = search_smallest_k(curve, ks_max=80, budget=0.5, baseline=BASELINE)
    assert result.found and result.k == 0 and curve.calls == [0]


def test_budget_nothing_meets_returns_best_point():
    curve = Curve([1.4, 1.0, 0.9, 0.8, 0.7, 0.75, 0.72])
    result = search_smallest_k(curve, ks_max=6, budget=0.5, baseline=BASELINE)
    assert not result.found
    assert curve.calls == [0, 6]  # nothing meets at either end: no bisection
    assert result.k == 6 and result.delta == pytest.approx(0.72)
    assert "no evaluated K meets" in result.reason


def test_non_monotone_curve_found_through_seeds_is_scanned_below():
    # K=5 meets, K=10 misses (noise), K=20 meets: bisection alone could stop at 5 or in 10..20
    deltas = [1.4, 0.9, 0.8, 0.45, 0.7, 0.4, 0.6, 0.6, 0.6, 0.6, 0.6] + [0.3] * 10
    curve = Curve(deltas)
    result = search_smallest_k(curve, ks_max=20, budget=0.5, baseline=BASELINE, seed_ks=(5, 10))
    assert (5, 10) in result.monotone_violations
    assert result.scanned and result.exhaustive_below
    assert result.found and result.k == 3  # 3 meets though 4 does not: found by the scan
    assert len(curve.calls) == len(set(curve.calls))
    assert set(range(3)) <= set(curve.calls)


def test_non_monotone_scan_is_bounded_by_max_probes():
    deltas = [1.4] + [0.9] * 9 + [0.4] + [0.9] * 9 + [0.4] * 21
    curve = Curve(deltas)
    result = search_smallest_k(curve, ks_max=40, budget=0.5, baseline=BASELINE, seed_ks=(10, 20), max_probes=6)
    assert len(curve.calls) == 6
    assert result.found and result.k == 10 and not result.exhaustive_below
    assert "probe budget" in result.reason


def test_known_points_are_not_re_evaluated():
    curve = monotone()
    known = {k: BASELINE - curve.deltas[k] for k in (0, 5, 10, 20)}
    result = search_smallest_k(curve, ks_max=80, budget=0.5, baseline=BASELINE, known=known)
    assert not set(known) & set(curve.calls)
    assert result.k == next(k for k, d in enumerate(curve.deltas) if d <= 0.5)
    assert [p.k for p in result.curve()] == sorted(set(curve.calls) | set(known))


def test_budget_is_inclusive():
    curve = Curve([1.0, 0.5, 0.2])
    assert search_smallest_k(curve, ks_max=2, budget=0.5, baseline=BASELINE).k == 1


@pytest.mark.parametrize("budget", [0.0, -0.5, float("nan")])
def test_non_positive_budget_is_rejected(budget):
    with pytest.raises(UserError) as info:
        search_smallest_k(monotone(), ks_max=80, budget=budget, baseline=BASELINE)
    assert info.value.flag == "--budget-ap"


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError):
        search_smallest_k(monotone(), ks_max=80, budget=0.5, baseline=BASELINE, seed_ks=(81,))
    with pytest.raises(ValueError):
        search_smallest_k(monotone(), ks_max=80, budget=0.5, baseline=BASELINE, max_probes=0)


class OverlapCurve(Curve):
    """A curve whose evaluations take a while; records how many of them ran at the same time."""

    def __init__(self, deltas, seconds: float = 0.05):
        super().__init__(deltas)
        self.seconds, self.active, self.peak, self.lock = seconds, 0, 0, threading.Lock()

    def __call__(self, k: int) -> float:
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        time.sleep(self.seconds)
        with self.lock:
            self.active -= 1
        return super().__call__(k)


def _count_rounds(monkeypatch) -> list[list[int]]:
    rounds: list[list[int]] = []
    probe_many = budget_search._Cache.probe_many

    def counted(cache, ks):
        before = len(cache.probes)
        probe_many(cache, ks)
        if len(cache.probes) > before:
            rounds.append([p.k for p in cache.probes[before:]])

    monkeypatch.setattr(budget_search._Cache, "probe_many", counted)
    return rounds


@pytest.mark.parametrize("budget", [0.05, 0.3, 0.5, 1.0, 1.39])
def test_parallel_probes_find_the_serial_answer_in_fewer_rounds(budget, monkeypatch):
    serial = search_smallest_k(monotone(ks_max=100), ks_max=100, budget=budget, baseline=BASELINE)
    rounds = _count_rounds(monkeypatch)
    curve = OverlapCurve(monotone(ks_max=100).deltas)
    result = search_smallest_k(
        curve, ks_max=100, budget=budget, baseline=BASELINE, parallel=3, max_probes=default_max_probes(3)
    )
    assert result.found and result.k == serial.k and result.reason == serial.reason
    assert len(curve.calls) == len(set(curve.calls)), "a K was evaluated twice"
    assert rounds[0] == [33, 66, 100]  # the first round splits [0, ks_max] with its spare probes
    assert all(len(r) <= 3 for r in rounds) and curve.peak == 3
    assert len(rounds) <= 1 + math.ceil(math.log(100, 4))  # plus K=0, evaluated alone
    assert len(rounds) < len(serial.probes) - 1


def test_parallel_scan_below_a_non_monotone_curve_finds_the_serial_answer():
    deltas = [1.4, 0.9, 0.8, 0.45, 0.7, 0.4, 0.6, 0.6, 0.6, 0.6, 0.6] + [0.3] * 10
    serial = search_smallest_k(Curve(deltas), ks_max=20, budget=0.5, baseline=BASELINE, seed_ks=(5, 10))
    curve = OverlapCurve(deltas, seconds=0.01)
    result = search_smallest_k(curve, ks_max=20, budget=0.5, baseline=BASELINE, seed_ks=(5, 10), parallel=2)
    assert result.k == serial.k == 3 and result.scanned and result.exhaustive_below
    assert len(curve.calls) == len(set(curve.calls))


def test_parallel_probes_stop_at_the_probe_budget():
    curve = Curve(monotone(ks_max=100).deltas)
    result = search_smallest_k(curve, ks_max=100, budget=0.05, baseline=BASELINE, parallel=4, max_probes=6)
    assert len(curve.calls) == 6 and "probe budget" in result.reason
    with pytest.raises(ValueError):
        search_smallest_k(monotone(), ks_max=80, budget=0.5, baseline=BASELINE, parallel=0)


def test_std_error_margin_moves_the_answer_to_a_point_sure_to_be_within_budget():
    """With z * SE added, a point whose loss is within the budget only by less than its margin does not meet it."""
    deltas = [2.0, 1.0, 0.45, 0.3, 0.1, 0.0]
    plain = search_smallest_k(Curve(deltas), 5, 0.5, BASELINE)
    asked: list[int] = []

    def std_error(k: int) -> float:
        asked.append(k)
        return 0.1

    sure = search_smallest_k(Curve(deltas), 5, 0.5, BASELINE, std_error=std_error, z=1.0)
    assert (plain.k, sure.k) == (2, 3) and sure.found
    point = {p.k: p for p in sure.curve()}
    assert point[2].delta == pytest.approx(0.45) and point[2].margin == pytest.approx(0.1) and not point[2].meets
    assert point[3].std_error == pytest.approx(0.1) and point[3].meets
    assert sorted(asked) == sorted(point)  # one SE per evaluated point, none twice
    assert json.loads(json.dumps(sure.to_dict()))["curve"][3]["margin"] == pytest.approx(0.1)
