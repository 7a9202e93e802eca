"""The low-bit workflow's settings: its flags and presets, their resolution, and every check before the first step.

:func:`add_workflow_arguments` gives ``run_yolov10m_lowbit_workflow.py`` its flags; :func:`resolve_args` fills
what was left to the preset or to the providers (the result is the ``args`` of ``workflow.json``);
:func:`check_settings` and :func:`check_inputs` refuse bad numbers, flags that would do nothing in the chosen
plan and unusable inputs, naming the workflow's flag (``UserError.flag``), before anything is run or written.
:func:`calib_list_images` reads the calibration list, so the calib step can declare the images it names.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from pathlib import Path

from lowbit.budget_search import default_max_probes
from lowbit.errors import UserError
from lowbit.ort_providers import MODELOPT_CALIBRATION_EPS
from lowbit.pipeline_steps import dataset_files
from lowbit.search_confirm import DEFAULT_CONFIDENCE
from lowbit.steps import inside

__all__ = [
    "DEFAULT_REVERT_PROBES",
    "DEFAULT_SENSITIVITY_IMAGES",
    "EPILOG",
    "PRESETS",
    "SCOPED_FLAGS",
    "STEP_NAMES",
    "Preset",
    "add_workflow_arguments",
    "calib_list_images",
    "check_confirmation_slice",
    "check_inputs",
    "check_model_input",
    "check_settings",
    "confirms",
    "is_generated_demo_data",
    "k_choice",
    "resolve_args",
    "unused_flag",
]


@dataclass(frozen=True)
class Preset:
    """Where one preset's inputs live, and its evaluation slice and run id."""

    onnx_path: Path
    weights: Path
    data_root: Path
    calib_list: Path
    max_images: int
    run_id: str
    confirm_images: int  # images of the confirmation slice (0: none)
    confirm_skip: int  # image ids before it: the evaluation slice and the calibration images


