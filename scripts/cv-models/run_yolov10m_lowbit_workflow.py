"""The whole low-bit workflow in one resumable command, ending in a comparison report.

Runs the model card's steps, by calling the card's own Python scripts with their flags, into one run
directory ``tmp/yolov10m_lowbit/<run-id>/`` with the card's sub-layout (``<model>`` is the ONNX file's
stem: ``yolov10m`` for the card's checkpoint, ``yolov10n-demo-shapes`` for the demo):

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

Two ways to choose K, the number of most sensitive nodes left in float:

* the budget search (default): per mode, the smallest K along the ranking whose evaluated candidate
  loses at most ``--budget-ap`` AP points against FP32, found by bisection over K
  (``lowbit.budget_search``); each probe is the mode's full Q/DQ model (the int8 step's model, or
  the fp8 step's) with the top-K nodes' Q/DQ pairs removed, evaluated on the evaluation slice; then
  ``--random-seeds`` random controls at that K. The ranking is computed on that same full Q/DQ model.
* fixed K (``--ks 0 5 10 20``): the earlier steps ``schemes-<mode>`` (make_yolov10m_candidate_schemes.py)
  and ``candidates-<mode>`` (materialize_yolov10m_lowbit_candidates.py --eval: one ModelOpt
  quantization per K with ``nodes_to_exclude``), exactly as before.

Each step runs exactly the command the card's bash wrapper would run for the same settings
(``quantize_yolov10m_int8_onnx.sh``, ``run_yolov10m_layer_sensitivity_sweep.sh``,
``materialize_yolov10m_lowbit_candidates.sh``); ``--dry-run`` prints them and writes nothing. Every workflow
input is checked before the first step (the model is read, ``--imgsz`` must fit its input, the calibration
list's images must exist or be made by a step, flags that would do nothing in the chosen plan are refused),
and errors name this command's flags.

Each step declares every file it reads, the images its calibration list names included, so with
``--jobs N`` a step starts only once the steps that write what it reads have finished (the step model,
the scheduler and the process handling are ``lowbit.steps``).

Resumable: a step whose recorded inputs (arguments, sha256 of its input files and folders) are unchanged
and whose outputs still hash to what was recorded (a folder by the content of its files; a search by the
candidates' models and metrics its ``search.json`` names) is skipped and says so; a truncated or deleted
output makes its step run again, and the steps that read it once the rebuilt file differs. A step's record is removed
before it runs and written only after it succeeded, so an interrupted or failed step is never trusted;
``--force STEP`` reruns one step (its dependants rerun because their inputs change). One line per step
with its elapsed time; a step's stdout and stderr (its ``error:`` line when it fails) are in
``logs/<step>.log``, its stderr on the console too; the final summary is the report's.

One writer per run dir: a second workflow on the same ``--run-id`` fails at once naming the first.
SIGINT or SIGTERM ends the running steps' whole process trees (SIGTERM, then SIGKILL after 10 s), leaves
no record for them, releases the run dir and exits with 128 + the signal number; the next run resumes.

Examples::

    python scripts/cv-models/run_yolov10m_lowbit_workflow.py                      # demo detector, offline
    python scripts/cv-models/run_yolov10m_lowbit_workflow.py --preset yolov10m \\
        --providers TensorrtExecutionProvider CUDAExecutionProvider --calibration-eps cuda:0 cpu
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

from lowbit.budget_search import default_max_probes
from lowbit.cli import cli_entry
from lowbit.errors import UserError
from lowbit.logs import setup_logging
from lowbit.ort_session import MODELOPT_CALIBRATION_EPS
from lowbit.run_lock import hold_run_folder
from lowbit.runs import REPO_ROOT, atomic_write_json
from lowbit.steps import Step, Stopped, inside, run_steps

SCRIPTS = REPO_ROOT / "scripts" / "cv-models"
SMOKE = REPO_ROOT / "models" / "cv-models" / "helpers" / "run_random_onnx_inference.py"

# Where each preset's inputs live. The demo preset is what a fresh clone runs offline.
PRESETS = {
    "demo": {
        "onnx_path": "models/cv-models/yolov10n-demo-shapes/yolov10n-demo-shapes.onnx",
        "weights": "models/cv-models/yolov10n-demo-shapes/yolov10n-demo-shapes.pt",
        "data_root": "datasets/demo-shapes",
        "calib_list": "datasets/quantize-calib/demo_shapes_calib100.txt",
        "max_images": 500,
        "run_id": "demo",
    },
    "yolov10m": {  # the model card's paths (user-provided checkpoint, weights and COCO)
        "onnx_path": "models/cv-models/yolov10m/checkpoints/yolov10m.onnx",
        "weights": "models/yolo10/yolov10m.pt",
        "data_root": "datasets/coco2017/source-data",
        "calib_list": "datasets/quantize-calib/quant100.txt",
        "max_images": 100,
        "run_id": "yolov10m",
    },
}
STEP_NAMES = (
    "dataset",
    "smoke",
    "baseline",
    "calib-list",
    "calib",
    "int8",
    "int8-eval",
    "fp8",
    "sensitivity",
    "search",
    "schemes",
    "candidates",
    "report",
)
SENSITIVITY_PROVIDERS = ("CPUExecutionProvider", "CUDAExecutionProvider")  # what the ONNX rankings run on
# Leave-one-out costs (3 + nodes) inferences per image: few images on the CPU EP, more on CUDA (see the README).
DEFAULT_SENSITIVITY_IMAGES = {"cpu": 4, "cuda": 16}
CALIB_LIST_SIZE = 100  # images drawn by the calib-list step when the list is missing
# Flags that act only in some plans (their parser default is None, so "given" can be told): dest -> (flag, where
# it acts: "search" = the budget search, "ks" = fixed K, "torch" = the torch ranking, "modes" = any mode's steps).
SCOPED_FLAGS = {
    "random_seeds": ("--random-seeds", "search"),
    "random_band": ("--random-band", "search"),
    "max_probes": ("--max-probes", "search"),
    "parallel_probes": ("--parallel-probes", "search"),
    "candidate_build": ("--candidate-build", "search"),
    "ks": ("--ks", "modes"),
    "random_control": ("--random-control", "ks"),
    "sensitivity": ("--sensitivity", "modes"),
    "sensitivity_images": ("--sensitivity-images", "modes"),
    "weights": ("--weights", "torch"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Defaults marked (preset) come from --preset; every flag overrides its preset value.",
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo", help="input paths (default: demo)")
    parser.add_argument("--onnx-path", type=Path, help="FP32 raw-head ONNX (preset); its file stem names the outputs")
    parser.add_argument("--weights", type=Path, help="ultralytics .pt for the torch sweep (preset)")
    parser.add_argument("--data-root", type=Path, help="COCO-layout dataset: val2017/ + annotations/ (preset)")
    parser.add_argument(
        "--calib-list", type=Path, help="calibration image list (preset; made from --data-root if missing)"
    )
    parser.add_argument(
        "--max-images", type=int, help="evaluation slice: first N image ids (preset: demo 500, yolov10m 100)"
    )
    parser.add_argument(
        "--output-root",
        type=Path,
        default=Path("tmp/yolov10m_lowbit"),
        help="parent of run dirs (default: %(default)s)",
    )
    parser.add_argument("--run-id", help="run directory name; an existing one is resumed (preset: demo | yolov10m)")
    parser.add_argument(
        "--imgsz", type=int, default=640, help="square input side, a multiple of 32 (default: %(default)s)"
    )
    parser.add_argument(
        "--providers", nargs="+", default=["CPUExecutionProvider"], help="ORT providers for smoke and evals"
    )
    parser.add_argument(
        "--calibration-eps",
        nargs="+",
        choices=MODELOPT_CALIBRATION_EPS,
        default=["cpu"],
        help="ModelOpt calibration EPs of every quantization (default: cpu)",
    )
    parser.add_argument(
        "--calibration-method",
        choices=("entropy", "max"),
        default="entropy",
        help="INT8 calibration, of the int8 step and the INT8 candidates (default: entropy; FP8 uses max)",
    )
    parser.add_argument(
        "--high-precision-dtype",
        choices=("auto", "fp32", "fp16", "bf16"),
        default="auto",
        help="non-quantized tensors of every Q/DQ model (default: auto = fp16 where onnxruntime rounds fp16 QuantizeLinear correctly, else fp32; see the card)",
    )
    parser.add_argument(
        "--candidate-modes",
        nargs="*",
        choices=("fp8", "int8"),
        default=["fp8", "int8"],
        help="low-bit candidate families K in --ks (default: fp8 int8; INT8 K=0 is the int8 step; "
        "nothing to skip step 4)",
    )
    parser.add_argument(
        "--ks",
        type=int,
        nargs="+",
        default=None,
        help="fixed top-K exclusions, e.g. 0 5 10 20 (default: none, the budget search chooses K)",
    )
    parser.add_argument(
        "--sensitivity",
        choices=("single", "loo", "local", "torch"),
        default=None,
        help="ranking: single = one node quantized at a time on the deployed Q/DQ graph, output drift "
        "after propagation (the torch sweep's score; default), loo = leave-one-out of the full Q/DQ "
        "graph, local = "
        "each node's own error (cheap), torch = the torch sweep on --weights",
    )
    parser.add_argument(
        "--sensitivity-images",
        type=int,
        default=None,
        help="images scored by the sensitivity step (default: 4 on the CPU EP, 16 with CUDA)",
    )
    parser.add_argument(
        "--random-control",
        type=int,
        default=None,
        metavar="SEED",
        help="with --ks: also build random K-node exclusions with this seed",
    )
    parser.add_argument(
        "--random-seeds", type=int, default=None, help="search: random controls at the K found (default: 3)"
    )
    parser.add_argument(
        "--random-band",
        action="store_true",
        default=None,
        help="search: random controls at every probed K too (costs seeds x probes evaluations)",
    )
    parser.add_argument(
        "--max-probes",
        type=int,
        default=None,
        help="search: most candidates evaluated per mode (default: 12 x --parallel-probes)",
    )
    parser.add_argument(
        "--parallel-probes",
        type=int,
        default=None,
        help="search: candidates evaluated at once, each in a worker process (default: 3 with the "
        "CUDA EP, where three evaluations side by side take about as long as one; 1 otherwise)",
    )
    parser.add_argument(
        "--candidate-build",
        choices=("full", "requantize"),
        default=None,
        help="search: candidates from the full Q/DQ model with Q/DQ pairs removed (default) or "
        "ModelOpt re-quantization with nodes_to_exclude",
    )
    parser.add_argument(
        "--budget-ap",
        type=float,
        default=0.5,
        help="AP points a variant may lose against FP32: the search's target and the "
        "recommendation's budget (default: 0.5)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="steps run at once when they do not depend on each other, e.g. the FP8 branch beside "
        "INT8's calibration (default: 3 with a GPU provider, 1 on the CPU EP, whose sessions use every core)",
    )
    parser.add_argument("--force", nargs="+", choices=STEP_NAMES, default=[], help="rerun these steps even if complete")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the commands and what would be skipped; run and write nothing"
    )
    return parser


# ----------------------------------------------------------------------------------------------------------------------
# settings: preset defaults, then every check before any step runs


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill preset defaults (an explicit value, 0 included, always wins) and derive the output stem."""
    # which plan-specific flags were given (their parser default is None), before defaults hide it
    args.given = [dest for dest in SCOPED_FLAGS if getattr(args, dest) is not None]
    preset = PRESETS[args.preset]
    for key in ("onnx_path", "weights", "data_root", "calib_list"):
        if getattr(args, key) is None:
            setattr(args, key, Path(preset[key]))
    if args.max_images is None:
        args.max_images = preset["max_images"]
    if args.run_id is None:
        args.run_id = preset["run_id"]
    # Output files are named after the model: the card's checkpoint yolov10m.onnx gives the card's names.
    args.model_name = args.onnx_path.stem
    args.search = args.ks is None
    cuda = "CUDAExecutionProvider" in args.providers
    if args.jobs is None:
        args.jobs = 3 if cuda or "TensorrtExecutionProvider" in args.providers else 1
    if args.parallel_probes is None:
        args.parallel_probes = 3 if cuda else 1
    if args.max_probes is None:
        args.max_probes = default_max_probes(args.parallel_probes)
    if args.sensitivity_images is None:
        args.sensitivity_images = DEFAULT_SENSITIVITY_IMAGES["cuda" if cuda else "cpu"]
    defaults = {"sensitivity": "single", "random_seeds": 3, "random_band": False, "candidate_build": "full"}
    for dest, value in defaults.items():
        if getattr(args, dest) is None:
            setattr(args, dest, value)
    # The search script takes a concrete dtype: "auto" is resolved here exactly as the quantize step resolves it.
    args.search_high_precision_dtype = None
    if args.search and args.candidate_modes and args.candidate_build == "requantize":
        from lowbit.quantize import resolve_high_precision_dtype  # lazy: runs one onnxruntime probe

        args.search_high_precision_dtype = resolve_high_precision_dtype(args.high_precision_dtype)[0]
    return args


