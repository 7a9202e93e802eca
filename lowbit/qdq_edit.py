"""Edit the Q/DQ graph ModelOpt wrote: run chosen nodes in float without recalibrating.

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
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from lowbit.errors import UserError

_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
FLOAT_SUFFIX = "__float"


def constant_values(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """Initializers and ``Constant`` node outputs of ``graph``, by tensor name."""
    values = {init.name: init for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    tensor = onnx.TensorProto()
                    tensor.CopyFrom(attr.t)
                    tensor.name = node.output[0]
                    values[node.output[0]] = tensor
    return values


def dequantize_constant(dq_node: onnx.NodeProto, constants: dict[str, onnx.TensorProto], opset: int) -> np.ndarray:
    """Float values of a DequantizeLinear whose inputs are all constants (axis, block size and FP8 handled).

    Evaluated with ONNX's reference implementation, so the arithmetic is the operator's specification.
    """
    from onnx.reference import ReferenceEvaluator

    inputs = [name for name in dq_node.input if name]
    tensors = [constants[name] for name in inputs]
    node = helper.make_node(
        "DequantizeLinear", inputs, ["y"], **{attr.name: helper.get_attribute_value(attr) for attr in dq_node.attribute}
    )
    graph = helper.make_graph([node], "dequantize", [], [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                              initializer=tensors)  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", max(opset, 19))])
    (values,) = ReferenceEvaluator(model).run(None, {})
    return np.asarray(values, dtype=np.float32)


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


def _prune_unused_qdq(graph: onnx.GraphProto, candidates: set[str]) -> None:
    """Remove Q/DQ nodes nobody reads (repeatedly), then the ``candidates`` initializers nobody reads."""
    outputs = {out.name for out in graph.output}
    while True:
        used = {name for node in graph.node for name in node.input if name} | outputs
        dead = [n for n in graph.node if n.op_type in _QDQ_OPS and not any(o in used for o in n.output)]
        if not dead:
            break
        for node in dead:
            candidates.update(name for name in node.input if name)
            graph.node.remove(node)
    used = {name for node in graph.node for name in node.input if name} | outputs
    keep = [init for init in graph.initializer if init.name in used or init.name not in candidates]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)


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
    producers = {out: node for node in graph.node for out in node.output if out}
    constants = constant_values(graph)
    opset = _default_opset(model)
    added: dict[str, str] = {}  # DQ output of a stored constant -> its float initializer
    for name in dict.fromkeys(node_names):
        node = by_name[name]
        if node.op_type in _QDQ_OPS:
            continue
        for i, tensor in enumerate(node.input):
            found = float_source(tensor, producers, constants)
            if found is None:
                continue
            float_name, dq_node = found
            if dq_node is not None:
                if tensor not in added:
                    added[tensor] = f"{tensor}{FLOAT_SUFFIX}"
                    values = dequantize_constant(dq_node, constants, opset)
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
        if node.op_type not in _QDQ_OPS and node.name and any(name in dq_outputs for name in node.input)
    ]


def remove_all_qdq(qdq_model: onnx.ModelProto) -> onnx.ModelProto:
    """The float graph behind a Q/DQ model: :func:`remove_qdq_for_nodes` for every node reading a DQ output."""
    return remove_qdq_for_nodes(qdq_model, dequantized_inputs(qdq_model))
