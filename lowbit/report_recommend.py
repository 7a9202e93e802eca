"""The recommendation policy: which variant to ship within an accuracy budget, the latency every variant is compared
on, and the Pareto front; pure functions over :class:`~lowbit.report_variant.Variant` rows.

The rule (:func:`recommend`): among quantized variants (random controls excluded) that lose at most ``budget_ap``
AP points (mAP50-95 x 100) against FP32, the fastest TensorRT GPU compute time when TensorRT was measured (latencies
within ``latency_tie_pct`` % are timing noise: ties go to the more accurate variant; FP32 when the pick is not
faster than FP32); without TensorRT, the largest share of Conv/MatMul MACs in low precision, then the more accurate.
ONNX Runtime latencies are listed with their provider but never rank variants. FP32 when none is within budget.

Eligibility (``not_eligible``): when a mode's budget search ran a confirmation on new images, only its confirmed pick
is eligible among that search's candidates (probes at other K were never confirmed); an unconfirmed pick is not.
A revert pass's final set (:mod:`lowbit.report_revert`) is a row only when it was confirmed the same way.
FP32, the full quantized models (K=0) and fixed-K candidates keep the rule above. The reason names the pick's ΔAP
with its paired bootstrap interval, and its loss on the confirmation slice when it was confirmed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from lowbit.report_variant import Variant, short_provider

__all__ = [
    "DEFAULT_BUDGET_AP",
    "DEFAULT_LATENCY_TIE_PCT",
    "LatencyAxis",
    "Recommendation",
    "cost_axis",
    "delta_text",
    "latency_axis",
    "latency_on_axis",
    "pareto_front",
    "recommend",
    "sessions_text",
    "variant_latency",
]

DEFAULT_BUDGET_AP = 0.5  # AP points (mAP50-95 x 100) a quantized variant may lose against FP32
# TensorRT latencies this close (%) to the fastest count as a tie, broken by accuracy: trtexec medians of one
# engine rebuilt and re-timed differ by about 1-3 %, so smaller differences are timing noise.
DEFAULT_LATENCY_TIE_PCT = 3.0
_EPS = 1e-9  # float slack for the budget comparison


@dataclass(frozen=True)
class LatencyAxis:
    """The one latency every variant is compared on: TensorRT GPU compute time, or ONNX Runtime p50."""

    source: str  # "tensorrt" | "onnxruntime"
    description: str
    providers: tuple[str, ...] = ()  # the ORT providers timed (onnxruntime only)

    def to_dict(self) -> dict[str, str]:
        """report.json's ``latency_axis``: ``{source, description}``."""
        return {"source": self.source, "description": self.description}


