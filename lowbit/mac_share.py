"""Share of a model's convolution and matrix-multiply work that runs in low precision (INT8/FP8).

A cost axis that needs no TensorRT: what a TensorRT build of an explicitly quantized (Q/DQ) graph
runs in INT8/FP8 is, to first order, the Conv/MatMul/Gemm nodes whose inputs are quantized, and
those nodes are nearly all of a detector's arithmetic. So the share of their multiply-accumulates
(MACs) that are quantized orders variants the way their TensorRT latency would, without the noise of
CPU timings.

Rules:

* MACs per node: ``lowbit.onnx_stats.node_macs`` at the shapes ONNX shape inference gives (symbolic
  batch dims set to ``batch``); ``total_macs`` sums every Conv/MatMul/Gemm node.
* low precision: the node is in ``lowbit.qdq_graph.qdq_summary``'s ``quantized_nodes`` (a
  Conv/Gemm/MatMul with a constant weight counts when that weight comes through a DequantizeLinear;
  otherwise every non-constant input must come through one).
* dtype (``by_dtype`` key): the element type its quantized inputs are stored in (``int8``,
  ``float8e4m3fn`` ...): the zero point's type, else the QuantizeLinear ``output_dtype``, else the
  stored constant's type; several types are joined with ``+`` (``float8e4m3fn+int8``).
* ``unknown_nodes``: compute nodes whose MACs shape inference could not resolve; they are in
  neither ``total_macs`` nor ``low_precision_macs``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx

from lowbit.onnx_stats import (
    COMPUTE_OPS,
    graph_inputs,
    infer_shapes,
    load_model_proto,
    node_macs,
    resolve_input_shapes,
    shape_table,
    with_input_shapes,
)
from lowbit.qdq_graph import (
    constant_elem_types,
    qdq_summary,
    quant_dtype_name,
    quantize_output_type,
    tensor_producers,
)

__all__ = ["UNQUANTIZED", "MacShare", "low_precision_mac_share"]

UNQUANTIZED = "unknown"  # by_dtype key when a quantized node's element type cannot be read


@dataclass
class MacShare:
    """Low-precision share of the Conv/MatMul/Gemm MACs of one model.

    Attributes:
        total_macs: MACs of every Conv/MatMul/Gemm node with known shapes.
        low_precision_macs: MACs of those among them that run quantized.
        share: ``low_precision_macs / total_macs`` (0 when there are no MACs).
        by_dtype: low-precision MACs per quantized element type, e.g. ``{"int8": ...}``.
        unknown_nodes: compute nodes left out because their shapes are unknown.
        quantized_nodes: the compute nodes counted as low precision.
    """

    total_macs: int
    low_precision_macs: int
    share: float
    by_dtype: dict[str, int] = field(default_factory=dict)
    unknown_nodes: list[str] = field(default_factory=list)
    quantized_nodes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _quantized_dtype(node: onnx.NodeProto, producers: dict, constant_types: dict[str, int]) -> str:
    """Element types of the quantized tensors ``node`` reads, joined with ``+``."""
    types = set()
    for name in node.input:
        dq = producers.get(name)
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        code = constant_types.get(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
        source = producers.get(dq.input[0])
        if code is None and source is not None and source.op_type == "QuantizeLinear":
            code = quantize_output_type(source, constant_types)
        if code is None:
            code = constant_types.get(dq.input[0])
        types.add(quant_dtype_name(code) if code is not None else UNQUANTIZED)
    return "+".join(sorted(types)) or UNQUANTIZED


def low_precision_mac_share(
    model: onnx.ModelProto | str | Path,
    batch: int = 1,
    input_shapes: dict[str | None, list[int]] | None = None,
    flag: str = "--model",
) -> MacShare:
    """Share of Conv/MatMul/Gemm MACs of ``model`` that run in INT8/FP8 (see the module docstring).

    Args:
        model: a loaded ``ModelProto`` or the path of an ``.onnx`` file (weights need not be loaded).
        batch: size given to symbolic batch dims.
        input_shapes: shapes for other symbolic input dims (``lowbit.onnx_stats.parse_input_shapes``).
        flag: names the model in errors.

    Raises:
        UserError: not an ONNX model, or input shapes that cannot be resolved.
    """
    proto = model if isinstance(model, onnx.ModelProto) else load_model_proto(Path(model), flag)
    shapes, _ = resolve_input_shapes(graph_inputs(proto), input_shapes, batch)
    inferred = infer_shapes(with_input_shapes(proto, shapes))
    table = shape_table(inferred)
    graph = inferred.graph
    quantized = set(qdq_summary(graph)["quantized_nodes"])
    producers = tensor_producers(graph)
    constant_types = constant_elem_types(graph)
    total = low = 0
    by_dtype: dict[str, int] = {}
    unknown: list[str] = []
    counted: list[str] = []
    for node in graph.node:
        if node.op_type not in COMPUTE_OPS:
            continue
        macs = node_macs(node, table)
        if macs is None:
            unknown.append(node.name or node.output[0])
            continue
        total += macs
        if node.name in quantized:
            low += macs
            counted.append(node.name)
            dtype = _quantized_dtype(node, producers, constant_types)
            by_dtype[dtype] = by_dtype.get(dtype, 0) + macs
    share = low / total if total else 0.0
    return MacShare(total, low, share, dict(sorted(by_dtype.items())), unknown, counted)
