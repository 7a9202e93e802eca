"""ONNX Runtime sessions built the same way by every script: providers, options, checks.

Provider names are ONNX Runtime's own (``TensorrtExecutionProvider``, ``CUDAExecutionProvider``,
``CPUExecutionProvider``). A session is built only from providers the installed onnxruntime
reports as available, and a requested provider that ONNX Runtime silently dropped while
creating the session (e.g. CUDA libraries missing, so the Python wrapper retried on CPU) is an
error: a latency number measured on the wrong device must never be reported.

``--disable-cpu-fallback`` maps to ONNX Runtime's ``session.disable_cpu_ep_fallback=1``: session
creation fails when any node would be assigned to the CPU EP.

What was verified where: option construction and the CPU EP paths are unit-tested on a
CPU-only machine; the TensorRT/CUDA options are only built and recorded there, and take effect
on a GPU machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx

from lowbit.logs import get_logger
from lowbit.onnx_stats import tensor_consumers
from lowbit.runs import UserError

log = get_logger("ort_session")

TRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

# Execution providers ModelOpt's ONNX quantizer accepts for calibration (its own spelling).
MODELOPT_CALIBRATION_EPS = ("cpu", "cuda:0", "cuda:1", "cuda:2", "cuda:3", "trt")

# Names this module knows how to configure; anything else is rejected before ORT sees it.
KNOWN_PROVIDERS = (
    TRT,
    CUDA,
    CPU,
    "DmlExecutionProvider",
    "OpenVINOExecutionProvider",
    "ROCMExecutionProvider",
    "MIGraphXExecutionProvider",
    "CoreMLExecutionProvider",
    "AzureExecutionProvider",
)

# Session config keys (strings as ONNX Runtime 1.24 spells them in onnxruntime_session_options_config_keys.h).
CFG_DISABLE_CPU_FALLBACK = "session.disable_cpu_ep_fallback"
# FP8 Q/DQ graphs: ORT's QDQ fusion turns DQ->Add->Q into QLinearAdd, which has no float8 kernel on CPU
# (session creation fails with INVALID_GRAPH on ORT 1.24). Disabling the QDQ transformers keeps the
# Q/DQ pairs as separate ops, which run everywhere and compute the same values.
CFG_DISABLE_QUANT_QDQ = "session.disable_quant_qdq"

_ELEM_TYPE_NAMES = {
    onnx.TensorProto.INT8: "int8",
    onnx.TensorProto.UINT8: "uint8",
    onnx.TensorProto.INT16: "int16",
    onnx.TensorProto.UINT16: "uint16",
    onnx.TensorProto.INT4: "int4",
    onnx.TensorProto.UINT4: "uint4",
    onnx.TensorProto.FLOAT8E4M3FN: "float8e4m3fn",
    onnx.TensorProto.FLOAT8E4M3FNUZ: "float8e4m3fnuz",
    onnx.TensorProto.FLOAT8E5M2: "float8e5m2",
    onnx.TensorProto.FLOAT8E5M2FNUZ: "float8e5m2fnuz",
}
_FP8_NAMES = {"float8e4m3fn", "float8e4m3fnuz", "float8e5m2", "float8e5m2fnuz"}
_INT_NAMES = {"int8", "uint8", "int16", "uint16", "int4", "uint4"}


def available_providers() -> list[str]:
    """Providers compiled into the installed onnxruntime (not a promise that their libraries load)."""
    import onnxruntime as ort

    return list(ort.get_available_providers())


def _load_model_proto(model: onnx.ModelProto | str | Path) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    # Weights are not needed to read Q/DQ types from zero-points stored as initializers; but external
    # data files hold only large tensors, and zero-points are scalars or small vectors, so skip them.
    return onnx.load(str(model), load_external_data=False)


WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def qdq_summary(model: onnx.ModelProto | onnx.GraphProto) -> dict[str, Any]:
    """Q/DQ pair counts and the compute nodes that run quantized.

    A Conv/Gemm/MatMul with a constant weight is quantized when that weight comes through a
    DequantizeLinear; its activation input alone does not count, since a Q/DQ pair on a tensor is
    shared by every consumer, excluded ones included. Any other node is quantized when all of its
    non-constant inputs come through a DequantizeLinear.
    """
    graph = getattr(model, "graph", model)
    nodes = list(graph.node)
    constants = {init.name for init in graph.initializer}
    dq_outputs = {out for n in nodes if n.op_type == "DequantizeLinear" for out in n.output}
    q_outputs = {out for n in nodes if n.op_type == "QuantizeLinear" for out in n.output}
    dq_of_constant = {
        n.output[0] for n in nodes if n.op_type == "DequantizeLinear" and n.input[0] in constants
    }
    pairs = sum(1 for n in nodes if n.op_type == "DequantizeLinear" and n.input[0] in q_outputs)

    def quantized(node) -> bool:
        if node.op_type in WEIGHTED_OPS and len(node.input) > 1 and (
            node.input[1] in constants or node.input[1] in dq_of_constant
        ):
            return node.input[1] in dq_of_constant
        variable = [i for i in node.input if i and i not in constants and i not in dq_of_constant]
        return bool(variable) and all(i in dq_outputs for i in variable)

    quantized_nodes = sorted(
        n.name for n in nodes if n.op_type not in ("QuantizeLinear", "DequantizeLinear") and quantized(n)
    )
    return {
        "qdq_pairs": pairs,
        "quantize_linear": sum(1 for n in nodes if n.op_type == "QuantizeLinear"),
        "dequantize_linear": sum(1 for n in nodes if n.op_type == "DequantizeLinear"),
        "quantized_nodes": quantized_nodes,
    }


def qdq_info(model: onnx.ModelProto | str | Path) -> dict[str, Any]:
    """Describe the explicit quantization of a graph.

    Args:
        model: a loaded ``ModelProto`` or a path to an ``.onnx`` file.

    Returns:
        ``{"qdq_pairs": int, "quant_dtypes": [str, ...], "is_fp8": bool, "is_qdq": bool}`` where
        ``qdq_pairs`` counts QuantizeLinear nodes whose output feeds a DequantizeLinear, and
        ``quant_dtypes`` are the sorted quantized element types (``"int8"``, ``"float8e4m3fn"``, ...)
        read from the QuantizeLinear zero-point (or its ``output_dtype`` attribute, or the
        DequantizeLinear input when no Q precedes it, e.g. pre-quantized weights).
    """
    proto = _load_model_proto(model)
    graph = proto.graph
    initializer_types = {init.name: init.data_type for init in graph.initializer}
    constant_types: dict[str, int] = {}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.t is not None:
                    constant_types[node.output[0]] = attr.t.data_type
    value_types = {}
    for vi in list(graph.value_info) + list(graph.input) + list(graph.output):
        if vi.type.HasField("tensor_type"):
            value_types[vi.name] = vi.type.tensor_type.elem_type

    def elem_type(name: str) -> int | None:
        return initializer_types.get(name) or constant_types.get(name) or value_types.get(name)

    consumers = tensor_consumers(graph)

    dtypes: set[str] = set()
    pairs = 0
    q_outputs = set()
    for node in graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        q_outputs.add(node.output[0])
        if any(c.op_type == "DequantizeLinear" for c in consumers.get(node.output[0], [])):
            pairs += 1
        code = None
        if len(node.input) > 2 and node.input[2]:
            code = elem_type(node.input[2])
        if code is None:
            for attr in node.attribute:
                if attr.name == "output_dtype" and attr.i:
                    code = attr.i
        if code is None:
            code = elem_type(node.output[0])
        # QuantizeLinear without zero-point nor output_dtype quantizes to uint8 (ONNX default).
        dtypes.add(_ELEM_TYPE_NAMES.get(code, "uint8") if code is not None else "uint8")
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] in q_outputs:
            continue
        code = elem_type(node.input[0])
        if code is None and len(node.input) > 2 and node.input[2]:
            code = elem_type(node.input[2])
        if code in _ELEM_TYPE_NAMES:
            dtypes.add(_ELEM_TYPE_NAMES[code])
    quant_dtypes = sorted(dtypes)
    return {
        "qdq_pairs": pairs,
        "quant_dtypes": quant_dtypes,
        "is_fp8": any(d in _FP8_NAMES for d in quant_dtypes),
        "is_qdq": pairs > 0 or bool(quant_dtypes),
    }


def provider_options(
    providers: list[str], cache_dir: Path | None, is_qdq: bool, is_fp8: bool
) -> list[dict[str, Any]]:
    """Per-provider options, in the order of ``providers`` (pure function).

    TensorRT EP:
      * engine and timing caches under ``cache_dir/trt_engines`` and ``cache_dir/trt_timing``
        (skipped when ``cache_dir`` is None) so a second run on the same model loads the engine;
      * ``trt_fp16_enable`` for float models and for Q/DQ models (the layers left in high
        precision may then run in FP16, as ``trtexec --fp16 --int8`` would do);
      * ``trt_int8_enable`` for Q/DQ models with integer quantization: TensorRT builds them with
        explicit quantization (scales from the Q/DQ nodes), no calibration table is passed;
      * FP8: ONNX Runtime 1.24's TensorRT EP has no FP8 option (its option names, read from the
        shipped ``libonnxruntime_providers_tensorrt.so``, are fp16/bf16/int8 only). TensorRT takes
        FP8 precision from the FP8 Q/DQ nodes themselves (explicit quantization), so an FP8-only
        Q/DQ model gets ``trt_fp16_enable`` and no ``trt_int8_enable``; a model with both FP8 and
        integer Q/DQ gets both flags. Whether a given TensorRT build accepts FP8 Q/DQ through the
        EP can only be checked on a GPU that supports FP8 (compute capability >= 8.9).

    CUDA EP: exhaustive cuDNN convolution search (slower first run, fastest kernels after the
    warm-up) and copies in the default stream (no cross-stream sync surprises in timings).

    CPU EP and others: ``{}``.

    Args:
        providers: provider names in priority order.
        cache_dir: directory for TensorRT caches (created by :func:`build_session`), or None.
        is_qdq: the model has Q/DQ nodes.
        is_fp8: some of its Q/DQ nodes quantize to an FP8 type.

    Returns:
        One options dict per provider, same order.
    """
    options: list[dict[str, Any]] = []
    has_int_qdq = is_qdq and not is_fp8
    for name in providers:
        if name == TRT:
            opts: dict[str, Any] = {"device_id": 0, "trt_fp16_enable": True}
            if has_int_qdq:
                opts["trt_int8_enable"] = True
            if cache_dir is not None:
                cache_dir = Path(cache_dir)
                opts.update(
                    {
                        "trt_engine_cache_enable": True,
                        "trt_engine_cache_path": str(cache_dir / "trt_engines"),
                        "trt_timing_cache_enable": True,
                        "trt_timing_cache_path": str(cache_dir / "trt_timing"),
                    }
                )
            options.append(opts)
        elif name == CUDA:
            options.append(
                {
                    "device_id": 0,
                    "cudnn_conv_algo_search": "EXHAUSTIVE",
                    "do_copy_in_default_stream": True,
                }
            )
        else:
            options.append({})
    return options


def provider_options_mixed(
    providers: list[str], cache_dir: Path | None, qdq: dict[str, Any]
) -> list[dict[str, Any]]:
    """Like :func:`provider_options` but from a :func:`qdq_info` dict (handles INT8+FP8 mixes)."""
    options = provider_options(providers, cache_dir, qdq["is_qdq"], qdq["is_fp8"])
    if qdq["is_fp8"] and any(d in _INT_NAMES for d in qdq["quant_dtypes"]):
        for name, opts in zip(providers, options):
            if name == TRT:
                opts["trt_int8_enable"] = True
    return options


def check_providers(providers: list[str], disable_cpu_fallback: bool, flag: str = "--providers") -> None:
    """Reject empty, duplicate, unknown or unavailable providers, and CPU with ``disable_cpu_fallback``."""
    if not providers:
        raise UserError(f"{flag}: give at least one execution provider")
    duplicates = sorted({p for p in providers if providers.count(p) > 1})
    if duplicates:
        raise UserError(f"{flag}: provider listed twice: {', '.join(duplicates)}")
    available = available_providers()
    for name in providers:
        if name not in KNOWN_PROVIDERS and name not in available:
            raise UserError(
                f"{flag}: unknown execution provider {name!r}; "
                f"this onnxruntime offers: {', '.join(available)}"
            )
        if name not in available:
            raise UserError(
                f"{flag}: {name} is not available in the installed onnxruntime; "
                f"available: {', '.join(available)}"
            )
    if disable_cpu_fallback and CPU in providers:
        raise UserError(
            f"{flag} includes {CPU} but --disable-cpu-fallback forbids the CPU EP; "
            "drop one of them (see the model card: list CPU explicitly and omit --disable-cpu-fallback)"
        )


def build_session(
    model_path: Path,
    providers: list[str],
    disable_cpu_fallback: bool = False,
    cache_dir: Path | None = None,
    intra_op_threads: int = 0,
    flag: str = "--providers",
):
    """Create an ``onnxruntime.InferenceSession`` and describe how it was made.

    Args:
        model_path: the ``.onnx`` file.
        providers: provider names in priority order (ORT's spelling).
        disable_cpu_fallback: fail instead of placing any node on the CPU EP.
        cache_dir: TensorRT engine/timing cache root (e.g. ``RUN/ort_cache``); created if needed.
        intra_op_threads: ``SessionOptions.intra_op_num_threads`` (0 = ORT default).
        flag: the CLI flag that carried ``providers``, named in error messages.

    Returns:
        ``(session, info)``; ``info`` keys: ``providers_requested``, ``providers_used``,
        ``provider_options``, ``session_config``, ``graph_optimization_level``,
        ``intra_op_threads``, ``qdq``.

    Raises:
        UserError: unknown/unavailable provider, CPU requested with ``disable_cpu_fallback``,
            a model ORT cannot load, or a requested provider ORT could not create.
    """
    import onnxruntime as ort

    model_path = Path(model_path)
    providers = list(providers)
    check_providers(providers, disable_cpu_fallback, flag)
    try:
        qdq = qdq_info(model_path)
    except Exception as exc:  # onnx raises DecodeError, ValueError, OSError for non-models
        raise UserError(f"{model_path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from exc

    options = provider_options_mixed(providers, cache_dir, qdq)
    if cache_dir is not None and TRT in providers:
        trt_opts = options[providers.index(TRT)]
        Path(trt_opts["trt_engine_cache_path"]).mkdir(parents=True, exist_ok=True)
        Path(trt_opts["trt_timing_cache_path"]).mkdir(parents=True, exist_ok=True)

    sess_options = ort.SessionOptions()
    sess_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if intra_op_threads:
        sess_options.intra_op_num_threads = int(intra_op_threads)
    config: dict[str, str] = {}
    if disable_cpu_fallback:
        config[CFG_DISABLE_CPU_FALLBACK] = "1"
    if qdq["is_fp8"]:
        config[CFG_DISABLE_QUANT_QDQ] = "1"
    for key, value in config.items():
        sess_options.add_session_config_entry(key, value)

    # With disable_cpu_fallback the CPU EP is not appended; otherwise ORT appends it itself as the
    # last resort for nodes no other EP takes (the usual behaviour).
    try:
        session = ort.InferenceSession(
            str(model_path), sess_options, providers=list(zip(providers, options))
        )
    except Exception as exc:
        text = str(exc)
        if "fallback to CPU EP has been explicitly disabled" in text:
            raise UserError(
                f"--disable-cpu-fallback: ONNX Runtime would run nodes of {model_path} on the CPU "
                f"(requested {', '.join(providers)}; a GPU provider could not be created or does not "
                f"support every node). Add {CPU} to {flag} and omit --disable-cpu-fallback to allow it. "
                f"ORT: {text.strip()}"
            ) from exc
        raise UserError(
            f"{model_path}: ONNX Runtime could not load the model: {type(exc).__name__}: {text.strip()}"
        ) from exc

    used = list(session.get_providers())
    missing = [p for p in providers if p not in used]
    if missing:
        raise UserError(
            f"{flag}: ONNX Runtime could not create {', '.join(missing)} (session fell back to "
            f"{', '.join(used)}); check the CUDA/cuDNN/TensorRT libraries, or remove it from {flag}"
        )
    info = {
        "providers_requested": providers,
        "providers_used": used,
        "provider_options": {name: opts for name, opts in zip(providers, options)},
        "session_config": config,
        "graph_optimization_level": str(sess_options.graph_optimization_level).split(".")[-1],
        "intra_op_threads": int(intra_op_threads),
        "qdq": qdq,
    }
    log.debug("session for %s: %s", model_path, info)
    return session, info


def model_input_spec(session) -> tuple[str, list, str]:
    """``(name, shape, dtype)`` of the session's only input; shape entries are ints or symbol strings."""
    inputs = session.get_inputs()
    if len(inputs) != 1:
        names = ", ".join(f"{i.name}{list(i.shape)}" for i in inputs)
        raise UserError(f"the model has {len(inputs)} inputs ({names}); expected one image input [1,3,H,W]")
    spec = inputs[0]
    return spec.name, list(spec.shape), spec.type


def check_image_input(session, imgsz: int | None = None, model_path: Path | None = None) -> tuple[str, list, str]:
    """Require one float input shaped ``[1 or symbolic, 3, H, W]``; with ``imgsz``, static H/W must equal it.

    Returns:
        ``(name, shape, dtype)``.

    Raises:
        UserError naming the model and the offending shape/type.
    """
    where = f"{model_path}: " if model_path is not None else ""
    name, shape, dtype = model_input_spec(session)
    if dtype not in ("tensor(float)", "tensor(float16)"):
        raise UserError(f"{where}input {name!r} has type {dtype}; expected a float tensor [1,3,H,W]")
    ok = len(shape) == 4 and (shape[0] == 1 or not isinstance(shape[0], int)) and shape[1] == 3
    if not ok:
        raise UserError(f"{where}input {name!r} has shape {shape}; expected [1,3,H,W] (batch 1, 3 channels)")
    if imgsz is not None:
        for dim in shape[2:]:
            if isinstance(dim, int) and dim != imgsz:
                raise UserError(
                    f"--imgsz {imgsz} does not match the model input {name!r} of shape {shape}; "
                    f"pass --imgsz {dim}"
                )
    return name, shape, dtype
