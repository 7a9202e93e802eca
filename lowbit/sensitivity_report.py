"""The layer-sensitivity report shared by the torch sweep and the ONNX-native tool: build, write, read, compare.

Both ``yolov10m_layer_sensitivity.py`` (``source: "torch"``) and ``onnx_layer_sensitivity.py``
(``source: "onnx"``) write the same three files into their output folder:

* ``layer-sensitivity-report.json`` (docs/records.md): ``schema_version``, ``kind`` ("sensitivity"),
  ``source``, ``model``, ``model_sha256``,
  ``precision``, ``quant_format``, ``method`` (``name``, ``description``, ``score``,
  ``higher_is_more_sensitive``, optionally ``settings``), ``data`` (``images``, ``source``,
  ``imgsz``), ``device``, ``wall_s`` and ``layers``, then any tool-specific keys (the torch sweep
  adds ``reference``). Each layer is ``rank``, ``name``, ``op_type``, ``weight``, ``onnx_node``,
  ``score`` in that order; rank 1 = most sensitive. Written last: its presence marks completion.
* ``layer-sensitivity-report.csv``: the ``layers`` table (null = empty cell, the score with every digit).
* ``layer-sensitivity-report.md``: what was measured, on what, and the ranked table.

Nothing here depends on how the scores were obtained, nor on torch or onnx. Comparing two rankings
(:func:`compare_reports`) needs their layers paired: either through one ONNX graph
(``lowbit.sensitivity_onnx.NodeMatcher``) or, without a graph, through the report columns
(:class:`ReportColumnMatcher`).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from lowbit import records
from lowbit.errors import UserError
from lowbit.runs import atomic_write_json, atomic_write_text

__all__ = [
    "AGREEMENT_FILE",
    "AGREEMENT_KIND",
    "KIND",
    "LAYER_KEYS",
    "PRECISIONS",
    "QUANT_FORMAT_BY_PRECISION",
    "REPORT_STEM",
    "SCHEMA_VERSION",
    "LayerMatcher",
    "Match",
    "ReportColumnMatcher",
    "compare_reports",
    "format_csv",
    "format_markdown",
    "load_report",
    "make_report",
    "rank_layers",
    "report_paths",
    "spearman",
    "write_report",
]

KIND = "sensitivity"  # the report's "kind"
SCHEMA_VERSION = records.SCHEMA_VERSIONS[KIND]
AGREEMENT_KIND = "ranking-agreement"  # compare_reports' "kind"
REPORT_STEM = "layer-sensitivity-report"
AGREEMENT_FILE = "ranking-agreement.json"
# precision -> quant_format ("weights-activations")
QUANT_FORMAT_BY_PRECISION = {"int8": "int8-int8", "fp8": "fp8-fp8"}
PRECISIONS = tuple(QUANT_FORMAT_BY_PRECISION)
LAYER_KEYS = ("rank", "name", "op_type", "weight", "onnx_node", "score")


# ----------------------------------------------------------------------------------------------------------------------
# Building


def rank_layers(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Sort by score (descending; ties keep input order) and number ranks from 1, keys in schema order.

    Args:
        entries: dicts with ``name``, ``op_type``, ``weight``, ``onnx_node`` and ``score`` (missing keys -> None).

    Returns:
        The report's ``layers`` list: dicts with exactly :data:`LAYER_KEYS`, rank 1 = highest score.
    """
    order = sorted(range(len(entries)), key=lambda i: (-float(entries[i]["score"]), i))
    return [
        {key: (rank if key == "rank" else entries[i].get(key)) for key in LAYER_KEYS} for rank, i in enumerate(order, 1)
    ]


