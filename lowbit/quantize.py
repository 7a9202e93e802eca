"""ModelOpt ONNX post-training quantization (INT8 or FP8 Q/DQ), validated, verified and recorded.

``quantize_onnx(settings)`` is the one quantization capability of the package; the card's
``quantize_yolov10m_onnx.py`` is a thin CLI over it, and other steps call it with a
``QuantizeSettings``. The stages:

1. validate every input before any work (``validate_settings``): files, output path, mode,
   exclusions and op types against the graph, the calibration tensor (``lowbit.calib``);
2. quantize a private work copy with ``modelopt.onnx.quantization.quantize`` (``lowbit.quantize_modelopt``),
   its log captured in ``<out stem>.modelopt.log``;
3. fold DequantizeLinear nodes of constant int32 tensors (quantized conv biases) into float
   initializers (``lowbit.qdq_edit.fold_int32_bias_dequantize``);
4. verify: Q/DQ pairs exist, ONNX Runtime loads the model and gives finite outputs on one
   calibration image, and with fp16/bf16 high precision the float16-QuantizeLinear hazard is checked;
5. publish the model (a rename) and complete ``<out stem>.manifest.json`` (``kind`` "quantize"; its keys, and
   what the budget search and the report read from it, are in docs/records.md).

The output model appears only when all of that succeeded; the work folder is removed either way.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lowbit import quantize_modelopt
from lowbit.calib import load_calib_tensor
from lowbit.errors import UserError
from lowbit.logs import get_logger, log_to_file
from lowbit.ort_providers import MODELOPT_CALIBRATION_EPS, check_calibration_eps
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

__all__ = [
    "CALIBRATION_EPS",
    "CALIBRATION_METHODS",
    "DEFAULT_HIGH_PRECISION_DTYPE",
    "HIGH_PRECISION_DTYPES",
    "MANIFEST_SCRIPT",
    "PASSES",
    "QUANTIZE_MODES",
    "QuantizeResult",
    "QuantizeSettings",
    "check_op_types",
    "count_int4_targets",
    "default_calibration_method",
    "exact_patterns",
    "parse_exclusions",
    "quantize_onnx",
    "refuse_int4",
    "resolve_high_precision_dtype",
    "run_paths",
    "validate_settings",
]

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
        fp16_quantize_hazard: ``lowbit.qdq_fp16.fp16_quantize_hazard``'s finding, or None.
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


def validate_settings(settings: QuantizeSettings) -> _Inputs:
    """Check every input before any work; returns the loaded graph, calibration tensor and exclusions.

    Raises:
        UserError(flag): the first bad input, naming its flag.
    """
    from lowbit.model_input import static_image_chw
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
    _, height, width = static_image_chw(model)
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


def _fold_and_summarize(work_output: Path, log_file: Path) -> tuple[Any, dict[str, Any], list[str]]:
    """Fold int32 bias DequantizeLinear nodes of ModelOpt's output, save it, and summarize its Q/DQ graph."""
    import onnx

    from lowbit.qdq_edit import fold_int32_bias_dequantize
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
    from lowbit.qdq_fp16 import fp16_quantize_hazard

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
    eps_used = quantize_modelopt.calibration_eps_used(paths["work_input"], settings.calibration_eps)
    log.info("calibration runs on ORT providers %s (requested %s)", eps_used, settings.calibration_eps)
    if any(ep.startswith(("cuda", "trt")) for ep in settings.calibration_eps) and eps_used == ["CPUExecutionProvider"]:
        log.warning("no GPU execution provider could be created: calibration runs on CPU only")
    log.info(
        "ModelOpt %s quantization: method=%s high_precision=%s eps=%s excluded=%d images=%d",
        settings.quantize_mode,
        inputs.calibration_method,
        settings.high_precision_dtype,
        settings.calibration_eps,
        len(inputs.exclusions),
        inputs.calib.shape[0],
    )
    quantize_s = quantize_modelopt.run_modelopt(
        settings,
        inputs.calib,
        inputs.calibration_method,
        exact_patterns(inputs.exclusions),
        paths["work_input"],
        paths["work_output"],
        paths["modelopt_log"],
    )
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
        output_path=output_path,
        manifest_path=manifest.path,
        log_path=paths["log"],
        modelopt_log_path=paths["modelopt_log"],
        quantize_mode=settings.quantize_mode,
        calibration_method=inputs.calibration_method,
        calibration_images=int(inputs.calib.shape[0]),
        calibration_eps_used=eps_used,
        qdq_pairs=summary["qdq_pairs"],
        quantized_nodes=list(summary["quantized_nodes"]),
        excluded_nodes=list(inputs.exclusions),
        folded_bias_nodes=folded,
        fp16_quantize_hazard=hazard,
        quantize_s=round(quantize_s, 2),
    )


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

    The probe runs one QuantizeLinear (:func:`lowbit.qdq_fp16.probe_fp16_quantize_rounding`): measured,
    fp16 high precision keeps INT8 YOLOv10 at its fp32-high-precision accuracy on onnxruntime 1.30/1.31
    and collapses it on 1.24 (the model card's "INT8 accuracy").
    """
    if value != "auto":
        return value, "requested"
    from lowbit.qdq_fp16 import probe_fp16_quantize_rounding

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
        log_to_file(paths["log"], mode="w"),
        manifest_run(paths["manifest"], MANIFEST_SCRIPT, record, argv, kind="quantize") as manifest,
    ):
        manifest.add_input(onnx_path)
        manifest.add_input(settings.calib_path)
        manifest.update(
            settings={
                **_settings_record(settings, inputs),
                "high_precision_dtype_requested": requested,
                "high_precision_dtype_reason": reason,
            }
        )
        try:
            paths["work_input"] = quantize_modelopt.make_work_copy(onnx_path, inputs.model, paths["work_dir"])
            result = _quantize_into(settings, inputs, manifest, paths)
        finally:
            shutil.rmtree(paths["work_dir"], ignore_errors=True)
    return result
