"""Inspect a Q/DQ ONNX model for float16 hazards: the report on its scales, its initializers and the runtime's
fp16 rounding, with the verdict and the findings that change results.

ModelOpt's ``high_precision_dtype=fp16`` converts every float tensor of a Q/DQ model to float16,
scales included, and replaces initializer values below fp16's smallest subnormal (5.96e-8) with that
value. Three things can then go wrong, and this module checks each without running the model:

* **scales**: a scale below fp16's smallest normal number (6.10e-5) is stored as a subnormal (fewer
  significant bits); one below half the smallest subnormal (2.98e-8) becomes exactly zero in a plain
  cast, and ModelOpt's clamp turns it into 5.96e-8 instead (a different scale). A zero scale makes
  DequantizeLinear output zeros and QuantizeLinear divide by zero.
* **initializers** (weights, biases, constants), compared by name with the FP32 source model:
  non-zero values that underflowed (flushed or clamped), that became subnormal, or that overflowed
  fp16's maximum (65504).
* **the runtime**: a QuantizeLinear whose input is float16 is rounded toward zero by some onnxruntime
  CPU kernels instead of to nearest even; :mod:`lowbit.qdq_fp16` probes the installed one and holds the
  float32 rewrite of such nodes.

:func:`complete_report` adds that probe, and optionally the dynamic comparison of
:mod:`lowbit.onnx_compare` (two models run on a few images, tensor by tensor), to the static report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

from lowbit.errors import UserError
from lowbit.logs import get_logger
from lowbit.onnx_compare import compare_runs, output_error
from lowbit.qdq_fp16 import (
    FP16_MAX,
    FP16_MIN_NORMAL,
    FP16_MIN_SUBNORMAL,
    ROUNDING_TOWARD_ZERO,
    probe_fp16_quantize_rounding,
    with_fp32_quantize,
)
from lowbit.qdq_graph import (
    constant_arrays,
    dtype_name,
    inferred_elem_types,
    quant_max_magnitude,
    quantize_output_type,
    tensor_consumers,
)
from lowbit.qdq_inspect_text import verdict

__all__ = [
    "compare_initializers",
    "complete_report",
    "findings_present",
    "fp16_value_counts",
    "inspect_qdq",
    "load_model",
]

FLOAT, FLOAT16, DOUBLE = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE

log = get_logger("qdq_inspect")


def load_model(path: Path, flag: str) -> onnx.ModelProto:
    """The model at ``path`` with its weights; UserError(flag) when it is not a readable ONNX model."""
    try:
        return onnx.load(str(path))
    except Exception as exc:  # protobuf raises several types for a file that is not a model
        raise UserError(
            f"{flag}: {path} is not a readable ONNX model ({type(exc).__name__}: {exc})", flag=flag
        ) from exc


def fp16_value_counts(values: np.ndarray) -> dict[str, int]:
    """How the non-zero values of ``values`` fare in float16.

    Args:
        values: any float array (float16 values are checked as stored).

    Returns:
        ``nonzero``; ``subnormal``: 0 < |v| < 6.10e-5 (fewer significant bits in fp16);
        ``to_zero``: non-zero values a plain cast to fp16 makes exactly 0 (|v| <= 2.98e-8);
        ``below_min_subnormal``: 0 < |v| < 5.96e-8, the values ModelOpt's conversion replaces with
        5.96e-8; ``overflow``: |v| > 65504 (inf in a plain cast, clamped by ModelOpt);
        ``nonfinite``: inf or NaN already.
    """
    a = np.asarray(values)
    a64 = a.astype(np.float64)
    finite = np.isfinite(a64)
    mag = np.abs(np.where(finite, a64, 0.0))
    nonzero = mag > 0
    with np.errstate(over="ignore"):
        as16 = a64.astype(np.float16)
    return {
        "nonzero": int(nonzero.sum()),
        "subnormal": int((nonzero & (mag < FP16_MIN_NORMAL)).sum()),
        "to_zero": int((nonzero & (as16 == 0)).sum()),
        "below_min_subnormal": int((nonzero & (mag < FP16_MIN_SUBNORMAL)).sum()),
        "overflow": int((mag > FP16_MAX).sum()),
        "nonfinite": int((~finite).sum()),
    }


def _attr_int(node, name: str) -> int | None:
    return next((a.i for a in node.attribute if a.name == name), None)


def _summary(values: np.ndarray) -> dict[str, Any]:
    mag = np.abs(values.astype(np.float64)).ravel()
    return {
        "numel": int(mag.size),
        "min": float(mag.min()) if mag.size else None,
        "max": float(mag.max()) if mag.size else None,
    }


def _range_max(scale: dict[str, Any], quant_code: int | None) -> float | None:
    """Largest magnitude a Q/DQ pair represents: max scale x the quantized type's largest magnitude."""
    largest = quant_max_magnitude(quant_code)
    if largest is None or scale.get("max") is None:
        return None
    return float(scale["max"] * largest)


