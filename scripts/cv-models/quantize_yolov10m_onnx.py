"""ModelOpt ONNX post-training quantization (INT8 or FP8 Q/DQ) of a YOLOv10 detector, with a manifest.

A thin layer over ``modelopt.onnx.quantization.quantize``: it validates the inputs first, maps
user-facing settings to ModelOpt's arguments (exact node names, a real boolean for
``use_zero_point``), runs ModelOpt with its log captured in the run dir, then checks that the
output loads in ONNX Runtime and runs one calibration image. The model file appears only when all
of that succeeded.

Example (what ``quantize_yolov10m_int8_onnx.sh`` runs)::

    python scripts/cv-models/quantize_yolov10m_onnx.py \
        --onnx-path models/cv-models/yolov10m/checkpoints/yolov10m.onnx \
        --calib-path tmp/yolov10m_lowbit/run/calib/calib_yolov10m_640.npy \
        --output-path tmp/yolov10m_lowbit/run/onnx/yolov10m-int8-qdq.onnx \
        --quantize-mode int8 --calibration-method entropy --calibration-eps cuda:0 cpu
"""

from __future__ import annotations

import argparse
import logging
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from lowbit.logs import setup_logging
from lowbit.ort_session import MODELOPT_CALIBRATION_EPS
from lowbit.qdq_graph import qdq_summary
from lowbit.runs import (
    UserError,
    check_input_file,
    manifest_run,
    refuse_overwrite,
)
from lowbit.cli import cli_entry

QUANTIZE_MODES = ("int8", "fp8", "int4")
CALIBRATION_METHODS = ("entropy", "max")
CALIBRATION_EPS = MODELOPT_CALIBRATION_EPS
HIGH_PRECISION_DTYPES = ("fp32", "fp16", "bf16")
# fp32 keeps every non-quantized tensor in float32. ModelOpt's own default is fp16, which on YOLOv10
# collapses accuracy (see the model card's INT8 section); pass fp16 explicitly to get it.
DEFAULT_HIGH_PRECISION_DTYPE = "fp32"
PASSES = ("concat_elimination",)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--onnx-path", type=Path, required=True, help="FP32 ONNX model to quantize")
    parser.add_argument("--calib-path", type=Path, required=True, help="calibration tensor .npy, float32 [N,3,H,W]")
    parser.add_argument("--output-path", type=Path, required=True, help="quantized model to write (.onnx)")
    parser.add_argument("--quantize-mode", choices=QUANTIZE_MODES, default="int8")
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
        type=Path,
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
    parser.add_argument("--max-calib-images", type=int, default=None, help="use only the first N calibration images")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output model")
    return parser


def parse_exclusions(args: argparse.Namespace, node_names: set[str]) -> list[str]:
    """Exact node names to exclude, validated against the graph."""
    names = list(args.nodes_to_exclude)
    if args.exclude_json is not None:
        import json

        check_input_file(args.exclude_json, "--exclude-json")
        try:
            scheme = json.loads(args.exclude_json.read_text())
            names += list(scheme["nodes_to_exclude"])
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"--exclude-json: {args.exclude_json} has no 'nodes_to_exclude' list ({e})") from e
    names = list(dict.fromkeys(names))  # keep order, drop repeats
    unknown = [n for n in names if n not in node_names]
    if unknown:
        shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise UserError(f"--nodes-to-exclude: {len(unknown)} name(s) are not nodes of the model: {shown}")
    return names


def check_op_types(args: argparse.Namespace, op_types: set[str]) -> None:
    """--op-types-to-quantize/--op-types-to-exclude must name op types the graph has."""
    for flag, values in (("--op-types-to-quantize", args.op_types_to_quantize), ("--op-types-to-exclude", args.op_types_to_exclude)):
        unknown = [v for v in values or [] if v not in op_types]
        if unknown:
            raise UserError(f"{flag}: {', '.join(unknown)} not an op type of the model (it has: {', '.join(sorted(op_types))})")


def exact_patterns(names: list[str]) -> list[str]:
    """ModelOpt matches nodes_to_exclude with ``re.match`` (a prefix regex); anchor and escape each name."""
    return [re.escape(name) + "$" for name in names]


def external_data_files(model) -> list[str]:
    """Relative paths of the external-data files an ONNX model's initializers point to."""
    locations = set()
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                locations.add(entry.value)
    return sorted(locations)


def count_int4_targets(model) -> int:
    """Nodes ModelOpt's INT4 mode would quantize: Gemm/MatMul with a constant weight input."""
    initializers = {init.name for init in model.graph.initializer}
    return sum(
        1
        for node in model.graph.node
        if node.op_type in ("Gemm", "MatMul") and len(node.input) > 1 and node.input[1] in initializers
    )


