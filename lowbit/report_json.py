"""Assembles report.json's document from the collected rows, the TensorRT timings and the recommendation.

``report.json`` keys (``schema_version``: ``lowbit.records.SCHEMA_VERSIONS["report"]``, ``kind``: "report"):

* ``run_dirs``: the run dirs read; ``created_at``
* ``dataset``: ``name``, ``images_dir``, ``ann_file``, ``ann_sha256``, ``num_images``, ``image_id_range``
  [first, last], ``postprocess`` {mode, conf, iou, max_det, imgsz}
* ``budget_ap``: largest accepted mAP50-95 loss, AP points (×100); ``latency_tie_pct``
* ``baseline``: ``label``, ``map50_95``, ``map50``, ``metrics_path``, ``model_sha256``
* ``variants``: one dict per evaluation (:meth:`lowbit.report_variant.Variant.to_dict`), baseline first; keys:
  ``label``, ``role`` ("baseline" | "fp32_repeat" | "quantized" | "random_control"), ``quant_mode``
  ("fp32" | "int8" | "fp8" | ...), ``map50_95``, ``map50`` (0..1, copied from metrics.json),
  ``delta_ap`` / ``delta_ap50`` ((variant − baseline) × 100, AP points), ``latency_ms`` {p50, p90,
  mean, n} (ORT ``session.run`` wall time, copied), ``provider`` (first of ``providers_used``),
  ``providers_used``, ``tensorrt`` (see :func:`lowbit.trt.benchmark_engine`; ``status`` always set),
  ``model_path``, ``model_file`` (resolved path or null), ``model_sha256``, ``source_model_sha256`` (the
  float model it was quantized from, per its quantizer manifest; null when unknown), ``model_bytes`` (null when
  the file is gone or no longer the evaluated one), ``qdq_pairs``, ``quant_dtypes``,
  ``excluded_nodes`` (count; null when unknown), ``excluded_node_names``, ``num_quantized_nodes``,
  ``quant_settings`` (the quantizer's ``extra.settings``), ``candidate`` {k, random_seed,
  ranking_source, scheme} or null, ``metrics_path``, ``model_manifest`` (the quantizer manifest or the
  candidate record read; null when none), ``derived_from_full_model`` (a search candidate cut from the full
  Q/DQ model), ``run_dir``, ``notes`` [str], ``mac_share`` (low-precision share of Conv/MatMul/Gemm MACs,
  0..1; null when unknown), ``low_precision_macs``, ``total_macs``
* ``recommended``: ``cost_source`` ("tensorrt" | "mac_share" | null), ``mac_share``, ``variant`` (label),
  ``metrics_path``, ``reason``, ``latency_source`` ("tensorrt" | "onnxruntime" | null), ``latency_provider``,
  ``latency_ms``, ``within_budget`` [labels], ``not_eligible`` {label: reason} (:class:`lowbit.report_recommend.Recommendation`)
* ``latency_axis``: the latency on the plot's x axis (``source``, ``description``); the recommendation names its own
  in ``recommended.latency_source``
* ``cost_axis``: what ranks the variants within budget and is the Pareto plot's x (``source`` "tensorrt" |
  "mac_share", ``description``)
* ``tensorrt``: ``status`` ("measured" | "not measured: TensorRT not installed" | "not measured: ..."),
  ``trtexec``, ``tensorrt_python``, ``qdq_mode``
* ``intervals``: how every ``delta_ap_ci`` was computed (:func:`lowbit.report_intervals.compute_intervals`):
  ``n_boot``, ``confidence``, ``seed``, ``seconds`` (the cost of the interval stage), ``computed``, ``cached`` (of
  them, read from the run dir's interval cache, :mod:`lowbit.interval_cache`), ``method``, ``status``; each variant's ``delta_ap_ci`` {ci_low, ci_high, std_error, n_boot, confidence, seed, n_images}
  (AP points, variant − FP32) or null with a note why; ``weight_bytes`` its initializers at their deployed width
* ``confirmation``: one entry per budget search that ran a confirmation on new images: ``mode``, ``search``,
  ``status`` ("confirmed" | "not confirmed" | "dropped: <reason>"), ``k``, ``pick``, ``images``,
  ``baseline_metrics``, ``baseline_ap``, ``rule``, ``attempts`` [{k, name, metrics_path, ap, delta_ap (variant −
  FP32), ci_low, ci_high, std_error, n_images, within_budget, interval_source}]; the pick's row carries its
  attempt as ``confirmation`` {delta_ap, ci_low, ci_high, std_error, n_images, within_budget, k, interval_source}
* ``search``: one entry per budget search used (:func:`search_summary`), with its revert pass, when it ran one, in
  ``revert`` {start_k, k, gained, tries, nodes, reverted, search_delta_ap, search_std_error, confirmation {step, rule,
  attempts [{k, try, delta_ap, ci_low, ci_high, std_error, n_images, within_budget, model_path, metrics_path}], k,
  confirmed}, confirmed, confirmed_k, confirmed_nodes, metrics_path, confirmed_search_delta_ap}
* ``dropped``: [{``path``, ``reason``}]: every record found and left out (a variant's metrics, a search.json)
* ``provenance``: what the report was computed from, by content: ``model_sha256`` (the FP32 model),
  ``ann_sha256``, ``image_ids_sha256``, ``num_images``, ``records`` {path: sha256} of every record used
  (metrics, quantizer manifests and candidate records, search.json)
* ``notes``: [str]
"""

