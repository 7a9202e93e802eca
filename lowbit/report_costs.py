"""Measures what ranks the variants besides accuracy: a TensorRT engine's GPU compute time per variant
(:func:`measure_tensorrt`, when ``trtexec`` exists), the low-precision share of its MACs (:func:`add_mac_share`)
and the bytes of its weights at their deployed width (:func:`add_weight_bytes`).

With ``--tensorrt auto`` and ``trtexec`` installed, one engine per variant is built under ``<out-dir>/tensorrt/``
(FP16 for the float model, strongly typed for Q/DQ models) and timed the way ModelOpt's examples do
(:mod:`lowbit.trt`); a rerun reuses an engine result whose model and settings are unchanged (delete
``<out-dir>/tensorrt/`` to re-measure).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lowbit import records, trt
from lowbit.errors import UserError
from lowbit.logs import get_logger
from lowbit.report_variant import Variant
from lowbit.runs import atomic_write_json

__all__ = [
    "TRT_DISABLED",
    "TRT_NOT_INSTALLED",
    "TensorrtTimings",
    "add_mac_share",
    "add_weight_bytes",
    "measure_tensorrt",
    "weight_bytes",
    "with_tensorrt",
]

TRT_NOT_INSTALLED = "not measured: TensorRT not installed"
TRT_DISABLED = "not measured: disabled (--tensorrt off)"
log = get_logger("make_report")  # the report step's log name, as report.log has always shown it


@dataclass(frozen=True)
class TensorrtTimings:
    """TensorRT engine results of one report."""

    # report.json's "tensorrt" (status, trtexec, tensorrt_python, and qdq_mode once looked for), in this key order
    section: dict[str, Any]
    results: dict[str, dict] = field(default_factory=dict)  # metrics_path -> lowbit.trt.benchmark_engine result


def _previous_result(path: Path) -> Any:
    """A TensorRT result kept from an earlier report, or None (missing or damaged: measured again)."""
    try:
        return records.read_json(path)
    except UserError:
        return None


def _slug(label: str, used: set[str]) -> str:
    base = re.sub(r"[^a-z0-9._-]+", "_", label.lower()).strip("_") or "variant"
    slug, i = base, 2
    while slug in used:
        slug, i = f"{base}_{i}", i + 1
    used.add(slug)
    return slug


def measure_tensorrt(
    variants: tuple[Variant, ...] | list[Variant],
    out_dir: Path,
    *,
    mode: str = "auto",
    trtexec: Path | None = None,
    qdq_mode: str = "stronglyTyped",
    iterations: int = trt.DEFAULT_ITERATIONS,
    warmup_ms: int = trt.DEFAULT_WARMUP_MS,
) -> TensorrtTimings:
    """Engine + GPU compute time per variant when trtexec exists (``mode`` "auto"); nothing when ``mode`` is "off".

    Args:
        variants: the rows to time; results are keyed by their ``metrics_path``.
        out_dir: the report's folder; engines, logs and results go to ``<out_dir>/tensorrt/``.
        mode: ``--tensorrt``: "auto" or "off".
        trtexec: ``--trtexec``; None means PATH, then /usr/src/tensorrt/bin/trtexec.
        qdq_mode, iterations, warmup_ms: ``--trt-qdq-mode``, ``--trt-iterations``, ``--trt-warmup-ms``.
    """
    if mode == "off":
        return TensorrtTimings({"status": TRT_DISABLED, "trtexec": None, "tensorrt_python": None})
    found = trt.tensorrt_status(trtexec)
    info = {"trtexec": found["trtexec"], "tensorrt_python": found["tensorrt_python"], "qdq_mode": qdq_mode}
    if found["trtexec"] is None:
        log.info("TensorRT latency %s", found["status"])
        return TensorrtTimings({**info, "status": found["status"]})
    trt_dir = out_dir / "tensorrt"
    results, used = {}, set()
    for v in variants:
        name = _slug(v.label, used)
        if v.model_file is None:
            results[v.metrics_path] = {"status": "not measured: the evaluated model file is not available"}
            continue
        precision = trt.engine_precision(v.quant_dtypes, qdq_mode)
        key = {
            "model_sha256": v.model_sha256,
            "precision": precision,
            "iterations": iterations,
            "warmup_ms": warmup_ms,
            "trtexec": found["trtexec"],
        }
        record = trt_dir / f"{name}.json"
        previous = _previous_result(record)
        if (
            isinstance(previous, dict)
            and previous.get("status") == "measured"
            and previous.get("key") == key
            and Path(str(previous.get("engine_path"))).is_file()
        ):
            log.info("TensorRT %s: unchanged since %s, reused", v.label, record)
            results[v.metrics_path] = {**previous, "reused": True}
            continue
        result = trt.benchmark_engine(
            str(v.model_file),
            trt_dir,
            name,
            precision,
            timing_cache=trt_dir / "timing.cache",
            trtexec=found["trtexec"],
            iterations=iterations,
            warmup_ms=warmup_ms,
        )
        result["key"] = key
        atomic_write_json(record, result)
        log.info("TensorRT %s (%s): %s", v.label, precision, result["status"])
        results[v.metrics_path] = result
    return TensorrtTimings({**info, "status": "measured"}, results)


def with_tensorrt(variants: tuple[Variant, ...], timings: TensorrtTimings | None) -> tuple[list[Variant], dict]:
    """Each row with its TensorRT result (a "not measured: ..." status where there is none), and report.json's
    ``tensorrt`` section, whose status says whether anything was measured. ``timings`` None: TensorRT was not
    looked for (status "not measured: TensorRT not installed")."""
    section = dict(timings.section) if timings is not None else {"status": TRT_NOT_INSTALLED}
    results = (timings.results if timings is not None else {}) or {}
    timed = []
    for v in variants:
        res = results.get(v.metrics_path)
        if res is None:
            status = section["status"] if section["status"] != "measured" else "not measured: not benchmarked"
            res = {"status": status}
        timed.append(replace(v, tensorrt=res))
    measured = [v for v in timed if v.tensorrt.get("status") == "measured"]
    if results and measured:
        section["status"] = "measured"
    elif results:  # TensorRT ran but nothing came out of it
        section["status"] = "not measured: every trtexec run failed (see the variants' tensorrt.status)"
    return timed, section


def add_mac_share(variants: list[Variant]) -> list[Variant]:
    """Each row with ``mac_share`` (low-precision share of Conv/MatMul/Gemm MACs, 0..1), ``low_precision_macs`` and
    ``total_macs`` from its model file (``lowbit.mac_share``); None when the file is gone or cannot be read (with a
    note). A row whose ``mac_share`` is already known is kept as it is."""
    from lowbit.mac_share import low_precision_mac_share  # imports onnx: loaded only when shares are computed

    out = []
    for v in variants:
        if v.mac_share is not None:
            out.append(v)
            continue
        share = None
        if v.model_file:
            try:
                share = low_precision_mac_share(Path(v.model_file), flag="model file")
            except (UserError, ValueError) as e:  # shapes that cannot be inferred: the cost is unknown, not a failure
                v = v.with_note(f"low-precision MAC share unknown: {e}")
        elif v.role == "baseline":
            out.append(replace(v, mac_share=0.0, low_precision_macs=0, total_macs=None))
            continue
        out.append(
            replace(
                v,
                mac_share=share.share if share else None,
                low_precision_macs=share.low_precision_macs if share else None,
                total_macs=share.total_macs if share else None,
            )
        )
    return out


_QUANTIZERS = ("QuantizeLinear", "DequantizeLinear")


def weight_bytes(model_path: Path) -> int:
    """Bytes of a model's initializers at the width they are deployed at: an initializer that a QuantizeLinear
    quantizes (or a DequantizeLinear reads) counts 1 byte per element (INT8/FP8), every other one its own dtype's
    width (scales and zero points included). The ONNX file of a Q/DQ model keeps float weights; TensorRT stores
    the quantized ones in 1 byte.

    Raises:
        UserError: the file cannot be read as ONNX (the flag names it).
    """
    from onnx import helper  # loaded only when sizes are computed

    from lowbit.onnx_stats import load_model_proto

    graph = load_model_proto(Path(model_path), flag="model file").graph
    quantized = {n.input[0] for n in graph.node if n.op_type in _QUANTIZERS and n.input}
    total = 0
    for init in graph.initializer:
        count = 1
        for d in init.dims:
            count *= int(d)
        width = 1 if init.name in quantized else helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
        total += count * width
    return total


def add_weight_bytes(variants: list[Variant]) -> list[Variant]:
    """Each row with ``weight_bytes`` (:func:`weight_bytes`) from its model file; None when the file is gone or
    cannot be read (with a note)."""
    out = []
    for v in variants:
        size = None
        if v.model_file:
            try:
                size = weight_bytes(Path(v.model_file))
            except (UserError, ValueError, KeyError, TypeError) as e:
                v = v.with_note(f"weight size at deployed width unknown: {e}")
        out.append(replace(v, weight_bytes=size))
    return out