def calibration_eps_used(onnx_path: Path, eps: list[str]) -> list[str]:
    """The ORT providers a ModelOpt calibration session really gets for ``eps``.

    ModelOpt drops EPs whose libraries are missing, and ORT itself silently drops a CUDA EP that
    fails to initialise (no GPU); both happen inside ``quantize``. Building a session with
    ModelOpt's own factory and reading ``get_providers()`` reports what calibration ran on.
    """
    from modelopt.onnx.quantization.ort_utils import create_inference_session

    return list(create_inference_session(str(onnx_path), list(eps)).get_providers())


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import onnx

    onnx_path = check_input_file(args.onnx_path, "--onnx-path")
    calib_path = check_input_file(args.calib_path, "--calib-path")
    output_path: Path = args.output_path
    if output_path.suffix != ".onnx":
        raise UserError(f"--output-path: {output_path} must end in .onnx")
    refuse_overwrite(output_path, args.overwrite)
    if args.max_calib_images is not None and args.max_calib_images < 1:
        raise UserError("--max-calib-images must be >= 1")

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as e:  # protobuf raises several types for a file that is not a model
        raise UserError(f"--onnx-path: {onnx_path} is not a readable ONNX model ({e})") from e
    if args.quantize_mode == "int4":
        targets = count_int4_targets(model)
        raise UserError(
            f"--quantize-mode int4: ModelOpt's INT4 mode quantizes only Gemm/MatMul nodes with constant weights; "
            f"{onnx_path} has {targets} of {len(model.graph.node)} nodes, so the result would not be an INT4 model. "
            "Use int8 or fp8."
        )
    exclusions = parse_exclusions(args, {n.name for n in model.graph.node})
    check_op_types(args, {n.op_type for n in model.graph.node})

    # Memory-map: the calibration tensor can be larger than what we want resident twice.
    try:
        calib = np.load(calib_path, mmap_mode="r")
    except ValueError as e:
        raise UserError(f"--calib-path: {calib_path} is not a .npy array ({e})") from e
    graph_input = model.graph.input[0]
    dims = [d.dim_value or None for d in graph_input.type.tensor_type.shape.dim]
    if calib.dtype != np.float32 or calib.ndim != 4 or list(calib.shape[1:]) != dims[1:]:
        raise UserError(
            f"--calib-path: {calib_path} holds {calib.dtype} {list(calib.shape)}; the model input "
            f"'{graph_input.name}' needs float32 [N,{','.join(str(d) for d in dims[1:])}]"
        )
    if calib.shape[0] < 1:
        raise UserError(f"--calib-path: {calib_path} holds no images")
    if args.max_calib_images is not None:
        calib = calib[: args.max_calib_images]

    calibration_method = args.calibration_method or ("max" if args.quantize_mode == "fp8" else "entropy")
    output_path.parent.mkdir(parents=True, exist_ok=True)
    stem = output_path.with_suffix("")
    log_file = Path(f"{stem}.modelopt.log")
    manifest_path = Path(f"{stem}.manifest.json")
    logger = setup_logging(Path(f"{stem}.log"))
    use_zero_point_effective = args.quantize_mode == "int4"
    settings = {
        "quantize_mode": args.quantize_mode,
        "calibration_method": calibration_method,
        "calibration_eps_requested": args.calibration_eps,
        "high_precision_dtype": args.high_precision_dtype,
        "use_zero_point": args.use_zero_point,
        "use_zero_point_effective": use_zero_point_effective,
        "passes": args.passes,
        "op_types_to_quantize": args.op_types_to_quantize,
        "op_types_to_exclude": args.op_types_to_exclude,
        "calibrate_per_node": args.calibrate_per_node,
        "calibration_images": int(calib.shape[0]),
        "nodes_to_exclude": exclusions,
    }
    if args.use_zero_point and not use_zero_point_effective:
        logger.warning("use_zero_point=True has no effect in %s mode (ModelOpt 0.47 uses it for int4 only)", args.quantize_mode)

    with manifest_run(manifest_path, "quantize_yolov10m_onnx.py", vars(args)) as manifest:
        manifest.add_input(onnx_path)
        manifest.add_input(calib_path)
        manifest.update(settings=settings)
        # ModelOpt writes intermediate files next to its input model, and measured with 0.47 it also
        # rewrites the input file itself (through a symlink too). Quantize a private copy in the run
        # dir so the user's checkpoint is never touched.
        work_dir = Path(f"{stem}.work")
        shutil.rmtree(work_dir, ignore_errors=True)
        work_dir.mkdir(parents=True)
        work_input = work_dir / onnx_path.name
        shutil.copyfile(onnx_path, work_input)
        for location in external_data_files(model):
            shutil.copyfile(onnx_path.parent / location, work_dir / location)
        work_output = work_dir / "quantized.onnx"

        from modelopt.onnx.quantization import quantize  # heavy: imported only when quantizing

        eps_used = calibration_eps_used(work_input, args.calibration_eps)
        logger.info("calibration runs on ORT providers %s (requested %s)", eps_used, args.calibration_eps)
        if any(ep.startswith(("cuda", "trt")) for ep in args.calibration_eps) and eps_used == ["CPUExecutionProvider"]:
            logger.warning("no GPU execution provider could be created: calibration runs on CPU only")
        logger.info(
            "ModelOpt %s quantization: method=%s high_precision=%s eps=%s excluded=%d images=%d",
            args.quantize_mode, calibration_method, args.high_precision_dtype, args.calibration_eps,
            len(exclusions), calib.shape[0],
        )
        # ModelOpt re-configures its logger (dropping a log_file handler) part-way through, but its
        # records always propagate to the root logger: capture the full log there.
        modelopt_log = logging.FileHandler(log_file, mode="w", encoding="utf-8")
        modelopt_log.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
        root_logger = logging.getLogger()
        root_logger.addHandler(modelopt_log)
        t0 = time.perf_counter()
        try:
            quantize(
                onnx_path=str(work_input),
                quantize_mode=args.quantize_mode,
                calibration_data=np.ascontiguousarray(calib),
                calibration_method=calibration_method,
                calibration_eps=list(args.calibration_eps),
                nodes_to_exclude=exact_patterns(exclusions),
                high_precision_dtype=args.high_precision_dtype,
                use_zero_point=args.use_zero_point,
                passes=list(args.passes),
                op_types_to_quantize=args.op_types_to_quantize,
                op_types_to_exclude=args.op_types_to_exclude,
                calibrate_per_node=args.calibrate_per_node,
                output_path=str(work_output),
                log_level="INFO",
            )
        finally:
            root_logger.removeHandler(modelopt_log)
            modelopt_log.close()
        quantize_s = time.perf_counter() - t0
        if not work_output.exists():
            raise RuntimeError(f"ModelOpt finished without writing {work_output}; see {log_file}")

        quantized = onnx.load(str(work_output))
        summary = qdq_summary(quantized)
        if summary["qdq_pairs"] == 0:
            raise RuntimeError(f"ModelOpt produced no Q/DQ pairs; see {log_file}")

        # Load and run one calibration image in ORT before publishing the model.
        from lowbit.ort_session import build_session

        session, session_info = build_session(work_output, ["CPUExecutionProvider"])
        sample = np.ascontiguousarray(calib[:1])
        outputs = session.run(None, {session.get_inputs()[0].name: sample})
        finite = all(np.isfinite(o).all() for o in outputs)
        if not finite:
            raise RuntimeError("the quantized model produced NaN/Inf on a calibration image")
        del session

        fp16_hazard = None
        if args.high_precision_dtype != "fp32":
            from lowbit.qdq_inspect import fp16_quantize_hazard

            fp16_hazard = fp16_quantize_hazard(quantized)
            if fp16_hazard is not None:
                logger.warning("%s", fp16_hazard["message"])
        manifest.update(fp16_quantize_hazard=fp16_hazard)

        shutil.move(str(work_output), output_path)
        shutil.rmtree(work_dir, ignore_errors=True)
        manifest.add_output("model", output_path)
        manifest.add_output("modelopt_log", log_file)
        manifest.update(
            calibration_eps_used=eps_used,
            quantize_s=round(quantize_s, 2),
            output_sha256=manifest.add_input(output_path),
            qdq_pairs=summary["qdq_pairs"],
            quantized_nodes=summary["quantized_nodes"],
            num_quantized_nodes=len(summary["quantized_nodes"]),
            excluded_nodes=exclusions,
            validation={"session": session_info, "outputs_finite": finite},
        )
        # the output is not an input; keep the digest under outputs only
        manifest.data["inputs"].pop(str(output_path), None)

    print(
        f"{args.quantize_mode} Q/DQ model: {output_path} ({summary['qdq_pairs']} Q/DQ pairs, "
        f"{len(summary['quantized_nodes'])} nodes quantized, {len(exclusions)} excluded, {quantize_s:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
