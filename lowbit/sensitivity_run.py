"""One ONNX-native layer-sensitivity run: inputs checked, Q/DQ model made or taken, nodes ranked, report written.

What ``onnx_layer_sensitivity.py`` does, as one call (:func:`run_onnx_ranking`) over a typed
:class:`OnnxRankingSettings` (its fields are the script's flags):

1. check every input before heavy work (the FP32 model's image input, the calibration tensor's size,
   the report to compare with), and refuse to replace finished results without ``overwrite``;
2. quantize the FP32 model once with ModelOpt (``lowbit.quantize.quantize_onnx``: INT8 entropy or FP8
   max calibration by default, FP32 high precision) on the first ``calib_images`` images, or take the
   Q/DQ model at ``qdq_path``, and check it quantizes to ``precision`` the nodes of the FP32 graph;
3. rank its quantized nodes by ``method`` on the first ``num_images`` images: ``single``
   (``lowbit.sensitivity_single``, what the workflow uses), ``loo`` (``lowbit.sensitivity_loo``) or
   ``local`` (``lowbit.sensitivity_local``);
4. write ``layer-sensitivity-report.{json,csv,md}`` (``lowbit.sensitivity_report``, ``source: "onnx"``),
   a log, ``manifest.json`` (its ``args`` are the settings) and, with ``compare_with``,
   ``ranking-agreement.json`` (both reports mapped onto the FP32 graph by ``lowbit.sensitivity_onnx``).

None of it imports torch (the output-drift rankings may, beside a CUDA session: ``lowbit.sensitivity_gated``).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lowbit.errors import UserError
from lowbit.logs import get_logger, setup_logging
from lowbit.ort_providers import MODELOPT_CALIBRATION_EPS
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

__all__ = [
    "CALIBRATION_EPS",
    "DEFAULT_ONNX",
    "DRIFT_METHODS",
    "IMAGE_SELECTIONS",
    "METHODS",
    "OUTPUT_ROOT",
    "PROVIDERS",
    "SCRIPT",
    "OnnxRanking",
    "OnnxRankingSettings",
    "check_qdq_model",
    "drift_ranking_of",
    "run_onnx_ranking",
]

SCRIPT = "onnx_layer_sensitivity.py"  # the manifest's "script"
DEFAULT_ONNX = CARD_ONNX_PATH
OUTPUT_ROOT = REPO_ROOT / "tmp" / "yolov10m_layer_sensitivity"
PROVIDERS = ("CPUExecutionProvider", "CUDAExecutionProvider")
# ModelOpt's calibration providers, checked here so a typo fails before any work.
CALIBRATION_EPS = MODELOPT_CALIBRATION_EPS
METHODS = ("loo", "single", "local")
DRIFT_METHODS = ("loo", "single")  # the output-drift rankings, one gated session each
IMAGE_SELECTIONS = ("first", "drift")  # which calibration images a drift ranking scores
LOG_NAME = "onnx_layer_sensitivity.log"
# These lines were the script's; they keep its logger name, so its log file reads as before.
log = get_logger("onnx_layer_sensitivity")


@dataclass
class OnnxRankingSettings:
    """What to rank and how; one field per flag of ``onnx_layer_sensitivity.py``, in its order.

    Attributes:
        onnx_path: the FP32 ONNX model (one image input ``[1, 3, H, W]``, static H and W).
        calib_path: calibration tensor ``.npy``, float32 ``[N, 3, H, W]``.
        num_images: images scored, the first N of ``calib_path`` (>= 1).
        precision: ``int8`` or ``fp8``.
        method: ``single``, ``loo`` or ``local`` (:data:`METHODS`).
        metric: output drift of ``single``/``loo``: ``det_kl`` or ``rel_mse`` (``lowbit.drift.METRICS``).
        batch_size: images per run of ``single``/``loo`` (>= 1).
        intra_op_threads: ORT threads of ``single``/``loo`` (0: ORT's default).
        calibration_method: ModelOpt calibration (``entropy``, ``max``); None: entropy for int8, max for fp8.
        calib_images: images ModelOpt calibrates on; None: ``num_images``.
        image_selection: which images ``single``/``loo`` score (:data:`IMAGE_SELECTIONS`): ``first``, the first
            ``num_images``; ``drift``, the ``num_images`` of the first ``selection_pool`` on which the full Q/DQ
            model drifts furthest from FP32 (:func:`lowbit.sensitivity_gated.image_drifts`).
        selection_pool: images ``drift`` chooses from (>= ``num_images``).
        calibration_eps: ORT providers ModelOpt calibrates with (:data:`CALIBRATION_EPS`), in order.
        qdq_path: an existing Q/DQ model of ``onnx_path`` to score instead of quantizing.
        providers: ORT providers for scoring (:data:`PROVIDERS`), highest priority first.
        out_dir: output folder; None: a new run under :data:`OUTPUT_ROOT`.
        compare_with: another ``layer-sensitivity-report.json``: writes ``ranking-agreement.json``.
        overwrite: replace the results in an existing ``out_dir``.
        verbose: debug logging on the console.
    """

    onnx_path: Path
    calib_path: Path
    num_images: int = 16
    precision: str = "fp8"
    method: str = "local"
    metric: str = "det_kl"
    batch_size: int = 8
    intra_op_threads: int = 0
    calibration_method: str | None = None
    calib_images: int | None = None
    image_selection: str = "first"
    selection_pool: int = 64
    calibration_eps: list[str] = dataclasses.field(default_factory=lambda: ["cpu"])
    qdq_path: Path | None = None
    providers: list[str] = dataclasses.field(default_factory=lambda: ["CPUExecutionProvider"])
    out_dir: Path | None = None
    compare_with: Path | None = None
    overwrite: bool = False
    verbose: bool = False

    def as_args(self) -> dict[str, Any]:
        """The manifest's ``args``: every field by name, in order (what ``vars(args)`` of the script held)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass
class OnnxRanking:
    """What a run wrote: the ``report`` dict, its ``paths`` (``json``, ``csv``, ``md``), the ``agreement``
    with ``compare_with`` (None without), and the ``images`` scored."""

    report: dict[str, Any]
    paths: dict[str, Path]
    agreement: dict[str, Any] | None
    images: int


@dataclass
class _Inputs:
    """Validated inputs: paths, the FP32 graph (no external data), the calibration images, the other report."""

    onnx_path: Path
    calib_path: Path
    fp32_model: object
    calib: np.ndarray
    other: dict | None


@dataclass
class _Scored:
    """How the scoring ran, for the manifest: images, FP32-recovery check, providers, seconds."""

    images: int
    drift: float
    providers: list[str]
    build_s: float
    score_s: float


# ----------------------------------------------------------------------------------------------------------------------
# Inputs and output folder


def _validate(settings: OnnxRankingSettings) -> _Inputs:
    """Check every input before heavy work."""
    from lowbit.calib import load_calib_tensor
    from lowbit.model_input import check_graph_image_input
    from lowbit.onnx_stats import load_model_proto
    from lowbit.sensitivity_report import load_report

    if settings.num_images < 1:
        raise UserError(f"--num-images must be >= 1, got {settings.num_images}", flag="--num-images")
    if settings.calib_images is not None and settings.calib_images < 1:
        raise UserError(f"--calib-images must be >= 1, got {settings.calib_images}", flag="--calib-images")
    if settings.image_selection not in IMAGE_SELECTIONS:
        raise UserError(
            f"--image-selection must be one of {', '.join(IMAGE_SELECTIONS)}, got {settings.image_selection!r}",
            flag="--image-selection",
        )
    drift_selection = settings.image_selection == "drift"
    if drift_selection and settings.method not in DRIFT_METHODS:
        raise UserError(
            f"--image-selection drift chooses the images of --method {' or '.join(DRIFT_METHODS)}, not {settings.method}",
            flag="--image-selection",
        )
    if drift_selection and settings.selection_pool < settings.num_images:
        raise UserError(
            f"--selection-pool must be >= --num-images ({settings.num_images}), got {settings.selection_pool}",
            flag="--selection-pool",
        )
    onnx_path = check_input_file(resolve_repo_path(settings.onnx_path), "--onnx-path")
    calib_path = check_input_file(resolve_repo_path(settings.calib_path), "--calib-path")
    if settings.qdq_path is not None:
        check_input_file(resolve_repo_path(settings.qdq_path), "--qdq-path")
        if settings.calibration_method or settings.calib_images:
            raise UserError(
                "--calibration-method/--calib-images quantize a new model; they do not apply with --qdq-path",
                flag="--qdq-path",
            )
    other = None
    if settings.compare_with is not None:
        compare_path = check_input_file(resolve_repo_path(settings.compare_with), "--compare-with")
        other = load_report(compare_path, "--compare-with")
    model = load_model_proto(onnx_path, "--onnx-path")
    name, shape, _ = check_graph_image_input(model, None, onnx_path, "--onnx-path")
    size = [d if isinstance(d, int) and d > 0 else None for d in shape[2:]]
    if None in size:  # the calibration images must fit the model exactly: no letterboxing here
        raise UserError(
            f"--onnx-path: input {name!r} has shape {shape}; expected [1,3,H,W] with static H and W",
            flag="--onnx-path",
        )
    max_images = max(settings.num_images, settings.calib_images or 0, settings.selection_pool if drift_selection else 0)
    calib = load_calib_tensor(calib_path, "--calib-path", max_images=max_images)
    if list(calib.shape[2:]) != size:
        raise UserError(
            f"--calib-path: {calib_path} holds {calib.shape[2]}x{calib.shape[3]} images; the model "
            f"input {name!r} needs {size[0]}x{size[1]}",
            flag="--calib-path",
        )
    return _Inputs(onnx_path, calib_path, model, calib, other)


def _resolve_out_dir(settings: OnnxRankingSettings) -> Path:
    """``out_dir``, or a fresh default run folder; refuses to replace finished results without ``overwrite``."""
    from lowbit.sensitivity_report import report_paths

    if settings.out_dir is None:
        run = new_run_dir(OUTPUT_ROOT)
        return run / "outputs" / Path(settings.onnx_path).stem / f"onnx-{settings.precision}" / "per_layer"
    out_dir = settings.out_dir if settings.out_dir.is_absolute() else Path.cwd() / settings.out_dir
    existing = [p for p in [*report_paths(out_dir).values(), out_dir / "manifest.json"] if p.exists()]
    if existing and not settings.overwrite:
        raise UserError(
            f"--out-dir {out_dir} already holds results ({existing[0].name}); pass --overwrite to replace them",
            flag="--overwrite",
        )
    return out_dir


def _prepare_out_dir(settings: OnnxRankingSettings) -> tuple[Path, Path]:
    """The output folder, cleared of an earlier run's results with ``overwrite``; returns it and the log file."""
    from lowbit import sensitivity_report

    out_dir = _resolve_out_dir(settings)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_file = out_dir / LOG_NAME
    if settings.overwrite:  # a re-run must not leave the previous results looking like its own
        previous = [*sensitivity_report.report_paths(out_dir).values(), out_dir / sensitivity_report.AGREEMENT_FILE]
        for path in [*previous, log_file]:
            path.unlink(missing_ok=True)
    setup_logging(log_file, settings.verbose)
    return out_dir, log_file


# ----------------------------------------------------------------------------------------------------------------------
# The Q/DQ model


def _quantized_model(
    settings: OnnxRankingSettings, inputs: _Inputs, out_dir: Path, calib_images: int
) -> tuple[Path, str]:
    """``(Q/DQ model path, the flag its errors are about)``: ``qdq_path``, or a fresh ModelOpt quantization."""
    if settings.qdq_path is not None:
        return resolve_repo_path(settings.qdq_path), "--qdq-path"
    from lowbit.quantize import QuantizeSettings, quantize_onnx

    qdq_path = out_dir / "qdq" / f"{inputs.onnx_path.stem}-{settings.precision}-qdq.onnx"
    log.info("quantizing %s to %s with ModelOpt on %d images", inputs.onnx_path, settings.precision, calib_images)
    quantize = QuantizeSettings(
        onnx_path=inputs.onnx_path,
        calib_path=inputs.calib_path,
        output_path=qdq_path,
        quantize_mode=settings.precision,
        calibration_method=settings.calibration_method,
        calibration_eps=list(settings.calibration_eps),
        high_precision_dtype="fp32",
        max_calib_images=calib_images,
        overwrite=settings.overwrite,
    )
    return quantize_onnx(quantize).output_path, "quantized model"


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


# ----------------------------------------------------------------------------------------------------------------------
# Ranking by method


def _report(settings: OnnxRankingSettings, inputs: _Inputs, model_sha: str, method: dict, images: int, **kw) -> dict:
    """The shared-schema report (``source: "onnx"``); ``kw``: ``wall_s``, ``layers`` and optionally ``extra``."""
    from lowbit import sensitivity_report

    return sensitivity_report.make_report(
        source="onnx",
        model=inputs.onnx_path,
        model_sha256=model_sha,
        precision=settings.precision,
        method=method,
        data={"images": images, "source": str(inputs.calib_path), "imgsz": int(inputs.calib.shape[2])},
        device="cpu" if settings.providers[0] == "CPUExecutionProvider" else "cuda:0",
        **kw,
    )


def _rank_local(settings, qdq_model, inputs: _Inputs, num_images, qdq, calib_images, model_sha, flag, t_start):
    """``(_Scored, report)`` of the ``local`` ranking (``lowbit.sensitivity_local``)."""
    from lowbit import sensitivity_local as local
    from lowbit import sensitivity_report

    scored = local.local_sensitivity(qdq_model, inputs.onnx_path, inputs.calib, num_images, settings.providers, flag)
    layers = sensitivity_report.rank_layers(
        [
            {"name": n.name, "op_type": n.op_type, "weight": n.weight, "onnx_node": n.name, "score": float(s)}
            for n, s in zip(scored.nodes, scored.scores)
        ]
    )
    new_model = settings.qdq_path is None
    default_calibration = "max" if settings.precision == "fp8" else "entropy"
    method = {
        "name": local.METHOD_NAME,
        "description": local.METHOD_DESCRIPTION,
        "score": local.METHOD_SCORE,
        "higher_is_more_sensitive": True,
        "settings": {
            "qdq_model": str(qdq[0]),
            "qdq_model_sha256": qdq[1],
            "quantizer": "modelopt.onnx.quantization (lowbit.quantize.quantize_onnx)",
            "calibration_method": (settings.calibration_method or default_calibration) if new_model else None,
            "calibration_images": calib_images if new_model else None,
            "quantized_nodes": len(scored.nodes),
            "ort_session_config": {"session.disable_quant_qdq": "1"},
        },
    }
    stats = _Scored(scored.images, scored.drift, scored.providers, scored.build_s, scored.score_s)
    wall_s = time.perf_counter() - t_start
    report = _report(settings, inputs, model_sha, method, scored.images, wall_s=wall_s, layers=layers)
    return stats, report


def drift_ranking_of(method: str, qdq_model, images: np.ndarray, providers: list[str], **kwargs):
    """The output-drift ranking ``method`` (``single`` or ``loo``) of ``qdq_model``; ``kwargs`` go to it.

    Raises:
        UserError(flag="--method"): ``method`` is no output-drift ranking.
    """
    if method == "single":
        from lowbit.sensitivity_single import single_sensitivity as rank
    elif method == "loo":
        from lowbit.sensitivity_loo import loo_sensitivity as rank
    else:
        raise UserError(f"--method must be one of {', '.join(DRIFT_METHODS)} here, got {method!r}", flag="--method")
    return rank(qdq_model, images, providers, **kwargs)


def _select_images(settings, qdq_model, inputs: _Inputs, num_images: int) -> tuple[np.ndarray, dict[str, Any]]:
    """``(images, record)``: the images the drift ranking scores and how they were chosen (the report's
    ``method.settings.image_selection``)."""
    if settings.image_selection == "first":
        return np.ascontiguousarray(inputs.calib[:num_images]), {"by": "first", "images": int(num_images)}
    from lowbit.sensitivity_gated import image_drifts

    t0 = time.perf_counter()
    pool = inputs.calib[: settings.selection_pool]
    drifts = image_drifts(
        qdq_model,
        pool,
        list(settings.providers),
        metric=settings.metric,
        batch_size=settings.batch_size,
        intra_op_threads=settings.intra_op_threads,
    )
    chosen = np.sort(np.argsort(-drifts, kind="stable")[:num_images])
    seconds = time.perf_counter() - t0
    log.info(
        "images: the %d of %d with the largest full-model drift (%s; %.3g to %.3g, pool median %.3g), %.1f s",
        len(chosen),
        len(pool),
        ", ".join(str(int(i)) for i in chosen),
        float(drifts[chosen].min()),
        float(drifts[chosen].max()),
        float(np.median(drifts)),
        seconds,
    )
    record = {
        "by": "drift",
        "images": len(chosen),
        "pool": len(pool),
        "chosen": [int(i) for i in chosen],
        "pool_drifts": [round(float(d), 6) for d in drifts],
        "seconds": round(seconds, 2),
    }
    return np.ascontiguousarray(pool[chosen]), record


def _rank_by_drift(settings, qdq_model, inputs: _Inputs, num_images, qdq, model_sha):
    """``(_Scored, report)`` of the ``single`` or ``loo`` ranking on ``num_images`` images."""
    if settings.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {settings.batch_size}", flag="--batch-size")
    images, selection = _select_images(settings, qdq_model, inputs, num_images)
    t0 = time.perf_counter()

    def progress(done: int, n: int) -> None:
        log.info("batch %d (%d images) scored, %.1f s", done, n, time.perf_counter() - t0)

    result = drift_ranking_of(
        settings.method,
        qdq_model,
        images,
        list(settings.providers),
        metric=settings.metric,
        batch_size=settings.batch_size,
        intra_op_threads=settings.intra_op_threads,
        progress=progress,
    )
    runs = (len(result.layers) + 3) * result.images
    per_node_image = result.wall_s / max(runs, 1)
    log.info(
        "leave-one-out: %d nodes x %d images in %.1f s (%.3f s per node-image)",
        len(result.layers),
        result.images,
        result.wall_s,
        per_node_image,
    )
    method = dict(result.method)
    method["settings"] = {
        **method["settings"],
        "qdq_model": str(qdq[0]),
        "qdq_model_sha256": qdq[1],
        "seconds_per_node_image": round(per_node_image, 4),
        "image_selection": selection,
    }
    extra = {"reference": result.reference}
    report = _report(
        settings, inputs, model_sha, method, result.images, wall_s=result.wall_s, layers=result.layers, extra=extra
    )
    return _Scored(result.images, 0.0, result.providers, 0.0, result.wall_s), report


def _write_agreement(settings, report: dict, report_json: Path, inputs: _Inputs, out_dir: Path) -> dict:
    """``ranking-agreement.json`` of this report against ``compare_with``, both mapped onto the FP32 graph."""
    from lowbit import sensitivity_report
    from lowbit.sensitivity_onnx import NodeMatcher

    agreement = sensitivity_report.compare_reports(report, inputs.other, NodeMatcher(inputs.fp32_model))
    agreement["a"]["report"] = str(report_json)
    agreement["b"]["report"] = str(resolve_repo_path(settings.compare_with))
    agreement["graph"] = str(inputs.onnx_path)
    atomic_write_json(out_dir / sensitivity_report.AGREEMENT_FILE, agreement)
    overlaps = {k: v["overlap"] for k, v in agreement["top_k"].items()}
    log.info(
        "agreement with %s: %d matched nodes, Spearman %s, top-K overlap %s",
        settings.compare_with,
        agreement["matched"],
        agreement["spearman"],
        overlaps,
    )
    return agreement


# ----------------------------------------------------------------------------------------------------------------------
# The whole run


def run_onnx_ranking(settings: OnnxRankingSettings, argv: list[str] | None = None) -> OnnxRanking:
    """Check, quantize (or take ``qdq_path``), rank by ``settings.method``, and write report, manifest and agreement.

    Args:
        settings: the run's settings (the script's flags).
        argv: the command line recorded in the manifest (None: ``sys.argv``).

    Raises:
        UserError: a bad input (naming its flag), before anything is written where possible.
    """
    import onnx

    from lowbit.ort_providers import check_providers
    from lowbit.sensitivity_report import write_report

    t_start = time.perf_counter()
    check_providers(settings.providers, disable_cpu_fallback=False)
    inputs = _validate(settings)
    out_dir, log_file = _prepare_out_dir(settings)
    num_images = min(settings.num_images, inputs.calib.shape[0])
    if num_images < settings.num_images:
        log.warning(
            "--num-images %d: %s holds only %d images; scoring all of them",
            settings.num_images,
            inputs.calib_path,
            num_images,
        )
    calib_images = min(settings.calib_images or settings.num_images, inputs.calib.shape[0])
    with manifest_run(out_dir / "manifest.json", SCRIPT, settings.as_args(), argv, kind="sensitivity") as manifest:
        model_sha = manifest.add_input(inputs.onnx_path)
        manifest.add_input(inputs.calib_path)
        t0 = time.perf_counter()
        qdq_path, flag = _quantized_model(settings, inputs, out_dir, calib_images)
        quantize_s = time.perf_counter() - t0
        qdq_sha = manifest.add_input(qdq_path) if settings.qdq_path is not None else sha256_file(qdq_path)
        qdq_model = onnx.load(str(qdq_path))
        check_qdq_model(qdq_model, inputs.fp32_model, settings.precision, flag)
        qdq = (qdq_path, qdq_sha)
        if settings.method in DRIFT_METHODS:
            scored, report = _rank_by_drift(settings, qdq_model, inputs, num_images, qdq, model_sha)
        else:
            scored, report = _rank_local(
                settings, qdq_model, inputs, num_images, qdq, calib_images, model_sha, flag, t_start
            )
        del qdq_model
        paths = write_report(out_dir, report)
        for ext, path in paths.items():
            manifest.add_output(f"report_{ext}", path)
        manifest.add_output("qdq_model", qdq_path)
        manifest.add_output("log", log_file)
        agreement = _write_agreement(settings, report, paths["json"], inputs, out_dir) if inputs.other else None
        if agreement is not None:
            manifest.add_output("ranking_agreement", out_dir / "ranking-agreement.json")
        manifest.update(
            quantize_s=round(quantize_s, 2),
            build_s=round(scored.build_s, 2),
            score_s=round(scored.score_s, 2),
            images=scored.images,
            quantized_nodes=len(report["layers"]),
            fp32_recovery_rel_diff=scored.drift,
            providers=scored.providers,
        )
        log.info("timings: quantize %.1f s, build %.1f s, score %.1f s", quantize_s, scored.build_s, scored.score_s)
    return OnnxRanking(report, paths, agreement, scored.images)
