"""Report layers, by torch module name or ONNX node name, mapped onto the nodes of one ONNX graph.

:class:`NodeMatcher` pairs a layer-sensitivity report's layers with the nodes of one graph. It is used by
the scheme maker (which nodes to leave in float) and, through ``lowbit.sensitivity_report.compare_reports``,
to compare two rankings (``onnx_layer_sensitivity.py --compare-with``, ``compare_sensitivity_reports.py
--onnx-path``). A layer maps through its ``onnx_node``, its weight initializer, or the exporter's naming
convention (:func:`scope_key`).

The ONNX-native rankings themselves live in ``lowbit.sensitivity_single``, ``lowbit.sensitivity_loo`` and
``lowbit.sensitivity_local``; the report they go into in ``lowbit.sensitivity_report``.
"""

from __future__ import annotations

import re
from typing import Any

import onnx

from lowbit.qdq_graph import tensor_consumers
from lowbit.sensitivity_report import Match

__all__ = ["NodeMatcher", "scope_key"]

# Ops a weight initializer may pass through on its way to the compute node that uses it.
_PASS_THROUGH_OPS = ("QuantizeLinear", "DequantizeLinear", "Cast", "Identity")
# Torch module types (as a report may spell them) -> ONNX op types they export to.
_TORCH_TO_ONNX_OPS = {
    "conv": ("Conv",),
    "conv2d": ("Conv",),
    "conv1d": ("Conv",),
    "quantconv2d": ("Conv",),
    "convtranspose2d": ("ConvTranspose",),
    "linear": ("Gemm", "MatMul"),
    "quantlinear": ("Gemm", "MatMul"),
}
_OP_SUFFIX = re.compile(r"^(?P<op>[A-Za-z][A-Za-z0-9]*?)(?:_\d+)?$")


# ----------------------------------------------------------------------------------------------------------------------
# Report layer -> ONNX node


def scope_key(node_name: str) -> tuple[str, str] | None:
    """``(torch module name, op type)`` encoded in a torch-exported ONNX node name, or None.

    The exporter names a node ``/<scope>/<scope>/.../<Op>[_n]``; a container's scope is followed by
    its children's scopes that repeat its name (``/cv1/cv1.2/``), so a scope that is a prefix of the
    next one is dropped: ``/model.22/m.0/cv1/cv1.2/conv/Conv`` -> ``("model.22.m.0.cv1.2.conv", "Conv")``
    and ``/model.2/cv1/conv/Conv`` -> ``("model.2.cv1.conv", "Conv")``.
    """
    if not node_name.startswith("/"):
        return None
    parts = node_name[1:].split("/")
    if len(parts) < 2:
        return None
    match = _OP_SUFFIX.match(parts[-1])
    if match is None:
        return None
    scopes = parts[:-1]
    kept = [s for i, s in enumerate(scopes) if not (i + 1 < len(scopes) and scopes[i + 1].startswith(s + "."))]
    return ".".join(kept), match.group("op")


class NodeMatcher:
    """Map report layers (torch module names or ONNX node names) to nodes of one ONNX graph.

    Tried in order: the layer's ``onnx_node`` when it is a node of the graph; the weight initializer
    (``weight``, else ``name + ".weight"``) followed through Q/DQ/Cast/Identity to the one compute node
    that uses it; the torch-module-name convention (``model.2.cv1.conv`` <-> ``/model.2/cv1/conv/Conv``).
    """

    def __init__(self, model: onnx.ModelProto):
        graph = model.graph
        self.nodes = {node.name: node for node in graph.node if node.name}
        self.order = {node.name: i for i, node in enumerate(graph.node) if node.name}
        self.initializers = {init.name for init in graph.initializer}
        self.initializers |= {n.output[0] for n in graph.node if n.op_type == "Constant"}
        self._consumers = tensor_consumers(graph)
        self._scopes: dict[tuple[str, str], list[str]] = {}
        for node in graph.node:
            key = scope_key(node.name) if node.name else None
            if key is not None and key[1] == node.op_type:
                self._scopes.setdefault(key, []).append(node.name)

    def weight_consumers(self, initializer: str) -> list[str]:
        """Compute nodes fed by ``initializer``, looking through Q/DQ, Cast and Identity."""
        found, frontier, seen = [], [initializer], set()
        while frontier:
            tensor = frontier.pop()
            for node in self._consumers.get(tensor, []):
                key = node.name or id(node)
                if key in seen:
                    continue
                seen.add(key)
                if node.op_type in _PASS_THROUGH_OPS:
                    frontier.extend(node.output)
                else:
                    found.append(node.name)
        return sorted(set(found), key=lambda n: self.order.get(n, 0))

    def match(self, layer: dict[str, Any]) -> Match:
        reasons = []
        onnx_node = layer.get("onnx_node")
        if onnx_node:
            if onnx_node in self.nodes:
                return Match(onnx_node, "onnx_node")
            reasons.append(f"onnx_node {onnx_node!r} is not a node of the graph")
        name = layer.get("name") or ""
        if name in self.nodes:
            return Match(name, "name")
        weights = [w for w in (layer.get("weight"), None if "/" in name else f"{name}.weight") if w]
        for weight in dict.fromkeys(weights):
            if weight not in self.initializers:
                reasons.append(f"no initializer {weight!r}")
                continue
            users = self.weight_consumers(weight)
            if len(users) == 1:
                return Match(users[0], "weight")
            reasons.append(f"initializer {weight!r} feeds {len(users)} compute nodes")
        if "/" not in name:
            op_type = str(layer.get("op_type") or "")
            wanted = _TORCH_TO_ONNX_OPS.get(op_type.lower(), (op_type,) if op_type else ())
            candidates = [
                node
                for (qualname, op), names in self._scopes.items()
                if qualname == name and (not wanted or op in wanted)
                for node in names
            ]
            if len(candidates) == 1:
                return Match(candidates[0], "name_convention")
            reasons.append(
                f"name convention: {len(candidates)} nodes for module {name!r}"
                + (f" ({', '.join(candidates[:3])})" if candidates else "")
            )
        return Match(None, None, "; ".join(reasons) or "nothing to match on")
