"""Train the demo YOLOv10n detector on the demo-shapes dataset with ultralytics, fully offline and seeded.

Example (GPU; generate the data first with scripts/cv-models/make_demo_dataset.py --splits train val):

    python scripts/cv-models/train_demo_detector.py --data datasets/demo-shapes/yolo/data.yaml \
        --epochs 150 --batch 64 --workers 14 --device 0

Writes one run directory, <project>/<name>/ (default tmp/train-demo/<timestamp>/):
    manifest.json    argv, resolved args, versions, status (written first, completed last)
    train.log        this script's log
    ultralytics/     ultralytics' own run: args.yaml, results.csv, weights/best.pt, weights/last.pt
    metrics.json     best.pt path and ultralytics' final validation of best.pt on the val split
                     (keys map50_95, map50, precision, recall, plus ultralytics' raw results dict)

Offline: ultralytics normally reaches the network to download yolo26n.pt for its AMP check, fonts for
plots, pip packages it thinks are missing, and settings/analytics sync. This script sets YOLO_OFFLINE=1
and YOLO_AUTOINSTALL=false, keeps ultralytics' settings in the run directory, turns plots off, and
replaces the AMP check (which needs downloaded weights) with "use AMP on CUDA". With --time the run stops
after that many hours, so the epoch count (and the result) then depends on the machine's speed.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lowbit.cli import cli_entry, imgsz, make_parser, non_negative_int, positive_float, positive_int
from lowbit.logs import get_logger, setup_logging
from lowbit.runs import atomic_write_json, manifest_run, new_run_dir, timestamp
from lowbit.ultralytics_peer import check_data_yaml, offline_environment

GENERATE_HINT = "python scripts/cv-models/make_demo_dataset.py --splits train val"  # how to make missing data


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(__doc__)
    parser.add_argument(
        "--data", type=Path, default=Path("datasets/demo-shapes/yolo/data.yaml"), help="ultralytics data.yaml"
    )
    parser.add_argument(
        "--model-yaml", default="yolov10n.yaml", help="ultralytics model config (built from scratch, no weights)"
    )
    parser.add_argument(
        "--epochs", type=positive_int, default=150, help="training epochs (--time, when set, replaces it)"
    )
    parser.add_argument(
        "--time", type=positive_float, default=None, help="training budget in hours; overrides --epochs"
    )
    parser.add_argument("--batch", type=positive_int, default=64, help="images per batch")
    parser.add_argument(
        "--workers", type=non_negative_int, default=8, help="dataloader worker processes (CPU training uses 0)"
    )
    parser.add_argument("--imgsz", type=imgsz, default=640, help="square training/validation image size, pixels")
    parser.add_argument("--device", default=None, help="'0', '0,1' or 'cpu'; default: first CUDA GPU, else CPU")
    parser.add_argument("--amp", choices=("fp16", "bf16", "fp32"), default="fp16", help="mixed precision on CUDA")
    parser.add_argument(
        "--cache",
        choices=("none", "ram", "disk"),
        default="ram",
        help="ultralytics image cache; ram holds ~4 GB for 4000 images and is fastest, but ultralytics warns it may "
        "make training non-deterministic (disk: .npy files beside the images, deterministic)",
    )
    parser.add_argument(
        "--optimizer",
        choices=("SGD", "AdamW", "auto"),
        default="SGD",
        help="SGD with --lr0 0.01 is the YOLOv10 from-scratch recipe; ultralytics' 'auto' picks a fine-tuning "
        "learning rate (about 1e-4) for runs under 10000 iterations",
    )
    parser.add_argument(
        "--lr0", type=positive_float, default=0.01, help="initial learning rate (ignored with --optimizer auto)"
    )
    parser.add_argument(
        "--deterministic",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="torch deterministic algorithms (reproducible on the same machine and software, slightly slower)",
    )
    parser.add_argument(
        "--patience", type=non_negative_int, default=0, help="early-stop after N epochs without improvement; 0 = never"
    )
    parser.add_argument(
        "--seed", type=non_negative_int, default=0, help="seed for weights init, sampling and augmentation"
    )
    parser.add_argument("--project", type=Path, default=Path("tmp/train-demo"), help="parent of the run directory")
    parser.add_argument("--name", default=None, help="run directory name (default: a timestamp)")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    return parser


def _use_amp_without_download(model) -> bool:
    """Stand-in for ultralytics' check_amp, which needs yolo26n.pt from the network: AMP on CUDA, off elsewhere."""
    import torch

    device = next(model.parameters()).device
    enabled = device.type == "cuda" and torch.cuda.is_available()
    get_logger("train_demo_detector").info(
        "AMP %s (ultralytics' download-based AMP check skipped)", "on" if enabled else "off"
    )
    return enabled


