"""Image loading and the square letterbox shared by the COCO evaluator and the calibration builder.

This is the only letterbox in the repository. It reproduces, for a square ``imgsz``, what
ultralytics 8.4's validation loader feeds a non-PyTorch model (``rect=False``, batch 1):

1. ``BaseDataset.load_image``: read with ``cv2.IMREAD_COLOR`` (grayscale -> 3 equal channels,
   alpha dropped, EXIF orientation applied by OpenCV), then, when the long side differs from
   ``imgsz``, resize to ``(min(ceil(w0*r), imgsz), min(ceil(h0*r), imgsz))`` with
   ``r = imgsz / max(h0, w0)`` and ``cv2.INTER_LINEAR`` (up or down);
2. ``LetterBox(new_shape=imgsz, scaleup=False, center=True)``: pad to ``imgsz x imgsz`` with value
   114, ``top = round(dh/2 - 0.1)``, ``bottom = round(dh/2 + 0.1)`` (same for left/right);
3. BGR -> RGB, HWC -> CHW, ``/ 255`` as float32.

Boxes go back to the original image exactly as ultralytics' ``ops.scale_boxes`` does with the
loader's ``ratio_pad``: subtract ``(left, top)``, divide by the per-axis gains
``resized_w / w0`` and ``resized_h / h0``, clip to the original size.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from lowbit.errors import UserError

__all__ = [
    "PAD_VALUE",
    "ImageReadError",
    "LetterboxInfo",
    "PreparedImage",
    "iter_prepared",
    "letterbox",
    "load_image_bgr",
    "prepare_image",
    "preprocess",
    "scale_boxes_xyxy_to_original",
    "to_bgr_uint8",
    "to_nchw_float",
]

PAD_VALUE = 114  # ultralytics' letterbox fill (grey), also what the models were trained with


class ImageReadError(UserError):
    """An image file is missing, empty, or cannot be decoded."""

    def __init__(self, path: str | Path, reason: str, flag: str | None = None):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}", flag=flag)


@dataclass(frozen=True)
class LetterboxInfo:
    """How an original image maps into the letterboxed model input.

    Attributes:
        orig_hw: original (height, width) in pixels.
        resized_hw: (height, width) of the resized image before padding.
        gain_xy: (resized_w / orig_w, resized_h / orig_h); equal up to rounding.
        pad_xy: (left, top) padding in pixels.
        imgsz: side of the square model input.
    """

    orig_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    gain_xy: tuple[float, float]
    pad_xy: tuple[int, int]
    imgsz: int

    def to_dict(self) -> dict:
        return asdict(self)


def to_bgr_uint8(img: np.ndarray) -> np.ndarray:
    """Normalise an already decoded image to HxWx3 uint8 BGR (as ``cv2.IMREAD_COLOR`` would).

    Args:
        img: HxW (grayscale), HxWx1, HxWx3 (BGR) or HxWx4 (BGRA); uint8 or uint16.

    Returns:
        HxWx3 uint8 BGR array (a new array unless the input already qualifies).
    """
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)  # keep the high byte, as OpenCV's 8-bit conversion does
    elif img.dtype != np.uint8:
        raise ValueError(f"unsupported image dtype {img.dtype}; expected uint8 or uint16")
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    if img.ndim != 3:
        raise ValueError(f"unsupported image shape {img.shape}")
    channels = img.shape[2]
    if channels == 1:
        return cv2.cvtColor(img[..., 0], cv2.COLOR_GRAY2BGR)
    if channels == 3:
        return img
    if channels == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)  # alpha dropped, not composited (IMREAD_COLOR does the same)
    raise ValueError(f"unsupported number of channels {channels} in image of shape {img.shape}")


def load_image_bgr(path: str | Path) -> np.ndarray:
    """Read an image file as HxWx3 uint8 BGR.

    Grayscale, 16-bit and 4-channel files are converted by OpenCV's ``IMREAD_COLOR`` decode.

    Raises:
        ImageReadError: the file is missing, empty, or not a decodable image.
    """
    path = Path(path)
    try:
        data = np.fromfile(str(path), dtype=np.uint8)  # np.fromfile + imdecode also handles non-ASCII paths
    except FileNotFoundError:
        raise ImageReadError(path, "file does not exist") from None
    except OSError as exc:
        raise ImageReadError(path, f"{type(exc).__name__}: {exc}") from exc
    if data.size == 0:
        raise ImageReadError(path, "file is empty")
    img = cv2.imdecode(data, cv2.IMREAD_COLOR)
    if img is None:
        raise ImageReadError(path, "not a decodable image (corrupt or unsupported format)")
    if img.ndim == 2 or img.shape[2] != 3 or img.dtype != np.uint8:  # defensive: IMREAD_COLOR should give BGR8
        img = to_bgr_uint8(img)
    return img


def letterbox(img: np.ndarray, imgsz: int, color: int = PAD_VALUE) -> tuple[np.ndarray, LetterboxInfo]:
    """Resize the long side to ``imgsz`` (up or down) and pad centred to ``imgsz x imgsz``.

    Args:
        img: HxWx3 uint8 BGR image (other layouts are converted with :func:`to_bgr_uint8`).
        imgsz: side of the square output, pixels.
        color: padding value for all three channels.

    Returns:
        ``(padded, info)``: padded is ``imgsz x imgsz x 3`` uint8 BGR.
    """
    if imgsz < 1:
        raise ValueError(f"imgsz must be >= 1, got {imgsz}")
    img = to_bgr_uint8(img)
    h0, w0 = img.shape[:2]
    r = imgsz / max(h0, w0)
    if r != 1:
        # ceil then cap, as ultralytics' load_image does; keeps thin images at least 1 pixel wide
        w, h = min(math.ceil(w0 * r), imgsz), min(math.ceil(h0 * r), imgsz)
        img = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)
    h, w = img.shape[:2]
    dw, dh = (imgsz - w) / 2, (imgsz - h) / 2
    top, bottom = round(dh - 0.1), round(dh + 0.1)
    left, right = round(dw - 0.1), round(dw + 0.1)
    if top or bottom or left or right:
        img = cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(color,) * 3)
    info = LetterboxInfo(
        orig_hw=(h0, w0),
        resized_hw=(h, w),
        gain_xy=(w / w0, h / h0),
        pad_xy=(left, top),
        imgsz=imgsz,
    )
    return img, info


def to_nchw_float(img: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 BGR -> 3xHxW float32 RGB in [0, 1] (C-contiguous)."""
    chw = img[..., ::-1].transpose(2, 0, 1)
    out = np.empty(chw.shape, dtype=np.float32)
    # a true division (not a multiply by 1/255), as ultralytics' validator does, to match bit for bit
    np.divide(chw, np.float32(255.0), out=out, dtype=np.float32)
    return out