def inspect_qdq(model, source=None) -> dict[str, Any]:
    """Static fp16 report of a Q/DQ model (no inference).

    Args:
        model: the Q/DQ ``onnx.ModelProto`` (or a path).
        source: optional FP32 model it was quantized from (``ModelProto`` or path); its
            initializers are compared by name with the Q/DQ model's float16 ones.

    Returns:
        A JSON-ready dict with keys:

        * ``pairs``: one entry per QuantizeLinear (with the DequantizeLinear nodes reading it) and
          per DequantizeLinear of a constant (pre-quantized weights): ``q_node``, ``dq_nodes``,
          ``tensor`` (the quantized tensor), ``kind`` (``weight`` | ``activation``),
          ``input_dtype``, ``scale`` {``name``, ``dtype``, ``numel``, ``min``, ``max``,
          ``subnormal_in_fp16``, ``zero_in_fp16``, ``clamped_in_fp16``} (counts of elements; for an
          fp32 scale, what a conversion to fp16 would do), ``dq_scales`` (the same for DQ nodes
          with a scale initializer of their own), ``quant_dtype``,
          ``range_max`` (scale max x qmax: the largest magnitude the pair can represent),
          ``range_exceeds_fp16``, ``consumers`` (nodes reading the dequantized tensor);
        * ``counts``: ``pairs``, ``scales_fp16``, ``scales_fp32``, ``scales_below_fp16_min_normal``
          (pairs with any scale element < 6.10e-5), ``scales_zero_in_fp16`` (pairs with a scale
          element that is or would become 0 in fp16), ``scales_clamped_in_fp16`` (fp16 scales
          equal to 5.96e-8, ModelOpt's replacement for smaller values),
          ``fp16_quantize_inputs`` (QuantizeLinear nodes whose input is float16),
          ``range_exceeds_fp16``;
        * ``fp16_quantize_nodes``: names of those QuantizeLinear nodes;
        * ``casts``: Cast nodes {``name``, ``input``, ``to``};
        * ``initializers``: counts by element type, plus ``fp16_subnormal_values``,
          ``fp16_min_subnormal_values`` (values equal to 5.96e-8), ``fp16_nonfinite_values``;
        * ``source_comparison`` (with ``source``): per-initializer findings for float16
          initializers whose FP32 source values underflowed, became subnormal or overflowed, with
          the op types reading them; ``matched`` and ``unmatched`` counts (see
          :func:`compare_initializers`);
        * ``low_scale_pairs`` / ``zero_scale_pairs``: pairs (Q node, or DQ node without Q) with a
          scale below fp16's min normal / zero in fp16;
        * ``affected_nodes``: the nodes reading the dequantized tensors of those pairs.
    """
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    graph = model.graph
    consts = constant_arrays(graph)
    types = inferred_elem_types(model)
    consumers = tensor_consumers(graph)
    pairs = _pair_entries(list(graph.node), consts, types, consumers)
    report: dict[str, Any] = {"pairs": pairs, **_pair_counts(pairs)}
    report["casts"] = [
        {"name": n.name, "input": n.input[0], "to": dtype_name(_attr_int(n, "to"))}
        for n in graph.node
        if n.op_type == "Cast"
    ]
    report["initializers"] = _initializer_stats(graph, consts)
    if source is not None:
        report["source_comparison"] = compare_initializers(model, source, consumers)
    return report


