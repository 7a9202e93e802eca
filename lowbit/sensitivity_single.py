"""The ``single`` ONNX ranking: each quantized node scored by the output drift of the model where it alone is quantized.

Method
------
For every quantized node of a Q/DQ model (``lowbit.qdq_graph.find_quantized_nodes``), the model in
which only that node reads its QuantizeLinear/DequantizeLinear pairs (every other node reads the float
tensors behind its pairs; scales as calibrated) is run on the sensitivity images, and its raw head
output ``[B, 4 * reg_max + nc, A]`` is compared with the FP32 output through the torch sweep's
detection-aware drift (``lowbit.drift``). The score is that drift, in its unit (nats per image for
``output_drift_det_kl``): the torch sweep's one-layer-at-a-time score, on the ONNX graph that is
deployed. Higher = more sensitive. This is the ranking the workflow uses by default.

Every variant runs in one gated session (``lowbit.sensitivity_gated``): ``3 + nodes`` inferences per
image. The leave-one-out counterpart, which scores a node inside the fully quantized model, is
``lowbit.sensitivity_loo``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

from lowbit.drift import METRICS
from lowbit.sensitivity_gated import DEFAULT_REG_MAX, DriftRanking, check_metric, drift_ranking, variant_drifts

__all__ = ["METHOD_NAME", "method_description", "score_name", "single_sensitivity"]

METHOD_NAME = "onnx_one_at_a_time_drift"


def method_description(metric: str = "det_kl") -> str:
    """The report's ``method.description`` for :func:`single_sensitivity` with ``metric`` (``det_kl``, ``rel_mse``)."""
    return (
        "One node at a time on the deployed Q/DQ graph: for each quantized node, the model with only that "
        "node quantized (every other node reads the float tensors behind its QuantizeLinear/DequantizeLinear "
        "pairs; scales as calibrated) is run on the sensitivity images, and the drift of the raw head output "
        f"from the FP32 output is measured with the torch sweep's `{METRICS[metric]}`: the same score as the "
        "torch sweep, on the ONNX graph that is deployed. Q/DQ arithmetic simulated in float."
    )


def score_name(metric: str = "det_kl") -> str:
    """The report's ``method.score``: the drift itself, e.g. ``output_drift_det_kl``."""
    return METRICS[metric]


def single_sensitivity(
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
    """Rank the quantized nodes of ``qdq_model`` by the output drift of each one quantized alone.

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
        :class:`lowbit.sensitivity_gated.DriftRanking`; a node without a gate scores 0.

    Raises:
        UserError: no quantized node, unknown metric, images or output of the wrong shape, bad providers.
    """
    check_metric(metric)
    start = time.perf_counter()
    run = variant_drifts(
        qdq_model,
        images,
        providers,
        lambda node, scored: set(scored) - {node},  # every other gated node in float
        label="single",
        reg_max=reg_max,
        batch_size=batch_size,
        intra_op_threads=intra_op_threads,
        work_dir=work_dir,
        progress=progress,
    )
    key = METRICS[metric]
    scores = {n.name: (run.drifts[n.name][key] if n.name in run.drifts else 0.0) for n in run.nodes}
    method = {"name": METHOD_NAME, "description": method_description(metric), "score": score_name(metric)}
    return drift_ranking(run, scores, method, metric=metric, reg_max=reg_max, images=int(images.shape[0]), start=start)
