"""Float16 QuantizeLinear on ONNX Runtime: how the installed runtime rounds it, whether a model's accuracy measured
here depends on that, and a rewrite of a model in which those nodes compute in float32 (with float16's limits,
``FP16_MIN_NORMAL``, ``FP16_MIN_SUBNORMAL`` and ``FP16_MAX``).

A QuantizeLinear whose input is float16 must round ``x / scale`` to the nearest integer, ties to even
(ONNX spec). ONNX Runtime's CPU kernel for float16 input truncated toward zero instead (onnxruntime
issue 18576; seen on 1.24.4, fixed by 1.30.0), which biases every quantized weight and activation by
half a step towards zero. :func:`probe_fp16_quantize_rounding` runs one 8-element QuantizeLinear on the
installed onnxruntime to tell which behaviour it has; TensorRT and the CUDA EP round to nearest even
and are not affected. :func:`fp16_quantize_hazard` is the one-line warning the quantizer and the
evaluator record; :func:`with_fp32_quantize` rewrites a model so that every float16 QuantizeLinear is
computed in float32 (a Cast of its input and a float32 copy of its scale, same values): by the ONNX
spec the same quantized integers, and on a truncating onnxruntime the correctly rounded ones.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

from lowbit.ort_session import build_session
from lowbit.qdq_edit import drop_unused_initializers
from lowbit.qdq_graph import inferred_elem_types

__all__ = [
    "FP16_MAX",
    "FP16_MIN_NORMAL",
    "FP16_MIN_SUBNORMAL",
    "ROUNDING_NEAREST_EVEN",
    "ROUNDING_TOWARD_ZERO",
    "fp16_quantize_hazard",
    "fp16_quantize_nodes",
    "probe_fp16_quantize_rounding",
    "with_fp32_quantize",
]

# float16's limits: smallest normal and subnormal numbers, largest finite one
FP16_MIN_NORMAL = float(np.finfo(np.float16).tiny)  # 6.103515625e-05
FP16_MIN_SUBNORMAL = float(np.finfo(np.float16).smallest_subnormal)  # 5.960464477539063e-08
FP16_MAX = float(np.finfo(np.float16).max)  # 65504.0

ROUNDING_NEAREST_EVEN = "nearest_even"
ROUNDING_TOWARD_ZERO = "toward_zero"


def _load(model) -> onnx.ModelProto:
    return model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))


def fp16_quantize_nodes(model, types: dict[str, int] | None = None) -> list[str]:
    """Names of the QuantizeLinear nodes whose input is float16, in graph order.

    Args:
        model: ``ModelProto`` or path.
        types: :func:`lowbit.qdq_graph.inferred_elem_types` of ``model``, when already computed.
    """
    model = _load(model)
    types = inferred_elem_types(model) if types is None else types
    return [
        node.name
        for node in model.graph.node
        if node.op_type == "QuantizeLinear" and types.get(node.input[0]) == TensorProto.FLOAT16
    ]


def probe_fp16_quantize_rounding(providers: Iterable[str] = ("CPUExecutionProvider",)) -> dict[str, Any]:
    """Run one float16 QuantizeLinear on the installed onnxruntime and name its rounding.

    Inputs 0.6, 1.5, 2.5, 2.7, -0.6, -1.5, -2.7 with scale 1: round-half-to-even gives
    1, 2, 2, 3, -1, -2, -3; truncation gives 0, 1, 2, 2, 0, -1, -2.

    Returns:
        ``{"onnxruntime": version, "provider": used, "rounding": "nearest_even" | "toward_zero" |
        "other" | "unavailable", "outputs": [...], "error": str | None}``.
    """
    values = np.array([0.6, 1.5, 2.5, 2.7, -0.6, -1.5, -2.7], dtype=np.float16)
    nearest = [1, 2, 2, 3, -1, -2, -3]
    toward_zero = [0, 1, 2, 2, 0, -1, -2]
    try:
        import onnxruntime as ort
        from onnx import helper, numpy_helper
    except ImportError as exc:
        return {"onnxruntime": None, "provider": None, "rounding": "unavailable", "outputs": None, "error": str(exc)}
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"])],
        "fp16_quantize_probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [len(values)])],
        [helper.make_tensor_value_info("y", TensorProto.INT8, [len(values)])],
        [numpy_helper.from_array(np.array(1.0, np.float16), "s"), numpy_helper.from_array(np.array(0, np.int8), "z")],
    )
    # IR 9 / opset 19: the oldest that allows a float16 scale, loadable by every onnxruntime >= 1.16
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)
    onnx.checker.check_model(probe)
    try:
        session, _ = build_session(probe, list(providers), log_severity_level=3, model_flag="fp16 rounding probe")
        out = session.run(None, {"x": values})[0].astype(int).tolist()
        used = session.get_providers()[0]
    except Exception as exc:  # noqa: BLE001 - an EP or kernel missing: report, never fail the inspection
        return {
            "onnxruntime": ort.__version__,
            "provider": None,
            "rounding": "unavailable",
            "outputs": None,
            "error": str(exc),
        }
    rounding = ROUNDING_NEAREST_EVEN if out == nearest else ROUNDING_TOWARD_ZERO if out == toward_zero else "other"
    return {"onnxruntime": ort.__version__, "provider": used, "rounding": rounding, "outputs": out, "error": None}


def with_fp32_quantize(model):
    """Copy of ``model`` where every float16 QuantizeLinear computes in float32.

    The input gets a ``Cast`` to float (constant inputs are converted in place of the cast) and
    the scale a float32 copy holding the same fp16 values, so by the ONNX spec the quantized
    integers are unchanged; on an onnxruntime whose float16 QuantizeLinear truncates (see
    :func:`probe_fp16_quantize_rounding`) they become the correctly rounded ones. Everything else
    (DequantizeLinear, the fp16 compute between pairs) is left as it is.

    Returns:
        ``(new_model, count)``: the rewritten ``ModelProto`` and the number of nodes changed.
    """
    import copy

    from onnx import helper, numpy_helper

    model = copy.deepcopy(_load(model))
    graph = model.graph
    types = inferred_elem_types(model)
    inits = {i.name: i for i in graph.initializer}
    new_nodes = []
    inputs32: dict[str, str] = {}
    scales32: dict[str, str] = {}
    changed = 0
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and types.get(node.input[0]) == TensorProto.FLOAT16:
            source_name, scale_name = node.input[0], node.input[1]
            if scale_name in inits:  # a scale computed at run time is left as it is
                if source_name not in inputs32:
                    as32 = f"{source_name}_fp32_for_quantize"
                    if source_name in inits:
                        values = numpy_helper.to_array(inits[source_name]).astype(np.float32)
                        graph.initializer.append(numpy_helper.from_array(values, as32))
                    else:
                        cast = helper.make_node("Cast", [source_name], [as32], to=TensorProto.FLOAT, name=as32)
                        new_nodes.append(cast)
                    inputs32[source_name] = as32
                if scale_name not in scales32:
                    scales32[scale_name] = f"{scale_name}_fp32_for_quantize"
                    scale = numpy_helper.to_array(inits[scale_name]).astype(np.float32)
                    graph.initializer.append(numpy_helper.from_array(scale, scales32[scale_name]))
                node.input[0] = inputs32[source_name]
                node.input[1] = scales32[scale_name]
                changed += 1
        new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    drop_unused_initializers(graph)
    return model, changed


def fp16_quantize_hazard(model, providers: Iterable[str] = ("CPUExecutionProvider",)) -> dict[str, Any] | None:
    """The float16-QuantizeLinear rounding hazard of running ``model`` on this onnxruntime, or None.

    Returns None when no QuantizeLinear takes float16 input, or when the installed onnxruntime
    rounds float16 QuantizeLinear to nearest even on ``providers``; otherwise
    ``{"fp16_quantize_inputs": N, "runtime": probe result, "message": one line}``.
    """
    count = len(fp16_quantize_nodes(model))
    if not count:
        return None
    runtime = probe_fp16_quantize_rounding(providers)
    if runtime.get("rounding") == ROUNDING_NEAREST_EVEN:
        return None
    message = (
        f"{count} QuantizeLinear nodes take float16 input and onnxruntime "
        f"{runtime.get('onnxruntime')} ({runtime.get('provider')}) rounds them {runtime.get('rounding')}: "
        "accuracy measured here is too low (TensorRT and the CUDA EP round to nearest even); evaluate the "
        "fp32-quantize rewrite (inspect_qdq_model.py --write-fp32-quantize) or quantize with high precision fp32"
    )
    return {"fp16_quantize_inputs": count, "runtime": runtime, "message": message}