def unused_flag(args: argparse.Namespace) -> tuple[str, str] | None:
    """``(flag, why)`` of the first flag given that does nothing in the chosen plan, or None."""
    for dest in args.given:
        flag, acts_in = SCOPED_FLAGS[dest]
        if not args.candidate_modes:
            return flag, "does nothing with an empty --candidate-modes (no mode is ranked, searched or built); drop it"
        if acts_in == "search" and not args.search:
            return flag, "sets the budget search, which --ks replaces: it would do nothing; drop it or --ks"
        if acts_in == "ks" and args.search:
            return flag, "applies to fixed K (--ks); the budget search draws its own controls (--random-seeds N)"
        if acts_in == "torch" and args.sensitivity != "torch":
            return flag, f"is read only by --sensitivity torch (the ranking is {args.sensitivity}); drop it"
    return None


def check_settings(args: argparse.Namespace) -> None:
    """Numbers and names, with this command's flags, before anything is read or run."""
    checks = [
        (args.max_images >= 1, "--max-images", f"must be >= 1, got {args.max_images}"),
        (args.imgsz >= 32 and args.imgsz % 32 == 0, "--imgsz", f"must be a positive multiple of 32, got {args.imgsz}"),
        (args.search or min(args.ks) >= 0, "--ks", f"values must be >= 0, got {args.ks}"),
        (args.random_seeds >= 0, "--random-seeds", f"must be >= 0, got {args.random_seeds}"),
        (args.jobs >= 1, "--jobs", f"must be >= 1, got {args.jobs}"),
        (args.max_probes >= 1, "--max-probes", f"must be >= 1, got {args.max_probes}"),
        (args.parallel_probes >= 1, "--parallel-probes", f"must be >= 1, got {args.parallel_probes}"),
        (args.sensitivity_images >= 1, "--sensitivity-images", f"must be >= 1, got {args.sensitivity_images}"),
        (math.isfinite(args.budget_ap) and args.budget_ap > 0, "--budget-ap",
         f"must be a finite number of AP points > 0 (the search's target and the report's budget), got {args.budget_ap}"),
        (args.random_control is None or args.random_control >= 0, "--random-control",
         f"seed must be >= 0, got {args.random_control}"),
        (len(set(args.candidate_modes)) == len(args.candidate_modes), "--candidate-modes",
         f"lists a mode more than once: {' '.join(args.candidate_modes)}"),
        (args.run_id not in ("", ".", "..") and "/" not in args.run_id, "--run-id",
         f"must be a plain folder name, got {args.run_id!r}"),
    ]  # fmt: skip
    for ok, flag, message in checks:
        if not ok:
            raise UserError(f"{flag} {message}", flag=flag)
    unused = unused_flag(args)
    if unused:
        raise UserError(f"{unused[0]} {unused[1]}", flag=unused[0])
    from lowbit.ort_session import check_providers

    try:
        check_providers(args.providers, disable_cpu_fallback=False, flag="--providers")
    except UserError as e:  # the same message, tagged with this command's flag
        raise UserError(str(e), flag="--providers") from e


