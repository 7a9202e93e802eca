"""Draws the report's figures: ``pareto.png`` (ΔAP against the cost axis and against model size, budget line, Pareto
front, the recommended variant starred) and ``search-curves.png`` (ΔAP against K per mode of the budget search).

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


def _place_labels(ax, items: list[tuple[float, float, str, bool]], renderer) -> None:
    """Annotate points, trying a few offsets per label so that labels overlap neither each other nor the points."""
    offsets = _LABEL_OFFSETS
    ax_box = ax.get_window_extent(renderer)
    point_boxes = []
    for x, y, _, _ in items:
        px, py = ax.transData.transform((x, y))
        point_boxes.append((px - 5, py - 5, px + 5, py + 5))
    placed: list[tuple[float, float, float, float]] = []

    def overlaps(a, b) -> bool:
        return not (a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1])

    # the recommended point first, then left to right: it gets the best spot
    for x, y, text, is_rec in sorted(items, key=lambda it: (not it[3], it[0], -it[1])):
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
        if best is None:  # nothing free: first choice, overlapping
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
    """One point per variant with a known x, the pick starred; returns the label items to place."""
    rec = report["recommended"]["variant"]
    items, seen_kinds = [], set()
    for v, x in zip(report["variants"], xs):
        if x is None:
            continue
        color, marker, kind = _point_style(v, providers, per_provider)
        ax.scatter(
            [x], [v["delta_ap"]], s=60, c=color, marker=marker, zorder=3, label=None if kind in seen_kinds else kind
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
                label="recommended",
            )
        items.append(
            (x, v["delta_ap"], v["label"] + (" (recommended)" if v["label"] == rec else ""), v["label"] == rec)
        )
    return items


def _draw_panel(
    ax,
    report: dict,
    xs: list[float | None],
    xlabel: str,
    providers: list[str],
    per_provider: bool,
    y_range: tuple[float, float],
) -> list:
    """One ΔAP-vs-x panel: points, Pareto front, FP32 and budget lines; returns the label items to place."""
    budget = report["budget_ap"]
    items = _scatter_variants(ax, report, xs, providers, per_provider)
    pts = [(x, y) for x, y, _, _ in items]
    front = pareto_front(pts)
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
    if pts:
        xs_ok = [p[0] for p in pts]
        span = (max(xs_ok) - min(xs_ok)) or max(abs(xs_ok[0]), 1.0)
        ax.set_xlim(min(xs_ok) - 0.08 * span, max(xs_ok) + 0.45 * span)  # room for labels on the right
    ax.legend(loc="upper right", fontsize=8, framealpha=0.85)
    return items


def plot_pareto(report: dict) -> bytes:
    """PNG bytes: ΔAP vs latency (left) and vs model size (right), labelled, with budget line and the pick."""
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
    if cost["source"] == "tensorrt":
        lat_xs = [latency_on_axis(axis["source"], v.get("tensorrt"), v.get("latency_ms")) for v in variants]
        xlabel, title = "latency, ms — " + axis["description"], "ΔAP vs TensorRT latency (up and left is better)"
    else:
        lat_xs = [None if v.get("mac_share") is None else 100.0 * (1.0 - v["mac_share"]) for v in variants]
        xlabel, title = "MACs left in float, % (TensorRT absent)", "ΔAP vs MACs left in float (up and left is better)"
    lat_items = _draw_panel(ax_lat, report, lat_xs, xlabel, providers, False, y_range)
    ax_lat.set_title(title, fontsize=10)
    size_xs = [v["model_bytes"] / 1e6 if v["model_bytes"] else None for v in variants]
    size_items = _draw_panel(ax_size, report, size_xs, "ONNX model file size, MB", providers, False, y_range)
    ax_size.set_title("ΔAP vs model size", fontsize=10)
    fig.suptitle(
        f"{ds['name']}: {ds['num_images']} images — FP32 mAP50-95 {report['baseline']['map50_95']:.4f} — "
        f"cost: {cost['description']}\nrecommended: {report['recommended']['variant']}",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    renderer = canvas.get_renderer()
    for ax, items in ((ax_lat, lat_items), (ax_size, size_items)):
        _place_labels(ax, items, renderer)
    buf = io.BytesIO()
    canvas.print_png(buf)
    return buf.getvalue()


def _search_panel(ax, searches: list[dict], budget: float) -> None:
    """ΔAP against K for every ranking of one mode, the random controls and the budget line."""
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:purple"]
    for i, s in enumerate(searches):
        color = colors[i % len(colors)]
        ks, ys = [p["k"] for p in s["probes"]], [p["delta_ap"] for p in s["probes"]]
        ax.plot(ks, ys, "o-", c=color, label=f"{s['ranking']['method'] or 'ranking'} (probes)")
        ax.scatter(
            [s["k"]],
            [s["delta_ap"]],
            s=260,
            marker="*",
            c="gold",
            edgecolors="darkred",
            zorder=4,
            label=f"K={s['k']} {'found' if s['found'] else '(budget not met)'}",
        )
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
