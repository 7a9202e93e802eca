"""Write the deterministic demo-shapes detection dataset in COCO 2017 layout, plus a YOLO view.

Every image is a pure function of ``(seed, split, index)`` (:func:`lowbit.synth_draw.synthesize`), so the
output is the same for any number of worker processes. Layout written by :func:`generate_split`::

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

import json
import multiprocessing
import os
import shutil
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from lowbit.errors import UserError
from lowbit.runs import atomic_write_json, atomic_write_text, sha256_file
from lowbit.synth_backgrounds import SKIMAGE_BACKGROUNDS, backgrounds_digest, load_backgrounds
from lowbit.synth_draw import CLASS_NAMES, COCO80_CATEGORY_IDS, COLOURS, NUM_CLASSES, SHAPES, synthesize

__all__ = [
    "GENERATOR_VERSION",
    "SPLITS",
    "SPLIT_ID_OFFSET",
    "categories",
    "coco_json",
    "data_yaml_text",
    "encode_jpeg",
    "file_name",
    "generate_split",
    "split_complete",
    "split_dir_name",
    "yolo_label_text",
]


# Bump whenever the pixels or annotations produced for a given (seed, split, index) change.
GENERATOR_VERSION = "1"

SPLITS = ("val", "train")
# Image ids: val 1..N, train from TRAIN_ID_OFFSET + 1, disjoint as long as N < TRAIN_ID_OFFSET.
SPLIT_ID_OFFSET = {"val": 0, "train": 1_000_000}


def split_dir_name(split: str) -> str:
    """``val`` -> ``val2017`` (COCO 2017 directory and annotation-file naming)."""
    return f"{split}2017"


def categories() -> list[dict[str, Any]]:
    """COCO ``categories`` list: id (COCO 2017 id), name ("red circle"), supercategory (the shape)."""
    return [
        {"id": cat_id, "name": CLASS_NAMES[i], "supercategory": SHAPES[i // len(COLOURS)]}
        for i, cat_id in enumerate(COCO80_CATEGORY_IDS)
    ]


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """JPEG bytes of a BGR uint8 image at ``quality`` (OpenCV's encoder, which decides the bytes written)."""
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
    """COCO 2017 file name of an image id: twelve digits, ``.jpg``."""
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
    """Whether ``split`` exists complete under ``root``: its annotation file, written last, is there."""
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
    """Write every image and label of ``tasks`` (:func:`_write_one`) in ``workers`` processes; records in order."""
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
