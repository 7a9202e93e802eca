"""Reading a Q/DQ ONNX graph: its constants and element types, who reads a tensor, which Q/DQ pairs exist, what
they quantize to, and which compute nodes run quantized.

Every module that looks at a quantized graph (session options, the evaluator's record, the fp16
inspection, the ONNX sensitivity sweep, the quantizer's checks, the MAC share) reads it through these
functions, so a "constant", a "quantized node" or a "Q/DQ pair" means the same thing everywhere.

Element-type names come from ``onnx.helper`` in two spellings: :func:`dtype_name` gives ONNX's own
(``FLOAT``, ``FLOAT16``, ``FLOAT8E4M3FN``), :func:`quant_dtype_name` the lower-case form metrics.json and
the report use for quantized types (``int8``, ``float8e4m3fn``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "QDQ_OPS",
    "QUANT_ELEM_TYPES",
    "WEIGHTED_OPS",
    "QDQPair",
    "QuantizedNode",
    "constant_arrays",
    "constant_elem_types",
    "constant_values",
    "declared_elem_types",
    "dtype_name",
    "element_bits",
    "find_quantized_nodes",
    "inferred_elem_types",
    "is_fp8_name",
    "is_integer_name",
    "load_graph_proto",
    "qdq_info",
    "qdq_pairs",
    "qdq_summary",
    "quant_dtype_name",
    "quant_max_magnitude",
    "quantize_output_type",
    "tensor_consumers",
    "tensor_producers",
]

QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
# Ops whose second input is a weight: they count as quantized when that weight comes through a DQ.
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# Element types a Q/DQ pair quantizes to (a DQ of an int32 bias, for instance, is not a quantized type).
QUANT_ELEM_TYPES = frozenset(
    {
        TensorProto.INT8,
        TensorProto.UINT8,
        TensorProto.INT16,
        TensorProto.UINT16,
        TensorProto.INT4,
        TensorProto.UINT4,
        TensorProto.FLOAT8E4M3FN,
        TensorProto.FLOAT8E4M3FNUZ,
        TensorProto.FLOAT8E5M2,
        TensorProto.FLOAT8E5M2FNUZ,
    }
)


# ----------------------------------------------------------------------------------------------------------------------
# element types


def dtype_name(elem_type: int | None) -> str | None:
    """ONNX's name of an element type code (``FLOAT``, ``FLOAT16``, ``INT8`` ...); ``TYPE_<n>`` if unknown."""
    if elem_type is None:
        return None
    try:
        return helper.tensor_dtype_to_string(elem_type).rsplit(".", 1)[-1]
    except (KeyError, ValueError):
        return f"TYPE_{elem_type}"


def quant_dtype_name(elem_type: int) -> str:
    """Lower-case name of a quantized element type, as metrics.json spells it (``int8``, ``float8e4m3fn``)."""
    return str(dtype_name(elem_type)).lower()


def is_fp8_name(name: str) -> bool:
    """True for the lower-case names of the float8 types (``float8e4m3fn``, ``float8e5m2`` ...)."""
    return name.startswith("float8")


def is_integer_name(name: str) -> bool:
    """True for the lower-case names of integer quantized types (``int8``, ``uint4`` ...)."""
    return name.startswith(("int", "uint"))


def _ml_info(elem_type: int):
    """``ml_dtypes.iinfo`` or ``finfo`` of an element type (sub-byte and float8 types included), or None."""
    import ml_dtypes  # installed with onnx, which uses it for the float8 and 4-bit types

    try:
        np_type = helper.tensor_dtype_to_np_dtype(elem_type)
    except (KeyError, ValueError, TypeError):
        return None
    for info in (ml_dtypes.iinfo, ml_dtypes.finfo):
        try:
            return info(np_type)
        except (ValueError, TypeError):
            continue
    return None


def element_bits(elem_type: int) -> int:
    """Stored width in bits of one element (4 for INT4/UINT4/FLOAT4E2M1, 0 for STRING)."""
    if elem_type == TensorProto.STRING:
        return 0
    info = _ml_info(elem_type)
    if info is not None:
        return int(info.bits)
    return int(helper.tensor_dtype_to_np_dtype(elem_type).itemsize) * 8


def quant_max_magnitude(elem_type: int | None) -> float | None:
    """Largest magnitude a quantized type holds (128 for int8, 255 for uint8, 448 for float8e4m3fn), or None."""
    if elem_type not in QUANT_ELEM_TYPES:
        return None
    info = _ml_info(elem_type)
    if info is None:
        return None
    return float(max(abs(float(info.min)), abs(float(info.max))))


# ----------------------------------------------------------------------------------------------------------------------
# graph structure


