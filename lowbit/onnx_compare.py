"""Run two ONNX models on the same images and compare them tensor by tensor (ORT CPU, graph as written).

:func:`compare_runs` runs two models (e.g. an fp16 Q/DQ model and its FP32 source, or an
fp32-high-precision Q/DQ model of the same calibration) on a few images with every intermediate tensor
exposed and reports the relative error per tensor, in graph order, so the first diverging tensors show
where the two part ways. :func:`output_error` compares the outputs only; :func:`load_images` takes the
images from a calibration tensor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx

from lowbit.calib import load_calib_tensor
from lowbit.errors import UserError
from lowbit.ort_session import build_session

__all__ = ["compare_runs", "load_images", "model_input_dims", "output_error"]


def _exposed_session(model, names: list[str] | None = None, model_flag: str = "--onnx-path"):
    """An onnxruntime CPU session of ``model`` with every typed intermediate tensor as an output.

    Graph optimizations are off so the values are those of the graph as written (no fusion into
    QLinear kernels). Returns ``(session, ordered_names)`` with names in node order.
    """
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
        model,
        ["CPUExecutionProvider"],
        graph_optimization_level="ORT_DISABLE_ALL",
        log_severity_level=3,
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


def model_input_dims(model: onnx.ModelProto) -> list:
    """The first graph input's dims: ints where static, the symbol name (or None) where dynamic."""
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims]


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