def check_inputs(args: argparse.Namespace) -> None:
    """Fail before any step runs when a user-provided input is missing or unusable (the demo's data is generated)."""
    onnx_path = args.onnx_path
    if onnx_path.is_symlink() and not onnx_path.exists():
        raise UserError(
            f"--onnx-path: {onnx_path} is a symlink to {os.readlink(onnx_path)}, which does not exist",
            flag="--onnx-path",
        )
    if not onnx_path.is_file():
        raise UserError(
            f"--onnx-path: {onnx_path} does not exist (see models/cv-models/yolov10m/README.md)", flag="--onnx-path"
        )
    check_model_input(onnx_path, args.imgsz)
    ann = args.data_root / "annotations" / "instances_val2017.json"
    if not is_generated_demo_data(args):
        if not ann.is_file():
            raise UserError(
                f"--data-root: {ann} not found (see datasets/README.md for placing COCO 2017 val)", flag="--data-root"
            )
        if not (args.data_root / "val2017").is_dir():
            raise UserError(
                f"--data-root: {args.data_root} has no val2017/ image folder (see datasets/README.md)",
                flag="--data-root",
            )
    if args.calib_list.exists() and not args.calib_list.is_file():
        raise UserError(f"--calib-list: {args.calib_list} is not a file", flag="--calib-list")
    if args.sensitivity == "torch" and args.candidate_modes and not args.weights.is_file():
        raise UserError(f"--weights: {args.weights} not found (needed by --sensitivity torch)", flag="--weights")


