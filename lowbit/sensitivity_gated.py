"""Output drift of Q/DQ-graph variants that run chosen nodes in float, all in one gated ONNX Runtime session.

The engine of the ONNX output-drift rankings, ``lowbit.sensitivity_single`` (each node quantized alone)
and ``lowbit.sensitivity_loo`` (each node left out of the full Q/DQ model): they differ only in which
nodes each variant runs in float and in how a variant's drift becomes a node's score.

One session for every variant
-----------------------------
Building ~100 edited models and sessions would cost more than running them (and a CUDA session's
cuDNN search runs again each time). Instead one *gated* graph holds every variant: each input of a
node that reads a Q/DQ pair becomes ``Where(gate, dequantized, float)``, with one boolean scalar graph
input (gate) per node. All gates on = the Q/DQ model; all off = the FP32 graph; one gate off = that
node's leave-one-out model, exactly the graph ``lowbit.qdq_edit.remove_qdq_for_nodes`` builds. Per
batch of images the FP32 output is computed once and every variant is compared with it through
``lowbit.drift`` (the torch sweep's detection-aware drift), so nothing but running sums is kept.
Inputs dequantized from stored quantized constants have no float value other than the dequantized
one, so they need no gate (as in ``remove_qdq_for_nodes``).

Cost: ``3 + nodes`` full inferences per image (FP32, full Q/DQ, every scored node in float, and one
per node). For a ~100-node detector at 640 px that is minutes on ORT's CPU EP per image batch of a
few images, and seconds on the CUDA EP: on CPU, score few images.

With ``ORT_ENABLE_ALL`` a gated variant and the edited model of ``remove_qdq_for_nodes`` agree to
float rounding only (ORT fuses the two graphs differently; with optimizations disabled they are
bit-identical), and a rounding difference can flip a downstream Q/DQ rounding.

Quantization is simulated as the Q/DQ arithmetic in float (the gates keep ONNX Runtime from fusing
INT8 Q/DQ groups into integer kernels), which is what TensorRT's explicit quantization follows and
what ``lowbit.sensitivity_local`` measures locally.

The drift is computed in numpy (float64) on the CPU; torch is imported only when the session runs on
CUDA, to keep the drift beside it on the GPU (:func:`drift_device`), and is never required.
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
from lowbit.drift import METRICS, add_sums, drift_sums, drift_sums_torch, finish_scores
from lowbit.errors import UserError
from lowbit.logs import get_logger
from lowbit.qdq_edit import float_source
from lowbit.qdq_graph import QuantizedNode, constant_values, find_quantized_nodes

__all__ = [
    "DEFAULT_REG_MAX",
    "GATE_PREFIX",
    "DriftRanking",
    "VariantDrifts",
    "build_gated_model",
    "check_metric",
    "drift_device",
    "drift_ranking",
    "gate_feeds",
    "image_drifts",
    "variant_drifts",
]

# The log lines keep the logger name they had before the engine left lowbit.sensitivity_loo.
log = get_logger("sensitivity_loo")

GATE_PREFIX = "__loo_gate_"
DEFAULT_REG_MAX = 16  # DFL bins per box side in YOLOv10


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
# Running every variant


@dataclass
class VariantDrifts:
    """Every variant's drift from FP32, and how the variants ran.

    Attributes:
        nodes: every quantized node of the Q/DQ model, in graph order (nodes without a gate are not run alone).
        drifts: per variant (``full``: every node quantized; ``scored_in_float``: every gated node in float;
            each gated node's name: that node's variant) every metric of ``lowbit.drift.finish_scores``.
        batch_size: images per run; ``providers``: the session's providers; ``device``: where the drift ran.
        timing_s: ``run`` (``session.run``) and ``drift`` seconds.
    """

    nodes: list[QuantizedNode]
    drifts: dict[str, dict[str, float]]
    batch_size: int
    providers: list[str]
    device: str
    timing_s: dict[str, float]


@dataclass
class DriftRanking:
    """An output-drift ranking, ready for ``lowbit.sensitivity_report.make_report``.

    Attributes:
        layers: ranked rows (``rank``, ``name``, ``op_type``, ``weight``, ``onnx_node``, ``score``).
        method: ``name``, ``description``, ``score``, ``higher_is_more_sensitive``, ``settings``, ``timing_s``.
        reference: drift with every node quantized (``all_layers_quantized``) and with every scored node
            in float (``no_layer_quantized``: what the unscored Q/DQ pairs leave), in the score's metric.
        drifts: :attr:`VariantDrifts.drifts`.
        images: images scored; ``providers``: the session's providers; ``wall_s``: seconds.
    """

    layers: list[dict[str, Any]]
    method: dict[str, Any]
    reference: dict[str, float]
    drifts: dict[str, dict[str, float]] = field(default_factory=dict)
    images: int = 0
    providers: list[str] = field(default_factory=list)
    wall_s: float = 0.0


def check_metric(metric: str) -> None:
    """Refuse a ``--metric`` that is not a key of ``lowbit.drift.METRICS``."""
    if metric not in METRICS:
        raise UserError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}", flag="--metric")


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
    if "CUDAExecutionProvider" not in providers_used:
        return "cpu"
    try:
        import torch  # optional, and only beside a CUDA session: the CPU path never imports it
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def _drift_against(reference: np.ndarray, reg_max: int, device: str) -> Callable[[np.ndarray], dict[str, float]]:
    """``quantized -> drift sums`` against ``reference``: numpy on the CPU, torch tensors on the GPU."""
    if device == "cpu":
        return lambda quantized: drift_sums(reference, quantized, reg_max)
    import torch  # drift_device chose the GPU, so torch is there

    reference_t = torch.from_numpy(reference).to(device)
    return lambda quantized: drift_sums_torch(reference_t, torch.from_numpy(quantized).to(device), reg_max)


def _accumulate(session, input_name, gates, variants, images, batch_size, reg_max, progress, device="cpu"):
    """Running :func:`lowbit.drift.drift_sums` per variant over every batch (FP32 reference computed once per batch).

    Returns ``(sums, timing_s)``; ``timing_s`` splits the wall time into ``run`` (``session.run``) and ``drift``.
    """
    output = session.get_outputs()[0].name
    everything = set(gates)
    sums: dict[str, dict[str, float]] = {name: {} for name in variants}
    timing = {"run": 0.0, "drift": 0.0}
    for index, batch in enumerate(_batches(images, batch_size)):
        t0 = time.perf_counter()
        (reference,) = session.run([output], {input_name: batch, **gate_feeds(gates, everything)})
        timing["run"] += time.perf_counter() - t0
        _check_output(reference, reg_max)
        drift_from_reference = _drift_against(reference, reg_max, device)
        for name, floated in variants.items():
            t0 = time.perf_counter()
            (quantized,) = session.run([output], {input_name: batch, **gate_feeds(gates, floated)})
            t1 = time.perf_counter()
            part = drift_from_reference(quantized)
            timing["run"] += t1 - t0
            timing["drift"] += time.perf_counter() - t1
            sums[name] = add_sums(sums[name], part)
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


def _open_gated(qdq_model: onnx.ModelProto, images: np.ndarray, providers, batch_size, intra_op_threads, work_dir):
    """The gated session of ``qdq_model``: ``(session, info, gates, image input name, batch size to run)``."""
    gated, gates = build_gated_model(qdq_model)
    session, info = _gated_session(gated, providers, intra_op_threads, work_dir)
    input_name, batch = _image_input(session, gates, images, batch_size)
    return session, info, gates, input_name, batch


def image_drifts(
    qdq_model: onnx.ModelProto,
    images: np.ndarray,
    providers: list[str],
    *,
    metric: str = "det_kl",
    reg_max: int = DEFAULT_REG_MAX,
    batch_size: int = 8,
    intra_op_threads: int = 0,
    work_dir: Path | None = None,
) -> np.ndarray:
    """Each image's output drift of the full Q/DQ model from FP32, in ``metric``'s unit: float64 ``[N]``.

    Two runs of the gated graph per image batch (every gate off: FP32; every gate on: the Q/DQ model), the
    drift of each image computed on its own rows, on the device :func:`variant_drifts` would use. What
    ``--image-selection drift`` ranks images by: the images where the quantized model strays furthest.

    Raises:
        UserError: as :func:`variant_drifts`.
    """
    check_metric(metric)
    session, info, gates, input_name, batch = _open_gated(
        qdq_model, images, providers, batch_size, intra_op_threads, work_dir
    )
    output, everything, key = session.get_outputs()[0].name, set(gates), METRICS[metric]
    device = drift_device(info["providers_used"])
    drifts: list[float] = []
    for chunk in _batches(images, batch):
        (reference,) = session.run([output], {input_name: chunk, **gate_feeds(gates, everything)})
        (quantized,) = session.run([output], {input_name: chunk, **gate_feeds(gates, set())})
        _check_output(reference, reg_max)
        for i in range(chunk.shape[0]):
            sums = _drift_against(reference[i : i + 1], reg_max, device)(quantized[i : i + 1])
            drifts.append(finish_scores(sums)[key])
    return np.asarray(drifts, dtype=np.float64)


def variant_drifts(
    qdq_model: onnx.ModelProto,
    images: np.ndarray,
    providers: list[str],
    floated_for: Callable[[str, list[str]], set[str]],
    *,
    label: str,
    reg_max: int = DEFAULT_REG_MAX,
    batch_size: int = 8,
    intra_op_threads: int = 0,
    work_dir: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> VariantDrifts:
    """Run the full Q/DQ model, every gated node in float, and one variant per gated node; pool their drifts.

    Args:
        qdq_model: the calibrated Q/DQ model (one image input, raw head output first).
        images: float32 ``[N, 3, H, W]`` preprocessed sensitivity images.
        providers: ONNX Runtime providers (``CPUExecutionProvider``, ``CUDAExecutionProvider`` ...).
        floated_for: ``(node, every gated node) -> the nodes that node's variant runs in float``.
        label: the method's name in the log (``single``, ``loo``).
        reg_max: DFL bins per box side of the head output.
        batch_size: images per run when the model's batch dim is symbolic (else its static batch).
        intra_op_threads: ``SessionOptions.intra_op_num_threads`` (0 = ORT default).
        work_dir: where the gated model is written briefly (system temp dir when None).
        progress: called with ``(batches done, images in the batch)``.

    Raises:
        UserError: no quantized node, images or output of the wrong shape, bad providers.
    """
    nodes = find_quantized_nodes(qdq_model.graph)
    if not nodes:
        raise UserError("the Q/DQ model has no quantized node; nothing to score", flag="--qdq-path")
    session, info, gates, input_name, batch = _open_gated(
        qdq_model, images, providers, batch_size, intra_op_threads, work_dir
    )
    scored = [n.name for n in nodes if n.name in gates]
    floated_per_node = {name: floated_for(name, scored) for name in scored}
    variants = {"full": set(), "scored_in_float": set(scored), **floated_per_node}
    device = drift_device(info["providers_used"])
    log.info(
        "%s over %d nodes, %d images, batch %d, %s, drift on %s",
        label,
        len(scored),
        images.shape[0],
        batch,
        providers,
        device,
    )
    sums, timing = _accumulate(session, input_name, gates, variants, images, batch, reg_max, progress, device)
    log.info("session.run %.1f s, drift %.1f s", timing["run"], timing["drift"])
    drifts = {name: finish_scores(s) for name, s in sums.items()}
    return VariantDrifts(nodes, drifts, batch, list(info["providers_used"]), device, timing)


def drift_ranking(
    run: VariantDrifts,
    scores: dict[str, float],
    method: dict[str, Any],
    *,
    metric: str,
    reg_max: int,
    images: int,
    start: float,
) -> DriftRanking:
    """The ranking of ``scores`` (node -> score) with the method's ``name``/``description``/``score`` in ``method``.

    ``start`` is the ``time.perf_counter()`` the method started at (``wall_s`` counts from it).
    """
    key = METRICS[metric]
    entries = [
        {"name": n.name, "op_type": n.op_type, "weight": n.weight, "onnx_node": n.name, "score": scores[n.name]}
        for n in run.nodes
    ]
    method = {
        **method,
        "higher_is_more_sensitive": True,
        "settings": {
            "metric": key,
            "reg_max": reg_max,
            "batch_size": run.batch_size,
            "providers": run.providers,
            "drift_device": run.device,
        },
        "timing_s": run.timing_s,
    }
    reference = {
        "all_layers_quantized": run.drifts["full"][key],
        "no_layer_quantized": run.drifts["scored_in_float"][key],
    }
    return DriftRanking(
        layers=sensitivity_report.rank_layers(entries),
        method=method,
        reference=reference,
        drifts=run.drifts,
        images=images,
        providers=list(run.providers),
        wall_s=time.perf_counter() - start,
    )
