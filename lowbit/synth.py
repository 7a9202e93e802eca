"""Deterministic synthetic detection dataset ("demo-shapes") in COCO 2017 layout, plus a YOLO view.

Eighty classes, one per (shape, colour) pair, carry COCO 2017's 80 category ids, so everything that maps
class index -> category id runs exactly as on real COCO. Images are built to make detection non-trivial:
real-photograph and procedural backgrounds, 4-25 objects from 8 px to most of the frame, occlusion,
truncation at the border, clutter that belongs to no class, lighting and colour casts, blur, noise, and
JPEG quality 50-95.

Every image is a pure function of ``(seed, split, index)``, so the output is the same for any number of
worker processes. Layout written by :func:`generate_split`::

    <root>/<split>2017/<12-digit id>.jpg
    <root>/annotations/instances_<split>2017.json      written last: its presence marks a complete split
    <root>/yolo/images/<split>2017/<id>.jpg -> ../../../<split>2017/<id>.jpg   (relative symlinks)
    <root>/yolo/labels/<split>2017/<id>.txt             "class cx cy w h", normalised, class = contiguous index
    <root>/yolo/data.yaml                               ultralytics dataset file (no ``path`` key: the
                                                        file's own directory is the root, so it can move)
    <root>/dataset_info.json                            generator version, seeds, counts, annotation sha256

Only numpy, OpenCV and scikit-image (for its bundled sample photographs) are used.
"""

from __future__ import annotations

import colorsys
import json
import math
import multiprocessing
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from lowbit.errors import UserError
from lowbit.runs import atomic_write_json, atomic_write_text, sha256_file

# Bump whenever the pixels or annotations produced for a given (seed, split, index) change.
GENERATOR_VERSION = "1"

# COCO 2017's 80 category ids (1..90 without 12, 26, 29, 30, 45, 66, 68, 69, 71, 83), sorted.
COCO80_CATEGORY_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32, 33, 34,
    35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63,
    64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90,
)  # fmt: skip

# Ten shapes; pairs that look alike when small or blurred are deliberate (circle/hexagon,
# pentagon/hexagon, circle/ring, crescent/circle under occlusion).
SHAPES = ("circle", "ring", "crescent", "triangle", "square", "pentagon", "hexagon", "star", "cross", "arrow")

# Eight hues (degrees), neighbours 25-40 degrees apart, so lighting, colour casts and JPEG chroma
# subsampling can push one towards the next. No achromatic colour is a class: grey/white/black shapes
# are clutter.
COLOURS = (
    ("red", 0.0),
    ("orange", 28.0),
    ("yellow", 55.0),
    ("green", 120.0),
    ("cyan", 185.0),
    ("blue", 225.0),
    ("purple", 272.0),
    ("pink", 322.0),
)

NUM_CLASSES = len(SHAPES) * len(COLOURS)
assert NUM_CLASSES == len(COCO80_CATEGORY_IDS) == 80

# Class index i (contiguous, the order of sorted category ids) is shape i // 8 in colour i % 8.
CLASS_NAMES = tuple(f"{colour} {shape}" for shape in SHAPES for colour, _ in COLOURS)

SPLITS = ("val", "train")
# Image ids: val 1..N, train from TRAIN_ID_OFFSET + 1, disjoint as long as N < TRAIN_ID_OFFSET.
SPLIT_ID_OFFSET = {"val": 0, "train": 1_000_000}
SPLIT_CODE = {"val": 0, "train": 1}  # mixed into each image's seed

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

MIN_VISIBLE_FRACTION = 0.3  # objects less visible than this (occluded or outside the frame) are not annotated
MIN_BOX_SIDE = 3  # pixels; smaller visible boxes are not annotated
MIN_OBJECT_SIZE = 8.0  # pixels, object diameter
MAX_OBJECT_FRACTION = 0.8  # of the shorter image side


def split_dir_name(split: str) -> str:
    """``val`` -> ``val2017`` (COCO 2017 directory and annotation-file naming)."""
    return f"{split}2017"