def check_model_input(onnx_path: Path, imgsz: int) -> None:
    """The model is an ONNX graph with one image input [1,3,H,W] whose static H and W, if any, equal ``--imgsz``."""
    from lowbit.model_input import check_graph_image_input
    from lowbit.onnx_stats import load_model_proto

    check_graph_image_input(load_model_proto(onnx_path, "--onnx-path"), imgsz, onnx_path, "--onnx-path")


def is_generated_demo_data(args: argparse.Namespace) -> bool:
    """The demo preset's dataset is generated by the dataset step when missing."""
    return args.preset == "demo" and args.data_root == Path(PRESETS["demo"]["data_root"])


# ----------------------------------------------------------------------------------------------------------------------
# each card script's argv, in the order its bash wrapper writes it (tests compare the two)


def quantize_argv(onnx_path: Path, calib: Path, output: Path, mode: str, calibration_eps: list[str],
                  high_precision_dtype: str, calibration_method: str | None) -> list[str]:  # fmt: skip
    """``quantize_yolov10m_onnx.py`` as ``quantize_yolov10m_int8_onnx.sh`` calls it (OVERWRITE=1, defaults elsewhere)."""
    argv = ["--onnx-path", str(onnx_path), "--calib-path", str(calib), "--output-path", str(output),
            "--quantize-mode", mode, "--calibration-eps", *calibration_eps, "--high-precision-dtype", high_precision_dtype]  # fmt: skip
    if calibration_method:
        argv += ["--calibration-method", calibration_method]
    return argv + ["--no-use-zero-point", "--passes", "concat_elimination", "--overwrite"]


