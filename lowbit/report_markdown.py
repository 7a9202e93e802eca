"""Writes the report as text: ``report.md`` (recommendation, one table row per variant, budget search, dropped
records, sources, notes) and the console summary.

Both are rendered from the report document (report.json's keys, :mod:`lowbit.report_json`), so a saved
report.json can be rendered again without the run dir.
"""

from __future__ import annotations

import math
from pathlib import Path

from lowbit.report_plots import PARETO_PLOT, SEARCH_PLOT
from lowbit.report_recommend import latency_on_axis
from lowbit.report_variant import short_provider

__all__ = ["delta_cell", "dropped_markdown", "report_markdown", "search_markdown", "settings_text", "summary_text"]

_VARIANTS_HEADER = (
    "| variant | mAP50-95 | mAP50 | ΔAP [95 % CI] | ΔAP on the confirmation slice | low-precision MACs % | "
    "ORT p50 ms | ORT p90 ms | ORT provider | TRT GPU ms median / p90 | size MB | weights MB at deployed width | "
    "Q/DQ pairs | excluded nodes | quantized nodes | quantization |"
)
_VARIANTS_ALIGN = "|---|---:|---:|---:|---|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---|"
_SEARCH_HEADER = (
    "| mode | ranking | K found | ΔAP at K | probes (K: ΔAP) | random controls at K: ΔAP mean ± sd "
    "[min, max] | ranking beats chance by | how the search ended |"
)


def _fmt(value: float | None, spec: str, missing: str = "-") -> str:
    return missing if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def settings_text(v: dict) -> str:
    """A report.json row's quantization settings in a few words (the table's "quantization" column)."""
    s = v.get("quant_settings")
    if v["role"] in ("baseline", "fp32_repeat"):
        return "-"
    if not s:
        return "unknown (no quantizer manifest)"
    text = f"{s.get('quantize_mode')} {s.get('calibration_method')}, hp {s.get('high_precision_dtype')}"
    if s.get("calibration_images") is not None:
        text += f", {s['calibration_images']} calib imgs"
    cand = v.get("candidate")
    if cand and cand.get("scheme"):
        text += f", {Path(cand['scheme']).name}"
    if v.get("derived_from_full_model") and v.get("excluded_nodes"):
        text += f"; full model with {v['excluded_nodes']} nodes' Q/DQ removed"
    return text


def _signed(x: float) -> str:
    return f"{x + 0.0:+.2f}"  # + 0.0: no "-0.00"


def delta_cell(delta: float, ci: dict | None) -> str:
    """A ΔAP with its interval: ``-0.35 [-0.57, -0.12]``; the bare ΔAP without one."""
    if not ci or ci.get("ci_low") is None:
        return f"{delta:+.2f}"
    return f"{_signed(delta)} [{_signed(ci['ci_low'])}, {_signed(ci['ci_high'])}]"


def _confirmation_cell(v: dict) -> str:
    conf = v.get("confirmation")
    if not conf:
        return "-"
    verdict = "within budget" if conf["within_budget"] else "outside budget"
    return f"{delta_cell(conf['delta_ap'], conf)} on {conf['n_images']} images ({verdict})"


def _interval_line(report: dict) -> str:
    """The line under the variants table: what the bracketed interval is."""
    block = report.get("intervals") or {}
    if block.get("status") != "computed":
        return f"No ΔAP intervals: {block.get('status', 'not computed')}."
    return (
        f"ΔAP [interval]: {block['confidence'] * 100:g} % paired bootstrap over the evaluated images "
        f"({block['n_boot']} replicates, seed {block['seed']}, {block['seconds']:.1f} s for the report); it covers "
        "which images were drawn, not annotation noise, other datasets or run-to-run variation "
        "(`docs/uncertainty.md` in the lowbit repository)."
    )


def _share_text(v: dict) -> str:
    share = v.get("mac_share")
    return "unknown" if share is None else f"{share * 100:.1f}"


def _trt_text(v: dict) -> str:
    trt = v.get("tensorrt") or {}
    if trt.get("status") != "measured":
        return "failed" if str(trt.get("status", "")).startswith("failed") else "not measured"
    gpu = trt.get("gpu_compute_ms") or {}
    return f"{_fmt(gpu.get('median'), '.3f')} / {_fmt(gpu.get('p90'), '.3f')} ({trt.get('precision')})"


