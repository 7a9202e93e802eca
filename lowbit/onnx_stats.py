"""ONNX model statistics (the model card's "Model Stats" block: size, parameters, MACs, I/O), with the input-shape
resolution they are counted at.

Counting rules, as the card states them:

* parameter count / bytes: every initializer tensor of the main graph (element count; bytes at the
  stored element width, 4-bit types packed two per byte);
* compute: multiply-accumulates of ``Conv``, ``MatMul`` and ``Gemm`` nodes at the resolved input
  shapes (elementwise ops, pooling, resize, softmax excluded); FLOPs = 2 x MACs;

  - Conv: ``prod(output shape) * (C_in / groups) * prod(kernel)`` (the weight shape is
    ``[C_out, C_in / groups, *kernel]``, so the factor is ``prod(weight.shape[1:])``);
  - MatMul: ``prod(output shape) * K`` with ``K = A.shape[-1]``;
  - Gemm: ``prod(output shape) * K`` with ``K = A.shape[0 if transA else 1]``;

* symbolic batch dims (the first dim of an input) are set to ``batch`` (1 unless told); other
  symbolic dims must be given explicitly (``--input-shape``), never guessed. Shapes inside the
  graph come from ONNX shape inference with data propagation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lowbit.errors import UserError
from lowbit.qdq_graph import constant_values, dtype_name, element_bits

__all__ = [
    "COMPUTE_OPS",
    "MIB",
    "Dim",
    "TensorSpec",
    "count_macs",
    "count_parameters",
    "external_data_files",
    "format_markdown",
    "format_text",
    "graph_inputs",
    "infer_shapes",
    "load_model_proto",
    "model_stats",
    "node_macs",
    "parse_input_shapes",
    "resolve_input_shapes",
    "shape_table",
    "tensor_spec",
    "with_input_shapes",
]

MIB = 1024 * 1024
COMPUTE_OPS = ("Conv", "MatMul", "Gemm")

Dim = int | str


@dataclass
class TensorSpec:
    """Name, ONNX element type name (``FLOAT``, ``FLOAT16`` ...) and shape (ints, or symbol strings)."""

    name: str
    dtype: str
    shape: list[Dim] | None  # None: the graph declares no shape at all


def tensor_spec(value_info) -> TensorSpec:
    """:class:`TensorSpec` of an ONNX ``ValueInfoProto`` (unknown dims become ``"?"``)."""
    tensor_type = value_info.type.tensor_type
    shape: list[Dim] | None = None
    if tensor_type.HasField("shape"):
        shape = []
        for dim in tensor_type.shape.dim:
            if dim.HasField("dim_value"):
                shape.append(int(dim.dim_value))
            else:
                shape.append(dim.dim_param or "?")
    return TensorSpec(value_info.name, dtype_name(tensor_type.elem_type), shape)


def load_model_proto(path: Path, flag: str = "--model"):
    """Load the graph of ``path`` without external weight data; UserError if it is not an ONNX model."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # DecodeError, ValueError, ...: whatever protobuf says about a non-model
        raise UserError(f"{flag}: {path} is not an ONNX model ({type(exc).__name__}: {exc})", flag=flag) from exc
    if not proto.graph.node or not proto.graph.output:
        raise UserError(f"{flag}: {path} is not an ONNX model (no graph nodes or outputs)", flag=flag)
    return proto


def graph_inputs(proto) -> list[TensorSpec]:
    """Real inputs of the graph (initializers listed as inputs by old exporters are skipped)."""
    initializers = {init.name for init in proto.graph.initializer}
    return [tensor_spec(vi) for vi in proto.graph.input if vi.name not in initializers]


def parse_input_shapes(values: list[str] | None, flag: str = "--input-shape") -> dict[str | None, list[int]]:
    """Parse ``NAME=1,3,640,640`` entries (or a bare ``1,3,640,640`` for a one-input model).

    Returns:
        ``{input name or None: [dims]}``; ``None`` stands for "the only input".
    """
    shapes: dict[str | None, list[int]] = {}
    for value in values or []:
        name, sep, dims_text = value.rpartition("=")
        key = name if sep else None
        if sep and not name:
            raise UserError(f"{flag}: {value!r} has an empty input name; use NAME=D0,D1,...", flag=flag)
        try:
            dims = [int(d) for d in dims_text.replace("x", ",").split(",") if d.strip()]
        except ValueError as exc:
            raise UserError(f"{flag}: {value!r} is not NAME=D0,D1,... with integer dims", flag=flag) from exc
        if not dims or any(d < 1 for d in dims):
            raise UserError(f"{flag}: {value!r} needs one or more dims, each >= 1", flag=flag)
        if key in shapes:
            raise UserError(f"{flag}: shape for {key or 'the input'} given twice", flag=flag)
        shapes[key] = dims
    return shapes


