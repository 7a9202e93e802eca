"""The low-bit workflow's plan: every step of a run, built from the resolved settings, and the run itself.

:func:`plan` turns the settings of :mod:`lowbit.pipeline_settings` into :class:`lowbit.steps.Step` objects, each
made from the typed settings of its script (:mod:`lowbit.pipeline_steps`), in the model card's order; nothing is
run or written. :func:`run_workflow` runs them with :func:`lowbit.steps.run_steps` while holding the run dir
(``--dry-run`` prints them instead). See docs/pipeline.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lowbit.logs import setup_logging
from lowbit.pipeline_settings import calib_list_images, confirms, is_generated_demo_data, k_choice
from lowbit.pipeline_steps import (
    CalibListSettings,
    CalibSettings,
    DatasetSettings,
    EvalSettings,
    MaterializeSettings,
    OnnxSensitivitySettings,
    QuantizeSettings,
    ReportSettings,
    SchemesSettings,
    SearchSettings,
    SmokeSettings,
    TorchSweepSettings,
)
from lowbit.run_lock import hold_run_folder
from lowbit.runs import atomic_write_json
from lowbit.steps import Step, Stopped, run_steps

__all__ = [
    "CALIB_LIST_SIZE",
    "SENSITIVITY_PROVIDERS",
    "base_steps",
    "calib_path",
    "confirm_baseline_path",
    "dataset_step",
    "full_model_path",
    "mode_steps",
    "plan",
    "run_workflow",
    "search_steps",
    "sensitivity_step",
]

SENSITIVITY_PROVIDERS = ("CPUExecutionProvider", "CUDAExecutionProvider")  # what the ONNX rankings run on
CALIB_LIST_SIZE = 100  # images drawn by the calib-list step when the list is missing


def calib_path(args: argparse.Namespace, run: Path) -> Path:
    return run / "calib" / f"calib_{args.model_name}_{args.imgsz}.npy"


def confirm_baseline_path(run: Path) -> Path:
    """FP32 metrics on the confirmation slice."""
    return run / "baseline-confirm-coco" / "metrics.json"


def full_model_path(args: argparse.Namespace, run: Path, mode: str) -> Path:
    """The mode's calibrated Q/DQ model with every node quantized: the int8 step's, or the fp8 step's."""
    name = f"{args.model_name}-int8-qdq.onnx" if mode == "int8" else f"{args.model_name}-fp8-k0.onnx"
    return run / "onnx" / name


def _eval(args: argparse.Namespace, model: Path, out: Path, confirm: bool = False) -> EvalSettings:
    """``model`` on the evaluation slice, or (``confirm``) on the confirmation slice."""
    return EvalSettings(
        onnx_path=model,
        data_root=args.data_root,
        max_images=args.confirm_images if confirm else args.max_images,
        skip_images=args.confirm_skip if confirm else None,
        providers=args.providers,
        imgsz=args.imgsz,
        out=out,
    )


def _quantize(args: argparse.Namespace, run: Path, mode: str) -> QuantizeSettings:
    """The mode's full Q/DQ model (FP8 calibrates with max, so it takes no method)."""
    return QuantizeSettings(
        onnx_path=args.onnx_path,
        calib_path=calib_path(args, run),
        output_path=full_model_path(args, run, mode),
        quantize_mode=mode,
        calibration_eps=args.calibration_eps,
        high_precision_dtype=args.high_precision_dtype,
        calibration_method=args.calibration_method if mode == "int8" else None,
    )


def dataset_step(args: argparse.Namespace) -> Step:
    """The demo's val split, generated when missing: its images folder and annotations are what later steps read."""
    return DatasetSettings(out_root=args.data_root).step("dataset")


