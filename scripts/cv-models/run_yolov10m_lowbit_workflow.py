"""The whole low-bit workflow in one resumable command, ending in a comparison report.

Runs the model card's steps, by calling the card's own scripts, into one run directory
``tmp/yolov10m_lowbit/<run-id>/`` with the card's sub-layout:

    dataset       (demo preset only) generate the demo val split if it is missing
    smoke         run_random_onnx_inference.py          -> baseline-onnx/<timestamp>/smoke.json
    baseline      eval_yolov10m_onnx_coco.py (FP32)     -> baseline-coco/metrics.json
    calib-list    make_calib_list.py (only when the list is missing; never for the demo's committed list)
    calib         make_yolov10m_calib_npy.py            -> calib/calib_yolov10m_<imgsz>.npy
    int8          quantize_yolov10m_int8_onnx.sh        -> onnx/yolov10m-int8-qdq.onnx
    int8-eval     eval_yolov10m_onnx_coco.py            -> int8-coco/metrics.json
    sensitivity-<mode>  onnx_layer_sensitivity.py (or the torch sweep) -> sensitivity-<mode>/.../layer-sensitivity-report.json
    schemes-<mode>      make_yolov10m_candidate_schemes.py -> schemes/ (fp8) or schemes-<mode>/
    candidates-<mode>   materialize_yolov10m_lowbit_candidates.sh (EVAL=1) -> onnx/yolov10m-<mode>-k{K}.onnx, <mode>-k{K}-coco/
    report        make_lowbit_report.py                 -> report.md, report.json, pareto.png

Resumable: a step whose recorded inputs (arguments, environment, sha256 of its input files) are
unchanged and whose outputs still exist with the recorded sha256 is skipped and says so. A step's
record is removed before it runs and written only after it succeeded, so an interrupted or failed
step is never trusted; ``--force STEP`` reruns one step (its dependants rerun because their inputs
change). One line per step with its elapsed time; the final summary is the report's.

Examples::

    python scripts/cv-models/run_yolov10m_lowbit_workflow.py                      # demo detector, offline
    python scripts/cv-models/run_yolov10m_lowbit_workflow.py --preset yolov10m \\
        --providers TensorrtExecutionProvider CUDAExecutionProvider --calibration-eps cuda:0 cpu
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from lowbit.logs import setup_logging
from lowbit.runs import (
    REPO_ROOT,
    UserError,
    atomic_write_json,
    sha256_file,
)
from lowbit.cli import cli_entry

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
STEP_NAMES = ("dataset", "smoke", "baseline", "calib-list", "calib", "int8", "int8-eval", "sensitivity", "schemes", "candidates", "report")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Defaults marked (preset) come from --preset; every flag overrides its preset value.",
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo", help="input paths (default: demo)")
    parser.add_argument("--onnx-path", type=Path, help="FP32 raw-head ONNX (preset)")
    parser.add_argument("--weights", type=Path, help="ultralytics .pt for the torch sweep (preset)")
    parser.add_argument("--data-root", type=Path, help="COCO-layout dataset: val2017/ + annotations/ (preset)")
    parser.add_argument("--calib-list", type=Path, help="calibration image list (preset; made from --data-root if missing)")
    parser.add_argument("--max-images", type=int, help="evaluation slice: first N image ids (preset: demo 500, yolov10m 100)")
    parser.add_argument("--output-root", type=Path, default=Path("tmp/yolov10m_lowbit"), help="parent of run dirs (default: %(default)s)")
    parser.add_argument("--run-id", help="run directory name; an existing one is resumed (preset: demo | yolov10m)")
    parser.add_argument("--imgsz", type=int, default=640, help="square input side (default: %(default)s)")
    parser.add_argument("--providers", nargs="+", default=["CPUExecutionProvider"], help="ORT providers for smoke and evals")
    parser.add_argument("--calibration-eps", nargs="+", default=["cpu"], help="ModelOpt calibration EPs (default: cpu)")
    parser.add_argument("--calibration-method", choices=("entropy", "max"), default="entropy", help="INT8 step (default: entropy)")
    parser.add_argument("--high-precision-dtype", choices=("fp32", "fp16", "bf16"), default="fp32",
                        help="non-quantized tensors of every Q/DQ model (default: fp32; fp16 collapses YOLOv10 INT8, see the card)")
    parser.add_argument("--candidate-modes", nargs="*", choices=("fp8", "int8"), default=["fp8", "int8"],
                        help="low-bit candidate families K in --ks (default: fp8 int8; INT8 K=0 is the int8 step; "
                        "nothing to skip step 4)")
    parser.add_argument("--ks", type=int, nargs="+", default=[0, 5, 10, 20], help="top-K exclusions (default: 0 5 10 20)")
    parser.add_argument("--sensitivity", choices=("onnx", "torch"), default="onnx",
                        help="ranking source: ONNX-native on the deployed graph (default) or the torch sweep on --weights")
    parser.add_argument("--sensitivity-images", type=int, default=16, help="images scored by the sensitivity step (default: 16)")
    parser.add_argument("--random-control", type=int, default=None, metavar="SEED",
                        help="also build random K-node exclusions with this seed, to check the ranking beats chance")
    parser.add_argument("--budget-ap", type=float, default=1.0, help="accuracy budget for the recommendation, AP points (default: 1.0)")
    parser.add_argument("--force", nargs="+", choices=STEP_NAMES, default=[], help="rerun these steps even if complete")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and what would be skipped, run nothing")
    return parser


@dataclass
class Step:
    """One card command: what it runs, what it reads, what it must leave behind."""

    name: str
    argv: list[str]
    outputs: list[Path]
    inputs: list[Path] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    family: str = ""  # the --force name for sensitivity-int8 etc.
    reuse_existing: bool = False  # complete whenever its outputs exist (generated data, not run results)

    def fingerprint(self) -> dict:
        return {
            "argv": self.argv,
            "env": self.env,
            "inputs": {str(p): sha256_file(p) for p in self.inputs},
        }


def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    preset = PRESETS[args.preset]
    for key in ("onnx_path", "weights", "data_root", "calib_list"):
        if getattr(args, key) is None:
            setattr(args, key, Path(preset[key]))
    args.max_images = args.max_images or preset["max_images"]
    args.run_id = args.run_id or preset["run_id"]
    if args.max_images < 1:
        raise UserError("--max-images must be >= 1")
    if any(k < 0 for k in args.ks):
        raise UserError("--ks must be >= 0")
    return args


def _validate_inputs(args: argparse.Namespace) -> None:
    """Fail before any step runs when a user-provided input is missing (the demo's data is generated)."""
    onnx_path = args.onnx_path
    if onnx_path.is_symlink() and not onnx_path.exists():
        raise UserError(f"--onnx-path: {onnx_path} is a symlink to {os.readlink(onnx_path)}, which does not exist")
    if not onnx_path.is_file():
        raise UserError(f"--onnx-path: {onnx_path} does not exist (see models/cv-models/yolov10m/README.md)")
    ann = args.data_root / "annotations" / "instances_val2017.json"
    if args.preset != "demo" and not ann.is_file():
        raise UserError(f"--data-root: {ann} not found (see datasets/README.md for placing COCO 2017 val)")
    if args.sensitivity == "torch" and args.candidate_modes and not args.weights.is_file():
        raise UserError(f"--weights: {args.weights} not found (needed by --sensitivity torch)")


def plan(args: argparse.Namespace, run: Path) -> list[Step]:
    py = sys.executable
    ann = args.data_root / "annotations" / "instances_val2017.json"
    calib = run / "calib" / f"calib_yolov10m_{args.imgsz}.npy"
    int8_model = run / "onnx" / "yolov10m-int8-qdq.onnx"
    eval_common = ["--data-root", str(args.data_root), "--max-images", str(args.max_images),
                   "--providers", *args.providers, "--imgsz", str(args.imgsz), "--overwrite"]
    steps: list[Step] = []
    if args.preset == "demo" and args.data_root == Path(PRESETS["demo"]["data_root"]):
        steps.append(Step("dataset", [py, str(SCRIPTS / "make_demo_dataset.py"), "--out-root", str(args.data_root), "--splits", "val"],
                          outputs=[ann], reuse_existing=True))
    steps += [
        Step("smoke", [py, str(SMOKE), "--model", str(args.onnx_path), "--output-root", str(run / "baseline-onnx"),
                       "--providers", *args.providers],
             outputs=[run / "baseline-onnx"], inputs=[args.onnx_path]),
        Step("baseline", [py, str(SCRIPTS / "eval_yolov10m_onnx_coco.py"), "--onnx-path", str(args.onnx_path), *eval_common,
                          "--out", str(run / "baseline-coco" / "metrics.json")],
             outputs=[run / "baseline-coco" / "metrics.json"], inputs=[args.onnx_path, ann]),
    ]
    if not args.calib_list.is_file():
        steps.append(Step("calib-list", [py, str(SCRIPTS / "make_calib_list.py"), "--data-root", str(args.data_root),
                                         "--eval-max-images", str(args.max_images), "--num", "100", "--out", str(args.calib_list)],
                          outputs=[args.calib_list], inputs=[ann]))
    steps += [
        Step("calib", [py, str(SCRIPTS / "make_yolov10m_calib_npy.py"), "--list", str(args.calib_list), "--out", str(calib),
                       "--imgsz", str(args.imgsz), "--overwrite"],
             outputs=[calib], inputs=[args.calib_list]),
        Step("int8", ["bash", str(SCRIPTS / "quantize_yolov10m_int8_onnx.sh")], outputs=[int8_model], inputs=[args.onnx_path, calib],
             env={"RUN_ROOT": str(run), "CALIB_PATH": str(calib), "ONNX_PATH": str(args.onnx_path),
                  "CALIBRATION_METHOD": args.calibration_method, "CALIBRATION_EPS": " ".join(args.calibration_eps),
                  "HIGH_PRECISION_DTYPE": args.high_precision_dtype, "USE_ZERO_POINT": "False", "OVERWRITE": "1"}),
        Step("int8-eval", [py, str(SCRIPTS / "eval_yolov10m_onnx_coco.py"), "--onnx-path", str(int8_model), *eval_common,
                           "--out", str(run / "int8-coco" / "metrics.json")],
             outputs=[run / "int8-coco" / "metrics.json"], inputs=[int8_model, ann]),
    ]
    for mode in args.candidate_modes:
        # INT8 with no exclusions is the card's step 3 (the int8 step): do not quantize it twice
        mode_ks = [k for k in args.ks if k != 0] if mode == "int8" else list(args.ks)
        if not mode_ks:
            continue
        schemes = run / ("schemes" if mode == "fp8" else f"schemes-{mode}")
        if args.sensitivity == "onnx":
            report = run / f"sensitivity-onnx-{mode}" / "outputs" / "yolov10m" / f"onnx-{mode}" / "per_layer" / "layer-sensitivity-report.json"
            sens = Step(f"sensitivity-{mode}", [py, str(SCRIPTS / "onnx_layer_sensitivity.py"), "--onnx-path", str(args.onnx_path),
                                                "--calib-path", str(calib), "--num-images", str(args.sensitivity_images),
                                                "--precision", mode, "--calibration-eps", *args.calibration_eps,
                                                "--out-dir", str(report.parent), "--overwrite"],
                        outputs=[report], inputs=[args.onnx_path, calib], family="sensitivity")
        else:
            fmt = f"{mode}-{mode}"
            report = run / f"sensitivity-torch-{mode}" / "outputs" / "yolov10m" / fmt / "per_layer" / "layer-sensitivity-report.json"
            sens = Step(f"sensitivity-{mode}", ["bash", str(SCRIPTS / "run_yolov10m_layer_sensitivity_sweep.sh")],
                        outputs=[report], inputs=[args.weights, calib], family="sensitivity",
                        env={"WEIGHTS": str(args.weights), "CALIB_NPY": str(calib), "NUM_IMAGES": str(args.sensitivity_images),
                             "FORMATS": fmt, "OUTPUT_ROOT": str(run), "RUN_ID": f"sensitivity-torch-{mode}", "OVERWRITE": "1"})
        scheme_argv = [py, str(SCRIPTS / "make_yolov10m_candidate_schemes.py"), "--report-json", str(report),
                       "--out-dir", str(schemes), "--onnx-path", str(args.onnx_path), "--k", *map(str, args.ks), "--overwrite"]
        if args.random_control is not None:
            scheme_argv += ["--random-control", str(args.random_control)]
        materialize_env = {
            "RUN_ROOT": str(run), "CALIB_PATH": str(calib), "SCHEMES_DIR": str(schemes), "ONNX_PATH": str(args.onnx_path),
            "KS": " ".join(map(str, mode_ks)), "QUANT_MODE": mode, "HIGH_PRECISION_DTYPE": args.high_precision_dtype,
            "EVAL": "1", "DATA_ROOT": str(args.data_root), "MAX_IMAGES": str(args.max_images),
            "PROVIDERS": " ".join(args.providers), "IMGSZ": str(args.imgsz), "OVERWRITE": "1",
            "INCLUDE_RANDOM": "1" if args.random_control is not None else "0",
        }
        steps += [
            sens,
            Step(f"schemes-{mode}", scheme_argv, outputs=[schemes / f"scheme_k{k}.json" for k in mode_ks],
                 inputs=[report, args.onnx_path], family="schemes"),
            Step(f"candidates-{mode}", ["bash", str(SCRIPTS / "materialize_yolov10m_lowbit_candidates.sh")],
                 outputs=[run / f"candidates-{mode}" / "summary.json"],
                 inputs=[args.onnx_path, calib, ann, *(schemes / f"scheme_k{k}.json" for k in mode_ks)],
                 env=materialize_env, family="candidates"),
        ]
    evaluated = [s.outputs[0] for s in steps if s.name in ("baseline", "int8-eval") or s.family == "candidates"]
    steps.append(Step("report", [py, str(SCRIPTS / "make_lowbit_report.py"), "--run-dir", str(run), "--out-dir", str(run),
                                 "--budget-ap", str(args.budget_ap), "--overwrite"],
                      outputs=[run / "report.md", run / "report.json", run / "pareto.png"], inputs=evaluated))
    return steps


def _record_path(run: Path, step: Step) -> Path:
    return run / ".steps" / f"{step.name}.json"


def _output_digests(step: Step) -> dict[str, str] | None:
    """sha256 of every output file (a directory output counts as present when it is non-empty)."""
    digests = {}
    for out in step.outputs:
        if out.is_dir():
            if not any(out.iterdir()):
                return None
            digests[str(out)] = "dir"
        elif out.is_file():
            digests[str(out)] = sha256_file(out)
        else:
            return None
    return digests


def is_complete(run: Path, step: Step) -> bool:
    """Recorded with the same inputs, and every output still there and unchanged."""
    if step.reuse_existing:
        return all(p.exists() for p in step.outputs)
    try:
        record = json.loads(_record_path(run, step).read_text())
    except (OSError, ValueError):
        return False
    if any(not p.is_file() for p in step.inputs):
        return False
    return record.get("fingerprint") == step.fingerprint() and record.get("outputs") == _output_digests(step)


def run_step(run: Path, step: Step, log_dir: Path) -> float:
    """Run one step's command; its record is written only after it succeeded with all outputs."""
    record = _record_path(run, step)
    record.unlink(missing_ok=True)
    env = {**os.environ, **step.env, "PYTHON": sys.executable, "PYTHONUNBUFFERED": "1"}
    log_file = log_dir / f"{step.name}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log_file, "w", encoding="utf-8") as log:
        log.write(f"$ {' '.join(f'{k}={v}' for k, v in step.env.items())} {' '.join(step.argv)}\n")
        log.flush()
        # stderr carries the scripts' logs and progress bars: keep it on the console (each script also
        # writes its own log file in the run dir); stdout, the scripts' summaries, goes to the step log.
        proc = subprocess.run(step.argv, cwd=REPO_ROOT, env=env, stdout=log)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise StepFailed(step.name, proc.returncode, log_file)
    digests = _output_digests(step)
    if digests is None:
        raise StepFailed(step.name, 0, log_file, "finished without writing " + ", ".join(map(str, step.outputs)))
    atomic_write_json(record, {"step": step.name, "fingerprint": step.fingerprint(), "outputs": digests,
                               "wall_s": round(elapsed, 2), "log": str(log_file)})
    return elapsed


class StepFailed(Exception):
    def __init__(self, name: str, code: int, log_file: Path, reason: str | None = None):
        super().__init__(f"step {name} failed ({reason or f'exit status {code}'}); its log: {log_file}")
        self.code = code


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = _resolve(build_parser().parse_args(argv))
    _validate_inputs(args)
    run = args.output_root / args.run_id
    run.mkdir(parents=True, exist_ok=True)
    logger = setup_logging(run / "workflow.log")
    steps = plan(args, run)
    atomic_write_json(run / "workflow.json", {"argv": sys.argv if argv is None else argv, "preset": args.preset,
                                              "steps": [s.name for s in steps], "args": vars(args)})
    logger.info("run dir %s: %d steps (%s)", run, len(steps), " ".join(s.name for s in steps))
    t_start = time.perf_counter()
    forced = set(args.force)
    for i, step in enumerate(steps, 1):
        tag = f"[{i}/{len(steps)}] {step.name:<18}"
        if (step.name in forced or step.family in forced) or not is_complete(run, step):
            if args.dry_run:
                logger.info("%s would run: %s", tag, " ".join(step.argv))
                continue
            logger.info("%s running", tag)
            try:
                elapsed = run_step(run, step, run / "logs")
            except StepFailed as exc:
                logger.error("%s FAILED: %s", tag, exc)
                return 1
            logger.info("%s done in %.1f s", tag, elapsed)
        else:
            logger.info("%s skipped: complete, inputs unchanged", tag)
    if args.dry_run:
        return 0
    logger.info("workflow finished in %.1f s: %s", time.perf_counter() - t_start, run / "report.md")
    report = run / "report.md"
    print(report.read_text() if report.is_file() else f"(no report at {report})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
