"""What the torch sweep reads: which weights, which images, which device, ModelOpt, and the prepared model.

The defaults the model card relies on (``models/yolo10/yolov10m.pt`` when linked, else the shipped demo
detector; the demo calibration list), the checks behind ``yolov10m_layer_sensitivity.py``'s flags, and
:class:`SweepInputs`, the validated record ``lowbit.sensitivity_torch.run_sweep`` takes. Nothing here
imports torch, ModelOpt or OpenCV at import time: ``--help`` and input errors need none of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowbit.errors import UserError
from lowbit.runs import REPO_ROOT

__all__ = [
    "DEFAULT_IMAGE_LIST",
    "DEFAULT_WEIGHTS_CANDIDATES",
    "DEMO_WEIGHTS",
    "QUANT_FORMATS",
    "YOLOV10M_WEIGHTS",
    "SweepInputs",
    "import_mtq",
    "load_images_from_list",
    "prepare_model",
    "resolve_weights",
    "select_device",
]

# quant_format -> (precision, ModelOpt torch config name). Both use ModelOpt's "max" calibration.
QUANT_FORMATS: dict[str, tuple[str, str]] = {
    "fp8-fp8": ("fp8", "FP8_DEFAULT_CFG"),  # E4M3 per-tensor weights and activations
    "int8-int8": ("int8", "INT8_DEFAULT_CFG"),  # per-channel weights, per-tensor activations
}

# Defaults the card relies on (paths relative to the repository root).
DEMO_WEIGHTS = Path("models/cv-models/yolov10n-demo-shapes/yolov10n-demo-shapes.pt")
YOLOV10M_WEIGHTS = Path("models/yolo10/yolov10m.pt")
# the card's model first: with models/yolo10/yolov10m.pt linked, card step 4a with no arguments analyses it
DEFAULT_WEIGHTS_CANDIDATES: tuple[Path, ...] = (YOLOV10M_WEIGHTS, DEMO_WEIGHTS)
DEFAULT_IMAGE_LIST = Path("datasets/quantize-calib/demo_shapes_calib100.txt")


def resolve_weights(weights: Path | None, candidates: tuple[Path, ...] | None = None) -> Path:
    """The weights to analyse: ``weights`` when given, else the first default that exists.

    Defaults, in order: the user's ``models/yolo10/yolov10m.pt`` (the model card's model; a symlink),
    then the shipped demo detector.

    Raises:
        UserError: nothing given and no default present (the message names both and the flag).
    """
    if weights is not None:
        return weights
    candidates = DEFAULT_WEIGHTS_CANDIDATES if candidates is None else candidates
    for candidate in candidates:
        path = candidate if candidate.is_absolute() else REPO_ROOT / candidate
        if path.exists() or path.is_symlink():
            return path
    listed = " nor ".join(str(c) for c in candidates)
    raise UserError(
        f"--weights (env WEIGHTS) not given and no default weights found: neither {listed} exists "
        "(link your own yolov10m.pt as models/yolo10/README.md describes; the last is the shipped demo detector)",
        flag="--weights",
    )


def load_images_from_list(list_path: Path, num_images: int, imgsz: int, flag: str = "--images"):
    """Letterbox the first ``num_images`` listed images with the evaluator's preprocessing.

    The list is read by :func:`lowbit.calib.read_image_list` (comments, repeated entries, folders
    and missing files are refused there, each with the paths it was looked for at).

    Returns:
        ``(images, paths)``: float32 ``[N, 3, imgsz, imgsz]`` RGB in [0, 1], and the N files used
        (N = ``min(num_images, listed)``).

    Raises:
        UserError(flag): a bad list, or images that cannot be read (all of them named in one message).
    """
    import numpy as np

    from lowbit.calib import read_image_list
    from lowbit.preprocess import ImageReadError, preprocess

    entries = read_image_list(list_path, flag, max_images=num_images)
    images, unreadable = [], []
    for entry in entries:
        try:
            chw, _ = preprocess(entry.path, imgsz)
        except ImageReadError as exc:
            unreadable.append(f"{entry.text} ({exc.reason})")
            continue
        images.append(chw)
    if unreadable:
        raise UserError(f"{flag}: {len(unreadable)} image(s) could not be read: {'; '.join(unreadable)}", flag=flag)
    return np.stack(images), [entry.path for entry in entries]


def select_device(name: str) -> str:
    """``auto`` -> ``cuda:0`` when CUDA is available, else ``cpu``; ``cuda`` -> ``cuda:<current>``."""
    import torch

    if name == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise UserError(f"--device: {name!r} is not a device (auto, cpu, cuda, cuda:N)", flag="--device") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(
                f"--device {name}: CUDA is not available on this machine; use --device cpu or auto", flag="--device"
            )
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise UserError(
                f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present", flag="--device"
            )
        return f"cuda:{index}"
    if device.type != "cpu":
        raise UserError(f"--device: {name!r} is not supported (auto, cpu, cuda, cuda:N)", flag="--device")
    return "cpu"


def import_mtq():
    """``modelopt.torch.quantization``, or a UserError saying what is missing.

    Imported lazily: it takes seconds, and ``--help`` or input errors need none of it.
    """
    try:
        import modelopt.torch.quantization as mtq
    except ImportError as exc:
        raise UserError(
            f"cannot import modelopt.torch.quantization ({exc}); install the project's environment (make env)"
        ) from exc
    return mtq


@dataclass
class SweepInputs:
    """Everything a sweep needs, validated.

    Attributes:
        weights: ``.pt`` checkpoint or ``.yaml`` architecture (random weights).
        weights_sha256: sha256 of that file.
        images: float32 numpy ``[N, 3, imgsz, imgsz]``.
        data_source: the image list or .npy the images came from (for the report).
        imgsz: square input side.
        formats: keys of :data:`QUANT_FORMATS`.
        metric: key of ``lowbit.drift.METRICS``.
        batch_size: images per forward pass.
        device: ``cpu`` or ``cuda:N``.
        seed: seed for ``.yaml`` random weights.
    """

    weights: Path
    weights_sha256: str
    images: Any
    data_source: str
    imgsz: int
    formats: list[str]
    metric: str
    batch_size: int
    device: str
    seed: int = 0


def prepare_model(weights: Path, imgsz: int, seed: int = 0):
    """Load a YOLOv10 and prepare it as the raw-head export does (fused, raw one-to-one output).

    Returns:
        ``(model, loaded)``: the prepared model (CPU, eval) and the :class:`lowbit.export.LoadedModel`.
    """
    from lowbit.export import check_export_imgsz, load_yolov10, prepare_raw_head_model

    loaded = load_yolov10(weights, seed=seed)
    head = loaded.model.model[-1]
    check_export_imgsz(imgsz, int(max(head.stride.tolist())))
    return prepare_raw_head_model(loaded.model), loaded
