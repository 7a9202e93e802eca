"""The whole low-bit workflow in one resumable command, ending in a comparison report.

Runs the model card's steps, each a card script with its flags, into one run dir tmp/yolov10m_lowbit/<run-id>/
(<model> is the ONNX file's stem: yolov10m for the card's checkpoint, yolov10n-demo-shapes for the demo):

    dataset       (demo preset only) generate the demo val split if it is missing
    smoke         run_random_onnx_inference.py          -> baseline-onnx/<timestamp>/smoke.json
    baseline      eval_yolov10m_onnx_coco.py (FP32)     -> baseline-coco/metrics.json
    calib-list    make_calib_list.py (only when the list is missing; never for the demo's committed list)
    calib         make_yolov10m_calib_npy.py            -> calib/calib_<model>_<imgsz>.npy
    int8          quantize_yolov10m_onnx.py             -> onnx/<model>-int8-qdq.onnx
    int8-eval     eval_yolov10m_onnx_coco.py            -> int8-coco/metrics.json
    fp8           quantize_yolov10m_onnx.py (FP8, search mode) -> onnx/<model>-fp8-k0.onnx
    sensitivity-<mode>  onnx_layer_sensitivity.py --method single|loo|local (or yolov10m_layer_sensitivity.py)
                        -> sensitivity-<method>-<mode>/.../layer-sensitivity-report.json
    search-<mode>       search_yolov10m_lowbit_budget.py -> search-<mode>/search.json, <mode>-k{K}-coco/
    report        make_lowbit_report.py                 -> report.md, report.json, pareto.png, search-curves.png

K, the number of most sensitive nodes left in float, is chosen per mode by the budget search (default: the
smallest K whose candidate loses at most --budget-ap AP points against FP32), or fixed with --ks 0 5 10 20
(then the steps schemes-<mode> and candidates-<mode> build one ModelOpt quantization per K).

Every input is checked before the first step, naming this command's flags. A step whose inputs and outputs
still hash to what its record says is skipped (--force STEP reruns it); --jobs N runs independent steps at
once; a step's output is in logs/<step>.log; one workflow per run dir; SIGINT/SIGTERM end the running steps'
process trees and the next run resumes. The step model, resume and the step settings: docs/pipeline.md.

Examples:

    python scripts/cv-models/run_yolov10m_lowbit_workflow.py                      # demo detector, offline
    python scripts/cv-models/run_yolov10m_lowbit_workflow.py --dry-run            # the commands, nothing run
    python scripts/cv-models/run_yolov10m_lowbit_workflow.py --preset yolov10m \\
        --providers TensorrtExecutionProvider CUDAExecutionProvider --calibration-eps cuda:0 cpu
"""

from __future__ import annotations

import argparse
import sys

from lowbit.cli import cli_entry, make_parser
from lowbit.pipeline import run_workflow
from lowbit.pipeline_settings import EPILOG, add_workflow_arguments, check_inputs, check_settings, resolve_args


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(__doc__, raw=True, epilog=EPILOG)
    add_workflow_arguments(parser)
    return parser


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = resolve_args(build_parser().parse_args(argv))
    check_settings(args)
    check_inputs(args)
    rc = run_workflow(args, sys.argv if argv is None else argv)
    if rc != 0 or args.dry_run:
        return rc
    report = args.output_root / args.run_id / "report.md"
    print(report.read_text() if report.is_file() else f"(no report at {report})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
