"""Leave-one-out sensitivity of each quantized node, measured on the deployed Q/DQ graph (no ``.pt`` needed).

Method
------
For every quantized node of a Q/DQ model (``lowbit.qdq_graph.find_quantized_nodes``: the
compute nodes ``lowbit.qdq_graph.qdq_summary`` calls quantized), the model in which only that
node runs in float (``lowbit.qdq_edit.remove_qdq_for_nodes([node])``: its inputs read the float
tensors behind their Q/DQ pairs) is run on the sensitivity images, and its raw head output
``[B, 4 * reg_max + nc, A]`` is compared with the FP32 output through the torch sweep's
detection-aware drift (``lowbit.sensitivity_torch.drift_sums``/``finish_scores``). The score is

    score(node) = drift(full Q/DQ model) - drift(model with that node in float)

in the drift's unit (nats per image for ``output_drift_det_kl``): how much detection drift that one
node's quantization causes once its error has propagated through everything downstream of it,
with every other node quantized as deployed. Higher = more sensitive; a score can be slightly
negative when the node's quantization error happens to cancel others.

One session for every variant
-----------------------------
Building ~100 leave-one-out models and sessions would cost more than running them (and a CUDA
session's cuDNN search runs again each time). Instead one *gated* graph holds every variant: each
input of a node that reads a Q/DQ pair becomes ``Where(gate, dequantized, float)``, with one boolean
scalar graph input (gate) per node. All gates on = the Q/DQ model; all off = the FP32 graph; one gate
off = that node's leave-one-out model, exactly the graph ``remove_qdq_for_nodes`` builds. Per batch
of images the FP32 output is computed once and every variant is compared with it, so nothing but
running sums is kept. Inputs dequantized from stored quantized constants have no float value other
than the dequantized one, so they need no gate (as in ``remove_qdq_for_nodes``).

Cost: ``3 + nodes`` full inferences per image (FP32, full Q/DQ, every scored node in float, and
each leave-one-out). For a ~100-node detector at 640 px that is minutes on ORT's CPU EP per image
batch of a few images, and seconds on the CUDA EP: on CPU, score few images.

With ``ORT_ENABLE_ALL`` a leave-one-out variant and the edited model of ``remove_qdq_for_nodes``
agree to float rounding only (ORT fuses the two graphs differently; with optimizations disabled they
are bit-identical), and a rounding difference can flip a downstream Q/DQ rounding.

Quantization is simulated as the Q/DQ arithmetic in float (the gates keep ONNX Runtime from fusing
INT8 Q/DQ groups into integer kernels), which is what TensorRT's explicit quantization follows and
what ``lowbit.sensitivity_onnx`` measures locally.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from lowbit import sensitivity_report
from lowbit.errors import UserError
from lowbit.logs import get_logger
from lowbit.qdq_edit import constant_values, float_source
from lowbit.qdq_graph import QuantizedNode, find_quantized_nodes
from lowbit.sensitivity_torch import METRICS, drift_sums, finish_scores

log = get_logger("sensitivity_loo")

METHOD_NAME = "onnx_leave_one_out_drift"
SINGLE_METHOD_NAME = "onnx_one_at_a_time_drift"
VARIANTS = ("loo", "single")  # leave one node out of the full Q/DQ model; quantize one node alone
GATE_PREFIX = "__loo_gate_"
DEFAULT_REG_MAX = 16  # DFL bins per box side in YOLOv10


def method_description(metric: str = "det_kl", variant: str = "loo") -> str:
    """The report's ``method.description`` for :func:`loo_sensitivity` with ``metric`` (``det_kl`` or ``rel_mse``)."""
    if variant == "single":
        return (
            "One node at a time on the deployed Q/DQ graph: for each quantized node, the model with only that "
            "node quantized (every other node reads the float tensors behind its QuantizeLinear/DequantizeLinear "
            "pairs; scales as calibrated) is run on the sensitivity images, and the drift of the raw head output "
            f"from the FP32 output is measured with the torch sweep's `{METRICS[metric]}`: the same score as the "
            "torch sweep, on the ONNX graph that is deployed. Q/DQ arithmetic simulated in float."
        )
    return (
        "Leave-one-out on the deployed Q/DQ graph: for each quantized node, the full Q/DQ model with only "
        "that node in float (its inputs read the float tensors behind their QuantizeLinear/DequantizeLinear "
        "pairs, nothing recalibrated) is run on the sensitivity images, and the drift of the raw head output "
        f"from the FP32 output is measured with the torch sweep's `{METRICS[metric]}`. Score = drift of the "
        "full Q/DQ model minus drift of the leave-one-out model: the output drift that node's quantization "
        "causes after propagating through the rest of the quantized network. Q/DQ arithmetic simulated in "
        "float, as TensorRT's explicit quantization defines it."
    )


