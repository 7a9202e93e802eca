"""Which ONNX Runtime execution providers can run here: provider names, the checks of a requested provider list, and
the probe of each GPU provider's shared library with what to install when it does not load.

Provider names are ONNX Runtime's own (``TensorrtExecutionProvider``, ``CUDAExecutionProvider``,
``CPUExecutionProvider``). Before a session is created (:func:`lowbit.ort_session.build_session` calls
:func:`check_providers`), and before ModelOpt calibrates (:func:`check_calibration_eps`):

* every requested provider must be compiled into the installed onnxruntime;
* every requested GPU provider's library (``libonnxruntime_providers_{tensorrt,cuda}.so``) must load,
  after ``onnxruntime.preload_dlls()`` has loaded CUDA/cuDNN from pip ``nvidia-*`` wheels. A library
  that does not load is one :class:`~lowbit.errors.UserError` naming the provider, the missing shared
  library (``libnvinfer.so.10``, ``libcublasLt.so.12`` ...), what to install, and the provider list
  that would work instead.

What was verified where: the library probe is unit-tested on a CPU-only machine (whose onnxruntime-gpu
lacks the CUDA 12 and TensorRT libraries, so the probe's failure path runs for real there).
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

from lowbit.errors import UserError

__all__ = [
    "CPU",
    "CUDA",
    "GPU_PROVIDERS",
    "KNOWN_PROVIDERS",
    "MODELOPT_CALIBRATION_EPS",
    "PROVIDER_LIBRARIES",
    "TRT",
    "ProviderProbe",
    "available_providers",
    "check_calibration_eps",
    "check_provider_libraries",
    "check_providers",
    "install_hint",
    "onnxruntime_build",
    "parse_calibration_ep",
    "probe_provider_library",
    "provider_failure_message",
    "suggested_providers",
]

TRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
GPU_PROVIDERS = (TRT, CUDA)

# Execution providers ModelOpt's ONNX quantizer accepts for calibration (its own spelling).
MODELOPT_CALIBRATION_EPS = ("cpu", "cuda:0", "cuda:1", "cuda:2", "cuda:3", "trt")
_CALIBRATION_EP_PROVIDER = {"cpu": CPU, "cuda": CUDA, "trt": TRT}

# Names the session factory knows how to configure; anything else is rejected before ORT sees it.
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


def available_providers() -> list[str]:
    """Providers compiled into the installed onnxruntime (not a promise that their libraries load)."""
    import onnxruntime as ort

    return list(ort.get_available_providers())


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
