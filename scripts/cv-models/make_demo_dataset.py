"""Generate the deterministic demo-shapes detection dataset in COCO 2017 layout (plus a YOLO view).

Example (the val split of the demo model: ids 1..500 are the search slice, 501..600 the calibration images
of datasets/quantize-calib/demo_shapes_calib100.txt, 601..1100 the confirmation slice the search never sees;
about 85 CPU-seconds):

    python scripts/cv-models/make_demo_dataset.py --splits val

Training data for scripts/cv-models/train_demo_detector.py (the shipped demo model was trained with this):

    python scripts/cv-models/make_demo_dataset.py --splits train val --num-train 4000 --num-val 600

Writes under --out-root: <split>2017/*.jpg, annotations/instances_<split>2017.json, yolo/images/<split>2017/
(symlinks to the jpgs), yolo/labels/<split>2017/*.txt, yolo/data.yaml and dataset_info.json. A split is
complete once its annotation file exists; an existing complete split is replaced only with --overwrite.
The same arguments give byte-identical files for any --workers.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from lowbit.cli import cli_entry, int_range, make_parser, non_negative_int, positive_int
from lowbit.errors import UserError
from lowbit.logs import get_logger, setup_logging

# Image ids are split-offset (train from 1000001), so a split holds fewer than a million images.
SPLIT_SIZE = int_range(1, 999_999)


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(__doc__)
    parser.add_argument("--out-root", type=Path, default=Path("datasets/demo-shapes"), help="dataset root directory")
    parser.add_argument("--splits", nargs="+", choices=("val", "train"), default=["val"], help="splits to generate")
    parser.add_argument(
        "--num-val",
        type=SPLIT_SIZE,
        default=1100,
        help="images in val2017 (ids 1..N; 1..500 search, 501..600 calibration, 601..1100 confirmation)",
    )
    parser.add_argument("--num-train", type=SPLIT_SIZE, default=4000, help="images in train2017 (ids from 1000001)")
    parser.add_argument(
        "--seed", type=non_negative_int, default=0, help="dataset seed; each image's seed is (seed, split, index)"
    )
    parser.add_argument(
        "--workers",
        type=positive_int,
        default=os.cpu_count() or 1,
        help="worker processes (output does not depend on it)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace splits that already exist")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    return parser


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(verbose=args.verbose)
    log = get_logger("make_demo_dataset")

    splits = list(dict.fromkeys(args.splits))  # keep order, drop repeats
    counts = {"val": args.num_val, "train": args.num_train}

    # lazy: importing the generator pulls in OpenCV; --help and argument errors should not wait for it
    from lowbit import synth

    root = args.out_root
    if root.exists() and not root.is_dir():
        raise UserError(f"--out-root: {root} exists and is not a directory", flag="--out-root")
    for split in splits:  # check every split before generating any, so a refusal leaves nothing half done
        if synth.split_complete(root, split) and not args.overwrite:
            name = synth.split_dir_name(split)
            raise UserError(
                f"{root / 'annotations' / f'instances_{name}.json'} already exists; pass --overwrite to replace it",
                flag="--overwrite",
            )

    summary = []
    for split in splits:
        log.info("generating %s: %d images, seed %d, %d workers", split, counts[split], args.seed, args.workers)
        t0 = time.perf_counter()
        entry = synth.generate_split(
            root, split, counts[split], seed=args.seed, workers=args.workers, overwrite=args.overwrite, log=log
        )
        seconds = time.perf_counter() - t0
        log.info("%s: %d images, %d boxes in %.1f s", split, entry["num_images"], entry["num_annotations"], seconds)
        summary.append((split, entry, seconds))

    for split, entry, seconds in summary:
        name = synth.split_dir_name(split)
        print(
            f"{name}: {entry['num_images']} images, {entry['num_annotations']} boxes, {seconds:.1f} s -> "
            f"{root / name}, {root / 'annotations' / f'instances_{name}.json'}"
        )
    print(f"ultralytics data file: {root / 'yolo' / 'data.yaml'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