def base_steps(args: argparse.Namespace, run: Path) -> list[Step]:
    """Card steps 1-3: dataset (demo), smoke, baseline, calibration, INT8 and its evaluation."""
    steps: list[Step] = []
    if is_generated_demo_data(args):
        steps.append(dataset_step(args))
    smoke = SmokeSettings(model=args.onnx_path, output_root=run / "baseline-onnx", providers=args.providers)
    steps += [smoke.step("smoke"), _eval(args, args.onnx_path, run / "baseline-coco" / "metrics.json").step("baseline")]
    if confirms(args):  # FP32 on the images the searches confirm their picks on
        steps.append(_eval(args, args.onnx_path, confirm_baseline_path(run), confirm=True).step("baseline-confirm"))
    if not args.calib_list.is_file():
        # a list drawn here comes after the evaluation slice and the confirmation slice (which follows the former)
        skip = args.confirm_skip + args.confirm_images if confirms(args) else args.max_images
        calib_list = CalibListSettings(
            data_root=args.data_root, eval_max_images=skip, num=CALIB_LIST_SIZE, out=args.calib_list
        )
        steps.append(calib_list.step("calib-list"))
    images = calib_list_images(args, [out for step in steps for out in step.outputs])
    calib = CalibSettings(image_list=args.calib_list, out=calib_path(args, run), imgsz=args.imgsz, images=images)
    int8 = _quantize(args, run, "int8")
    int8_eval = _eval(args, int8.output_path, run / "int8-coco" / "metrics.json")
    return [*steps, calib.step("calib"), int8.step("int8"), int8_eval.step("int8-eval")]


def sensitivity_step(args: argparse.Namespace, run: Path, mode: str, full_model: Path | None = None) -> Step:
    """The ranking of one mode: ONNX-native (``single``, ``loo`` or ``local``), on ``full_model`` when given (the
    search's Q/DQ model; else the script quantizes its own), or the torch sweep on ``--weights``."""
    if args.sensitivity == "torch":
        settings = TorchSweepSettings(
            weights=args.weights,
            calib_npy=calib_path(args, run),
            num_images=args.sensitivity_images,
            formats=(f"{mode}-{mode}",),
            output_root=run,
            run_id=f"sensitivity-torch-{mode}",
        )
    else:
        method = args.sensitivity
        settings = OnnxSensitivitySettings(
            onnx_path=args.onnx_path,
            calib_path=calib_path(args, run),
            num_images=args.sensitivity_images,
            precision=mode,
            method=method,
            providers=[p for p in args.providers if p in SENSITIVITY_PROVIDERS] or ["CPUExecutionProvider"],
            calibration_eps=args.calibration_eps if full_model is None else None,
            qdq_path=full_model,
            out_dir=run / f"sensitivity-{method}-{mode}" / "outputs" / args.model_name / f"onnx-{mode}" / "per_layer",
        )
    return settings.step(f"sensitivity-{mode}", family="sensitivity")


def search_steps(args: argparse.Namespace, run: Path, mode: str) -> list[Step]:
    """Search mode for one mode: (FP8: its full Q/DQ model), ranking on that model, budget search."""
    full = full_model_path(args, run, mode)
    steps = [_quantize(args, run, "fp8").step("fp8")] if mode == "fp8" else []
    sens = sensitivity_step(args, run, mode, None if args.sensitivity == "torch" else full)
    requantize = args.candidate_build == "requantize"  # the candidates re-quantize: they calibrate like the K=0 model
    search = SearchSettings(
        mode=mode,
        run_root=run,
        ranking=sens.outputs[0],
        onnx_path=args.onnx_path,
        full_model=full,
        baseline_metrics=run / "baseline-coco" / "metrics.json",
        budget_ap=args.budget_ap,
        random_seeds=args.random_seeds,
        max_probes=args.max_probes,
        parallel_probes=args.parallel_probes,
        build=args.candidate_build,
        data_root=args.data_root,
        max_images=args.max_images,
        providers=args.providers,
        imgsz=args.imgsz,
        k0_metrics=run / "int8-coco" / "metrics.json" if mode == "int8" else None,  # INT8 K=0 is the int8-eval step
        random_band=args.random_band,
        confidence=args.confidence,
        confirm_baseline_metrics=confirm_baseline_path(run) if confirms(args) else None,
        confirm_images=args.confirm_images if confirms(args) else None,
        confirm_skip=args.confirm_skip if confirms(args) else None,
        revert_probes=args.revert_probes or None,
        calib_path=calib_path(args, run) if requantize else None,
        calibration_eps=args.calibration_eps if requantize else None,
        high_precision_dtype=args.search_high_precision_dtype if requantize else None,
        calibration_method=args.calibration_method if requantize and mode == "int8" else None,
    )
    return [*steps, sens, search.step(f"search-{mode}", family="search")]


