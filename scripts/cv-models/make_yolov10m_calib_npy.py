"""Build the calibration tensor (float32 NCHW .npy) from an image list, with the evaluator's preprocessing.

Each image goes through ``lowbit.preprocess`` -- the same letterbox the COCO evaluator uses -- and
is streamed into a memory-mapped .npy, so memory stays flat however many images the list has.
A sidecar ``<out>.json`` records the list's sha256, the resolved image paths, N, the shape and
per-channel mean/std. Any missing or unreadable image is reported together with all the others in
one error, and nothing is written.

Example::

    python scripts/cv-models/make_yolov10m_calib_npy.py \
        --list datasets/quantize-calib/quant100.txt \
        --out tmp/yolov10m_lowbit/run/calib/calib_yolov10m_640.npy --imgsz 640
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from lowbit.calib import read_image_list
from lowbit.cli import cli_entry, existing_file, imgsz, make_parser, positive_int
from lowbit.errors import UserError
from lowbit.logs import setup_logging
from lowbit.preprocess import iter_prepared
from lowbit.runs import atomic_write_json, check_output_path, manifest_run, sha256_file


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(__doc__)
    parser.add_argument(
        "--list",
        type=existing_file,
        required=True,
        help="text file, one image path per line ('#' at a line start or after a space begins a comment); "
        "relative paths resolve against the repo root, then the list's folder",
    )
    parser.add_argument("--out", type=Path, required=True, help="output .npy, float32 [N,3,imgsz,imgsz]")
    parser.add_argument("--imgsz", type=imgsz, default=640, help="square model input side in pixels (multiple of 32)")
    parser.add_argument("--max-images", type=positive_int, default=None, help="use only the first N listed images")
    parser.add_argument(
        "--workers", type=positive_int, default=min(4, os.cpu_count() or 1), help="image decode threads"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return parser


def write_tensor(entries: list[tuple[str, Path]], out: Path, imgsz: int, workers: int) -> tuple[np.ndarray, np.ndarray]:
    """Stream the preprocessed images into ``out`` (renamed into place only when all were read).

    Returns:
        Per-channel sum and sum of squares over all pixels (float64, shape [3]).

    Raises:
        UserError(--list): every image that could not be decoded, in one message.
    """
    from tqdm import tqdm

    shape = (len(entries), 3, imgsz, imgsz)
    tmp = out.with_name(f".{out.name}.partial.npy")
    channel_sum = np.zeros(3, np.float64)
    channel_sq = np.zeros(3, np.float64)
    unreadable: list[str] = []
    try:
        data = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
        items = [(i, path) for i, (_, path) in enumerate(entries)]
        for prepared in tqdm(
            iter_prepared(items, imgsz, workers=workers), total=len(entries), desc="calib", unit="img"
        ):
            if prepared.error is not None:
                unreadable.append(f"{prepared.path} ({prepared.error.reason})")
                continue
            data[prepared.key] = prepared.chw
            channel_sum += prepared.chw.sum(axis=(1, 2), dtype=np.float64)
            channel_sq += np.square(prepared.chw, dtype=np.float64).sum(axis=(1, 2))
        if unreadable:
            raise UserError(
                f"--list: {len(unreadable)} image(s) could not be read: {'; '.join(unreadable)}", flag="--list"
            )
        data.flush()
        del data
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return channel_sum, channel_sq


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    list_path: Path = args.list
    out: Path = check_output_path(args.out, "--out", args.overwrite, suffix=".npy")
    entries = [(entry.text, entry.path) for entry in read_image_list(list_path, "--list", args.max_images)]

    out.parent.mkdir(parents=True, exist_ok=True)
    sidecar = out.with_suffix(".json")
    logger = setup_logging(out.with_suffix(".log"))
    n = len(entries)
    shape = (n, 3, args.imgsz, args.imgsz)
    logger.info("calibration tensor %s from %d images of %s", list(shape), n, list_path)

    with manifest_run(
        out.with_suffix(".manifest.json"), "make_yolov10m_calib_npy.py", vars(args), argv, kind="calib"
    ) as manifest:
        list_sha = manifest.add_input(list_path)
        channel_sum, channel_sq = write_tensor(entries, out, args.imgsz, args.workers)
        count = n * args.imgsz * args.imgsz
        mean = channel_sum / count
        std = np.sqrt(np.maximum(channel_sq / count - mean**2, 0.0))
        info = {
            "list": str(list_path),
            "list_sha256": list_sha,
            "images": [str(path) for _, path in entries],
            "num_images": n,
            "shape": list(shape),
            "dtype": "float32",
            "layout": "NCHW, RGB, /255, letterboxed (pad 114) by lowbit.preprocess",
            "imgsz": args.imgsz,
            "channel_mean": [round(float(v), 6) for v in mean],
            "channel_std": [round(float(v), 6) for v in std],
            "npy_sha256": sha256_file(out),
        }
        atomic_write_json(sidecar, info)
        manifest.add_output("calib", out)
        manifest.add_output("sidecar", sidecar)
        manifest.update(num_images=n, shape=list(shape))
    print(f"calibration tensor: {out} {list(shape)} float32; channel mean {info['channel_mean']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
