"""COCO 2017 val bbox evaluation of a YOLOv10 ONNX model on ONNX Runtime, with inference latency.

Example (the model card's baseline, step 1):

    python scripts/cv-models/eval_yolov10m_onnx_coco.py \
      --onnx-path models/cv-models/yolov10m/checkpoints/yolov10m.onnx \
      --data-root datasets/coco2017/source-data --max-images 100 \
      --providers TensorrtExecutionProvider CUDAExecutionProvider --disable-cpu-fallback \
      --warmup-runs 10 --skip-latency 10 --imgsz 640 --out tmp/yolov10m_lowbit/RUN/baseline-coco/metrics.json

A thin command line over :func:`lowbit.evaluate.evaluate`: its module docstring describes the stages
(prepare -> infer -> postprocess -> score) and every key of the ``metrics.json`` written at ``--out``,
beside ``detections.json`` (plain COCO results), ``manifest.json`` and ``eval.log``.
Exit status: 0 ok; 2 bad input, including a model whose outputs hold NaN or Inf (no metrics.json).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lowbit.cli import add_coco_paths, cli_entry, imgsz, make_parser, non_negative_int, positive_int
from lowbit.evaluate import DEFAULT_WORKERS, EvalResult, EvalSettings, evaluate
from lowbit.logs import setup_logging
from lowbit.ort_session import CUDNN_CONV_ALGO_SEARCH


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(__doc__)
    parser.add_argument("--onnx-path", type=Path, required=True, help="ONNX model (float or Q/DQ), input [1,3,H,W]")
    add_coco_paths(parser)
    parser.add_argument(
        "--max-images",
        type=positive_int,
        default=None,
        help="evaluate the first N image ids (ascending, after --skip-images); None means all",
    )
    parser.add_argument(
        "--skip-images",
        type=non_negative_int,
        default=0,
        help="leave out the first N image ids (ascending) before --max-images counts: e.g. a confirmation slice",
    )
    parser.add_argument(
        "--providers",
        nargs="+",
        default=["CPUExecutionProvider"],
        help="ONNX Runtime execution providers, highest priority first",
    )
    parser.add_argument(
        "--disable-cpu-fallback",
        action="store_true",
        help="fail if any node would run on the CPU EP (GPU-only runs); do not list CPUExecutionProvider with it",
    )
    parser.add_argument(
        "--cudnn-conv-algo-search",
        choices=CUDNN_CONV_ALGO_SEARCH,
        default="EXHAUSTIVE",
        help="CUDA EP convolution search: EXHAUSTIVE benchmarks cuDNN's algorithms in the first run (seconds), "
        "HEURISTIC takes cuDNN's pick at once",
    )
    parser.add_argument(
        "--warmup-runs", type=non_negative_int, default=10, help="untimed session.run calls before timing"
    )
    parser.add_argument(
        "--skip-latency", type=non_negative_int, default=10, help="first timed samples dropped from latency stats"
    )
    parser.add_argument("--imgsz", type=imgsz, default=640, help="square letterbox side, pixels (multiple of 32)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="metrics.json path; None means tmp/yolov10m_onnx_coco/<time>/metrics.json",
    )
    parser.add_argument("--nms", action="store_true", help="class-aware NMS (one-to-many heads) instead of top-k")
    parser.add_argument("--conf", type=float, default=0.001, help="score threshold (strict >), ultralytics val default")
    parser.add_argument("--iou", type=float, default=0.7, help="NMS IoU threshold (only with --nms)")
    parser.add_argument("--max-det", type=positive_int, default=300, help="detections kept per image")
    parser.add_argument(
        "--skip-missing",
        action="store_true",
        help="skip (and record) missing or unreadable images instead of failing",
    )
    parser.add_argument(
        "--workers",
        type=non_negative_int,
        default=DEFAULT_WORKERS,
        help="prefetch threads for decode+preprocess (0: inline; default one per core, at most 8)",
    )
    parser.add_argument(
        "--sessions",
        type=positive_int,
        default=None,
        help="ORT sessions of the model run side by side, each on cores/N intra-op threads (CPU EP alone; same "
        "detections, about 1.3x the images/s of one session on 2 cores; latency is then that of one run beside "
        "N-1 others); default 2 on the CPU EP alone with >= 2 cores, else 1",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing metrics.json at --out")
    return parser


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} ms"


def format_summary(result: EvalResult) -> str:
    """The lines printed at the end of a run."""
    record = result.record
    m, lat, thr = record["metrics"], record["latency_ms"], record["throughput"]
    ds, prov = record["dataset"], record["providers"]
    cpu_nodes = lat.get("cpu_nodes")
    on_cpu = "" if cpu_nodes is None else f", {cpu_nodes} nodes on the CPU EP"
    skipped = f", {ds['num_images_skipped']} skipped" if ds["num_images_skipped"] else ""
    sessions = lat.get("sessions", 1)
    beside = f", each run beside {sessions - 1} other session(s)" if sessions > 1 else ""
    return "\n".join(
        [
            (
                f"model      {record['model']['path']}  ({record['model']['output']['layout']} output, "
                f"{record['postprocess']['mode']})"
            ),
            f"providers  {', '.join(prov['providers_used'])}{on_cpu}",
            (
                f"images     {ds['num_images_evaluated']} evaluated{skipped} "
                f"(first {ds['num_images_selected']} of {ds['num_images_in_set']} ids)"
            ),
            f"mAP50-95   {m['map50_95']:.4f}   mAP50 {m['map50']:.4f}   mAP75 {m['map75']:.4f}",
            (
                f"APs/m/l    {m['map_small']:.4f} / {m['map_medium']:.4f} / {m['map_large']:.4f}   "
                f"AR1/10/100 {m['ar1']:.4f} / {m['ar10']:.4f} / {m['ar100']:.4f}"
            ),
            (
                f"latency    on {lat['provider']}{on_cpu}: mean {_ms(lat['mean'])}  p50 {_ms(lat['p50'])}  "
                f"p90 {_ms(lat['p90'])}  p99 {_ms(lat['p99'])}  "
                f"(n={lat['n']}, warmup {lat['warmup_runs']}, skipped {lat['skipped']}{beside})"
            ),
            (
                f"throughput {thr['images_per_s']} images/s end to end ({thr['workers']} prefetch workers, "
                f"{sessions} session(s))"
            ),
            f"metrics    {result.path}",
        ]
    )


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    result = evaluate(EvalSettings(**vars(args)), argv)
    print(format_summary(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