def torch_sweep_argv(
    weights: Path, calib: Path, num_images: int, fmt: str, output_root: Path, run_id: str
) -> list[str]:
    """``yolov10m_layer_sensitivity.py`` as ``run_yolov10m_layer_sensitivity_sweep.sh`` calls it (OVERWRITE=1)."""
    return ["--weights", str(weights), "--calib-npy", str(calib), "--num-images", str(num_images), "--formats", fmt,
            "--output-root", str(output_root), "--run-id", run_id, "--overwrite"]  # fmt: skip


def materialize_argv(
    args: argparse.Namespace, run: Path, calib: Path, schemes: Path, mode: str, ks: list[int]
) -> list[str]:
    """``materialize_yolov10m_lowbit_candidates.py`` as ``materialize_yolov10m_lowbit_candidates.sh`` calls it
    (EVAL=1, OVERWRITE=1, INCLUDE_RANDOM=1 with a random control)."""
    argv = ["--run-root", str(run), "--calib-path", str(calib), "--schemes-dir", str(schemes),
            "--onnx-path", str(args.onnx_path), "--ks", *map(str, ks), "--quant-mode", mode,
            "--high-precision-dtype", args.high_precision_dtype, "--data-root", str(args.data_root),
            "--max-images", str(args.max_images), "--providers", *args.providers, "--imgsz", str(args.imgsz),
            "--calibration-eps", *args.calibration_eps]  # fmt: skip
    if mode == "int8":  # the INT8 candidates calibrate like the int8 step they are compared with
        argv += ["--calibration-method", args.calibration_method]
    argv.append("--eval")
    if args.random_control is not None:
        argv.append("--include-random")
    return argv + ["--overwrite"]


# ----------------------------------------------------------------------------------------------------------------------
# the plan


def _script(name: str) -> list[str]:
    return [sys.executable, str(SCRIPTS / name)]