def resolve_input_shapes(
    inputs: list[TensorSpec],
    overrides: dict[str | None, list[int]] | None = None,
    batch: int = 1,
    flag: str = "--input-shape",
) -> tuple[dict[str, list[int]], list[str]]:
    """Concrete shape of every input.

    A symbolic first dim is the batch and becomes ``batch``; any other symbolic dim needs an
    entry in ``overrides`` (the model would otherwise be measured at a made-up size).

    Args:
        inputs: the graph's inputs.
        overrides: from :func:`parse_input_shapes`.
        batch: size used for symbolic batch dims.
        flag: CLI flag named in errors.

    Returns:
        ``({name: [dims]}, [names whose batch dim was assumed])``.
    """
    overrides = dict(overrides or {})
    if None in overrides:
        if len(inputs) != 1:
            names = ", ".join(i.name for i in inputs)
            raise UserError(f"{flag}: the model has {len(inputs)} inputs ({names}); use NAME=D0,D1,...", flag=flag)
        overrides[inputs[0].name] = overrides.pop(None)
    known = {i.name for i in inputs}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise UserError(
            f"{flag}: no model input named {', '.join(unknown)}; inputs: {', '.join(sorted(known))}", flag=flag
        )

    shapes: dict[str, list[int]] = {}
    assumed: list[str] = []
    for spec in inputs:
        declared = spec.shape
        if spec.name in overrides:
            given = overrides[spec.name]
            if declared is not None:
                if len(given) != len(declared):
                    raise UserError(
                        f"{flag}: {spec.name} has rank {len(declared)} {declared}, got {len(given)} dims {given}",
                        flag=flag,
                    )
                for axis, (want, got) in enumerate(zip(declared, given)):
                    if isinstance(want, int) and want > 0 and want != got:
                        raise UserError(
                            f"{flag}: {spec.name} dim {axis} is fixed to {want} by the model, got {got} ({given})",
                            flag=flag,
                        )
            shapes[spec.name] = list(given)
            continue
        if declared is None:
            raise UserError(f"input {spec.name!r} declares no shape; pass {flag} {spec.name}=D0,D1,...", flag=flag)
        dims: list[int] = []
        dynamic_axes = []
        for axis, dim in enumerate(declared):
            if isinstance(dim, int) and dim > 0:
                dims.append(dim)
            elif axis == 0:
                dims.append(batch)
                assumed.append(spec.name)
            else:
                dynamic_axes.append(axis)
                dims.append(-1)
        if dynamic_axes:
            shown = "[" + ", ".join(str(d) for d in declared) + "]"
            raise UserError(
                f"input {spec.name!r} has non-static dims {shown} (axes {dynamic_axes}); "
                f"pass {flag} {spec.name}="
                + ",".join(str(d) if d > 0 else _dim_hint(declared[axis], axis) for axis, d in enumerate(dims)),
                flag=flag,
            )
        shapes[spec.name] = dims
    return shapes, assumed


def _dim_hint(declared: Dim, axis: int) -> str:
    """Placeholder for a dim the user must fill in: its symbol, or ``D<axis>`` when it has none."""
    return declared if isinstance(declared, str) and declared not in ("", "?") else f"D{axis}"


def count_parameters(proto) -> tuple[int, int]:
    """``(element count, bytes)`` over the main graph's initializers."""
    count = 0
    total_bits = 0
    for init in proto.graph.initializer:
        numel = math.prod(init.dims) if init.dims else 1
        count += numel
        bits = element_bits(init.data_type)
        if bits:
            total_bits += numel * bits
        else:  # strings: their stored lengths
            total_bits += 8 * sum(len(s) for s in init.string_data)
    return count, (total_bits + 7) // 8


def with_input_shapes(proto, shapes: dict[str, list[int]]):
    """Copy of ``proto`` with the given input shapes written into ``graph.input``."""
    import onnx

    fixed = onnx.ModelProto()
    fixed.CopyFrom(proto)
    for vi in fixed.graph.input:
        if vi.name not in shapes:
            continue
        tensor_shape = vi.type.tensor_type.shape
        del tensor_shape.dim[:]
        for d in shapes[vi.name]:
            tensor_shape.dim.add().dim_value = int(d)
    return fixed


