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
import csv
import io
from pathlib import Path

from lowbit.logs import get_logger, setup_logging
from lowbit.runs import (
    UserError,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    check_input_file,
    manifest_run,
    refuse_overwrite,
    resolve_repo_path,
)
from lowbit.cli import cli_entry

SCRIPT = "scripts/cv-models/inspect_qdq_model.py"
log = get_logger("inspect_qdq_model")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--onnx-path", type=Path, required=True, help="the Q/DQ model to inspect (.onnx)")
    parser.add_argument(
        "--source-onnx", type=Path, default=None,
        help="the FP32 model it was quantized from: its initializers are compared by name with the fp16 ones",
    )
    parser.add_argument(
        "--calib-path", type=Path, default=None,
        help="calibration .npy float32 [N,3,H,W]: run the models on its first images (dynamic checks)",
    )
    parser.add_argument(
        "--reference-onnx", type=Path, default=None,
        help="model to compare tensors against with --calib-path (e.g. the fp32-high-precision Q/DQ model of the "
        "same calibration); None means --source-onnx",
    )
    parser.add_argument("--num-images", type=int, default=4, help="images run with --calib-path")
    parser.add_argument(
        "--threshold", type=float, default=0.05,
        help="relative error ||model - reference|| / ||reference|| from which a tensor counts as diverged",
    )
    parser.add_argument("--top", type=int, default=10, help="diverging / worst tensors listed")
    parser.add_argument("--json-out", type=Path, default=None, help="write the full report here (.json)")
    parser.add_argument("--csv-out", type=Path, default=None, help="write the per-pair table here (.csv)")
    parser.add_argument(
        "--write-fp32-quantize", type=Path, default=None,
        help="write a copy of the model whose float16 QuantizeLinear nodes compute in float32 (same integers by the "
        "ONNX spec; correctly rounded on an onnxruntime that truncates fp16) for evaluation on ORT CPU",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument(
        "--fail-on-findings", action="store_true", help="exit 1 when a finding that changes results is reported"
    )
    parser.add_argument("--verbose", action="store_true", help="debug logging on the console")
    return parser


def _check_suffix(path: Path | None, suffix: str, flag: str) -> None:
    if path is not None and path.suffix.lower() != suffix:
        raise UserError(f"{flag} must end in {suffix}, got {path}")


def _load(path: Path, flag: str):
    import onnx

    try:
        return onnx.load(str(path))
    except Exception as exc:  # protobuf raises several types for a file that is not a model
        raise UserError(f"{flag}: {path} is not a readable ONNX model ({type(exc).__name__}: {exc})") from exc


def _csv_text(rows: list[dict]) -> str:
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return buffer.getvalue()


def _input_shape(model) -> list:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else None for d in dims]


