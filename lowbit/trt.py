"""TensorRT engine build + GPU latency with ``trtexec``, the way ModelOpt's ONNX PTQ examples measure it.

ModelOpt's examples (``examples/onnx_ptq/evaluate.py`` through ``modelopt.torch._deploy``) build a
strongly typed engine for a Q/DQ model (``--stronglyTyped``, builder optimization level 4), an FP16
engine for a float model, and time it with ``--warmUp=500 --avgRuns=500 --iterations=500
--noDataTransfers --useCudaGraph --useSpinWait``, reporting trtexec's *GPU Compute Time*: kernel
time of one inference, without host<->device copies. This module builds that command, runs it and
parses trtexec's performance summary.

TensorRT is optional: nothing here imports it. :func:`tensorrt_status` says what exists;
:func:`benchmark_engine` returns a result whose ``status`` is ``"measured"`` only when trtexec ran
and printed a GPU Compute Time line, and otherwise says why not, never a number it did not read.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from lowbit.logs import get_logger

__all__ = [
    "DEFAULT_ITERATIONS",
    "DEFAULT_TIMEOUT_S",
    "DEFAULT_WARMUP_MS",
    "FLOAT_OPT_LEVEL",
    "LOW_BIT_OPT_LEVEL",
    "PRECISION_FLAGS",
    "QDQ_MODES",
    "TRTEXEC_FALLBACK_PATHS",
    "benchmark_engine",
    "engine_precision",
    "find_trtexec",
    "parse_trtexec_latency",
    "tensorrt_available",
    "tensorrt_python_version",
    "tensorrt_status",
    "trtexec_command",
]

log = get_logger("trt")

# Where TensorRT's own packages (NGC containers, the Debian/RPM "libnvinfer-bin" package) put
# trtexec without adding it to PATH.
TRTEXEC_FALLBACK_PATHS = (Path("/usr/src/tensorrt/bin/trtexec"),)

# trtexec precision flags per engine precision, as ModelOpt's ``_deploy`` TensorRT runtime spells
# them (TRT_MODE_FLAGS): "int8"/"fp8" are weakly typed builds where TensorRT may also pick FP16.
PRECISION_FLAGS: dict[str, tuple[str, ...]] = {
    "fp32": (),
    "fp16": ("--fp16",),
    "stronglyTyped": ("--stronglyTyped",),
    "int8": ("--fp16", "--int8"),
    "fp8": ("--fp16", "--fp8"),
    "int8+fp8": ("--fp16", "--int8", "--fp8"),
    "best": ("--best",),
}
# How a Q/DQ model is built by default: "stronglyTyped" keeps every tensor in the type the ONNX
# graph gives it (what ModelOpt's examples use for Q/DQ models, and the numerics that ONNX Runtime
# evaluated); "mixed" lets TensorRT run non-quantized layers in FP16 too (``--fp16 --int8/--fp8``).
QDQ_MODES = ("stronglyTyped", "mixed")
# ModelOpt builds low-bit engines at optimization level 4 and float ones at TensorRT's default 3.
LOW_BIT_OPT_LEVEL = 4
FLOAT_OPT_LEVEL = 3
DEFAULT_WARMUP_MS = 500  # trtexec --warmUp is in milliseconds
DEFAULT_ITERATIONS = 500  # ModelOpt: DEFAULT_NUM_INFERENCE_PER_RUN = 500 per profiling run
DEFAULT_TIMEOUT_S = 3600


def find_trtexec(explicit: str | os.PathLike | None = None) -> str | None:
    """Path of a runnable ``trtexec``: ``explicit`` if given, else PATH, else TensorRT's usual install dir."""
    if explicit is not None:
        path = Path(explicit)
        return str(path) if path.is_file() and os.access(path, os.X_OK) else None
    found = shutil.which("trtexec")
    if found:
        return found
    for path in TRTEXEC_FALLBACK_PATHS:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    return None


def tensorrt_python_version() -> str | None:
    """Version of the importable ``tensorrt`` package (found without importing it), or None."""
    if importlib.util.find_spec("tensorrt") is None:
        return None
    for dist in ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt_cu12", "tensorrt-cu11"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def tensorrt_available(trtexec: str | os.PathLike | None = None) -> bool:
    """True when trtexec or the ``tensorrt`` Python package is present."""
    return find_trtexec(trtexec) is not None or tensorrt_python_version() is not None


def tensorrt_status(trtexec: str | os.PathLike | None = None) -> dict:
    """What TensorRT this machine has: ``{"trtexec": path|None, "tensorrt_python": version|None, "status": str}``.

    ``status`` is ``"available"`` when trtexec can run; otherwise the exact "not measured: ..." text
    that reports print instead of a latency.
    """
    exe = find_trtexec(trtexec)
    py = tensorrt_python_version()
    if exe is not None:
        status = "available"
    elif trtexec is not None:
        status = f"not measured: trtexec not found at {trtexec}"
    elif py is not None:
        status = (
            f"not measured: trtexec not found (the tensorrt Python package {py} is installed, but GPU compute "
            "time is measured with trtexec; put TensorRT's bin/ directory on PATH)"
        )
    else:
        status = "not measured: TensorRT not installed"
    return {"trtexec": exe, "tensorrt_python": py, "status": status}


