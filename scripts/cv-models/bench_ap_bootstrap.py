"""Cost of the paired ΔAP bootstrap (lowbit.ap_bootstrap) against one COCO evaluation of the same detections.

Example (the demo's FP32 and INT8 evaluations, each folder holding metrics.json and detections.json):

    python scripts/cv-models/bench_ap_bootstrap.py \
      --ann-file datasets/demo-shapes/annotations/instances_val2017.json \
      --reference tmp/yolov10m_lowbit/demo/baseline-coco --variant tmp/yolov10m_lowbit/demo/int8-coco

Prints, from one run on the images of the reference's metrics.json: the seconds of one
``evaluate_bbox`` of the reference detections, of matching both models, of the replicates, the
ratio (matching + replicates) / evaluation, and the paired ΔAP with its interval next to the
difference of the two metrics.json ``map50_95`` (×100), which the point estimate must equal.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from lowbit import ap_bootstrap
from lowbit.cli import cli_entry, existing_file, int_range, make_parser, non_negative_int, unit_interval
from lowbit.coco_eval import evaluate_bbox, load_coco
from lowbit.errors import UserError


def build_parser():
    parser = make_parser(__doc__)
    parser.add_argument("--ann-file", type=existing_file, required=True, help="instances json the runs scored")
    parser.add_argument("--reference", type=Path, required=True, help="reference evaluation folder (FP32)")
    parser.add_argument("--variant", type=Path, required=True, help="variant evaluation folder (INT8/FP8)")
    parser.add_argument("--n-boot", type=int_range(2, 1_000_000), default=1000, help="bootstrap replicates")
    parser.add_argument("--confidence", type=unit_interval, default=0.95, help="two-sided interval level")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="numpy default_rng seed")
    return parser


def read_evaluation(folder: Path, flag: str) -> tuple[dict, list[dict]]:
    """(metrics.json, detections.json) of an evaluation folder; UserError(flag) when one is missing."""
    paths = [folder / "metrics.json", folder / "detections.json"]
    for path in paths:
        if not path.is_file():
            raise UserError(f"{flag}: {path} does not exist (expected an evaluation folder)", flag=flag)
    return tuple(json.loads(path.read_text(encoding="utf-8")) for path in paths)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0.0 < args.confidence < 1.0:
        raise UserError(f"--confidence must be strictly between 0 and 1, got {args.confidence}", flag="--confidence")
    ref_metrics, ref_records = read_evaluation(args.reference, "--reference")
    var_metrics, var_records = read_evaluation(args.variant, "--variant")
    image_ids = ref_metrics["dataset"]["image_ids"]
    if var_metrics["dataset"]["image_ids"] != image_ids:
        raise UserError("--variant was evaluated on other images than --reference", flag="--variant")
    gt = load_coco(args.ann_file)

    start = time.perf_counter()
    evaluate_bbox(gt, ref_records, image_ids)
    eval_s = time.perf_counter() - start
    start = time.perf_counter()
    ref = ap_bootstrap.match_images(gt, ref_records, image_ids)
    var = ap_bootstrap.match_images(gt, var_records, image_ids)
    match_s = time.perf_counter() - start
    start = time.perf_counter()
    delta = ap_bootstrap.paired_delta_ci_from_matches(ref, var, args.n_boot, args.confidence, args.seed)
    boot_s = time.perf_counter() - start

    expected = (var_metrics["metrics"]["map50_95"] - ref_metrics["metrics"]["map50_95"]) * 100.0
    print(f"images {delta.n_images}  replicates {delta.n_boot}  seed {delta.seed}")
    print(f"one evaluate_bbox (reference): {eval_s:.3f} s")
    print(f"matching both models: {match_s:.3f} s  replicates (both models): {boot_s:.3f} s")
    print(f"cost ratio (matching + replicates) / evaluate_bbox: {(match_s + boot_s) / eval_s:.1f}x")
    print(
        f"dAP {delta.delta_ap:+.4f} pts  {delta.confidence:.0%} CI [{delta.ci_low:+.4f}, {delta.ci_high:+.4f}]  "
        f"SE {delta.std_error:.4f}  (metrics.json difference {expected:+.4f}, equal: {delta.delta_ap == expected})"
    )
    return 0 if delta.delta_ap == expected else 1


if __name__ == "__main__":
    raise SystemExit(main())