def load_graph_proto(model: onnx.ModelProto | str | Path) -> onnx.ModelProto:
    """``model`` itself, or the model at that path loaded without external data.

    Q/DQ types and structure live in nodes and small initializers (scales, zero-points); external data
    files hold only large tensors, so they are not read.
    """
    if isinstance(model, onnx.ModelProto):
        return model
    return onnx.load(str(model), load_external_data=False)


def tensor_consumers(graph: Any) -> dict[str, list[Any]]:
    """The nodes of an ``onnx.GraphProto`` that read each tensor, by tensor name (empty optional inputs skipped)."""
    table: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            if name:
                table.setdefault(name, []).append(node)
    return table


def tensor_producers(graph: Any) -> dict[str, Any]:
    """The node of an ``onnx.GraphProto`` that writes each tensor, by tensor name."""
    return {out: node for node in graph.node for out in node.output if out}


@dataclass
class QDQPair:
    """One QuantizeLinear -> DequantizeLinear pair (``quantize`` is None for a DQ of a stored constant)."""

    dequantize: onnx.NodeProto
    quantize: onnx.NodeProto | None
    float_input: str  # the FP32 tensor the pair quantizes (or the DQ output itself when there is no Q)


def qdq_pairs(graph: onnx.GraphProto) -> dict[str, QDQPair]:
    """Every DequantizeLinear of ``graph`` keyed by its output tensor name."""
    producers = tensor_producers(graph)
    pairs: dict[str, QDQPair] = {}
    for node in graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        source = producers.get(node.input[0])
        if source is not None and source.op_type == "QuantizeLinear":
            pairs[node.output[0]] = QDQPair(node, source, source.input[0])
        else:
            pairs[node.output[0]] = QDQPair(node, None, node.output[0])
    return pairs


