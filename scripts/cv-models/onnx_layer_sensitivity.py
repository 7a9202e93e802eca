"""ONNX-native per-node quantization sensitivity of a YOLOv10 detector (INT8 or FP8), as a layer-sensitivity report.

Scores the ONNX graph that will be deployed, so no torch<->ONNX name or weight matching is involved:

1. quantize the FP32 model once with ModelOpt (``lowbit.quantize.quantize_onnx``: INT8 entropy or
   FP8 max calibration by default, FP32 high precision), on the first ``--calib-images`` images;
   or take an existing Q/DQ model of the same graph with ``--qdq-path``;
2. score every node ModelOpt quantized (Convs, and the Add/Concat/MatMul/... nodes that read Q/DQ
   tensors) on ``--num-images`` calibration images, by one of two methods (``--method``):

   * ``loo`` (propagated, what the workflow uses): leave-one-out on the whole Q/DQ graph
     (``lowbit.sensitivity_loo``): the full Q/DQ model with only that node in float is run, and the
     drop in detection-aware output drift against FP32 (the torch sweep's ``--metric``) is the score.
     Cost: ``3 + nodes`` inferences per image, all in one session;
   * ``local`` (cheap): the node is run on the FP32 model's own input activations as-is and through
     copies of its Q/DQ pairs (one ONNX Runtime pass per image scores all nodes;
     ``lowbit.sensitivity_onnx``); score = relative MSE of its output, the error the node itself
     introduces, not what survives to the detector's output.

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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lowbit.cli import cli_entry
from lowbit.errors import UserError
from lowbit.logs import get_logger, setup_logging
from lowbit.ort_session import MODELOPT_CALIBRATION_EPS
from lowbit.runs import (
    CARD_ONNX_PATH,
    REPO_ROOT,
    atomic_write_json,
    check_input_file,
    manifest_run,
    new_run_dir,
    resolve_repo_path,
    sha256_file,
)

SCRIPT = "onnx_layer_sensitivity.py"
DEFAULT_ONNX = CARD_ONNX_PATH
OUTPUT_ROOT = REPO_ROOT / "tmp" / "yolov10m_layer_sensitivity"
PROVIDERS = ("CPUExecutionProvider", "CUDAExecutionProvider")
# The quantizer's --calibration-eps choices, checked here so a typo fails before any work.
CALIBRATION_EPS = MODELOPT_CALIBRATION_EPS
MAX_FP32_RECOVERY_DIFF = 1e-3  # relative: the scoring graph's float path must be the FP32 model itself
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
    parser.add_argument("--method", choices=("loo", "single", "local"), default="local",
                        help="loo: propagated leave-one-out output drift; single: output drift with that node alone "
                             "quantized (the torch sweep's score on the ONNX graph); local: each node's own output error")
    parser.add_argument("--metric", choices=("det_kl", "rel_mse"), default="det_kl",
                        help="output drift scored by --method loo (the torch sweep's metrics)")
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


@dataclass
class Inputs:
    """Validated inputs: paths, the FP32 graph (no external data), the calibration images, the other report."""

    onnx_path: Path
    calib_path: Path
    fp32_model: object
    calib: np.ndarray
    other: dict | None


def validate(args: argparse.Namespace) -> Inputs:
    """Check every input before heavy work."""
    from lowbit.calib import load_calib_tensor
    from lowbit.onnx_stats import load_model_proto
    from lowbit.sensitivity_report import load_report

    if args.num_images < 1:
        raise UserError(f"--num-images must be >= 1, got {args.num_images}", flag="--num-images")
    if args.calib_images is not None and args.calib_images < 1:
        raise UserError(f"--calib-images must be >= 1, got {args.calib_images}", flag="--calib-images")
    onnx_path = check_input_file(resolve_repo_path(args.onnx_path), "--onnx-path")
    calib_path = check_input_file(resolve_repo_path(args.calib_path), "--calib-path")
    if args.qdq_path is not None:
        check_input_file(resolve_repo_path(args.qdq_path), "--qdq-path")
        if args.calibration_method or args.calib_images:
            raise UserError(
                "--calibration-method/--calib-images quantize a new model; they do not apply with --qdq-path",
                flag="--qdq-path",
            )
    other = None
    if args.compare_with is not None:
        compare_path = check_input_file(resolve_repo_path(args.compare_with), "--compare-with")
        other = load_report(compare_path, "--compare-with")
    model = load_model_proto(onnx_path, "--onnx-path")
    if len(model.graph.input) != 1:
        raise UserError(f"--onnx-path: {onnx_path} has {len(model.graph.input)} inputs; expected one image input",
                        flag="--onnx-path")  # fmt: skip
    graph_input = model.graph.input[0]
    dims = [d.dim_value or None for d in graph_input.type.tensor_type.shape.dim]
    if len(dims) != 4 or dims[1] != 3 or dims[2] is None or dims[3] is None:
        shown = ["?" if d is None else d for d in dims]
        raise UserError(f"--onnx-path: input {graph_input.name!r} has shape {shown}; expected [1,3,H,W] with static "
                        "H and W", flag="--onnx-path")  # fmt: skip
    calib = load_calib_tensor(calib_path, "--calib-path", max_images=max(args.num_images, args.calib_images or 0))
    if list(calib.shape[2:]) != dims[2:]:
        raise UserError(f"--calib-path: {calib_path} holds {calib.shape[2]}x{calib.shape[3]} images; the model "
                        f"input {graph_input.name!r} needs {dims[2]}x{dims[3]}", flag="--calib-path")  # fmt: skip
    return Inputs(onnx_path, calib_path, model, calib, other)


def resolve_out_dir(args: argparse.Namespace) -> Path:
    """``--out-dir``, or a fresh default run folder; refuses to replace finished results without --overwrite."""
    from lowbit.sensitivity_report import report_paths

    if args.out_dir is None:
        run = new_run_dir(OUTPUT_ROOT)
        return run / "outputs" / Path(args.onnx_path).stem / f"onnx-{args.precision}" / "per_layer"
    out_dir = args.out_dir if args.out_dir.is_absolute() else Path.cwd() / args.out_dir
    existing = [p for p in [*report_paths(out_dir).values(), out_dir / "manifest.json"] if p.exists()]
    if existing and not args.overwrite:
        raise UserError(
            f"--out-dir {out_dir} already holds results ({existing[0].name}); pass --overwrite to replace them",
            flag="--overwrite",
        )
    return out_dir


def quantized_model(args: argparse.Namespace, inputs: Inputs, out_dir: Path, calib_images: int) -> tuple[Path, str]:
    """``(Q/DQ model path, the flag its errors are about)``: ``--qdq-path``, or a fresh ModelOpt quantization."""
    if args.qdq_path is not None:
        return resolve_repo_path(args.qdq_path), "--qdq-path"
    from lowbit.quantize import QuantizeSettings, quantize_onnx

    qdq_path = out_dir / "qdq" / f"{inputs.onnx_path.stem}-{args.precision}-qdq.onnx"
    log.info("quantizing %s to %s with ModelOpt on %d images", inputs.onnx_path, args.precision, calib_images)
    settings = QuantizeSettings(
        onnx_path=inputs.onnx_path, calib_path=inputs.calib_path, output_path=qdq_path, quantize_mode=args.precision,
        calibration_method=args.calibration_method, calibration_eps=list(args.calibration_eps),
        high_precision_dtype="fp32", max_calib_images=calib_images, overwrite=args.overwrite,
    )  # fmt: skip
    return quantize_onnx(settings).output_path, "quantized model"


def check_qdq_model(qdq_model, fp32_model, precision: str, flag: str) -> None:
    """The Q/DQ model must quantize to ``precision`` and its quantized nodes must be nodes of the FP32 graph."""
    from lowbit.qdq_graph import find_quantized_nodes, qdq_info

    info = qdq_info(qdq_model)
    if not info["is_qdq"]:
        raise UserError(f"{flag}: the model has no Q/DQ nodes", flag=flag)
    if info["is_fp8"] != (precision == "fp8"):
        dtypes = ", ".join(info["quant_dtypes"])
        raise UserError(f"{flag}: the model quantizes to {dtypes}, not --precision {precision}", flag=flag)
    fp32_names = {node.name for node in fp32_model.graph.node}
    missing = [n.name for n in find_quantized_nodes(qdq_model.graph) if n.name not in fp32_names]
    if missing:
        raise UserError(
            f"{flag}: {len(missing)} quantized node(s) are not nodes of --onnx-path (first: {missing[0]}); "
            "was the Q/DQ model made from another graph?",
            flag=flag,
        )


def fp32_recovery_diff(session, reference_outputs: list[str], onnx_path: Path, image: np.ndarray) -> float:
    """Largest relative difference between the scoring graph's float path and ``onnx_path`` on one image."""
    from lowbit.ort_session import build_session

    fp32_session, _ = build_session(onnx_path, ["CPUExecutionProvider"])
    expected = fp32_session.run(None, {fp32_session.get_inputs()[0].name: image})
    del fp32_session
    recovered = session.run(reference_outputs, {session.get_inputs()[0].name: image})
    return max(float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-12)) for a, b in zip(expected, recovered))


