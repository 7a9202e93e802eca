"""ONNX Runtime sessions built the same way by every script: the one session factory (options, provider
checks, ORT's own fallbacks off, node placement).

Which providers can run here, and the errors that say what to install when one cannot, are
:mod:`lowbit.ort_providers`' job: :func:`build_session` calls its ``check_providers`` first.

The session is created with ORT's Python-level fallback off (``enable_fallback=0``): ORT would
otherwise retry a failed session, or a failed ``run``, on other providers by itself. A requested
provider that ORT still dropped while creating the session is an error: a latency number measured on
the wrong device must never be reported.

``--disable-cpu-fallback`` maps to ORT's ``session.disable_cpu_ep_fallback=1``: session creation
fails when any node would be assigned to the CPU EP; the error then names those nodes (found by a
second, CPU-allowed session, except with TensorRT, whose engine build that would repeat).

Node placement: every session records ORT's own graph assignment
(``session.record_ep_graph_assignment_info=1``, read back with
``InferenceSession.get_provider_graph_assignment_info``, ORT >= 1.24). It is filled in while the session
is created, so it costs nothing at run time and the returned session is the one that gets timed.
``info["node_placement"]`` is ``{provider: node count}`` for every session (None on an onnxruntime
without that API); ``info["cpu_nodes"]`` is the sorted list of nodes on the CPU EP when a GPU provider
was requested (empty when none), and None for CPU-only sessions, where every node runs on the CPU.
Node names are those of the graph ORT runs, after its optimizations (fused nodes carry new names).

What was verified where: option construction and the CPU EP paths are unit-tested on a CPU-only
machine; the TensorRT/CUDA options take effect on a GPU machine.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx

from lowbit.errors import UserError
from lowbit.logs import get_logger
from lowbit.ort_providers import CPU, CUDA, GPU_PROVIDERS, TRT, ProviderProbe, check_providers
from lowbit.qdq_graph import is_integer_name, load_graph_proto, qdq_info

# CPU, CUDA and TRT are lowbit.ort_providers' names, listed here too: callers of build_session name providers with them
__all__ = [
    "CFG_DISABLE_CPU_FALLBACK",
    "CFG_DISABLE_QUANT_QDQ",
    "CFG_RECORD_PLACEMENT",
    "CPU",
    "CUDA",
    "CUDNN_CONV_ALGO_SEARCH",
    "GPU_QDQ_DISABLED_OPTIMIZERS",
    "GRAPH_OPTIMIZATION_LEVELS",
    "TRT",
    "ModelSource",
    "build_session",
    "node_placement",
    "provider_options",
    "provider_options_mixed",
]

log = get_logger("ort_session")

# The CUDA EP's cudnn_conv_algo_search values offered. ORT's third one, DEFAULT, is left out: on an H200 it
# put every convolution of the demo detector in cuDNN's fallback mode (p50 78.6 ms against 3.6 ms).
CUDNN_CONV_ALGO_SEARCH = ("EXHAUSTIVE", "HEURISTIC")

# Q/DQ models on a GPU provider: onnxruntime's WeightBiasQuantization transformer (>= 1.2x) rewrites a float
# conv bias under quantized input and weight into int32 + DequantizeLinear at session creation. The CUDA EP has
# no int32 DequantizeLinear kernel, so those nodes (e.g. /model.5/cv2/conv/Conv_bias_dq on the demo detector,
# seen with onnxruntime-gpu 1.31 on an H200) fell back to the CPU and --disable-cpu-fallback refused the model.
# The rewrite only serves the CPU EP's integer kernels; TensorRT and the CUDA EP take the float bias.
GPU_QDQ_DISABLED_OPTIMIZERS = ("WeightBiasQuantization",)

# Session config keys (strings as ONNX Runtime 1.24 spells them in onnxruntime_session_options_config_keys.h).
CFG_DISABLE_CPU_FALLBACK = "session.disable_cpu_ep_fallback"
# FP8 Q/DQ graphs: ORT's QDQ fusion turns DQ->Add->Q into QLinearAdd, which has no float8 kernel on CPU
# (session creation fails with INVALID_GRAPH on ORT 1.24). Disabling the QDQ transformers keeps the
# Q/DQ pairs as separate ops, which run everywhere and compute the same values.
CFG_DISABLE_QUANT_QDQ = "session.disable_quant_qdq"
# Keep which EP runs which node, for InferenceSession.get_provider_graph_assignment_info().
CFG_RECORD_PLACEMENT = "session.record_ep_graph_assignment_info"

GRAPH_OPTIMIZATION_LEVELS = ("ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL")

ModelSource = Path | str | bytes | onnx.ModelProto


def provider_options(
    providers: list[str],
    cache_dir: Path | None,
    is_qdq: bool,
    is_fp8: bool,
    cudnn_conv_algo_search: str = "EXHAUSTIVE",
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

    CUDA EP: ``cudnn_conv_algo_search`` (:data:`CUDNN_CONV_ALGO_SEARCH`), EXHAUSTIVE by default:
    every convolution's cuDNN algorithms are benchmarked in the first run (2.3 s for the FP32 demo
    detector, 6.6 s for its INT8 Q/DQ model on an H200), HEURISTIC takes cuDNN's pick at once (0.2 s
    and 3.0 s); both gave the same p50 there (3.63/3.60 ms, 7.61/7.25 ms). Copies run in the default
    stream (no cross-stream sync surprises in timings).

    CPU EP and others: ``{}``.

    Args:
        providers: provider names in priority order.
        cache_dir: directory for TensorRT caches (created by :func:`build_session`), or None.
        is_qdq: the model has Q/DQ nodes.
        is_fp8: some of its Q/DQ nodes quantize to an FP8 type.
        cudnn_conv_algo_search: the CUDA EP's convolution algorithm search.

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
                    "cudnn_conv_algo_search": cudnn_conv_algo_search,
                    "do_copy_in_default_stream": True,
                }
            )
        else:
            options.append({})
    return options


def provider_options_mixed(
    providers: list[str], cache_dir: Path | None, qdq: dict[str, Any], cudnn_conv_algo_search: str = "EXHAUSTIVE"
) -> list[dict[str, Any]]:
    """Like :func:`provider_options` but from a :func:`qdq_info` dict (handles INT8+FP8 mixes)."""
    options = provider_options(providers, cache_dir, qdq["is_qdq"], qdq["is_fp8"], cudnn_conv_algo_search)
    if qdq["is_fp8"] and any(is_integer_name(d) for d in qdq["quant_dtypes"]):
        for name, opts in zip(providers, options):
            if name == TRT:
                opts["trt_int8_enable"] = True
    return options


# ----------------------------------------------------------------------------------------------------------------------
# sessions


def _read_model(model: ModelSource, model_flag: str) -> tuple[str | bytes, dict[str, Any], str]:
    """``(what InferenceSession takes, qdq_info, label for messages)`` of a path, serialized bytes or ModelProto."""
    if isinstance(model, onnx.ModelProto):
        return model.SerializeToString(), qdq_info(model), "<in-memory model>"
    label = "<in-memory model>" if isinstance(model, bytes) else str(model)
    try:
        proto = onnx.load_model_from_string(model) if isinstance(model, bytes) else load_graph_proto(model)
        qdq = qdq_info(proto)
    except Exception as exc:  # onnx raises DecodeError, ValueError, OSError for non-models
        raise UserError(
            f"{model_flag}: {label} is not a readable ONNX model ({type(exc).__name__}: {exc})", flag=model_flag
        ) from exc
    return (model if isinstance(model, bytes) else str(model)), qdq, label


def _session_options(
    graph_optimization_level: str,
    intra_op_threads: int,
    config: dict[str, str],
    log_severity_level: int | None,
):
    import onnxruntime as ort

    if graph_optimization_level not in GRAPH_OPTIMIZATION_LEVELS:
        raise ValueError(f"graph_optimization_level must be one of {GRAPH_OPTIMIZATION_LEVELS}")
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, graph_optimization_level)
    if intra_op_threads:
        options.intra_op_num_threads = int(intra_op_threads)
    if log_severity_level is not None:
        options.log_severity_level = int(log_severity_level)
    for key, value in {**config, CFG_RECORD_PLACEMENT: "1"}.items():
        options.add_session_config_entry(key, value)
    return options


def node_placement(session) -> tuple[dict[str, int] | None, list[str]]:
    """``({provider: node count}, sorted names of the nodes on the CPU EP)`` from ORT's graph assignment.

    Needs a session created with ``session.record_ep_graph_assignment_info=1`` (as :func:`build_session`
    does); returns ``(None, [])`` on an onnxruntime without ``get_provider_graph_assignment_info``.
    """
    getter = getattr(session, "get_provider_graph_assignment_info", None)
    if getter is None:
        return None, []
    try:
        subgraphs = getter()
    except Exception as exc:  # noqa: BLE001 - ORT errors derive from Exception; placement is a report, not a gate
        log.debug("no graph assignment info: %s", exc)
        return None, []
    counts: dict[str, int] = {}
    cpu_nodes: list[str] = []
    for subgraph in subgraphs:
        nodes = list(subgraph.get_nodes())
        counts[subgraph.ep_name] = counts.get(subgraph.ep_name, 0) + len(nodes)
        if subgraph.ep_name == CPU:
            cpu_nodes += [node.name or f"<unnamed {node.op_type}>" for node in nodes]
    if not counts:
        return None, []
    return dict(sorted(counts.items())), sorted(cpu_nodes)


def _optimizer_kwargs(disabled_optimizers: tuple[str, ...]) -> dict:
    return {"disabled_optimizers": list(disabled_optimizers)} if disabled_optimizers else {}


def _unsupported_nodes_hint(
    source, options, providers: list[str], provider_opts: list[dict], disabled_optimizers: tuple[str, ...] = ()
) -> str:
    """The nodes ORT would put on the CPU EP, from a second session with the CPU EP allowed (not for TensorRT)."""
    import onnxruntime as ort

    if TRT in providers:
        return ""  # a second session would build TensorRT engines again
    options.add_session_config_entry(CFG_DISABLE_CPU_FALLBACK, "0")
    try:
        probe = ort.InferenceSession(
            source,
            options,
            providers=list(zip(providers, provider_opts)),
            enable_fallback=0,
            **_optimizer_kwargs(disabled_optimizers),
        )
    except Exception:  # noqa: BLE001 - best effort: the caller's error stands without the hint
        return ""
    _, cpu_nodes = node_placement(probe)
    if not cpu_nodes:
        return ""
    names = ", ".join(cpu_nodes[:10]) + (f" ... (+{len(cpu_nodes) - 10})" if len(cpu_nodes) > 10 else "")
    return f" Nodes with no kernel on {', '.join(providers)}: {names}."


def _create_session(
    source,
    options,
    providers: list[str],
    provider_opts: list[dict],
    label: str,
    flag: str,
    model_flag: str,
    disabled_optimizers: tuple[str, ...] = (),
):
    """``InferenceSession`` with ORT's own retry-on-other-providers off, its errors turned into UserErrors."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(
            source,
            options,
            providers=list(zip(providers, provider_opts)),
            enable_fallback=0,
            **_optimizer_kwargs(disabled_optimizers),
        )
    except Exception as exc:
        text = str(exc).strip()
        if "fallback to CPU EP has been explicitly disabled" in text:
            hint = _unsupported_nodes_hint(source, options, providers, provider_opts, disabled_optimizers)
            raise UserError(
                f"--disable-cpu-fallback: ONNX Runtime would run nodes of {label} on the CPU (requested "
                f"{', '.join(providers)}, which do not support every node).{hint} Add {CPU} to {flag} and omit "
                f"--disable-cpu-fallback to allow it (those nodes' time is then CPU time). ORT: {text}",
                flag="--disable-cpu-fallback",
            ) from exc
        if any(p in text for p in GPU_PROVIDERS) or "TensorRT" in text or "CUDA" in text:
            raise UserError(
                f"{flag}: ONNX Runtime could not create {', '.join(p for p in providers if p != CPU)} for {label}: "
                f"{text}",
                flag=flag,
            ) from exc
        raise UserError(
            f"{model_flag}: ONNX Runtime could not load {label}: {type(exc).__name__}: {text}", flag=model_flag
        ) from exc