from __future__ import annotations

import datetime as _dt
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

from lowbit import records
from lowbit.report_collect import Collected, UsedSearch
from lowbit.report_costs import TensorrtTimings, add_mac_share, add_weight_bytes, with_tensorrt
from lowbit.report_intervals import IntervalResult, ci_dict
from lowbit.report_recommend import (
    DEFAULT_BUDGET_AP,
    DEFAULT_LATENCY_TIE_PCT,
    LatencyAxis,
    cost_axis,
    latency_axis,
    recommend,
    sessions_text,
)
from lowbit.report_variant import Variant, short_provider

__all__ = ["KIND", "SCHEMA_VERSION", "build_report", "search_summary"]

KIND = "report"  # report.json's "kind"
SCHEMA_VERSION = records.SCHEMA_VERSIONS[KIND]
# search.json's random_control and random_band keys that report.json's "search" entries copy, in this order
_CONTROL_KEYS = (
    "k",
    "seeds",
    "aps",
    "mean_delta",
    "sd_delta",
    "min_delta",
    "max_delta",
    "ranking_delta",
    "margin_ap",
    "beats_chance",
)
_BAND_KEYS = ("k", "mean_delta", "sd_delta", "min_delta", "max_delta")


def build_report(
    collected: Collected,
    budget_ap: float = DEFAULT_BUDGET_AP,
    latency_tie_pct: float = DEFAULT_LATENCY_TIE_PCT,
    tensorrt: TensorrtTimings | None = None,
    intervals: IntervalResult | None = None,
) -> dict[str, Any]:
    """The report document (keys in the module docstring) from :func:`lowbit.report_collect.collect_variants`' output.

    Fills each row's ``tensorrt`` (:func:`lowbit.report_costs.with_tensorrt`) and ``mac_share``
    (:func:`lowbit.report_costs.add_mac_share`, which reads the model files), then recommends.

    Args:
        collected: output of :func:`lowbit.report_collect.collect_variants`.
        budget_ap: accepted mAP50-95 loss, AP points (finite, > 0).
        latency_tie_pct: see :func:`lowbit.report_recommend.recommend`.
        tensorrt: :func:`lowbit.report_costs.measure_tensorrt`'s result; None means TensorRT was not looked for
            (status "not measured: TensorRT not installed").
        intervals: :func:`lowbit.report_intervals.compute_intervals`' result; None: no intervals were computed.
    """
    if not (math.isfinite(budget_ap) and budget_ap > 0):
        raise ValueError(f"budget_ap must be a finite number > 0, got {budget_ap}")
    variants, tensorrt_section = with_tensorrt(collected.variants, tensorrt)
    variants = add_weight_bytes(add_mac_share(variants))
    intervals = intervals or IntervalResult(block={"n_boot": 0, "status": "not computed", "seconds": 0.0})
    variants, interval_notes = _with_intervals(variants, intervals)
    confirmations, variants, not_eligible = _confirmations(collected.searches, variants, intervals)
    baseline = next(v for v in variants if v.role == "baseline")
    recommended = recommend(variants, budget_ap, latency_tie_pct, not_eligible)
    axis = latency_axis(variants)
    notes = list(collected.notes) + interval_notes + _report_notes(variants, baseline, axis, tensorrt_section)
    ci_at = {v.metrics_path: v.delta_ap_ci for v in variants}
    return {
        **records.header(KIND),
        "created_at": _dt.datetime.now().isoformat(timespec="seconds"),
        "run_dirs": collected.run_dirs,
        "dataset": collected.dataset,
        "budget_ap": budget_ap,
        "latency_tie_pct": latency_tie_pct,
        "baseline": {
            "label": baseline.label,
            "map50_95": baseline.map50_95,
            "map50": baseline.map50,
            "metrics_path": baseline.metrics_path,
            "model_sha256": baseline.model_sha256,
        },
        "variants": [v.to_dict() for v in variants],
        "recommended": recommended.to_dict(),
        "latency_axis": axis.to_dict(),
        "cost_axis": cost_axis(axis),
        "tensorrt": tensorrt_section,
        "intervals": intervals.block,
        "confirmation": confirmations,
        "search": [
            search_summary(
                {**s.data, "path": s.path},
                {k: ci_at.get(path) for k, path in s.by_k.items()},
                next((c for c in confirmations if c["search"] == s.path), None),
                s.revert,
            )
            for s in collected.searches
        ],
        "dropped": list(collected.dropped),
        "provenance": collected.provenance,
        "notes": notes,
    }