def base_steps(args: argparse.Namespace, run: Path) -> list[Step]:
    """Card steps 1-3: dataset (demo), smoke, baseline, calibration, INT8 and its evaluation."""
    ann, images = dataset_files(args)
    calib = calib_path(args, run)
    int8_model = run / "onnx" / f"{args.model_name}-int8-qdq.onnx"
    eval_common = ["--data-root", str(args.data_root), "--max-images", str(args.max_images),
                   "--providers", *args.providers, "--imgsz", str(args.imgsz), "--overwrite"]  # fmt: skip
    steps: list[Step] = []
    if is_generated_demo_data(args):
        steps.append(dataset_step(args))
    steps += [
        Step("smoke", [sys.executable, str(SMOKE), "--model", str(args.onnx_path), "--output-root", str(run / "baseline-onnx"),
                       "--providers", *args.providers],
             outputs=[run / "baseline-onnx"], inputs=[args.onnx_path]),
        Step("baseline", [*_script("eval_yolov10m_onnx_coco.py"), "--onnx-path", str(args.onnx_path), *eval_common,
                          "--out", str(run / "baseline-coco" / "metrics.json")],
             outputs=[run / "baseline-coco" / "metrics.json"], inputs=[args.onnx_path, ann, images]),
    ]  # fmt: skip
    if not args.calib_list.is_file():
        steps.append(Step("calib-list", [*_script("make_calib_list.py"), "--data-root", str(args.data_root),
                                         "--eval-max-images", str(args.max_images), "--num", str(CALIB_LIST_SIZE),
                                         "--out", str(args.calib_list)],
                          outputs=[args.calib_list], inputs=[ann]))  # fmt: skip
    int8_argv = quantize_argv(args.onnx_path, calib, int8_model, "int8", args.calibration_eps,
                              args.high_precision_dtype, args.calibration_method)  # fmt: skip
    calib_reads = calib_list_images(args, [out for step in steps for out in step.outputs])
    steps += [
        Step("calib", [*_script("make_yolov10m_calib_npy.py"), "--list", str(args.calib_list), "--out", str(calib),
                       "--imgsz", str(args.imgsz), "--overwrite"],
             outputs=[calib], inputs=[args.calib_list, *calib_reads]),
        Step("int8", [*_script("quantize_yolov10m_onnx.py"), *int8_argv], outputs=[int8_model],
             inputs=[args.onnx_path, calib]),
        Step("int8-eval", [*_script("eval_yolov10m_onnx_coco.py"), "--onnx-path", str(int8_model), *eval_common,
                           "--out", str(run / "int8-coco" / "metrics.json")],
             outputs=[run / "int8-coco" / "metrics.json"], inputs=[int8_model, ann, images]),
    ]  # fmt: skip
    return steps


def dataset_files(args: argparse.Namespace) -> tuple[Path, Path]:
    """The evaluation data every evaluating step reads: the annotation file and the images folder."""
    return args.data_root / "annotations" / "instances_val2017.json", args.data_root / "val2017"


def dataset_step(args: argparse.Namespace) -> Step:
    """The demo's val split, generated when missing: its images folder and annotations are what later steps read."""
    argv = [*_script("make_demo_dataset.py"), "--out-root", str(args.data_root), "--splits", "val"]
    ann, images = dataset_files(args)
    return Step("dataset", argv, outputs=[images, ann], reuse_existing=True)


def calib_list_images(args: argparse.Namespace, made: list[Path]) -> list[Path]:
    """What the calib step reads besides its list: the images the list names (each existing, or to be written into
    ``made`` by an earlier step), or the images folder when the calib-list step is to write the list.

    Raises:
        UserError(--calib-list): the list names no image, or an image that neither exists nor is made by a step.
    """
    if not args.calib_list.is_file():
        return [dataset_files(args)[1]]
    from lowbit.calib import parse_image_list  # lazy: the calibration module imports numpy

    entries = parse_image_list(args.calib_list, "--calib-list")
    if not entries:
        raise UserError(f"--calib-list: {args.calib_list} lists no images", flag="--calib-list")
    images = []
    for entry in entries:
        # an image not there yet is looked for where the list's resolution rule would find it once made
        found = entry.path if entry.path.is_file() else next((c for c in entry.candidates if inside(c, made)), None)
        if found is None:
            looked = " or ".join(map(str, entry.candidates))
            raise UserError(
                f"--calib-list: {args.calib_list} line {entry.line_no}: image {entry.text} does not exist (looked for "
                f"{looked}) and no step of this run makes it",
                flag="--calib-list",
            )
        images.append(found)
    return images


def calib_path(args: argparse.Namespace, run: Path) -> Path:
    return run / "calib" / f"calib_{args.model_name}_{args.imgsz}.npy"


