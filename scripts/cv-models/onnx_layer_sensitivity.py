"""ONNX-native per-node quantization sensitivity of a YOLOv10 detector (INT8 or FP8), as a layer-sensitivity report.

Scores the ONNX graph that will be deployed, so no torch<->ONNX name or weight matching is involved:

1. quantize the FP32 model once with ModelOpt through ``quantize_yolov10m_onnx.py`` (INT8 entropy or
   FP8 max calibration by default, FP32 high precision), on the first ``--calib-images`` images;
   or take an existing Q/DQ model of the same graph with ``--qdq-path``;
2. for every node ModelOpt quantized (Convs, and the Add/Concat/MatMul/... nodes that read Q/DQ
   tensors), run it on the FP32 model's own input activations once as-is and once through copies of
   its Q/DQ pairs, on ``--num-images`` calibration images (one ONNX Runtime pass per image scores all
   nodes; see ``lowbit.sensitivity_onnx``);
3. score = relative MSE of the node's output (higher = more sensitive): the error the node itself
   introduces when quantized, not what it inherits from upstream.

Writes into ``--out-dir``: ``layer-sensitivity-report.json`` (+ ``.csv``, ``.md``; the format shared with
the torch sweep, ``source: "onnx"``), ``manifest.json``, a log, the Q/DQ model under ``qdq/``, and with
``--compare-with`` a ``ranking-agreement.json`` (Spearman rank correlation and top-K overlap with
another report, e.g. the torch sweep's, both mapped onto the nodes of ``--onnx-path``). To compare two
existing reports without scoring again, use ``compare_sensitivity_reports.py``.

Example::

    python scripts/cv-models/onnx_layer_sensitivity.py \
        --onnx-path models/cv-models/yolov10m/checkpoints/yolov10m.onnx \
        --calib-path tmp/yolov10m_lowbit/run/calib/calib_yolov10m_640.npy \
        --precision int8 --num-images 16
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from lowbit.logs import get_logger, setup_logging
from lowbit.ort_session import MODELOPT_CALIBRATION_EPS
from lowbit.runs import (
    CARD_ONNX_PATH,
    REPO_ROOT,
    UserError,
    atomic_write_json,
    check_input_file,
    load_script,
    manifest_run,
    new_run_dir,
    resolve_repo_path,
    sha256_file,
)
from lowbit.cli import cli_entry

SCRIPT = "onnx_layer_sensitivity.py"
DEFAULT_ONNX = CARD_ONNX_PATH
OUTPUT_ROOT = REPO_ROOT / "tmp" / "yolov10m_layer_sensitivity"
QUANTIZE_SCRIPT = Path(__file__).resolve().parent / "quantize_yolov10m_onnx.py"
PROVIDERS = ("CPUExecutionProvider", "CUDAExecutionProvider")
# quantize_yolov10m_onnx.py's --calibration-eps choices, checked here so a typo fails before any work.
CALIBRATION_EPS = MODELOPT_CALIBRATION_EPS
log = get_logger("onnx_layer_sensitivity")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
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
        help="ORT providers ModelOpt calibrates with, in order (passed to quantize_yolov10m_onnx.py)",
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


def validate(args: argparse.Namespace):
    """Check every input before heavy work; returns ``(onnx_path, calib_path, fp32_model, calib, other_report)``."""
    import onnx

    from lowbit.sensitivity_report import load_report

    if args.num_images < 1:
        raise UserError("--num-images must be >= 1")
    if args.calib_images is not None and args.calib_images < 1:
        raise UserError("--calib-images must be >= 1")
    onnx_path = check_input_file(resolve_repo_path(args.onnx_path), "--onnx-path")
    calib_path = check_input_file(resolve_repo_path(args.calib_path), "--calib-path")
    if args.qdq_path is not None:
        check_input_file(resolve_repo_path(args.qdq_path), "--qdq-path")
        if args.calibration_method or args.calib_images:
            raise UserError(
                "--calibration-method/--calib-images quantize a new model; they do not apply with --qdq-path"
            )
    other = None
    if args.compare_with is not None:
        compare_path = check_input_file(resolve_repo_path(args.compare_with), "--compare-with")
        other = load_report(compare_path, "--compare-with")

    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as e:  # protobuf raises several types for a file that is not a model
        raise UserError(f"--onnx-path: {onnx_path} is not a readable ONNX model ({e})") from e
    if len(model.graph.input) != 1:
        raise UserError(f"--onnx-path: {onnx_path} has {len(model.graph.input)} inputs; expected one image input")
    graph_input = model.graph.input[0]
    dims = [d.dim_value or None for d in graph_input.type.tensor_type.shape.dim]
    if len(dims) != 4 or dims[1] != 3 or dims[2] is None or dims[3] is None:
        raise UserError(
            f"--onnx-path: input {graph_input.name!r} has shape {dims}; expected [1,3,H,W] with static H, W"
        )
    try:
        calib = np.load(calib_path, mmap_mode="r")
    except ValueError as e:
        raise UserError(f"--calib-path: {calib_path} is not a .npy array ({e})") from e
    if calib.dtype != np.float32 or calib.ndim != 4 or list(calib.shape[1:]) != dims[1:]:
        raise UserError(
            f"--calib-path: {calib_path} holds {calib.dtype} {list(calib.shape)}; the model input "
            f"{graph_input.name!r} needs float32 [N,{','.join(str(d) for d in dims[1:])}]"
        )
    if calib.shape[0] < 1:
        raise UserError(f"--calib-path: {calib_path} holds no images")
    return onnx_path, calib_path, model, calib, other


def resolve_out_dir(args: argparse.Namespace) -> Path:
    """``--out-dir``, or a fresh default run folder; refuses to replace finished results without --overwrite."""
    from lowbit.sensitivity_report import report_paths

    if args.out_dir is None:
        run = new_run_dir(OUTPUT_ROOT)
        return run / "outputs" / "yolov10m" / f"onnx-{args.precision}" / "per_layer"
    out_dir = args.out_dir if args.out_dir.is_absolute() else Path.cwd() / args.out_dir
    existing = [p for p in [*report_paths(out_dir).values(), out_dir / "manifest.json"] if p.exists()]
    if existing and not args.overwrite:
        raise UserError(
            f"--out-dir {out_dir} already holds results ({existing[0].name}); pass --overwrite to replace them"
        )
    return out_dir


def quantize(args, onnx_path: Path, calib_path: Path, qdq_path: Path, calib_images: int, log_file: Path) -> None:
    """Run quantize_yolov10m_onnx.py's main() in-process; it writes ``qdq_path`` plus its own manifest and logs."""
    argv = [
        "--onnx-path", str(onnx_path),
        "--calib-path", str(calib_path),
        "--output-path", str(qdq_path),
        "--quantize-mode", args.precision,
        "--high-precision-dtype", "fp32",
        "--max-calib-images", str(calib_images),
        "--calibration-eps", *args.calibration_eps,
    ]  # fmt: skip
    if args.calibration_method:
        argv += ["--calibration-method", args.calibration_method]
    if args.overwrite:
        argv.append("--overwrite")
    try:
        rc = load_script(QUANTIZE_SCRIPT).main(argv)
    finally:
        setup_logging(log_file, args.verbose)  # the quantizer installed its own log handlers
    if rc != 0:
        raise UserError(f"quantization failed (exit {rc}); see {qdq_path.with_suffix('')}.log and the error above")


