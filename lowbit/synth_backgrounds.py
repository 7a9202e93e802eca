"""Backgrounds of the demo-shapes images: crops of scikit-image's bundled photographs and procedural textures.

Every function draws only from the ``rng`` it is given, so a background is a pure function of the image's seed
(:func:`lowbit.synth_draw.image_seed`). The photographs are the ones bundled in the scikit-image wheel, loaded
without any download; :func:`backgrounds_digest` tells when a scikit-image release changed one.
"""

from __future__ import annotations

import colorsys
import math

import cv2
import numpy as np

from lowbit.errors import UserError

__all__ = [
    "SKIMAGE_BACKGROUNDS",
    "background",
    "backgrounds_digest",
    "hsv_to_bgr",
    "load_backgrounds",
    "smooth_noise",
]

# Photographs bundled in the scikit-image wheel that load without any download.
SKIMAGE_BACKGROUNDS = (
    "astronaut",
    "brick",
    "camera",
    "cell",
    "chelsea",
    "clock",
    "coffee",
    "coins",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "page",
    "retina",
    "rocket",
    "stereo_motorcycle",
    "text",
)


_BACKGROUNDS: list[np.ndarray] | None = None


def load_backgrounds() -> list[np.ndarray]:
    """The bundled scikit-image photographs as BGR uint8 arrays, in a fixed order (cached per process).

    Raises:
        UserError: a photograph cannot be loaded (it would change every generated image).
    """
    global _BACKGROUNDS
    if _BACKGROUNDS is not None:
        return _BACKGROUNDS
    import skimage.data  # lazy: only the generator needs scikit-image

    images = []
    for name in SKIMAGE_BACKGROUNDS:
        try:
            image = getattr(skimage.data, name)()
        except Exception as exc:  # a missing file would silently change the dataset, so stop
            raise UserError(f"scikit-image sample image {name!r} cannot be loaded offline: {exc}") from exc
        if isinstance(image, tuple):  # stereo_motorcycle -> (left, right, disparity)
            image = image[0]
        image = np.asarray(image)
        if image.dtype != np.uint8:
            image = (np.clip(image, 0, 1) * 255).astype(np.uint8) if image.dtype.kind == "f" else image.astype(np.uint8)
        if image.ndim == 2:
            image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
        elif image.shape[2] == 4:
            image = cv2.cvtColor(image, cv2.COLOR_RGBA2BGR)
        else:
            image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
        images.append(np.ascontiguousarray(image))
    _BACKGROUNDS = images
    return images


def backgrounds_digest() -> str:
    """sha256 over the background pixels: differs when a scikit-image release changes a sample photo."""
    import hashlib

    digest = hashlib.sha256()
    for image in load_backgrounds():
        digest.update(str(image.shape).encode())
        digest.update(image.tobytes())
    return digest.hexdigest()


def hsv_to_bgr(hue_deg: float, sat: float, val: float) -> np.ndarray:
    """BGR float32 colour (0..255) of a hue in degrees and a saturation and value in 0..1 (clipped)."""
    r, g, b = colorsys.hsv_to_rgb((hue_deg % 360.0) / 360.0, min(max(sat, 0.0), 1.0), min(max(val, 0.0), 1.0))
    return np.array([b * 255.0, g * 255.0, r * 255.0], dtype=np.float32)


def smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int, channels: int) -> np.ndarray:
    """Value noise in [0, 1]: a random ``cells``-wide grid upsampled with bicubic interpolation."""
    gh = max(2, round(cells * height / max(height, width)))
    gw = max(2, round(cells * width / max(height, width)))
    grid = rng.random((gh, gw, channels), dtype=np.float32)
    out = cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)
    return np.clip(out.reshape(height, width, channels), 0.0, 1.0)


