"""Drift of a raw YOLO head output from its FP32 reference: the scores every sensitivity ranking is made of.

The raw one-to-one head output is ``[B, 4 * reg_max + nc, A]``: the box DFL logits first (four sides of
``reg_max`` bins each), then the class logits, for ``A`` anchors. Two scores, both always computed:

``output_drift_det_kl`` (``det_kl``): detection-aware drift in nats per image. With ``p = sigmoid`` of the
FP32 class logits and ``q`` of the quantized ones, for every image, anchor and class the Bernoulli KL
``p log(p/q) + (1-p) log((1-p)/(1-q))``; plus, for every anchor, the KL between the FP32 and quantized
softmax distributions over the ``reg_max`` DFL bins of each box side, weighted by the anchor's FP32
confidence ``max_c p``. Both summed over anchors and averaged over images.

``output_drift_rel_mse`` (``rel_mse``): ``sum ||q - fp||^2 / sum ||fp||^2`` over every element.

:func:`drift_sums` gives additive sums of one batch (float64, numpy: the ONNX rankings run without torch);
:func:`add_sums` accumulates them and :func:`finish_scores` turns the total into scores.
:func:`drift_sums_torch` is the same arithmetic on torch tensors, for outputs that already live on a GPU
(the torch sweep; the ONNX rankings on CUDA): it imports torch when called, never at import.
"""

from __future__ import annotations

import numpy as np

__all__ = ["METRICS", "add_sums", "drift_sums", "drift_sums_torch", "finish_scores"]

# --metric choice -> score name written to the report
METRICS: dict[str, str] = {
    "det_kl": "output_drift_det_kl",
    "rel_mse": "output_drift_rel_mse",
}


class _NumpyOps:
    """The array operations :func:`_sums` needs, on numpy float64 arrays."""

    @staticmethod
    def log_sigmoid(x):
        # torch's log_sigmoid formula: stable for logits far from 0 on either side.
        return np.minimum(x, 0.0) - np.log1p(np.exp(-np.abs(x)))

    @staticmethod
    def sigmoid(x):
        return 1.0 / (1.0 + np.exp(-x))

    @staticmethod
    def log_softmax(x, axis: int):
        shifted = x - x.max(axis=axis, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))

    exp = staticmethod(np.exp)

    @staticmethod
    def amax(x, axis: int):
        return x.max(axis=axis)

    @staticmethod
    def sum(x, axis=None):
        return np.sum(x, axis=axis)


class _TorchOps:
    """The same operations on torch float64 tensors (any device); torch is imported only when built."""

    def __init__(self):
        import torch  # only here: the numpy path must work where torch is not installed
        import torch.nn.functional as F

        self.log_sigmoid, self.sigmoid, self.exp = F.logsigmoid, torch.sigmoid, torch.exp
        self.log_softmax = lambda x, axis: F.log_softmax(x, dim=axis)
        self.amax = lambda x, axis: x.amax(dim=axis)
        self.sum = lambda x, axis=None: torch.sum(x) if axis is None else x.sum(dim=axis)


def _sums(ref, qnt, reg_max: int, ops) -> dict[str, float]:
    """The drift formulas of the module docstring, written once for both array types (``ops``)."""
    batch = ref.shape[0]
    box_channels = 4 * reg_max
    sq_err = float(ops.sum((qnt - ref) ** 2))
    sq_ref = float(ops.sum(ref**2))

    ref_cls, qnt_cls = ref[:, box_channels:], qnt[:, box_channels:]
    p = ops.sigmoid(ref_cls)
    # Bernoulli KL(p || q) in log space: stable for logits far from 0.
    cls_kl = p * (ops.log_sigmoid(ref_cls) - ops.log_sigmoid(qnt_cls)) + (1 - p) * (
        ops.log_sigmoid(-ref_cls) - ops.log_sigmoid(-qnt_cls)
    )
    confidence = ops.amax(p, axis=1)  # [B, A]

    ref_box = ref[:, :box_channels].reshape(batch, 4, reg_max, -1)
    qnt_box = qnt[:, :box_channels].reshape(batch, 4, reg_max, -1)
    log_p_box = ops.log_softmax(ref_box, axis=2)
    log_q_box = ops.log_softmax(qnt_box, axis=2)
    box_kl = ops.sum(ops.exp(log_p_box) * (log_p_box - log_q_box), axis=(1, 2))  # [B, A]

    return {
        "sq_err": sq_err,
        "sq_ref": sq_ref,
        "cls_kl": float(ops.sum(cls_kl)),
        "box_kl": float(ops.sum(confidence * box_kl)),
        "images": batch,
    }


def drift_sums(reference: np.ndarray, quantized: np.ndarray, reg_max: int) -> dict[str, float]:
    """Additive drift statistics of one batch of raw head outputs, in float64.

    Args:
        reference: FP32 raw output ``[B, 4 * reg_max + nc, A]`` (box DFL logits first, then class logits).
        quantized: the same from the quantized model.
        reg_max: DFL bins per box side (16 in YOLOv10).

    Returns:
        ``{"sq_err", "sq_ref", "cls_kl", "box_kl", "images"}``: sums over the batch; see
        :func:`finish_scores` for how they become scores.
    """
    ref = np.asarray(reference, dtype=np.float64)
    qnt = np.asarray(quantized, dtype=np.float64)
    return _sums(ref, qnt, reg_max, _NumpyOps)


def drift_sums_torch(reference, quantized, reg_max: int) -> dict[str, float]:
    """:func:`drift_sums` on torch tensors (any device), in float64; the same keys and formulas."""
    return _sums(reference.double(), quantized.double(), reg_max, _TorchOps())


def add_sums(total: dict[str, float], part: dict[str, float]) -> dict[str, float]:
    """``total + part`` key by key (a missing key counts as 0): running :func:`drift_sums` over batches."""
    return {key: total.get(key, 0.0) + value for key, value in part.items()}


def finish_scores(sums: dict[str, float]) -> dict[str, float]:
    """Turn accumulated :func:`drift_sums` into ``{score name: value}`` for every metric."""
    images = max(sums["images"], 1)
    return {
        METRICS["det_kl"]: (sums["cls_kl"] + sums["box_kl"]) / images,
        METRICS["rel_mse"]: sums["sq_err"] / max(sums["sq_ref"], 1e-30),
    }