def check_qdq_model(qdq_model, fp32_model, precision: str, flag: str) -> None:
    """The Q/DQ model must quantize to ``precision`` and its quantized nodes must be nodes of the FP32 graph."""
    from lowbit.qdq_graph import find_quantized_nodes, qdq_info

    info = qdq_info(qdq_model)
    if not info["is_qdq"]:
        raise UserError(f"{flag}: the model has no Q/DQ nodes")
    if info["is_fp8"] != (precision == "fp8"):
        dtypes = ", ".join(info["quant_dtypes"])
        raise UserError(f"{flag}: the model quantizes to {dtypes}, not --precision {precision}")
    fp32_names = {node.name for node in fp32_model.graph.node}
    missing = [n.name for n in find_quantized_nodes(qdq_model.graph) if n.name not in fp32_names]
    if missing:
        raise UserError(
            f"{flag}: {len(missing)} quantized node(s) are not nodes of --onnx-path (first: {missing[0]}); "
            "was the Q/DQ model made from another graph?"
        )


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import onnx

    from lowbit import sensitivity_onnx as sens
    from lowbit import sensitivity_report
    from lowbit.ort_session import check_providers

    t_start = time.perf_counter()
    check_providers(args.providers, disable_cpu_fallback=False)
    onnx_path, calib_path, fp32_model, calib, other = validate(args)
    out_dir = resolve_out_dir(args)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_file = out_dir / "onnx_layer_sensitivity.log"
    if args.overwrite:  # a re-run must not leave the previous results looking like its own
        previous = [*sensitivity_report.report_paths(out_dir).values(), out_dir / sensitivity_report.AGREEMENT_FILE]
        for path in [*previous, log_file]:
            path.unlink(missing_ok=True)
    setup_logging(log_file, args.verbose)

    num_images = min(args.num_images, calib.shape[0])
    if num_images < args.num_images:
        log.warning(
            "--num-images %d: %s holds only %d images; scoring all of them", args.num_images, calib_path, num_images
        )
    calib_images = min(args.calib_images or args.num_images, calib.shape[0])
    imgsz = int(calib.shape[2])

    with manifest_run(out_dir / "manifest.json", SCRIPT, vars(args), argv) as manifest:
        model_sha = manifest.add_input(onnx_path)
        manifest.add_input(calib_path)

        t0 = time.perf_counter()
        if args.qdq_path is None:
            qdq_path = out_dir / "qdq" / f"{onnx_path.stem}-{args.precision}-qdq.onnx"
            log.info("quantizing %s to %s with ModelOpt on %d images", onnx_path, args.precision, calib_images)
            quantize(args, onnx_path, calib_path, qdq_path, calib_images, log_file)
            flag = "quantized model"
        else:
            qdq_path = resolve_repo_path(args.qdq_path)
            flag = "--qdq-path"
        quantize_s = time.perf_counter() - t0
        qdq_sha = manifest.add_input(qdq_path) if args.qdq_path is not None else sha256_file(qdq_path)
        qdq_model = onnx.load(str(qdq_path))
        check_qdq_model(qdq_model, fp32_model, args.precision, flag)

        t0 = time.perf_counter()
        error_model, nodes, reference_outputs = sens.build_local_error_model(qdq_model)
        del qdq_model
        session = sens.local_error_session(error_model, args.providers)
        del error_model
        if session.get_providers()[: len(args.providers)] != list(args.providers):
            raise UserError(
                f"--providers: ONNX Runtime could not create {', '.join(args.providers)} "
                f"(the session got {', '.join(session.get_providers())})"
            )
        build_s = time.perf_counter() - t0
        input_name = session.get_inputs()[0].name
        log.info("scoring %d quantized nodes on %d images (graph built in %.1f s)", len(nodes), num_images, build_s)

        # The float path of the scoring graph must be the FP32 model itself, or the scores are about something else.
        import onnxruntime as ort

        first = np.ascontiguousarray(calib[:1])
        fp32_session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        expected = fp32_session.run(None, {fp32_session.get_inputs()[0].name: first})
        del fp32_session
        recovered = session.run(reference_outputs, {input_name: first})
        drift = max(
            float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-12)) for a, b in zip(expected, recovered)
        )
        log.info("recovered FP32 graph vs --onnx-path on image 0: max |diff| / max |out| = %.2e", drift)
        if drift > 1e-3:
            raise UserError(
                f"{flag}: its float graph does not reproduce --onnx-path (relative difference {drift:.2e}); "
                "score a Q/DQ model made from this exact FP32 model"
            )

        t0 = time.perf_counter()

        def images():
            for i, image in enumerate(sens.iter_batches(calib, num_images)):
                yield image
                log.info("image %d/%d scored (%.1f s)", i + 1, num_images, time.perf_counter() - t0)

        sse, ref, count = sens.score_local_errors(session, nodes, images(), input_name)
        score_s = time.perf_counter() - t0
        scores = sens.relative_mse(sse, ref)
        if not np.all(np.isfinite(scores)):
            raise RuntimeError("non-finite sensitivity scores; see the log")

        layers = sensitivity_report.rank_layers(
            [
                {"name": n.name, "op_type": n.op_type, "weight": n.weight, "onnx_node": n.name, "score": float(s)}
                for n, s in zip(nodes, scores)
            ]
        )
        calibration_method = args.calibration_method or ("max" if args.precision == "fp8" else "entropy")
        method = {
            "name": sens.METHOD_NAME,
            "description": sens.METHOD_DESCRIPTION,
            "score": sens.METHOD_SCORE,
            "higher_is_more_sensitive": True,
            "settings": {
                "qdq_model": str(qdq_path),
                "qdq_model_sha256": qdq_sha,
                "quantizer": "modelopt.onnx.quantization (quantize_yolov10m_onnx.py)",
                "calibration_method": None if args.qdq_path else calibration_method,
                "calibration_images": None if args.qdq_path else calib_images,
                "quantized_nodes": len(nodes),
                "ort_session_config": {"session.disable_quant_qdq": "1"},
            },
        }
        device = "cpu" if args.providers[0] == "CPUExecutionProvider" else "cuda:0"
        report = sensitivity_report.make_report(
            source="onnx",
            model=onnx_path,
            model_sha256=model_sha,
            precision=args.precision,
            method=method,
            data={"images": count, "source": str(calib_path), "imgsz": imgsz},
            device=device,
            wall_s=time.perf_counter() - t_start,
            layers=layers,
        )
        paths = sensitivity_report.write_report(out_dir, report)
        for ext, path in paths.items():
            manifest.add_output(f"report_{ext}", path)
        manifest.add_output("qdq_model", qdq_path)
        manifest.add_output("log", log_file)

        agreement = None
        if other is not None:
            agreement = sensitivity_report.compare_reports(report, other, sens.NodeMatcher(fp32_model))
            agreement["a"]["report"] = str(paths["json"])
            agreement["b"]["report"] = str(resolve_repo_path(args.compare_with))
            agreement["graph"] = str(onnx_path)
            atomic_write_json(out_dir / sensitivity_report.AGREEMENT_FILE, agreement)
            manifest.add_output("ranking_agreement", out_dir / sensitivity_report.AGREEMENT_FILE)
            log.info(
                "agreement with %s: %d matched nodes, Spearman %s, top-K overlap %s",
                args.compare_with, agreement["matched"], agreement["spearman"],
                {k: v["overlap"] for k, v in agreement["top_k"].items()},
            )
        manifest.update(
            quantize_s=round(quantize_s, 2),
            build_s=round(build_s, 2),
            score_s=round(score_s, 2),
            images=count,
            quantized_nodes=len(nodes),
            fp32_recovery_rel_diff=drift,
            providers=session.get_providers(),
        )
        log.info("timings: quantize %.1f s, build %.1f s, score %.1f s", quantize_s, build_s, score_s)

    top = ", ".join(f"{layer['name']} ({layer['score']:.3g})" for layer in layers[:5])
    print(f"{args.precision} ONNX sensitivity of {len(layers)} nodes on {count} images -> {paths['json']}")
    print(f"top 5: {top}")
    if agreement is not None:
        overlap = ", ".join(f"top-{k} {v['overlap']}/{k}" for k, v in agreement["top_k"].items())
        print(f"vs {args.compare_with}: {agreement['matched']} matched, Spearman {agreement['spearman']}, {overlap}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