def engine_precision(quant_dtypes: Sequence[str], qdq_mode: str = "stronglyTyped") -> str:
    """Engine precision for a model: ``fp16`` for a float model; for a Q/DQ model ``stronglyTyped``,
    or with ``qdq_mode="mixed"`` ``int8`` / ``fp8`` / ``int8+fp8`` after its quantized dtypes.

    Args:
        quant_dtypes: quantized tensor types of the model's Q/DQ pairs (metrics.json ``model.qdq.quant_dtypes``,
            e.g. ``["int8"]``, ``["float8e4m3fn"]``); empty for a float model.
        qdq_mode: one of :data:`QDQ_MODES`.
    """
    if qdq_mode not in QDQ_MODES:
        raise ValueError(f"qdq_mode must be one of {QDQ_MODES}, got {qdq_mode!r}")
    dtypes = {str(d).lower() for d in quant_dtypes}
    if not dtypes:
        return "fp16"
    if qdq_mode == "stronglyTyped":
        return "stronglyTyped"
    has_int8 = any(d in ("int8", "uint8") for d in dtypes)
    has_fp8 = any(d.startswith(("fp8", "float8")) for d in dtypes)
    if has_int8 and has_fp8:
        return "int8+fp8"
    if has_fp8:
        return "fp8"
    if has_int8:
        return "int8"
    return "stronglyTyped"  # other types (e.g. int4): only a strongly typed build follows the graph


