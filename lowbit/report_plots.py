"""Draws the report's figures: ``pareto.png`` (ΔAP against the cost axis and against the weights' size at their
deployed width, budget line, Pareto front, the recommended variant starred; only FP32, the pick and the front are
labelled) and ``search-curves.png`` (ΔAP against K per mode of the budget search, each probe with its interval, the
pick starred and the confirmation attempts in another colour).

Both are drawn from the report document (report.json's keys, :mod:`lowbit.report_json`), so a saved report.json
can be drawn again without the run dir. matplotlib is imported only when a figure is drawn.
"""

from __future__ import annotations

import io

from lowbit.report_recommend import latency_on_axis, pareto_front
from lowbit.report_variant import short_provider

__all__ = ["PARETO_PLOT", "SEARCH_PLOT", "plot_pareto", "plot_search_curves"]

PARETO_PLOT = "pareto.png"
SEARCH_PLOT = "search-curves.png"


# Where a point's label may go, tried in order: (dx, dy) in points from the point and the text's alignment; the four
# diagonal neighbours first, then the same a line further up or down.
_LABEL_OFFSETS = [
    (7, 7, "left"),
    (7, -13, "left"),
    (-7, 7, "right"),
    (-7, -13, "right"),
    (7, 19, "left"),
    (7, -25, "left"),
    (-7, 19, "right"),
    (-7, -25, "right"),
]


def _place_labels(ax, items: list[tuple[float, float, str, bool]], renderer, always: tuple[str, ...] = ()) -> None:
    """Annotate points, trying a few offsets per label so that labels overlap neither each other nor the points.

    A label with no free spot is left out (the legend and the report's table still tell the point apart), except the
    recommended variant's and those named in ``always``, which are drawn at their first spot."""
    offsets = _LABEL_OFFSETS
    ax_box = ax.get_window_extent(renderer)
    point_boxes = []
    for x, y, _, _ in items:
        px, py = ax.transData.transform((x, y))
        point_boxes.append((px - 5, py - 5, px + 5, py + 5))
    placed: list[tuple[float, float, float, float]] = []

    def overlaps(a, b) -> bool:
        return not (a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1])

    # the recommended point first, then those always labelled, then left to right: they get the best spots
    for x, y, text, is_rec in sorted(items, key=lambda it: (not it[3], it[2] not in always, it[0], -it[1])):

        def annotate(dx, dy, ha, text=text, x=x, y=y, is_rec=is_rec):
            weight = "bold" if is_rec else "normal"
            return ax.annotate(
                text, (x, y), textcoords="offset points", xytext=(dx, dy), ha=ha, fontsize=8.5, fontweight=weight
            )

        best = None
        for dx, dy, ha in offsets:
            ann = annotate(dx, dy, ha)
            bb = ann.get_window_extent(renderer)
            box = (bb.x0, bb.y0, bb.x1, bb.y1)
            inside = ax_box.x0 <= box[0] and box[2] <= ax_box.x1 and ax_box.y0 <= box[1] and box[3] <= ax_box.y1
            clash = any(overlaps(box, other) for other in placed + point_boxes)
            if inside and not clash:
                best = (ann, box)
                break
            ann.remove()
        if best is None:  # nothing free
            if not (is_rec or text in always):
                continue
            ann = annotate(*offsets[0])
            bb = ann.get_window_extent(renderer)
            best = (ann, (bb.x0, bb.y0, bb.x1, bb.y1))
        placed.append(best[1])


_MARKERS = ["o", "^", "D", "v", "P", "s"]


def _point_style(v: dict, providers: list[str], per_provider: bool) -> tuple[str, str, str]:
    """``(color, marker, legend kind)`` of one variant's point."""
    if v["role"] in ("baseline", "fp32_repeat"):
        return "black", "s", "FP32"
    if v["role"] == "random_control":
        return "0.5", "x", "random control"
    if per_provider:
        marker = _MARKERS[providers.index(v["provider"] or "") % len(_MARKERS)]
        return "tab:blue", marker, f"quantized, {short_provider(v['provider'])}"
    return "tab:blue", "o", "quantized"