def _with_intervals(variants: list[Variant], intervals: IntervalResult) -> tuple[list[Variant], list[str]]:
    """Each row with its ``delta_ap_ci`` (a note why where there is none), and the report's notes on intervals."""
    uniform = intervals.block.get("status") != "computed"
    notes = list(intervals.notes)
    if uniform:
        notes.append(f"no ΔAP intervals: {intervals.block.get('status')}")
    out = []
    for v in variants:
        ci = intervals.ci(v)
        if ci is None and v.role != "baseline" and not uniform:
            v = v.with_note(f"no ΔAP interval: {intervals.reasons.get(v.metrics_path, 'not computed')}")
        out.append(replace(v, delta_ap_ci=ci))
    return out, notes


def _attempt(a, intervals: IntervalResult) -> dict[str, Any]:
    """One confirmation attempt as report.json writes it: the report's own interval, else the search's."""
    paired = intervals.paired.get(a.evaluation.metrics_path)
    if paired is not None:
        ci, source = ci_dict(paired), "report"
    else:
        ci = dict(a.recorded or {})
        why = intervals.reasons.get(a.evaluation.metrics_path, "not computed")
        source = f"search.json (not recomputed: {why})" if a.recorded else None
    return {
        "k": a.k,
        "name": a.name,
        "metrics_path": a.evaluation.metrics_path,
        "ap": a.ap,
        "delta_ap": a.delta_ap,
        "ci_low": ci.get("ci_low"),
        "ci_high": ci.get("ci_high"),
        "std_error": ci.get("std_error"),
        "n_images": ci.get("n_images") or len(a.evaluation.source.dataset.get("image_ids") or []),
        "within_budget": a.within_budget,
        "interval_source": source,
    }


# a row's ``confirmation``: the attempt on the confirmation slice that confirmed it
_ROW_CONFIRMATION_KEYS = ("delta_ap", "ci_low", "ci_high", "std_error", "n_images", "within_budget", "k")


