"""ONNX Runtime sessions built the same way by every script: providers, options, checks, node placement.

Provider names are ONNX Runtime's own (``TensorrtExecutionProvider``, ``CUDAExecutionProvider``,
``CPUExecutionProvider``). Before a session is created:

* every requested provider must be compiled into the installed onnxruntime;
* every requested GPU provider's library (``libonnxruntime_providers_{tensorrt,cuda}.so``) must load,
  after ``onnxruntime.preload_dlls()`` has loaded CUDA/cuDNN from pip ``nvidia-*`` wheels. A library
  that does not load is one :class:`~lowbit.errors.UserError` naming the provider, the missing shared
  library (``libnvinfer.so.10``, ``libcublasLt.so.12`` ...), what to install, and the provider list
  that would work instead.

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

What was verified where: option construction, the library probe and the CPU EP paths are unit-tested
on a CPU-only machine (whose onnxruntime-gpu lacks the CUDA 12 and TensorRT libraries, so the probe's
failure path runs for real there); the TensorRT/CUDA options take effect on a GPU machine.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from lowbit.errors import UserError
from lowbit.logs import get_logger
from lowbit.qdq_graph import is_integer_name, load_graph_proto, qdq_info

log = get_logger("ort_session")

TRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
GPU_PROVIDERS = (TRT, CUDA)
# The CUDA EP's cudnn_conv_algo_search values offered. ORT's third one, DEFAULT, is left out: on an H200 it
# put every convolution of the demo detector in cuDNN's fallback mode (p50 78.6 ms against 3.6 ms).
CUDNN_CONV_ALGO_SEARCH = ("EXHAUSTIVE", "HEURISTIC")

# Execution providers ModelOpt's ONNX quantizer accepts for calibration (its own spelling).
MODELOPT_CALIBRATION_EPS = ("cpu", "cuda:0", "cuda:1", "cuda:2", "cuda:3", "trt")
_CALIBRATION_EP_PROVIDER = {"cpu": CPU, "cuda": CUDA, "trt": TRT}

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

# The shared library ORT loads for each GPU provider (in onnxruntime/capi/).
PROVIDER_LIBRARIES = {
    TRT: "libonnxruntime_providers_tensorrt.so",
    CUDA: "libonnxruntime_providers_cuda.so",
}

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


def available_providers() -> list[str]:
    """Providers compiled into the installed onnxruntime (not a promise that their libraries load)."""
    import onnxruntime as ort

    return list(ort.get_available_providers())


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
# provider libraries: can ORT load them here?


@dataclass(frozen=True)
class ProviderProbe:
    """Whether the shared library of one execution provider loads in this process.

    ``missing`` lists the shared libraries the dynamic loader could not find: first the one its
    error named, then any others ``ldd`` reports as not found and that are not already loaded.
    """

    provider: str
    library: str | None  # path of libonnxruntime_providers_*.so (None: not shipped with this onnxruntime)
    error: str | None = None  # the loader's message; None when the library loads
    missing: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.error is None


_MISSING_LIBRARY = re.compile(r"([\w.+-]+\.so(?:\.[\w.]+)?): cannot open shared object file")


def onnxruntime_build() -> dict[str, str | None]:
    """``{"onnxruntime": version, "package": wheel name, "cuda": CUDA version the wheel was built for or None}``."""
    import onnxruntime as ort

    try:
        from onnxruntime.capi import build_and_package_info as build
    except ImportError:  # a build without that file (source builds): nothing to say about CUDA
        build = None
    return {
        "onnxruntime": ort.__version__,
        "package": getattr(build, "package_name", None),
        "cuda": getattr(build, "cuda_version", None) or None,
    }


@functools.cache
def _preload_gpu_runtime() -> None:
    """Load CUDA/cuDNN from pip ``nvidia-*`` wheels and TensorRT from ``tensorrt_libs``, quietly, best effort.

    ``onnxruntime.preload_dlls`` (ORT >= 1.21) prints a line per library it cannot find; the probe
    reports what is missing itself. The TensorRT wheels keep ``libnvinfer`` in ``tensorrt_libs``, which
    is on no loader path unless the environment adds it (the pixi ``rtx5090`` environment does).
    """
    import importlib.util

    import onnxruntime as ort

    preload = getattr(ort, "preload_dlls", None)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        if preload is not None:
            with contextlib.suppress(Exception):
                preload()
        spec = importlib.util.find_spec("tensorrt_libs")
        for folder in (spec.submodule_search_locations or []) if spec else []:
            for pattern in ("libnvinfer.so.*", "libnvonnxparser.so.*"):
                for lib in sorted(Path(folder).glob(pattern)):
                    with contextlib.suppress(OSError):
                        ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)


def _loads(name: str) -> bool:
    try:
        ctypes.CDLL(name)
    except OSError:
        return False
    return True


def _ldd_not_found(library: str) -> list[str]:
    """Libraries ``ldd`` cannot find for ``library`` (empty when ldd is absent or fails)."""
    ldd = shutil.which("ldd")
    if ldd is None:
        return []
    try:
        result = subprocess.run([ldd, library], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.split("=>")[0].strip() for line in result.stdout.splitlines() if "not found" in line]


@functools.cache
def probe_provider_library(provider: str) -> ProviderProbe:
    """Try to load ``provider``'s library (``ctypes.CDLL``) the way ORT will, after :func:`_preload_gpu_runtime`.

    Providers without a separate library (the CPU EP) always pass. Cached per process: a library
    that loaded stays loaded, and one that failed fails again until the environment changes.
    """
    if provider not in PROVIDER_LIBRARIES:
        return ProviderProbe(provider, None)
    import onnxruntime as ort

    library = Path(ort.__file__).parent / "capi" / PROVIDER_LIBRARIES[provider]
    if not library.exists():
        return ProviderProbe(provider, str(library), f"{library.name} is not shipped with this onnxruntime", ())
    _preload_gpu_runtime()
    try:
        ctypes.CDLL(str(library))
    except OSError as exc:
        text = str(exc)
        first = _MISSING_LIBRARY.findall(text)
        others = [name for name in _ldd_not_found(str(library)) if name not in first and not _loads(name)]
        return ProviderProbe(provider, str(library), text, tuple(dict.fromkeys(first + others)))
    return ProviderProbe(provider, str(library))


def _library_kind(name: str) -> str:
    if name.startswith(("libnvinfer", "libnvonnxparser")):
        return "tensorrt"
    if name.startswith("libcudnn"):
        return "cudnn"
    if name.startswith("libcuda.so"):
        return "driver"
    if name.startswith(("libcublas", "libcudart", "libcufft", "libcurand", "libnvrtc", "libnvJitLink")):
        return "cuda"
    return "other"


def _major(name: str) -> str | None:
    match = re.search(r"\.so\.(\d+)", name)
    return match.group(1) if match else None


def install_hint(missing: tuple[str, ...] | list[str], build: dict[str, str | None]) -> str:
    """What to install for the ``missing`` libraries, for the onnxruntime described by ``build``."""
    cuda = (build.get("cuda") or "").split(".")[0] or next(
        (_major(n) for n in missing if _library_kind(n) == "cuda" and _major(n)), None
    )
    cu = cuda or "<CUDA major>"
    kinds = {_library_kind(n): n for n in reversed(list(missing))}
    hints = []
    if "tensorrt" in kinds:
        trt_major = _major(kinds["tensorrt"]) or "10"
        hints.append(
            f"TensorRT {trt_major} (pip install 'tensorrt-cu{cu}>={trt_major},<{int(trt_major) + 1}' and put its "
            "tensorrt_libs folder on LD_LIBRARY_PATH, or use the pixi rtx5090 environment: pixi run -e rtx5090 ...)"
        )
    if "cuda" in kinds:
        hints.append(
            f"the CUDA {cu} runtime libraries (pip install 'onnxruntime-gpu[cuda,cudnn]=={build.get('onnxruntime')}', "
            f"or a CUDA {cu} toolkit on LD_LIBRARY_PATH)"
        )
    if "cudnn" in kinds:
        hints.append(f"cuDNN 9 for CUDA {cu} (pip install nvidia-cudnn-cu{cu})")
    if "driver" in kinds:
        hints.append("the NVIDIA driver (libcuda.so.1: this machine has no NVIDIA GPU driver)")
    if "other" in kinds:
        hints.append(", ".join(n for n in missing if _library_kind(n) == "other"))
    text = "install " + "; ".join(hints) if hints else "check the CUDA/cuDNN/TensorRT installation"
    if cuda == "12":
        text += (
            f". This onnxruntime-gpu {build.get('onnxruntime')} is a CUDA 12 build; on a machine with CUDA 13 "
            "use the CUDA 13 environment instead (make env CUDA=13: onnxruntime-gpu 1.31)"
        )
    elif cuda:
        text += f". This onnxruntime-gpu {build.get('onnxruntime')} is a CUDA {cuda} build"
    return text


def suggested_providers(providers: list[str], failing: list[str], disable_cpu_fallback: bool, flag: str) -> str:
    """The provider setting that would work: ``providers`` without ``failing``; the CPU EP if no GPU is left."""
    remaining = [p for p in providers if p not in failing]
    gpu_left = any(p != CPU for p in remaining)
    if not gpu_left:
        remaining = [CPU]
    value = " ".join(remaining)
    text = f"{flag} {value}" if flag.startswith("-") else f'{flag}="{value}"'
    if disable_cpu_fallback and gpu_left:
        text += " --disable-cpu-fallback"
    elif disable_cpu_fallback:
        text += " and without --disable-cpu-fallback"
    if not gpu_left:
        text += " (CPU only: its latencies are CPU latencies)"
    return text


def provider_failure_message(
    probes: list[ProviderProbe], flag: str, alternative: str, build: dict[str, str | None]
) -> str:
    """One message for every requested provider whose library does not load (see :func:`probe_provider_library`).

    Args:
        probes: the failed probes.
        flag: the CLI flag or env var that carried the providers.
        alternative: the closing sentence, the setting that would work (e.g. ``"Or run with --providers ..."``).
        build: :func:`onnxruntime_build`.
    """
    parts = []
    for probe in probes:
        missing = list(probe.missing)
        what = f"it needs {missing[0]}, which the loader cannot find" if missing else probe.error
        also = f" (also not found: {', '.join(missing[1:])})" if len(missing) > 1 else ""
        library = Path(probe.library).name if probe.library else "its library"
        parts.append(f"{probe.provider} cannot be created: {library} does not load: {what}{also}")
    all_missing = tuple(dict.fromkeys(n for probe in probes for n in probe.missing))
    return f"{flag}: " + "; ".join(parts) + f". To fix: {install_hint(all_missing, build)}. {alternative}"


def check_provider_libraries(
    providers: list[str],
    disable_cpu_fallback: bool = False,
    flag: str = "--providers",
    probe: Callable[[str], ProviderProbe] | None = None,
) -> None:
    """Raise one UserError(flag=flag) for the requested GPU providers whose libraries do not load.

    Args:
        providers: provider names, ORT's spelling.
        disable_cpu_fallback: the run forbids the CPU EP (shapes the suggested alternative).
        flag: the CLI flag or env var that carried ``providers``.
        probe: ``provider -> ProviderProbe``; :func:`probe_provider_library` unless given (tests).
    """
    probe = probe or probe_provider_library
    failed = [result for result in (probe(p) for p in providers if p in PROVIDER_LIBRARIES) if not result.ok]
    if failed:
        instead = suggested_providers(list(providers), [r.provider for r in failed], disable_cpu_fallback, flag)
        message = provider_failure_message(failed, flag, f"Or run with {instead}", onnxruntime_build())
        raise UserError(message, flag=flag)


def check_providers(
    providers: list[str],
    disable_cpu_fallback: bool,
    flag: str = "--providers",
    probe: Callable[[str], ProviderProbe] | None = None,
) -> None:
    """Reject empty, duplicate, unknown or unavailable providers, CPU with ``disable_cpu_fallback``, and GPU
    providers whose libraries do not load here (:func:`check_provider_libraries`)."""
    if not providers:
        raise UserError(f"{flag}: give at least one execution provider", flag=flag)
    duplicates = sorted({p for p in providers if providers.count(p) > 1})
    if duplicates:
        raise UserError(f"{flag}: provider listed twice: {', '.join(duplicates)}", flag=flag)
    available = available_providers()
    for name in providers:
        if name not in KNOWN_PROVIDERS and name not in available:
            raise UserError(
                f"{flag}: unknown execution provider {name!r}; this onnxruntime offers: {', '.join(available)}",
                flag=flag,
            )
        if name not in available:
            raise UserError(
                f"{flag}: {name} is not available in the installed onnxruntime; available: {', '.join(available)}",
                flag=flag,
            )
    if disable_cpu_fallback and CPU in providers:
        raise UserError(
            f"{flag} includes {CPU} but --disable-cpu-fallback forbids the CPU EP; "
            "drop one of them (see the model card: list CPU explicitly and omit --disable-cpu-fallback)",
            flag=flag,
        )
    check_provider_libraries(providers, disable_cpu_fallback, flag, probe)


def parse_calibration_ep(ep: str) -> str | None:
    """ORT provider of one ModelOpt calibration EP spelling (``cpu``, ``cuda``, ``cuda:N``, ``trt``), or None."""
    match = re.fullmatch(r"(cpu|trt|cuda)(?::(\d+))?", ep)
    if match is None or (match.group(2) is not None and match.group(1) != "cuda"):
        return None
    return _CALIBRATION_EP_PROVIDER[match.group(1)]


def check_calibration_eps(
    eps: list[str], flag: str = "CALIBRATION_EPS", probe: Callable[[str], ProviderProbe] | None = None
) -> None:
    """Validate ModelOpt calibration EPs before quantizing: spelling, availability, and provider libraries.

    ModelOpt drops a CUDA or TensorRT calibration EP it cannot create with only a warning and
    calibrates on what is left; this check makes that one clear error instead.

    Args:
        eps: e.g. ``["cuda:0", "cpu"]`` (see :data:`MODELOPT_CALIBRATION_EPS`).
        flag: the env var or CLI flag that carried them.
        probe: see :func:`check_provider_libraries`.

    Raises:
        UserError(flag=flag): empty, misspelt or repeated entries, a provider this onnxruntime lacks,
            or a CUDA/TensorRT library that does not load (named, with what to install).
    """
    if not eps:
        raise UserError(f"{flag}: give at least one calibration EP (e.g. cpu, cuda:0, trt)", flag=flag)
    providers = {}
    for ep in eps:
        provider = parse_calibration_ep(ep)
        if provider is None:
            raise UserError(f"{flag}: unknown calibration EP {ep!r}; ModelOpt accepts cpu, cuda:N and trt", flag=flag)
        if ep in providers:
            raise UserError(f"{flag}: calibration EP {ep!r} listed twice", flag=flag)
        providers[ep] = provider
    available = available_providers()
    for ep, provider in providers.items():
        if provider not in available:
            raise UserError(
                f"{flag}: {ep} needs {provider}, which this onnxruntime does not have; "
                f"available: {', '.join(available)}",
                flag=flag,
            )
    probe = probe or probe_provider_library
    failed = [probe(p) for p in dict.fromkeys(providers.values()) if p in PROVIDER_LIBRARIES]
    failed = [result for result in failed if not result.ok]
    if failed:
        failing = {result.provider for result in failed}
        kept = " ".join([ep for ep, provider in providers.items() if provider not in failing] or ["cpu"])
        setting = f"{flag} {kept}" if flag.startswith("-") else f'{flag}="{kept}"'
        alternative = f"Or calibrate with {setting}"
        raise UserError(provider_failure_message(failed, flag, alternative, onnxruntime_build()), flag=flag)


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
        probe: provider-library probe, see :func:`check_provider_libraries` (tests).
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