def _header_lines(report: dict) -> list[str]:
    """The list of what the report is about, before the recommendation."""
    ds = report["dataset"]
    pp = ds["postprocess"]
    id_range = ds["image_id_range"]
    dropped = report.get("dropped")
    return [
        "# Low-bit variants: comparison report",
        "",
        f"- Dataset: **{ds['name']}**, {ds['num_images']} images"
        + (f" (ids {id_range[0]}..{id_range[1]})" if id_range else "")
        + f", annotations `{ds['ann_file']}` (sha256 {str(ds['ann_sha256'])[:12]})",
        (
            f"- Post-processing: {pp.get('mode')}, conf {pp.get('conf')}, max_det {pp.get('max_det')}, "
            f"imgsz {pp.get('imgsz')}"
        ),
        (
            f"- Baseline: {report['baseline']['label']} mAP50-95 {report['baseline']['map50_95']:.4f}; "
            f"ΔAP = (mAP50-95 − baseline) × 100, AP points; budget: ΔAP ≥ −{report['budget_ap']:g} AP"
        ),
        (
            f"- Cost used for the recommendation and the Pareto plot: {report['cost_axis']['description']}; "
            "ORT latencies are listed with their provider but never rank variants (noisy, and they do not predict "
            "TensorRT)"
        ),
        f"- TensorRT: {report['tensorrt']['status']}",
        f"- Run dirs: {', '.join('`' + d + '`' for d in report['run_dirs'])}",
        f"- Records left out: {len(dropped or [])}" + (" (see Dropped)" if dropped else ""),
    ]


def _variant_row(v: dict, recommended: str) -> str:
    name = f"**{v['label']}** (recommended)" if v["label"] == recommended else v["label"]
    lat = v["latency_ms"]
    size = _fmt(v["model_bytes"] / 1e6 if v["model_bytes"] else None, ".2f", "unknown")
    weights = _fmt(v["weight_bytes"] / 1e6 if v.get("weight_bytes") else None, ".2f", "unknown")
    return (
        f"| {name} | {v['map50_95']:.4f} | {v['map50']:.4f} | {delta_cell(v['delta_ap'], v.get('delta_ap_ci'))} | "
        f"{_confirmation_cell(v)} | {_share_text(v)} | {_fmt(lat.get('p50'), '.2f')} | "
        f"{_fmt(lat.get('p90'), '.2f')} | {short_provider(v['provider'])} | {_trt_text(v)} | {size} | {weights} | "
        f"{_fmt(v['qdq_pairs'], 'd')} | {_fmt(v['excluded_nodes'], 'd', 'unknown')} | "
        f"{_fmt(v['num_quantized_nodes'], 'd', 'unknown')} | {settings_text(v)} |"
    )


def _sources_lines(variants: list[dict]) -> list[str]:
    """The ``## Sources`` section: the files each row was read from."""
    lines = [
        "",
        "## Sources",
        "",
        "Every number above is copied from the file named here (report.json keeps them all).",
        "",
        "| variant | metrics | model | quantizer manifest or candidate record |",
        "|---|---|---|---|",
    ]
    for v in variants:
        manifest = f"`{v['model_manifest']}`" if v["model_manifest"] else "-"
        lines.append(f"| {v['label']} | `{v['metrics_path']}` | `{v['model_path']}` | " + manifest + " |")
    return lines


