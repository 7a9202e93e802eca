"""The revert pass: once the search has its pick, put float nodes back into low precision while the budget holds.

The pick keeps the top-K ranked nodes in float. The ranking orders nodes by a proxy of their cost to accuracy, so
the smallest float set that fits the budget need not be a prefix of it. The pass (:func:`revert_pass`) tries the
pick's float nodes one at a time, cheapest first (the least sensitive, i.e. from the K-th ranked node up): each
try evaluates the current float set without that node on the search slice, and the node stays in low precision
when the try passes the search's own test (loss + ``z * SE`` within the budget, :func:`lowbit.budget_search.judge`);
otherwise it goes back to float. At most ``max_probes`` tries, one evaluation each (``parallel`` of them at once
give the same result, see :func:`revert_pass`).

Keeping the tries that pass on one slice favours the lucky ones (the winner's curse, the reason the search
confirms its pick), so the result is confirmed on the confirmation slice as the pick is
(:func:`revert_confirmation`): the final set first; when it misses the budget there, the pass steps back to the
set it had kept with the search's confirmation step more nodes in float, up to the search's number of
confirmations. A set that passes is the pass's result; when none does, the pick stands.

Units: AP points (mAP50-95 x 100), ``delta`` = loss against FP32 (>= 0 a loss), as :mod:`lowbit.budget_search`.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from lowbit.budget_search import Probe

__all__ = [
    "REVERT_DIR",
    "REVERT_RULE",
    "RevertResult",
    "RevertTry",
    "revert_confirmation",
    "revert_order",
    "revert_pass",
]

REVERT_DIR = "revert"  # search-<mode>/revert/: the pass's candidates (onnx/ and <name>-coco/), apart from the search's


@dataclass
class RevertTry:
    """One try: ``node`` put back into low precision, leaving ``k`` nodes in float; ``kept`` when its probe
    met the budget (the node stays quantized from then on)."""

    node: str
    probe: Probe
    kept: bool

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.node, **asdict(self.probe), "kept": self.kept}


@dataclass
class RevertResult:
    """The pass from ``start`` (the pick's float nodes, ranking order) to ``nodes`` (the final float set, the same
    order); ``untried``: float nodes the probe budget left untried."""

    start: list[str]
    nodes: list[str]
    tries: list[RevertTry] = field(default_factory=list)
    untried: list[str] = field(default_factory=list)
    discarded: int = 0  # evaluations of a parallel round made after a failed try (see revert_pass)

    @property
    def gained(self) -> int:
        """Float nodes the pass put back into low precision."""
        return len(self.start) - len(self.nodes)

    @property
    def final_probe(self) -> Probe | None:
        """The search-slice probe of the final set (the last kept try); None when no try was kept."""
        kept = [t.probe for t in self.tries if t.kept]
        return kept[-1] if kept else None

    def kept_sets(self) -> list[tuple[int, list[str]]]:
        """``(try, float nodes)`` after each kept try (tries count from 1), in the order they were kept: each set
        has one node fewer than the one before."""
        sets, current = [], list(self.start)
        for i, t in enumerate(self.tries, start=1):
            if t.kept:
                current = [n for n in current if n != t.node]
                sets.append((i, current))
        return sets

    def to_dict(self) -> dict[str, Any]:
        return {
            "start_k": len(self.start),
            "k": len(self.nodes),
            "gained": self.gained,
            "nodes": list(self.nodes),
            "reverted": [t.node for t in self.tries if t.kept],
            "untried": list(self.untried),
            "discarded": self.discarded,
            "tries": [t.to_dict() for t in self.tries],
        }


def revert_order(float_nodes: list[str]) -> list[str]:
    """The order nodes are tried in: cheapest first, i.e. the ranking's order reversed (its K-th node first)."""
    return list(reversed(float_nodes))