# The demo preset is what a fresh clone runs offline; yolov10m is the model card's paths (a user-provided
# checkpoint, weights and COCO).
PRESETS = {
    "demo": Preset(
        onnx_path=Path("models/cv-models/yolov10n-demo-shapes/yolov10n-demo-shapes.onnx"),
        weights=Path("models/cv-models/yolov10n-demo-shapes/yolov10n-demo-shapes.pt"),
        data_root=Path("datasets/demo-shapes"),
        calib_list=Path("datasets/quantize-calib/demo_shapes_calib100.txt"),
        max_images=500,
        run_id="demo",
        confirm_images=500,
        confirm_skip=600,  # ids 1..500 evaluation, 501..600 calibration, 601..1100 confirmation
    ),
    "yolov10m": Preset(
        onnx_path=Path("models/cv-models/yolov10m/checkpoints/yolov10m.onnx"),
        weights=Path("models/yolo10/yolov10m.pt"),
        data_root=Path("datasets/coco2017/source-data"),
        calib_list=Path("datasets/quantize-calib/quant100.txt"),
        max_images=100,
        run_id="yolov10m",
        confirm_images=500,
        confirm_skip=100,  # val2017 ids after the evaluation slice (the calibration list is checked not to overlap)
    ),
}
# --force takes a step's name or its family's (sensitivity, search, schemes, candidates: one step per mode)
STEP_NAMES = (
    "dataset",
    "smoke",
    "baseline",
    "baseline-confirm",
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
# Leave-one-out costs (3 + nodes) inferences per image: few images on the CPU EP, more on CUDA (see the README).
DEFAULT_SENSITIVITY_IMAGES = {"cpu": 4, "cuda": 16}
# Revert-pass tries per mode: one evaluation each, about a minute on 2 CPU cores, seconds on a GPU (see the README).
DEFAULT_REVERT_PROBES = {"cpu": 0, "cuda": 12}
# Flags that act only in some plans (their parser default is None, so "given" can be told): dest -> (flag, where
# it acts: "search" = the budget search, "ks" = fixed K, "torch" = the torch ranking, "modes" = any mode's steps).
SCOPED_FLAGS = {
    "random_seeds": ("--random-seeds", "search"),
    "random_band": ("--random-band", "search"),
    "max_probes": ("--max-probes", "search"),
    "parallel_probes": ("--parallel-probes", "search"),
    "candidate_build": ("--candidate-build", "search"),
    "confidence": ("--confidence", "search"),
    "confirm_images": ("--confirm-images", "search"),
    "confirm_skip": ("--confirm-skip", "search"),
    "revert_probes": ("--revert-probes", "search"),
    "ks": ("--ks", "modes"),
    "random_control": ("--random-control", "ks"),
    "sensitivity": ("--sensitivity", "modes"),
    "sensitivity_images": ("--sensitivity-images", "modes"),
    "weights": ("--weights", "torch"),
}
EPILOG = (
    "Defaults shown as None are decided at run time: those marked (preset) come from --preset, the others as their "
    "'None:' says. Every flag overrides its preset value."
)


def add_workflow_arguments(parser: argparse.ArgumentParser) -> None:
    """The workflow's flags, in ``--help`` order: inputs and quantization, then K, the search and scheduling."""
    _add_input_arguments(parser)
    _add_plan_arguments(parser)


def _add_input_arguments(parser: argparse.ArgumentParser) -> None:
    """Inputs (preset), the run dir, providers, quantization, the modes."""
    add = parser.add_argument
    add("--preset", choices=sorted(PRESETS), default="demo", help="input paths")
    add("--onnx-path", type=Path, help="FP32 raw-head ONNX; its file stem names the outputs (preset)")
    add("--weights", type=Path, help="ultralytics .pt for the torch sweep (preset)")
    add("--data-root", type=Path, help="COCO-layout dataset: val2017/ + annotations/ (preset)")
    add("--calib-list", type=Path, help="calibration image list, made from --data-root if missing (preset)")
    add("--max-images", type=int, help="evaluation slice: first N image ids (preset: demo 500, yolov10m 100)")
    add("--output-root", type=Path, default=Path("tmp/yolov10m_lowbit"), help="parent of run dirs")
    add("--run-id", help="run directory name; an existing one is resumed (preset: demo | yolov10m)")
    add("--imgsz", type=int, default=640, help="square input side, a multiple of 32")
    add("--providers", nargs="+", default=["CPUExecutionProvider"], help="ORT providers for smoke and evals")
    add(
        "--calibration-eps",
        nargs="+",
        choices=MODELOPT_CALIBRATION_EPS,
        default=["cpu"],
        help="ModelOpt calibration EPs of every quantization",
    )
    add(
        "--calibration-method",
        choices=("entropy", "max"),
        default="entropy",
        help="INT8 calibration, of the int8 step and the INT8 candidates (FP8 uses max)",
    )
    add(
        "--high-precision-dtype",
        choices=("auto", "fp32", "fp16", "bf16"),
        default="auto",
        help="non-quantized tensors of every Q/DQ model (auto = fp16 where onnxruntime rounds fp16 QuantizeLinear "
        "correctly, else fp32; see the card)",
    )
    add(
        "--candidate-modes",
        nargs="*",
        choices=("fp8", "int8"),
        default=["fp8", "int8"],
        help="low-bit modes ranked, searched or built (INT8 K=0 is the int8 step; nothing to skip step 4)",
    )


def _add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """How K is chosen (fixed K, the ranking, the budget search) and how the steps are scheduled."""
    add = parser.add_argument
    add("--ks", type=int, nargs="+", help="fixed top-K exclusions, e.g. 0 5 10 20 (None: the budget search chooses K)")
    add(
        "--sensitivity",
        choices=("single", "loo", "local", "torch"),
        help="ranking (None: single): single = one node quantized at a time on the deployed Q/DQ graph, output "
        "drift after propagation (the torch sweep's score), loo = leave-one-out of the full Q/DQ graph, local = "
        "each node's own error (cheap), torch = the torch sweep on --weights",
    )
    add("--sensitivity-images", type=int, help="images scored by the ranking (None: 4 on the CPU EP, 16 with CUDA)")
    add(
        "--random-control",
        type=int,
        metavar="SEED",
        help="with --ks: also build random K-node exclusions with this seed",
    )
    add("--random-seeds", type=int, help="search: random controls at the K found (None: 3)")
    add(
        "--random-band",
        action="store_true",
        default=None,
        help="search: random controls at every probed K too (costs seeds x probes evaluations; None: off)",
    )
    add("--max-probes", type=int, help="search: most candidates evaluated per mode (None: 12 x --parallel-probes)")
    add(
        "--revert-probes",
        type=int,
        help="search: after the confirmed pick, try up to N of its float nodes back in low precision, least "
        "sensitive first, keeping each whose candidate still meets the budget; the final set is evaluated on the "
        "confirmation slice (one evaluation per try; None: 12 with the CUDA EP, 0 on the CPU EP: no revert pass)",
    )
    add(
        "--parallel-probes",
        type=int,
        help="search: candidates evaluated at once, each in a worker process (None: 3 with the CUDA EP, where "
        "three evaluations side by side take about as long as one; 1 otherwise)",
    )
    add(
        "--candidate-build",
        choices=("full", "requantize"),
        help="search: candidates from the full Q/DQ model with Q/DQ pairs removed (None: this, full) or ModelOpt "
        "re-quantization with nodes_to_exclude",
    )
    add(
        "--budget-ap",
        type=float,
        default=0.5,
        help="AP points a variant may lose against FP32: the search's target and the recommendation's budget",
    )
    add(
        "--confidence",
        type=float,
        help="search: how sure 'within budget' must be; a K counts when its loss + z(confidence) x its paired "
        "standard error (bootstrap over the images) is within --budget-ap (None: 0.8; 0.5 = the point estimate)",
    )
    add(
        "--confirm-images",
        type=int,
        help="search: images of the confirmation slice, never seen by the search; the pick must hold there "
        "(0: no confirmation; preset: 500)",
    )
    add(
        "--confirm-skip",
        type=int,
        help="search: image ids (ascending) before the confirmation slice, at least --max-images (preset: demo 600 "
        "= 500 evaluation + 100 calibration, yolov10m 100)",
    )
    add(
        "--jobs",
        type=int,
        help="steps run at once when they do not depend on each other, e.g. the FP8 branch beside INT8's "
        "calibration (None: 3 with a GPU provider, 1 on the CPU EP, whose sessions use every core)",
    )
    add("--force", nargs="+", choices=STEP_NAMES, default=[], help="rerun these steps (or families) even if complete")
    add("--dry-run", action="store_true", help="print the commands and what would be skipped; run and write nothing")


# ----------------------------------------------------------------------------------------------------------------------
# settings: preset defaults, then every check before any step runs


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill preset defaults (an explicit value, 0 included, always wins) and derive the output stem."""
    # which plan-specific flags were given (their parser default is None), before defaults hide it
    args.given = [dest for dest in SCOPED_FLAGS if getattr(args, dest) is not None]
    preset = PRESETS[args.preset]
    for key in ("onnx_path", "weights", "data_root", "calib_list"):
        if getattr(args, key) is None:
            setattr(args, key, getattr(preset, key))
    if args.max_images is None:
        args.max_images = preset.max_images
    for key in ("confirm_images", "confirm_skip"):
        if getattr(args, key) is None:
            setattr(args, key, getattr(preset, key))
    if args.run_id is None:
        args.run_id = preset.run_id
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
    if args.revert_probes is None:
        args.revert_probes = DEFAULT_REVERT_PROBES["cuda" if cuda else "cpu"]
    defaults = {
        "sensitivity": "single",
        "random_seeds": 3,
        "random_band": False,
        "candidate_build": "full",
        "confidence": DEFAULT_CONFIDENCE,
    }
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
    """Numbers and names, with the workflow's flags, before anything is read or run."""
    budget = "must be a finite number of AP points > 0 (the search's target and the report's budget)"
    checks = [
        (args.max_images >= 1, "--max-images", f"must be >= 1, got {args.max_images}"),
        (args.imgsz >= 32 and args.imgsz % 32 == 0, "--imgsz", f"must be a positive multiple of 32, got {args.imgsz}"),
        (args.search or min(args.ks) >= 0, "--ks", f"values must be >= 0, got {args.ks}"),
        (args.random_seeds >= 0, "--random-seeds", f"must be >= 0, got {args.random_seeds}"),
        (args.jobs >= 1, "--jobs", f"must be >= 1, got {args.jobs}"),
        (args.max_probes >= 1, "--max-probes", f"must be >= 1, got {args.max_probes}"),
        (args.revert_probes >= 0, "--revert-probes", f"must be >= 0, got {args.revert_probes}"),
        (args.parallel_probes >= 1, "--parallel-probes", f"must be >= 1, got {args.parallel_probes}"),
        (args.sensitivity_images >= 1, "--sensitivity-images", f"must be >= 1, got {args.sensitivity_images}"),
        (math.isfinite(args.budget_ap) and args.budget_ap > 0, "--budget-ap", f"{budget}, got {args.budget_ap}"),
        (0.5 <= args.confidence < 1, "--confidence", f"must be in [0.5, 1), got {args.confidence}"),
        (args.confirm_images >= 0, "--confirm-images", f"must be >= 0 (0: no confirmation), got {args.confirm_images}"),
        (
            args.confirm_images == 0 or args.confirm_skip >= args.max_images,
            "--confirm-skip",
            f"must be >= --max-images {args.max_images} (the confirmation slice follows it), got {args.confirm_skip}",
        ),
        (
            args.random_control is None or args.random_control >= 0,
            "--random-control",
            f"seed must be >= 0, got {args.random_control}",
        ),
        (
            len(set(args.candidate_modes)) == len(args.candidate_modes),
            "--candidate-modes",
            f"lists a mode more than once: {' '.join(args.candidate_modes)}",
        ),
        (
            args.run_id not in ("", ".", "..") and "/" not in args.run_id,
            "--run-id",
            f"must be a plain folder name, got {args.run_id!r}",
        ),
    ]
    for ok, flag, message in checks:
        if not ok:
            raise UserError(f"{flag} {message}", flag=flag)
    unused = unused_flag(args)
    if unused:
        raise UserError(f"{unused[0]} {unused[1]}", flag=unused[0])
    from lowbit.ort_providers import check_providers

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
    ann, images = dataset_files(args.data_root)
    if not is_generated_demo_data(args):
        if not ann.is_file():
            raise UserError(
                f"--data-root: {ann} not found (see datasets/README.md for placing COCO 2017 val)", flag="--data-root"
            )
        if not images.is_dir():
            raise UserError(
                f"--data-root: {args.data_root} has no val2017/ image folder (see datasets/README.md)",
                flag="--data-root",
            )
    if args.calib_list.exists() and not args.calib_list.is_file():
        raise UserError(f"--calib-list: {args.calib_list} is not a file", flag="--calib-list")
    if args.sensitivity == "torch" and args.candidate_modes and not args.weights.is_file():
        raise UserError(f"--weights: {args.weights} not found (needed by --sensitivity torch)", flag="--weights")
    if confirms(args) and ann.is_file():
        check_confirmation_slice(args, ann)


def confirms(args: argparse.Namespace) -> bool:
    """The plan confirms each search's pick on a confirmation slice."""
    return args.search and bool(args.candidate_modes) and args.confirm_images > 0


def check_confirmation_slice(args: argparse.Namespace, ann: Path) -> None:
    """The annotation file has images after ``--confirm-skip``, and none of them is a calibration image."""
    import json

    from lowbit.coco_eval import image_slice

    images = json.loads(ann.read_text(encoding="utf-8")).get("images") or []
    by_id = {int(image["id"]): image.get("file_name", "") for image in images}
    confirm = image_slice(by_id, args.confirm_images, args.confirm_skip)
    if not confirm:
        fix = (
            f"delete {args.data_root} and run again: the demo generator then writes {args.confirm_skip + 500} images"
            if is_generated_demo_data(args)
            else "lower --confirm-skip, or pass --confirm-images 0 to search without a confirmation"
        )
        raise UserError(
            f"--confirm-skip: {ann} has {len(by_id)} images, none left after the first {args.confirm_skip} for the "
            f"confirmation slice; {fix}",
            flag="--confirm-skip",
        )
    if args.calib_list.is_file():
        from lowbit.calib import parse_image_list

        calib_names = {Path(entry.text).name for entry in parse_image_list(args.calib_list, "--calib-list")}
        shared = sorted(name for name in (Path(by_id[i]).name for i in confirm) if name in calib_names)
        if shared:
            raise UserError(
                f"--confirm-skip: {len(shared)} images of the confirmation slice are calibration images of "
                f"--calib-list {args.calib_list} (first: {shared[0]}); raise --confirm-skip past them",
                flag="--confirm-skip",
            )


def check_model_input(onnx_path: Path, imgsz: int) -> None:
    """The model is an ONNX graph with one image input [1,3,H,W] whose static H and W, if any, equal ``--imgsz``."""
    from lowbit.model_input import check_graph_image_input
    from lowbit.onnx_stats import load_model_proto

    check_graph_image_input(load_model_proto(onnx_path, "--onnx-path"), imgsz, onnx_path, "--onnx-path")


def is_generated_demo_data(args: argparse.Namespace) -> bool:
    """The demo preset's dataset is generated by the dataset step when missing."""
    return args.preset == "demo" and args.data_root == PRESETS["demo"].data_root


def calib_list_images(args: argparse.Namespace, made: list[Path]) -> list[Path]:
    """What the calib step reads besides its list: the images the list names (each existing, or to be written into
    ``made`` by an earlier step), or the images folder when the calib-list step is to write the list.

    Raises:
        UserError(--calib-list): the list names no image, or an image that neither exists nor is made by a step.
    """
    if not args.calib_list.is_file():
        return [dataset_files(args.data_root)[1]]
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


def k_choice(args: argparse.Namespace) -> str:
    """How K is chosen per mode, in one line for the log."""
    if not args.search:
        return f"fixed, --ks {' '.join(map(str, args.ks))}"
    return (
        f"budget search, {args.sensitivity} ranking, budget {args.budget_ap:g} AP, candidates built "
        f"'{args.candidate_build}', <= {args.max_probes} probes, {args.parallel_probes} at once, "
        f"{args.random_seeds} random seeds"
    )
