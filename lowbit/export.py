"""Export an ultralytics YOLOv10 to ONNX with the raw one-to-one head, in the yolov10m checkpoint's format.

The checkpoint the model card describes has one input and one output::

    images                        FLOAT [1, 3, S, S]
    /model.23/Concat_3_output_0   FLOAT [1, 4 * 16 + nc, A]

The output is the *raw* one-to-one (NMS-free) head before any decoding: for every pyramid level
P3/P4/P5 the box-distribution conv (``one2one_cv2``, 4 x 16 DFL bins) and the class-logit conv
(``one2one_cv3``, ``nc`` logits) are concatenated on channels, flattened to ``[1, C, h * w]``
and the three levels concatenated on anchors (``A = (S/8)^2 + (S/16)^2 + (S/32)^2``, 8400 at 640:
:func:`lowbit.decode.num_anchors`). Channel order per anchor: 64 DFL logits (``l, t, r, b`` x 16
bins), then ``nc`` class logits (no sigmoid).

ultralytics' own ONNX export returns boxes already decoded from the one-to-many branch
(``[1, 84, 8400]``) instead, so this module replaces only the forward of the detection head and
exports with the TorchScript-based ``torch.onnx.export`` (``dynamo=False``): that exporter names
nodes after the module hierarchy (``/model.2/cv1/conv/Conv``), as the checkpoint's names are, and
the head's four concatenations come out as ``/model.23/Concat`` ... ``/model.23/Concat_3``.

Nothing here downloads: ``.pt`` files must exist locally and ``.yaml`` names resolve to files or to
the architecture files shipped inside the ultralytics package.
"""

from __future__ import annotations

import os
import re
import tempfile
import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowbit.cli import check_imgsz
from lowbit.decode import num_anchors
from lowbit.errors import UserError
from lowbit.logs import get_logger
from lowbit.runs import check_input_file

__all__ = [
    "DEFAULT_OPSET",
    "DEFAULT_RTOL",
    "INPUT_NAME",
    "LoadedModel",
    "check_export_imgsz",
    "check_static_shapes",
    "export_raw_head_onnx",
    "exported_parameter_count",
    "head_output_name",
    "load_yolov10",
    "onnx_vs_reference",
    "prepare_raw_head_model",
    "raw_head_reference",
    "resolve_yaml",
]

log = get_logger("export")

INPUT_NAME = "images"
DEFAULT_OPSET = 17
# Max |onnx - torch| allowed, relative to max |torch|: fused Conv+BN and ORT kernels differ from
# the unfused torch graph only by float32 rounding (observed ~1e-6 relative).
DEFAULT_RTOL = 1e-4


@dataclass
class LoadedModel:
    """An ultralytics ``DetectionModel`` and where it came from."""

    model: Any  # ultralytics.nn.tasks.DetectionModel
    source: Path  # the resolved .pt or .yaml file
    kind: str  # "pt" (trained weights) or "yaml" (architecture, random weights)
    nc: int


def head_output_name(head_index: int, num_levels: int) -> str:
    """Name of the raw head output: the head's last Concat, e.g. ``/model.23/Concat_3_output_0``.

    The head concatenates ``num_levels`` times per level (box + class), then once over levels,
    so the last Concat gets suffix ``_{num_levels}``.
    """
    return f"/model.{head_index}/Concat_{num_levels}_output_0"


def resolve_yaml(weights: str | Path) -> Path:
    """Return a YAML architecture file: the path itself, or a file shipped with ultralytics.

    ``yolov10m.yaml`` (no directory part) finds ``ultralytics/cfg/models/v10/yolov10m.yaml``;
    like ultralytics, ``yolov8n.yaml`` falls back to the scaled family file ``yolov8.yaml``.
    """
    path = Path(weights)
    if path.exists() or path.is_symlink():
        return check_input_file(path, "--weights")
    if path.parent == Path("."):
        import ultralytics

        cfg_root = Path(ultralytics.__file__).parent / "cfg" / "models"
        family = re.sub(r"(\d+)([nslmx])(.+)?$", r"\1\3", path.stem) + path.suffix
        for name in dict.fromkeys((path.name, family)):
            matches = sorted(cfg_root.rglob(name))
            if matches:
                return matches[0]
        raise UserError(
            f"--weights: {weights} is neither a file nor an architecture shipped with ultralytics "
            f"(looked under {cfg_root}); e.g. yolov10m.yaml",
            flag="--weights",
        )
    raise UserError(f"--weights: {weights} does not exist", flag="--weights")