def revert_pass(
    float_nodes: list[str], probe: Callable[[list[str], int], Probe], max_probes: int, parallel: int = 1
) -> RevertResult:
    """Try each of ``float_nodes`` back in low precision (:func:`revert_order`), keeping what meets the budget.

    With ``parallel = p > 1`` each round evaluates the next ``p`` tries at once, each under a guess of how the
    round's earlier tries end: the one the last decided try had. After a kept try (and in the first round), try
    ``j`` assumes the round's earlier tries are kept (their nodes already back in low precision); the round's tries
    up to and including its first failure are taken. After a failed try, each try assumes the earlier ones fail
    (one node back in low precision at a time, from the same set); the tries up to and including the first one
    kept are taken. The tries after the one that broke the guess assumed another set, so they are evaluated again
    in the next round. The result is the one-at-a-time result; what it costs is the discarded evaluations
    (``RevertResult.discarded``): a run of failures (a pick at the edge of the budget) costs one round per ``p``
    tries, as a run of kept tries does.

    Args:
        float_nodes: the pick's float nodes, in ranking order (most sensitive first).
        probe: ``probe(nodes, i)`` evaluates the candidate with exactly ``nodes`` in float (try ``i``, from 1) on the
            search slice and judges it (:func:`lowbit.budget_search.judge`); called from ``parallel`` threads.
        max_probes: most tries taken; 0 tries nothing.

    Returns:
        The :class:`RevertResult`; ``nodes`` keeps the ranking order of ``float_nodes``.
    """
    if max_probes < 0:
        raise ValueError(f"max_probes must be >= 0, got {max_probes}")
    if parallel < 1:
        raise ValueError(f"parallel must be >= 1, got {parallel}")
    current = list(float_nodes)
    every = revert_order(float_nodes)
    order, untried = every[:max_probes], every[max_probes:]
    tries: list[RevertTry] = []
    discarded = 0
    with ThreadPoolExecutor(parallel, thread_name_prefix="revert") as pool:
        while len(tries) < len(order):
            start = len(tries)
            guess_kept = not tries or tries[-1].kept
            trials, trial = [], current
            for node in order[start : start + parallel]:
                trial = [n for n in (trial if guess_kept else current) if n != node]
                trials.append(trial)
            points = list(pool.map(probe, trials, range(start + 1, start + 1 + len(trials))))
            for node, trial, point in zip(order[start:], trials, points):
                if point.k != len(trial):
                    raise ValueError(f"probe of {len(trial)} float nodes returned K={point.k}")
                tries.append(RevertTry(node, point, point.meets))
                if point.meets:
                    current = trial
                if point.meets != guess_kept:  # the round's later tries assumed the other outcome
                    break
            discarded += len(trials) - (len(tries) - start)
    return RevertResult(list(float_nodes), current, tries, untried, discarded)


REVERT_RULE = (
    "the final set is confirmed when its loss against FP32 on the confirmation slice is within the budget; "
    "otherwise the pass steps back to the set it kept with at least max(1, ceil(ranked nodes / 20)) more nodes in "
    "float, confirmed the same way, up to {attempts} confirmations; the pick stands when none is within the budget"
)


def revert_confirmation(
    result: RevertResult, step: int, max_attempts: int, confirm: Callable[[int, list[str]], tuple[dict, bool]]
) -> dict[str, Any]:
    """Confirm the pass's result on new images (see the module docstring); ``search.json``'s ``revert.confirmation``.

    Args:
        result: the pass; its kept sets are the candidates, the final one first.
        step: float nodes added per step back (:func:`lowbit.search_confirm.confirm_step` of the ranking).
        max_attempts: most confirmations.
        confirm: ``confirm(try, nodes) -> (attempt, within)`` evaluates the set kept at ``try`` on the confirmation
            slice; ``attempt`` is the record of it.

    Returns:
        ``{step, rule, attempts, try, k, nodes, confirmed}``: ``try``, ``k`` and ``nodes`` of the confirmed set (None
        when none was confirmed).
    """
    sets, attempts, chosen = result.kept_sets(), [], None
    target = len(result.nodes)
    while sets and len(attempts) < max_attempts:
        fitting = [(i, nodes) for i, nodes in sets if len(nodes) >= target]
        if not fitting:
            break
        i, nodes = min(fitting, key=lambda s: len(s[1]))  # the latest kept set with at least `target` float nodes
        attempt, within = confirm(i, nodes)
        attempts.append({"try": i, "k": len(nodes), **attempt, "within_budget": within})
        if within:
            chosen = (i, nodes)
            break
        target = len(nodes) + step
    return {
        "step": step,
        "rule": REVERT_RULE.format(attempts=max_attempts),
        "attempts": attempts,
        "try": chosen[0] if chosen else None,
        "k": len(chosen[1]) if chosen else None,
        "nodes": list(chosen[1]) if chosen else None,
        "confirmed": chosen is not None,
    }