def infer_shapes(proto, flag: str = "--model"):
    """ONNX shape inference with data propagation (shape arithmetic such as Shape->Gather->Reshape)."""
    import onnx

    try:
        return onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=True)
    except Exception as exc:
        raise UserError(f"{flag}: ONNX shape inference failed: {type(exc).__name__}: {exc}", flag=flag) from exc


def shape_table(proto) -> dict[str, list[Dim] | None]:
    graph = proto.graph
    table: dict[str, list[Dim] | None] = {}
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        if vi.type.HasField("tensor_type"):
            table[vi.name] = tensor_spec(vi).shape
    for name, tensor in constant_values(graph).items():
        table[name] = list(tensor.dims)
    return table


def _static(shape: list[Dim] | None) -> bool:
    return shape is not None and all(isinstance(d, int) and d > 0 for d in shape)


def node_macs(node, shapes: dict[str, list[Dim] | None]) -> int | None:
    """MACs of one Conv/MatMul/Gemm node, or None if a needed shape is unknown."""
    out = shapes.get(node.output[0])
    if not _static(out):
        return None
    out_elems = math.prod(out)
    if node.op_type == "Conv":
        weight = shapes.get(node.input[1])
        if not _static(weight) or len(weight) < 2:
            return None
        return out_elems * math.prod(weight[1:])
    a_shape = shapes.get(node.input[0])
    if not _static(a_shape):
        return None
    if node.op_type == "MatMul":
        return out_elems * a_shape[-1]
    if node.op_type == "Gemm":
        trans_a = next((attr.i for attr in node.attribute if attr.name == "transA"), 0)
        if len(a_shape) != 2:
            return None
        return out_elems * a_shape[0 if trans_a else 1]
    raise ValueError(f"no MAC rule for {node.op_type}")


def count_macs(inferred_proto) -> tuple[dict[str, int], list[str]]:
    """MACs per op type over the main graph, and names of compute nodes whose shapes are unknown."""
    shapes = shape_table(inferred_proto)
    by_op = {op: 0 for op in COMPUTE_OPS}
    unresolved = []
    for node in inferred_proto.graph.node:
        if node.op_type not in COMPUTE_OPS:
            continue
        macs = node_macs(node, shapes)
        if macs is None:
            unresolved.append(node.name or node.output[0])
        else:
            by_op[node.op_type] += macs
    return by_op, unresolved


def external_data_files(model) -> list[str]:
    """Relative paths of the external-data files an ONNX model's initializers point to, sorted."""
    locations = set()
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                locations.add(entry.value)
    return sorted(locations)


def _file_bytes(path: Path, proto) -> tuple[int, int]:
    """``(bytes of the .onnx file, bytes of external data files it references)``."""
    external = 0
    for location in external_data_files(proto):
        data_file = path.parent / location
        if data_file.exists():
            external += data_file.stat().st_size
    return path.stat().st_size, external


def model_stats(
    path: Path,
    batch: int = 1,
    input_shapes: dict[str | None, list[int]] | None = None,
    flag: str = "--input-shape",
) -> dict[str, Any]:
    """Everything the card's Model Stats and ONNX I/O sections show, as a JSON-able dict.

    Keys: ``model``, ``file_size_bytes``, ``file_size_mib``, ``external_data_bytes``,
    ``param_count``, ``param_bytes``, ``param_mib``, ``macs``, ``gmacs``, ``flops``, ``gflops``,
    ``macs_by_op_type`` ({Conv, MatMul, Gemm}), ``compute_ops``, ``unresolved_compute_nodes``
    (names; their MACs are not in ``macs``), ``assumed_batch``, ``batch_assumed_for`` (input
    names), ``input_shapes`` ({name: dims used}), ``inputs`` / ``outputs`` (lists of
    ``{name, dtype, shape}`` after shape inference), ``opsets``.
    """
    path = Path(path)
    proto = load_model_proto(path)
    inputs = graph_inputs(proto)
    shapes, assumed = resolve_input_shapes(inputs, input_shapes, batch, flag)
    inferred = infer_shapes(with_input_shapes(proto, shapes))
    by_op, unresolved = count_macs(inferred)
    param_count, param_bytes = count_parameters(proto)
    file_bytes, external_bytes = _file_bytes(path, proto)
    macs = sum(by_op.values())
    initializer_names = {init.name for init in inferred.graph.initializer}
    return {
        "model": str(path),
        "file_size_bytes": file_bytes + external_bytes,
        "file_size_mib": (file_bytes + external_bytes) / MIB,
        "external_data_bytes": external_bytes,
        "param_count": param_count,
        "param_bytes": param_bytes,
        "param_mib": param_bytes / MIB,
        "macs": macs,
        "gmacs": macs / 1e9,
        "flops": 2 * macs,
        "gflops": 2 * macs / 1e9,
        "macs_by_op_type": by_op,
        "compute_ops": list(COMPUTE_OPS),
        "unresolved_compute_nodes": unresolved,
        "assumed_batch": batch,
        "batch_assumed_for": assumed,
        "input_shapes": shapes,
        "inputs": [asdict(tensor_spec(vi)) for vi in inferred.graph.input if vi.name not in initializer_names],
        "outputs": [asdict(tensor_spec(vi)) for vi in inferred.graph.output],
        "opsets": {op.domain or "ai.onnx": op.version for op in proto.opset_import},
    }


