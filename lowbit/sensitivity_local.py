"""The ``local`` ONNX ranking: each quantized node scored by the error it adds itself, on the FP32 activations.

Method
------
Given a Q/DQ model (ModelOpt output) the FP32 graph is recovered by bypassing every
QuantizeLinear -> DequantizeLinear pair. For each node that consumes a dequantized tensor (a Conv
with quantized input and weight, an Add, a Concat, ...) a *shadow* copy is added that reads the FP32
graph's own input tensors through copies of that node's Q/DQ pairs (same scales, zero points, axes).
Both outputs are reduced in-graph to two scalars, ``sum((y_qdq - y_fp)^2)`` and ``sum(y_fp^2)``. One
ONNX Runtime pass per image therefore scores every node at once, and only scalars leave the session,
so memory stays that of one forward pass. Because each shadow node sees the *FP32* activations, its
error is the error that node adds when quantized, not the error it inherits from quantized layers
upstream. The score is the relative MSE pooled over images, ``sum_images sse / sum_images ref``
(higher = more sensitive; the SQNR in dB is ``-10 log10(score)``). It is a local measure: it does not
say how much of the error survives to the detector's output (``lowbit.sensitivity_single`` and
``lowbit.sensitivity_loo`` measure that).

:func:`local_sensitivity` runs it all and first checks that the recovered float graph reproduces the
FP32 model. The report these scores go into is built by ``lowbit.sensitivity_run``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from lowbit.errors import UserError
from lowbit.logs import get_logger
from lowbit.qdq_graph import QDQPair, QuantizedNode, find_quantized_nodes, qdq_pairs, tensor_consumers

__all__ = [
    "MAX_FP32_RECOVERY_DIFF",
    "METHOD_DESCRIPTION",
    "METHOD_NAME",
    "METHOD_SCORE",
    "LocalScores",
    "build_local_error_model",
    "fp32_recovery_diff",
    "iter_batches",
    "local_error_session",
    "local_sensitivity",
    "relative_mse",
    "score_local_errors",
    "sqnr_db",
]

# The scoring lines were onnx_layer_sensitivity.py's; they keep its logger name, so its log file reads as before.
log = get_logger("onnx_layer_sensitivity")

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

MAX_FP32_RECOVERY_DIFF = 1e-3  # relative: the scoring graph's float path must be the FP32 model itself


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
    k: int,
    original: onnx.NodeProto,
    qnode: QuantizedNode,
    pairs: dict[str, QDQPair],
    bypass: dict[str, str],
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
        raise UserError("the Q/DQ model has no node that reads a dequantized tensor; nothing to score", flag=model_flag)
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
# Scoring helpers


def iter_batches(array: np.ndarray, count: int) -> Iterator[np.ndarray]:
    """The first ``count`` images of an [N,3,H,W] (memory-mapped) array, one contiguous [1,3,H,W] copy at a time."""
    for i in range(min(count, array.shape[0])):
        yield np.ascontiguousarray(array[i : i + 1], dtype=np.float32)


def sqnr_db(score: float) -> float:
    """SQNR in dB of a relative-MSE score (inf for 0)."""
    return math.inf if score <= 0 else -10.0 * math.log10(score)


# ----------------------------------------------------------------------------------------------------------------------
# The whole ranking


@dataclass
class LocalScores:
    """Per quantized node, the local error it introduces; and how the scoring ran.

    Attributes:
        nodes: the quantized nodes, in graph order; ``scores``: their relative MSE, float64, same order.
        images: images scored; ``drift``: the recovered float graph's largest relative difference from the
            FP32 model on image 0; ``providers``: the session's; ``build_s``/``score_s``: seconds.
    """

    nodes: list[QuantizedNode]
    scores: np.ndarray
    images: int
    drift: float
    providers: list[str]
    build_s: float
    score_s: float


def fp32_recovery_diff(session, reference_outputs: list[str], onnx_path: Path, image: np.ndarray) -> float:
    """Largest relative difference between the scoring graph's float path and ``onnx_path`` on one image."""
    from lowbit.ort_session import build_session

    fp32_session, _ = build_session(onnx_path, ["CPUExecutionProvider"])
    expected = fp32_session.run(None, {fp32_session.get_inputs()[0].name: image})
    del fp32_session
    recovered = session.run(reference_outputs, {session.get_inputs()[0].name: image})
    return max(float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-12)) for a, b in zip(expected, recovered))


def local_sensitivity(
    qdq_model: onnx.ModelProto,
    onnx_path: Path,
    calib: np.ndarray,
    num_images: int,
    providers: list[str],
    flag: str = "--qdq-path",
) -> LocalScores:
    """Build the local-error graph of ``qdq_model``, check its float path, and score every quantized node.

    Args:
        qdq_model: the calibrated Q/DQ model of ``onnx_path`` (float32 scales).
        onnx_path: the FP32 model the recovered float graph must reproduce (to ``MAX_FP32_RECOVERY_DIFF``).
        calib: float32 ``[N, 3, H, W]`` images; the first ``num_images`` are scored, one at a time.
        providers: ONNX Runtime providers, highest priority first; all must be granted.
        flag: the flag that named ``qdq_model`` (``--qdq-path``, or "quantized model"), carried by errors.

    Raises:
        UserError: a provider not granted, or a Q/DQ model whose float graph is not ``onnx_path``'s.
    """
    t0 = time.perf_counter()
    error_model, nodes, reference_outputs = build_local_error_model(qdq_model)
    session = local_error_session(error_model, providers)
    del error_model
    if session.get_providers()[: len(providers)] != list(providers):
        raise UserError(
            f"--providers: ONNX Runtime could not create {', '.join(providers)} "
            f"(the session got {', '.join(session.get_providers())})",
            flag="--providers",
        )
    build_s = time.perf_counter() - t0
    drift = fp32_recovery_diff(session, reference_outputs, onnx_path, np.ascontiguousarray(calib[:1]))
    log.info("recovered FP32 graph vs --onnx-path on image 0: max |diff| / max |out| = %.2e", drift)
    if drift > MAX_FP32_RECOVERY_DIFF:
        raise UserError(
            f"{flag}: its float graph does not reproduce --onnx-path (relative difference {drift:.2e}); "
            "score a Q/DQ model made from this exact FP32 model",
            flag=flag,
        )
    log.info("scoring %d quantized nodes on %d images (graph built in %.1f s)", len(nodes), num_images, build_s)
    t0 = time.perf_counter()

    def images():
        for i, image in enumerate(iter_batches(calib, num_images)):
            yield image
            log.info("image %d/%d scored (%.1f s)", i + 1, num_images, time.perf_counter() - t0)

    sse, ref, count = score_local_errors(session, nodes, images(), session.get_inputs()[0].name)
    scores = relative_mse(sse, ref)
    if not np.all(np.isfinite(scores)):
        raise RuntimeError("non-finite sensitivity scores; see the log")
    return LocalScores(nodes, scores, count, drift, session.get_providers(), build_s, time.perf_counter() - t0)