def _pixel_grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Row (H, 1) and column (1, W) pixel coordinates that broadcast to (H, W)."""
    return np.arange(height, dtype=np.float32)[:, None], np.arange(width, dtype=np.float32)[None, :]


def _procedural_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    kind = rng.integers(0, 4)
    base = hsv_to_bgr(rng.uniform(0, 360), rng.uniform(0.0, 0.5), rng.uniform(0.25, 0.95))
    other = hsv_to_bgr(rng.uniform(0, 360), rng.uniform(0.0, 0.6), rng.uniform(0.2, 0.95))
    if kind == 0:  # multi-octave value noise (clouds, stains)
        weight = 0.6 * smooth_noise(rng, height, width, int(rng.integers(3, 8)), 1)
        weight += 0.3 * smooth_noise(rng, height, width, int(rng.integers(12, 40)), 1)
        weight += 0.1 * smooth_noise(rng, height, width, int(rng.integers(60, 160)), 1)
        image = base * (1 - weight) + other * weight
    elif kind == 1:  # linear gradient between two colours
        angle = rng.uniform(0, 2 * math.pi)
        yy, xx = _pixel_grid(height, width)
        proj = xx * math.cos(angle) + yy * math.sin(angle)
        proj = (proj - proj.min()) / max(float(np.ptp(proj)), 1.0)
        image = base * (1 - proj[..., None]) + other * proj[..., None]
    elif kind == 2:  # stripes (fabric, floorboards)
        angle = rng.uniform(0, math.pi)
        period = rng.uniform(6, 80)
        yy, xx = _pixel_grid(height, width)
        phase = (xx * math.cos(angle) + yy * math.sin(angle)) * (2 * math.pi / period)
        weight = (0.5 + 0.5 * np.sin(phase))[..., None]
        image = base * (1 - weight) + other * weight
    else:  # checker / tiles, softened
        cell = rng.uniform(10, 90)
        yy, xx = _pixel_grid(height, width)
        weight = ((np.floor(xx / cell) + np.floor(yy / cell)) % 2).astype(np.float32)
        weight = cv2.GaussianBlur(weight, (0, 0), rng.uniform(0.5, 3.0))[..., None]
        image = base * (1 - weight) + other * weight
    grain = rng.uniform(0, 18)
    image = image + (smooth_noise(rng, height, width, max(8, min(height, width) // 3), 1) - 0.5) * grain
    return image.astype(np.float32)


def _photo_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    backgrounds = load_backgrounds()
    photo = backgrounds[int(rng.integers(0, len(backgrounds)))]
    ph, pw = photo.shape[:2]
    target_aspect = width / height
    scale = math.sqrt(rng.uniform(0.15, 1.0))  # fraction of the photo's side that the crop spans
    crop_w = pw * scale
    crop_h = crop_w / target_aspect
    if crop_h > ph * scale:
        crop_h = ph * scale
        crop_w = crop_h * target_aspect
    crop_w, crop_h = max(8, int(crop_w)), max(8, int(crop_h))
    x0 = int(rng.integers(0, pw - crop_w + 1))
    y0 = int(rng.integers(0, ph - crop_h + 1))
    crop = photo[y0 : y0 + crop_h, x0 : x0 + crop_w]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    if rng.random() < 0.2:
        crop = crop[::-1, :]
    image = cv2.resize(np.ascontiguousarray(crop), (width, height), interpolation=cv2.INTER_LINEAR)
    image = image.astype(np.float32)
    if rng.random() < 0.3:  # desaturate, so colourful photos do not dominate
        grey = image.mean(axis=2, keepdims=True)
        keep = rng.uniform(0.0, 0.6)
        image = grey + (image - grey) * keep
    return image


def background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Float32 BGR ``(height, width, 3)``: a photograph crop (55%), a procedural texture (30%) or a blend of both."""
    choice = rng.random()
    if choice < 0.55:
        return _photo_background(rng, height, width)
    if choice < 0.85:
        return _procedural_background(rng, height, width)
    alpha = rng.uniform(0.3, 0.7)  # photo seen through a texture
    return _photo_background(rng, height, width) * (1 - alpha) + _procedural_background(rng, height, width) * alpha