@dataclass
class Scores:
    """Per quantized node, the local error it introduces; and how the scoring ran."""

    nodes: list
    scores: np.ndarray
    images: int
    drift: float
    providers: list[str]
    build_s: float
    score_s: float


def score_nodes(args: argparse.Namespace, qdq_model, inputs: Inputs, num_images: int, flag: str) -> Scores:
    """Build the local-error graph of ``qdq_model``, check its float path, and score every quantized node."""
    from lowbit import sensitivity_onnx as sens

    t0 = time.perf_counter()
    error_model, nodes, reference_outputs = sens.build_local_error_model(qdq_model)
    session = sens.local_error_session(error_model, args.providers)
    del error_model
    if session.get_providers()[: len(args.providers)] != list(args.providers):
        raise UserError(
            f"--providers: ONNX Runtime could not create {', '.join(args.providers)} "
            f"(the session got {', '.join(session.get_providers())})",
            flag="--providers",
        )
    build_s = time.perf_counter() - t0
    drift = fp32_recovery_diff(session, reference_outputs, inputs.onnx_path, np.ascontiguousarray(inputs.calib[:1]))
    log.info("recovered FP32 graph vs --onnx-path on image 0: max |diff| / max |out| = %.2e", drift)
    if drift > MAX_FP32_RECOVERY_DIFF:
        raise UserError(
            f"{flag}: its float graph does not reproduce --onnx-path (relative difference {drift:.2e}); "
            "score a Q/DQ model made from this exact FP32 model",
            flag=flag,
        )
    log.info("scoring %d quantized nodes on %d images (graph built in %.1f s)", len(nodes), num_images, build_s)
    t0 = time.perf_counter()

    def images():
        for i, image in enumerate(sens.iter_batches(inputs.calib, num_images)):
            yield image
            log.info("image %d/%d scored (%.1f s)", i + 1, num_images, time.perf_counter() - t0)

    sse, ref, count = sens.score_local_errors(session, nodes, images(), session.get_inputs()[0].name)
    scores = sens.relative_mse(sse, ref)
    if not np.all(np.isfinite(scores)):
        raise RuntimeError("non-finite sensitivity scores; see the log")
    return Scores(nodes, scores, count, drift, session.get_providers(), build_s, time.perf_counter() - t0)