def _providers_used(session, providers: list[str], flag: str) -> list[str]:
    """``session.get_providers()``; a requested provider ORT silently dropped is an error."""
    used = list(session.get_providers())
    missing = [p for p in providers if p not in used]
    if missing:
        raise UserError(
            f"{flag}: ONNX Runtime could not create {', '.join(missing)} (session fell back to "
            f"{', '.join(used)}); check the CUDA/cuDNN/TensorRT libraries, or remove it from {flag}",
            flag=flag,
        )
    return used


def build_session(
    model: ModelSource,
    providers: list[str],
    disable_cpu_fallback: bool = False,
    cache_dir: Path | None = None,
    intra_op_threads: int = 0,
    flag: str = "--providers",
    *,
    graph_optimization_level: str = "ORT_ENABLE_ALL",
    session_config: dict[str, str] | None = None,
    log_severity_level: int | None = None,
    model_flag: str = "--onnx-path",
    probe: Callable[[str], ProviderProbe] | None = None,
    cudnn_conv_algo_search: str = "EXHAUSTIVE",
):
    """Create an ``onnxruntime.InferenceSession`` and describe how it was made.

    Args:
        model: the ``.onnx`` file, or a model in memory (``ModelProto`` or its serialized bytes).
        providers: provider names in priority order (ORT's spelling).
        disable_cpu_fallback: fail instead of placing any node on the CPU EP.
        cache_dir: TensorRT engine/timing cache root (e.g. ``RUN/ort_cache``); created if needed.
        intra_op_threads: ``SessionOptions.intra_op_num_threads`` (0 = ORT default).
        flag: the CLI flag or env var that carried ``providers``, named in errors.
        graph_optimization_level: one of :data:`GRAPH_OPTIMIZATION_LEVELS`.
        session_config: extra session config entries (e.g. ``{CFG_DISABLE_QUANT_QDQ: "1"}``).
        log_severity_level: ``SessionOptions.log_severity_level`` (None = ORT default; 3 = errors only).
        model_flag: the CLI flag that named the model, for errors about the model itself.
        probe: provider-library probe, see :func:`lowbit.ort_providers.check_provider_libraries` (tests).
        cudnn_conv_algo_search: the CUDA EP's convolution search, see :func:`provider_options`.

    Returns:
        ``(session, info)``; ``info`` keys: ``providers_requested``, ``providers_used``,
        ``provider_options``, ``session_config``, ``graph_optimization_level``,
        ``intra_op_threads``, ``qdq``, ``node_placement``, ``cpu_nodes`` (see the module docstring).

    Raises:
        UserError: unknown/unavailable provider or one whose libraries do not load, CPU requested with
            ``disable_cpu_fallback``, a model ORT cannot load, or a requested provider ORT dropped.
    """
    providers = list(providers)
    check_providers(providers, disable_cpu_fallback, flag, probe)
    source, qdq, label = _read_model(model, model_flag)
    options = provider_options_mixed(providers, cache_dir, qdq, cudnn_conv_algo_search)
    if cache_dir is not None and TRT in providers:
        trt_opts = options[providers.index(TRT)]
        Path(trt_opts["trt_engine_cache_path"]).mkdir(parents=True, exist_ok=True)
        Path(trt_opts["trt_timing_cache_path"]).mkdir(parents=True, exist_ok=True)
    config: dict[str, str] = {}
    if disable_cpu_fallback:
        config[CFG_DISABLE_CPU_FALLBACK] = "1"
    if qdq["is_fp8"]:
        config[CFG_DISABLE_QUANT_QDQ] = "1"
    config.update(session_config or {})
    sess_options = _session_options(graph_optimization_level, intra_op_threads, config, log_severity_level)
    disabled = GPU_QDQ_DISABLED_OPTIMIZERS if qdq["is_qdq"] and any(p in GPU_PROVIDERS for p in providers) else ()
    # Without disable_cpu_fallback ORT appends the CPU EP itself as the last resort for nodes no other EP takes.
    session = _create_session(source, sess_options, providers, options, label, flag, model_flag, disabled)
    used = _providers_used(session, providers, flag)
    placement, cpu_nodes = node_placement(session)
    info = {
        "providers_requested": providers,
        "providers_used": used,
        "provider_options": dict(zip(providers, options)),
        "session_config": config,
        "graph_optimization_level": graph_optimization_level,
        "intra_op_threads": int(intra_op_threads),
        "qdq": qdq,
        "disabled_optimizers": list(disabled),
        "node_placement": placement,
        "cpu_nodes": cpu_nodes if any(p != CPU for p in providers) else None,
    }
    if info["cpu_nodes"]:
        log.warning("%d of the model's nodes run on the CPU EP: %s", len(cpu_nodes), ", ".join(cpu_nodes[:5]))
    log.debug("session for %s: %s", label, info)
    return session, info