def _scatter_variants(ax, report: dict, xs: list[float | None], providers: list[str], per_provider: bool) -> list:
    """One point per variant with a known x, the pick starred; returns ``(x, y, label, is_pick, is_fp32, is_control)``
    items."""
    rec = report["recommended"]["variant"]
    items, seen_kinds = [], set()
    for v, x in zip(report["variants"], xs):
        if x is None:
            continue
        color, marker, kind = _point_style(v, providers, per_provider)
        ax.scatter(
            [x],
            [v["delta_ap"]],
            s=60,
            c=color,
            marker=marker,
            zorder=3,
            clip_on=False,
            label=None if kind in seen_kinds else kind,
        )
        seen_kinds.add(kind)
        if v["label"] == rec:
            ax.scatter(
                [x],
                [v["delta_ap"]],
                s=420,
                marker="*",
                facecolors="gold",
                edgecolors="darkred",
                linewidths=1.2,
                zorder=4,
                clip_on=False,
                label="recommended",
            )
        is_control = v["role"] == "random_control"
        items.append((x, v["delta_ap"], v["label"], v["label"] == rec, v["role"] == "baseline", is_control))
    return items


def _draw_panel(
    ax,
    report: dict,
    xs: list[float | None],
    xlabel: str,
    providers: list[str],
    per_provider: bool,
    y_range: tuple[float, float],
    x_range: tuple[float, float] | None = None,
) -> list:
    """One ΔAP-vs-x panel: points, Pareto front (of FP32 and the quantized variants; random controls are never
    recommended), FP32 and budget lines; returns the label items to place: FP32, the recommended variant and the
    points of the Pareto front (the rest are told apart by the legend)."""
    budget = report["budget_ap"]
    items = _scatter_variants(ax, report, xs, providers, per_provider)
    pts = [(x, y) for x, y, *_ in items]
    front = pareto_front([(x, y) for x, y, _, _, _, is_control in items if not is_control])  # never recommended
    if len(front) > 1:
        ax.step(
            [p[0] for p in front],
            [p[1] for p in front],
            where="post",
            ls=":",
            c="tab:green",
            lw=1.2,
            zorder=2,
            label="Pareto front",
        )
    if not pts:
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes, fontsize=12)
    missing = [v["label"] for v, x in zip(report["variants"], xs) if x is None]
    if missing and pts:
        ax.text(
            0.01,
            0.01,
            "not plotted (unknown): " + ", ".join(missing),
            transform=ax.transAxes,
            fontsize=7.5,
            color="0.35",
            va="bottom",
        )
    ax.axhline(0.0, c="0.4", lw=1, label=f"{report['baseline']['label']} (ΔAP 0)")
    ax.axhline(-budget, c="tab:red", ls="--", lw=1.2, label=f"budget −{budget:g} AP")
    ax.axhspan(y_range[0], -budget, color="tab:red", alpha=0.06)
    ax.set_ylim(*y_range)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("ΔAP vs FP32 (mAP50-95 points)")
    ax.grid(alpha=0.3)
    if x_range is not None:
        ax.set_xlim(*x_range)
    elif pts:
        xs_ok = [p[0] for p in pts]
        span = (max(xs_ok) - min(xs_ok)) or max(abs(xs_ok[0]), 1.0)
        ax.set_xlim(min(xs_ok) - 0.08 * span, max(xs_ok) + 0.3 * span)  # room for labels on the right
    ax.legend(loc="lower right", fontsize=7.5, framealpha=0.85)
    on_front = set(front)
    return [
        (x, y, text, is_rec)
        for x, y, text, is_rec, is_fp32, is_control in items
        if is_rec or is_fp32 or ((x, y) in on_front and not is_control)
    ]