def constant_values(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """Initializers and ``Constant`` node outputs of ``graph`` (a ``Constant``'s tensor renamed to its output), by name."""
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


def constant_arrays(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """:func:`constant_values` as numpy arrays."""
    return {name: numpy_helper.to_array(tensor) for name, tensor in constant_values(graph).items()}


def constant_elem_types(graph: onnx.GraphProto) -> dict[str, int]:
    """Element type of every initializer and ``Constant`` output, by name."""
    return {name: tensor.data_type for name, tensor in constant_values(graph).items()}


def _value_info_types(graph: onnx.GraphProto) -> dict[str, int]:
    types: dict[str, int] = {}
    for vi in list(graph.value_info) + list(graph.input) + list(graph.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    return types


def declared_elem_types(graph: onnx.GraphProto) -> dict[str, int]:
    """Element types the graph states without inference: value_info, I/O, then initializers and ``Constant`` outputs."""
    return {**_value_info_types(graph), **constant_elem_types(graph)}


def inferred_elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor ONNX type inference can name, then :func:`declared_elem_types`' constants, then
    each ``Cast`` output's ``to`` type. Inference is best effort: on failure the declared types are used."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001 - inference is best effort; declared types are used then
        inferred = model
    types = {**_value_info_types(inferred.graph), **constant_elem_types(model.graph)}
    for node in model.graph.node:
        if node.op_type == "Cast":
            for attr in node.attribute:
                if attr.name == "to":
                    types[node.output[0]] = attr.i
    return types


def quantize_output_type(node: onnx.NodeProto, types: dict[str, int]) -> int:
    """Element type a QuantizeLinear writes: its zero-point's type, else ``output_dtype``, else its declared
    output type, else uint8 (the ONNX default when neither zero-point nor ``output_dtype`` is given)."""
    if len(node.input) > 2 and node.input[2] and node.input[2] in types:
        return types[node.input[2]]
    for attr in node.attribute:
        if attr.name == "output_dtype" and attr.i:
            return attr.i
    return types.get(node.output[0], TensorProto.UINT8)


# ----------------------------------------------------------------------------------------------------------------------
# what is quantized


def _quantized_node_rule(graph: onnx.GraphProto):
    """The predicate of :func:`qdq_summary`'s rule for one graph."""
    nodes = list(graph.node)
    constants = {init.name for init in graph.initializer}
    dq_outputs = {out for n in nodes if n.op_type == "DequantizeLinear" for out in n.output}
    dq_of_constant = {n.output[0] for n in nodes if n.op_type == "DequantizeLinear" and n.input[0] in constants}

    def quantized(node) -> bool:
        if node.op_type in QDQ_OPS:
            return False
        if (
            node.op_type in WEIGHTED_OPS
            and len(node.input) > 1
            and (node.input[1] in constants or node.input[1] in dq_of_constant)
        ):
            return node.input[1] in dq_of_constant
        variable = [i for i in node.input if i and i not in constants and i not in dq_of_constant]
        return bool(variable) and all(i in dq_outputs for i in variable)

    return quantized


def qdq_summary(model: onnx.ModelProto | onnx.GraphProto) -> dict[str, Any]:
    """Q/DQ pair counts and the compute nodes that run quantized.

    A Conv/ConvTranspose/Gemm/MatMul with a constant weight is quantized when that weight comes
    through a DequantizeLinear; its activation input alone does not count, since a Q/DQ pair on a
    tensor is shared by every consumer, excluded ones included. Any other node is quantized when all
    of its non-constant inputs come through a DequantizeLinear.

    Returns:
        ``qdq_pairs`` (DQ nodes reading a Q), ``quantize_linear``, ``dequantize_linear`` (node
        counts), ``quantized_nodes`` (sorted names).
    """
    graph = getattr(model, "graph", model)
    nodes = list(graph.node)
    quantized = _quantized_node_rule(graph)
    q_outputs = {out for n in nodes if n.op_type == "QuantizeLinear" for out in n.output}
    return {
        "qdq_pairs": sum(1 for n in nodes if n.op_type == "DequantizeLinear" and n.input[0] in q_outputs),
        "quantize_linear": sum(1 for n in nodes if n.op_type == "QuantizeLinear"),
        "dequantize_linear": sum(1 for n in nodes if n.op_type == "DequantizeLinear"),
        "quantized_nodes": sorted(n.name for n in nodes if quantized(n)),
    }


def qdq_info(model: onnx.ModelProto | str | Path) -> dict[str, Any]:
    """Describe the explicit quantization of a graph.

    Args:
        model: a loaded ``ModelProto`` or a path to an ``.onnx`` file.

    Returns:
        ``{"qdq_pairs": int, "quant_dtypes": [str, ...], "is_fp8": bool, "is_qdq": bool}`` where
        ``qdq_pairs`` counts QuantizeLinear nodes whose output feeds a DequantizeLinear, and
        ``quant_dtypes`` are the sorted quantized element types (``"int8"``, ``"float8e4m3fn"``, ...)
        read from each QuantizeLinear (:func:`quantize_output_type`), or from the input of a
        DequantizeLinear that no Q precedes (pre-quantized weights; int32 biases are not listed).
    """
    graph = load_graph_proto(model).graph
    types = declared_elem_types(graph)
    consumers = tensor_consumers(graph)
    dtypes: set[str] = set()
    pairs = 0
    q_outputs = set()
    for node in graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        q_outputs.add(node.output[0])
        if any(c.op_type == "DequantizeLinear" for c in consumers.get(node.output[0], [])):
            pairs += 1
        code = quantize_output_type(node, types)
        dtypes.add(quant_dtype_name(code if code in QUANT_ELEM_TYPES else TensorProto.UINT8))
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] in q_outputs:
            continue
        code = types.get(node.input[0])
        if code is None and len(node.input) > 2 and node.input[2]:
            code = types.get(node.input[2])
        if code in QUANT_ELEM_TYPES:
            dtypes.add(quant_dtype_name(code))
    quant_dtypes = sorted(dtypes)
    return {
        "qdq_pairs": pairs,
        "quant_dtypes": quant_dtypes,
        "is_fp8": any(is_fp8_name(d) for d in quant_dtypes),
        "is_qdq": pairs > 0 or bool(quant_dtypes),
    }


@dataclass
class QuantizedNode:
    """A compute node of the Q/DQ graph that runs quantized (:func:`qdq_summary`'s rule)."""

    name: str
    op_type: str
    index: int  # position in the Q/DQ graph's node list
    quantized_inputs: list[int] = field(default_factory=list)  # input positions fed by a DQ
    weight: str | None = None  # float weight initializer behind a quantized input, if any


def find_quantized_nodes(graph: onnx.GraphProto) -> list[QuantizedNode]:
    """Compute nodes that run quantized (:func:`qdq_summary`'s rule), in graph order.

    A node that only reads a Q/DQ pair shared with another consumer (e.g. a Conv left unquantized,
    or a Concat/Split beside quantized consumers) is not a quantization target and is not listed.
    """
    pairs = qdq_pairs(graph)
    initializers = {init.name for init in graph.initializer}
    quantized = _quantized_node_rule(graph)
    nodes = []
    for index, node in enumerate(graph.node):
        if not quantized(node):
            continue
        positions = [i for i, name in enumerate(node.input) if name in pairs]
        if not positions:
            continue
        weight = next(
            (pairs[node.input[i]].float_input for i in positions if pairs[node.input[i]].float_input in initializers),
            None,
        )
        nodes.append(QuantizedNode(node.name, node.op_type, index, positions, weight))
    return nodes