def _confirmations(
    searches: tuple[UsedSearch, ...], variants: list[Variant], intervals: IntervalResult
) -> tuple[list[dict], list[Variant], dict[str, str]]:
    """report.json's ``confirmation`` entries, the rows with the pick's ``confirmation``, and the search candidates
    that may not be recommended (label -> why): when a search ran a confirmation, all of its candidates but the
    confirmed pick."""
    by_path = {v.metrics_path: v for v in variants}
    entries, pick_conf, not_eligible = [], {}, {}
    for s in searches:
        if not s.ran_confirmation:
            continue
        pick_path = s.by_k.get(s.pick_k) if s.pick_k is not None else None
        pick = by_path.get(pick_path) if pick_path else None
        c = s.confirmation
        attempts = [_attempt(a, intervals) for a in c.attempts] if c else []
        status = ("confirmed" if c.confirmed else "not confirmed") if c else f"dropped: {s.confirmation_problem}"
        entries.append(
            {
                "mode": s.data["mode"],
                "search": s.path,
                "status": status,
                "k": c.k if c else None,
                "pick": pick.label if pick else None,
                "images": c.images if c else None,
                "baseline_metrics": c.baseline.metrics_path if c else None,
                "baseline_ap": c.baseline_ap if c else None,
                "rule": c.rule if c else None,
                "attempts": attempts,
            }
        )
        if pick is not None:
            mine = next((a for a in attempts if a["k"] == s.pick_k), None)
            if mine:
                pick_conf[pick.metrics_path] = {key: mine[key] for key in _ROW_CONFIRMATION_KEYS} | {
                    "interval_source": mine["interval_source"]
                }
        row = s.revert_row  # the confirmed revert pass's final set: its confirmation is the pass's own
        if row is not None:
            rc = s.revert["confirmation"]["attempts"][-1]
            pick_conf[row.metrics_path] = {key: rc[key] for key in _ROW_CONFIRMATION_KEYS} | {
                "interval_source": "search.json (the revert pass's; its files checked by sha256)"
            }
        confirmed_pick = pick.metrics_path if (pick is not None and c and c.confirmed) else None
        why = (
            "its budget search's confirmation was dropped"
            if c is None
            else "a budget-search candidate other than the pick confirmed on new images"
            if c.confirmed
            else "its budget search's pick was not confirmed on new images"
        )
        for v in variants:
            cited = v.source is not None and Path(v.source.metrics_file).resolve() in s.cited
            if cited and v.role == "quantized" and v.source.derived and v.metrics_path != confirmed_pick:
                not_eligible[v.label] = why
    out = [replace(v, confirmation=pick_conf.get(v.metrics_path)) for v in variants]
    return entries, out, not_eligible


def search_summary(
    data: dict,
    ci_by_k: dict[int, dict | None] | None = None,
    confirmation: dict | None = None,
    revert: dict | None = None,
) -> dict:
    """The report's record of one ``search.json``: K found, reason, every probe (ΔAP = AP − FP32 AP, with its paired
    standard error and margin when the search measured them, and the report's interval ``ci_low``/``ci_high`` when
    ``ci_by_k`` has one; the confirmation's own search-slice points included), the pick, controls, (``confirmation``: report.json's entry) the
    confirmation attempts and (``revert``: :func:`lowbit.report_revert.revert_summary`) the checked revert pass."""
    ci_by_k = ci_by_k or {}
    s = data["search"]
    rc = data.get("random_control")
    control = None
    if rc:
        control = {key: rc[key] for key in _CONTROL_KEYS}
    ranking = data.get("ranking") or {}
    # the curve, and the Ks the confirmation evaluated on the search slice after it (checked like the curve)
    points = list(s["curve"]) + list((data.get("confirmation") or {}).get("search_points") or [])
    return {
        "mode": data["mode"],
        "path": data.get("path"),
        "ranking": {"method": ranking.get("method"), "source": ranking.get("source"), "report": ranking.get("report")},
        "budget_ap": data["budget_ap"],
        "baseline_ap": data["baseline_ap"],
        "build": data.get("build"),
        "k": s["k"],
        "found": s["found"],
        "delta_ap": 0.0 - s["delta"] + 0.0,  # + 0.0: no "-0.00" for a zero loss
        "reason": s["reason"],
        "ks_max": s["ks_max"],
        "order": s["order"],
        "pick_k": data.get("pick_k", s["k"] if s["found"] else None),
        "confidence": data.get("confidence"),
        "probes": [_probe(p, ci_by_k.get(int(p["k"]))) for p in sorted(points, key=lambda p: p["k"])],
        "confirmation": confirmation,
        "random_control": control,
        "random_band": [{key: b[key] for key in _BAND_KEYS} for b in data.get("random_band") or []],
        "revert": revert,
    }


