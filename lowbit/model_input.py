"""The model's image input: one float tensor ``[1, 3, H, W]`` whose static H and W equal ``--imgsz``, checked on an
ORT session or on the graph's declared input (before any session is built); quantization's stricter rule (static
H and W) is :func:`static_image_chw`."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from lowbit.errors import UserError

__all__ = ["check_graph_image_input", "check_image_input", "model_input_spec", "static_image_chw"]


def model_input_spec(session, model_flag: str = "--onnx-path") -> tuple[str, list, str]:
    """``(name, shape, dtype)`` of the session's only input; shape entries are ints or symbol strings."""
    inputs = session.get_inputs()
    if len(inputs) != 1:
        names = ", ".join(f"{i.name}{list(i.shape)}" for i in inputs)
        raise UserError(
            f"{model_flag}: the model has {len(inputs)} inputs ({names}); expected one image input [1,3,H,W]",
            flag=model_flag,
        )
    spec = inputs[0]
    return spec.name, list(spec.shape), spec.type


def _dim_text(dim) -> str:
    return str(dim) if isinstance(dim, int) else f"{dim or '?'} (dynamic)"


def check_image_input(
    session, imgsz: int | None = None, model_path: Path | None = None, model_flag: str = "--onnx-path"
) -> tuple[str, list, str]:
    """Require one float input ``[B, 3, H, W]`` with B 1 or dynamic, H and W static or dynamic.

    A dynamic H or W takes any size (the image is letterboxed to ``imgsz``); a static one must equal
    ``imgsz`` when it is given.

    Returns:
        ``(name, shape, dtype)``.

    Raises:
        UserError(flag=model_flag): not one input, not float, not rank 4, batch > 1, channels not 3;
        UserError(flag="--imgsz"): a static H/W that differs from ``imgsz``.
    """
    where = f"{model_path}: " if model_path is not None else ""
    name, shape, dtype = model_input_spec(session, model_flag)
    if dtype not in ("tensor(float)", "tensor(float16)"):
        raise UserError(
            f"{model_flag}: {where}input {name!r} has type {dtype}; expected a float tensor [1,3,H,W]", flag=model_flag
        )
    problems = []
    if len(shape) != 4:
        problems.append(f"rank {len(shape)}, expected 4 dims [batch, 3, H, W]")
    else:
        if isinstance(shape[0], int) and shape[0] != 1:
            problems.append(f"batch {shape[0]}, expected 1 or dynamic")
        if shape[1] != 3:
            problems.append(f"channels {_dim_text(shape[1])}, expected 3")
    if problems:
        raise UserError(
            f"{model_flag}: {where}input {name!r} has shape {shape}; expected [1,3,H,W] ({'; '.join(problems)}; "
            "H and W may be static or dynamic)",
            flag=model_flag,
        )
    if imgsz is not None:
        for axis, dim in zip("HW", shape[2:]):
            if isinstance(dim, int) and dim != imgsz:
                raise UserError(
                    f"--imgsz {imgsz} does not match the model input {name!r} of shape {shape} "
                    f"({axis} is fixed to {dim}); pass --imgsz {dim}",
                    flag="--imgsz",
                )
    return name, shape, dtype


def check_graph_image_input(
    proto, imgsz: int | None, model_path: Path | None, model_flag: str
) -> tuple[str, list, str]:
    """:func:`check_image_input` on the graph's declared input (``proto``: an ``onnx.ModelProto``), no session built."""
    from lowbit.onnx_stats import graph_inputs  # lazy: onnx_stats imports onnx, which a session check does not need

    inputs = [
        SimpleNamespace(name=spec.name, shape=list(spec.shape or []), type=f"tensor({str(spec.dtype).lower()})")
        for spec in graph_inputs(proto)
    ]
    # check_image_input reads only get_inputs(): the graph's declared inputs stand in for a session's
    return check_image_input(SimpleNamespace(get_inputs=lambda: inputs), imgsz, model_path, model_flag)


def static_image_chw(proto, flag: str = "--onnx-path") -> tuple[int, int, int]:
    """``(C, H, W)`` of the graph's single declared input, which must be ``[N, 3, H, W]`` with static H and W.

    Stricter than :func:`check_graph_image_input` about H and W (quantization calibrates at one image
    size, so they must be fixed) and silent about batch and dtype, which ModelOpt handles.

    Args:
        proto: the ``onnx.ModelProto`` (graph only is enough).
        flag: the CLI flag that named the model.

    Raises:
        UserError(flag): not one input, or not ``[N, 3, H, W]`` with static C, H and W.
    """
    from lowbit.onnx_stats import graph_inputs  # lazy: as in check_graph_image_input

    inputs = graph_inputs(proto)
    if len(inputs) != 1:
        raise UserError(f"{flag}: the model has {len(inputs)} inputs; expected one image input", flag=flag)
    dims = list(inputs[0].shape or [])
    if len(dims) != 4 or not all(isinstance(d, int) and d > 0 for d in dims[1:]) or dims[1] != 3:
        raise UserError(
            f"{flag}: input {inputs[0].name!r} has shape {dims}; quantization needs [N,3,H,W] with static H and W",
            flag=flag,
        )
    return dims[1], dims[2], dims[3]