def mode_steps(args: argparse.Namespace, run: Path, mode: str) -> list[Step]:
    """Card step 4 for one mode with fixed K: ranking, schemes, candidates (materialized and evaluated)."""
    # INT8 with no exclusions is the card's step 3 (the int8 step): do not quantize it twice
    mode_ks = [k for k in args.ks if k != 0] if mode == "int8" else list(args.ks)
    if not mode_ks:
        return []
    sens = sensitivity_step(args, run, mode)
    schemes = SchemesSettings(
        report_json=sens.outputs[0],
        out_dir=run / ("schemes" if mode == "fp8" else f"schemes-{mode}"),
        onnx_path=args.onnx_path,
        ks=args.ks,
        random_control=args.random_control,
        declared_ks=mode_ks,
    )
    candidates = MaterializeSettings(
        run_root=run,
        calib_path=calib_path(args, run),
        schemes_dir=schemes.out_dir,
        onnx_path=args.onnx_path,
        ks=mode_ks,
        quant_mode=mode,
        high_precision_dtype=args.high_precision_dtype,
        data_root=args.data_root,
        max_images=args.max_images,
        providers=args.providers,
        imgsz=args.imgsz,
        calibration_eps=args.calibration_eps,
        # the INT8 candidates calibrate like the int8 step they are compared with
        calibration_method=args.calibration_method if mode == "int8" else None,
        include_random=args.random_control is not None,
    )
    return [
        sens,
        schemes.step(f"schemes-{mode}", family="schemes"),
        candidates.step(f"candidates-{mode}", family="candidates"),
    ]


def plan(args: argparse.Namespace, run: Path) -> list[Step]:
    """Every step of the run, in order; nothing is run or written."""
    steps = base_steps(args, run)
    for mode in args.candidate_modes:
        steps += search_steps(args, run, mode) if args.search else mode_steps(args, run, mode)
    # the report reads every evaluation: the metrics files, and the searches' and candidates' records with the
    # models and metrics they name
    evaluated = [
        s.outputs[0]
        for s in steps
        if s.name in ("baseline", "baseline-confirm", "int8-eval") or s.family in ("candidates", "search")
    ]
    records = [s.outputs[0] for s in steps if s.family in ("candidates", "search")]
    report = ReportSettings(
        run_dir=run,
        out_dir=run,
        budget_ap=args.budget_ap,
        evaluated=evaluated,
        records=records,
        search_curves=args.search and bool(args.candidate_modes),
    )
    return [*steps, report.step("report")]


def run_workflow(args: argparse.Namespace, argv: list[str]) -> int:
    """Run (or with ``--dry-run`` print) the plan in ``<output-root>/<run-id>``, holding that folder while it runs.

    Returns 0, 1 after a failed step, or 128 + the signal number when a stop signal ended the run.
    Raises:
        UserError(--run-id): another workflow holds the run dir.
    """
    run = args.output_root / args.run_id
    steps = plan(args, run)
    if args.dry_run:  # prints the plan and writes nothing, so it needs no hold on the run dir
        return run_steps(run, steps, set(args.force), True, setup_logging(), args.jobs)
    with hold_run_folder(run, "--run-id"):
        logger = setup_logging(run / "workflow.log")
        settings = {"argv": argv, "preset": args.preset, "steps": [s.name for s in steps]}
        atomic_write_json(run / "workflow.json", {**settings, "args": vars(args)})
        logger.info("run dir %s: %d steps (%s)", run, len(steps), " ".join(s.name for s in steps))
        logger.info("K per mode: %s", k_choice(args))
        t_start = time.perf_counter()
        try:
            rc = run_steps(run, steps, set(args.force), False, logger, args.jobs)
        except Stopped as exc:
            logger.error("%s", exc)
            return 128 + exc.signum
    if rc == 0:
        logger.info("workflow finished in %.1f s: %s", time.perf_counter() - t_start, run / "report.md")
    return rc