def build_sensitivity_report(args, inputs: Inputs, scored: Scores, qdq: tuple[Path, str], calib_images: int,
                             model_sha: str, wall_s: float) -> dict:  # fmt: skip
    """The shared-schema report (``source: "onnx"``) of the scores."""
    from lowbit import sensitivity_onnx as sens
    from lowbit import sensitivity_report

    layers = sensitivity_report.rank_layers([
        {"name": n.name, "op_type": n.op_type, "weight": n.weight, "onnx_node": n.name, "score": float(s)}
        for n, s in zip(scored.nodes, scored.scores)
    ])  # fmt: skip
    new_model = args.qdq_path is None
    method = {
        "name": sens.METHOD_NAME,
        "description": sens.METHOD_DESCRIPTION,
        "score": sens.METHOD_SCORE,
        "higher_is_more_sensitive": True,
        "settings": {
            "qdq_model": str(qdq[0]),
            "qdq_model_sha256": qdq[1],
            "quantizer": "modelopt.onnx.quantization (lowbit.quantize.quantize_onnx)",
            "calibration_method": (args.calibration_method or ("max" if args.precision == "fp8" else "entropy"))
            if new_model else None,
            "calibration_images": calib_images if new_model else None,
            "quantized_nodes": len(scored.nodes),
            "ort_session_config": {"session.disable_quant_qdq": "1"},
        },
    }  # fmt: skip
    return sensitivity_report.make_report(
        source="onnx", model=inputs.onnx_path, model_sha256=model_sha, precision=args.precision, method=method,
        data={"images": scored.images, "source": str(inputs.calib_path), "imgsz": int(inputs.calib.shape[2])},
        device="cpu" if args.providers[0] == "CPUExecutionProvider" else "cuda:0", wall_s=wall_s, layers=layers,
    )  # fmt: skip


