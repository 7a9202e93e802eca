"""Find, for one mode, the fewest float nodes along a ranking whose evaluated candidate is within the AP budget.

Probes K (the top-K ranked nodes in float) by bisection (``lowbit.budget_search``); each probe is the
mode's full Q/DQ model with those nodes' Q/DQ pairs removed (``--build full``, no recalibration) or a
ModelOpt re-quantization with ``nodes_to_exclude`` (``--build requantize``), evaluated on the
evaluation slice. Evaluated candidates are cached beside the run (``lowbit.candidates``): a rerun
reuses them. Then ``--random-seeds`` random controls at the K found. With ``--parallel-probes N``
each round of the search probes N Ks and the random controls run N at a time, every evaluation in
a worker process (worth it with the CUDA EP; on the CPU EP one evaluation already uses every core).
A probe is within the budget when its loss plus ``z(--confidence)`` paired standard errors is. With
``--confirm-baseline-metrics`` the pick is then evaluated on images the search never saw and, when it misses the
budget there, the search moves up by a fixed rule (``lowbit.search_confirm``). With ``--revert-probes N`` a revert
pass then tries the pick's float nodes back in low precision, one at a time (``lowbit.search_revert``).

Before anything is written, the inputs are checked to belong together (``lowbit.search_checks.check_inputs``):
``--full-model`` is a Q/DQ model of ``--mode`` quantized from ``--onnx-path``, ``--ranking`` ranks that model in
that mode, ``--baseline-metrics`` / ``--k0-metrics`` scored ``--onnx-path`` / ``--full-model`` on the images that
``--data-root`` and ``--max-images`` select (by sha256); a mismatch is one ``error:`` line naming the flag, exit 2.
Writes
``<run-root>/search-<mode>/search.json`` (keys in ``lowbit/search_run.py``) and ``search.md``.

Example::

    python scripts/cv-models/search_yolov10m_lowbit_budget.py --mode int8 --run-root tmp/yolov10m_lowbit/demo \\
        --ranking tmp/yolov10m_lowbit/demo/sensitivity-loo-int8/layer-sensitivity-report.json \\
        --onnx-path models/cv-models/yolov10n-demo-shapes/yolov10n-demo-shapes.onnx \\
        --full-model tmp/yolov10m_lowbit/demo/onnx/yolov10n-demo-shapes-int8-qdq.onnx \\
        --baseline-metrics tmp/yolov10m_lowbit/demo/baseline-coco/metrics.json \\
        --data-root datasets/demo-shapes --max-images 500 --budget-ap 0.5
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lowbit import search_run
from lowbit.budget_search import default_max_probes
from lowbit.candidates import EvalConfig
from lowbit.candidates_build import BUILDS, RequantizeConfig
from lowbit.cli import cli_entry, make_parser
from lowbit.errors import UserError
from lowbit.evaluate_prepare import auto_sessions, check_sessions
from lowbit.ort_providers import MODELOPT_CALIBRATION_EPS
from lowbit.ort_session import CUDNN_CONV_ALGO_SEARCH
from lowbit.runs import check_input_file
from lowbit.search_checks import check_config
from lowbit.search_confirm import ConfirmConfig


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(__doc__)
    p.add_argument("--mode", choices=("int8", "fp8"), required=True, help="low-bit mode searched")
    p.add_argument("--run-root", type=Path, required=True, help="run directory: candidates and search-<mode>/ go here")
    p.add_argument("--ranking", type=Path, required=True, help="layer-sensitivity-report.json giving the node order")
    p.add_argument("--onnx-path", type=Path, required=True, help="FP32 ONNX model; its stem names the candidates")
    p.add_argument(
        "--full-model", type=Path, required=True, help="the mode's calibrated Q/DQ model, every node quantized"
    )
    p.add_argument("--baseline-metrics", type=Path, required=True, help="FP32 metrics.json (the budget's reference)")
    p.add_argument("--k0-metrics", type=Path, default=None, help="metrics.json of --full-model already evaluated (K=0)")
    p.add_argument("--budget-ap", type=float, default=search_run.DEFAULT_BUDGET_AP, help="AP points allowed to lose")
    p.add_argument(
        "--random-seeds", type=int, default=search_run.DEFAULT_RANDOM_SEEDS, help="random controls at the K found"
    )
    p.add_argument(
        "--random-band",
        action="store_true",
        help="random controls at every probed K too (the band of the ΔAP-vs-K plot; seeds x probes evaluations)",
    )
    p.add_argument(
        "--parallel-probes",
        type=int,
        default=1,
        help="candidates evaluated at once, each in a worker process (a round of the search, the random "
        "controls); more than 1 pays off on a GPU",
    )
    p.add_argument(
        "--max-probes",
        type=int,
        default=None,
        help=f"most candidates evaluated by the search (default {default_max_probes()} x --parallel-probes)",
    )
    p.add_argument("--seed-ks", type=int, nargs="*", default=[], help="Ks probed right after K=0 (e.g. 5 10 20)")
    p.add_argument(
        "--build",
        choices=BUILDS,
        default="full",
        help="full: remove Q/DQ pairs from --full-model; requantize: ModelOpt nodes_to_exclude",
    )
    p.add_argument("--calib-path", type=Path, default=None, help="calibration .npy (needed by --build requantize)")
    p.add_argument("--calibration-method", choices=("entropy", "max"), default=None, help="for --build requantize")
    p.add_argument("--calibration-eps", nargs="+", choices=MODELOPT_CALIBRATION_EPS, default=["cpu"])
    p.add_argument("--high-precision-dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    p.add_argument("--data-root", type=Path, required=True, help="COCO-layout dataset of the evaluation slice")
    p.add_argument("--max-images", type=int, default=100, help="evaluation slice: first N image ids")
    p.add_argument("--providers", nargs="+", default=["CPUExecutionProvider"], help="ORT providers of the evaluations")
    p.add_argument(
        "--confidence",
        type=float,
        default=search_run.DEFAULT_CONFIDENCE,
        help="how sure 'within budget' must be: a K counts when its loss + z(confidence) x its paired standard "
        "error (bootstrap over images) is within --budget-ap; 0.5 = the point estimate",
    )
    p.add_argument(
        "--confirm-baseline-metrics",
        type=Path,
        default=None,
        help="FP32 metrics.json on the confirmation slice: with it, the pick is confirmed on images the search "
        "never saw (--confirm-skip, --confirm-images)",
    )
    p.add_argument("--confirm-images", type=int, default=500, help="images in the confirmation slice")
    p.add_argument(
        "--confirm-skip",
        type=int,
        default=600,
        help="image ids (ascending) before the confirmation slice: the search slice and the calibration images",
    )
    p.add_argument("--max-confirm", type=int, default=3, help="confirmations tried before the search gives up")
    p.add_argument(
        "--revert-probes",
        type=int,
        default=0,
        help="after the pick, try up to N of its float nodes back in low precision, least sensitive first, each kept "
        "quantized when the budget still holds; the final set is evaluated on the confirmation slice too "
        "(lowbit.search_revert; one evaluation per try; 0: no revert pass)",
    )
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--warmup-runs", type=int, default=10)
    p.add_argument("--skip-latency", type=int, default=10)
    p.add_argument(
        "--cudnn-conv-algo-search",
        choices=CUDNN_CONV_ALGO_SEARCH,
        default="HEURISTIC",
        help="CUDA EP convolution search of the evaluations (HEURISTIC: no seconds of benchmarking each)",
    )
    p.add_argument(
        "--sessions",
        type=int,
        default=None,
        help="ORT sessions per evaluation, side by side (CPU EP alone; same detections, see eval_yolov10m_onnx_coco.py "
        "--sessions); default 2 on the CPU EP alone with >= 2 cores and --parallel-probes 1, else 1",
    )
    return p


def config(args: argparse.Namespace) -> search_run.SearchConfig:
    """Checked settings (files exist, numbers in range) as a :class:`lowbit.search_run.SearchConfig`."""
    if args.max_images < 1:
        raise UserError(f"--max-images must be >= 1, got {args.max_images}", flag="--max-images")
    max_probes = default_max_probes(args.parallel_probes) if args.max_probes is None else args.max_probes
    paths = {
        flag: check_input_file(getattr(args, flag[2:].replace("-", "_")), flag)
        for flag in ("--ranking", "--onnx-path", "--full-model", "--baseline-metrics")
    }
    k0 = check_input_file(args.k0_metrics, "--k0-metrics") if args.k0_metrics else None
    confirm = None
    if args.confirm_baseline_metrics is not None:
        if args.confirm_skip < 0:
            raise UserError(f"--confirm-skip must be >= 0, got {args.confirm_skip}", flag="--confirm-skip")
        baseline = check_input_file(args.confirm_baseline_metrics, "--confirm-baseline-metrics")
        confirm = ConfirmConfig(baseline, args.confirm_images, args.confirm_skip, args.max_confirm)
    requantize = None
    if args.build == "requantize":
        if args.calib_path is None:
            raise UserError("--build requantize needs --calib-path", flag="--calib-path")
        calib = check_input_file(args.calib_path, "--calib-path")
        eps, dtype = list(args.calibration_eps), args.high_precision_dtype
        requantize = RequantizeConfig(paths["--onnx-path"], calib, args.calibration_method, eps, dtype)
    check_sessions(args.sessions, args.providers)
    sessions = args.sessions
    if sessions is None:
        sessions = auto_sessions(args.providers) if args.parallel_probes == 1 else 1
    evaluation = EvalConfig.from_args(args, cudnn_conv_algo_search=args.cudnn_conv_algo_search, sessions=sessions)
    cfg = search_run.SearchConfig(
        mode=args.mode,
        ranking=paths["--ranking"],
        onnx_path=paths["--onnx-path"],
        full_model=paths["--full-model"],
        baseline_metrics=paths["--baseline-metrics"],
        run_root=args.run_root,
        evaluation=evaluation,
        budget_ap=args.budget_ap,
        random_seeds=args.random_seeds,
        max_probes=max_probes,
        random_band=args.random_band,
        parallel=args.parallel_probes,
        seed_ks=list(args.seed_ks),
        k0_metrics=k0,
        build=args.build,
        requantize=requantize,
        confidence=args.confidence,
        confirm=confirm,
        revert_probes=args.revert_probes,
    )
    check_config(cfg)
    return cfg


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    data = search_run.search_and_write(config(args), vars(args), argv)
    print(search_run.search_markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
