"""The ``loo`` ONNX ranking: each quantized node scored by how much output drift leaving it in float removes.

Method
------
For every quantized node of a Q/DQ model (``lowbit.qdq_graph.find_quantized_nodes``: the
compute nodes ``lowbit.qdq_graph.qdq_summary`` calls quantized), the model in which only that
node runs in float (``lowbit.qdq_edit.remove_qdq_for_nodes([node])``: its inputs read the float
tensors behind their Q/DQ pairs) is run on the sensitivity images, and its raw head output
``[B, 4 * reg_max + nc, A]`` is compared with the FP32 output through the torch sweep's
detection-aware drift (``lowbit.drift``). The score is

    score(node) = drift(full Q/DQ model) - drift(model with that node in float)

in the drift's unit (nats per image for ``output_drift_det_kl``): how much detection drift that one
node's quantization causes once its error has propagated through everything downstream of it,
with every other node quantized as deployed. Higher = more sensitive; a score can be slightly
negative when the node's quantization error happens to cancel others.

Every variant runs in one gated session (``lowbit.sensitivity_gated``, which also says what it costs and
how its variants compare with ``remove_qdq_for_nodes``). The one-node-alone counterpart, the workflow's
default ranking, is ``lowbit.sensitivity_single``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

from lowbit.drift import METRICS
from lowbit.sensitivity_gated import DEFAULT_REG_MAX, DriftRanking, check_metric, drift_ranking, variant_drifts

__all__ = ["METHOD_NAME", "loo_sensitivity", "method_description", "score_name"]

METHOD_NAME = "onnx_leave_one_out_drift"


def method_description(metric: str = "det_kl") -> str:
    """The report's ``method.description`` for :func:`loo_sensitivity` with ``metric`` (``det_kl`` or ``rel_mse``)."""
    return (
        "Leave-one-out on the deployed Q/DQ graph: for each quantized node, the full Q/DQ model with only "
        "that node in float (its inputs read the float tensors behind their QuantizeLinear/DequantizeLinear "
        "pairs, nothing recalibrated) is run on the sensitivity images, and the drift of the raw head output "
        f"from the FP32 output is measured with the torch sweep's `{METRICS[metric]}`. Score = drift of the "
        "full Q/DQ model minus drift of the leave-one-out model: the output drift that node's quantization "
        "causes after propagating through the rest of the quantized network. Q/DQ arithmetic simulated in "
        "float, as TensorRT's explicit quantization defines it."
    )


def score_name(metric: str = "det_kl") -> str:
    """The report's ``method.score``, e.g. ``loo_gain_output_drift_det_kl``."""
    return f"loo_gain_{METRICS[metric]}"


def loo_sensitivity(
    qdq_model: onnx.ModelProto,
    images: np.ndarray,
    providers: list[str],
    *,
    metric: str = "det_kl",
    reg_max: int = DEFAULT_REG_MAX,
    batch_size: int = 8,
    intra_op_threads: int = 0,
    work_dir: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> DriftRanking:
    """Rank the quantized nodes of ``qdq_model`` by leave-one-out output drift (see the module docstring).

    Args:
        qdq_model: the calibrated Q/DQ model (one image input, raw head output first).
        images: float32 ``[N, 3, H, W]`` preprocessed sensitivity images.
        providers: ONNX Runtime providers (``CPUExecutionProvider``, ``CUDAExecutionProvider`` ...).
        metric: ``det_kl`` or ``rel_mse`` (``lowbit.drift.METRICS``).
        reg_max: DFL bins per box side of the head output.
        batch_size: images per run when the model's batch dim is symbolic (else its static batch).
        intra_op_threads: ``SessionOptions.intra_op_num_threads`` (0 = ORT default).
        work_dir: where the gated model is written briefly (system temp dir when None).
        progress: called with ``(batches done, images in the batch)``.

    Returns:
        :class:`lowbit.sensitivity_gated.DriftRanking`; cost: ``3 + len(scored nodes)`` runs per batch in one
        session; a node without a gate scores 0.

    Raises:
        UserError: no quantized node, unknown metric, images or output of the wrong shape, bad providers.
    """
    check_metric(metric)
    start = time.perf_counter()
    run = variant_drifts(
        qdq_model,
        images,
        providers,
        lambda node, scored: {node},  # only this node in float
        label="loo",
        reg_max=reg_max,
        batch_size=batch_size,
        intra_op_threads=intra_op_threads,
        work_dir=work_dir,
        progress=progress,
    )
    key = METRICS[metric]
    full = run.drifts["full"][key]
    scores = {n.name: (full - run.drifts[n.name][key] if n.name in run.drifts else 0.0) for n in run.nodes}
    method = {"name": METHOD_NAME, "description": method_description(metric), "score": score_name(metric)}
    return drift_ranking(run, scores, method, metric=metric, reg_max=reg_max, images=int(images.shape[0]), start=start)