def _scale_entry(name: str, consts: dict[str, np.ndarray], types: dict[str, int]) -> dict[str, Any]:
    """What a scale tensor holds and what fp16 does (or would do) to it; values None for a computed scale."""
    if name not in consts:
        return {
            "name": name,
            "dtype": dtype_name(types.get(name)),
            "numel": None,
            "min": None,
            "max": None,
            "subnormal_in_fp16": None,
            "zero_in_fp16": None,
            "clamped_in_fp16": None,
        }
    values = consts[name]
    counts = fp16_value_counts(values)
    mag = np.abs(values.astype(np.float64))
    is16 = values.dtype == np.float16
    return {
        "name": name,
        "dtype": dtype_name(types.get(name)),
        **_summary(values),
        "subnormal_in_fp16": counts["subnormal"],
        # an fp16 scale that is 0, or an fp32 one a cast to fp16 would flush to 0
        "zero_in_fp16": int((mag == 0).sum()) if is16 else counts["to_zero"] + int((mag == 0).sum()),
        "clamped_in_fp16": int((mag == FP16_MIN_SUBNORMAL).sum()) if is16 else counts["below_min_subnormal"],
    }


def _pair_entry(
    q_node,
    dq_nodes: list,
    quant_code: int | None,
    scale: dict[str, Any],
    dq_scales: list[dict],
    readers: list[str],
    consts: dict,
    types: dict[str, int],
) -> dict[str, Any]:
    tensor = (q_node or dq_nodes[0]).input[0]
    range_max = _range_max(scale, quant_code)
    return {
        "q_node": q_node.name if q_node is not None else None,
        "dq_nodes": [dq.name for dq in dq_nodes],
        "tensor": tensor,
        "kind": "weight" if tensor in consts else "activation",
        "input_dtype": dtype_name(types.get(tensor)),
        "scale": scale,
        "dq_scales": dq_scales,
        "quant_dtype": dtype_name(quant_code),
        "range_max": range_max,
        "consumers": readers,
        "range_exceeds_fp16": bool(range_max is not None and range_max > FP16_MAX),
    }


def _pair_entries(nodes: list, consts: dict, types: dict[str, int], consumers: dict[str, list]) -> list[dict]:
    """One entry per QuantizeLinear (with its DQ readers), then per DequantizeLinear of a stored constant."""
    pairs: list[dict[str, Any]] = []
    q_outputs = set()
    for node in nodes:
        if node.op_type != "QuantizeLinear":
            continue
        q_outputs.add(node.output[0])
        dqs = [c for c in consumers.get(node.output[0], []) if c.op_type == "DequantizeLinear"]
        readers = [c.name for dq in dqs for c in consumers.get(dq.output[0], [])]
        # a DQ with its own scale initializer (ModelOpt duplicates shared constants) is checked too
        dq_scales = [_scale_entry(dq.input[1], consts, types) for dq in dqs if dq.input[1] != node.input[1]]
        scale = _scale_entry(node.input[1], consts, types)
        pairs.append(
            _pair_entry(node, dqs, quantize_output_type(node, types), scale, dq_scales, readers, consts, types)
        )
    for node in nodes:
        if node.op_type == "DequantizeLinear" and node.input[0] not in q_outputs:
            readers = [c.name for c in consumers.get(node.output[0], [])]
            scale = _scale_entry(node.input[1], consts, types)
            pairs.append(_pair_entry(None, [node], types.get(node.input[0]), scale, [], readers, consts, types))
    return pairs