def plot_pareto(report: dict) -> bytes:
    """PNG bytes: ΔAP vs the cost axis (left) and vs the weights at deployed width (right), budget line and pick."""
    # Only the plot needs matplotlib. A Figure on an Agg canvas avoids pyplot's global state and any display.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    variants = report["variants"]
    axis = report["latency_axis"]
    ds = report["dataset"]
    fig = Figure(figsize=(14, 6.2), dpi=110)
    canvas = FigureCanvasAgg(fig)
    ax_lat, ax_size = fig.subplots(1, 2)
    providers = sorted({v["provider"] or "" for v in variants})
    ys = [v["delta_ap"] for v in variants]
    y_range = (min(ys + [-report["budget_ap"]]) - 0.6, max(ys + [0.0]) + 0.6)
    cost = report["cost_axis"]
    x_range = None
    if cost["source"] == "tensorrt":
        lat_xs = [latency_on_axis(axis["source"], v.get("tensorrt"), v.get("latency_ms")) for v in variants]
        xlabel, title = "TensorRT GPU compute time, ms (trtexec median)", "ΔAP vs TensorRT latency"
    else:
        lat_xs = [None if v.get("mac_share") is None else 100.0 * (1.0 - v["mac_share"]) for v in variants]
        xlabel, title = "Conv/MatMul/Gemm MACs left in float, %", "ΔAP vs MACs left in float (TensorRT absent)"
        x_range = (0.0, 100.0)
    lat_items = _draw_panel(ax_lat, report, lat_xs, xlabel, providers, False, y_range, x_range)
    ax_lat.set_title(title + " — up and left is better", fontsize=10)
    size_xs = [v["weight_bytes"] / 1e6 if v.get("weight_bytes") else None for v in variants]
    size_label = "weights at deployed width, MB (Q/DQ weights 1 byte, others their dtype)"
    size_items = _draw_panel(ax_size, report, size_xs, size_label, providers, False, y_range)
    ax_size.set_title("ΔAP vs weight size", fontsize=10)
    fig.suptitle(
        f"{ds['name']}, {ds['num_images']} images — FP32 mAP50-95 {report['baseline']['map50_95']:.4f} — "
        f"recommended: {report['recommended']['variant']}",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    renderer = canvas.get_renderer()
    for ax, items in ((ax_lat, lat_items), (ax_size, size_items)):
        _place_labels(ax, items, renderer, always=(report["baseline"]["label"],))
    buf = io.BytesIO()
    canvas.print_png(buf)
    return buf.getvalue()


def _yerr(points: list[dict]) -> list[list[float]] | None:
    """Asymmetric error bars of probes or attempts: their interval, else ±1.96 SE; 0 where neither is known."""
    lows, highs, any_known = [], [], False
    for p in points:
        if p.get("ci_low") is not None:
            lows.append(max(p["delta_ap"] - p["ci_low"], 0.0))
            highs.append(max(p["ci_high"] - p["delta_ap"], 0.0))
        elif p.get("std_error") is not None:
            lows.append(1.96 * p["std_error"])
            highs.append(1.96 * p["std_error"])
        else:
            lows.append(0.0)
            highs.append(0.0)
            continue
        any_known = True
    return [lows, highs] if any_known else None


def _bars(ax, points: list[dict] | None, offset: float, fmt: str, color: str, label: str, **style) -> None:
    """``points`` ({k, delta_ap} and an interval or SE) with their error bars, ``offset`` to the right of K."""
    if not points:
        return
    style = {"mfc": "white", "capsize": 3, "zorder": 4, **style}
    ks, ys = [p["k"] + offset for p in points], [p["delta_ap"] for p in points]
    ax.errorbar(ks, ys, yerr=_yerr(points), fmt=fmt, c=color, label=label, **style)


def _search_panel(ax, searches: list[dict], budget: float) -> None:
    """ΔAP against K for every ranking of one mode, the random controls and the budget line."""
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:purple"]
    for i, s in enumerate(searches):
        color = colors[i % len(colors)]
        ks, ys = [p["k"] for p in s["probes"]], [p["delta_ap"] for p in s["probes"]]
        ax.plot(ks, ys, "-", c=color, lw=1, alpha=0.6)
        yerr = _yerr(s["probes"])
        ax.errorbar(
            ks,
            ys,
            yerr=yerr,
            fmt="o",
            c=color,
            capsize=3,
            ms=5,
            zorder=3,
            label=f"{s['ranking']['method'] or 'ranking'} probes" + (" (95 % interval)" if yerr else ""),
        )
        pick = s.get("pick_k", s["k"] if s["found"] else None)
        pick_y = next((p["delta_ap"] for p in s["probes"] if p["k"] == pick), None)
        if pick is not None and pick_y is not None:
            ax.scatter(
                [pick],
                [pick_y],
                s=260,
                marker="*",
                c="gold",
                edgecolors="darkred",
                zorder=5,
                label=f"pick K={pick}",
            )
        elif not s["found"]:
            ax.scatter([s["k"]], [s["delta_ap"]], s=120, marker="x", c="darkred", zorder=5, label="budget not met")
        offset = 0.012 * max(max(ks, default=1), 1)  # confirmation points beside the probe at the same K
        conf = s.get("confirmation") or {}
        _bars(ax, conf.get("attempts"), offset, "D", "tab:red", f"confirmation slice ({conf.get('status')})", ms=6)
        r = s.get("revert")
        if r and r.get("search_delta_ap") is not None:  # the revert pass's final set: fewer nodes than the pick
            point = {"k": r["k"], "delta_ap": r["search_delta_ap"], "std_error": r.get("search_std_error")}
            label = f"revert pass K={r['k']} (±1.96 SE)"
            _bars(ax, [point], 0.0, "P", "tab:green", label, ms=9, mec="black", mfc="tab:green", zorder=5)
            verdict = "confirmed" if r["confirmed"] else "not confirmed"
            attempts = (r.get("confirmation") or {}).get("attempts")
            _bars(ax, attempts, offset, "P", "tab:green", f"revert pass, confirmation slice ({verdict})", ms=8)
        band = s.get("random_band") or []
        if len(band) > 1:
            ax.fill_between(
                [b["k"] for b in band],
                [-b["max_delta"] for b in band],
                [-b["min_delta"] for b in band],
                color="0.6",
                alpha=0.25,
                label="random controls, min-max",
            )
        rc = s["random_control"]
        if rc:
            mean, lo, hi = -rc["mean_delta"], -rc["max_delta"], -rc["min_delta"]
            ax.errorbar(
                [rc["k"]],
                [mean],
                yerr=[[mean - lo], [hi - mean]],
                fmt="x",
                c="0.4",
                capsize=6,
                label=f"random, {len(rc['seeds'])} seeds (mean, min-max)",
                zorder=3,
            )
            ax.scatter([rc["k"]] * len(rc["aps"]), [a - s["baseline_ap"] for a in rc["aps"]], s=14, c="0.6", zorder=3)
    ax.axhline(0.0, c="0.4", lw=1)
    ax.axhline(-budget, c="tab:red", ls="--", lw=1.2, label=f"budget −{budget:g} AP")
    ax.set_xlabel("K (most sensitive nodes left in float)")
    ax.set_ylabel("ΔAP vs FP32 (mAP50-95 points)")
    ax.set_title(f"{searches[0]['mode'].upper()}: ΔAP vs K", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, framealpha=0.85)


def plot_search_curves(report: dict) -> bytes:
    """PNG bytes: one ΔAP-vs-K panel per mode of the budget search (every ranking searched in that mode).

    ``report`` needs only ``search`` (:func:`lowbit.report_json.search_summary` entries) and ``budget_ap``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # as in plot_pareto
    from matplotlib.figure import Figure

    by_mode: dict[str, list[dict]] = {}
    for s in report.get("search") or []:
        by_mode.setdefault(s["mode"], []).append(s)
    if not by_mode:
        raise ValueError("the report holds no budget search")
    fig = Figure(figsize=(6.5 * len(by_mode), 5.0), dpi=110)
    canvas = FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(by_mode), squeeze=False)[0]
    for ax, (mode, searches) in zip(axes, sorted(by_mode.items())):
        _search_panel(ax, searches, report["budget_ap"])
    fig.tight_layout()
    buf = io.BytesIO()
    canvas.print_png(buf)
    return buf.getvalue()
