"""Per-layer FP8/INT8 sensitivity of an ultralytics YOLOv10 (ModelOpt torch, one layer at a time).

Quantizes the Conv+BN-fused model with ModelOpt (calibrated on the images), then switches on one
layer's quantizers at a time and scores how far the raw one-to-one head output drifts from FP32
(see ``lowbit/sensitivity_torch.py`` for the method and the score). Writes, inside a new run dir::

    <output-root>/<run-id>/manifest.json, layer_sensitivity.log
    <output-root>/<run-id>/outputs/<model>/<format>/per_layer/layer-sensitivity-report.{json,csv,md}

``<model>`` is the weights' file stem: ``yolov10m`` for the card's ``models/yolo10/yolov10m.pt``.

The report feeds ``make_yolov10m_candidate_schemes.py --report-json``. Runs on CUDA when available.

Example (the demo detector and its calibration list, the defaults)::

    python scripts/cv-models/yolov10m_layer_sensitivity.py --num-images 32 --formats fp8-fp8
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from lowbit import sensitivity_torch as sens
from lowbit.calib import load_calib_tensor
from lowbit.cli import cli_entry, imgsz, non_negative_int, positive_int
from lowbit.errors import UserError
from lowbit.logs import get_logger, setup_logging
from lowbit.runs import check_input_file, manifest_run, new_run_dir, resolve_repo_path, timestamp

SCRIPT = "scripts/cv-models/yolov10m_layer_sensitivity.py"
DEFAULT_OUTPUT_ROOT = Path("tmp/yolov10m_layer_sensitivity")
LOG_NAME = "layer_sensitivity.log"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--weights",
        type=Path,
        default=None,
        help=f"ultralytics YOLOv10 .pt, or a .yaml architecture such as yolov10m.yaml (random weights: timing only); "
        f"unset: {sens.YOLOV10M_WEIGHTS} if linked, else the demo detector {sens.DEMO_WEIGHTS}",
    )
    data = parser.add_mutually_exclusive_group()
    data.add_argument(
        "--images",
        type=Path,
        default=sens.DEFAULT_IMAGE_LIST,
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
        choices=sorted(sens.QUANT_FORMATS),
        default=["fp8-fp8"],
        help="weights-activations formats to simulate; one report each",
    )
    parser.add_argument(
        "--metric",
        choices=sorted(sens.METRICS),
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
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the random weights of a .yaml architecture")
    parser.add_argument("--overwrite", action="store_true", help="reuse an existing --run-id directory")
    parser.add_argument("--verbose", action="store_true", help="debug logging on the console (per-layer scores)")
    return parser


def _validate(args: argparse.Namespace) -> dict:
    """Cheap checks and image loading, before any run dir exists (torch is imported only to find a .yaml)."""
    if args.run_id is not None and (not args.run_id or "/" in args.run_id or args.run_id in (".", "..")):
        raise UserError(f"--run-id must be a plain directory name, got {args.run_id!r}", flag="--run-id")

    output_root = args.output_root if args.output_root.is_absolute() else Path.cwd() / args.output_root
    if args.run_id is not None:
        run_dir = output_root / args.run_id
        if run_dir.exists() and not args.overwrite:
            raise UserError(
                f"{run_dir} already exists; pass --overwrite to reuse it, or another --run-id", flag="--overwrite"
            )
    else:
        run_dir = None

    weights = sens.resolve_weights(None if args.weights is None else resolve_repo_path(args.weights))
    if weights.suffix.lower() in (".yaml", ".yml"):
        from lowbit.export import resolve_yaml  # may import ultralytics to find a shipped architecture

        weights = resolve_yaml(weights)
    else:
        check_input_file(weights, "--weights")

    if args.calib_npy is not None:
        data_path = resolve_repo_path(args.calib_npy)
        images = load_calib_tensor(data_path, "--calib-npy", imgsz=args.imgsz, max_images=args.num_images)
        image_files = None
    else:
        data_path = resolve_repo_path(args.images)
        if args.images == sens.DEFAULT_IMAGE_LIST and not (data_path.exists() or data_path.is_symlink()):
            raise UserError(
                f"--images: the default image list {sens.DEFAULT_IMAGE_LIST} does not exist; pass --images LIST "
                "(one image path per line) or --calib-npy FILE",
                flag="--images",
            )
        images, image_files = sens.load_images_from_list(data_path, args.num_images, args.imgsz)
    if images.shape[0] < args.num_images:
        get_logger("layer_sensitivity").warning(
            "%s holds %d images, fewer than --num-images %d: using all", data_path, images.shape[0], args.num_images
        )

    return {"weights": weights, "data_path": data_path, "images": images, "image_files": image_files,
            "output_root": output_root, "run_dir": run_dir}  # fmt: skip


@cli_entry
def main(argv: list[str] | None = None) -> int:
    t_start = time.perf_counter()
    args = build_parser().parse_args(argv)
    setup_logging(verbose=args.verbose)  # console only until the run dir exists
    checked = _validate(args)
    device = sens.select_device(args.device)
    sens.import_mtq()  # fail on a broken install before creating the run dir

    if checked["run_dir"] is not None:
        run_dir = checked["run_dir"]
        run_dir.mkdir(parents=True, exist_ok=True)
    else:
        run_dir = new_run_dir(checked["output_root"], timestamp())
    logger = setup_logging(run_dir / LOG_NAME, verbose=args.verbose)
    logger.info("run dir %s", run_dir)

    with manifest_run(
        run_dir / "manifest.json", SCRIPT, vars(args), sys.argv if argv is None else argv, kind="sensitivity"
    ) as manifest:
        weights_sha = manifest.add_input(checked["weights"])
        manifest.add_input(checked["data_path"])
        manifest.update(
            run_dir=run_dir,
            device=device,
            weights=checked["weights"],
            images=[str(p) for p in checked["image_files"]] if checked["image_files"] else None,
            num_images=int(checked["images"].shape[0]),
        )
        inputs = sens.SweepInputs(
            weights=checked["weights"],
            weights_sha256=weights_sha,
            images=checked["images"],
            data_source=str(checked["data_path"]),
            imgsz=args.imgsz,
            formats=list(dict.fromkeys(args.formats)),
            metric=args.metric,
            batch_size=args.batch_size,
            device=device,
            seed=args.seed,
        )
        results = sens.run_sweep(inputs, run_dir, t_start=t_start)
        per_format = {}
        for result in results:
            report = result["report"]
            fmt = report["quant_format"]
            for ext, path in result["paths"].items():
                manifest.add_output(f"{fmt}.{ext}", path)
            per_format[fmt] = {
                "num_layers": len(report["layers"]),
                "op_counts": result["op_counts"],
                "not_run": result["not_run"],
                "layer_calls": result["layer_calls"],
                "reference": report["reference"],
                "secondary_score": result["secondary_score"],
                "secondary_reference": result["secondary_reference"],
                "metric_agreement_spearman": result["metric_agreement_spearman"],
                "secondary_per_layer": result["secondary"],
                "wall_s": report["wall_s"],
                "timings_s": {k: round(v, 3) for k, v in result["timings_s"].items()},
            }
        manifest.update(formats=per_format)

    _print_summary(run_dir, results)
    return 0


def _print_summary(run_dir: Path, results: list[dict]) -> None:
    try:
        shown = run_dir.relative_to(Path.cwd())
    except ValueError:
        shown = run_dir
    for result in results:
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
