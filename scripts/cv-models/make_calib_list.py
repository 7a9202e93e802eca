"""Write a calibration image list from a COCO-layout dataset, disjoint from the evaluation slice.

The evaluator's ``--max-images N`` evaluates the first N image ids in ascending order; calibrating
on those images would inflate the accuracy it measures. This tool skips those N ids, then takes
``--num`` of the remaining images with a seeded sample (sorted, so the list is deterministic),
and writes their paths (repo-relative when inside the repo), one per line.

Example (the list committed for the demo dataset)::

    python scripts/cv-models/make_calib_list.py --data-root datasets/demo-shapes \
        --eval-max-images 500 --num 100 --out datasets/quantize-calib/demo_shapes_calib100.txt
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from lowbit.cli import add_coco_paths, cli_entry, make_parser, non_negative_int, positive_int
from lowbit.errors import UserError
from lowbit.runs import REPO_ROOT, atomic_write_text, check_input_file, check_output_path


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(__doc__)
    add_coco_paths(parser)
    parser.add_argument(
        "--eval-max-images",
        type=non_negative_int,
        required=True,
        help="size of the evaluator's slice (first N ids) to stay clear of",
    )
    parser.add_argument("--num", type=positive_int, default=100, help="images in the list")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="sampling seed")
    parser.add_argument("--out", type=Path, required=True, help="list file to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return parser


def select_calibration_ids(image_ids: list[int], eval_max_images: int, num: int, seed: int) -> list[int]:
    """Sorted ids: ``num`` of the ids after the first ``eval_max_images`` (ascending), sampled with ``seed``."""
    pool = sorted(image_ids)[eval_max_images:]
    if len(pool) < num:
        raise UserError(
            f"--num {num}: only {len(pool)} images remain after the first {eval_max_images} (the evaluation slice)",
            flag="--num",
        )
    picked = np.random.default_rng(seed).choice(len(pool), size=num, replace=False)
    return sorted(pool[i] for i in picked)


def _display_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path.resolve())


def read_image_names(ann_file: Path) -> dict[int, str]:
    """``{image id: file_name}`` of a COCO annotations file; UserError(--ann-file) when it is malformed."""
    try:
        images = json.loads(ann_file.read_text(encoding="utf-8"))["images"]
        names = {int(img["id"]): str(img["file_name"]) for img in images}
    except UnicodeDecodeError as exc:
        raise UserError(f"--ann-file: {ann_file} is not a text (JSON) file", flag="--ann-file") from exc
    except ValueError as exc:
        raise UserError(f"--ann-file: {ann_file} is not valid JSON ({exc})", flag="--ann-file") from exc
    except (KeyError, TypeError) as exc:
        raise UserError(
            f"--ann-file: {ann_file} is not COCO instances JSON: needs 'images' entries with 'id' and 'file_name' "
            f"(missing {exc})",
            flag="--ann-file",
        ) from exc
    if len(names) != len(images):
        raise UserError(f"--ann-file: {ann_file} repeats image ids", flag="--ann-file")
    return names


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    images_dir = args.images_dir or args.data_root / "val2017"
    ann_file = check_input_file(
        args.ann_file or args.data_root / "annotations" / "instances_val2017.json", "--ann-file"
    )
    check_output_path(args.out, "--out", args.overwrite)
    images = read_image_names(ann_file)
    ids = select_calibration_ids(list(images), args.eval_max_images, args.num, args.seed)
    paths = [images_dir / images[i] for i in ids]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise UserError(
            f"--images-dir: {len(missing)} selected image(s) not found, e.g. {missing[0]}", flag="--images-dir"
        )
    header = (
        f"# {args.num} calibration images from {_display_path(ann_file)}: ids after the first "
        f"{args.eval_max_images} (the evaluation slice), seed {args.seed}\n"
    )
    atomic_write_text(args.out, header + "".join(f"{_display_path(p)}\n" for p in paths))
    print(f"wrote {args.out}: {len(paths)} images, ids {ids[0]}..{ids[-1]}, none in the first {args.eval_max_images}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