def _load_pt_checkpoint(source: Path):
    """The model of an ultralytics ``.pt`` checkpoint (``ema`` if present, else ``model``).

    Loaded with ``torch.load`` directly rather than ultralytics' loader, which may download a
    "corrupt" official asset again or pip-install a module the pickle names. The class renames
    map checkpoints of the original YOLOv10 release (``YOLOv10DetectionModel``) onto ultralytics'
    classes, as ultralytics itself does. Like any ``.pt``, the file is unpickled: load only files
    you trust.
    """
    import torch
    from ultralytics.nn.tasks import temporary_modules

    renames = {
        "ultralytics.nn.tasks.YOLOv10DetectionModel": "ultralytics.nn.tasks.DetectionModel",
        "ultralytics.utils.loss.v10DetectLoss": "ultralytics.utils.loss.E2EDetectLoss",
    }
    try:
        with temporary_modules(attributes=renames):
            checkpoint = torch.load(str(source), map_location="cpu", weights_only=False)
    except Exception as exc:  # zip/pickle/import errors: whatever the file is, it is not a usable checkpoint
        raise UserError(
            f"--weights: {source} is not a loadable ultralytics checkpoint ({type(exc).__name__}: {exc})",
            flag="--weights",
        ) from exc
    model = (checkpoint.get("ema") or checkpoint.get("model")) if isinstance(checkpoint, dict) else checkpoint
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "model"):
        raise UserError(
            f"--weights: {source} is not a loadable ultralytics checkpoint (no detection model under 'ema'/'model')",
            flag="--weights",
        )
    for module in model.modules():
        if isinstance(module, torch.nn.Upsample) and not hasattr(module, "recompute_scale_factor"):
            module.recompute_scale_factor = None  # checkpoints pickled by torch < 1.11
    return model


def load_yolov10(weights: str | Path, nc: int | None = None, seed: int = 0) -> LoadedModel:
    """Load a YOLOv10 ``DetectionModel`` from ``.pt`` weights or build one from a ``.yaml``.

    Args:
        weights: local ``.pt`` checkpoint (ultralytics format), or a ``.yaml`` architecture
            (a path or the name of one shipped with ultralytics, e.g. ``yolov10m.yaml``).
        nc: number of classes. For ``.yaml`` it overrides the file's ``nc``; for ``.pt`` it
            must match the checkpoint (it cannot change trained weights).
        seed: torch seed for the random weights of a ``.yaml`` build (deterministic exports).

    Returns:
        LoadedModel with the model in eval mode, float32, on CPU.

    Raises:
        UserError: missing/unreadable file, unsupported suffix, nc mismatch, not a YOLOv10 head.
    """
    import torch

    suffix = Path(weights).suffix.lower()
    if nc is not None and nc < 1:
        raise UserError(f"--nc must be >= 1, got {nc}", flag="--nc")
    if suffix == ".pt":
        source = check_input_file(Path(weights), "--weights")
        model = _load_pt_checkpoint(source)
        kind = "pt"
    elif suffix in (".yaml", ".yml"):
        source = resolve_yaml(weights)
        # A shipped architecture is passed by its name: ultralytics reads the scale (n/s/m/...) from it.
        cfg = str(weights) if Path(weights).parent == Path(".") and not Path(weights).exists() else str(source)
        from ultralytics.nn.tasks import DetectionModel

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                model = DetectionModel(cfg, nc=nc, verbose=False)
            except Exception as exc:
                raise UserError(
                    f"--weights: could not build a model from {source} ({type(exc).__name__}: {exc})",
                    flag="--weights",
                ) from exc
        kind = "yaml"
    else:
        raise UserError(
            f"--weights: expected a .pt checkpoint or a .yaml architecture, got {weights}", flag="--weights"
        )

    head = model.model[-1]
    if getattr(head, "one2one_cv2", None) is None or getattr(head, "one2one_cv3", None) is None:
        raise UserError(
            f"--weights: {source} has no one-to-one (NMS-free) detection head "
            f"({type(head).__name__}); only YOLOv10-style end-to-end heads can be exported to this format",
            flag="--weights",
        )
    if kind == "pt" and nc is not None and nc != head.nc:
        raise UserError(f"--nc {nc} does not match the checkpoint {source}, which has nc={head.nc}", flag="--nc")
    model = model.float().cpu().eval()
    return LoadedModel(model=model, source=source, kind=kind, nc=int(head.nc))


def _raw_one2one_forward(self, x):
    """Replacement ``v10Detect.forward``: raw one-to-one head, ``[B, 4 * reg_max + nc, A]``.

    Same arithmetic as ``Detect.forward_head`` on the one-to-one branch, arranged as the
    checkpoint's graph: one Concat per level (box, cls), then one over levels.
    """
    import torch

    batch = x[0].shape[0]
    levels = [torch.cat((self.one2one_cv2[i](x[i]), self.one2one_cv3[i](x[i])), 1) for i in range(self.nl)]
    return torch.cat([level.view(batch, self.no, -1) for level in levels], 2)


