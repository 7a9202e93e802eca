"""Inspect a Q/DQ ONNX model for float16 hazards: scales, initializers and the runtime's fp16 rounding.

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
* **the runtime**: a QuantizeLinear whose input is float16 must round ``x / scale`` to the nearest
  integer, ties to even (ONNX spec). ONNX Runtime's CPU kernel for float16 input truncated toward
  zero instead (onnxruntime issue 18576; seen on 1.24.4, fixed by 1.30.0), which biases every
  quantized weight and activation by half a step towards zero. :func:`probe_fp16_quantize_rounding`
  runs one 8-element QuantizeLinear on the installed onnxruntime to tell which behaviour it has;
  TensorRT and the CUDA EP round to nearest even and are not affected.

:func:`compare_runs` is the optional dynamic check: it runs two models (e.g. the fp16 Q/DQ model and
its FP32 source, or an fp32-high-precision Q/DQ model of the same calibration) on a few images with
every intermediate tensor exposed and reports the relative error per tensor, in graph order, so the
first diverging tensors show where the two part ways. :func:`with_fp32_quantize` rewrites a model so
that every float16 QuantizeLinear is computed in float32 (a Cast of its input and a float32 copy of
its scale, same values): by the ONNX spec the same quantized integers, and on a truncating
onnxruntime the correctly rounded ones.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from onnx import TensorProto

from lowbit.logs import get_logger
from lowbit.ort_session import build_session
from lowbit.qdq_graph import dtype_name, quant_max_magnitude, quantize_output_type, tensor_consumers

FP16_MIN_NORMAL = float(np.finfo(np.float16).tiny)  # 6.103515625e-05
FP16_MIN_SUBNORMAL = float(np.finfo(np.float16).smallest_subnormal)  # 5.960464477539063e-08
FP16_MAX = float(np.finfo(np.float16).max)  # 65504.0

FLOAT, FLOAT16, DOUBLE = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE

log = get_logger("qdq_inspect")

ROUNDING_NEAREST_EVEN = "nearest_even"
ROUNDING_TOWARD_ZERO = "toward_zero"


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


def _constant_arrays(model) -> dict[str, np.ndarray]:
    """Initializers and ``Constant`` node outputs of the main graph, as numpy arrays."""
    from onnx import numpy_helper

    arrays = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    arrays[node.output[0]] = numpy_helper.to_array(attr.t)
    return arrays


def _elem_types(model) -> dict[str, int]:
    """Element type of every tensor ONNX type inference can name (inputs, outputs, initializers, values)."""
    import onnx

    types: dict[str, int] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001 - inference is best effort; declared types are used then
        inferred = model
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    for init in model.graph.initializer:
        types[init.name] = init.data_type
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    types[node.output[0]] = attr.t.data_type
        elif node.op_type == "Cast":
            for attr in node.attribute:
                if attr.name == "to":
                    types[node.output[0]] = attr.i
    return types


def _attr_int(node, name: str) -> int | None:
    return next((a.i for a in node.attribute if a.name == name), None)


def _summary(values: np.ndarray) -> dict[str, Any]:
    mag = np.abs(values.astype(np.float64)).ravel()
    return {
        "numel": int(mag.size),
        "min": float(mag.min()) if mag.size else None,
        "max": float(mag.max()) if mag.size else None,
    }


def _short(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f" ... (+{len(names) - limit})" if len(names) > limit else "")


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
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    graph = model.graph
    consts = _constant_arrays(model)
    types = _elem_types(model)
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
        return {"name": name, "dtype": dtype_name(types.get(name)), "numel": None, "min": None, "max": None,
                "subnormal_in_fp16": None, "zero_in_fp16": None, "clamped_in_fp16": None}
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


def _pair_entry(q_node, dq_nodes: list, quant_code: int | None, scale: dict[str, Any], dq_scales: list[dict],
                readers: list[str], consts: dict, types: dict[str, int]) -> dict[str, Any]:
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
        pairs.append(_pair_entry(node, dqs, quantize_output_type(node, types), scale, dq_scales, readers, consts,
                                 types))
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
    import onnx

    if not isinstance(source, onnx.ModelProto):
        source = onnx.load(str(source))
    if consumers is None:
        consumers = {}
        for node in model.graph.node:
            for name in node.input:
                consumers.setdefault(name, []).append(node)
    src = {i.name: i for i in source.graph.initializer if i.data_type in (FLOAT, DOUBLE)}
    from onnx import numpy_helper

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


def probe_fp16_quantize_rounding(providers: Iterable[str] = ("CPUExecutionProvider",)) -> dict[str, Any]:
    """Run one float16 QuantizeLinear on the installed onnxruntime and name its rounding.

    Inputs 0.6, 1.5, 2.5, 2.7, -0.6, -1.5, -2.7 with scale 1: round-half-to-even gives
    1, 2, 2, 3, -1, -2, -3; truncation gives 0, 1, 2, 2, 0, -1, -2.

    Returns:
        ``{"onnxruntime": version, "provider": used, "rounding": "nearest_even" | "toward_zero" |
        "other" | "unavailable", "outputs": [...], "error": str | None}``.
    """
    values = np.array([0.6, 1.5, 2.5, 2.7, -0.6, -1.5, -2.7], dtype=np.float16)
    nearest = [1, 2, 2, 3, -1, -2, -3]
    toward_zero = [0, 1, 2, 2, 0, -1, -2]
    try:
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as exc:
        return {"onnxruntime": None, "provider": None, "rounding": "unavailable", "outputs": None, "error": str(exc)}
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"])],
        "fp16_quantize_probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [len(values)])],
        [helper.make_tensor_value_info("y", TensorProto.INT8, [len(values)])],
        [numpy_helper.from_array(np.array(1.0, np.float16), "s"), numpy_helper.from_array(np.array(0, np.int8), "z")],
    )
    # IR 9 / opset 19: the oldest that allows a float16 scale, loadable by every onnxruntime >= 1.16
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)
    onnx.checker.check_model(probe)
    try:
        session, _ = build_session(probe, list(providers), log_severity_level=3, model_flag="fp16 rounding probe")
        out = session.run(None, {"x": values})[0].astype(int).tolist()
        used = session.get_providers()[0]
    except Exception as exc:  # noqa: BLE001 - an EP or kernel missing: report, never fail the inspection
        return {
            "onnxruntime": ort.__version__,
            "provider": None,
            "rounding": "unavailable",
            "outputs": None,
            "error": str(exc),
        }
    rounding = ROUNDING_NEAREST_EVEN if out == nearest else ROUNDING_TOWARD_ZERO if out == toward_zero else "other"
    return {"onnxruntime": ort.__version__, "provider": used, "rounding": rounding, "outputs": out, "error": None}


def with_fp32_quantize(model):
    """Copy of ``model`` where every float16 QuantizeLinear computes in float32.

    The input gets a ``Cast`` to float (constant inputs are converted in place of the cast) and
    the scale a float32 copy holding the same fp16 values, so by the ONNX spec the quantized
    integers are unchanged; on an onnxruntime whose float16 QuantizeLinear truncates (see
    :func:`probe_fp16_quantize_rounding`) they become the correctly rounded ones. Everything else
    (DequantizeLinear, the fp16 compute between pairs) is left as it is.

    Returns:
        ``(new_model, count)``: the rewritten ``ModelProto`` and the number of nodes changed.
    """
    import copy

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    model = copy.deepcopy(model)
    graph = model.graph
    types = _elem_types(model)
    inits = {i.name: i for i in graph.initializer}
    new_nodes = []
    inputs32: dict[str, str] = {}
    scales32: dict[str, str] = {}
    changed = 0
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and types.get(node.input[0]) == FLOAT16:
            source_name, scale_name = node.input[0], node.input[1]
            if scale_name in inits:  # a scale computed at run time is left as it is
                if source_name not in inputs32:
                    as32 = f"{source_name}_fp32_for_quantize"
                    if source_name in inits:
                        values = numpy_helper.to_array(inits[source_name]).astype(np.float32)
                        graph.initializer.append(numpy_helper.from_array(values, as32))
                    else:
                        cast = helper.make_node("Cast", [source_name], [as32], to=TensorProto.FLOAT, name=as32)
                        new_nodes.append(cast)
                    inputs32[source_name] = as32
                if scale_name not in scales32:
                    scales32[scale_name] = f"{scale_name}_fp32_for_quantize"
                    scale = numpy_helper.to_array(inits[scale_name]).astype(np.float32)
                    graph.initializer.append(numpy_helper.from_array(scale, scales32[scale_name]))
                node.input[0] = inputs32[source_name]
                node.input[1] = scales32[scale_name]
                changed += 1
        new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return model, changed


def _exposed_session(model, names: list[str] | None = None, model_flag: str = "--onnx-path"):
    """An onnxruntime CPU session of ``model`` with every typed intermediate tensor as an output.

    Graph optimizations are off so the values are those of the graph as written (no fusion into
    QLinear kernels). Returns ``(session, ordered_names)`` with names in node order.
    """
    import onnx

    model = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    value_info = {vi.name: vi for vi in model.graph.value_info}
    declared = {o.name for o in model.graph.output}
    order = [o.name for o in model.graph.output]
    wanted = set(names) if names is not None else None
    for node in model.graph.node:
        if node.op_type == "Constant":
            continue
        for out in node.output:
            if out in value_info and out not in declared and (wanted is None or out in wanted):
                model.graph.output.append(value_info[out])
                declared.add(out)
                order.append(out)
    session, _ = build_session(
        model, ["CPUExecutionProvider"], graph_optimization_level="ORT_DISABLE_ALL", log_severity_level=3,
        model_flag=model_flag,
    )
    return session, order


def _node_order(model) -> list[tuple[str, str, str]]:
    """``(tensor, op_type, node)`` for every node output, in graph order."""
    return [(out, node.op_type, node.name) for node in model.graph.node for out in node.output]


def compare_runs(model, reference, images: np.ndarray, threshold: float = 0.05, top: int = 10) -> dict[str, Any]:
    """Per-tensor relative error of ``model`` against ``reference`` on ``images`` (ORT CPU, no fusion).

    Tensors are matched by name and shape; the error of a tensor is
    ``||model - reference|| / ||reference||`` over all images (accumulated per image, so memory
    stays flat in the number of images).

    Args:
        model: the model under test (``ModelProto`` or path).
        reference: the model to compare against (FP32 source, or another Q/DQ model).
        images: float32 array [N, C, H, W]; each image runs as a batch of one.
        threshold: relative error from which a tensor counts as diverged.
        top: how many of the worst tensors to list.

    Returns:
        ``images``, ``threshold``, ``compared`` (tensors matched), ``outputs`` (per model output:
        ``rel_error``, ``max_abs``, ``ref_max_abs``), ``first_diverging`` (up to ``top`` tensors in
        graph order whose error exceeds ``threshold``, each with ``tensor``, ``op``, ``node``,
        ``rel_error``), ``worst`` (the ``top`` largest errors), ``tensors`` (all, graph order).
    """
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    if not isinstance(reference, onnx.ModelProto):
        reference = onnx.load(str(reference))
    session, names = _exposed_session(model)
    ref_session, ref_names = _exposed_session(reference, model_flag="--reference-onnx")
    common = [n for n in names if n in set(ref_names)]
    stats = _accumulate_errors(session, names, ref_session, ref_names, common, images)
    ops = {t: (op, node) for t, op, node in _node_order(model)}
    rows = []
    for name in common:
        if name in stats["shape_mismatch"]:
            continue
        diff, ref = stats["sq_diff"][name], stats["sq_ref"][name]
        rel = float(np.sqrt(diff) / np.sqrt(ref)) if ref > 0 else (0.0 if diff == 0 else float("inf"))
        op, node = ops.get(name, ("Input", ""))
        rows.append({"tensor": name, "op": op, "node": node, "rel_error": rel, "max_abs_diff": stats["max_abs"][name]})
    graph_outputs = [o.name for o in model.graph.output]
    by_name = {r["tensor"]: r for r in rows}
    outputs = {
        name: {
            "rel_error": by_name[name]["rel_error"],
            "max_abs_diff": by_name[name]["max_abs_diff"],
            "ref_max_abs": stats["ref_max"][name],
        }
        for name in graph_outputs
        if name in by_name
    }
    # graph order, outputs last (the session lists the declared outputs first)
    ordered = [r for r in rows if r["tensor"] not in graph_outputs]
    ordered += [by_name[n] for n in graph_outputs if n in by_name]
    diverging = [r for r in ordered if r["rel_error"] > threshold]
    return {
        "images": int(images.shape[0]),
        "threshold": threshold,
        "compared": len(rows),
        "outputs": outputs,
        "first_diverging": diverging[:top],
        "worst": sorted(rows, key=lambda r: -r["rel_error"])[:top],
        "tensors": ordered,
    }


def _accumulate_errors(session, names, ref_session, ref_names, common: list[str], images: np.ndarray) -> dict:
    """Run every image through both sessions; per tensor in ``common``: summed squared difference and reference
    (``sq_diff``, ``sq_ref``), largest |difference| and |reference| (``max_abs``, ``ref_max``), and the names
    whose shapes or types differ between the two (``shape_mismatch``)."""
    index = {n: i for i, n in enumerate(names)}
    ref_index = {n: i for i, n in enumerate(ref_names)}
    input_name = session.get_inputs()[0].name
    ref_input = ref_session.get_inputs()[0].name
    stats: dict[str, Any] = {key: dict.fromkeys(common, 0.0) for key in ("sq_diff", "sq_ref", "max_abs", "ref_max")}
    stats["shape_mismatch"] = set()
    for i in range(images.shape[0]):
        x = np.ascontiguousarray(images[i : i + 1], dtype=np.float32)
        outs = session.run(None, {input_name: x})
        ref_outs = ref_session.run(None, {ref_input: x})
        for name in common:
            a = np.asarray(outs[index[name]])
            b = np.asarray(ref_outs[ref_index[name]])
            if a.shape != b.shape or not (np.issubdtype(a.dtype, np.number) and np.issubdtype(b.dtype, np.number)):
                stats["shape_mismatch"].add(name)
                continue
            a = a.astype(np.float64)
            b = b.astype(np.float64)
            stats["sq_diff"][name] += float(np.square(a - b).sum())
            stats["sq_ref"][name] += float(np.square(b).sum())
            stats["max_abs"][name] = max(stats["max_abs"][name], float(np.abs(a - b).max()) if a.size else 0.0)
            stats["ref_max"][name] = max(stats["ref_max"][name], float(np.abs(b).max()) if b.size else 0.0)
    return stats


def output_error(model, reference, images: np.ndarray) -> dict[str, float]:
    """Relative error of each output of ``model`` against ``reference`` (both ORT CPU, default optimizations)."""

    def session(m, model_flag: str):
        return build_session(m, ["CPUExecutionProvider"], log_severity_level=3, model_flag=model_flag)[0]

    s, r = session(model, "--onnx-path"), session(reference, "--reference-onnx")
    names = [o.name for o in s.get_outputs()]
    sq_diff = dict.fromkeys(names, 0.0)
    sq_ref = dict.fromkeys(names, 0.0)
    for i in range(images.shape[0]):
        x = np.ascontiguousarray(images[i : i + 1], dtype=np.float32)
        outs = s.run(None, {s.get_inputs()[0].name: x})
        ref_outs = r.run(None, {r.get_inputs()[0].name: x})
        for name, a, b in zip(names, outs, ref_outs):
            a = np.asarray(a, np.float64)
            b = np.asarray(b, np.float64)
            sq_diff[name] += float(np.square(a - b).sum())
            sq_ref[name] += float(np.square(b).sum())
    return {n: float(np.sqrt(sq_diff[n] / sq_ref[n])) if sq_ref[n] > 0 else 0.0 for n in names}


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
        images: float32 [N, C, H, W] (:func:`load_images`), or None for the static report only.
        reference_label: how the report names ``reference``.
        rewrite: also build the fp32-quantize rewrite even without images.
        threshold, top: see :func:`compare_runs`.

    Returns:
        The :func:`with_fp32_quantize` rewrite of ``model`` when it was built, else None.
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


def verdict(report: dict[str, Any]) -> list[str]:
    """Human-readable verdict lines of an :func:`inspect_qdq` report (plus ``runtime`` if present)."""
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
            + (f"read by non-quantizing nodes: {_short(harmful)}" if harmful else
               "all of them are re-quantized by QuantizeLinear (an underflow far below the step size changes no "
               "int8 value)")
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


def _dims_text(dims: list) -> str:
    """``[N, 3, h, w]``-style text of a model input: static dims as numbers, dynamic ones by name (``any``)."""
    return "[" + ", ".join(str(d) if isinstance(d, int) and d > 0 else (str(d) if d else "any") for d in dims) + "]"


def load_images(path: Path, count: int, input_shape: list, flag: str = "--calib-path") -> np.ndarray:
    """The first ``count`` images of a calibration tensor (:func:`lowbit.calib.load_calib_tensor`) that fit the model.

    Args:
        path: the ``.npy`` file.
        count: images wanted (fewer are returned when the file holds fewer).
        input_shape: the model input's dims: ints for static dims, symbol names (or None) for dynamic
            ones, which accept any size.
        flag: the CLI flag that named ``path``.

    Raises:
        UserError(flag): what ``load_calib_tensor`` refuses, or a static C/H/W of the model that the
            tensor does not have.
    """
    from lowbit.calib import load_calib_tensor
    from lowbit.errors import UserError

    data = load_calib_tensor(path, flag, max_images=count)
    wanted = ["N", *list(input_shape)[1:]]
    mismatch = [
        f"dim {axis} is {have}, the model needs {want}"
        for axis, (have, want) in enumerate(zip(data.shape, wanted), start=0)
        if axis > 0 and isinstance(want, int) and want > 0 and have != want
    ]
    if data.ndim != len(wanted) or mismatch:
        detail = "; ".join(mismatch) or f"rank {data.ndim}"
        raise UserError(
            f"{flag}: {path} holds {data.dtype} {list(data.shape)} ({detail}); the model input takes float32 "
            f"{_dims_text(wanted)} (dynamic dims take any size)",
            flag=flag,
        )
    return data


def fp16_quantize_hazard(model, providers: Iterable[str] = ("CPUExecutionProvider",)) -> dict[str, Any] | None:
    """The float16-QuantizeLinear rounding hazard of running ``model`` on this onnxruntime, or None.

    Returns None when no QuantizeLinear takes float16 input, or when the installed onnxruntime
    rounds float16 QuantizeLinear to nearest even on ``providers``; otherwise
    ``{"fp16_quantize_inputs": N, "runtime": probe result, "message": one line}``.
    """
    counts = inspect_qdq(model)["counts"]
    if not counts["fp16_quantize_inputs"]:
        return None
    runtime = probe_fp16_quantize_rounding(providers)
    if runtime.get("rounding") == ROUNDING_NEAREST_EVEN:
        return None
    message = (
        f"{counts['fp16_quantize_inputs']} QuantizeLinear nodes take float16 input and onnxruntime "
        f"{runtime.get('onnxruntime')} ({runtime.get('provider')}) rounds them {runtime.get('rounding')}: "
        "accuracy measured here is too low (TensorRT and the CUDA EP round to nearest even); evaluate the "
        "fp32-quantize rewrite (inspect_qdq_model.py --write-fp32-quantize) or quantize with high precision fp32"
    )
    return {"fp16_quantize_inputs": counts["fp16_quantize_inputs"], "runtime": runtime, "message": message}
