"""Materialize low-bit candidates from exclusion schemes: one ModelOpt Q/DQ model per K, optionally evaluated.

For each K, reads ``<schemes-dir>/scheme_k{K}.json`` (from make_yolov10m_candidate_schemes.py), quantizes
``--onnx-path`` with its exclusions (``lowbit.quantize.quantize_onnx``), or with ``--from-full-model``
removes the Q/DQ pairs of its nodes from that calibrated full Q/DQ model (``lowbit.candidates_build``,
no recalibration), into
``<run-root>/onnx/<model>-<mode>-k{K}.onnx`` (``<model>``: the file stem of ``--onnx-path``, ``yolov10m``
for the card's checkpoint), and with ``--eval`` evaluates it (``lowbit.evaluate.evaluate``) into
``<run-root>/<mode>-k{K}-coco/metrics.json``. ``--include-random`` also materializes the
``scheme_k{K}_random{SEED}.json`` controls, to check whether the ranking beats a random choice of
the same number of nodes. A summary table (``<run-root>/candidates-<mode>/summary.json`` and
``.md``) lists each candidate's excluded nodes, Q/DQ pairs and, when evaluated, mAP.

FP8 uses ``max`` calibration (ModelOpt derives FP8 scales assuming max ranges); INT8 uses entropy
unless ``--calibration-method`` says otherwise.

Every setting, scheme and the evaluation inputs are checked before anything is quantized. Each
candidate records what it was built from in ``<model>-<mode>-k{K}.inputs.json`` beside the model
(sha256 of the ONNX model, the calibration tensor and the scheme; the quantization and evaluation
settings; the sha256 of the model and metrics it produced). A rerun skips a candidate whose record
matches; a candidate built from other inputs or settings is an error unless ``--overwrite``
(``OVERWRITE=1``), which rebuilds every candidate.

``--compare-requantize`` (with ``--from-full-model`` and ``--eval``) builds every K both ways, evaluates
both into ``--compare-dir`` and prints a table of AP per build and their difference: whether removing
Q/DQ pairs matches ModelOpt's ``nodes_to_exclude`` (e.g. within 0.05 AP).

Example (what ``materialize_yolov10m_lowbit_candidates.sh`` runs)::

    python scripts/cv-models/materialize_yolov10m_lowbit_candidates.py \\
        --run-root tmp/yolov10m_lowbit/run --calib-path tmp/yolov10m_lowbit/run/calib/calib_yolov10m_640.npy \\
        --ks 0 5 10 20 --quant-mode fp8 --eval
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lowbit.candidates import EvalConfig
from lowbit.candidates_build import RequantizeConfig
from lowbit.candidates_compare import compare_requantize, compare_table
from lowbit.candidates_materialize import MaterializeSettings, materialize_candidates, summary_markdown
from lowbit.cli import cli_entry, make_parser
from lowbit.errors import UserError
from lowbit.evaluate_prepare import auto_sessions
from lowbit.ort_providers import MODELOPT_CALIBRATION_EPS
from lowbit.runs import CARD_ONNX_PATH, check_input_file


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(__doc__)
    parser.add_argument("--run-root", type=Path, required=True, help="run directory (card: RUN_ROOT)")
    parser.add_argument("--calib-path", type=Path, required=True, help="calibration .npy (card: CALIB_PATH)")
    parser.add_argument("--schemes-dir", type=Path, default=None, help="default: <run-root>/schemes")
    parser.add_argument(
        "--onnx-path", type=Path, default=CARD_ONNX_PATH, help="FP32 ONNX model; its stem names the outputs"
    )
    parser.add_argument("--ks", type=int, nargs="+", default=[0, 5, 10, 20], help="which scheme_k{K}.json to build")
    parser.add_argument(
        "--quant-mode", choices=("fp8", "int8", "int4"), default="fp8", help="int4 is refused with the reason"
    )
    parser.add_argument(
        "--calibration-method", choices=("entropy", "max"), default=None, help="default: max for fp8, entropy for int8"
    )
    parser.add_argument("--high-precision-dtype", choices=("auto", "fp32", "fp16", "bf16"), default="auto")
    parser.add_argument(
        "--calibration-eps",
        nargs="+",
        choices=MODELOPT_CALIBRATION_EPS,
        default=["cpu"],
        help="ModelOpt calibration EPs, in order",
    )
    parser.add_argument("--include-random", action="store_true", help="also build scheme_k{K}_random*.json controls")
    parser.add_argument("--eval", action="store_true", help="evaluate every candidate (card: EVAL=1)")
    parser.add_argument("--data-root", type=Path, default=Path("datasets/coco2017/source-data"))
    parser.add_argument("--max-images", type=int, default=100)
    parser.add_argument("--providers", nargs="+", default=["CPUExecutionProvider"])
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--warmup-runs", type=int, default=10)
    parser.add_argument("--skip-latency", type=int, default=10)
    parser.add_argument(
        "--from-full-model",
        type=Path,
        default=None,
        help="build each candidate by removing its nodes' Q/DQ pairs from this calibrated full Q/DQ "
        "model (no recalibration) instead of quantizing again with nodes_to_exclude",
    )
    parser.add_argument(
        "--compare-requantize",
        action="store_true",
        help="with --from-full-model and --eval: build every K both ways, evaluate both, print the "
        "AP table (outputs in --compare-dir)",
    )
    parser.add_argument(
        "--compare-dir",
        type=Path,
        default=None,
        help="outputs of --compare-requantize (default: <run-root>-compare-<mode>, beside the run)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="rebuild every candidate, also those built from other inputs or settings",
    )
    return parser


def settings_from_args(args: argparse.Namespace) -> MaterializeSettings:
    """The run's settings; the input files must exist. Fills the folders' defaults into ``args`` as well, so that
    the manifest records the folders used."""
    onnx_path = check_input_file(args.onnx_path, "--onnx-path")
    calib_path = check_input_file(args.calib_path, "--calib-path")
    full_model = check_input_file(args.from_full_model, "--from-full-model") if args.from_full_model else None
    args.schemes_dir = args.schemes_dir or args.run_root / "schemes"
    if args.compare_requantize:
        if not args.eval:
            raise UserError("--compare-requantize compares evaluations: pass --eval", flag="--compare-requantize")
        args.compare_dir = args.compare_dir or args.run_root.with_name(
            f"{args.run_root.name}-compare-{args.quant_mode}"
        )
    quantizer = RequantizeConfig(
        onnx_path, calib_path, args.calibration_method, list(args.calibration_eps), args.high_precision_dtype
    )
    evaluation = EvalConfig.from_args(args, sessions=auto_sessions(args.providers))
    return MaterializeSettings(
        run_root=args.run_root,
        schemes_dir=args.schemes_dir,
        ks=tuple(args.ks),
        quant_mode=args.quant_mode,
        quantizer=quantizer,
        evaluation=evaluation,
        eval=args.eval,
        include_random=args.include_random,
        from_full_model=full_model,
        overwrite=args.overwrite,
        compare_dir=args.compare_dir if args.compare_requantize else None,
    )


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = settings_from_args(args)
    if settings.compare_dir is not None:
        print(compare_table(compare_requantize(settings)))
        return 0
    print(summary_markdown(materialize_candidates(settings, vars(args), argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