def _probe(p: dict, ci: dict | None) -> dict:
    """One probe of a search summary: ΔAP = AP − FP32 AP, the search's SE and margin, the report's interval."""
    return {
        "k": p["k"],
        "ap": p["map"],
        "delta_ap": 0.0 - p["delta"] + 0.0,
        "meets": p["meets"],
        "std_error": p.get("std_error"),
        "margin": p.get("margin"),
        "ci_low": ci["ci_low"] if ci else None,
        "ci_high": ci["ci_high"] if ci else None,
    }


def _tensorrt_notes(variants: list[Variant]) -> list[str]:
    """Notes on measured TensorRT engines: the missing ones, FP32 layers in strongly typed engines, accuracy."""
    notes = []
    failed = [f"{v.label} ({v.tensorrt['status']})" for v in variants if v.tensorrt["status"] != "measured"]
    if failed:
        notes.append("TensorRT latency missing for " + "; ".join(failed))
    strongly = [
        v.label
        for v in variants
        if v.tensorrt.get("precision") == "stronglyTyped"
        and (v.quant_settings or {}).get("high_precision_dtype") == "fp32"
    ]
    if strongly:
        notes.append(
            "strongly typed engines of " + ", ".join(strongly) + " keep their non-quantized layers in FP32 "
            "(high_precision_dtype fp32) while the float model is built in FP16; --trt-qdq-mode mixed lets "
            "TensorRT use FP16 there too"
        )
    notes.append(
        "TensorRT engines were timed with trtexec on random inputs; their accuracy was not measured "
        "(mAP comes from ONNX Runtime)"
    )
    return notes


def _report_notes(variants: list[Variant], baseline: Variant, axis: LatencyAxis, tensorrt: dict) -> list[str]:
    """The report's notes on its rows (providers, TensorRT, model size, random controls), then each row's own."""
    notes = []
    by_provider: dict[str, list[str]] = {}
    for v in variants:
        by_provider.setdefault(short_provider(v.provider), []).append(v.label)
    if len(by_provider) > 1:
        notes.append(
            "ONNX Runtime latencies were measured on different providers: "
            + "; ".join(f"{p}: {', '.join(labels)}" for p, labels in by_provider.items())
        )
    if tensorrt["status"] == "measured":
        notes += _tensorrt_notes(variants)
    side_by_side = sessions_text(variants)
    if side_by_side:
        notes.append(f"ONNX Runtime latencies (ORT p50/p90): {side_by_side}")
    if axis.source == "onnxruntime" and any(v.provider == "CPUExecutionProvider" for v in variants):
        notes.append(
            "CPU-EP latency of Q/DQ models does not predict TensorRT speed: ONNX Runtime's CPU kernels "
            "run quantized graphs differently from TensorRT's INT8/FP8 kernels"
        )
    base_bytes = baseline.model_bytes
    similar = [
        v.label
        for v in variants
        if v.role in ("quantized", "random_control")
        and base_bytes
        and v.model_bytes
        and v.model_bytes >= 0.9 * base_bytes
    ]
    if similar:
        notes.append(
            "model size is the ONNX file size; the Q/DQ files of " + ", ".join(similar) + " are about as large "
            "as FP32 because they keep float weights beside their Q/DQ scales (TensorRT stores the weights in "
            "low precision when it builds the engine)"
        )
    if any(v.role == "random_control" for v in variants):
        notes.append(
            "random controls (K nodes excluded at random) are shown to judge the ranking and are never recommended"
        )
    for v in variants:
        for note in v.notes:
            notes.append(f"{v.label}: {note}")
    return notes
