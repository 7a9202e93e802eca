"""Per-layer quantization sensitivity of an ultralytics YOLOv10, simulated in PyTorch with ModelOpt.

Method: one layer at a time
---------------------------
1. The model is prepared exactly as the raw-head ONNX export is (:func:`lowbit.export.prepare_raw_head_model`):
   Conv+BN fused, one-to-many branch dropped, the head returning the raw one-to-one output
   ``[B, 4 * reg_max + nc, A]``. Torch module names therefore map 1:1 onto the exported Conv nodes:
   ``model.2.cv1.conv`` is ``/model.2/cv1/conv/Conv`` with weight initializer ``model.2.cv1.conv.weight``.
2. The FP32 output on the sample images is kept as the reference, together with the output of every
   top-level block (``model.<i>``).
3. ModelOpt torch quantization (``mtq.quantize`` with ``FP8_DEFAULT_CFG`` or ``INT8_DEFAULT_CFG``,
   ``max`` calibration) inserts and calibrates weight and input quantizers on the same images.
4. All quantizers are disabled; then, for one layer at a time, that layer's enabled quantizers
   (weight and input) are switched on, the images are run, and the drift of the raw head output from
   the FP32 reference is the layer's score. The calibrated model is kept and only quantizers are
   toggled, and each pass starts at the layer's own top-level block from the cached FP32 outputs of
   the blocks before it (which one quantized layer further on cannot change), so a layer costs at
   most one inference pass over the images, and a head layer only the head's.

Why not ModelOpt ``auto_quantize``: with an MSE loss against the model's own FP32 output its
gradient-based score is exactly 0 for every layer (the loss and its gradient vanish at the FP32
point), which ranks nothing.

Scores (higher = more sensitive): ``lowbit.drift``'s ``output_drift_det_kl`` (default; detection-aware,
nats per image) and ``output_drift_rel_mse``. Both are always computed; the report's ``score`` is the
chosen one (``metric``) and the other is kept in the run's manifest. The report and its folder are
``lowbit.sensitivity_torch_report``'s; the weights, images and device, ``lowbit.sensitivity_torch_inputs``'.

What ModelOpt quantizes in YOLOv10: every ``Conv2d`` (weight + input) and the SPPF ``MaxPool2d``
(input only; one module called three times, so one layer here, three MaxPool nodes in ONNX). The PSA
attention products are plain ``@`` in torch, which ModelOpt torch does not quantize, so they are not
scored here (the ONNX-native tool sees them as MatMul nodes). Quantized modules that the raw-head
forward never runs (the DFL conv, used only for decoding) are listed in the manifest, not scored.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowbit import sensitivity_report
from lowbit.drift import METRICS, add_sums, drift_sums_torch, finish_scores
from lowbit.logs import get_logger
from lowbit.sensitivity_torch_inputs import QUANT_FORMATS, SweepInputs, import_mtq, prepare_model
from lowbit.sensitivity_torch_report import format_report, report_dir, report_layers

__all__ = [
    "QuantLayer",
    "block_outputs",
    "drift_of",
    "exact_fp32",
    "forward_from",
    "fp32_cache",
    "quant_layers",
    "quantize_model",
    "report_dir",  # lowbit.sensitivity_torch_report's; the workflow imports it from here
    "run_sweep",
    "sweep_layers",
]

log = get_logger("sensitivity_torch")

# torch class name of a quantized module (without ModelOpt's "Quant" prefix) -> op_type in reports
_OP_TYPES = {
    "Conv1d": "Conv",
    "Conv2d": "Conv",
    "Conv3d": "Conv",
    "ConvTranspose2d": "ConvTranspose",
    "Linear": "Linear",
    "MaxPool2d": "MaxPool",
    "AvgPool2d": "AveragePool",
    "AdaptiveAvgPool2d": "GlobalAveragePool",
}


# ---------------------------------------------------------------------------------------------
# model, quantizers, sweep


@dataclass
class QuantLayer:
    """One module carrying ModelOpt quantizers.

    Attributes:
        name: torch module name in the fused model, e.g. ``model.2.cv1.conv``.
        op_type: ONNX-style op type (``Conv``, ``MaxPool``, ``Linear`` ...).
        weight: parameter name (``name + ".weight"``) or None for weightless ops.
        quantizers: the quantizers the config enabled (weight and/or input), toggled together.
        calls: times the module ran in one forward pass.
        block: index of the top-level block (``model.<block>....``) the module belongs to.
    """

    name: str
    op_type: str
    weight: str | None
    quantizers: list
    calls: int
    block: int


def _batches(images, batch_size: int) -> Iterator:
    for start in range(0, images.shape[0], batch_size):
        yield images[start : start + batch_size]


def block_outputs(model, batch) -> list:
    """Output of every top-level block of an ultralytics model, in order; the last is the model's output.

    The same loop as ultralytics' ``BaseModel._predict_once`` (a block reads the previous output, or the
    outputs of the earlier blocks its ``f`` names), keeping every output instead of only the reused ones.
    """
    outputs: list = []
    x = batch
    for block in model.model:
        if block.f != -1:
            x = outputs[block.f] if isinstance(block.f, int) else [x if j == -1 else outputs[j] for j in block.f]
        x = block(x)
        outputs.append(x)
    return outputs


def forward_from(model, start: int, batch, outputs: list):
    """Run ``model`` from top-level block ``start`` on, taking the earlier blocks' outputs from ``outputs``.

    With only layers of blocks ``>= start`` quantized, blocks before ``start`` compute exactly the FP32
    ``outputs`` already cached, so skipping them changes nothing but the time (for a layer in the head,
    only the head runs).

    Args:
        model: ultralytics model (``model.model`` is the block sequence).
        start: index of the first block to run.
        batch: the input batch ``[B, 3, S, S]`` (used when ``start`` is 0).
        outputs: :func:`block_outputs` of the FP32 model on ``batch``.

    Returns:
        The model's output for ``batch``.
    """
    y = list(outputs[:start])
    x = outputs[start - 1] if start > 0 else batch
    for block in model.model[start:]:
        if block.f != -1:
            x = y[block.f] if isinstance(block.f, int) else [x if j == -1 else y[j] for j in block.f]
        x = block(x)
        y.append(x)
    return x


def fp32_cache(model, images, batch_size: int) -> list[tuple[Any, list]]:
    """``(batch, block outputs)`` of the FP32 model for every batch of ``images`` (on the model's device).

    Memory: every block's FP32 activations for all images, about 110 MB per 640 px image for yolov10m.
    """
    import torch

    with torch.inference_mode():
        return [(batch, block_outputs(model, batch)) for batch in _batches(images, batch_size)]


def drift_of(model, cache: list[tuple[Any, list]], reg_max: int, start: int = 0) -> dict[str, float]:
    """All drift scores of ``model`` against the FP32 outputs in ``cache``, running blocks ``start`` on."""
    import torch

    total: dict[str, float] = {}
    with torch.inference_mode():
        for batch, outputs in cache:
            total = add_sums(total, drift_sums_torch(outputs[-1], forward_from(model, start, batch, outputs), reg_max))
    return finish_scores(total)


@contextlib.contextmanager
def exact_fp32():
    """Disable TF32 for the duration: its 10-bit mantissa would add a drift of its own to every score."""
    import torch

    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


class _LogWriter(io.TextIOBase):
    """File-like object that sends ModelOpt's ``print`` output to the log (debug level)."""

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if line.strip():
                log.debug("modelopt: %s", line.rstrip())
        return len(text)


def quantize_model(model, quant_format: str, images, batch_size: int):
    """Insert ModelOpt quantizers into ``model`` (in place) and calibrate them on ``images``.

    Args:
        model: fused raw-head model on its device.
        quant_format: a key of :data:`QUANT_FORMATS`.
        images: calibration batch source ``[N, 3, S, S]`` on the model's device.
        batch_size: images per forward pass.

    Returns:
        ``(model, calls)``: the quantized model and ``{module name: forward calls per pass}`` of
        every quantized module that the forward ran.
    """
    import torch

    mtq = import_mtq()
    config = getattr(mtq, QUANT_FORMATS[quant_format][1])
    calls: dict[str, int] = {}

    def forward_loop(m) -> None:
        hooks = []
        for name, module in m.named_modules():
            if _quantizers_of(module):
                hooks.append(module.register_forward_hook(lambda mod, inp, out, name=name: _count(calls, name)))
        try:
            with torch.no_grad():
                for batch in _batches(images, batch_size):
                    m(batch)
        finally:
            for hook in hooks:
                hook.remove()

    with contextlib.redirect_stdout(_LogWriter()):  # "Inserted N quantizers" and the like
        model = mtq.quantize(model, config, forward_loop)
    batches = math.ceil(images.shape[0] / batch_size)
    return model, {name: count // batches for name, count in calls.items()}


def _count(calls: dict[str, int], name: str) -> None:
    calls[name] = calls.get(name, 0) + 1


def _quantizers_of(module) -> list:
    """ModelOpt quantizers attached directly to ``module`` (weight, input, output)."""
    found = []
    for attr in ("weight_quantizer", "input_quantizer", "output_quantizer"):
        quantizer = getattr(module, attr, None)
        if quantizer is not None and hasattr(quantizer, "is_enabled"):
            found.append(quantizer)
    return found


def quant_layers(model, calls: dict[str, int]) -> tuple[list[QuantLayer], list[str]]:
    """Modules with at least one enabled quantizer, in module order.

    Returns:
        ``(layers, not_run)``: the layers the forward runs, and names of quantized modules it never
        runs (e.g. the DFL conv, which only decoding uses); those are not scored.
    """
    layers, not_run = [], []
    for name, module in model.named_modules():
        enabled = [q for q in _quantizers_of(module) if q.is_enabled]
        if not enabled:
            continue
        if name not in calls:
            not_run.append(name)
            continue
        torch_type = type(module).__name__
        torch_type = torch_type.removeprefix("Quant")
        has_weight = getattr(module, "weight", None) is not None
        layers.append(
            QuantLayer(
                name=name,
                op_type=_OP_TYPES.get(torch_type, torch_type),
                weight=f"{name}.weight" if has_weight else None,
                quantizers=enabled,
                calls=calls[name],
                block=int(name.split(".")[1]),
            )
        )
    return layers, not_run


def _set(quantizers: list, enabled: bool) -> None:
    for quantizer in quantizers:
        if enabled:
            quantizer.enable()
        else:
            quantizer.disable()


def sweep_layers(
    model,
    layers: list[QuantLayer],
    cache: list[tuple[Any, list]],
    reg_max: int,
    progress: Callable[[int, int, QuantLayer, dict[str, float]], None] | None = None,
    skip_unchanged_blocks: bool = True,
) -> dict[str, Any]:
    """Score every layer with only its own quantizers on, plus the all-on and all-off references.

    Args:
        model: the quantized model (quantizers enabled, as calibration left them).
        layers: the layers to score (:func:`quant_layers`).
        cache: :func:`fp32_cache` of the FP32 model.
        reg_max: DFL bins per box side.
        progress: called after each layer with ``(index, total, layer, scores)``.
        skip_unchanged_blocks: start each pass at the layer's top-level block (see :func:`forward_from`);
            False runs the whole model every time (same scores, slower).

    Returns:
        ``{"per_layer": {name: {score name: value}}, "all_layers_quantized": {...},
        "no_layer_quantized": {...}, "timings_s": {"references_s", "layers_s"}}``; ``all_layers_quantized``
        has every quantizer that was enabled on entry on. Leaves the quantizers as it found them.
    """
    # Every enabled quantizer of the model, not only those of ``layers``: a subset is swept with all others off.
    all_quantizers = [q for module in model.modules() for q in _quantizers_of(module) if q.is_enabled]
    t0 = time.perf_counter()
    all_on = drift_of(model, cache, reg_max)
    _set(all_quantizers, False)
    all_off = drift_of(model, cache, reg_max)
    t_loop = time.perf_counter()
    per_layer: dict[str, dict[str, float]] = {}
    try:
        for index, layer in enumerate(layers):
            _set(layer.quantizers, True)
            try:
                start = layer.block if skip_unchanged_blocks else 0
                per_layer[layer.name] = drift_of(model, cache, reg_max, start)
            finally:
                _set(layer.quantizers, False)
            if progress is not None:
                progress(index, len(layers), layer, per_layer[layer.name])
    finally:
        _set(all_quantizers, True)
    return {
        "per_layer": per_layer,
        "all_layers_quantized": all_on,
        "no_layer_quantized": all_off,
        "timings_s": {"references_s": t_loop - t0, "layers_s": time.perf_counter() - t_loop},
    }


# ---------------------------------------------------------------------------------------------
# the whole sweep


def run_sweep(
    inputs: SweepInputs,
    run_dir: Path,
    t_start: float | None = None,
    layer_filter: Callable[[list[QuantLayer]], list[QuantLayer]] | None = None,
) -> list[dict[str, Any]]:
    """Reference pass, then per format: quantize a copy, sweep, write the report.

    Args:
        inputs: validated inputs.
        run_dir: the run directory; reports go to :func:`report_dir`.
        t_start: ``time.perf_counter()`` of the run start (default: now); ``wall_s`` counts from it.
        layer_filter: optional selection of the layers to score (timing experiments); a report of a
            filtered sweep is not written.

    Returns:
        One dict per format: ``report`` (the JSON content), ``paths`` (written files; empty when
        filtered), ``secondary`` (per-layer scores of the other metric), ``not_run``,
        ``metric_agreement_spearman``, ``timings_s``.
    """
    import torch

    t_start = time.perf_counter() if t_start is None else t_start
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    model, loaded = prepare_model(inputs.weights, inputs.imgsz, inputs.seed)
    head = model.model[-1]
    reg_max = int(getattr(head, "reg_max", 16))
    device = torch.device(inputs.device)
    model = model.to(device)
    images = torch.from_numpy(inputs.images).to(device)
    timings["load_s"] = time.perf_counter() - t0
    if loaded.kind == "yaml":
        log.warning("%s has random weights: its timings mean something, its scores do not", inputs.weights.name)
    params = sum(p.numel() for p in model.parameters())
    shown = (inputs.weights, loaded.kind, loaded.nc, params, inputs.device, images.shape[0], inputs.imgsz)
    log.info("model %s (%s, nc=%d, %d params) on %s; %d images at %d px, batch %d", *shown, inputs.batch_size)

    results = []
    # ModelOpt prints progress (and, on first CUDA use, the build of its kernels) to stdout: keep it in the log.
    with exact_fp32(), contextlib.redirect_stdout(_LogWriter()):
        t0 = time.perf_counter()
        cache = fp32_cache(model, images, inputs.batch_size)
        timings["reference_s"] = time.perf_counter() - t0
        shared_s = time.perf_counter() - t_start
        for quant_format in inputs.formats:
            t_format = time.perf_counter()
            results.append(
                _sweep_one_format(copy.deepcopy(model), quant_format, inputs, images, cache, reg_max, layer_filter)
            )
            results[-1]["timings_s"] = {**timings, **results[-1]["timings_s"]}
            wall_s = shared_s + (time.perf_counter() - t_format)
            results[-1]["report"]["wall_s"] = round(wall_s, 3)
            if not results[-1]["filtered"]:
                results[-1]["paths"] = sensitivity_report.write_report(
                    report_dir(run_dir, quant_format, inputs.weights), results[-1]["report"]
                )
    return results


def _progress_logger(quant_format: str, score_name: str, total: int) -> Callable:
    """A :func:`sweep_layers` ``progress`` callback: every score at debug level, ~10 progress lines at info."""
    step = max(1, total // 10)
    t_sweep = time.perf_counter()

    def progress(index: int, total: int, layer: QuantLayer, scores: dict[str, float]) -> None:
        shown = (quant_format, index + 1, total, layer.name, layer.op_type, score_name, scores[score_name])
        log.debug("%s [%d/%d] %s %s: %s %.6g", *shown)
        if (index + 1) % step == 0 or index + 1 == total:
            elapsed = time.perf_counter() - t_sweep
            eta = elapsed / (index + 1) * (total - index - 1)
            log.info("%s: %d/%d layers scored, %.1f s, ~%.0f s left", quant_format, index + 1, total, elapsed, eta)

    return progress


def _quantized_layers(model, quant_format, images, batch_size) -> tuple[Any, list[QuantLayer], list[str], dict]:
    """Quantize ``model`` and list its layers: ``(model, layers, not_run, op_counts)``."""
    model, calls = quantize_model(model, quant_format, images, batch_size)
    layers, not_run = quant_layers(model, calls)
    if not layers:
        raise RuntimeError("ModelOpt inserted no enabled quantizer into a module the forward runs")
    op_counts: dict[str, int] = {}
    for layer in layers:
        op_counts[layer.op_type] = op_counts.get(layer.op_type, 0) + 1
    shown = (quant_format, len(layers), op_counts, not_run or "none")
    log.info("%s: %d quantized layers %s; not run by the raw-head forward: %s", *shown)
    return model, layers, not_run, op_counts


def _sweep_one_format(model, quant_format, inputs, images, cache, reg_max, layer_filter) -> dict[str, Any]:
    score_name = METRICS[inputs.metric]
    other_name = next(name for key, name in METRICS.items() if key != inputs.metric)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    model, all_layers, not_run, op_counts = _quantized_layers(model, quant_format, images, inputs.batch_size)
    timings["quantize_s"] = time.perf_counter() - t0
    layers = all_layers if layer_filter is None else layer_filter(all_layers)

    t_sweep = time.perf_counter()
    swept = sweep_layers(model, layers, cache, reg_max, _progress_logger(quant_format, score_name, len(layers)))
    timings["sweep_s"] = time.perf_counter() - t_sweep
    timings.update(swept["timings_s"])
    timings["per_layer_s"] = swept["timings_s"]["layers_s"] / len(layers)
    noise = swept["no_layer_quantized"][score_name]
    if noise != 0.0:
        log.warning("%s: all quantizers off, yet output differs from FP32 (%s %.3g)", quant_format, score_name, noise)

    rows = report_layers(layers, swept["per_layer"], score_name)
    names = [row["name"] for row in rows]
    return {
        "report": format_report(inputs, quant_format, int(images.shape[0]), rows, swept),
        "paths": {},
        "filtered": layer_filter is not None,
        "secondary": {name: swept["per_layer"][name][other_name] for name in names},
        "secondary_score": other_name,
        "secondary_reference": {
            "all_layers_quantized": swept["all_layers_quantized"][other_name],
            "no_layer_quantized": swept["no_layer_quantized"][other_name],
        },
        "metric_agreement_spearman": sensitivity_report.spearman(
            [swept["per_layer"][n][score_name] for n in names], [swept["per_layer"][n][other_name] for n in names]
        ),
        "layer_calls": {layer.name: layer.calls for layer in all_layers if layer.calls != 1},
        "num_layers_quantized": len(all_layers),
        "op_counts": op_counts,
        "not_run": not_run,
        "timings_s": timings,
    }
