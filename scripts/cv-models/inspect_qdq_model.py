"""Inspect a Q/DQ ONNX model for float16 hazards: tiny or zero scales, under/overflowed initializers, fp16 rounding.

Static checks (no inference, seconds): every Q/DQ pair's scale (dtype, value range, subnormal or zero
in fp16, the nodes reading the dequantized tensor), Cast nodes, float16 initializers compared with
the FP32 source (``--source-onnx``), and a probe of the installed onnxruntime's float16
QuantizeLinear rounding (ONNX Runtime 1.24's CPU kernel truncates toward zero, which ruins the
accuracy of fp16-high-precision models measured on CPU; TensorRT and the CUDA EP round correctly).

With ``--calib-path`` it also runs the model and a reference (``--reference-onnx``, else
``--source-onnx``) on the first ``--num-images`` calibration images with every intermediate
tensor exposed (ORT CPU, no graph fusion) and lists the first tensors whose relative error exceeds
``--threshold``. For a model with float16 QuantizeLinear nodes it also reports how far its outputs
move when those nodes compute in float32 (the ``--write-fp32-quantize`` rewrite): a large number
means the runtime's fp16 rounding, not the model, decides the accuracy.

Example:
    python scripts/cv-models/inspect_qdq_model.py \
        --onnx-path tmp/yolov10m_lowbit/RUN/onnx/yolov10m-int8-qdq.onnx \
        --source-onnx models/cv-models/yolov10m/checkpoints/yolov10m.onnx \
        --calib-path tmp/yolov10m_lowbit/RUN/calib/calib_yolov10m_640.npy --num-images 2 \
        --json-out tmp/yolov10m_lowbit/RUN/onnx/yolov10m-int8-qdq.inspect.json

Exit status: 0, or 1 with ``--fail-on-findings`` when something that changes results was found
(a zero scale, non-finite values, an under/overflow read by a non-quantizing node, or float16
QuantizeLinear nodes on an onnxruntime that truncates them); 2 for bad input.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from lowbit.cli import cli_entry, make_parser, positive_float, positive_int
from lowbit.errors import UserError
from lowbit.logs import get_logger, setup_logging
from lowbit.runs import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    check_input_file,
    check_output_path,
    manifest_run,
    resolve_repo_path,
)

SCRIPT = "scripts/cv-models/inspect_qdq_model.py"
log = get_logger("inspect_qdq_model")


# output flag -> the file name ending it needs
OUTPUT_SUFFIXES = {"--json-out": ".json", "--csv-out": ".csv", "--write-fp32-quantize": ".onnx"}


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(__doc__)
    parser.add_argument("--onnx-path", type=Path, required=True, help="the Q/DQ model to inspect (.onnx)")
    parser.add_argument(
        "--source-onnx",
        type=Path,
        default=None,
        help="the FP32 model it was quantized from: its initializers are compared by name with the fp16 ones",
    )
    parser.add_argument(
        "--calib-path",
        type=Path,
        default=None,
        help="calibration .npy float32 [N,3,H,W]: run the models on its first images (dynamic checks)",
    )
    parser.add_argument(
        "--reference-onnx",
        type=Path,
        default=None,
        help="model to compare tensors against with --calib-path (e.g. the fp32-high-precision Q/DQ model of the "
        "same calibration); None means --source-onnx",
    )
    parser.add_argument("--num-images", type=positive_int, default=4, help="images run with --calib-path")
    parser.add_argument(
        "--threshold",
        type=positive_float,
        default=0.05,
        help="relative error ||model - reference|| / ||reference|| from which a tensor counts as diverged",
    )
    parser.add_argument("--top", type=positive_int, default=10, help="diverging / worst tensors listed")
    parser.add_argument("--json-out", type=Path, default=None, help="write the full report here (.json)")
    parser.add_argument("--csv-out", type=Path, default=None, help="write the per-pair table here (.csv)")
    parser.add_argument(
        "--write-fp32-quantize",
        type=Path,
        default=None,
        help="write a copy of the model whose float16 QuantizeLinear nodes compute in float32 (same integers by the "
        "ONNX spec; correctly rounded on an onnxruntime that truncates fp16) for evaluation on ORT CPU",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument(
        "--fail-on-findings", action="store_true", help="exit 1 when a finding that changes results is reported"
    )
    parser.add_argument("--verbose", action="store_true", help="debug logging on the console")
    return parser


def _validated_paths(args) -> dict[str, Path | None]:
    """Input paths checked and resolved, and the flag combinations checked, before anything is read."""

    def optional(path: Path | None, flag: str) -> Path | None:
        return check_input_file(resolve_repo_path(path), flag) if path else None

    paths = {
        "model": check_input_file(resolve_repo_path(args.onnx_path), "--onnx-path"),
        "source": optional(args.source_onnx, "--source-onnx"),
        "reference": optional(args.reference_onnx, "--reference-onnx"),
        "calib": optional(args.calib_path, "--calib-path"),
    }
    if paths["reference"] is not None and paths["calib"] is None:
        raise UserError("--reference-onnx is used only with --calib-path; give both", flag="--reference-onnx")
    if paths["calib"] is not None and paths["reference"] is None and paths["source"] is None:
        raise UserError(
            "--calib-path needs a model to compare against: give --reference-onnx or --source-onnx", flag="--calib-path"
        )
    if args.write_fp32_quantize is not None and args.write_fp32_quantize.resolve() == paths["model"].resolve():
        raise UserError("--write-fp32-quantize must differ from --onnx-path", flag="--write-fp32-quantize")
    return paths


def _manifest(args, argv, outputs: list[tuple[Path, str]]):
    """The run's manifest, ``<stem>.inspect.manifest.json`` beside the first output (never the quantizer's
    ``<stem>.manifest.json``); none without outputs."""
    if not outputs:
        return contextlib.nullcontext()
    stem = outputs[0][0].with_suffix("")
    name = f"{stem.name}.manifest.json" if stem.name.endswith(".inspect") else f"{stem.name}.inspect.manifest.json"
    return manifest_run(stem.with_name(name), SCRIPT, vars(args), argv, kind="inspect")


def _write_outputs(args, report: dict, fixed, outputs: list[tuple[Path, str]], manifest=None) -> None:
    from lowbit.qdq_inspect_text import pairs_csv

    if args.write_fp32_quantize is not None:
        atomic_write_bytes(args.write_fp32_quantize, fixed.SerializeToString())
        log.info("wrote %s", args.write_fp32_quantize)
    if args.json_out is not None:
        atomic_write_json(args.json_out, report)
        log.info("wrote %s", args.json_out)
    if args.csv_out is not None:
        atomic_write_text(args.csv_out, pairs_csv(report))
        log.info("wrote %s", args.csv_out)
    if manifest is not None:
        for path, flag in outputs:
            manifest.add_output(flag.lstrip("-"), path)
        manifest.update(verdict=report["verdict"], findings=report["findings"], counts=report["counts"])


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(verbose=args.verbose)
    paths = _validated_paths(args)
    wanted = {"--json-out": args.json_out, "--csv-out": args.csv_out, "--write-fp32-quantize": args.write_fp32_quantize}
    outputs = [(path, flag) for flag, path in wanted.items() if path is not None]
    for path, flag in outputs:
        check_output_path(path, flag, args.overwrite, suffix=OUTPUT_SUFFIXES[flag])

    from lowbit import qdq_inspect
    from lowbit.onnx_compare import load_images, model_input_dims
    from lowbit.qdq_inspect_text import format_report

    model = qdq_inspect.load_model(paths["model"], "--onnx-path")
    source = qdq_inspect.load_model(paths["source"], "--source-onnx") if paths["source"] else None
    reference = qdq_inspect.load_model(paths["reference"], "--reference-onnx") if paths["reference"] else source
    images = None
    if paths["calib"] is not None:
        images = load_images(paths["calib"], args.num_images, model_input_dims(model))
    # the static part is quick: run it before anything is written, so a useless rewrite request fails early
    report = qdq_inspect.inspect_qdq(model, source)
    if args.write_fp32_quantize is not None and not report["counts"]["fp16_quantize_inputs"]:
        raise UserError(
            f"--write-fp32-quantize: {paths['model']} has no float16 QuantizeLinear node to rewrite",
            flag="--write-fp32-quantize",
        )
    report["model"] = str(paths["model"])
    report["source"] = str(paths["source"]) if paths["source"] else None
    reference_label = str(paths["reference"] or paths["source"])
    rewrite = args.write_fp32_quantize is not None
    with _manifest(args, argv, outputs) as manifest:
        for path in paths.values() if manifest is not None else ():
            if path is not None:
                manifest.add_input(path)
        fixed = qdq_inspect.complete_report(
            report, model, reference, images, reference_label, rewrite=rewrite, threshold=args.threshold, top=args.top
        )
        _write_outputs(args, report, fixed, outputs, manifest)
    print(format_report(report, paths["model"]), end="")
    return 1 if (args.fail_on_findings and report["findings"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
