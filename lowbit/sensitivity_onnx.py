"""Per-node quantization sensitivity measured on the ONNX graph itself, and report layers mapped onto that graph.

Two parts, used by ``onnx_layer_sensitivity.py`` and ``make_yolov10m_candidate_schemes.py``:

* **Local error of each quantized node.** Given a Q/DQ model (ModelOpt output) the FP32 graph is
  recovered by bypassing every QuantizeLinear -> DequantizeLinear pair. For each node that consumes
  a dequantized tensor (a Conv with quantized input and weight, an Add, a Concat, ...) a *shadow*
  copy is added that reads the FP32 graph's own input tensors through copies of that node's Q/DQ
  pairs (same scales, zero points, axes). Both outputs are reduced in-graph to two scalars,
  ``sum((y_qdq - y_fp)^2)`` and ``sum(y_fp^2)``. One ONNX Runtime pass per image therefore scores
  every node at once, and only scalars leave the session, so memory stays that of one forward pass.
  Because each shadow node sees the *FP32* activations, its error is the error that node adds when
  quantized, not the error it inherits from quantized layers upstream. The score is the relative
  MSE pooled over images, ``sum_images sse / sum_images ref`` (higher = more sensitive; the SQNR in
  dB is ``-10 log10(score)``). It is a local measure: it does not say how much of the error survives
  to the detector's output.
* **Matching report layers to ONNX nodes** (:class:`NodeMatcher`): a report's layers, torch module
  names or ONNX node names, mapped onto the nodes of one graph; used by the scheme maker and, through
  ``lowbit.sensitivity_report.compare_reports``, to compare two rankings.

The report these scores go into (``layer-sensitivity-report.json`` + ``.csv`` + ``.md``, shared with the
torch sweep) is built, written and read by ``lowbit.sensitivity_report``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import onnx
from onnx import helper

from lowbit.errors import UserError
from lowbit.logs import get_logger
from lowbit.qdq_graph import QDQPair, QuantizedNode, find_quantized_nodes, qdq_pairs, tensor_consumers
from lowbit.sensitivity_report import Match

log = get_logger("sensitivity_onnx")

METHOD_NAME = "onnx_local_qdq_error"
METHOD_SCORE = "local_rel_mse"
METHOD_DESCRIPTION = (
    "Per quantized node of the ModelOpt Q/DQ graph: the node is run twice on the FP32 model's own input "
    "activations, once as in the FP32 graph and once through copies of its own QuantizeLinear/DequantizeLinear "
    "pairs (calibrated activation scale, quantized weights). The score is the relative MSE of its output, "
    "sum over images of ||y_qdq - y_fp32||^2 divided by the sum of ||y_fp32||^2: the error the node itself "
    "introduces when quantized, not the error it inherits from upstream layers. Local: it does not measure how "
    "the error propagates to the detector output. SQNR (dB) = -10*log10(score)."
)

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
# Q/DQ graph analysis


def _float_graph_nodes(
    graph: onnx.GraphProto, pairs: dict[str, QDQPair]
) -> tuple[list[onnx.NodeProto], list[int], dict[str, str]]:
    """Nodes of the FP32 graph behind a Q/DQ graph: Q->DQ pairs removed, their consumers read the float tensor.

    Returns:
        ``(nodes, indices, bypass)``: copies of the kept nodes in graph order, their indices in ``graph.node``,
        and the map DQ output -> float tensor.
    """
    bypass = {out: pair.float_input for out, pair in pairs.items() if pair.quantize is not None}
    consumers = tensor_consumers(graph)
    removable_q = set()
    for pair in pairs.values():
        q = pair.quantize
        if q is None:
            continue
        if all(c.op_type == "DequantizeLinear" and c.output[0] in bypass for c in consumers[q.output[0]]):
            removable_q.add(q.output[0])
    kept, indices = [], []
    for index, node in enumerate(graph.node):
        if node.op_type == "DequantizeLinear" and node.output[0] in bypass:
            continue
        if node.op_type == "QuantizeLinear" and node.output[0] in removable_q:
            continue
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        for i, name in enumerate(copy.input):
            if name in bypass:
                copy.input[i] = bypass[name]
        kept.append(copy)
        indices.append(index)
    return kept, indices, bypass


def _check_float_scales(graph: onnx.GraphProto, pairs: dict[str, QDQPair], model_flag: str) -> None:
    """Refuse Q/DQ scales stored in another type than float32 (the shadow copies compute in float32)."""
    initializer_types = {init.name: init.data_type for init in graph.initializer}
    for pair in pairs.values():
        scale = pair.dequantize.input[1]
        if initializer_types.get(scale, onnx.TensorProto.FLOAT) != onnx.TensorProto.FLOAT:
            raise UserError(
                f"Q/DQ scale {scale!r} is not float32: score models quantized with high precision fp32 "
                "(quantize_yolov10m_onnx.py --high-precision-dtype fp32)",
                flag=model_flag,
            )


def _shadow_qdq_input(pair: QDQPair, dq_out: str) -> list[onnx.NodeProto]:
    """Copies of a Q->DQ pair that read the FP32 tensor and write ``<dq_out>__sens``."""
    q_copy = onnx.NodeProto()
    q_copy.CopyFrom(pair.quantize)
    q_copy.name = f"{pair.quantize.name}__sens"
    q_copy.input[0] = pair.float_input
    q_copy.output[0] = f"{pair.quantize.output[0]}__sens"
    dq_copy = onnx.NodeProto()
    dq_copy.CopyFrom(pair.dequantize)
    dq_copy.name = f"{pair.dequantize.name}__sens"
    dq_copy.input[0] = q_copy.output[0]
    dq_copy.output[0] = f"{dq_out}__sens"
    return [q_copy, dq_copy]


def _shadow_group(
    k: int, original: onnx.NodeProto, qnode: QuantizedNode, pairs: dict[str, QDQPair], bypass: dict[str, str],
    shadow_qdq: dict[str, str],
) -> tuple[list[onnx.NodeProto], list[str]]:
    """Nodes scoring quantized node ``k``: its shadow copy (through fresh Q/DQ copies) and two error scalars.

    ``shadow_qdq`` (DQ output -> shadow DQ output) is shared across nodes so each pair is copied once.
    Returns ``(nodes, [sse output, ref output])``.
    """
    group: list[onnx.NodeProto] = []
    inputs = list(original.input)
    for i in qnode.quantized_inputs:
        dq_out = original.input[i]
        pair = pairs[dq_out]
        if pair.quantize is None:
            continue  # a stored quantized constant: FP32 graph and shadow read the same dequantized value
        if dq_out not in shadow_qdq:
            copies = _shadow_qdq_input(pair, dq_out)
            group += copies
            shadow_qdq[dq_out] = copies[1].output[0]
        inputs[i] = shadow_qdq[dq_out]
    # Inputs that were not quantized for this node keep reading the float graph's tensors.
    inputs = [name if j in qnode.quantized_inputs else bypass.get(name, name) for j, name in enumerate(inputs)]
    shadow = onnx.NodeProto()
    shadow.CopyFrom(original)
    shadow.name = f"{original.name}__sens"
    del shadow.input[:]
    shadow.input.extend(inputs)
    del shadow.output[:]
    shadow.output.extend(f"{out}__sens" if out else "" for out in original.output)
    reference = original.output[0]
    diff, sse, ref = f"__sens_diff_{k}", f"__sens_sse_{k}", f"__sens_ref_{k}"
    group += [
        shadow,
        helper.make_node("Sub", [shadow.output[0], reference], [diff], name=f"__sens_sub_{k}"),
        helper.make_node("ReduceSumSquare", [diff], [sse], name=f"__sens_sse_{k}", keepdims=0),
        helper.make_node("ReduceSumSquare", [reference], [ref], name=f"__sens_ref_{k}", keepdims=0),
    ]
    return group, [sse, ref]


def build_local_error_model(
    qdq_model: onnx.ModelProto, model_flag: str = "--qdq-path"
) -> tuple[onnx.ModelProto, list[QuantizedNode], list[str]]:
    """The FP32 graph of ``qdq_model`` plus one shadow (Q/DQ-input) copy and two error scalars per quantized node.

    Graph outputs: the original outputs (``reference_outputs``, to check the recovered FP32 graph against
    the original model), then for node ``k`` of the returned list ``__sens_sse_{k}`` = sum of squared
    differences between the shadow and the FP32 output, and ``__sens_ref_{k}`` = sum of squares of the
    FP32 output (float32 scalars, first output of the node only).

    Args:
        qdq_model: a Q/DQ model whose non-quantized tensors are float32 (ModelOpt ``high_precision_dtype=fp32``).
        model_flag: the flag (or file role) that named ``qdq_model``, carried by errors.

    Returns:
        ``(model, nodes, reference_outputs)``.

    Raises:
        UserError: the graph has no quantized node, or its Q/DQ scales are not float32.
    """
    graph = qdq_model.graph
    pairs = qdq_pairs(graph)
    nodes = find_quantized_nodes(graph)
    if not nodes:
        raise UserError(
            "the Q/DQ model has no node that reads a dequantized tensor; nothing to score", flag=model_flag
        )
    _check_float_scales(graph, pairs, model_flag)
    float_nodes, kept_indices, bypass = _float_graph_nodes(graph, pairs)
    position = {original: i for i, original in enumerate(kept_indices)}  # Q/DQ-graph index -> float-graph index
    shadow_qdq: dict[str, str] = {}
    insert_after: dict[int, list[onnx.NodeProto]] = {}
    outputs: list[str] = []
    for k, qnode in enumerate(nodes):
        group, scalars = _shadow_group(k, graph.node[qnode.index], qnode, pairs, bypass, shadow_qdq)
        insert_after.setdefault(position[qnode.index], []).extend(group)
        outputs += scalars
    ordered: list[onnx.NodeProto] = []
    for i, node in enumerate(float_nodes):
        ordered.append(node)
        ordered.extend(insert_after.get(i, []))
    # A graph output that was itself dequantized: expose the float tensor under its name.
    extra_nodes = [
        helper.make_node("Identity", [bypass[out.name]], [out.name], name=f"{out.name}__sens_identity")
        for out in graph.output
        if out.name in bypass
    ]
    reference_outputs = [out.name for out in graph.output]
    new_graph = helper.make_graph(
        ordered + extra_nodes,
        f"{graph.name}_local_error",
        list(graph.input),
        list(graph.output) + [helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, []) for name in outputs],
        initializer=list(graph.initializer),
    )
    model = helper.make_model(new_graph, opset_imports=list(qdq_model.opset_import))
    model.ir_version = qdq_model.ir_version
    return model, nodes, reference_outputs


def local_error_session(
    model: onnx.ModelProto,
    providers: list[str],
    intra_op_threads: int = 0,
    flag: str = "--providers",
    model_flag: str = "--qdq-path",
):
    """ONNX Runtime session for a :func:`build_local_error_model` graph (through ``lowbit.ort_session.build_session``).

    ORT's QDQ transformers are disabled (``session.disable_quant_qdq=1``) for INT8 and FP8 alike: the
    Q/DQ pairs then run as written, which is the simulation TensorRT's explicit quantization follows,
    and FP8 Q/DQ graphs need it on CPU anyway (see ``lowbit.ort_session``).
    """
    from lowbit.ort_session import CFG_DISABLE_QUANT_QDQ, build_session

    session, _ = build_session(
        model,
        list(providers),
        intra_op_threads=intra_op_threads,
        flag=flag,
        session_config={CFG_DISABLE_QUANT_QDQ: "1"},
        model_flag=model_flag,
    )
    return session


def score_local_errors(
    session, nodes: list[QuantizedNode], images: Iterable[np.ndarray], input_name: str
) -> tuple[np.ndarray, np.ndarray, int]:
    """Run ``images`` (each float32 [1,3,H,W]) and pool the per-node error sums.

    Returns:
        ``(sse, ref, count)``: float64 arrays of length ``len(nodes)`` (sums over images) and the image count.
    """
    names = [f"__sens_sse_{k}" for k in range(len(nodes))] + [f"__sens_ref_{k}" for k in range(len(nodes))]
    sse = np.zeros(len(nodes), dtype=np.float64)
    ref = np.zeros(len(nodes), dtype=np.float64)
    count = 0
    for image in images:
        values = session.run(names, {input_name: image})
        sse += np.asarray(values[: len(nodes)], dtype=np.float64)
        ref += np.asarray(values[len(nodes) :], dtype=np.float64)
        count += 1
    return sse, ref, count


def relative_mse(sse: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """``sse / ref``; an all-zero FP32 output scores 0 when matched exactly, else the largest float (finite)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(ref > 0, sse / ref, np.where(sse > 0, np.finfo(np.float64).max, 0.0))


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


# ----------------------------------------------------------------------------------------------------------------------
# Scoring helpers


def iter_batches(array: np.ndarray, count: int) -> Iterator[np.ndarray]:
    """The first ``count`` images of an [N,3,H,W] (memory-mapped) array, one contiguous [1,3,H,W] copy at a time."""
    for i in range(min(count, array.shape[0])):
        yield np.ascontiguousarray(array[i : i + 1], dtype=np.float32)


def sqnr_db(score: float) -> float:
    """SQNR in dB of a relative-MSE score (inf for 0)."""
    return math.inf if score <= 0 else -10.0 * math.log10(score)
