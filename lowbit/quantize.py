"""ModelOpt ONNX post-training quantization (INT8 or FP8 Q/DQ), validated, verified and recorded.

``quantize_onnx(settings)`` is the one quantization capability of the package; the card's
``quantize_yolov10m_onnx.py`` is a thin CLI over it, and other steps call it with a
``QuantizeSettings``. The stages:

1. validate every input before any work (``validate_settings``): files, output path, mode,
   exclusions and op types against the graph, the calibration tensor (``lowbit.calib``);
2. quantize a private work copy with ``modelopt.onnx.quantization.quantize``, its log captured
   in ``<out stem>.modelopt.log``;
3. fold DequantizeLinear nodes of constant int32 tensors (quantized conv biases) into float
   initializers (``fold_int32_bias_dequantize``);
4. verify: Q/DQ pairs exist, ONNX Runtime loads the model and gives finite outputs on one
   calibration image, and with fp16/bf16 high precision the float16-QuantizeLinear hazard is checked;
5. publish the model (a rename) and complete ``<out stem>.manifest.json`` (``kind`` "quantize"; its keys, and
   what the budget search and the report read from it, are in docs/records.md).

The output model appears only when all of that succeeded; the work folder is removed either way.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lowbit.calib import load_calib_tensor
from lowbit.errors import UserError
from lowbit.logs import get_logger
from lowbit.ort_session import MODELOPT_CALIBRATION_EPS, check_calibration_eps
from lowbit.runs import check_input_file, check_output_path, manifest_run

QUANTIZE_MODES = ("int8", "fp8", "int4")  # int4 is listed so that asking for it gets a reason, not "invalid choice"
CALIBRATION_METHODS = ("entropy", "max")
CALIBRATION_EPS = MODELOPT_CALIBRATION_EPS
HIGH_PRECISION_DTYPES = ("auto", "fp32", "fp16", "bf16")
# fp32 keeps every non-quantized tensor in float32. ModelOpt's own default is fp16, which on YOLOv10
# collapses accuracy on onnxruntime < 1.30 CPU (see the model card's INT8 section); pass fp16 explicitly to get it.
# auto: ModelOpt's fp16 where this onnxruntime rounds float16 QuantizeLinear inputs correctly (>= 1.30),
# fp32 where its CPU EP truncates them (<= 1.29: INT8 YOLOv10 collapses to ~0.25 mAP there; see the card).
DEFAULT_HIGH_PRECISION_DTYPE = "auto"
PASSES = ("concat_elimination",)
MANIFEST_SCRIPT = "quantize_yolov10m_onnx.py"  # the manifest's informational "script" key; readers match its kind
# Threads that build the entropy/percentile calibration histograms, each over a share of the tensors.
HISTOGRAM_THREADS = min(8, os.cpu_count() or 1)

log = get_logger("quantize")


@dataclass
class QuantizeSettings:
    """Everything one quantization needs; field names are ``quantize_yolov10m_onnx.py``'s argparse dests.

    Attributes:
        onnx_path: FP32 ONNX model to quantize (``--onnx-path``).
        calib_path: calibration tensor ``.npy``, float32 ``[N,3,H,W]`` (``--calib-path``).
        output_path: quantized model to write, ``.onnx`` (``--output-path``); its stem also names
            ``.manifest.json``, ``.log`` and ``.modelopt.log`` beside it.
        quantize_mode: ``int8`` | ``fp8`` (``int4`` is refused with the reason).
        calibration_method: ``entropy`` | ``max``; None = entropy for int8, max for fp8.
        calibration_eps: ModelOpt calibration EPs in order (``cpu``, ``cuda:0``, ``trt`` ...).
        use_zero_point: asymmetric quantization (ModelOpt 0.47 applies it to int4 only).
        high_precision_dtype: ``auto`` | ``fp32`` | ``fp16`` | ``bf16`` for the non-quantized tensors;
            ``auto`` is resolved by :func:`resolve_high_precision_dtype` before quantizing.
        nodes_to_exclude: exact node names left unquantized.
        exclude_json: a scheme JSON whose ``nodes_to_exclude`` list is added to ``nodes_to_exclude``.
        op_types_to_quantize: only these op types (None = ModelOpt's choice).
        op_types_to_exclude: never these op types.
        passes: ModelOpt graph passes (subset of ``PASSES``).
        calibrate_per_node: ModelOpt per-node calibration (less memory, slower).
        max_calib_images: use only the first N calibration images (None = all).
        overwrite: replace an existing output model.
    """

    onnx_path: Path
    calib_path: Path
    output_path: Path
    quantize_mode: str = "int8"
    calibration_method: str | None = None
    calibration_eps: list[str] = field(default_factory=lambda: ["cpu"])
    use_zero_point: bool = False
    high_precision_dtype: str = DEFAULT_HIGH_PRECISION_DTYPE
    nodes_to_exclude: list[str] = field(default_factory=list)
    exclude_json: Path | None = None
    op_types_to_quantize: list[str] | None = None
    op_types_to_exclude: list[str] | None = None
    passes: list[str] = field(default_factory=lambda: list(PASSES))
    calibrate_per_node: bool = False
    max_calib_images: int | None = None
    overwrite: bool = False


@dataclass
class QuantizeResult:
    """What one ``quantize_onnx`` call produced (the same values are in the manifest's ``extra``).

    Attributes:
        output_path: the published Q/DQ model.
        manifest_path: ``<stem>.manifest.json`` (status ``ok``).
        log_path: ``<stem>.log``, this package's log of the run.
        modelopt_log_path: ``<stem>.modelopt.log``, ModelOpt's full log.
        quantize_mode: ``int8`` | ``fp8``.
        calibration_method: the method used (the default resolved).
        calibration_images: number of calibration images used.
        calibration_eps_used: ORT providers ModelOpt's calibration session really got.
        qdq_pairs: QuantizeLinear -> DequantizeLinear pairs in the output.
        quantized_nodes: names of compute nodes that run quantized, sorted.
        excluded_nodes: exact node names that were excluded, in the order given.
        folded_bias_nodes: DequantizeLinear nodes of int32 constants folded into float initializers.
        fp16_quantize_hazard: ``lowbit.qdq_inspect.fp16_quantize_hazard``'s finding, or None.
        quantize_s: seconds spent inside ModelOpt.
    """

    output_path: Path
    manifest_path: Path
    log_path: Path
    modelopt_log_path: Path
    quantize_mode: str
    calibration_method: str
    calibration_images: int
    calibration_eps_used: list[str]
    qdq_pairs: int
    quantized_nodes: list[str]
    excluded_nodes: list[str]
    folded_bias_nodes: list[str]
    fp16_quantize_hazard: dict[str, Any] | None
    quantize_s: float


@dataclass
class _Inputs:
    """Validated inputs of one run."""

    model: Any  # onnx.ModelProto, graph only (no external weight data)
    calib: np.ndarray
    exclusions: list[str]
    calibration_method: str


def refuse_int4(quantize_mode: str, flag: str = "--quantize-mode", model=None) -> None:
    """Raise UserError(flag) for ``int4``: ModelOpt's INT4 mode would not make a YOLOv10 an INT4 model.

    Args:
        quantize_mode: the requested mode; anything but ``int4`` passes.
        flag: the flag or env var that carried it.
        model: the ONNX model, when loaded, to quote how many nodes INT4 would touch.
    """
    if quantize_mode != "int4":
        return
    count = ""
    if model is not None:
        count = f" (this model has {count_int4_targets(model)} of {len(model.graph.node)} nodes)"
    raise UserError(
        f"{flag} int4: ModelOpt's INT4 mode quantizes only Gemm/MatMul nodes with constant weights{count}; "
        "YOLOv10 is Conv-dominated, so the result would not be an INT4 model. Use int8 or fp8.",
        flag=flag,
    )


def count_int4_targets(model) -> int:
    """Nodes ModelOpt's INT4 mode would quantize: Gemm/MatMul with a constant weight input."""
    initializers = {init.name for init in model.graph.initializer}
    return sum(
        1
        for node in model.graph.node
        if node.op_type in ("Gemm", "MatMul") and len(node.input) > 1 and node.input[1] in initializers
    )


def default_calibration_method(quantize_mode: str) -> str:
    """ModelOpt derives FP8 scales assuming max calibration; INT8 is best with entropy."""
    return "max" if quantize_mode == "fp8" else "entropy"


def exact_patterns(names: list[str]) -> list[str]:
    """ModelOpt matches nodes_to_exclude with ``re.match`` (a prefix regex); anchor and escape each name."""
    return [re.escape(name) + "$" for name in names]


def parse_exclusions(settings, node_names: set[str]) -> list[str]:
    """Exact node names to exclude (``nodes_to_exclude`` then ``exclude_json``'s), checked against the graph.

    ``exclude_json`` is a scheme file (``lowbit.schemes.load_scheme``: ``k`` and ``nodes_to_exclude``).

    Args:
        settings: any object with ``nodes_to_exclude`` and ``exclude_json`` (a QuantizeSettings).
        node_names: the graph's node names.
    """
    names = list(settings.nodes_to_exclude)
    if settings.exclude_json is not None:
        from lowbit.schemes import load_scheme

        path = check_input_file(settings.exclude_json, "--exclude-json")
        names += load_scheme(path, "--exclude-json").nodes_to_exclude
    names = list(dict.fromkeys(names))  # keep order, drop repeats
    unknown = [n for n in names if n not in node_names]
    if unknown:
        shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise UserError(
            f"--nodes-to-exclude: {len(unknown)} name(s) are not nodes of the model: {shown}", flag="--nodes-to-exclude"
        )
    return names


def check_op_types(settings, op_types: set[str]) -> None:
    """``op_types_to_quantize`` / ``op_types_to_exclude`` must name op types the graph has."""
    for flag, values in (
        ("--op-types-to-quantize", settings.op_types_to_quantize),
        ("--op-types-to-exclude", settings.op_types_to_exclude),
    ):
        unknown = [v for v in values or [] if v not in op_types]
        if unknown:
            raise UserError(
                f"{flag}: {', '.join(unknown)} not an op type of the model (it has: {', '.join(sorted(op_types))})",
                flag=flag,
            )


def _check_choices(settings: QuantizeSettings) -> None:
    """The closed sets argparse checks for the CLI, checked again for library callers."""
    single = (
        ("--quantize-mode", settings.quantize_mode, QUANTIZE_MODES),
        ("--high-precision-dtype", settings.high_precision_dtype, HIGH_PRECISION_DTYPES),
        ("--calibration-method", settings.calibration_method, (None, *CALIBRATION_METHODS)),
    )
    for flag, value, choices in single:
        if value not in choices:
            raise UserError(f"{flag}: {value!r} is not one of {', '.join(map(str, choices))}", flag=flag)
    for flag, values, choices in (
        ("--calibration-eps", settings.calibration_eps, CALIBRATION_EPS),
        ("--passes", settings.passes, PASSES),
    ):
        unknown = [v for v in values if v not in choices]
        if unknown:
            raise UserError(f"{flag}: {', '.join(unknown)} not one of {', '.join(choices)}", flag=flag)
    # spelling, repeats, and whether each CUDA/TensorRT EP's libraries load (ModelOpt only warns and drops one)
    check_calibration_eps(list(settings.calibration_eps), flag="--calibration-eps")
    if settings.max_calib_images is not None and settings.max_calib_images < 1:
        raise UserError(f"--max-calib-images must be >= 1, got {settings.max_calib_images}", flag="--max-calib-images")


def _model_input_chw(model, flag: str = "--onnx-path") -> tuple[int, int, int]:
    """``(C, H, W)`` of the model's single static image input."""
    initializers = {init.name for init in model.graph.initializer}
    inputs = [vi for vi in model.graph.input if vi.name not in initializers]
    if len(inputs) != 1:
        raise UserError(f"{flag}: the model has {len(inputs)} inputs; expected one image input", flag=flag)
    dims = [
        d.dim_value if d.HasField("dim_value") else d.dim_param or "?" for d in inputs[0].type.tensor_type.shape.dim
    ]
    if len(dims) != 4 or not all(isinstance(d, int) and d > 0 for d in dims[1:]) or dims[1] != 3:
        raise UserError(
            f"{flag}: input {inputs[0].name!r} has shape {dims}; quantization needs [N,3,H,W] with static H and W",
            flag=flag,
        )
    return dims[1], dims[2], dims[3]


def validate_settings(settings: QuantizeSettings) -> _Inputs:
    """Check every input before any work; returns the loaded graph, calibration tensor and exclusions.

    Raises:
        UserError(flag): the first bad input, naming its flag.
    """
    from lowbit.onnx_stats import load_model_proto

    _check_choices(settings)
    onnx_path = check_input_file(settings.onnx_path, "--onnx-path")
    check_output_path(settings.output_path, "--output-path", settings.overwrite, suffix=".onnx")
    try:
        model = load_model_proto(onnx_path, "--onnx-path")
    except UserError as exc:
        exc.flag = exc.flag or "--onnx-path"
        raise
    refuse_int4(settings.quantize_mode, model=model)
    exclusions = parse_exclusions(settings, {n.name for n in model.graph.node})
    check_op_types(settings, {n.op_type for n in model.graph.node})
    _, height, width = _model_input_chw(model)
    calib = load_calib_tensor(
        settings.calib_path, "--calib-path", height if height == width else None, settings.max_calib_images
    )
    if calib.shape[2:] != (height, width):
        raise UserError(
            f"--calib-path: {settings.calib_path} holds {calib.shape[2]}x{calib.shape[3]} images; the model "
            f"input needs {height}x{width}",
            flag="--calib-path",
        )
    method = settings.calibration_method or default_calibration_method(settings.quantize_mode)
    return _Inputs(model=model, calib=calib, exclusions=exclusions, calibration_method=method)


def _dequantize_constant(values: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: int) -> np.ndarray:
    """``(values - zero_point) * scale`` as ONNX Runtime's DequantizeLinear computes it, in the scale's type.

    The difference is taken in integers and converted to float32 before the product, as ORT's
    kernel does, so float32 results are bit-identical to the node's.
    """
    scale32 = scale.astype(np.float32)
    zp = None if zero_point is None else zero_point.astype(np.int64)
    if scale.ndim == 1 and values.ndim > 0:  # per-axis: scale (and zero point) run along ``axis``
        shape = [1] * values.ndim
        shape[axis % values.ndim] = scale.size
        scale32 = scale32.reshape(shape)
        zp = None if zp is None else zp.reshape(shape)
    shifted = values.astype(np.int64) - (0 if zp is None else zp)
    return (shifted.astype(np.float32) * scale32).astype(scale.dtype).reshape(values.shape)


def fold_int32_bias_dequantize(model) -> list[str]:
    """Replace each DequantizeLinear of a constant int32 initializer by a float initializer, in place.

    ModelOpt (through ORT's quantizer) can quantize a conv bias to int32 behind a DequantizeLinear.
    ONNX Runtime's CUDA EP has no int32 DequantizeLinear kernel, so such nodes force a CPU fallback;
    TensorRT takes float biases anyway. The folded initializer holds ``(q - zero_point) * scale``
    in the scale's type (float32 unless the model runs in fp16) under the node's output name, so
    every consumer reads the same numbers as before. Initializers left unused are removed.

    Args:
        model: an ``onnx.ModelProto`` with its weights loaded.

    Returns:
        Names of the folded DequantizeLinear nodes, in graph order.
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    graph_outputs = {o.name for o in graph.output}
    folded, folded_nodes, new_inits, keep_nodes = [], [], [], []
    for node in graph.node:
        source = inits.get(node.input[0]) if node.op_type == "DequantizeLinear" and node.input else None
        if (
            source is None
            or source.data_type != TensorProto.INT32
            or node.output[0] in graph_outputs
            or any(name and name not in inits for name in node.input[1:])
            or any(a.name == "block_size" and a.i for a in node.attribute)
        ):
            keep_nodes.append(node)
            continue
        scale = numpy_helper.to_array(inits[node.input[1]])
        if scale.dtype not in (np.float32, np.float16):  # bfloat16 scales: left to the runtime
            keep_nodes.append(node)
            continue
        zero_point = numpy_helper.to_array(inits[node.input[2]]) if len(node.input) > 2 and node.input[2] else None
        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 1)
        values = _dequantize_constant(numpy_helper.to_array(source), scale, zero_point, axis)
        new_inits.append(numpy_helper.from_array(values, node.output[0]))
        folded.append(node.name or node.output[0])
        folded_nodes.append(node)
    if not folded:
        return []
    del graph.node[:]
    graph.node.extend(keep_nodes)
    graph.initializer.extend(new_inits)
    _drop_unused_initializers(graph, {name for node in folded_nodes for name in node.input})
    return folded


def _graph_reads(graph) -> set[str]:
    """Every tensor name a node of ``graph`` or of its subgraphs (If/Loop bodies) reads, plus its outputs."""
    names = {o.name for o in graph.output}
    for node in graph.node:
        names.update(node.input)
        for attr in node.attribute:
            subgraphs = list(attr.graphs) + ([attr.g] if attr.HasField("g") else [])
            for sub in subgraphs:
                names |= _graph_reads(sub)
    return names


def _drop_unused_initializers(graph, candidates: set[str]) -> None:
    """Remove the initializers named in ``candidates`` (and their graph inputs) that nothing reads any more."""
    unused = candidates - _graph_reads(graph)
    if not unused:
        return
    kept = [init for init in graph.initializer if init.name not in unused]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    inputs = [vi for vi in graph.input if vi.name not in unused]
    del graph.input[:]
    graph.input.extend(inputs)


def external_data_files(model) -> list[str]:
    """Relative paths of the external-data files an ONNX model's initializers point to."""
    locations = set()
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                locations.add(entry.value)
    return sorted(locations)


def calibration_eps_used(onnx_path: Path, eps: list[str]) -> list[str]:
    """The ORT providers a ModelOpt calibration session really gets for ``eps``.

    ModelOpt drops EPs whose libraries are missing, and ORT itself silently drops a CUDA EP that
    fails to initialise (no GPU); both happen inside ``quantize``. Building a session with
    ModelOpt's own factory and reading ``get_providers()`` reports what calibration ran on.
    """
    from modelopt.onnx.quantization.ort_utils import create_inference_session

    return list(create_inference_session(str(onnx_path), list(eps)).get_providers())


def _make_work_copy(onnx_path: Path, model, work_dir: Path) -> Path:
    """Copy the model (and its external data) into ``work_dir``, a fresh folder.

    ModelOpt writes intermediate files next to its input model, and measured with 0.47 it also
    rewrites the input file itself (through a symlink too): it only ever sees this private copy.
    """
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    work_input = work_dir / onnx_path.name
    shutil.copyfile(onnx_path, work_input)
    for location in external_data_files(model):
        shutil.copyfile(onnx_path.parent / location, work_dir / location)
    return work_input


@contextmanager
def _capture_modelopt_log(log_file: Path) -> Iterator[None]:
    """Copy every log record into ``log_file`` while ModelOpt runs.

    ModelOpt re-configures its logger (dropping a log_file handler) part-way through, but its
    records always propagate to the root logger: capture the full log there.
    """
    handler = logging.FileHandler(log_file, mode="w", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()


@contextmanager
def _package_log_file(log_file: Path) -> Iterator[None]:
    """Also write this package's log records to ``log_file`` for the duration of the run."""
    handler = logging.FileHandler(log_file, mode="w", encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    package_logger = get_logger()
    package_logger.addHandler(handler)
    try:
        yield
    finally:
        package_logger.removeHandler(handler)
        handler.close()


@contextmanager
def _tensor_parallel_histograms(threads: int) -> Iterator[None]:
    """Let ONNX Runtime's ``HistogramCollector.collect`` work on disjoint shares of the tensors in threads.

    ModelOpt's histogram calibration (entropy, percentile) calls ``collect({tensor: outputs})`` once
    per calibration batch, and the collector builds each tensor's histogram with one serial
    ``np.histogram`` after another: on the demo detector that is 187 tensors x 100 images, most of
    an INT8 quantization's time once inference runs on a GPU. Each tensor's histogram depends
    only on its own data and state (``histogram_dict[tensor]``), and NumPy releases the GIL inside
    its array loops, so shares of the tensors run in threads and the histograms (hence the scales)
    are the ones the serial loop makes. ModelOpt's own ``collect`` (per-node calibration replaces
    it) is left alone, and the original method is restored on exit.
    """
    from concurrent.futures import ThreadPoolExecutor

    from onnxruntime.quantization.calibrate import HistogramCollector

    serial = HistogramCollector.collect
    if threads <= 1:
        yield
        return

    def collect(self, name_to_arr):
        # what the serial collect dispatches to; it also prints one line per batch, which is dropped
        if self.method not in ("entropy", "distribution", "percentile"):
            return serial(self, name_to_arr)  # its own error for an unknown method
        build = self.collect_absolute_value if self.method == "percentile" and self.symmetric else self.collect_value
        names = list(name_to_arr)
        shares = [names[i::threads] for i in range(threads)]
        jobs = [pool.submit(build, {n: name_to_arr[n] for n in share}) for share in shares if share]
        for job in jobs:
            job.result()  # re-raises a collector error here
        return None

    with ThreadPoolExecutor(threads, thread_name_prefix="histogram") as pool:
        HistogramCollector.collect = collect
        try:
            yield
        finally:
            if HistogramCollector.collect is collect:
                HistogramCollector.collect = serial


def _run_modelopt(
    settings: QuantizeSettings, inputs: _Inputs, work_input: Path, work_output: Path, log_file: Path
) -> float:
    """Run ModelOpt's ``quantize`` on the work copy; returns its wall time in seconds."""
    from modelopt.onnx.quantization import quantize  # heavy: imported only when quantizing

    with _capture_modelopt_log(log_file), _tensor_parallel_histograms(HISTOGRAM_THREADS):
        t0 = time.perf_counter()
        quantize(
            onnx_path=str(work_input),
            quantize_mode=settings.quantize_mode,
            calibration_data=inputs.calib,
            calibration_method=inputs.calibration_method,
            calibration_eps=list(settings.calibration_eps),
            nodes_to_exclude=exact_patterns(inputs.exclusions),
            high_precision_dtype=settings.high_precision_dtype,
            use_zero_point=settings.use_zero_point,
            passes=list(settings.passes),
            op_types_to_quantize=settings.op_types_to_quantize,
            op_types_to_exclude=settings.op_types_to_exclude,
            calibrate_per_node=settings.calibrate_per_node,
            output_path=str(work_output),
            log_level="INFO",
        )
        seconds = time.perf_counter() - t0
    if not work_output.exists():
        raise RuntimeError(f"ModelOpt finished without writing {work_output}; see {log_file}")
    return seconds


def _fold_and_summarize(work_output: Path, log_file: Path) -> tuple[Any, dict[str, Any], list[str]]:
    """Fold int32 bias DequantizeLinear nodes of ModelOpt's output, save it, and summarize its Q/DQ graph."""
    import onnx

    from lowbit.qdq_graph import qdq_summary

    quantized = onnx.load(str(work_output))
    folded = fold_int32_bias_dequantize(quantized)
    if folded:
        log.info("folded %d int32 bias DequantizeLinear node(s) into float initializers: %s", len(folded), folded)
        onnx.save(quantized, str(work_output))
    summary = qdq_summary(quantized)
    if summary["qdq_pairs"] == 0:
        raise RuntimeError(f"ModelOpt produced no Q/DQ pairs; see {log_file}")
    return quantized, summary, folded


def _verify_in_ort(work_output: Path, calib: np.ndarray) -> dict[str, Any]:
    """Load the model in ONNX Runtime (CPU) and run one calibration image; outputs must be finite."""
    from lowbit.ort_session import build_session

    session, session_info = build_session(work_output, ["CPUExecutionProvider"])
    outputs = session.run(None, {session.get_inputs()[0].name: np.ascontiguousarray(calib[:1])})
    if not all(np.isfinite(o).all() for o in outputs):
        raise RuntimeError("the quantized model produced NaN/Inf on a calibration image")
    return {"session": session_info, "outputs_finite": True}


def _fp16_hazard(quantized, high_precision_dtype: str) -> dict[str, Any] | None:
    """With fp16/bf16 high precision: this onnxruntime's float16-QuantizeLinear rounding hazard, or None."""
    if high_precision_dtype == "fp32":
        return None
    from lowbit.qdq_inspect import fp16_quantize_hazard

    hazard = fp16_quantize_hazard(quantized)
    if hazard is not None:
        log.warning("%s", hazard["message"])
    return hazard


def _settings_record(settings: QuantizeSettings, inputs: _Inputs) -> dict[str, Any]:
    """The manifest's ``settings`` block (keys read by the report)."""
    return {
        "quantize_mode": settings.quantize_mode,
        "calibration_method": inputs.calibration_method,
        "calibration_eps_requested": list(settings.calibration_eps),
        "high_precision_dtype": settings.high_precision_dtype,
        "use_zero_point": settings.use_zero_point,
        "use_zero_point_effective": settings.quantize_mode == "int4",
        "passes": list(settings.passes),
        "op_types_to_quantize": settings.op_types_to_quantize,
        "op_types_to_exclude": settings.op_types_to_exclude,
        "calibrate_per_node": settings.calibrate_per_node,
        "calibration_images": int(inputs.calib.shape[0]),
        "nodes_to_exclude": inputs.exclusions,
    }


def _quantize_into(settings: QuantizeSettings, inputs: _Inputs, manifest, paths: dict[str, Path]) -> QuantizeResult:
    """Stages 2-5 inside an open manifest; the work folder is the caller's to remove."""
    eps_used = calibration_eps_used(paths["work_input"], settings.calibration_eps)
    log.info("calibration runs on ORT providers %s (requested %s)", eps_used, settings.calibration_eps)
    if any(ep.startswith(("cuda", "trt")) for ep in settings.calibration_eps) and eps_used == ["CPUExecutionProvider"]:
        log.warning("no GPU execution provider could be created: calibration runs on CPU only")
    log.info(
        "ModelOpt %s quantization: method=%s high_precision=%s eps=%s excluded=%d images=%d",
        settings.quantize_mode, inputs.calibration_method, settings.high_precision_dtype,
        settings.calibration_eps, len(inputs.exclusions), inputs.calib.shape[0],
    )  # fmt: skip
    quantize_s = _run_modelopt(settings, inputs, paths["work_input"], paths["work_output"], paths["modelopt_log"])
    quantized, summary, folded = _fold_and_summarize(paths["work_output"], paths["modelopt_log"])
    validation = _verify_in_ort(paths["work_output"], inputs.calib)
    hazard = _fp16_hazard(quantized, settings.high_precision_dtype)
    manifest.update(fp16_quantize_hazard=hazard, folded_bias_dequantize=folded)

    output_path = Path(settings.output_path)
    shutil.move(str(paths["work_output"]), output_path)
    manifest.add_output("model", output_path)
    manifest.add_output("modelopt_log", paths["modelopt_log"])
    manifest.update(
        calibration_eps_used=eps_used,
        quantize_s=round(quantize_s, 2),
        output_sha256=manifest.add_input(output_path),
        qdq_pairs=summary["qdq_pairs"],
        quantized_nodes=summary["quantized_nodes"],
        num_quantized_nodes=len(summary["quantized_nodes"]),
        excluded_nodes=inputs.exclusions,
        validation=validation,
    )
    manifest.data["inputs"].pop(str(output_path), None)  # the output's digest belongs under extra only
    return QuantizeResult(
        output_path=output_path, manifest_path=manifest.path, log_path=paths["log"],
        modelopt_log_path=paths["modelopt_log"], quantize_mode=settings.quantize_mode,
        calibration_method=inputs.calibration_method, calibration_images=int(inputs.calib.shape[0]),
        calibration_eps_used=eps_used, qdq_pairs=summary["qdq_pairs"],
        quantized_nodes=list(summary["quantized_nodes"]), excluded_nodes=list(inputs.exclusions),
        folded_bias_nodes=folded, fp16_quantize_hazard=hazard, quantize_s=round(quantize_s, 2),
    )  # fmt: skip


def run_paths(output_path: Path) -> dict[str, Path]:
    """Files of one run, all named after the output model's stem."""
    stem = Path(output_path).with_suffix("")
    work_dir = Path(f"{stem}.work")
    return {
        "manifest": Path(f"{stem}.manifest.json"),
        "log": Path(f"{stem}.log"),
        "modelopt_log": Path(f"{stem}.modelopt.log"),
        "work_dir": work_dir,
        "work_output": work_dir / "quantized.onnx",
    }


def resolve_high_precision_dtype(value: str) -> tuple[str, str]:
    """``(dtype, reason)``: ``auto`` becomes fp16 (ModelOpt's default, what TensorRT engines use) when the
    installed onnxruntime's CPU EP rounds float16 QuantizeLinear inputs to nearest-even, else fp32.

    The probe runs one QuantizeLinear (:func:`lowbit.qdq_inspect.probe_fp16_quantize_rounding`): measured,
    fp16 high precision keeps INT8 YOLOv10 at its fp32-high-precision accuracy on onnxruntime 1.30/1.31
    and collapses it on 1.24 (the model card's "INT8 accuracy").
    """
    if value != "auto":
        return value, "requested"
    from lowbit.qdq_inspect import probe_fp16_quantize_rounding

    probe = probe_fp16_quantize_rounding()
    version = probe.get("onnxruntime")
    if probe["rounding"] == "nearest_even":
        return "fp16", f"auto: onnxruntime {version} float16 QuantizeLinear rounding is {probe['rounding']}"
    return "fp32", f"auto: onnxruntime {version} float16 QuantizeLinear rounding is {probe['rounding']}"


def quantize_onnx(settings: QuantizeSettings, argv: list[str] | None = None) -> QuantizeResult:
    """Quantize ``settings.onnx_path`` into ``settings.output_path`` (see the module docstring for the stages).

    Args:
        settings: what to quantize and how.
        argv: the command line to record in the manifest (default ``sys.argv``).

    Returns:
        The run's ``QuantizeResult``.

    Raises:
        UserError(flag): a bad input, found before anything is written.
        RuntimeError: ModelOpt wrote nothing or no Q/DQ pairs, or the model gives NaN/Inf; the
            manifest then says ``failed`` and no output model exists.
    """
    inputs = validate_settings(settings)
    requested = settings.high_precision_dtype
    dtype, reason = resolve_high_precision_dtype(requested)
    settings = dataclasses.replace(settings, high_precision_dtype=dtype)
    log.info("high precision dtype %s (%s)", dtype, reason)
    onnx_path = Path(settings.onnx_path)
    paths = run_paths(settings.output_path)
    paths["manifest"].parent.mkdir(parents=True, exist_ok=True)
    if settings.use_zero_point and settings.quantize_mode != "int4":
        log.warning(
            "use_zero_point=True has no effect in %s mode (ModelOpt 0.47 uses it for int4 only)", settings.quantize_mode
        )
    record = dataclasses.asdict(settings)
    with (
        _package_log_file(paths["log"]),
        manifest_run(paths["manifest"], MANIFEST_SCRIPT, record, argv, kind="quantize") as manifest,
    ):
        manifest.add_input(onnx_path)
        manifest.add_input(settings.calib_path)
        manifest.update(settings={**_settings_record(settings, inputs), "high_precision_dtype_requested": requested,
                                  "high_precision_dtype_reason": reason})
        try:
            paths["work_input"] = _make_work_copy(onnx_path, inputs.model, paths["work_dir"])
            result = _quantize_into(settings, inputs, manifest, paths)
        finally:
            shutil.rmtree(paths["work_dir"], ignore_errors=True)
    return result