def score_loo(args, qdq_model, inputs: Inputs, num_images: int, qdq: tuple[Path, str], model_sha: str):
    """``(Scores, report)`` of the leave-one-out ranking (``lowbit.sensitivity_loo``) on ``num_images`` images."""
    from lowbit import sensitivity_report
    from lowbit.sensitivity_loo import loo_sensitivity

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}", flag="--batch-size")
    images = np.ascontiguousarray(inputs.calib[:num_images])
    t0 = time.perf_counter()
    result = loo_sensitivity(qdq_model, images, list(args.providers), metric=args.metric, batch_size=args.batch_size,
                             intra_op_threads=args.intra_op_threads, variant=args.method,
                             progress=lambda done, n: log.info("batch %d (%d images) scored, %.1f s", done, n,
                                                               time.perf_counter() - t0))  # fmt: skip
    runs = (len(result.layers) + 3) * result.images
    log.info("leave-one-out: %d nodes x %d images in %.1f s (%.3f s per node-image)", len(result.layers),
             result.images, result.wall_s, result.wall_s / max(runs, 1))  # fmt: skip
    method = dict(result.method)
    method["settings"] = {**method["settings"], "qdq_model": str(qdq[0]), "qdq_model_sha256": qdq[1],
                          "seconds_per_node_image": round(result.wall_s / max(runs, 1), 4)}  # fmt: skip
    report = sensitivity_report.make_report(
        source="onnx", model=inputs.onnx_path, model_sha256=model_sha, precision=args.precision, method=method,
        data={"images": result.images, "source": str(inputs.calib_path), "imgsz": int(inputs.calib.shape[2])},
        device="cpu" if args.providers[0] == "CPUExecutionProvider" else "cuda:0", wall_s=result.wall_s,
        layers=result.layers, extra={"reference": result.reference},
    )  # fmt: skip
    scored = Scores([], np.array([]), result.images, 0.0, result.providers, 0.0, result.wall_s)
    return scored, report


def write_agreement(args, report: dict, report_json: Path, inputs: Inputs, out_dir: Path) -> dict:
    """``ranking-agreement.json`` of this report against ``--compare-with``, both mapped onto the FP32 graph."""
    from lowbit import sensitivity_report
    from lowbit.sensitivity_onnx import NodeMatcher

    agreement = sensitivity_report.compare_reports(report, inputs.other, NodeMatcher(inputs.fp32_model))
    agreement["a"]["report"] = str(report_json)
    agreement["b"]["report"] = str(resolve_repo_path(args.compare_with))
    agreement["graph"] = str(inputs.onnx_path)
    atomic_write_json(out_dir / sensitivity_report.AGREEMENT_FILE, agreement)
    log.info("agreement with %s: %d matched nodes, Spearman %s, top-K overlap %s", args.compare_with,
             agreement["matched"], agreement["spearman"], {k: v["overlap"] for k, v in agreement["top_k"].items()})  # fmt: skip
    return agreement


