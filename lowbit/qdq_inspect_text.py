"""Text forms of a Q/DQ float16 inspection report (:mod:`lowbit.qdq_inspect`): the verdict lines, the per-pair
table (rows and CSV) and the printed summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lowbit.qdq_fp16 import FP16_MAX, FP16_MIN_NORMAL, FP16_MIN_SUBNORMAL, ROUNDING_NEAREST_EVEN, ROUNDING_TOWARD_ZERO

__all__ = ["format_report", "pairs_csv", "pairs_table", "verdict"]


def _short(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f" ... (+{len(names) - limit})" if len(names) > limit else "")


def verdict(report: dict[str, Any]) -> list[str]:
    """Human-readable verdict lines of a :func:`lowbit.qdq_inspect.inspect_qdq` report (and its ``runtime``, if any)."""
    counts = report["counts"]
    lines = [
        f"{counts['scales_below_fp16_min_normal']} of {counts['pairs']} Q/DQ scales below fp16 min normal "
        f"({FP16_MIN_NORMAL:.3g}); {counts['scales_zero_in_fp16']} quantize to zero in fp16; "
        f"{counts['scales_clamped_in_fp16']} clamped to {FP16_MIN_SUBNORMAL:.3g}; affected nodes: "
        + (_short(report["affected_nodes"]) if report["affected_nodes"] else "none")
    ]
    inits = report["initializers"]
    if inits["fp16_nonfinite_values"]:
        lines.append(f"{inits['fp16_nonfinite_values']} fp16 initializer values are inf/NaN")
    comparison = report.get("source_comparison")
    if comparison is not None:
        under = [f for f in comparison["findings"] if f["to_zero"] or f["below_min_subnormal"]]
        over = [f for f in comparison["findings"] if f["overflow"]]
        harmful = [f["initializer"] for f in under + over if not f["quantized"]]
        lines.append(
            f"initializers vs FP32 source: {comparison['matched']} compared, {len(under)} with values below fp16's "
            f"smallest subnormal ({sum(f['below_min_subnormal'] for f in under)} values), {len(over)} overflowing; "
            + (
                f"read by non-quantizing nodes: {_short(harmful)}"
                if harmful
                else "all of them are re-quantized by QuantizeLinear (an underflow far below the step size changes no "
                "int8 value)"
            )
        )
    n16 = counts["fp16_quantize_inputs"]
    runtime = report.get("runtime")
    if n16:
        text = f"{n16} QuantizeLinear nodes take float16 input"
        if runtime and runtime.get("rounding") == ROUNDING_TOWARD_ZERO:
            text += (
                f"; this onnxruntime {runtime['onnxruntime']} ({runtime['provider']}) rounds them toward zero "
                "instead of "
                "to nearest even: every quantized tensor is biased half a step towards zero and accuracy measured on "
                "it is too low (TensorRT and the CUDA EP round correctly); evaluate an fp32-high-precision model or "
                "the fp32-quantize rewrite (inspect_qdq_model.py --write-fp32-quantize), or use onnxruntime >= 1.30"
            )
        elif runtime and runtime.get("rounding") == ROUNDING_NEAREST_EVEN:
            text += f"; this onnxruntime {runtime['onnxruntime']} ({runtime['provider']}) rounds them correctly"
        elif runtime:
            detail = runtime.get("error") or runtime.get("outputs")
            text += f"; the fp16 rounding of this onnxruntime is {runtime.get('rounding')} ({detail})"
        lines.append(text)
    if counts["range_exceeds_fp16"]:
        lines.append(
            f"{counts['range_exceeds_fp16']} fp16 pairs can represent values beyond fp16's max ({FP16_MAX:.0f})"
        )
    return lines


def pairs_table(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Flat rows of the per-pair table (CSV): one per Q/DQ pair, graph order."""
    rows = []
    for p in report["pairs"]:
        s = p["scale"]
        rows.append(
            {
                "q_node": p["q_node"] or "",
                "dq_nodes": ";".join(p["dq_nodes"]),
                "tensor": p["tensor"],
                "kind": p["kind"],
                "input_dtype": p["input_dtype"] or "",
                "quant_dtype": p["quant_dtype"] or "",
                "scale_dtype": s["dtype"] or "",
                "scale_numel": s["numel"],
                "scale_min": s["min"],
                "scale_max": s["max"],
                "subnormal_in_fp16": s["subnormal_in_fp16"],
                "zero_in_fp16": s["zero_in_fp16"],
                "clamped_in_fp16": s["clamped_in_fp16"],
                "range_max": p["range_max"],
                "consumers": ";".join(p["consumers"]),
            }
        )
    return rows


def pairs_csv(report: dict[str, Any]) -> str:
    """:func:`pairs_table` as CSV text (header and one row per pair; empty for a model without pairs)."""
    import csv
    import io

    rows = pairs_table(report)
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return buffer.getvalue()


def format_report(report: dict[str, Any], model_path: Path) -> str:
    """The printed summary of a completed report: counts, verdict lines and the dynamic results."""
    counts = report["counts"]
    lines = [
        f"model      {model_path}",
        (
            f"Q/DQ pairs {counts['pairs']} (scales: {counts['scales_fp16']} fp16, {counts['scales_fp32']} fp32); "
            f"Cast nodes {len(report['casts'])}; initializers {report['initializers']['by_dtype']}"
        ),
    ]
    runtime = report.get("runtime")
    if runtime:
        lines.append(
            f"runtime    onnxruntime {runtime['onnxruntime']} float16 QuantizeLinear rounding: {runtime['rounding']}"
        )
    lines += [f"verdict    {line}" for line in verdict(report)]
    dynamic = report.get("dynamic")
    if dynamic:
        lines.append(
            f"dynamic    {dynamic['images']} images vs {dynamic['reference']}: {dynamic['compared']} tensors compared"
        )
        for name, out in dynamic["outputs"].items():
            lines.append(f"  output {name}: rel error {out['rel_error']:.4f} (max |diff| {out['max_abs_diff']:.3g})")
        if dynamic["first_diverging"]:
            lines.append(f"  first tensors with rel error > {dynamic['threshold']}:")
            lines += [
                f"    {row['rel_error']:8.4f}  {row['op']:<18} {row['tensor']}" for row in dynamic["first_diverging"]
            ]
        else:
            lines.append(f"  no tensor with rel error > {dynamic['threshold']}")
    check = report.get("fp32_quantize_check")
    if check:
        worst = max(check["outputs"].values()) if check["outputs"] else 0.0
        lines.append(
            f"rounding   outputs move by rel {worst:.4f} when the {check['nodes']} fp16 QuantizeLinear nodes "
            f"compute in fp32 ({check['images']} images)"
        )
    return "\n".join(lines) + "\n"
