"""Edit the Q/DQ graph ModelOpt wrote: run chosen nodes in float without recalibrating, fold int32 bias
DequantizeLinear nodes into float initializers, and drop what the edits left unused.

:func:`remove_qdq_for_nodes` is the graph-side counterpart of ModelOpt's ``nodes_to_exclude``: every
input of a named node that comes through a DequantizeLinear is rewired to the float tensor behind it,

* a QuantizeLinear -> DequantizeLinear pair (activations, and ModelOpt's float weight initializers
  followed by Q/DQ): the node reads the pair's float input, i.e. the float weight or activation;
* a DequantizeLinear of a stored quantized constant (int8/fp8 weight initializer): the node reads a
  new float initializer holding the dequantized values (the original float weight is not stored);

and only that node is rewired: other consumers of a shared Q/DQ pair keep reading it. Q/DQ nodes
left without consumers, and the initializers only they used, are removed.

Differences from re-quantizing with ``nodes_to_exclude``: the scales are the ones calibrated for the
full model. ModelOpt calibrates activations on the float model, so they are the scales it would
compute again; where its placement rules would move a Q/DQ pair because of an exclusion (e.g. drop
the pair in front of an Add or Concat whose consumers all became float), the edited graph keeps the
pair for the consumers that still read it.

Every constant DequantizeLinear is evaluated by one function, :func:`dequantize_constant` (ONNX's
reference implementation of the operator); every initializer removal goes through
:func:`drop_unused_initializers`.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lowbit.errors import UserError
from lowbit.qdq_graph import QDQ_OPS, constant_values, tensor_producers

__all__ = [
    "FLOAT_SUFFIX",
    "dequantize_constant",
    "dequantized_inputs",
    "drop_unused_initializers",
    "float_source",
    "fold_int32_bias_dequantize",
    "remove_all_qdq",
    "remove_qdq_for_nodes",
]

FLOAT_SUFFIX = "__float"


def dequantize_constant(dq_node: onnx.NodeProto, constants: dict[str, onnx.TensorProto], opset: int) -> np.ndarray:
    """Values of a DequantizeLinear whose inputs are all constants (axis, block size and FP8 handled), in the
    operator's output type (the scale's, unless ``output_dtype`` says otherwise).

    Evaluated with ONNX's reference implementation, so the arithmetic is the operator's specification.
    """
    from onnx.reference import ReferenceEvaluator

    inputs = [name for name in dq_node.input if name]
    tensors = [constants[name] for name in inputs]
    node = helper.make_node(
        "DequantizeLinear", inputs, ["y"], **{attr.name: helper.get_attribute_value(attr) for attr in dq_node.attribute}
    )
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([node], "dequantize", [], [output], initializer=tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", max(opset, 19))])
    (values,) = ReferenceEvaluator(model).run(None, {})
    return np.asarray(values)


def _default_opset(model: onnx.ModelProto) -> int:
    return next((op.version for op in model.opset_import if op.domain in ("", "ai.onnx")), 19)


def float_source(
    dq_output: str, producers: dict[str, onnx.NodeProto], constants: dict[str, onnx.TensorProto]
) -> tuple[str, onnx.NodeProto | None] | None:
    """Where the float value behind a dequantized tensor lives.

    Returns:
        ``(float tensor, None)`` for a Q -> DQ pair (the Q's input), ``(DQ output, DQ node)`` for a
        DQ of a stored constant (its float value must be computed), None when ``dq_output`` is not a
        DequantizeLinear output or its source is neither.
    """
    dq = producers.get(dq_output)
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    source = producers.get(dq.input[0])
    if source is not None and source.op_type == "QuantizeLinear":
        return source.input[0], None
    if dq.input[0] in constants and all(name in constants for name in dq.input[1:] if name):
        return dq_output, dq
    return None


def _graph_reads(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name a node of ``graph`` or of its subgraphs (If/Loop bodies) reads, plus its outputs."""
    names = {o.name for o in graph.output}
    for node in graph.node:
        names.update(node.input)
        for attr in node.attribute:
            subgraphs = list(attr.graphs) + ([attr.g] if attr.HasField("g") else [])
            for sub in subgraphs:
                names |= _graph_reads(sub)
    return names


def drop_unused_initializers(graph: onnx.GraphProto, candidates: set[str] | None = None) -> None:
    """Remove the initializers (and their graph-input entries) that nothing reads any more, in place.

    Args:
        graph: the graph to clean.
        candidates: only these names may go (names that are no initializer are ignored); None means any
            initializer.
    """
    names = {init.name for init in graph.initializer}
    unused = (names if candidates is None else names & set(candidates)) - _graph_reads(graph)
    if not unused:
        return
    kept = [init for init in graph.initializer if init.name not in unused]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    inputs = [vi for vi in graph.input if vi.name not in unused]
    del graph.input[:]
    graph.input.extend(inputs)


def _prune_unused_qdq(graph: onnx.GraphProto, candidates: set[str]) -> None:
    """Remove Q/DQ nodes nobody reads (repeatedly), then the ``candidates`` initializers nobody reads."""
    outputs = {out.name for out in graph.output}
    while True:
        used = {name for node in graph.node for name in node.input if name} | outputs
        dead = [n for n in graph.node if n.op_type in QDQ_OPS and not any(o in used for o in n.output)]
        if not dead:
            break
        for node in dead:
            candidates.update(name for name in node.input if name)
            graph.node.remove(node)
    drop_unused_initializers(graph, candidates)


def remove_qdq_for_nodes(
    qdq_model: onnx.ModelProto, node_names: list[str], flag: str = "--exclude-nodes"
) -> onnx.ModelProto:
    """A copy of ``qdq_model`` in which the named nodes run in float (see the module docstring).

    Args:
        qdq_model: the calibrated Q/DQ model; not modified.
        node_names: compute nodes to run in float; a node without dequantized inputs is left as it is.
        flag: the flag or file that listed the names, named in errors.

    Returns:
        The edited model (same inputs, outputs and opsets).

    Raises:
        UserError: a name that is not a node of the graph (flag ``flag``).
    """
    model = onnx.ModelProto()
    model.CopyFrom(qdq_model)
    graph = model.graph
    by_name = {node.name: node for node in graph.node if node.name}
    unknown = sorted(set(node_names) - set(by_name))
    if unknown:
        raise UserError(f"{flag}: no node named {', '.join(map(repr, unknown))} in the Q/DQ graph", flag=flag)
    producers = tensor_producers(graph)
    constants = constant_values(graph)
    opset = _default_opset(model)
    added: dict[str, str] = {}  # DQ output of a stored constant -> its float initializer
    for name in dict.fromkeys(node_names):
        node = by_name[name]
        if node.op_type in QDQ_OPS:
            continue
        for i, tensor in enumerate(node.input):
            found = float_source(tensor, producers, constants)
            if found is None:
                continue
            float_name, dq_node = found
            if dq_node is not None:
                if tensor not in added:
                    added[tensor] = f"{tensor}{FLOAT_SUFFIX}"
                    values = np.asarray(dequantize_constant(dq_node, constants, opset), dtype=np.float32)
                    graph.initializer.append(numpy_helper.from_array(values, added[tensor]))
                float_name = added[tensor]
            node.input[i] = float_name
    _prune_unused_qdq(graph, set())
    return model


def dequantized_inputs(qdq_model: onnx.ModelProto) -> list[str]:
    """Names of every non-Q/DQ node that reads a dequantized tensor (graph order)."""
    graph = qdq_model.graph
    dq_outputs = {node.output[0] for node in graph.node if node.op_type == "DequantizeLinear"}
    return [
        node.name
        for node in graph.node
        if node.op_type not in QDQ_OPS and node.name and any(name in dq_outputs for name in node.input)
    ]


def remove_all_qdq(qdq_model: onnx.ModelProto) -> onnx.ModelProto:
    """The float graph behind a Q/DQ model: :func:`remove_qdq_for_nodes` for every node reading a DQ output."""
    return remove_qdq_for_nodes(qdq_model, dequantized_inputs(qdq_model))


def _without_zero_zero_point(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> onnx.NodeProto:
    """``node`` without its zero-point input when that is all zeros (ORT's quantizer writes int32 bias zero points
    of zeros). ``x - 0`` is ``x``; without the zero point the reference implementation multiplies in float32, as
    ORT's kernel does, where with one it promotes to float64 (the same float32 results, but float16 ones would
    then be rounded once instead of through float32)."""
    if len(node.input) < 3 or not node.input[2] or numpy_helper.to_array(inits[node.input[2]]).any():
        return node
    plain = onnx.NodeProto()
    plain.CopyFrom(node)
    del plain.input[2:]
    return plain


def fold_int32_bias_dequantize(model: onnx.ModelProto) -> list[str]:
    """Replace each DequantizeLinear of a constant int32 initializer by a float initializer, in place.

    ModelOpt (through ORT's quantizer) can quantize a conv bias to int32 behind a DequantizeLinear.
    ONNX Runtime's CUDA EP has no int32 DequantizeLinear kernel, so such nodes force a CPU fallback;
    TensorRT takes float biases anyway. The folded initializer holds ``(q - zero_point) * scale``
    (:func:`dequantize_constant`) in the scale's type (float32 unless the model runs in fp16) under the
    node's output name, so every consumer reads the same numbers as before. Initializers left unused are
    removed.

    Args:
        model: an ``onnx.ModelProto`` with its weights loaded.

    Returns:
        Names of the folded DequantizeLinear nodes, in graph order.
    """
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    graph_outputs = {o.name for o in graph.output}
    opset = _default_opset(model)
    folded, folded_nodes, new_inits, keep_nodes = [], [], [], []
    for node in graph.node:
        source = inits.get(node.input[0]) if node.op_type == "DequantizeLinear" and node.input else None
        if (
            source is None
            or source.data_type != TensorProto.INT32
            or node.output[0] in graph_outputs
            or any(name and name not in inits for name in node.input[1:])
            or any(a.name == "block_size" and a.i for a in node.attribute)
            or inits[node.input[1]].data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16)  # bfloat16: the runtime's
        ):
            keep_nodes.append(node)
            continue
        values = dequantize_constant(_without_zero_zero_point(node, inits), inits, opset)
        new_inits.append(numpy_helper.from_array(values, node.output[0]))
        folded.append(node.name or node.output[0])
        folded_nodes.append(node)
    if not folded:
        return []
    del graph.node[:]
    graph.node.extend(keep_nodes)
    graph.initializer.extend(new_inits)
    drop_unused_initializers(graph, {name for node in folded_nodes for name in node.input})
    return folded
