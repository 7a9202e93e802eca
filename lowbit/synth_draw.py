"""Draw one demo-shapes image and its boxes, a pure function of ``(seed, split, index)``.

Eighty classes, one per (shape, colour) pair, carry COCO 2017's 80 category ids, so everything that maps
class index -> category id runs exactly as on real COCO. Images are built to make detection non-trivial:
real-photograph and procedural backgrounds (:mod:`lowbit.synth_backgrounds`), 4-25 objects from 8 px to most
of the frame, occlusion, truncation at the border, clutter that belongs to no class, lighting and colour casts,
blur, noise, and JPEG quality 50-95. Every random draw comes from the image's own seed
(:func:`image_seed`), never from a worker or the order of work; :mod:`lowbit.synth` writes the images as a
dataset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from lowbit.synth_backgrounds import background, hsv_to_bgr, smooth_noise

__all__ = [
    "CLASS_NAMES",
    "CLUTTER_SHAPES",
    "COCO80_CATEGORY_IDS",
    "COLOURS",
    "MAX_OBJECT_FRACTION",
    "MIN_BOX_SIDE",
    "MIN_OBJECT_SIZE",
    "MIN_VISIBLE_FRACTION",
    "NUM_CLASSES",
    "SHAPES",
    "SPLIT_CODE",
    "SynthImage",
    "image_seed",
    "render_mask",
    "synthesize",
]

# COCO 2017's 80 category ids: 1..90 without the ten ids it reserves but never uses, sorted.
_COCO_UNUSED_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)
COCO80_CATEGORY_IDS = tuple(cat_id for cat_id in range(1, 91) if cat_id not in _COCO_UNUSED_IDS)

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

SPLIT_CODE = {"val": 0, "train": 1}  # mixed into each image's seed (lowbit.synth.SPLITS are its keys)

MIN_VISIBLE_FRACTION = 0.3  # objects less visible than this (occluded or outside the frame) are not annotated
MIN_BOX_SIDE = 3  # pixels; smaller visible boxes are not annotated
MIN_OBJECT_SIZE = 8.0  # pixels, object diameter
MAX_OBJECT_FRACTION = 0.8  # of the shorter image side


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
    patch = math.ceil(size * 1.1) + 4  # room for corners that reach ~1.04 x the radius
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
    return hsv_to_bgr(hue, rng.uniform(0.5, 1.0), rng.uniform(0.5, 1.0))


def _clutter_colour(rng: np.random.Generator) -> np.ndarray:
    if rng.random() < 0.6:  # achromatic: grey, white, black — never a class colour
        return hsv_to_bgr(0.0, rng.uniform(0.0, 0.1), rng.uniform(0.05, 1.0))
    return hsv_to_bgr(rng.uniform(0, 360), rng.uniform(0.2, 1.0), rng.uniform(0.3, 1.0))


def _paint(
    image: np.ndarray, owner: np.ndarray, item: _Item, owner_id: int, rng: np.random.Generator
) -> tuple[int, int, np.ndarray] | None:
    """Composite one item into ``image`` (float32 HxWx3) and mark its solid pixels in ``owner``.

    Returns:
        (x0, y0, mask) of the unclipped patch, or None when the patch misses the image entirely.
    """
    mask = render_mask(item.shape, item.size, rng)
    patch = mask.shape[0]
    x0 = round(item.cx - patch / 2)
    y0 = round(item.cy - patch / 2)
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
        shade = shade * (1.0 + (smooth_noise(rng, patch, patch, int(rng.integers(3, 10)), 1)[..., 0] - 0.5) * 0.3)
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
    short_side = max(160, round(long_side / aspect))
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


def _place_items(rng: np.random.Generator, width: int, height: int) -> list[_Item]:
    """The objects (4..25) then the clutter (0..8) of one image, with sizes, centres and colours."""
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
            hsv_to_bgr(0.0, rng.uniform(0.0, 0.1), rng.uniform(0.05, 1.0)) if is_class_shape else _clutter_colour(rng)
        )
        items.append(_Item(-1, shape, size, float(rng.uniform(0, width)), float(rng.uniform(0, height)), colour))
    return items


def _visible_boxes(
    painted: list[tuple[int, int, int, np.ndarray]], owner: np.ndarray, items: list[_Item]
) -> tuple[list, list, list]:
    """``(boxes, classes, areas)`` of the painted objects that stay visible enough, in item order.

    Args:
        painted: ``(item index, x0, y0, mask)`` of each class object drawn, ``mask`` its unclipped patch.
        owner: int32 ``(H, W)``, the index of the item that owns each pixel (-1 background, -2 clutter).
        items: every item, indexed by ``painted``'s first column.
    """
    height, width = owner.shape
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
    return boxes, classes, areas


def synthesize(seed: int, split: str, index: int) -> SynthImage:
    """Generate image ``index`` of ``split`` deterministically from ``seed``."""
    rng = np.random.default_rng(image_seed(seed, split, index))
    width, height = _image_size(rng)
    image = background(rng, height, width)
    owner = np.full((height, width), -1, np.int32)
    items = _place_items(rng, width, height)
    # Mostly large first, small later, with enough randomness that small things also get covered.
    keys = np.array([math.log(item.size) for item in items]) + rng.normal(0.0, 0.7, len(items))
    order = np.argsort(-keys, kind="stable")

    painted: list[tuple[int, int, int, np.ndarray]] = []  # (item index, x0, y0, mask)
    for owner_id in order:
        item = items[owner_id]
        result = _paint(image, owner, item, int(owner_id) if item.class_index >= 0 else -2, rng)
        if result is not None and item.class_index >= 0:
            painted.append((int(owner_id), *result))
    boxes, classes, areas = _visible_boxes(painted, owner, items)

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