def make_report(
    *,
    source: str,
    model: Path | str,
    model_sha256: str,
    precision: str,
    method: dict[str, Any],
    data: dict[str, Any],
    device: str,
    wall_s: float | None,
    layers: list[dict[str, Any]],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A report dict with the shared schema's keys in order; ``layers`` must already be ranked.

    Args:
        wall_s: seconds, rounded to ms; None when the caller fills it in later.
        extra: tool-specific keys, placed after ``layers`` (e.g. the torch sweep's ``reference``).
    """
    report = {
        **records.header(KIND),
        "source": source,
        "model": str(model),
        "model_sha256": model_sha256,
        "precision": precision,
        "quant_format": QUANT_FORMAT_BY_PRECISION[precision],
        "method": method,
        "data": data,
        "device": device,
        "wall_s": None if wall_s is None else round(float(wall_s), 3),
        "layers": layers,
    }
    report.update(extra or {})
    return report


# ----------------------------------------------------------------------------------------------------------------------
# Writing


def report_paths(out_dir: Path) -> dict[str, Path]:
    """``{"json", "csv", "md"}`` -> the report's three files in ``out_dir``."""
    return {ext: Path(out_dir) / f"{REPORT_STEM}.{ext}" for ext in ("json", "csv", "md")}


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    # repr() keeps every digit of a float score, so the CSV ranks exactly like the JSON
    return repr(value) if isinstance(value, float) else value


def format_csv(report: dict[str, Any]) -> str:
    """The ``layers`` table as CSV with a header of :data:`LAYER_KEYS`; null is an empty cell."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(LAYER_KEYS)
    for layer in report["layers"]:
        writer.writerow([_csv_cell(layer[key]) for key in LAYER_KEYS])
    return buffer.getvalue()


def format_markdown(report: dict[str, Any]) -> str:
    """A readable page: what was measured, on what, the tool's reference numbers if any, the ranked table."""
    method, data = report["method"], report["data"]
    direction = "higher" if method.get("higher_is_more_sensitive", True) else "lower"
    wall_s = report.get("wall_s")
    lines = [
        f"# Layer sensitivity: {Path(report['model']).name} ({report['quant_format']}, source {report['source']})",
        "",
        f"- model: `{report['model']}` (sha256 `{(report.get('model_sha256') or '')[:16]}...`)",
        f"- method: `{method['name']}`, score `{method['score']}` ({direction} is more sensitive)",
        f"- data: {data.get('images')} images from `{data.get('source')}` at {data.get('imgsz')} px",
        f"- device: {report['device']}, wall time " + ("n/a" if wall_s is None else f"{wall_s:.1f} s"),
    ]
    reference = report.get("reference")
    if reference:
        lines.append(
            f"- reference: every layer quantized {reference['all_layers_quantized']:.6g}, "
            f"no layer quantized {reference['no_layer_quantized']:.6g}"
        )
    lines += ["", method["description"], ""]
    lines += ["| rank | name | op_type | weight | onnx_node | score |", "| ---: | --- | --- | --- | --- | ---: |"]
    for row in report["layers"]:
        weight = f"`{row['weight']}`" if row["weight"] else ""
        node = f"`{row['onnx_node']}`" if row["onnx_node"] else ""
        lines.append(f"| {row['rank']} | `{row['name']}` | {row['op_type']} | {weight} | {node} | {row['score']:.6g} |")
    return "\n".join(lines) + "\n"


def write_report(out_dir: Path, report: dict[str, Any]) -> dict[str, Path]:
    """Write the CSV, Markdown and JSON files atomically; returns :func:`report_paths`.

    The JSON goes last: its presence marks a complete report.
    """
    paths = report_paths(out_dir)
    atomic_write_text(paths["csv"], format_csv(report))
    atomic_write_text(paths["md"], format_markdown(report))
    atomic_write_json(paths["json"], report)
    return paths


# ----------------------------------------------------------------------------------------------------------------------
# Reading


def load_report(path: Path, flag: str) -> dict[str, Any]:
    """Read and validate a layer-sensitivity report; ``layers`` come back sorted by rank.

    Raises:
        UserError naming ``flag`` when the file is not a report of the shared schema: not JSON, not a record of
        kind ``sensitivity`` and its schema version (:func:`lowbit.records.check_record`), no ranked layers.
    """
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{flag}: {path} is not a readable JSON file ({e})", flag=flag) from e
    records.check_record(report, path, KIND, flag=flag)
    if not isinstance(report.get("layers"), list):
        raise UserError(f"{flag}: {path} has no 'layers' list; expected a {REPORT_STEM}.json", flag=flag)
    layers = report["layers"]
    if not layers:
        raise UserError(f"{flag}: {path} ranks no layers", flag=flag)
    for i, layer in enumerate(layers):
        if not (isinstance(layer, dict) and isinstance(layer.get("name"), str) and isinstance(layer.get("rank"), int)):
            raise UserError(f"{flag}: {path} layer #{i} lacks a string 'name' or an integer 'rank'", flag=flag)
    ranks = sorted(layer["rank"] for layer in layers)
    if ranks != list(range(1, len(layers) + 1)):
        raise UserError(f"{flag}: {path} ranks are not 1..{len(layers)} without gaps or repeats", flag=flag)
    report["layers"] = sorted(layers, key=lambda layer: layer["rank"])
    return report


# ----------------------------------------------------------------------------------------------------------------------
# Pairing layers and comparing two rankings


@dataclass
class Match:
    """Where a report layer landed: ``node`` (None when unmatched), how (``via``), and why not (``reason``)."""

    node: str | None
    via: str | None
    reason: str | None = None


class LayerMatcher(Protocol):
    """Maps a report layer to a node key: ``NodeMatcher`` (one ONNX graph) or :class:`ReportColumnMatcher`."""

    def match(self, layer: dict[str, Any]) -> Match: ...


class ReportColumnMatcher:
    """Pair the layers of reports without a graph, through their ``onnx_node`` and ``weight`` columns.

    A layer's key is, in order: its ``onnx_node``; the ``onnx_node`` that a layer of one of the given
    reports lists for the same ``weight`` (a torch report's ``model.2.cv1.conv.weight`` thus lands on
    the ONNX report's ``/model.2/cv1/conv/Conv``: the exported ONNX keeps torch parameter names); its
    ``weight``; its ``name``. Reports of one source always pair up. Torch against ONNX, layers with no
    weight on one side (the torch MaxPool, ONNX Conv nodes whose weight FP8 leaves unquantized, Add,
    Concat, MatMul) find no partner and are listed as ``not_in_other``; mapping both reports onto the
    graph (``lowbit.sensitivity_onnx.NodeMatcher``) pairs more of them.
    """

    def __init__(self, *reports: dict[str, Any]):
        self.node_of_weight: dict[str, str] = {}
        for report in reports:
            for layer in report["layers"]:
                weight, node = layer.get("weight"), layer.get("onnx_node")
                if weight and node:
                    self.node_of_weight.setdefault(weight, node)

    def match(self, layer: dict[str, Any]) -> Match:
        node = layer.get("onnx_node")
        if node:
            return Match(node, "onnx_node")
        weight = layer.get("weight")
        if weight:
            return Match(self.node_of_weight.get(weight, weight), "weight")
        return Match(layer["name"], "name")


def spearman(values_a: list[float], values_b: list[float]) -> float | None:
    """Spearman rank correlation of two paired lists (``scipy.stats.spearmanr``: ties get their average rank).

    Returns None for fewer than 2 pairs or a constant list (no correlation is defined there).
    """
    if len(values_a) != len(values_b):
        raise ValueError("spearman: lists differ in length")
    if len(values_a) < 2 or len(set(values_a)) < 2 or len(set(values_b)) < 2:
        return None
    from scipy.stats import spearmanr  # only here: reading and writing reports needs no scipy

    return float(spearmanr(values_a, values_b).statistic)


def _mapped(report: dict[str, Any], matcher: LayerMatcher) -> tuple[dict[str, dict], list[dict]]:
    """Node key -> best-ranked layer mapped to it, and the unmatched layers (with reasons)."""
    mapped: dict[str, dict] = {}
    unmatched = []
    for layer in report["layers"]:
        match = matcher.match(layer)
        if match.node is None:
            unmatched.append({"name": layer["name"], "rank": layer["rank"], "reason": match.reason})
        elif match.node not in mapped:
            mapped[match.node] = layer
    return mapped, unmatched


def compare_reports(
    report_a: dict[str, Any],
    report_b: dict[str, Any],
    matcher: LayerMatcher | None = None,
    ks: Iterable[int] = (5, 10, 20),
) -> dict[str, Any]:
    """Agreement of two rankings over the layers both map to the same node.

    Both reports are mapped with ``matcher`` (default: :class:`ReportColumnMatcher` of the two); on the
    common nodes each report's order is kept and re-ranked 1..M. Returns ``schema_version``, ``kind``
    ("ranking-agreement"), ``matched`` (M), ``spearman`` (rank correlation over the M nodes, None when M < 2), ``top_k``: per
    K <= M the top-K node lists ``a`` and ``b``, their ``overlap`` (count), ``fraction`` (overlap / K)
    and ``expected_by_chance`` (K^2 / M: the mean overlap of two random orders); and per side ``a``/``b``:
    ``source``, ``precision``, ``model``, ``method``, ``layers``, ``mapped_to_nodes``, ``unmatched``
    (layers that map nowhere, with the reason) and ``not_in_other`` (mapped, but not by the other report).
    """
    if matcher is None:
        matcher = ReportColumnMatcher(report_a, report_b)
    mapped_a, unmatched_a = _mapped(report_a, matcher)
    mapped_b, unmatched_b = _mapped(report_b, matcher)
    common = [node for node in mapped_a if node in mapped_b]
    order_a = sorted(common, key=lambda n: mapped_a[n]["rank"])
    order_b = sorted(common, key=lambda n: mapped_b[n]["rank"])
    rank_a = {node: i for i, node in enumerate(order_a, 1)}
    rank_b = {node: i for i, node in enumerate(order_b, 1)}
    rho = spearman([rank_a[n] for n in common], [rank_b[n] for n in common])
    top_k = {}
    for k in ks:
        if k < 1 or k > len(common):
            continue
        set_a, set_b = set(order_a[:k]), set(order_b[:k])
        overlap = len(set_a & set_b)
        top_k[str(k)] = {
            "overlap": overlap,
            "fraction": round(overlap / k, 4),
            "expected_by_chance": round(k * k / len(common), 3),
            "a": order_a[:k],
            "b": order_b[:k],
        }
    only_a = [mapped_a[n]["name"] for n in mapped_a if n not in mapped_b]
    only_b = [mapped_b[n]["name"] for n in mapped_b if n not in mapped_a]

    def _side(report: dict[str, Any], mapped: dict, unmatched: list, only: list) -> dict[str, Any]:
        return {
            "source": report.get("source"),
            "precision": report.get("precision"),
            "model": report.get("model"),
            "method": (report.get("method") or {}).get("name"),
            "layers": len(report["layers"]),
            "mapped_to_nodes": len(mapped),
            "unmatched": unmatched,
            "not_in_other": only,
        }

    return {
        **records.header(AGREEMENT_KIND),
        "matched": len(common),
        "spearman": None if rho is None else round(rho, 4),
        "top_k": top_k,
        "a": _side(report_a, mapped_a, unmatched_a, only_a),
        "b": _side(report_b, mapped_b, unmatched_b, only_b),
    }