def prepare_out_dir(args: argparse.Namespace) -> tuple[Path, Path]:
    """The output folder, cleared of an earlier run's results with --overwrite; returns it and the log file."""
    from lowbit import sensitivity_report

    out_dir = resolve_out_dir(args)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_file = out_dir / "onnx_layer_sensitivity.log"
    if args.overwrite:  # a re-run must not leave the previous results looking like its own
        previous = [*sensitivity_report.report_paths(out_dir).values(), out_dir / sensitivity_report.AGREEMENT_FILE]
        for path in [*previous, log_file]:
            path.unlink(missing_ok=True)
    setup_logging(log_file, args.verbose)
    return out_dir, log_file


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import onnx

    from lowbit.ort_session import check_providers
    from lowbit.sensitivity_report import write_report

    t_start = time.perf_counter()
    check_providers(args.providers, disable_cpu_fallback=False)
    inputs = validate(args)
    out_dir, log_file = prepare_out_dir(args)
    num_images = min(args.num_images, inputs.calib.shape[0])
    if num_images < args.num_images:
        log.warning("--num-images %d: %s holds only %d images; scoring all of them", args.num_images,
                    inputs.calib_path, num_images)  # fmt: skip
    calib_images = min(args.calib_images or args.num_images, inputs.calib.shape[0])
    with manifest_run(out_dir / "manifest.json", SCRIPT, vars(args), argv, kind="sensitivity") as manifest:
        model_sha = manifest.add_input(inputs.onnx_path)
        manifest.add_input(inputs.calib_path)
        t0 = time.perf_counter()
        qdq_path, flag = quantized_model(args, inputs, out_dir, calib_images)
        quantize_s = time.perf_counter() - t0
        qdq_sha = manifest.add_input(qdq_path) if args.qdq_path is not None else sha256_file(qdq_path)
        qdq_model = onnx.load(str(qdq_path))
        check_qdq_model(qdq_model, inputs.fp32_model, args.precision, flag)
        if args.method in ("loo", "single"):
            scored, report = score_loo(args, qdq_model, inputs, num_images, (qdq_path, qdq_sha), model_sha)
        else:
            scored = score_nodes(args, qdq_model, inputs, num_images, flag)
            report = build_sensitivity_report(args, inputs, scored, (qdq_path, qdq_sha), calib_images, model_sha,
                                              time.perf_counter() - t_start)  # fmt: skip
        del qdq_model
        paths = write_report(out_dir, report)
        for ext, path in paths.items():
            manifest.add_output(f"report_{ext}", path)
        manifest.add_output("qdq_model", qdq_path)
        manifest.add_output("log", log_file)
        agreement = write_agreement(args, report, paths["json"], inputs, out_dir) if inputs.other else None
        if agreement is not None:
            manifest.add_output("ranking_agreement", out_dir / "ranking-agreement.json")
        manifest.update(quantize_s=round(quantize_s, 2), build_s=round(scored.build_s, 2),
                        score_s=round(scored.score_s, 2), images=scored.images, quantized_nodes=len(report["layers"]),
                        fp32_recovery_rel_diff=scored.drift, providers=scored.providers)  # fmt: skip
        log.info("timings: quantize %.1f s, build %.1f s, score %.1f s", quantize_s, scored.build_s, scored.score_s)

    layers = report["layers"]
    top = ", ".join(f"{layer['name']} ({layer['score']:.3g})" for layer in layers[:5])
    print(f"{args.precision} ONNX {args.method} sensitivity of {len(layers)} nodes on {scored.images} images -> {paths['json']}")
    print(f"top 5: {top}")
    if agreement is not None:
        overlap = ", ".join(f"top-{k} {v['overlap']}/{k}" for k, v in agreement["top_k"].items())
        print(f"vs {args.compare_with}: {agreement['matched']} matched, Spearman {agreement['spearman']}, {overlap}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