def raw_head_reference(model, images):
    """Raw one-to-one head output computed by ultralytics' own (unmodified) forward.

    Args:
        model: an unmodified ``DetectionModel`` in eval mode.
        images: float tensor ``[B, 3, H, W]``.

    Returns:
        tensor ``[B, 4 * reg_max + nc, A]``: ``cat(boxes, scores)`` of the ``one2one`` predictions.
    """
    import torch

    with torch.no_grad():
        _, preds = model(images)
    one2one = preds["one2one"]
    return torch.cat((one2one["boxes"], one2one["scores"]), 1)


def prepare_raw_head_model(model):
    """Fuse Conv+BN, drop the one-to-many branch and make the head return the raw one-to-one output.

    Modifies ``model`` in place and returns it. ``C2f`` blocks switch to ``forward_split`` (a
    single ``Split`` node instead of the shape arithmetic ``chunk`` traces to), as ultralytics'
    exporter does.
    """
    from ultralytics.nn.modules import C2f

    head = model.model[-1]
    # fuse() keeps the branch end2end selects and deletes the other; select one-to-one explicitly,
    # since a model built from yaml starts with the one-to-many branch selected.
    head.end2end = True
    model.fuse(verbose=False)
    for module in model.modules():
        if isinstance(module, C2f):
            module.forward = module.forward_split
    head.forward = types.MethodType(_raw_one2one_forward, head)
    return model.eval()


def _strip_initializer_inputs(graph) -> None:
    """Remove initializers from ``graph.input`` (left there by ``keep_initializers_as_inputs``)."""
    initializer_names = {init.name for init in graph.initializer}
    keep = [vi for vi in graph.input if vi.name not in initializer_names]
    del graph.input[:]
    graph.input.extend(keep)


def _static_dims(value_info) -> list[int | str]:
    dims = []
    for dim in value_info.type.tensor_type.shape.dim:
        dims.append(dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or "?"))
    return dims


def check_static_shapes(model_proto) -> list[str]:
    """Tensors whose inferred shape is missing or not fully static (empty list when all are static)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model_proto, check_type=True, strict_mode=True, data_prop=True)
    graph = inferred.graph
    bad = []
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
            bad.append(vi.name)
            continue
        if any(not isinstance(d, int) or d < 1 for d in _static_dims(vi)):
            bad.append(vi.name)
    known = {vi.name for vi in list(graph.input) + list(graph.value_info) + list(graph.output)}
    initializers = {init.name for init in graph.initializer}
    for node in graph.node:
        for name in node.output:
            if name and name not in known and name not in initializers:
                bad.append(name)
    return bad


def _torch_export(model, path: Path, imgsz: int, opset: int, output_name: str) -> None:
    """``torch.onnx.export`` of the prepared model to ``path``, with the checkpoint's I/O names."""
    import torch

    images = torch.zeros(1, 3, imgsz, imgsz)
    with warnings.catch_warnings():
        # The TorchScript-based exporter is deprecated in favour of dynamo; it is used on purpose
        # because only it names nodes after the module hierarchy like the checkpoint.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        with torch.no_grad():
            torch.onnx.export(
                model,
                (images,),
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[output_name],
                do_constant_folding=True,
                # True skips the exporter's initializer de-duplication, which would merge equal
                # tensors (e.g. the zero biases of an untrained model) behind Identity nodes and
                # make initializer-based parameter counts disagree with the module's.
                keep_initializers_as_inputs=True,
            )


def _check_exported_graph(proto, output_name: str, imgsz: int, expected_shape: list[int]) -> dict[str, str]:
    """Give the head's last Concat the checkpoint's name and check I/O names and static shapes.

    Returns:
        ``{old node name: new name}`` for what was renamed.

    Raises:
        RuntimeError: the graph is not in the checkpoint's format (a bug, not user input).
    """
    import onnx

    graph = proto.graph
    _strip_initializer_inputs(graph)
    concat_node_name = output_name[: -len("_output_0")]
    renamed: dict[str, str] = {}
    producer = next((n for n in graph.node if output_name in n.output), None)
    if producer is None or producer.op_type != "Concat":
        raise RuntimeError(f"exported graph: output {output_name} is not produced by a Concat node")
    if producer.name != concat_node_name:
        # Different torch versions may number scoped nodes differently; the checkpoint's name wins.
        renamed[producer.name] = concat_node_name
        producer.name = concat_node_name
    if [i.name for i in graph.input] != [INPUT_NAME] or [o.name for o in graph.output] != [output_name]:
        raise RuntimeError(
            f"exported graph has inputs {[i.name for i in graph.input]} and outputs "
            f"{[o.name for o in graph.output]}; expected [{INPUT_NAME}] and [{output_name}]"
        )
    out_shape = _static_dims(graph.output[0])
    in_shape = _static_dims(graph.input[0])
    if out_shape != expected_shape or in_shape != [1, 3, imgsz, imgsz]:
        raise RuntimeError(f"exported shapes {in_shape} -> {out_shape}; expected -> {expected_shape}")
    onnx.checker.check_model(proto, full_check=True)
    dynamic = check_static_shapes(proto)
    if dynamic:
        raise RuntimeError(f"exported graph has tensors without a static shape: {dynamic[:5]}")
    return renamed


