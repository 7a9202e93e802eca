"""ModelOpt ONNX post-training quantization (INT8 or FP8 Q/DQ) of a YOLOv10 detector, with a manifest.

A thin CLI over ``lowbit.quantize.quantize_onnx``: it validates the inputs first, maps
user-facing settings to ModelOpt's arguments (exact node names, a real boolean for
``use_zero_point``), runs ModelOpt with its log captured beside the output, folds int32 bias
DequantizeLinear nodes into float constants, then checks that the output loads in ONNX Runtime and
runs one calibration image. The model file appears only when all of that succeeded.

Example (what ``quantize_yolov10m_int8_onnx.sh`` runs)::

    python scripts/cv-models/quantize_yolov10m_onnx.py \
        --onnx-path models/cv-models/yolov10m/checkpoints/yolov10m.onnx \
        --calib-path tmp/yolov10m_lowbit/run/calib/calib_yolov10m_640.npy \
        --output-path tmp/yolov10m_lowbit/run/onnx/yolov10m-int8-qdq.onnx \
        --quantize-mode int8 --calibration-method entropy --calibration-eps cuda:0 cpu
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lowbit.cli import cli_entry, existing_file, make_parser, positive_int
from lowbit.logs import setup_logging
from lowbit.quantize import (
    CALIBRATION_EPS,
    CALIBRATION_METHODS,
    DEFAULT_HIGH_PRECISION_DTYPE,
    HIGH_PRECISION_DTYPES,
    PASSES,
    QUANTIZE_MODES,
    QuantizeSettings,
    quantize_onnx,
)


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(__doc__)
    parser.add_argument("--onnx-path", type=Path, required=True, help="FP32 ONNX model to quantize")
    parser.add_argument("--calib-path", type=Path, required=True, help="calibration tensor .npy, float32 [N,3,H,W]")
    parser.add_argument("--output-path", type=Path, required=True, help="quantized model to write (.onnx)")
    parser.add_argument(
        "--quantize-mode", choices=QUANTIZE_MODES, default="int8", help="int4 is refused: YOLOv10 has no INT4 targets"
    )
    parser.add_argument(
        "--calibration-method",
        choices=CALIBRATION_METHODS,
        default=None,
        help="default: entropy for int8, max for fp8 (ModelOpt derives FP8 scales assuming max calibration)",
    )
    parser.add_argument(
        "--calibration-eps",
        nargs="+",
        choices=CALIBRATION_EPS,
        default=["cpu"],
        help="ORT execution providers ModelOpt may calibrate with, in order; unavailable ones are skipped "
        "by ModelOpt and the log says which ones were used",
    )
    parser.add_argument(
        "--use-zero-point",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="asymmetric quantization; in ModelOpt 0.47 it only affects int4 (AWQ) and is recorded as ineffective otherwise",
    )
    parser.add_argument("--high-precision-dtype", choices=HIGH_PRECISION_DTYPES, default=DEFAULT_HIGH_PRECISION_DTYPE)
    parser.add_argument(
        "--nodes-to-exclude",
        nargs="*",
        default=[],
        help="exact ONNX node names to leave unquantized (anchored; not regular expressions)",
    )
    parser.add_argument(
        "--exclude-json",
        type=existing_file,
        default=None,
        help="a scheme JSON with a 'nodes_to_exclude' list (from make_yolov10m_candidate_schemes.py); added to --nodes-to-exclude",
    )
    parser.add_argument(
        "--op-types-to-quantize",
        nargs="+",
        default=None,
        help="quantize only nodes of these ONNX op types (default: ModelOpt's choice, e.g. Conv, MatMul, Add, "
        "Concat, MaxPool, Resize inputs for int8)",
    )
    parser.add_argument(
        "--op-types-to-exclude",
        nargs="+",
        default=None,
        help="never quantize nodes of these ONNX op types",
    )
    parser.add_argument(
        "--passes",
        nargs="*",
        choices=PASSES,
        default=list(PASSES),
        help="ModelOpt graph passes; give the flag with no value to disable all",
    )
    parser.add_argument(
        "--calibrate-per-node",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="ModelOpt per-node calibration: lower peak memory for many calibration images, slower",
    )
    parser.add_argument(
        "--max-calib-images", type=positive_int, default=None, help="use only the first N calibration images"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output model")
    return parser


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    result = quantize_onnx(QuantizeSettings(**vars(args)), argv=argv)
    folded = f", {len(result.folded_bias_nodes)} int32 bias DQ folded" if result.folded_bias_nodes else ""
    print(
        f"{result.quantize_mode} Q/DQ model: {result.output_path} ({result.qdq_pairs} Q/DQ pairs, "
        f"{len(result.quantized_nodes)} nodes quantized, {len(result.excluded_nodes)} excluded{folded}, "
        f"{result.quantize_s:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