def _shape_text(shape: list[Dim] | None) -> str:
    return "[?]" if shape is None else "[" + ", ".join(str(d) for d in shape) + "]"


def _input_text(stats: dict[str, Any]) -> str:
    shapes = stats["input_shapes"]
    if len(shapes) == 1:
        return "input " + _shape_text(next(iter(shapes.values())))
    return "inputs " + ", ".join(f"{name} {_shape_text(dims)}" for name, dims in shapes.items())


def format_markdown(stats: dict[str, Any]) -> str:
    """The card's "Model Stats" and "ONNX I/O" sections, filled from :func:`model_stats`."""
    lines = [
        "## Model Stats",
        "",
        f"- **ONNX file size**: {stats['file_size_mib']:.2f} MiB",
        f"- **Parameter count**: {stats['param_count']:,}",
        f"- **Parameter bytes**: {stats['param_mib']:.2f} MiB",
        f"- **Compute (MACs)**: {stats['gmacs']:.3f} GMACs @ {_input_text(stats)} ({'/'.join(stats['compute_ops'])})",
        f"- **Compute (FLOPs)**: {stats['gflops']:.3f} GFLOPs @ 2 FLOPs per MAC",
        f"- **Assumed batch**: {stats['assumed_batch']} (for symbolic batch dims)",
        "",
        (
            "- **Notes**: Parameter count/bytes are computed from ONNX initializer tensors; compute is MACs from "
            "Conv/MatMul/Gemm nodes only (elementwise ops excluded)."
        ),
    ]
    if stats["unresolved_compute_nodes"]:
        lines.append(
            f"- **Warning**: {len(stats['unresolved_compute_nodes'])} Conv/MatMul/Gemm nodes have unknown shapes "
            "and are not counted."
        )
    lines += ["", "## ONNX I/O", "", "**Inputs** (shape-inferred)"]
    lines += [f"- `{t['name']}`: `{t['dtype']}` `{_shape_text(t['shape'])}`" for t in stats["inputs"]]
    lines += ["", "**Outputs**"]
    lines += [f"- `{t['name']}`: `{t['dtype']}` `{_shape_text(t['shape'])}`" for t in stats["outputs"]]
    return "\n".join(lines) + "\n"


def format_text(stats: dict[str, Any]) -> str:
    """A plain-text summary of :func:`model_stats` for the console."""
    by_op = ", ".join(f"{op} {macs / 1e9:.3f}" for op, macs in stats["macs_by_op_type"].items())
    lines = [
        f"model:            {stats['model']}",
        f"file size:        {stats['file_size_mib']:.2f} MiB ({stats['file_size_bytes']:,} bytes)",
        f"parameters:       {stats['param_count']:,} ({stats['param_mib']:.2f} MiB in initializers)",
        f"compute:          {stats['gmacs']:.3f} GMACs = {stats['gflops']:.3f} GFLOPs @ {_input_text(stats)}",
        f"GMACs by op:      {by_op}",
        f"assumed batch:    {stats['assumed_batch']}"
        + (f" (applied to {', '.join(stats['batch_assumed_for'])})" if stats["batch_assumed_for"] else " (not needed)"),
    ]
    if stats["unresolved_compute_nodes"]:
        lines.append(f"NOT COUNTED:      {len(stats['unresolved_compute_nodes'])} nodes with unknown shapes")
    lines += [f"input:            {t['name']} {t['dtype']} {_shape_text(t['shape'])}" for t in stats["inputs"]]
    lines += [f"output:           {t['name']} {t['dtype']} {_shape_text(t['shape'])}" for t in stats["outputs"]]
    return "\n".join(lines) + "\n"
