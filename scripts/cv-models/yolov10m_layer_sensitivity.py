"""Per-layer FP8/INT8 sensitivity of an ultralytics YOLOv10 (ModelOpt torch, one layer at a time).

Quantizes the Conv+BN-fused model with ModelOpt (calibrated on the images), then switches on one
layer's quantizers at a time and scores how far the raw one-to-one head output drifts from FP32
(see ``lowbit/sensitivity_torch.py`` for the method and ``lowbit/drift.py`` for the score). Writes,
inside a new run dir::

    <output-root>/<run-id>/manifest.json, layer_sensitivity.log
    <output-root>/<run-id>/outputs/<model>/<format>/per_layer/layer-sensitivity-report.{json,csv,md}

``<model>`` is the weights' file stem: ``yolov10m`` for the card's ``models/yolo10/yolov10m.pt``.

The report feeds ``make_yolov10m_candidate_schemes.py --report-json``. Runs on CUDA when available.
The work is ``lowbit.sensitivity_torch_run.run_torch_sweep``.

Example (the demo detector and its calibration list, the defaults)::

    python scripts/cv-models/yolov10m_layer_sensitivity.py --num-images 32 --formats fp8-fp8
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lowbit.cli import cli_entry, imgsz, make_parser, non_negative_int, positive_int
from lowbit.drift import METRICS
from lowbit.sensitivity_torch_inputs import DEFAULT_IMAGE_LIST, DEMO_WEIGHTS, QUANT_FORMATS, YOLOV10M_WEIGHTS
from lowbit.sensitivity_torch_run import DEFAULT_OUTPUT_ROOT, SweepRun, SweepSettings, run_torch_sweep


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(__doc__)
    parser.add_argument(
        "--weights",
        type=Path,
        default=None,
        help=f"ultralytics YOLOv10 .pt, or a .yaml architecture such as yolov10m.yaml (random weights: timing only); "
        f"unset: {YOLOV10M_WEIGHTS} if linked, else the demo detector {DEMO_WEIGHTS}",
    )
    data = parser.add_mutually_exclusive_group()
    data.add_argument(
        "--images",
        type=Path,
        default=DEFAULT_IMAGE_LIST,
        help="image list, one path per line relative to the repo root",
    )
    data.add_argument(
        "--calib-npy",
        type=Path,
        default=None,
        help="calibration tensor from make_yolov10m_calib_npy.py (float32 [N,3,imgsz,imgsz]) instead of --images",
    )
    parser.add_argument(
        "--num-images",
        type=positive_int,
        default=32,
        help="images used to calibrate and to score (the first N); the FP32 activations of every block are kept "
        "for all of them (~110 MB per 640 px image for yolov10m)",
    )
    parser.add_argument("--imgsz", type=imgsz, default=640, help="square input side in pixels (multiple of 32)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="images per forward pass")
    parser.add_argument("--device", default="auto", help="auto (cuda:0 if available, else cpu) | cpu | cuda | cuda:N")
    parser.add_argument(
        "--formats",
        nargs="+",
        choices=sorted(QUANT_FORMATS),
        default=["fp8-fp8"],
        help="weights-activations formats to simulate; one report each",
    )
    parser.add_argument(
        "--metric",
        choices=sorted(METRICS),
        default="det_kl",
        help="score: det_kl (class-probability KL + confidence-weighted box KL, nats/image) | "
        "rel_mse (relative MSE of the raw output)",
    )
    parser.add_argument(
        "--output-root",
        "--run-root",
        dest="output_root",
        type=Path,
        default=DEFAULT_OUTPUT_ROOT,
        help="run directories are created under this folder",
    )
    parser.add_argument("--run-id", default=None, help="run directory name; unset: a new timestamped directory")
    parser.add_argument(
        "--seed", type=non_negative_int, default=0, help="seed of the random weights of a .yaml architecture"
    )
    parser.add_argument("--overwrite", action="store_true", help="reuse an existing --run-id directory")
    parser.add_argument("--verbose", action="store_true", help="debug logging on the console (per-layer scores)")
    return parser


@cli_entry
def main(argv: list[str] | None = None) -> int:
    t_start = time.perf_counter()
    args = build_parser().parse_args(argv)
    run = run_torch_sweep(SweepSettings(**vars(args)), argv, t_start=t_start)
    _print_summary(run)
    return 0


def _print_summary(run: SweepRun) -> None:
    try:
        shown = run.run_dir.relative_to(Path.cwd())
    except ValueError:
        shown = run.run_dir
    for result in run.results:
        report = result["report"]
        score = report["method"]["score"]
        print(
            f"{report['quant_format']}: {len(report['layers'])} layers scored by {score} in {report['wall_s']:.1f} s "
            f"on {report['device']}; every layer quantized: {report['reference']['all_layers_quantized']:.4g}"
        )
        for row in report["layers"][:5]:
            print(f"  {row['rank']:>3}  {row['score']:<12.4g} {row['name']} ({row['op_type']})")
        print(f"  report: {result['paths']['json']}")
    print(f"SENS_RUN={shown}")


if __name__ == "__main__":
    raise SystemExit(main())