def sensitivity_step(args: argparse.Namespace, run: Path, mode: str, full_model: Path | None = None) -> Step:
    """The ranking of one mode: ONNX-native (``single``, ``loo`` or ``local``), on ``full_model`` when given (the search's
    Q/DQ model; else the script quantizes its own), or the torch sweep on ``--weights``."""
    calib = calib_path(args, run)
    if args.sensitivity != "torch":
        method = args.sensitivity
        out_dir = run / f"sensitivity-{method}-{mode}" / "outputs" / args.model_name / f"onnx-{mode}" / "per_layer"
        providers = [p for p in args.providers if p in SENSITIVITY_PROVIDERS] or ["CPUExecutionProvider"]
        argv = [*_script("onnx_layer_sensitivity.py"), "--onnx-path", str(args.onnx_path), "--calib-path", str(calib),
                "--num-images", str(args.sensitivity_images), "--precision", mode, "--method", method,
                "--providers", *providers]  # fmt: skip
        if full_model is None:
            argv += ["--calibration-eps", *args.calibration_eps]
        else:
            argv += ["--qdq-path", str(full_model)]
        argv += ["--out-dir", str(out_dir), "--overwrite"]
        inputs = [args.onnx_path, calib] + ([full_model] if full_model else [])
    else:
        from lowbit.sensitivity_torch import report_dir  # where the torch sweep puts its report

        fmt, run_id = f"{mode}-{mode}", f"sensitivity-torch-{mode}"
        out_dir = report_dir(run / run_id, fmt, args.weights)
        argv = [*_script("yolov10m_layer_sensitivity.py"),
                *torch_sweep_argv(args.weights, calib, args.sensitivity_images, fmt, run, run_id)]  # fmt: skip
        inputs = [args.weights, calib]
    report = out_dir / "layer-sensitivity-report.json"
    return Step(f"sensitivity-{mode}", argv, outputs=[report], inputs=inputs, family="sensitivity")


def full_model_path(args: argparse.Namespace, run: Path, mode: str) -> Path:
    """The mode's calibrated Q/DQ model with every node quantized: the int8 step's, or the fp8 step's."""
    name = f"{args.model_name}-int8-qdq.onnx" if mode == "int8" else f"{args.model_name}-fp8-k0.onnx"
    return run / "onnx" / name


def search_argv(args: argparse.Namespace, run: Path, mode: str, ranking: Path) -> list[str]:
    """``search_yolov10m_lowbit_budget.py`` for one mode (INT8 K=0 is the int8-eval step's evaluation)."""
    argv = ["--mode", mode, "--run-root", str(run), "--ranking", str(ranking), "--onnx-path", str(args.onnx_path),
            "--full-model", str(full_model_path(args, run, mode)),
            "--baseline-metrics", str(run / "baseline-coco" / "metrics.json"),
            "--budget-ap", str(args.budget_ap), "--random-seeds", str(args.random_seeds),
            "--max-probes", str(args.max_probes), "--parallel-probes", str(args.parallel_probes),
            "--build", args.candidate_build,
            "--data-root", str(args.data_root), "--max-images", str(args.max_images),
            "--providers", *args.providers, "--imgsz", str(args.imgsz)]  # fmt: skip
    if mode == "int8":
        argv += ["--k0-metrics", str(run / "int8-coco" / "metrics.json")]
    if args.random_band:
        argv.append("--random-band")
    if args.candidate_build == "requantize":
        argv += ["--calib-path", str(calib_path(args, run)), "--calibration-eps", *args.calibration_eps,
                 "--high-precision-dtype", args.search_high_precision_dtype]  # fmt: skip
        if mode == "int8":
            argv += ["--calibration-method", args.calibration_method]
    return argv


def search_steps(args: argparse.Namespace, run: Path, mode: str) -> list[Step]:
    """Search mode for one mode: (FP8: its full Q/DQ model), ranking on that model, budget search."""
    calib = calib_path(args, run)
    ann, images = dataset_files(args)
    full = full_model_path(args, run, mode)
    steps = []
    if mode == "fp8":
        fp8_argv = quantize_argv(
            args.onnx_path, calib, full, "fp8", args.calibration_eps, args.high_precision_dtype, None
        )
        steps.append(Step("fp8", [*_script("quantize_yolov10m_onnx.py"), *fp8_argv], outputs=[full],
                          inputs=[args.onnx_path, calib]))  # fmt: skip
    sens = sensitivity_step(args, run, mode, None if args.sensitivity == "torch" else full)
    ranking = sens.outputs[0]
    baseline = run / "baseline-coco" / "metrics.json"
    inputs = [ranking, full, baseline, args.onnx_path, ann, images]
    if mode == "int8":
        inputs.append(run / "int8-coco" / "metrics.json")
    if args.candidate_build == "requantize":
        inputs.append(calib)
    result = run / f"search-{mode}" / "search.json"
    argv = [*_script("search_yolov10m_lowbit_budget.py"), *search_argv(args, run, mode, ranking)]
    search = Step(f"search-{mode}", argv, outputs=[result], inputs=inputs, family="search", cites=[result])
    return [*steps, sens, search]


