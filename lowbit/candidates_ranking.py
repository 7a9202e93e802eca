"""A sensitivity ranking as the budget search's node order: the quantized nodes of a Q/DQ model in rank order,
and the seeded random draws from them that the search's random controls put in float instead."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowbit.errors import UserError
from lowbit.logs import get_logger

__all__ = ["RankedNodes", "match_ranking", "random_nodes", "ranked_nodes", "unmatched_warning"]

log = get_logger("candidates")


@dataclass
class RankedNodes:
    """A ranking mapped onto a Q/DQ model: its quantized ``nodes`` in rank order (most sensitive first), and the
    ``unmatched`` report layers ({rank, name, reason}) that are no quantized node of it."""

    nodes: list[str]
    unmatched: list[dict[str, Any]]


def match_ranking(
    report: dict[str, Any],
    fp32_model,
    qdq_model,
    flag: str = "--ranking",
    report_path: Path | None = None,
    qdq_path: Path | None = None,
) -> RankedNodes:
    """Map the layers of a loaded report onto the quantized nodes of ``qdq_model``.

    Report layers map onto the FP32 graph as the scheme maker maps them (``lowbit.schemes.map_layers``);
    layers that map to no node, or to a node the Q/DQ model does not quantize, are ``unmatched``.

    Args:
        fp32_model, qdq_model: ``ModelProto`` or paths (loaded without external data).

    Raises:
        UserError(flag): no layer maps to a quantized node (a ranking of another model or mode).
    """
    from lowbit.qdq_graph import find_quantized_nodes, load_graph_proto
    from lowbit.schemes import map_layers
    from lowbit.sensitivity_onnx import NodeMatcher

    mapping = map_layers(report, NodeMatcher(load_graph_proto(fp32_model)))
    quantized = {n.name for n in find_quantized_nodes(load_graph_proto(qdq_model).graph)}
    nodes = [m["onnx_node"] for m in mapping.matched if m["onnx_node"] in quantized]
    unmatched = [{"rank": u["rank"], "name": u["name"], "reason": u.get("reason")} for u in mapping.unmatched]
    unmatched += [
        {"rank": m["rank"], "name": m["name"], "reason": f"{m['onnx_node']} is not quantized in the Q/DQ model"}
        for m in mapping.matched
        if m["onnx_node"] not in quantized
    ]
    if not nodes:
        raise UserError(
            f"{flag}: no layer of {report_path or 'the ranking'} maps to a quantized node of "
            f"{qdq_path or 'the Q/DQ model'} ({len(report['layers'])} layers, none matches); "
            "was the ranking made for another model or mode?",
            flag=flag,
        )
    return RankedNodes(nodes, sorted(unmatched, key=lambda u: u["rank"]))


def unmatched_warning(ranked: RankedNodes, report_path: Path, qdq_path: Path, flag: str = "--ranking") -> str | None:
    """The warning that lists the ranked layers left out (None when every layer matched)."""
    if not ranked.unmatched:
        return None
    listed = "; ".join(f"#{u['rank']} {u['name']}" for u in ranked.unmatched)
    total = len(ranked.nodes) + len(ranked.unmatched)
    return (
        f"{flag}: {len(ranked.unmatched)} of {total} ranked layers of {report_path} match no quantized node of "
        f"{qdq_path} and are left out of the search: {listed}"
    )


def ranked_nodes(report_path: Path, fp32_model_path, qdq_model_path, flag: str = "--ranking") -> list[str]:
    """The nodes of the Q/DQ model in the report's rank order (most sensitive first) (:func:`match_ranking`).

    Layers that match no quantized node are left out, with one warning listing them; none matching is an error.
    """
    from lowbit.sensitivity_report import load_report

    report = load_report(Path(report_path), flag)
    ranked = match_ranking(report, fp32_model_path, qdq_model_path, flag, report_path, qdq_model_path)
    warning = unmatched_warning(ranked, report_path, qdq_model_path, flag)
    if warning:
        log.warning("%s", warning)
    return ranked.nodes


def random_nodes(pool: list[str], k: int, seed: int) -> list[str]:
    """``k`` nodes of ``pool`` drawn with ``seed`` (pool sorted by name: the draw ignores the ranking)."""
    from lowbit.schemes import seeded_sample

    ordered = sorted(pool)
    return [ordered[i] for i in seeded_sample(len(ordered), k, seed)]