def report_markdown(report: dict, plot_name: str | None = PARETO_PLOT) -> str:
    """``report.md``: recommendation, one table row per variant, sources and notes."""
    rec = report["recommended"]
    lines = _header_lines(report)
    lines += ["", "## Recommendation", "", f"**{rec['variant']}** — {rec['reason']}.", ""]
    lines += [
        "## Variants",
        "",
        _VARIANTS_HEADER,
        _VARIANTS_ALIGN,
    ]
    lines += [_variant_row(v, rec["variant"]) for v in report["variants"]]
    lines += ["", _interval_line(report)]
    lines += search_markdown(report.get("search") or [])
    lines += dropped_markdown(report.get("dropped") or [])
    lines += _sources_lines(report["variants"])
    if report["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    if plot_name:
        lines += ["", f"![ΔAP vs cost and model size]({plot_name})"]
        if report.get("search"):
            lines += ["", f"![ΔAP vs K per mode]({SEARCH_PLOT})"]
    return "\n".join(lines) + "\n"


def search_markdown(searches: list[dict]) -> list[str]:
    """The ``## Budget search`` section of report.md (empty when there was no search)."""
    if not searches:
        return []
    intro = (
        "Per mode, the smallest K (most sensitive nodes left in float) whose evaluated candidate is within "
        "the budget (with its confidence margin where the search measured one); every probe is an evaluation on "
        f"the slice above. Curves: `{SEARCH_PLOT}`."
    )
    lines = ["", "## Budget search", "", intro, "", _SEARCH_HEADER, "|---|---|---:|---:|---|---|---:|---|"]
    for s in searches:
        probes = ", ".join(f"{p['k']}: {p['delta_ap']:+.2f}" for p in s["probes"])
        rc = s["random_control"]
        control = margin = "-"
        if rc:
            control = (
                f"{-rc['mean_delta']:+.2f} ± {rc['sd_delta']:.2f} [{-rc['max_delta']:+.2f}, "
                f"{-rc['min_delta']:+.2f}] ({len(rc['seeds'])} seeds)"
            )
            margin = f"{rc['margin_ap']:+.2f} AP ({'yes' if rc['beats_chance'] else 'no'})"
        k = f"{s['k']}" if s["found"] else f"none ({s['k']} best)"
        lines.append(
            f"| {s['mode'].upper()} | {s['ranking']['method']} | {k} | {s['delta_ap']:+.2f} | {probes} | "
            f"{control} | {margin} | {s['reason']} |"
        )
    for s in searches:
        lines += _confirmation_lines(s)
        lines += _revert_lines(s)
    return lines


def _revert_lines(s: dict) -> list[str]:
    """The revert pass of one search (empty when it ran none): what it put back, and its sets on new images."""
    r = s.get("revert")
    if not r:
        return []
    text = (
        f"**{s['mode'].upper()} revert pass**: from the pick's {r['start_k']} float nodes, {r['tries']} tried back in "
        f"low precision (least sensitive first), {r['gained']} kept there: {r['k']} left in float"
    )
    if r["search_delta_ap"] is not None:
        text += f", ΔAP {r['search_delta_ap']:+.2f} on the search slice"
    lines = ["", text + "."]
    c = r["confirmation"]
    if c and c["attempts"]:
        lines[-1] += f" Confirmation: {c['rule']}."
        lines += ["", "| K | ΔAP on the confirmation slice [95 % CI] | within budget | model |", "|---:|---|:---:|---|"]
        for a in c["attempts"]:
            ok = "yes" if a["within_budget"] else "no"
            lines.append(f"| {a['k']} | {delta_cell(a['delta_ap'], a)} | {ok} | `{a['model_path']}` |")
    if r["confirmed"]:
        lines += ["", f"Confirmed: K={r['confirmed_k']}, a row of the table above."]
    elif r["gained"]:
        lines += ["", "Not confirmed on new images: the pick stands."]
    return lines


def _confirmation_lines(s: dict) -> list[str]:
    """The confirmation attempts of one search (empty when it ran none)."""
    conf = s.get("confirmation")
    if not conf:
        return []
    lines = ["", f"**{s['mode'].upper()} confirmation** ({s['ranking']['method']} ranking): {conf['status']}."]
    if not conf["attempts"]:
        return lines
    images = conf.get("images") or {}
    lines[-1] += (
        f" {images.get('num_images', images.get('count'))} images after the first {images.get('skip')}, "
        f"FP32 AP {conf['baseline_ap']:.2f} there; rule: {conf['rule']}."
    )
    lines += ["", "| K | ΔAP on the confirmation slice [95 % CI] | within budget | interval |", "|---:|---|:---:|---|"]
    for a in conf["attempts"]:
        lines.append(
            f"| {a['k']} | {delta_cell(a['delta_ap'], a)} | {'yes' if a['within_budget'] else 'no'} | "
            f"{a['interval_source'] or '-'} |"
        )
    return lines


def dropped_markdown(dropped: list[dict]) -> list[str]:
    """The ``## Dropped`` section of report.md: every record found and left out, and why (empty when none)."""
    if not dropped:
        return []
    intro = "Found under the run dirs but not used: nothing above comes from these files."
    lines = ["", "## Dropped", "", intro, "", "| file | reason |", "|---|---|"]
    for d in dropped:
        lines.append(f"| `{d['path']}` | {' '.join(d['reason'].split()).replace('|', '/')} |")
    return lines


def summary_text(report: dict, out_dir: Path) -> str:
    """The console summary: one line per variant (the recommended one starred), the pick and what was left out."""
    axis = report["latency_axis"]
    ds = report["dataset"]
    rows = [
        f"report: {out_dir / 'report.md'} (+ report.json, pareto.png)",
        (
            f"{ds['name']}: {ds['num_images']} images; latency: {axis['description']}; "
            f"TensorRT: {report['tensorrt']['status']}"
        ),
        f"  {'variant':<44} {'mAP50-95':>8} {'ΔAP':>7} {'p50 ms':>9} {'size MB':>8}",
    ]
    for v in report["variants"]:
        lat = latency_on_axis(axis["source"], v.get("tensorrt"), v.get("latency_ms"))
        size = f"{v['model_bytes'] / 1e6:.2f}" if v["model_bytes"] else "unknown"
        mark = " *" if v["label"] == report["recommended"]["variant"] else ""
        rows.append(
            f"  {(v['label'] + mark)[:44]:<44} {v['map50_95']:>8.4f} {v['delta_ap']:>+7.2f} "
            f"{('-' if lat is None else f'{lat:.2f}'):>9} {size:>8}"
        )
    rows.append(f"recommended (*): {report['recommended']['variant']} — {report['recommended']['reason']}")
    if report["dropped"]:
        rows.append(
            f"left out ({len(report['dropped'])}, see report.md 'Dropped'): "
            + ", ".join(d["path"] for d in report["dropped"])
        )
    return "\n".join(rows)