def categories() -> list[dict[str, Any]]:
    """COCO ``categories`` list: id (COCO 2017 id), name ("red circle"), supercategory (the shape)."""
    return [
        {"id": cat_id, "name": CLASS_NAMES[i], "supercategory": SHAPES[i // len(COLOURS)]}
        for i, cat_id in enumerate(COCO80_CATEGORY_IDS)
    ]


# ----------------------------------------------------------------------------------------------
# Backgrounds
# ----------------------------------------------------------------------------------------------

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


def _hsv_to_bgr(hue_deg: float, sat: float, val: float) -> np.ndarray:
    r, g, b = colorsys.hsv_to_rgb((hue_deg % 360.0) / 360.0, min(max(sat, 0.0), 1.0), min(max(val, 0.0), 1.0))
    return np.array([b * 255.0, g * 255.0, r * 255.0], dtype=np.float32)


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int, channels: int) -> np.ndarray:
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
    base = _hsv_to_bgr(rng.uniform(0, 360), rng.uniform(0.0, 0.5), rng.uniform(0.25, 0.95))
    other = _hsv_to_bgr(rng.uniform(0, 360), rng.uniform(0.0, 0.6), rng.uniform(0.2, 0.95))
    if kind == 0:  # multi-octave value noise (clouds, stains)
        weight = 0.6 * _smooth_noise(rng, height, width, int(rng.integers(3, 8)), 1)
        weight += 0.3 * _smooth_noise(rng, height, width, int(rng.integers(12, 40)), 1)
        weight += 0.1 * _smooth_noise(rng, height, width, int(rng.integers(60, 160)), 1)
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
    image = image + (_smooth_noise(rng, height, width, max(8, min(height, width) // 3), 1) - 0.5) * grain
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


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    choice = rng.random()
    if choice < 0.55:
        return _photo_background(rng, height, width)
    if choice < 0.85:
        return _procedural_background(rng, height, width)
    alpha = rng.uniform(0.3, 0.7)  # photo seen through a texture
    return _photo_background(rng, height, width) * (1 - alpha) + _procedural_background(rng, height, width) * alpha


# ----------------------------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------------------------

_SUBPIXEL_SHIFT = 3  # OpenCV fixed-point drawing: coordinates carry 3 fractional bits
_SUBPIXEL = 1 << _SUBPIXEL_SHIFT


def _regular_polygon(sides: int, phase: float) -> np.ndarray:
    angles = phase + np.arange(sides) * (2 * math.pi / sides)
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _star(points: int, inner: float) -> np.ndarray:
    angles = -math.pi / 2 + np.arange(2 * points) * (math.pi / points)
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([np.cos(angles) * radii, np.sin(angles) * radii], axis=1)


def _cross(arm: float) -> np.ndarray:
    a = arm / 2
    return np.array(
        [[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1], [-a, 1], [-a, a], [-1, a], [-1, -a], [-a, -a]],
        dtype=np.float64,
    )


def _arrow(shaft: float, head: float) -> np.ndarray:
    s = shaft / 2
    return np.array([[-1, -s], [1 - head, -s], [1 - head, -0.7], [1, 0], [1 - head, 0.7], [1 - head, s], [-1, s]])


def _blob(rng: np.random.Generator) -> np.ndarray:
    count = int(rng.integers(9, 18))
    angles = np.sort(rng.uniform(0, 2 * math.pi, count))
    radii = 1.0 - rng.uniform(0.0, 0.55, count)
    return np.stack([np.cos(angles) * radii, np.sin(angles) * radii], axis=1)


def _fill(mask: np.ndarray, unit_points: np.ndarray, center: float, radius: float, aspect: float, angle: float) -> None:
    """Fill a polygon given in unit coordinates, scaled to ``radius`` (x) / ``radius*aspect`` (y) then rotated."""
    pts = unit_points * np.array([radius, radius * aspect])
    c, s = math.cos(angle), math.sin(angle)
    pts = pts @ np.array([[c, s], [-s, c]]) + center
    cv2.fillPoly(mask, [np.round(pts * _SUBPIXEL).astype(np.int32)], 255, cv2.LINE_AA, _SUBPIXEL_SHIFT)


def _ellipse(mask: np.ndarray, cx: float, cy: float, rx: float, ry: float, angle: float, value: int) -> None:
    center = (round(cx * _SUBPIXEL), round(cy * _SUBPIXEL))
    axes = (max(1, round(rx * _SUBPIXEL)), max(1, round(ry * _SUBPIXEL)))
    cv2.ellipse(mask, center, axes, math.degrees(angle), 0, 360, value, -1, cv2.LINE_AA, _SUBPIXEL_SHIFT)


def render_mask(shape: str, size: float, rng: np.random.Generator) -> np.ndarray:
    """Anti-aliased uint8 mask (0..255) of one shape of diameter ``size`` px, centred in a square patch.

    ``shape`` is one of :data:`SHAPES` or a clutter kind (``bar``, ``blob``, ``line``, ``ellipse``).
    Aspect ratio (0.8-1.25 for class shapes) and rotation are drawn from ``rng``.
    """
    patch = int(math.ceil(size * 1.1)) + 4  # room for corners that reach ~1.04 x the radius
    mask = np.zeros((patch, patch), np.uint8)
    center = patch / 2.0
    radius = size / 2.0
    aspect = float(rng.uniform(0.8, 1.25))
    angle = float(rng.uniform(0, 2 * math.pi))
    if shape in {"circle", "ring", "crescent"}:
        rx, ry = (radius, radius * aspect) if aspect <= 1 else (radius / aspect, radius)
        _ellipse(mask, center, center, rx, ry, angle, 255)
        if shape == "ring":
            inner = rng.uniform(0.42, 0.68)
            _ellipse(mask, center, center, rx * inner, ry * inner, angle, 0)
        elif shape == "crescent":
            offset = rng.uniform(0.3, 0.6) * radius
            cut = rng.uniform(0.8, 1.0)
            _ellipse(
                mask,
                center + offset * math.cos(angle),
                center + offset * math.sin(angle),
                rx * cut,
                ry * cut,
                angle,
                0,
            )
        return mask
    aspect_scale = min(1.0, 1.0 / aspect)  # keep the long side within the patch
    radius *= aspect_scale
    if shape == "triangle":
        unit = _regular_polygon(3, -math.pi / 2)
    elif shape == "square":
        unit = _regular_polygon(4, math.pi / 4)  # corners on the unit circle, like the other polygons
    elif shape == "pentagon":
        unit = _regular_polygon(5, -math.pi / 2)
    elif shape == "hexagon":
        unit = _regular_polygon(6, 0.0)
    elif shape == "star":
        unit = _star(5, rng.uniform(0.38, 0.52))
    elif shape == "cross":
        unit = _cross(rng.uniform(0.3, 0.45))
    elif shape == "arrow":
        unit = _arrow(rng.uniform(0.3, 0.5), rng.uniform(0.5, 0.8))
    elif shape == "bar":  # clutter: long rectangle, never square-ish
        long = rng.uniform(2.5, 7.0)
        unit = np.array([[-1, -1 / long], [1, -1 / long], [1, 1 / long], [-1, 1 / long]])
        aspect = 1.0
    elif shape == "ellipse":  # clutter: clearly elongated ellipse
        ratio = rng.uniform(0.2, 0.45)
        _ellipse(mask, center, center, radius, radius * ratio, angle, 255)
        return mask
    elif shape == "blob":  # clutter: irregular polygon
        unit = _blob(rng)
    elif shape == "line":  # clutter: thick polyline
        count = int(rng.integers(2, 5))
        pts = rng.uniform(-radius, radius, (count, 2)) + center
        thickness = max(1, int(size * rng.uniform(0.02, 0.08)))
        cv2.polylines(mask, [np.round(pts * _SUBPIXEL).astype(np.int32)], False, 255, thickness, cv2.LINE_AA, 3)
        return mask
    else:
        raise ValueError(f"unknown shape {shape!r}")
    _fill(mask, unit, center, radius, aspect, angle)
    return mask


CLUTTER_SHAPES = ("bar", "ellipse", "blob", "line")


@dataclass
class _Item:
    """One thing to draw: a class object (``class_index`` >= 0) or clutter (``class_index`` == -1)."""

    class_index: int
    shape: str
    size: float
    cx: float
    cy: float
    colour: np.ndarray  # BGR float32, 0..255


def _object_colour(rng: np.random.Generator, colour_index: int) -> np.ndarray:
    hue = COLOURS[colour_index][1] + rng.uniform(-7.0, 7.0)
    return _hsv_to_bgr(hue, rng.uniform(0.5, 1.0), rng.uniform(0.5, 1.0))


def _clutter_colour(rng: np.random.Generator) -> np.ndarray:
    if rng.random() < 0.6:  # achromatic: grey, white, black — never a class colour
        return _hsv_to_bgr(0.0, rng.uniform(0.0, 0.1), rng.uniform(0.05, 1.0))
    return _hsv_to_bgr(rng.uniform(0, 360), rng.uniform(0.2, 1.0), rng.uniform(0.3, 1.0))


def _paint(
    image: np.ndarray, owner: np.ndarray, item: _Item, owner_id: int, rng: np.random.Generator
) -> tuple[int, int, np.ndarray] | None:
    """Composite one item into ``image`` (float32 HxWx3) and mark its solid pixels in ``owner``.

    Returns:
        (x0, y0, mask) of the unclipped patch, or None when the patch misses the image entirely.
    """
    mask = render_mask(item.shape, item.size, rng)
    patch = mask.shape[0]
    x0 = int(round(item.cx - patch / 2))
    y0 = int(round(item.cy - patch / 2))
    height, width = owner.shape
    ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x0 + patch, width), min(y0 + patch, height)
    if ix0 >= ix1 or iy0 >= iy1:
        return None

    # Appearance: base colour, a shading gradient across the object, sometimes a texture and an outline.
    ramp = np.linspace(-0.5, 0.5, patch, dtype=np.float32)
    yy, xx = ramp[:, None], ramp[None, :]
    angle = rng.uniform(0, 2 * math.pi)
    shade = 1.0 + rng.uniform(-0.35, 0.35) * (xx * math.cos(angle) + yy * math.sin(angle))
    if rng.random() < 0.25:
        shade = shade * (1.0 + (_smooth_noise(rng, patch, patch, int(rng.integers(3, 10)), 1)[..., 0] - 0.5) * 0.3)
    colour = item.colour[None, None, :] * shade[..., None]
    if rng.random() < 0.3 and item.size >= 14:
        thickness = max(1, int(item.size * rng.uniform(0.03, 0.08)))
        eroded = cv2.erode(mask, np.ones((2 * thickness + 1, 2 * thickness + 1), np.uint8))
        rim = ((mask.astype(np.float32) - eroded) / 255.0)[..., None]
        edge_colour = item.colour * rng.uniform(0.3, 0.6) if rng.random() < 0.7 else np.full(3, 235, np.float32)
        colour = colour * (1 - rim) + edge_colour * rim
    alpha = mask.astype(np.float32) / 255.0
    if rng.random() < 0.15:  # out of focus or moving
        if rng.random() < 0.6:
            sigma = rng.uniform(0.6, 0.5 + item.size / 25)
            colour = cv2.GaussianBlur(colour, (0, 0), sigma)
            alpha = cv2.GaussianBlur(alpha, (0, 0), sigma)
        else:
            length = int(rng.integers(3, max(4, int(item.size / 6) + 1)))
            kernel = np.zeros((length, length), np.float32)
            kernel[length // 2, :] = 1.0 / length
            rot = cv2.getRotationMatrix2D((length / 2 - 0.5, length / 2 - 0.5), rng.uniform(0, 180), 1.0)
            kernel = cv2.warpAffine(kernel, rot, (length, length))
            kernel /= max(float(kernel.sum()), 1e-6)
            colour = cv2.filter2D(colour, -1, kernel)
            alpha = cv2.filter2D(alpha, -1, kernel)

    sy, sx = slice(iy0 - y0, iy1 - y0), slice(ix0 - x0, ix1 - x0)
    a = alpha[sy, sx][..., None]
    region = image[iy0:iy1, ix0:ix1]
    region *= 1.0 - a
    region += colour[sy, sx] * a
    owner[iy0:iy1, ix0:ix1][mask[sy, sx] >= 128] = owner_id
    return x0, y0, mask


def _lighting(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    height, width = image.shape[:2]
    # The light field is smooth: build it on a coarse grid and upsample (much cheaper than full size).
    gh, gw = max(2, height // 8), max(2, width // 8)
    yy = np.linspace(0.0, 1.0, gh, dtype=np.float32)[:, None]
    xx = np.linspace(0.0, 1.0, gw, dtype=np.float32)[None, :]
    angle = rng.uniform(0, 2 * math.pi)
    light = 1.0 + rng.uniform(-0.35, 0.35) * ((xx - 0.5) * math.cos(angle) + (yy - 0.5) * math.sin(angle)) * 2
    if rng.random() < 0.35:  # spotlight or vignette
        cx, cy = rng.uniform(0, 1, 2)
        radius = rng.uniform(0.3, 0.9)
        falloff = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * radius**2))
        light = light * (1.0 + rng.uniform(-0.4, 0.4) * (falloff - 0.5))
    light = light * rng.uniform(0.7, 1.2)  # exposure
    light = cv2.resize(light.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    cast = rng.uniform(0.88, 1.12, 3).astype(np.float32)  # white-balance error
    image = image * light[..., None]
    image *= cast[None, None, :]
    if rng.random() < 0.5:
        gamma = rng.uniform(0.8, 1.25)
        np.clip(image, 0.0, 255.0, out=image)
        image = cv2.pow(image * np.float32(1.0 / 255.0), gamma) * np.float32(255.0)
    return image


def _image_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height): landscape, portrait and square, from 320x240 up to 1024 on the long side."""
    choice = rng.random()
    if choice < 0.1:
        return (320, 240) if rng.random() < 0.7 else (240, 320)
    if choice < 0.4:
        long_side = 640
    else:
        long_side = int(rng.integers(320, 1025))
    aspect = float(rng.choice([1.0, 4 / 3, 4 / 3, 3 / 2, 16 / 9, 2.0])) * rng.uniform(0.95, 1.05)
    short_side = max(160, int(round(long_side / aspect)))
    return (long_side, short_side) if rng.random() < 0.7 else (short_side, long_side)


def image_seed(seed: int, split: str, index: int) -> np.random.SeedSequence:
    """The seed of one image: a function of (seed, split, index) only, never of worker or order."""
    return np.random.SeedSequence([int(seed), SPLIT_CODE[split], int(index)])


@dataclass
class SynthImage:
    """One generated image: BGR uint8 pixels and its boxes.

    Attributes:
        image: (H, W, 3) uint8, BGR, before JPEG compression.
        boxes: (N, 4) float64 visible-part boxes, x, y, width, height in pixels (COCO ``bbox``).
        classes: (N,) int64 contiguous class indices 0..79.
        areas: (N,) float64 visible pixel counts (COCO ``area``).
        jpeg_quality: JPEG quality to save with (50-95).
    """

    image: np.ndarray
    boxes: np.ndarray
    classes: np.ndarray
    areas: np.ndarray
    jpeg_quality: int


def synthesize(seed: int, split: str, index: int) -> SynthImage:
    """Generate image ``index`` of ``split`` deterministically from ``seed``."""
    rng = np.random.default_rng(image_seed(seed, split, index))
    width, height = _image_size(rng)
    image = _background(rng, height, width)
    owner = np.full((height, width), -1, np.int32)

    max_size = MAX_OBJECT_FRACTION * min(width, height)
    num_objects = int(4 + 22 * rng.random() ** 1.4)  # 4..25, more often few than many
    num_clutter = int(rng.integers(0, 9))
    items: list[_Item] = []
    for _ in range(num_objects):
        class_index = int(rng.integers(0, NUM_CLASSES))
        # Near log-uniform size: about 45% small / 36% medium / 19% large by COCO's area ranges
        # (COCO val2017: 41 / 34 / 24).
        size = math.exp(math.log(MIN_OBJECT_SIZE) + rng.random() ** 0.85 * math.log(max_size / MIN_OBJECT_SIZE))
        items.append(
            _Item(
                class_index,
                SHAPES[class_index // len(COLOURS)],
                size,
                float(rng.uniform(0, width)),
                float(rng.uniform(0, height)),
                _object_colour(rng, class_index % len(COLOURS)),
            )
        )
    for _ in range(num_clutter):
        is_class_shape = rng.random() < 0.4  # class shapes in grey/white/black are clutter too
        shape = str(rng.choice(SHAPES if is_class_shape else CLUTTER_SHAPES))
        size = math.exp(math.log(MIN_OBJECT_SIZE) + rng.random() ** 1.3 * math.log(max_size / MIN_OBJECT_SIZE))
        colour = (
            _hsv_to_bgr(0.0, rng.uniform(0.0, 0.1), rng.uniform(0.05, 1.0))
            if is_class_shape
            else _clutter_colour(rng)
        )
        items.append(_Item(-1, shape, size, float(rng.uniform(0, width)), float(rng.uniform(0, height)), colour))
    # Mostly large first, small later, with enough randomness that small things also get covered.
    keys = np.array([math.log(item.size) for item in items]) + rng.normal(0.0, 0.7, len(items))
    order = np.argsort(-keys, kind="stable")

    painted: list[tuple[int, int, int, np.ndarray]] = []  # (item index, x0, y0, mask)
    for owner_id in order:
        item = items[owner_id]
        result = _paint(image, owner, item, int(owner_id) if item.class_index >= 0 else -2, rng)
        if result is not None and item.class_index >= 0:
            painted.append((int(owner_id), *result))

    boxes, classes, areas = [], [], []
    for owner_id, x0, y0, mask in sorted(painted, key=lambda entry: entry[0]):
        full = int(np.count_nonzero(mask >= 128))
        patch = mask.shape[0]
        ix0, iy0 = max(x0, 0), max(y0, 0)
        ix1, iy1 = min(x0 + patch, width), min(y0 + patch, height)
        visible = owner[iy0:iy1, ix0:ix1] == owner_id
        count = int(np.count_nonzero(visible))
        if full == 0 or count < MIN_VISIBLE_FRACTION * full:
            continue
        cols = np.flatnonzero(visible.any(axis=0))
        rows = np.flatnonzero(visible.any(axis=1))
        bw, bh = int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)
        if bw < MIN_BOX_SIDE or bh < MIN_BOX_SIDE:
            continue
        boxes.append((ix0 + int(cols[0]), iy0 + int(rows[0]), bw, bh))
        classes.append(items[owner_id].class_index)
        areas.append(count)

    image = _lighting(rng, image)
    if rng.random() < 0.4:
        sigma = rng.uniform(1.5, 7.0)
        image = image + rng.standard_normal(image.shape, dtype=np.float32) * sigma
    if rng.random() < 0.1:
        image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.5, 1.2))
    quality = int(rng.integers(50, 96))
    return SynthImage(
        image=np.clip(image + 0.5, 0, 255).astype(np.uint8),
        boxes=np.array(boxes, np.float64).reshape(-1, 4),
        classes=np.array(classes, np.int64),
        areas=np.array(areas, np.float64),
        jpeg_quality=quality,
    )


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    ok, buffer = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buffer.tobytes()


def yolo_label_text(boxes: np.ndarray, classes: np.ndarray, width: int, height: int) -> str:
    """YOLO label file contents: one ``class cx cy w h`` line per box, coordinates normalised to 0..1.

    Args:
        boxes: (N, 4) x, y, width, height in pixels.
        classes: (N,) contiguous class indices.
    """
    lines = []
    for (x, y, w, h), cls in zip(boxes.tolist(), classes.tolist()):
        lines.append(f"{cls} {(x + w / 2) / width:.6f} {(y + h / 2) / height:.6f} {w / width:.6f} {h / height:.6f}")
    return "".join(line + "\n" for line in lines)


def file_name(image_id: int) -> str:
    return f"{image_id:012d}.jpg"


# ----------------------------------------------------------------------------------------------
# Writing a split
# ----------------------------------------------------------------------------------------------


def _init_worker() -> None:
    cv2.setNumThreads(1)  # one process per core; OpenCV's own threads would oversubscribe
    load_backgrounds()


def _write_one(task: tuple[int, str, int, str, str]) -> dict[str, Any]:
    seed, split, index, images_dir, labels_dir = task
    sample = synthesize(seed, split, index)
    image_id = SPLIT_ID_OFFSET[split] + index + 1
    name = file_name(image_id)
    height, width = sample.image.shape[:2]
    with open(os.path.join(images_dir, name), "wb") as f:
        f.write(encode_jpeg(sample.image, sample.jpeg_quality))
    with open(os.path.join(labels_dir, name[:-4] + ".txt"), "w", encoding="utf-8") as f:
        f.write(yolo_label_text(sample.boxes, sample.classes, width, height))
    return {
        "id": image_id,
        "file_name": name,
        "width": width,
        "height": height,
        "boxes": sample.boxes.tolist(),
        "classes": sample.classes.tolist(),
        "areas": sample.areas.tolist(),
    }


def coco_json(records: list[dict[str, Any]], split: str, seed: int) -> dict[str, Any]:
    """Assemble the COCO instances dict; annotation ids are 1..M in image order (0 is not a valid id)."""
    images, annotations = [], []
    for record in records:
        images.append(
            {"id": record["id"], "file_name": record["file_name"], "width": record["width"], "height": record["height"]}
        )
        for box, cls, area in zip(record["boxes"], record["classes"], record["areas"]):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": record["id"],
                    "category_id": COCO80_CATEGORY_IDS[cls],
                    "bbox": [float(v) for v in box],
                    "area": float(area),
                    "iscrowd": 0,
                }
            )
    return {
        "info": {
            "description": f"demo-shapes synthetic detection dataset, {split_dir_name(split)}",
            "version": GENERATOR_VERSION,
            "seed": seed,
        },
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories(),
    }


def split_complete(root: Path, split: str) -> bool:
    return (root / "annotations" / f"instances_{split_dir_name(split)}.json").is_file()


def data_yaml_text() -> str:
    """ultralytics data.yaml for ``<root>/yolo``; no ``path`` key, so the yaml's directory is the root."""
    lines = [
        "# demo-shapes, YOLO view (generated by lowbit.synth). No 'path' key: ultralytics then uses this",
        "# file's directory as the dataset root, so the dataset can be moved.",
        f"train: images/{split_dir_name('train')}",
        f"val: images/{split_dir_name('val')}",
        f"nc: {NUM_CLASSES}",
        "names:",
    ]
    lines += [f"  {i}: {name}" for i, name in enumerate(CLASS_NAMES)]
    lines.append("# COCO 2017 category id of each class index above")
    lines.append("category_ids: [" + ", ".join(str(c) for c in COCO80_CATEGORY_IDS) + "]")
    return "\n".join(lines) + "\n"


def _remove_split(root: Path, split: str) -> None:
    name = split_dir_name(split)
    # The completeness marker goes first, so an interrupted removal never leaves a "complete" split.
    (root / "annotations" / f"instances_{name}.json").unlink(missing_ok=True)
    (root / "yolo" / "labels" / f"{name}.cache").unlink(missing_ok=True)  # ultralytics label cache
    for path in (root / name, root / "yolo" / "images" / name, root / "yolo" / "labels" / name):
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.exists():
            shutil.rmtree(path)


def _generator_versions() -> dict[str, str]:
    """Versions that decide the pixels (resampling, drawing, JPEG encoder, sample photos)."""
    from importlib import metadata

    versions = {"numpy": np.__version__, "opencv": cv2.__version__}
    try:
        versions["scikit-image"] = metadata.version("scikit-image")
    except metadata.PackageNotFoundError:
        pass
    return versions


def _update_info(root: Path, split: str, entry: dict[str, Any]) -> None:
    info_path = root / "dataset_info.json"
    info: dict[str, Any] = {}
    if info_path.is_file():
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            info = {}
    info["generator"] = "lowbit.synth"
    info["generator_version"] = GENERATOR_VERSION
    info["num_classes"] = NUM_CLASSES
    info["category_ids"] = list(COCO80_CATEGORY_IDS)
    info["class_names"] = list(CLASS_NAMES)
    info["backgrounds"] = list(SKIMAGE_BACKGROUNDS)
    info["backgrounds_sha256"] = backgrounds_digest()
    info["versions"] = _generator_versions()
    splits = info.get("splits", {})
    splits[split_dir_name(split)] = entry
    info["splits"] = {key: splits[key] for key in sorted(splits)}
    atomic_write_json(info_path, info)


def _check_split_args(root: Path, split: str, num_images: int, overwrite: bool) -> None:
    if split not in SPLITS:
        raise UserError(f"--splits: unknown split {split!r}; choose from {', '.join(SPLITS)}", flag="--splits")
    if num_images < 1 or num_images >= SPLIT_ID_OFFSET["train"]:
        flag = f"--num-{split}"
        raise UserError(f"{flag} must be in 1..{SPLIT_ID_OFFSET['train'] - 1}, got {num_images}", flag=flag)
    if split_complete(root, split) and not overwrite:
        marker = root / "annotations" / f"instances_{split_dir_name(split)}.json"
        raise UserError(f"{marker} already exists; pass --overwrite to replace it", flag="--overwrite")


def _render_images(tasks: list[tuple], workers: int) -> list[dict[str, Any]]:
    """Write every image and label of ``tasks`` (:func:`_write_one`), in ``workers`` processes; their records in order."""
    if workers == 1:
        _init_worker()
        return [_write_one(task) for task in tasks]
    # spawn, not fork: OpenCV's thread pool, started in this process, deadlocks in forked children.
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_init_worker) as pool:
        return list(pool.imap(_write_one, tasks, chunksize=max(1, min(16, len(tasks) // (workers * 4)))))


def _publish_split(root: Path, split: str, tmp: Path, annotations_tmp: Path, log=None) -> Path:
    """Move a finished split from ``tmp`` into place, annotation file last (the completeness marker); its path."""
    name = split_dir_name(split)
    if (split_complete(root, split) or (root / name).exists()) and log:
        log.info("replacing existing %s under %s", name, root)
    _remove_split(root, split)
    for folder in (root / "yolo" / "images", root / "yolo" / "labels", root / "annotations"):
        folder.mkdir(parents=True, exist_ok=True)
    (tmp / "images").rename(root / name)
    (tmp / "labels").rename(root / "yolo" / "labels" / name)
    (tmp / "links").rename(root / "yolo" / "images" / name)
    atomic_write_text(root / "yolo" / "data.yaml", data_yaml_text())
    annotations_path = root / "annotations" / f"instances_{name}.json"
    annotations_tmp.rename(annotations_path)
    return annotations_path


def generate_split(
    root: Path,
    split: str,
    num_images: int,
    seed: int = 0,
    workers: int | None = None,
    overwrite: bool = False,
    log=None,
) -> dict[str, Any]:
    """Generate one split into ``root``; see the module docstring for the layout.

    The split is built in a hidden temporary directory under ``root`` and moved into place at the end,
    annotation file last, so a half-written split never looks complete.

    Returns:
        The split's ``dataset_info.json`` entry (counts, seed, annotation sha256, wall time).

    Raises:
        UserError: the split already exists and ``overwrite`` is False (flag ``--overwrite``), or
            arguments are out of range (``--splits``, ``--num-val``/``--num-train``).
    """
    import time

    root = Path(root)
    _check_split_args(root, split, num_images, overwrite)
    name = split_dir_name(split)
    workers = max(1, int(workers or os.cpu_count() or 1))

    root.mkdir(parents=True, exist_ok=True)
    load_backgrounds()  # fail early, before any worker starts
    start = time.perf_counter()
    tmp = root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    images_dir, labels_dir, links_dir = tmp / "images", tmp / "labels", tmp / "links"
    for path in (images_dir, labels_dir, links_dir):
        path.mkdir(parents=True)
    try:
        records = _render_images(
            [(seed, split, index, str(images_dir), str(labels_dir)) for index in range(num_images)], workers
        )
        coco = coco_json(records, split, seed)
        annotations_tmp = tmp / "instances.json"
        annotations_tmp.write_text(json.dumps(coco, separators=(",", ":")), encoding="utf-8")
        for record in records:  # relative links: the dataset can be moved or copied with its links
            (links_dir / record["file_name"]).symlink_to(Path("..", "..", "..", name, record["file_name"]))
        annotations_path = _publish_split(root, split, tmp, annotations_tmp, log)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)

    entry = {
        "seed": seed,
        "num_images": len(coco["images"]),
        "num_annotations": len(coco["annotations"]),
        "first_image_id": coco["images"][0]["id"],
        "annotations_sha256": sha256_file(annotations_path),
    }
    _update_info(root, split, entry)
    entry["wall_s"] = round(time.perf_counter() - start, 2)
    entry["workers"] = workers
    return entry