def trtexec_command(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    precision: str,
    timing_cache: str | os.PathLike | None = None,
    iterations: int = DEFAULT_ITERATIONS,
    warmup_ms: int = DEFAULT_WARMUP_MS,
    avg_runs: int | None = None,
    builder_optimization_level: int | None = None,
    trtexec: str = "trtexec",
    extra_args: Sequence[str] = (),
) -> list[str]:
    """argv that builds an engine from ``onnx_path``, saves it, then times it like ModelOpt's examples.

    One trtexec call both builds and benchmarks: ``--onnx`` + precision flags + ``--saveEngine``
    (+ ``--timingCacheFile`` so later builds reuse kernel timings), then ``--warmUp`` ms of untimed
    runs and at least ``iterations`` timed ones with CUDA graphs, spin-wait synchronisation and no
    host<->device copies, so "GPU Compute Time" is the engine's kernel time alone.

    Args:
        onnx_path: model to build (float or Q/DQ ONNX, static input shape).
        engine_path: where trtexec writes the serialized engine.
        precision: a key of :data:`PRECISION_FLAGS` (see :func:`engine_precision`).
        timing_cache: timing cache file, shared between builds; None for none.
        iterations: minimum number of timed inferences (trtexec also runs for its default 3 s).
        warmup_ms: untimed warm-up, milliseconds.
        avg_runs: runs averaged per trace line; default ``iterations`` (ModelOpt: both 500).
        builder_optimization_level: default 4 for low-bit precisions, 3 for fp16/fp32 (as ModelOpt).
        trtexec: the executable.
        extra_args: appended verbatim (e.g. ``["--verbose"]``).
    """
    if precision not in PRECISION_FLAGS:
        raise ValueError(f"precision must be one of {sorted(PRECISION_FLAGS)}, got {precision!r}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if warmup_ms < 0:
        raise ValueError(f"warmup_ms must be >= 0, got {warmup_ms}")
    if builder_optimization_level is None:
        builder_optimization_level = FLOAT_OPT_LEVEL if precision in ("fp32", "fp16") else LOW_BIT_OPT_LEVEL
    argv = [str(trtexec), f"--onnx={onnx_path}", *PRECISION_FLAGS[precision], f"--saveEngine={engine_path}"]
    argv.append(f"--builderOptimizationLevel={builder_optimization_level}")
    if timing_cache is not None:
        argv.append(f"--timingCacheFile={timing_cache}")
    argv += [
        f"--warmUp={warmup_ms}",
        f"--iterations={iterations}",
        f"--avgRuns={avg_runs if avg_runs is not None else iterations}",
        "--useCudaGraph",
        "--noDataTransfers",
        "--useSpinWait",
    ]
    argv += list(extra_args)
    return argv


# "GPU Compute Time: min = 0.97 ms, max = 4.2 ms, mean = 0.99 ms, median = 0.98 ms, percentile(90%) = 1.0 ms, ..."
_STAT = re.compile(r"(min|max|mean|median|percentile\(\s*([0-9.]+)\s*%\))\s*=\s*([-+0-9.eE]+|inf|nan)\s*(ms|s|us)\b")
_UNIT_TO_MS = {"ms": 1.0, "s": 1000.0, "us": 1e-3}
_VERSION = re.compile(r"TensorRT\.trtexec \[TensorRT v(\d+)\]|TensorRT version:\s*([0-9][0-9.]*)")


def _parse_stats(line: str) -> dict[str, float]:
    stats: dict[str, float] = {}
    for name, pct, value, unit in _STAT.findall(line):
        key = name if not pct else "p" + (pct.removesuffix(".0"))
        stats[key] = float(value) * _UNIT_TO_MS[unit]
    return stats


def parse_trtexec_latency(text: str) -> dict:
    """Parse trtexec's "=== Performance summary ===".

    Returns:
        ``{"gpu_compute_ms": {min, max, mean, median, p90, p95, p99 ...}, "latency_ms": {...} | None,
        "throughput_qps": float | None, "trt_version": str | None}``; percentiles are the ones trtexec
        printed (TensorRT >= 8.6 prints 90/95/99 %, older ones 99 % only). The last summary in
        ``text`` wins.

    Raises:
        ValueError: no "GPU Compute Time" line with min/max/mean/median (trtexec failed or was
            run with --skipInference).
    """
    gpu = host = None
    throughput = None
    for line in text.splitlines():
        if "GPU Compute Time:" in line and "Total GPU Compute Time" not in line:
            gpu = _parse_stats(line.split("GPU Compute Time:", 1)[1])
        elif re.search(r"(^|\]\s*)Latency:", line.strip()):
            host = _parse_stats(line.split("Latency:", 1)[1])
        elif "Throughput:" in line:
            match = re.search(r"Throughput:\s*([-+0-9.eE]+)\s*qps", line)
            if match:
                throughput = float(match.group(1))
    if not gpu or not {"min", "max", "mean", "median"} <= gpu.keys():
        raise ValueError(
            "no 'GPU Compute Time: min = ..., max = ..., mean = ..., median = ...' line in the trtexec output"
        )
    version = None
    for match in _VERSION.finditer(text):
        if match.group(1):  # "[TensorRT v100300]" -> 10.3.0
            number = int(match.group(1))
            version = f"{number // 10000}.{number // 100 % 100}.{number % 100}"
        else:
            version = match.group(2)
    return {"gpu_compute_ms": gpu, "latency_ms": host, "throughput_qps": throughput, "trt_version": version}


def benchmark_engine(
    onnx_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    name: str,
    precision: str,
    timing_cache: str | os.PathLike | None = None,
    trtexec: str | os.PathLike | None = None,
    iterations: int = DEFAULT_ITERATIONS,
    warmup_ms: int = DEFAULT_WARMUP_MS,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> dict:
    """Build ``<out_dir>/<name>.engine`` with trtexec and measure its GPU compute time.

    trtexec's full output goes to ``<out_dir>/<name>.trtexec.log``. A failed build leaves no engine.

    Returns:
        ``{"status": "measured", "precision", "command", "gpu_compute_ms" {...}, "latency_ms",
        "throughput_qps", "trt_version", "engine_path", "engine_bytes", "log_path", "wall_s"}``, or
        ``{"status": "not measured: ..." | "failed: ...", "precision", "command"?, "log_path"?}``.
    """
    exe = find_trtexec(trtexec)
    if exe is None:
        return {"status": tensorrt_status(trtexec)["status"], "precision": precision}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    engine_path = out_dir / f"{name}.engine"
    log_path = out_dir / f"{name}.trtexec.log"
    partial_engine = out_dir / f".{name}.engine.partial"
    argv = trtexec_command(
        onnx_path,
        partial_engine,
        precision,
        timing_cache=timing_cache,
        iterations=iterations,
        warmup_ms=warmup_ms,
        trtexec=exe,
    )
    result: dict = {"precision": precision, "command": argv, "log_path": str(log_path)}
    log.info("TensorRT %s: %s", name, " ".join(argv))
    t0 = time.perf_counter()
    try:
        with open(log_path, "w", encoding="utf-8") as log_file:
            proc = subprocess.run(argv, stdout=log_file, stderr=subprocess.STDOUT, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        partial_engine.unlink(missing_ok=True)
        return {**result, "status": f"failed: trtexec ran past {timeout_s:.0f} s; see {log_path}"}
    except OSError as e:
        partial_engine.unlink(missing_ok=True)
        return {**result, "status": f"failed: could not run {exe} ({e})"}
    wall_s = round(time.perf_counter() - t0, 2)
    text = log_path.read_text(encoding="utf-8", errors="replace")
    if proc.returncode != 0:
        partial_engine.unlink(missing_ok=True)
        return {**result, "status": f"failed: trtexec exit status {proc.returncode}; see {log_path}", "wall_s": wall_s}
    try:
        parsed = parse_trtexec_latency(text)
    except ValueError as e:
        partial_engine.unlink(missing_ok=True)
        return {**result, "status": f"failed: {e}; see {log_path}", "wall_s": wall_s}
    if partial_engine.exists():
        os.replace(partial_engine, engine_path)
    result.update(parsed)
    result.update(
        status="measured",
        engine_path=str(engine_path) if engine_path.exists() else None,
        engine_bytes=engine_path.stat().st_size if engine_path.exists() else None,
        wall_s=wall_s,
    )
    # argv names the temporary engine file; record the one the engine was saved as.
    result["command"] = [a.replace(str(partial_engine), str(engine_path)) for a in argv]
    return result