def preprocess(path_or_img: str | Path | np.ndarray, imgsz: int) -> tuple[np.ndarray, LetterboxInfo]:
    """Read (if a path) and letterbox one image into the model's input layout.

    Args:
        path_or_img: image file, or an already decoded image (see :func:`to_bgr_uint8`).
        imgsz: square input side, pixels.

    Returns:
        ``(chw, info)``: ``chw`` is float32 ``[3, imgsz, imgsz]`` RGB in [0, 1]; add the batch
        axis with ``chw[None]``.
    """
    img = path_or_img if isinstance(path_or_img, np.ndarray) else load_image_bgr(path_or_img)
    padded, info = letterbox(img, imgsz)
    return to_nchw_float(padded), info


def scale_boxes_xyxy_to_original(boxes: np.ndarray, info: LetterboxInfo) -> np.ndarray:
    """Map xyxy boxes from letterboxed-input pixels back to original-image pixels, clipped.

    Args:
        boxes: ``[N, 4]`` (x1, y1, x2, y2) in model-input pixels.
        info: the :class:`LetterboxInfo` of that image.

    Returns:
        New float32 ``[N, 4]`` array (x1, y1, x2, y2) in original pixels, clipped to
        ``[0, w0] x [0, h0]``.
    """
    out = np.array(boxes, dtype=np.float32, copy=True).reshape(-1, 4)
    pad_x, pad_y = info.pad_xy
    gain_x, gain_y = info.gain_xy
    out[:, [0, 2]] = (out[:, [0, 2]] - pad_x) / gain_x
    out[:, [1, 3]] = (out[:, [1, 3]] - pad_y) / gain_y
    h0, w0 = info.orig_hw
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, w0)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, h0)
    return out


@dataclass
class PreparedImage:
    """One image ready for the model, or the reason it is not.

    Attributes:
        key: caller's identifier (e.g. the COCO image id).
        path: the image file.
        chw: float32 ``[3, imgsz, imgsz]`` or None when reading failed.
        info: letterbox geometry, or None when reading failed.
        error: the :class:`ImageReadError`, or None.
        decode_s: seconds spent reading and decoding the file.
        preprocess_s: seconds spent in letterbox + layout conversion.
    """

    key: object
    path: Path
    chw: np.ndarray | None
    info: LetterboxInfo | None
    error: ImageReadError | None
    decode_s: float
    preprocess_s: float


def prepare_image(key: object, path: str | Path, imgsz: int) -> PreparedImage:
    """Read and preprocess one image, timing both stages; read errors are returned, not raised."""
    import time

    t0 = time.perf_counter()
    try:
        img = load_image_bgr(path)
    except ImageReadError as exc:
        return PreparedImage(key, Path(path), None, None, exc, time.perf_counter() - t0, 0.0)
    t1 = time.perf_counter()
    padded, info = letterbox(img, imgsz)
    chw = to_nchw_float(padded)
    t2 = time.perf_counter()
    return PreparedImage(key, Path(path), chw, info, None, t1 - t0, t2 - t1)


def iter_prepared(items, imgsz: int, workers: int = 0, window: int | None = None):
    """Yield :class:`PreparedImage` for ``items`` in order, preparing up to ``window`` ahead in threads.

    OpenCV decode/resize and numpy release the GIL, so a small thread pool overlaps image
    preparation with inference running in the caller's thread.

    Args:
        items: iterable of ``(key, path)``.
        imgsz: square input side.
        workers: prefetch threads; 0 prepares each image in the caller's thread when asked for.
        window: images in flight at most (default ``2 * workers``); bounds memory.
    """
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    items = iter(items)
    if workers <= 0:
        for key, path in items:
            yield prepare_image(key, path, imgsz)
        return
    window = max(window or 2 * workers, 1)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="prefetch") as pool:
        pending: deque = deque()
        for key, path in items:
            pending.append(pool.submit(prepare_image, key, path, imgsz))
            if len(pending) >= window:
                break
        for key, path in items:  # continues the same iterator after the initial window
            yield pending.popleft().result()
            pending.append(pool.submit(prepare_image, key, path, imgsz))
        while pending:
            yield pending.popleft().result()