def format_report(report: dict, model_path: Path) -> str:
    """The printed summary: counts, verdict lines and the dynamic results."""
    from lowbit.qdq_inspect import verdict

    counts = report["counts"]
    lines = [
        f"model      {model_path}",
        f"Q/DQ pairs {counts['pairs']} (scales: {counts['scales_fp16']} fp16, {counts['scales_fp32']} fp32); "
        f"Cast nodes {len(report['casts'])}; initializers {report['initializers']['by_dtype']}",
    ]
    runtime = report.get("runtime")
    if runtime:
        lines.append(
            f"runtime    onnxruntime {runtime['onnxruntime']} float16 QuantizeLinear rounding: {runtime['rounding']}"
        )
    lines += [f"verdict    {line}" for line in verdict(report)]
    dynamic = report.get("dynamic")
    if dynamic:
        lines.append(
            f"dynamic    {dynamic['images']} images vs {dynamic['reference']}: {dynamic['compared']} tensors compared"
        )
        for name, out in dynamic["outputs"].items():
            lines.append(f"  output {name}: rel error {out['rel_error']:.4f} (max |diff| {out['max_abs_diff']:.3g})")
        if dynamic["first_diverging"]:
            lines.append(f"  first tensors with rel error > {dynamic['threshold']}:")
            lines += [
                f"    {row['rel_error']:8.4f}  {row['op']:<18} {row['tensor']}" for row in dynamic["first_diverging"]
            ]
        else:
            lines.append(f"  no tensor with rel error > {dynamic['threshold']}")
    check = report.get("fp32_quantize_check")
    if check:
        worst = max(check["outputs"].values()) if check["outputs"] else 0.0
        lines.append(
            f"rounding   outputs move by rel {worst:.4f} when the {check['nodes']} fp16 QuantizeLinear nodes "
            f"compute in fp32 ({check['images']} images)"
        )
    return "\n".join(lines) + "\n"


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(verbose=args.verbose)
    model_path = check_input_file(resolve_repo_path(args.onnx_path), "--onnx-path")
    source_path = (
        check_input_file(resolve_repo_path(args.source_onnx), "--source-onnx") if args.source_onnx else None
    )
    reference_path = (
        check_input_file(resolve_repo_path(args.reference_onnx), "--reference-onnx") if args.reference_onnx else None
    )
    calib_path = check_input_file(resolve_repo_path(args.calib_path), "--calib-path") if args.calib_path else None
    if args.num_images < 1:
        raise UserError(f"--num-images must be >= 1, got {args.num_images}")
    if not args.threshold > 0:
        raise UserError(f"--threshold must be > 0, got {args.threshold}")
    if args.top < 1:
        raise UserError(f"--top must be >= 1, got {args.top}")
    if reference_path is not None and calib_path is None:
        raise UserError("--reference-onnx is used only with --calib-path; give both")
    if calib_path is not None and reference_path is None and source_path is None:
        raise UserError("--calib-path needs a model to compare against: give --reference-onnx or --source-onnx")
    _check_suffix(args.json_out, ".json", "--json-out")
    _check_suffix(args.csv_out, ".csv", "--csv-out")
    _check_suffix(args.write_fp32_quantize, ".onnx", "--write-fp32-quantize")
    outputs = [(p, f) for p, f in ((args.json_out, "--json-out"), (args.csv_out, "--csv-out"),
                                   (args.write_fp32_quantize, "--write-fp32-quantize")) if p is not None]
    if args.write_fp32_quantize is not None and args.write_fp32_quantize.resolve() == model_path.resolve():
        raise UserError("--write-fp32-quantize must differ from --onnx-path")
    manifest_path = None
    if outputs:
        # "<stem>.inspect.manifest.json": never the quantizer's "<stem>.manifest.json" beside the same model
        stem = outputs[0][0].with_suffix("")
        name = f"{stem.name}.manifest.json" if stem.name.endswith(".inspect") else f"{stem.name}.inspect.manifest.json"
        manifest_path = stem.with_name(name)
    for path, _flag in outputs:
        refuse_overwrite(path, args.overwrite)

    from lowbit import qdq_inspect

    model = _load(model_path, "--onnx-path")
    source = _load(source_path, "--source-onnx") if source_path else None
    reference = _load(reference_path, "--reference-onnx") if reference_path else source
    images = None
    if calib_path is not None:
        images = qdq_inspect.load_images(calib_path, args.num_images, _input_shape(model))
    # the static part is quick: run it before anything is written, so a useless rewrite request fails early
    report = qdq_inspect.inspect_qdq(model, source)
    if args.write_fp32_quantize is not None and not report["counts"]["fp16_quantize_inputs"]:
        raise UserError(f"--write-fp32-quantize: {model_path} has no float16 QuantizeLinear node to rewrite")

    def run(manifest=None) -> dict:
        report["model"] = str(model_path)
        report["source"] = str(source_path) if source_path else None
        report["runtime"] = qdq_inspect.probe_fp16_quantize_rounding()
        fixed = None
        if report["counts"]["fp16_quantize_inputs"] and (args.write_fp32_quantize or images is not None):
            fixed, changed = qdq_inspect.with_fp32_quantize(model)
            log.info("%d float16 QuantizeLinear nodes rewritten to compute in float32", changed)
        if images is not None:
            log.info("running %d images through %s and %s (all tensors exposed)", len(images), model_path,
                     reference_path or source_path)
            dynamic = qdq_inspect.compare_runs(model, reference, images, threshold=args.threshold, top=args.top)
            dynamic["reference"] = str(reference_path or source_path)
            report["dynamic"] = dynamic
            if fixed is not None:
                report["fp32_quantize_check"] = {
                    "images": len(images),
                    "nodes": report["counts"]["fp16_quantize_inputs"],
                    "outputs": qdq_inspect.output_error(model, fixed, images),
                }
        if args.write_fp32_quantize is not None:
            atomic_write_bytes(args.write_fp32_quantize, fixed.SerializeToString())
            log.info("wrote %s", args.write_fp32_quantize)
        report["verdict"] = qdq_inspect.verdict(report)
        report["findings"] = qdq_inspect.findings_present(report)
        if args.json_out is not None:
            atomic_write_json(args.json_out, report)
            log.info("wrote %s", args.json_out)
        if args.csv_out is not None:
            atomic_write_text(args.csv_out, _csv_text(qdq_inspect.pairs_table(report)))
            log.info("wrote %s", args.csv_out)
        if manifest is not None:
            for path, flag in outputs:
                manifest.add_output(flag.lstrip("-"), path)
            manifest.update(verdict=report["verdict"], findings=report["findings"], counts=report["counts"])
        return report

    if manifest_path is not None:
        with manifest_run(manifest_path, SCRIPT, vars(args), argv) as manifest:
            for path in (model_path, source_path, reference_path, calib_path):
                if path is not None:
                    manifest.add_input(path)
            run(manifest)
    else:
        run()
    print(format_report(report, model_path), end="")
    return 1 if (args.fail_on_findings and report["findings"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