@dataclass(frozen=True)
class Recommendation:
    """The variant to ship and why; the field order is report.json's ``recommended`` key order."""

    cost_source: str | None  # what ranked the variants within budget: "tensorrt" | "mac_share" | None
    mac_share: float | None  # the pick's low-precision MAC share, 0..1
    variant: str  # the pick's label
    metrics_path: str
    reason: str
    latency_source: str | None = None  # "tensorrt" | "onnxruntime" | None: the latency the pick was ranked on
    latency_provider: str | None = None
    latency_ms: float | None = None
    within_budget: tuple[str, ...] = ()  # labels of the eligible quantized variants within budget
    not_eligible: dict[str, str] = field(default_factory=dict)  # label -> why it may not be recommended

    def to_dict(self) -> dict[str, Any]:
        """report.json's ``recommended``."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}


def latency_on_axis(source: str, tensorrt: dict | None, latency_ms: dict | None, key: str = "p50") -> float | None:
    """A latency on the axis ``source``, ms: the TensorRT median/p90 (None unless measured) or ORT p50/p90.

    Takes the row's ``tensorrt`` and ``latency_ms`` so that a report.json row is read the same way as a
    :class:`~lowbit.report_variant.Variant`.
    """
    if source == "tensorrt":
        trt = tensorrt or {}
        if trt.get("status") != "measured":
            return None
        return (trt.get("gpu_compute_ms") or {}).get("median" if key == "p50" else key)
    return (latency_ms or {}).get(key)


def variant_latency(v: Variant, axis: LatencyAxis, key: str = "p50") -> float | None:
    """Latency of ``v`` on ``axis``: TensorRT median/p90 or ORT p50/p90, ms."""
    return latency_on_axis(axis.source, v.tensorrt, v.latency_ms, key)


def latency_axis(variants: Sequence[Variant]) -> LatencyAxis:
    """The one latency every variant is compared on: TensorRT GPU compute time when measured for all, else ORT p50."""
    if variants and all(latency_on_axis("tensorrt", v.tensorrt, None) is not None for v in variants):
        return LatencyAxis("tensorrt", "TensorRT GPU compute time (trtexec median)")
    providers = sorted({v.provider for v in variants if v.provider})
    described = ", ".join(short_provider(p) for p in providers) or "unknown provider"
    side_by_side = sessions_text(variants)
    if side_by_side:
        described += f"; {side_by_side}"
    return LatencyAxis("onnxruntime", f"ONNX Runtime session.run p50 ({described})", tuple(providers))


def sessions_text(variants: Sequence[Variant]) -> str | None:
    """How the ORT latencies were timed when sessions ran side by side (``latency_ms.sessions``, ``--sessions``;
    two on the CPU EP by default, lowbit.evaluate_prepare.auto_sessions); None when every one ran alone."""
    sessions = sorted({int((v.latency_ms or {}).get("sessions") or 1) for v in variants})  # older records: 1
    if sessions == [1]:
        return None
    if len(sessions) == 1:
        return f"each run timed beside {sessions[0] - 1} other session(s) of the model"
    return f"timed with {' and '.join(map(str, sessions))} sessions side by side: not comparable across rows"


def cost_axis(axis: LatencyAxis) -> dict[str, str]:
    """What ranks the variants within budget and is the Pareto plot's x: TensorRT latency, else the MAC share."""
    if axis.source == "tensorrt":
        return {"source": "tensorrt", "description": axis.description}
    return {
        "source": "mac_share",
        "description": "share of Conv/MatMul/Gemm MACs left in float, % (lower is faster "
        "under TensorRT; from the graph, lowbit.mac_share)",
    }


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not beaten in both x (lower is better) and y (higher is better), sorted by x."""
    front, best_y = [], -float("inf")
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best_y:
            front.append((x, y))
            best_y = y
    return front


def _signed(x: float) -> str:
    return f"{x + 0.0:+.2f}"  # + 0.0: no "-0.00"


def delta_text(v: Variant) -> str:
    """``v``'s ΔAP in words: "ΔAP -0.31 [-0.50, -0.12]", with "on the search slice, ... on N confirmation images"
    when it was confirmed on new images; the bare ΔAP when it has no interval."""
    ci = v.delta_ap_ci
    text = f"ΔAP {_signed(v.delta_ap)}"
    if ci:
        text += f" [{_signed(ci['ci_low'])}, {_signed(ci['ci_high'])}]"
    conf = v.confirmation
    if conf:
        bounds = ""
        if conf.get("ci_low") is not None:
            bounds = f" [{_signed(conf['ci_low'])}, {_signed(conf['ci_high'])}]"
        text += f" on the search slice, {_signed(conf['delta_ap'])}{bounds} on {conf['n_images']} confirmation images"
    elif ci:
        text += f" ({ci['confidence'] * 100:g} % paired bootstrap over {ci['n_images']} images)"
    return text


def _recommendation(
    pick: Variant,
    reason: str,
    axis: LatencyAxis | None = None,
    within: list[Variant] | None = None,
    cost_source: str | None = None,
    not_eligible: Mapping[str, str] | None = None,
) -> Recommendation:
    """The recommendation of ``pick``."""
    provider = None
    if axis is not None:
        provider = "TensorRT (trtexec GPU compute time)" if axis.source == "tensorrt" else pick.provider
    return Recommendation(
        cost_source=cost_source,
        mac_share=pick.mac_share,
        variant=pick.label,
        metrics_path=pick.metrics_path,
        reason=reason,
        latency_source=axis.source if axis else None,
        latency_provider=provider,
        latency_ms=variant_latency(pick, axis) if axis else None,
        within_budget=tuple(v.label for v in (within or [])),
        not_eligible=dict(not_eligible or {}),
    )


def _fastest_within(
    within: list[Variant], timed: list[Variant], axis: LatencyAxis, budget_ap: float, latency_tie_pct: float
) -> tuple[Variant, list[str]]:
    """The fastest timed variant (ties within ``latency_tie_pct`` % go to the most accurate) and the reason text."""
    fastest = min(variant_latency(v, axis) for v in timed)
    tied = [v for v in timed if variant_latency(v, axis) <= fastest * (1.0 + latency_tie_pct / 100.0)]
    pick = min(tied, key=lambda v: (-v.map50_95, variant_latency(v, axis), v.label))
    where = "TensorRT GPU compute time" if axis.source == "tensorrt" else f"{short_provider(pick.provider)} p50"
    parts = [
        (
            f"{pick.label} is the fastest of the {len(within)} quantized variant(s) within the {budget_ap:g} AP "
            f"budget ({variant_latency(pick, axis):.2f} ms {where}, {delta_text(pick)})"
        )
    ]
    others = [v.label for v in tied if v is not pick]
    if others:
        parts.append(
            f"{', '.join(others)} ran within {latency_tie_pct:g}% of the fastest and {pick.label} is the most "
            "accurate of them"
        )
    return pick, parts


def _by_mac_share(within: list[Variant], budget_ap: float) -> tuple[Variant, str]:
    """Most MACs in low precision first, then the most accurate; never ORT latency."""

    def key(v: Variant) -> tuple:
        share = v.mac_share
        return (-(share if share is not None else -1.0), -v.map50_95, v.label)

    ranked = sorted(within, key=key)
    pick = ranked[0]
    share = pick.mac_share
    share_text = "unknown" if share is None else f"{share * 100:.1f}%"
    reason = (
        f"{pick.label} runs the largest share of its Conv/MatMul MACs in low precision ({share_text}) of the "
        f"{len(within)} quantized variant(s) within the {budget_ap:g} AP budget ({delta_text(pick)}); "
        "equal shares go to the more accurate. TensorRT was not measured, so variants are ranked by "
        "low-precision MAC share, which predicts TensorRT speed, not by ONNX Runtime latency, which does not"
    )
    return pick, reason


def _eligibility_text(not_eligible: Mapping[str, str], within_labels: set[str]) -> str:
    """Why the budget-meeting variants left out were left out (empty when none was)."""
    left = {label: why for label, why in not_eligible.items() if label in within_labels}
    if not left:
        return ""
    by_reason: dict[str, list[str]] = {}
    for label, why in left.items():
        by_reason.setdefault(why, []).append(label)
    return "; not eligible although within the budget: " + "; ".join(
        f"{', '.join(labels)} ({why})" for why, labels in by_reason.items()
    )


def recommend(
    variants: Sequence[Variant],
    budget_ap: float = DEFAULT_BUDGET_AP,
    latency_tie_pct: float = DEFAULT_LATENCY_TIE_PCT,
    not_eligible: Mapping[str, str] | None = None,
) -> Recommendation:
    """Pick the variant to ship; ORT latencies never decide (they are noisy and do not predict TensorRT).

    Rule: among quantized variants (random controls excluded) with ``delta_ap >= -budget_ap``:

    * TensorRT measured for them and the baseline: the fastest TensorRT GPU compute time; latencies
      within ``latency_tie_pct`` % of the fastest are ties (timing noise) and the most accurate of them
      wins; FP32 when the pick is not faster than FP32;
    * otherwise: the largest low-precision MAC share (``mac_share``), then the most accurate.

    FP32 is recommended when no quantized variant is within budget. ``not_eligible`` (label -> reason): variants
    that may not be recommended whatever their ΔAP (a budget search's candidates its confirmation did not confirm).
    """
    not_eligible = dict(not_eligible or {})
    baseline = next(v for v in variants if v.role == "baseline")
    quantized = [v for v in variants if v.role == "quantized"]
    if not quantized:
        return _recommendation(baseline, f"{baseline.label}: no quantized variant was evaluated")
    meets = [v for v in quantized if v.delta_ap >= -budget_ap - _EPS]
    within = [v for v in meets if v.label not in not_eligible]
    left_out = _eligibility_text(not_eligible, {v.label for v in meets})
    if not within:
        best = max(quantized, key=lambda v: v.delta_ap)
        reason = (
            f"no quantized variant stays within the {budget_ap:g} AP budget: the most accurate, {best.label}, "
            f"loses {-best.delta_ap:.2f} AP (mAP50-95 {best.map50_95:.4f} vs {baseline.map50_95:.4f}); "
            f"keep {baseline.label}"
        )
        if meets:
            reason = f"no eligible quantized variant stays within the {budget_ap:g} AP budget{left_out}; keep " + (
                baseline.label
            )
        return _recommendation(baseline, reason, not_eligible=not_eligible)
    axis = latency_axis(within + [baseline])
    if axis.source != "tensorrt":
        pick, reason = _by_mac_share(within, budget_ap)
        return _recommendation(pick, reason + left_out, None, within, "mac_share", not_eligible)
    pick, parts = _fastest_within(within, within, axis, budget_ap, latency_tie_pct)
    pick_ms, base_ms = variant_latency(pick, axis), variant_latency(baseline, axis)
    if base_ms is not None and pick_ms >= base_ms:
        reason = (
            f"{parts[0]}, but it is not faster than {baseline.label} ({pick_ms:.2f} vs {base_ms:.2f} ms "
            f"TensorRT GPU compute time); keep {baseline.label}"
        )
        return _recommendation(baseline, reason + left_out, axis, within, "tensorrt", not_eligible)
    if base_ms is not None:
        parts.append(f"{base_ms / pick_ms:.2f}x faster than {baseline.label} ({base_ms:.2f} ms)")
    return _recommendation(pick, "; ".join(parts) + left_out, axis, within, "tensorrt", not_eligible)