def _train_args(args: argparse.Namespace, run_dir: Path) -> dict:
    """ultralytics' ``train`` arguments for the flags, writing into ``run_dir/ultralytics``."""
    return {
        "data": str(args.data.resolve()),
        "epochs": args.epochs,
        "time": args.time,
        "batch": args.batch,
        "imgsz": args.imgsz,
        "workers": args.workers,
        "device": args.device,
        "seed": args.seed,
        "deterministic": args.deterministic,
        "optimizer": args.optimizer,
        "lr0": args.lr0,
        "pretrained": False,
        "amp": {"fp16": True, "bf16": "bf16", "fp32": False}[args.amp],
        "cache": {"none": False, "ram": "ram", "disk": "disk"}[args.cache],
        "patience": args.patience if args.patience > 0 else 10**9,
        # Hue is what tells the eight colour classes apart; ultralytics' default hue jitter blurs them.
        "hsv_h": 0.0,
        "plots": False,  # plots download Arial.ttf
        "val": True,
        "project": str(run_dir),
        "name": "ultralytics",
        "exist_ok": True,
        "verbose": True,
    }


def _train_metrics(model, results, train_seconds: float, args: argparse.Namespace) -> tuple[Path, dict]:
    """The checkpoint kept (best, else last) and the metrics.json dict of a finished training."""
    trainer = model.trainer
    best = Path(trainer.best) if Path(trainer.best).is_file() else Path(trainer.last)
    if not best.is_file():
        raise RuntimeError(f"training finished without a checkpoint in {trainer.wdir}")
    raw = {k: float(v) for k, v in (results.results_dict if results is not None else {}).items()}
    metrics = {
        "best_pt": str(best),
        "last_pt": str(trainer.last),
        "epochs_completed": int(trainer.epoch) + 1,
        "train_seconds": round(train_seconds, 1),
        "map50_95": raw.get("metrics/mAP50-95(B)"),
        "map50": raw.get("metrics/mAP50(B)"),
        "precision": raw.get("metrics/precision(B)"),
        "recall": raw.get("metrics/recall(B)"),
        "validation": "ultralytics final validation of best.pt on the val split "
        f"(imgsz {args.imgsz}, rect batches of {args.batch * 2}, conf 0.001)",
        "ultralytics": raw,
    }
    return best, metrics


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_data_yaml(args.data, "--data", GENERATE_HINT)
    project = args.project if args.project.is_absolute() else (Path.cwd() / args.project)
    run_dir = new_run_dir(project, args.name or timestamp(), flag="--project")
    setup_logging(run_dir / "train.log", verbose=args.verbose)
    log = get_logger("train_demo_detector")
    offline_environment(run_dir / "ultralytics-settings")

    script = "scripts/cv-models/train_demo_detector.py"
    with manifest_run(run_dir / "manifest.json", script, vars(args), argv, kind="train") as manifest:
        manifest.add_input(args.data)
        # lazy: importing ultralytics/torch takes seconds and reads the environment set just above
        import ultralytics
        from ultralytics import YOLO
        from ultralytics.engine import trainer as trainer_module
        from ultralytics.utils import SETTINGS

        integrations = ("sync", "tensorboard", "wandb", "mlflow", "comet", "clearml", "dvc", "raytune")
        SETTINGS.update(dict.fromkeys(integrations, False))
        trainer_module.check_amp = _use_amp_without_download
        log.info("ultralytics %s, run dir %s", ultralytics.__version__, run_dir)

        model = YOLO(args.model_yaml, task="detect")
        train_args = _train_args(args, run_dir)
        manifest.update(ultralytics_train_args=train_args)
        start = time.perf_counter()
        results = model.train(**train_args)
        train_seconds = time.perf_counter() - start

        best, metrics = _train_metrics(model, results, train_seconds, args)
        atomic_write_json(run_dir / "metrics.json", metrics)
        manifest.add_output("best_pt", best)
        manifest.add_output("metrics", run_dir / "metrics.json")
        manifest.update(**{k: v for k, v in metrics.items() if k != "ultralytics"})

    print(f"best.pt: {best}")
    print(f"mAP50-95 {metrics['map50_95']}, mAP50 {metrics['map50']} (ultralytics val) -> {run_dir / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