def score_name(metric: str = "det_kl", variant: str = "loo") -> str:
    """The report's ``method.score``, e.g. ``loo_gain_output_drift_det_kl`` or ``output_drift_det_kl``."""
    return METRICS[metric] if variant == "single" else f"loo_gain_{METRICS[metric]}"


# ----------------------------------------------------------------------------------------------------------------------
# The gated graph


def build_gated_model(qdq_model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, str]]:
    """Copy of ``qdq_model`` where every node reading a Q/DQ pair can be switched to float by a gate input.

    Returns:
        ``(model, gates)``: ``gates`` maps node name -> its boolean scalar graph input (True = quantized
        as in ``qdq_model``, False = float inputs). Nodes reading only DQs of stored constants get none.
    """
    model = onnx.ModelProto()
    model.CopyFrom(qdq_model)
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output if out}
    constants = constant_values(graph)
    gates: dict[str, str] = {}
    new_nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") and node.name:
            for i, tensor in enumerate(node.input):
                found = float_source(tensor, producers, constants)
                if found is None or found[1] is not None:
                    continue
                gate = gates.setdefault(node.name, f"{GATE_PREFIX}{len(gates)}")
                gated = f"{tensor}__loo_{gate[len(GATE_PREFIX) :]}_{i}"
                new_nodes.append(helper.make_node("Where", [gate, tensor, found[0]], [gated], name=f"{gated}_where"))
                node.input[i] = gated
        new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.input.extend(helper.make_tensor_value_info(g, onnx.TensorProto.BOOL, []) for g in gates.values())
    return model, gates


def gate_feeds(gates: dict[str, str], floated: set[str]) -> dict[str, np.ndarray]:
    """Feeds for the gate inputs: the nodes in ``floated`` run in float, every other gated node quantized."""
    return {gate: np.array(name not in floated) for name, gate in gates.items()}


# ----------------------------------------------------------------------------------------------------------------------
# Scoring


@dataclass
class LooResult:
    """Leave-one-out scores, ready for ``lowbit.sensitivity_report.make_report``.

    Attributes:
        layers: ranked rows (``rank``, ``name``, ``op_type``, ``weight``, ``onnx_node``, ``score``).
        method: ``name``, ``description``, ``score``, ``higher_is_more_sensitive``, ``settings``.
        reference: drift with every node quantized (``all_layers_quantized``) and with every scored node
            in float (``no_layer_quantized``: what the unscored Q/DQ pairs leave), in the score's metric.
        drifts: per variant (``full``, ``scored_in_float``, each node name) every metric of
            ``finish_scores``.
        images: images scored; ``providers``: the session's providers; ``wall_s``: seconds.
    """

    layers: list[dict[str, Any]]
    method: dict[str, Any]
    reference: dict[str, float]
    drifts: dict[str, dict[str, float]] = field(default_factory=dict)
    images: int = 0
    providers: list[str] = field(default_factory=list)
    wall_s: float = 0.0