def _pair_counts(pairs: list[dict[str, Any]]) -> dict[str, Any]:
    """The report's ``counts``, ``fp16_quantize_nodes``, ``affected_nodes`` and low/zero-scale pair lists."""

    def any_scale(pair, key) -> bool:
        return any((s.get(key) or 0) > 0 for s in [pair["scale"], *pair["dq_scales"]])

    low = [p for p in pairs if any_scale(p, "subnormal_in_fp16")]
    zero = [p for p in pairs if any_scale(p, "zero_in_fp16")]
    clamped = [p for p in pairs if any_scale(p, "clamped_in_fp16") and p["scale"]["dtype"] == "FLOAT16"]
    fp16_q = [p["q_node"] for p in pairs if p["q_node"] is not None and p["input_dtype"] == "FLOAT16"]
    scale_types = [p["scale"]["dtype"] for p in pairs]
    return {
        "counts": {
            "pairs": len(pairs),
            "scales_fp16": scale_types.count("FLOAT16"),
            "scales_fp32": scale_types.count("FLOAT"),
            "scales_below_fp16_min_normal": len(low),
            "scales_zero_in_fp16": len(zero),
            "scales_clamped_in_fp16": len(clamped),
            "fp16_quantize_inputs": len(fp16_q),
            "range_exceeds_fp16": sum(1 for p in pairs if p["range_exceeds_fp16"] and p["input_dtype"] == "FLOAT16"),
        },
        "fp16_quantize_nodes": fp16_q,
        "affected_nodes": sorted({c for p in low + zero for c in p["consumers"]}),
        "low_scale_pairs": [p["q_node"] or p["dq_nodes"][0] for p in low],
        "zero_scale_pairs": [p["q_node"] or p["dq_nodes"][0] for p in zero],
    }


def _initializer_stats(graph, consts: dict[str, np.ndarray]) -> dict[str, Any]:
    """Initializer counts by element type, and the fp16 ones' subnormal / 5.96e-8 / non-finite values."""
    init_types: dict[str, int] = {}
    fp16_sub = fp16_min_sub = fp16_nonfinite = 0
    for init in graph.initializer:
        key = dtype_name(init.data_type)
        init_types[key] = init_types.get(key, 0) + 1
        if init.data_type == FLOAT16:
            values = consts[init.name]
            counts = fp16_value_counts(values)
            fp16_sub += counts["subnormal"]
            fp16_nonfinite += counts["nonfinite"]
            fp16_min_sub += int((np.abs(values.astype(np.float64)) == FP16_MIN_SUBNORMAL).sum())
    return {
        "by_dtype": init_types,
        "fp16_subnormal_values": fp16_sub,
        "fp16_min_subnormal_values": fp16_min_sub,
        "fp16_nonfinite_values": fp16_nonfinite,
    }


def compare_initializers(model, source, consumers: dict[str, list] | None = None) -> dict[str, Any]:
    """Float16 initializers of ``model`` against the same-named FP32 initializers of ``source``.

    Returns:
        ``matched``, ``unmatched`` (fp16 initializers with no FP32 source of that name and shape),
        ``max_rel_error`` (largest |fp16 - fp32| / max|fp32| over matched tensors), and
        ``findings``: one entry per tensor with values that underflowed (``to_zero``: flushed by a
        plain cast; ``below_min_subnormal``: replaced by 5.96e-8 in ModelOpt's conversion),
        became ``subnormal``, or ``overflow``-ed, with ``readers`` (op types reading it) and
        ``quantized`` (true when every reader is a QuantizeLinear: the values are then re-rounded
        to the int8 grid, and an underflow far below the step size changes nothing).
    """
    from onnx import numpy_helper

    if not isinstance(source, onnx.ModelProto):
        source = onnx.load(str(source))
    if consumers is None:
        consumers = tensor_consumers(model.graph)
    src = {i.name: i for i in source.graph.initializer if i.data_type in (FLOAT, DOUBLE)}

    findings = []
    matched = unmatched = 0
    worst = 0.0
    for init in model.graph.initializer:
        if init.data_type != FLOAT16:
            continue
        ref = src.get(init.name)
        if ref is None or list(ref.dims) != list(init.dims):
            unmatched += 1
            continue
        matched += 1
        ref_values = numpy_helper.to_array(ref).astype(np.float64)
        new_values = numpy_helper.to_array(init).astype(np.float64)
        peak = np.abs(ref_values).max() if ref_values.size else 0.0
        if peak > 0:
            worst = max(worst, float(np.abs(new_values - ref_values).max() / peak))
        counts = fp16_value_counts(ref_values)
        if counts["subnormal"] or counts["overflow"]:
            readers = [c.op_type for c in consumers.get(init.name, [])]
            findings.append(
                {
                    "initializer": init.name,
                    "numel": int(ref_values.size),
                    "subnormal": counts["subnormal"],
                    "to_zero": counts["to_zero"],
                    "below_min_subnormal": counts["below_min_subnormal"],
                    "overflow": counts["overflow"],
                    "readers": sorted(set(readers)),
                    "quantized": bool(readers) and all(r == "QuantizeLinear" for r in readers),
                }
            )
    return {"matched": matched, "unmatched": unmatched, "max_rel_error": worst, "findings": findings}