def export_raw_head_onnx(model, out: Path, imgsz: int, opset: int = DEFAULT_OPSET) -> dict[str, Any]:
    """Export a model prepared by :func:`prepare_raw_head_model` to ``out`` (written atomically).

    Args:
        model: the prepared ``DetectionModel``.
        out: destination ``.onnx`` path.
        imgsz: square input size (multiple of the model's largest stride).
        opset: ONNX opset.

    Returns:
        dict with ``input_name``, ``input_shape``, ``output_name``, ``output_shape``, ``opset``,
        ``num_nodes``, ``num_initializers``, ``renamed`` (what was renamed to reach the checkpoint
        names; empty when the exporter produced them).

    Raises:
        RuntimeError: the exported graph is not in the expected format (a bug, not user input).
    """
    import onnx

    head = model.model[-1]
    output_name = head_output_name(len(model.model) - 1, head.nl)
    expected_shape = [1, head.no, num_anchors(imgsz, tuple(int(s) for s in head.stride.tolist()))]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        _torch_export(model, tmp, imgsz, opset, output_name)
        proto = onnx.load(str(tmp))
        renamed = _check_exported_graph(proto, output_name, imgsz, expected_shape)
        onnx.save(proto, str(tmp))
        # mkstemp creates 0600 files; give the export the mode a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {
        "input_name": INPUT_NAME,
        "input_shape": [1, 3, imgsz, imgsz],
        "output_name": output_name,
        "output_shape": expected_shape,
        "opset": opset,
        "num_nodes": len(proto.graph.node),
        "num_initializers": len(proto.graph.initializer),
        "renamed": renamed,
    }


def onnx_vs_reference(onnx_path: Path, reference, images) -> dict[str, float]:
    """Run ``onnx_path`` on the CPU EP and compare with a torch reference output.

    Args:
        onnx_path: exported model.
        reference: torch tensor ``[1, C, A]`` computed on ``images``.
        images: torch tensor ``[1, 3, H, W]``.

    Returns:
        ``{"max_abs_diff", "max_abs_reference", "rel_diff"}`` where ``rel_diff`` is
        ``max_abs_diff / max(max_abs_reference, 1e-12)``.
    """
    import numpy as np

    from lowbit.ort_session import CPU, build_session

    session, _ = build_session(onnx_path, [CPU], model_flag="--out")
    (output,) = session.run(None, {session.get_inputs()[0].name: images.numpy()})
    ref = reference.numpy()
    if output.shape != ref.shape:
        raise RuntimeError(f"ONNX output shape {output.shape} != torch reference shape {ref.shape}")
    max_abs_diff = float(np.max(np.abs(output - ref)))
    max_abs_ref = float(np.max(np.abs(ref)))
    return {
        "max_abs_diff": max_abs_diff,
        "max_abs_reference": max_abs_ref,
        "rel_diff": max_abs_diff / max(max_abs_ref, 1e-12),
    }


def check_export_imgsz(imgsz: int, max_stride: int) -> int:
    """:func:`lowbit.cli.check_imgsz`'s rule, and a multiple of the model's largest stride (stricter for a P6
    model's 64): then every level's grid is whole and the neck's x2-upsampled maps match the ones they join.

    Raises:
        UserError(flag="--imgsz"): either rule broken.
    """
    check_imgsz(imgsz)
    if imgsz % max_stride:
        raise UserError(
            f"--imgsz must be a positive multiple of {max_stride} (the model's largest stride), got {imgsz}",
            flag="--imgsz",
        )
    return imgsz


def exported_parameter_count(model) -> int:
    """Parameters of a prepared model that the raw-head graph uses.

    The head's DFL conv (``reg_max`` fixed weights) decodes boxes, which the raw output leaves
    to post-processing, so it is not in the graph.
    """
    head = model.model[-1]
    unused = {id(p) for p in head.dfl.parameters()} if hasattr(head, "dfl") else set()
    return sum(p.numel() for p in model.parameters() if id(p) not in unused)