def _batches(images: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for start in range(0, images.shape[0], batch_size):
        yield np.ascontiguousarray(images[start : start + batch_size], dtype=np.float32)


def _image_input(session, gates: dict[str, str], images: np.ndarray, batch_size: int) -> tuple[str, int]:
    """Name of the image input and the batch size to run (the model's static batch, if it has one)."""
    gate_names = set(gates.values())
    inputs = [i for i in session.get_inputs() if i.name not in gate_names]
    if len(inputs) != 1:
        raise UserError(f"the Q/DQ model has {len(inputs)} inputs; expected one image input", flag="--qdq-path")
    if images.ndim != 4 or images.shape[0] < 1:
        raise UserError(
            f"sensitivity images have shape {list(images.shape)}; expected [N, 3, H, W]", flag="--calib-path"
        )
    declared = inputs[0].shape[0] if inputs[0].shape else None
    if isinstance(declared, int) and declared > 0:
        if images.shape[0] % declared:
            raise UserError(
                f"the model's batch is fixed to {declared}; give a multiple of {declared} images", flag="--num-images"
            )
        return inputs[0].name, declared
    return inputs[0].name, max(1, int(batch_size))


def _check_output(output: np.ndarray, reg_max: int) -> None:
    if output.ndim != 3 or output.shape[1] <= 4 * reg_max:
        raise UserError(
            f"model output {list(output.shape)} is not a raw head [B, 4 * reg_max + nc, A] with reg_max {reg_max}",
            flag="--reg-max",
        )


def drift_device(providers_used: list[str]) -> str:
    """Where the drift of each run is computed: on the GPU when the session runs on CUDA and torch sees one (a
    5 MB copy per run instead of CPU double-precision math that would dominate a ~5 ms CUDA run), else the CPU."""
    import torch

    return "cuda" if "CUDAExecutionProvider" in providers_used and torch.cuda.is_available() else "cpu"


def _accumulate(session, input_name, gates, variants, images, batch_size, reg_max, progress, device="cpu"):
    """Running :func:`drift_sums` per variant over every batch (FP32 reference computed once per batch).

    Returns ``(sums, timing_s)``; ``timing_s`` splits the wall time into ``run`` (``session.run``) and ``drift``.
    """
    import torch

    output = session.get_outputs()[0].name
    everything = set(gates)
    sums: dict[str, dict[str, float]] = {name: {} for name in variants}
    timing = {"run": 0.0, "drift": 0.0}
    for index, batch in enumerate(_batches(images, batch_size)):
        t0 = time.perf_counter()
        (reference,) = session.run([output], {input_name: batch, **gate_feeds(gates, everything)})
        timing["run"] += time.perf_counter() - t0
        _check_output(reference, reg_max)
        reference_t = torch.from_numpy(reference).to(device)
        for name, floated in variants.items():
            t0 = time.perf_counter()
            (quantized,) = session.run([output], {input_name: batch, **gate_feeds(gates, floated)})
            t1 = time.perf_counter()
            part = drift_sums(reference_t, torch.from_numpy(quantized).to(device), reg_max)
            timing["run"] += t1 - t0
            timing["drift"] += time.perf_counter() - t1
            sums[name] = {key: sums[name].get(key, 0.0) + value for key, value in part.items()}
        if progress is not None:
            progress(index + 1, batch.shape[0])
    return sums, {k: round(v, 3) for k, v in timing.items()}


def _gated_session(gated: onnx.ModelProto, providers: list[str], intra_op_threads: int, work_dir: Path | None):
    """A session over the gated graph through ``lowbit.ort_session.build_session`` (it reads a file)."""
    from lowbit.ort_session import build_session

    with tempfile.TemporaryDirectory(dir=work_dir, prefix="loo_") as tmp:
        path = Path(tmp) / "gated.onnx"
        onnx.save(gated, str(path))
        return build_session(path, providers, intra_op_threads=intra_op_threads)


def _rows(nodes: list[QuantizedNode], scores: dict[str, float]) -> list[dict[str, Any]]:
    entries = [
        {"name": n.name, "op_type": n.op_type, "weight": n.weight, "onnx_node": n.name, "score": scores[n.name]}
        for n in nodes
    ]
    return sensitivity_report.rank_layers(entries)


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
    variant: str = "loo",
) -> LooResult:
    """Rank the quantized nodes of ``qdq_model`` by leave-one-out output drift (see the module docstring).

    With ``variant="single"`` each node is scored alone instead: only that node quantized, every other
    one in float, score = that model's drift from FP32 (the torch sweep's method, on the ONNX graph).

    Args:
        qdq_model: the calibrated Q/DQ model (one image input, raw head output first).
        images: float32 ``[N, 3, H, W]`` preprocessed sensitivity images.
        providers: ONNX Runtime providers (``CPUExecutionProvider``, ``CUDAExecutionProvider`` ...).
        metric: ``det_kl`` or ``rel_mse`` (``lowbit.sensitivity_torch.METRICS``).
        reg_max: DFL bins per box side of the head output.
        batch_size: images per run when the model's batch dim is symbolic (else its static batch).
        intra_op_threads: ``SessionOptions.intra_op_num_threads`` (0 = ORT default).
        work_dir: where the gated model is written briefly (system temp dir when None).
        progress: called with ``(batches done, images in the batch)``.
        variant: ``loo`` (leave one out of the full Q/DQ model) or ``single`` (one node quantized alone).

    Returns:
        :class:`LooResult`; cost: ``3 + len(scored nodes)`` runs per batch in one session.

    Raises:
        UserError: no quantized node, unknown metric, images or output of the wrong shape, bad providers.
    """
    if metric not in METRICS:
        raise UserError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}", flag="--metric")
    if variant not in VARIANTS:
        raise UserError(f"--method variant must be one of {', '.join(VARIANTS)}, got {variant!r}", flag="--method")
    start = time.perf_counter()
    nodes = find_quantized_nodes(qdq_model.graph)
    if not nodes:
        raise UserError("the Q/DQ model has no quantized node; nothing to score", flag="--qdq-path")
    gated, gates = build_gated_model(qdq_model)
    session, info = _gated_session(gated, providers, intra_op_threads, work_dir)
    input_name, batch = _image_input(session, gates, images, batch_size)
    scored = [n.name for n in nodes if n.name in gates]
    floated_per_node = {name: ({name} if variant == "loo" else set(scored) - {name}) for name in scored}
    variants = {"full": set(), "scored_in_float": set(scored), **floated_per_node}
    device = drift_device(info["providers_used"])
    log.info("%s over %d nodes, %d images, batch %d, %s, drift on %s", variant, len(scored), images.shape[0], batch,
             providers, device)  # fmt: skip
    sums, timing = _accumulate(session, input_name, gates, variants, images, batch, reg_max, progress, device)
    log.info("session.run %.1f s, drift %.1f s", timing["run"], timing["drift"])
    drifts = {name: finish_scores(s) for name, s in sums.items()}
    key = METRICS[metric]
    full = drifts["full"][key]
    if variant == "loo":
        scores = {n.name: (full - drifts[n.name][key] if n.name in drifts else 0.0) for n in nodes}
    else:
        scores = {n.name: (drifts[n.name][key] if n.name in drifts else 0.0) for n in nodes}
    method = {
        "name": METHOD_NAME if variant == "loo" else SINGLE_METHOD_NAME,
        "description": method_description(metric, variant),
        "score": score_name(metric, variant),
        "higher_is_more_sensitive": True,
        "settings": {"metric": key, "reg_max": reg_max, "batch_size": batch, "providers": info["providers_used"],
                     "drift_device": device},
        "timing_s": timing,
    }
    reference = {"all_layers_quantized": full, "no_layer_quantized": drifts["scored_in_float"][key]}
    return LooResult(
        layers=_rows(nodes, scores),
        method=method,
        reference=reference,
        drifts=drifts,
        images=int(images.shape[0]),
        providers=list(info["providers_used"]),
        wall_s=time.perf_counter() - start,
    )