def complete_report(
    report: dict[str, Any],
    model,
    reference=None,
    images: np.ndarray | None = None,
    reference_label: str | None = None,
    *,
    rewrite: bool = False,
    threshold: float = 0.05,
    top: int = 10,
):
    """Add the runtime probe, the optional dynamic comparison and the verdict to an :func:`inspect_qdq` report.

    Args:
        report: from :func:`inspect_qdq` on ``model``; completed in place with ``runtime``, ``dynamic``
            and ``fp32_quantize_check`` (with ``images``), ``verdict`` and ``findings``.
        model: the inspected ``ModelProto``.
        reference: the model to compare against when ``images`` are given.
        images: float32 [N, C, H, W] (:func:`lowbit.onnx_compare.load_images`), or None for the static report only.
        reference_label: how the report names ``reference``.
        rewrite: also build the fp32-quantize rewrite even without images.
        threshold, top: see :func:`lowbit.onnx_compare.compare_runs`.

    Returns:
        The :func:`lowbit.qdq_fp16.with_fp32_quantize` rewrite of ``model`` when it was built, else None.
    """
    report["runtime"] = probe_fp16_quantize_rounding()
    fixed = None
    if report["counts"]["fp16_quantize_inputs"] and (rewrite or images is not None):
        fixed, changed = with_fp32_quantize(model)
        log.info("%d float16 QuantizeLinear nodes rewritten to compute in float32", changed)
    if images is not None:
        log.info("running %d images through the model and %s (all tensors exposed)", len(images), reference_label)
        dynamic = compare_runs(model, reference, images, threshold=threshold, top=top)
        dynamic["reference"] = reference_label
        report["dynamic"] = dynamic
        if fixed is not None:
            report["fp32_quantize_check"] = {
                "images": len(images),
                "nodes": report["counts"]["fp16_quantize_inputs"],
                "outputs": output_error(model, fixed, images),
            }
    report["verdict"] = verdict(report)
    report["findings"] = findings_present(report)
    return fixed


def findings_present(report: dict[str, Any]) -> bool:
    """True when the report holds anything that changes results: zero scales, non-finite values,
    un-requantized under/overflows, or fp16 QuantizeLinear on a truncating runtime."""
    counts = report["counts"]
    if counts["scales_zero_in_fp16"] or report["initializers"]["fp16_nonfinite_values"] or counts["range_exceeds_fp16"]:
        return True
    comparison = report.get("source_comparison") or {"findings": []}
    if any(
        not f["quantized"] and (f["to_zero"] or f["below_min_subnormal"] or f["overflow"])
        for f in comparison["findings"]
    ):
        return True
    runtime = report.get("runtime") or {}
    return bool(counts["fp16_quantize_inputs"] and runtime.get("rounding") == ROUNDING_TOWARD_ZERO)