def mode_steps(args: argparse.Namespace, run: Path, mode: str) -> list[Step]:
    """Card step 4 for one mode: ranking, schemes, candidates (materialized and evaluated)."""
    # INT8 with no exclusions is the card's step 3 (the int8 step): do not quantize it twice
    mode_ks = [k for k in args.ks if k != 0] if mode == "int8" else list(args.ks)
    if not mode_ks:
        return []
    calib = calib_path(args, run)
    ann, images = dataset_files(args)
    summary = run / f"candidates-{mode}" / "summary.json"
    schemes = run / ("schemes" if mode == "fp8" else f"schemes-{mode}")
    sens = sensitivity_step(args, run, mode)
    report = sens.outputs[0]
    scheme_argv = [*_script("make_yolov10m_candidate_schemes.py"), "--report-json", str(report), "--out-dir", str(schemes),
                   "--onnx-path", str(args.onnx_path), "--k", *map(str, args.ks), "--overwrite"]  # fmt: skip
    if args.random_control is not None:
        scheme_argv += ["--random-control", str(args.random_control)]
    scheme_files = [schemes / f"scheme_k{k}.json" for k in mode_ks]
    return [
        sens,
        Step(f"schemes-{mode}", scheme_argv, outputs=scheme_files, inputs=[report, args.onnx_path], family="schemes"),
        Step(f"candidates-{mode}",
             [*_script("materialize_yolov10m_lowbit_candidates.py"), *materialize_argv(args, run, calib, schemes, mode, mode_ks)],
             outputs=[summary], inputs=[args.onnx_path, calib, ann, images, *scheme_files], family="candidates",
             cites=[summary]),
    ]  # fmt: skip


def plan(args: argparse.Namespace, run: Path) -> list[Step]:
    """Every step of the run, in order; nothing is run or written."""
    steps = base_steps(args, run)
    for mode in args.candidate_modes:
        steps += search_steps(args, run, mode) if args.search else mode_steps(args, run, mode)
    # the report reads every evaluation: the metrics files, and the searches' and candidates' records with the
    # models and metrics they name
    evaluated = [
        s.outputs[0] for s in steps if s.name in ("baseline", "int8-eval") or s.family in ("candidates", "search")
    ]
    records = [s.outputs[0] for s in steps if s.family in ("candidates", "search")]
    outputs = [run / "report.md", run / "report.json", run / "pareto.png"]
    if args.search and args.candidate_modes:
        outputs.append(run / "search-curves.png")
    argv = [*_script("make_lowbit_report.py"), "--run-dir", str(run), "--out-dir", str(run)]
    argv += ["--budget-ap", str(args.budget_ap), "--overwrite"]
    steps.append(Step("report", argv, outputs=outputs, inputs=evaluated, cites=records))
    return steps


def k_choice(args: argparse.Namespace) -> str:
    """How K is chosen per mode, in one line for the log."""
    if not args.search:
        return f"fixed, --ks {' '.join(map(str, args.ks))}"
    return (
        f"budget search, {args.sensitivity} ranking, budget {args.budget_ap:g} AP, candidates built "
        f"'{args.candidate_build}', <= {args.max_probes} probes, {args.parallel_probes} at once, "
        f"{args.random_seeds} random seeds"
    )


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = resolve_args(build_parser().parse_args(argv))
    check_settings(args)
    check_inputs(args)
    run = args.output_root / args.run_id
    steps = plan(args, run)
    if args.dry_run:  # prints the plan and writes nothing, so it needs no hold on the run dir
        return run_steps(run, steps, set(args.force), True, setup_logging(), args.jobs)
    with hold_run_folder(run, "--run-id"):
        logger = setup_logging(run / "workflow.log")
        settings = {"argv": sys.argv if argv is None else argv, "preset": args.preset, "steps": [s.name for s in steps]}
        atomic_write_json(run / "workflow.json", {**settings, "args": vars(args)})
        logger.info("run dir %s: %d steps (%s)", run, len(steps), " ".join(s.name for s in steps))
        logger.info("K per mode: %s", k_choice(args))
        t_start = time.perf_counter()
        try:
            rc = run_steps(run, steps, set(args.force), False, logger, args.jobs)
        except Stopped as exc:
            logger.error("%s", exc)
            return 128 + exc.signum
    if rc != 0:
        return rc
    logger.info("workflow finished in %.1f s: %s", time.perf_counter() - t_start, run / "report.md")
    report = run / "report.md"
    print(report.read_text() if report.is_file() else f"(no report at {report})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
