"""Verify the ONNX evaluator against ultralytics' own validation of the same weights on the same images.

Runs (1) the evaluator (``lowbit.evaluate``, what ``eval_yolov10m_onnx_coco.py`` runs) on the raw-head ONNX export and (2) ultralytics ``val`` on
the ``.pt`` it was exported from, both with the square letterbox, batch 1 and the one-to-one head,
on the first ``--max-images`` image ids. Writes ``parity.json`` with three numbers per metric:
ours, ultralytics' detections scored by our metric code (faster-coco-eval: isolates
pre/post-processing), and ultralytics' own mAP (its own interpolation and 300 detections per image,
so it differs from COCO's definition by a few tenths of a point).

Example::

    python scripts/cv-models/check_eval_parity.py \
        --weights models/cv-models/yolov10n-demo-shapes/yolov10n-demo-shapes.pt \
        --onnx-path models/cv-models/yolov10n-demo-shapes/yolov10n-demo-shapes.onnx \
        --data-root datasets/demo-shapes --max-images 500 --out tmp/parity/parity.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lowbit.cli import cli_entry, imgsz, make_parser, positive_int
from lowbit.coco_eval import load_coco, select_image_ids
from lowbit.errors import UserError
from lowbit.evaluate import EvalSettings
from lowbit.logs import setup_logging
from lowbit.runs import atomic_write_json, check_input_file, check_output_path, manifest_run
from lowbit.ultralytics_peer import parity_record


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(__doc__)
    parser.add_argument("--weights", type=Path, required=True, help="ultralytics .pt the ONNX was exported from")
    parser.add_argument("--onnx-path", type=Path, required=True, help="raw-head ONNX export of --weights")
    parser.add_argument("--data-root", type=Path, default=Path("datasets/demo-shapes"))
    parser.add_argument(
        "--yolo-images-dir",
        type=Path,
        default=None,
        help="the same images under an ultralytics images/ folder with labels/ beside it "
        "(default: <data-root>/yolo/images/val2017, as make_demo_dataset.py writes)",
    )
    parser.add_argument("--max-images", type=positive_int, default=500, help="first N image ids, ascending")
    parser.add_argument("--imgsz", type=imgsz, default=640)
    parser.add_argument("--device", default="cpu", help="torch device for ultralytics val")
    parser.add_argument("--out", type=Path, required=True, help="parity.json to write")
    parser.add_argument("--overwrite", action="store_true")
    return parser


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    weights = check_input_file(args.weights, "--weights")
    onnx_path = check_input_file(args.onnx_path, "--onnx-path")
    ann_file = check_input_file(args.data_root / "annotations" / "instances_val2017.json", "--data-root")
    yolo_images = args.yolo_images_dir or args.data_root / "yolo" / "images" / "val2017"
    if not yolo_images.is_dir():
        raise UserError(
            f"--yolo-images-dir: {yolo_images} does not exist (ultralytics needs images/ + labels/)",
            flag="--yolo-images-dir",
        )
    check_output_path(args.out, "--out", args.overwrite, suffix=".json")
    work = args.out.parent
    setup_logging(work / "parity.log")

    coco = load_coco(ann_file)
    image_ids = select_image_ids(coco, args.max_images)
    with manifest_run(work / "parity.manifest.json", "check_eval_parity.py", vars(args), kind="parity") as manifest:
        manifest.add_input(weights)
        manifest.add_input(onnx_path)
        settings = EvalSettings(
            onnx_path=onnx_path,
            data_root=args.data_root,
            max_images=args.max_images,
            imgsz=args.imgsz,
            providers=["CPUExecutionProvider"],
            warmup_runs=1,
            out=work / "ours" / "metrics.json",
            overwrite=True,
        )
        result = parity_record(settings, weights, coco, image_ids, yolo_images, work, args.device)
        atomic_write_json(args.out, result)
        manifest.add_output("parity", args.out)
        manifest.update(**result["diff_ap_points"])

    ours, theirs_coco = result["ours"], result["ultralytics_detections_same_metric"]
    own = result["ultralytics_own_metric"]
    d = result["diff_ap_points"]
    print(
        f"mAP50-95: ours {ours['map50_95']:.4f} | ultralytics dets, our metric {theirs_coco['map50_95']:.4f} "
        f"({d['vs_ultralytics_detections']['map50_95']:+.2f} AP) | ultralytics own metric {own['map50_95']:.4f} "
        f"({d['vs_ultralytics_own_metric']['map50_95']:+.2f} AP)\n"
        f"mAP50:    ours {ours['map50']:.4f} | ultralytics dets, our metric {theirs_coco['map50']:.4f} "
        f"({d['vs_ultralytics_detections']['map50']:+.2f} AP) | ultralytics own metric {own['map50']:.4f} "
        f"({d['vs_ultralytics_own_metric']['map50']:+.2f} AP)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
