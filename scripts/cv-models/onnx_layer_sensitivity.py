"""ONNX-native per-node quantization sensitivity of a YOLOv10 detector (INT8 or FP8), as a layer-sensitivity report.

Scores the ONNX graph that will be deployed, so no torch<->ONNX name or weight matching is involved:

1. quantize the FP32 model once with ModelOpt (``lowbit.quantize.quantize_onnx``: INT8 entropy or
   FP8 max calibration by default, FP32 high precision), on the first ``--calib-images`` images;
   or take an existing Q/DQ model of the same graph with ``--qdq-path``;
2. score every node ModelOpt quantized (Convs, and the Add/Concat/MatMul/... nodes that read Q/DQ
   tensors) on ``--num-images`` calibration images, by one of three methods (``--method``):

   * ``single`` (propagated, what the workflow uses): the model with only that node quantized is run
     and its detection-aware output drift against FP32 (the torch sweep's ``--metric``) is the score:
     the torch sweep's one-layer-at-a-time score on the ONNX graph (``lowbit.sensitivity_single``).
     Cost: ``3 + nodes`` inferences per image, all in one session;
   * ``loo`` (propagated): leave-one-out on the whole Q/DQ graph (``lowbit.sensitivity_loo``): the full
     Q/DQ model with only that node in float is run, and the drop in output drift is the score. Same cost;
   * ``local`` (cheap, this script's default): the node is run on the FP32 model's own input activations
     as-is and through copies of its Q/DQ pairs (one ONNX Runtime pass per image scores all nodes;
     ``lowbit.sensitivity_local``); score = relative MSE of its output, the error the node itself
     introduces, not what survives to the detector's output.

Writes into ``--out-dir``: ``layer-sensitivity-report.json`` (+ ``.csv``, ``.md``; the format shared with
the torch sweep, ``source: "onnx"``), ``manifest.json``, a log, the Q/DQ model under ``qdq/``, and with
``--compare-with`` a ``ranking-agreement.json`` (Spearman rank correlation and top-K overlap with
another report, e.g. the torch sweep's, both mapped onto the nodes of ``--onnx-path``). To compare two
existing reports without scoring again, use ``compare_sensitivity_reports.py``. The work is
``lowbit.sensitivity_run.run_onnx_ranking``; none of it needs torch.

Example::

    python scripts/cv-models/onnx_layer_sensitivity.py \
        --onnx-path models/cv-models/yolov10m/checkpoints/yolov10m.onnx \
        --calib-path tmp/yolov10m_lowbit/run/calib/calib_yolov10m_640.npy \
        --precision int8 --method single --num-images 16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lowbit.cli import cli_entry, make_parser
from lowbit.drift import METRICS
from lowbit.sensitivity_run import (
    CALIBRATION_EPS,
    DEFAULT_ONNX,
    IMAGE_SELECTIONS,
    METHODS,
    PROVIDERS,
    OnnxRankingSettings,
    run_onnx_ranking,
)


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(__doc__)
    parser.add_argument("--onnx-path", type=Path, default=DEFAULT_ONNX, help="FP32 ONNX model to analyse")
    parser.add_argument(
        "--calib-path",
        type=Path,
        required=True,
        help="calibration tensor .npy, float32 [N,3,H,W] (from make_yolov10m_calib_npy.py)",
    )
    parser.add_argument("--num-images", type=int, default=16, help="images scored: the first N of --calib-path")
    parser.add_argument("--precision", choices=("int8", "fp8"), default="fp8", help="quantization simulated")
    parser.add_argument(
        "--method",
        choices=METHODS,
        default="local",
        help="loo: propagated leave-one-out output drift; single: output drift with that node alone "
        "quantized (the torch sweep's score on the ONNX graph); local: each node's own output error",
    )
    parser.add_argument(
        "--metric",
        choices=tuple(METRICS),
        default="det_kl",
        help="output drift scored by --method loo (the torch sweep's metrics)",
    )
    parser.add_argument(
        "--image-selection",
        choices=IMAGE_SELECTIONS,
        default="first",
        help="images scored by --method single/loo: first = the first --num-images of --calib-path; drift = the "
        "--num-images of the first --selection-pool on which the full Q/DQ model drifts furthest from FP32",
    )
    parser.add_argument(
        "--selection-pool", type=int, default=64, help="images --image-selection drift chooses from (the first N)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="images per run of --method loo")
    parser.add_argument("--intra-op-threads", type=int, default=0, help="ORT threads of --method loo (0: default)")
    parser.add_argument(
        "--calibration-method",
        choices=("entropy", "max"),
        default=None,
        help="ModelOpt calibration: default entropy for int8, max for fp8 (as quantize_yolov10m_onnx.py)",
    )
    parser.add_argument(
        "--calib-images",
        type=int,
        default=None,
        help="images ModelOpt calibrates on (first N of --calib-path); default: --num-images",
    )
    parser.add_argument(
        "--calibration-eps",
        nargs="+",
        choices=CALIBRATION_EPS,
        default=["cpu"],
        help="ORT providers ModelOpt calibrates with, in order",
    )
    parser.add_argument(
        "--qdq-path",
        type=Path,
        default=None,
        help="score this existing Q/DQ model of --onnx-path (quantize_yolov10m_onnx.py output) instead of quantizing",
    )
    parser.add_argument(
        "--providers",
        nargs="+",
        choices=PROVIDERS,
        default=["CPUExecutionProvider"],
        help="ONNX Runtime providers for scoring, highest priority first",
    )
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help="output folder "
        "(default: tmp/yolov10m_layer_sensitivity/<run-id>/outputs/yolov10m/onnx-<precision>/per_layer)",
    )
    parser.add_argument(
        "--compare-with",
        type=Path,
        default=None,
        help="another layer-sensitivity-report.json (e.g. the torch sweep's): writes ranking-agreement.json",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace the results in an existing --out-dir")
    parser.add_argument("--verbose", action="store_true", help="debug logging on the console")
    return parser


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = run_onnx_ranking(OnnxRankingSettings(**vars(args)), argv)

    layers = result.report["layers"]
    top = ", ".join(f"{layer['name']} ({layer['score']:.3g})" for layer in layers[:5])
    what = f"{args.precision} ONNX {args.method} sensitivity of {len(layers)} nodes on {result.images} images"
    print(f"{what} -> {result.paths['json']}")
    print(f"top 5: {top}")
    if result.agreement is not None:
        agreement = result.agreement
        overlap = ", ".join(f"top-{k} {v['overlap']}/{k}" for k, v in agreement["top_k"].items())
        print(f"vs {args.compare_with}: {agreement['matched']} matched, Spearman {agreement['spearman']}, {overlap}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
