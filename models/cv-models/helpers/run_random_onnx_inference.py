"""Random-tensor smoke test of an ONNX model on ONNX Runtime: does it load, run, and give finite outputs?

Feeds seeded random inputs (floats uniform in [0, 1), the range of a normalized image) to the
model on the requested execution providers, and writes into a new run directory under
--output-root:

* ``smoke.json``: per output name/shape/dtype/min/max/mean/std (over finite elements) and
  NaN/Inf counts; latency in ms (``lowbit.latency.latency_stats`` keys, plus ``runs``: every
  timed run); the providers ONNX Runtime actually assigned with their options; session config; package versions; the model's sha256;
* ``manifest.json`` (status ``ok``, or ``failed`` with the reason) and ``run.log``.

Exit status: 0 ok; 1 when an output holds NaN or Inf (smoke.json is still written, manifest
``failed``); 2 for bad input (missing file, dangling symlink, not ONNX, unavailable provider,
non-static input dims without --input-shape).

Example (the model card's command; add --providers TensorrtExecutionProvider CUDAExecutionProvider
--disable-cpu-fallback to run on the GPU only):
    python models/cv-models/helpers/run_random_onnx_inference.py \
        --model models/cv-models/yolov10m/checkpoints/yolov10m.onnx \
        --output-root tmp/yolov10m_lowbit/baseline-onnx
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from lowbit.cli import cli_entry, make_parser, non_negative_int, positive_int
from lowbit.latency import latency_stats
from lowbit.logs import get_logger, setup_logging
from lowbit.onnx_stats import graph_inputs, load_model_proto, parse_input_shapes, resolve_input_shapes
from lowbit.ort_providers import check_providers
from lowbit.ort_session import CPU, build_session
from lowbit.random_smoke import non_finite_outputs, output_stats, random_inputs
from lowbit.runs import (
    atomic_write_json,
    check_input_file,
    manifest_run,
    new_run_dir,
    package_versions,
    resolve_repo_path,
)

log = get_logger("run_random_onnx_inference")

SCRIPT = "models/cv-models/helpers/run_random_onnx_inference.py"


class NonFiniteOutputs(Exception):
    """A model output holds NaN or Inf values."""


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(__doc__)
    parser.add_argument("--model", type=Path, required=True, help="the .onnx file (a symlink is followed)")
    parser.add_argument(
        "--output-root", type=Path, required=True, help="a new run directory is created under this directory"
    )
    parser.add_argument(
        "--providers",
        nargs="+",
        default=[CPU],
        metavar="PROVIDER",
        help="ONNX Runtime execution providers in priority order, e.g. TensorrtExecutionProvider CUDAExecutionProvider",
    )
    parser.add_argument(
        "--disable-cpu-fallback",
        action="store_true",
        help="fail instead of running any node on the CPU EP (do not list CPUExecutionProvider then)",
    )
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the random inputs")
    parser.add_argument("--runs", type=positive_int, default=10, help="timed inference runs (>= 1)")
    parser.add_argument(
        "--warmup-runs", type=non_negative_int, default=2, help="untimed runs before the timed ones (>= 0)"
    )
    parser.add_argument("--batch", type=positive_int, default=1, help="size used for symbolic batch (first) input dims")
    parser.add_argument(
        "--input-shape",
        nargs="+",
        default=None,
        metavar="NAME=D0,D1,...",
        help="shape for inputs with symbolic non-batch dims, e.g. images=1,3,640,640 "
        "(the name may be left out for a one-input model)",
    )
    parser.add_argument("--verbose", action="store_true", help="debug logging on the console")
    return parser


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(verbose=args.verbose)

    # Every check that needs no session happens before the run directory exists.
    model = check_input_file(resolve_repo_path(args.model), "--model")
    proto = load_model_proto(model, "--model")
    shapes, batch_assumed_for = resolve_input_shapes(
        graph_inputs(proto), parse_input_shapes(args.input_shape), args.batch
    )
    del proto
    check_providers(list(args.providers), args.disable_cpu_fallback, "--providers")

    run_dir = new_run_dir(args.output_root)
    setup_logging(run_dir / "run.log", verbose=args.verbose)
    log.info("run directory %s", run_dir)
    try:
        smoke = _smoke(args, argv, model, shapes, batch_assumed_for, run_dir)
    except NonFiniteOutputs as exc:
        log.debug("%s", exc)  # run.log only: the console gets the one error line below
        print(f"error: {exc} (details in {run_dir / 'smoke.json'})", file=sys.stderr)
        return 1
    latency = smoke["latency_ms"]
    print(
        f"ok: {model} on {', '.join(smoke['providers_used'])}: "
        + "; ".join(f"{o['name']} {o['shape']} range [{_num(o['min'])}, {_num(o['max'])}]" for o in smoke["outputs"])
        + f"; latency p50 {latency['p50']:.2f} ms over {args.runs} runs -> {run_dir}"
    )
    return 0


def _smoke(args, argv, model: Path, shapes, batch_assumed_for, run_dir: Path) -> dict[str, Any]:
    import onnxruntime as ort

    with manifest_run(run_dir / "manifest.json", SCRIPT, vars(args), argv, kind="smoke") as manifest:
        model_sha256 = manifest.add_input(model)
        session, info = build_session(
            model, list(args.providers), args.disable_cpu_fallback, cache_dir=run_dir / "ort_cache"
        )
        log.info("providers used: %s", ", ".join(info["providers_used"]))
        feeds, inputs = random_inputs(session, shapes, args.seed)

        for _ in range(args.warmup_runs):
            session.run(None, feeds)
        latencies_s = []
        outputs = None
        for _ in range(args.runs):
            start = time.perf_counter()
            outputs = session.run(None, feeds)
            latencies_s.append(time.perf_counter() - start)

        stats = [output_stats(spec.name, value) for spec, value in zip(session.get_outputs(), outputs)]
        non_finite, counts = non_finite_outputs(stats)
        smoke = {
            "status": "failed" if non_finite else "ok",
            "model": str(model),
            "model_resolved": os.path.realpath(model),
            "model_sha256": model_sha256,
            "providers_requested": list(args.providers),
            "providers_used": info["providers_used"],
            "provider_options": info["provider_options"],
            "session_config": info["session_config"],
            "session": {k: v for k, v in info.items() if k not in ("provider_options", "session_config")},
            "disable_cpu_fallback": args.disable_cpu_fallback,
            "seed": args.seed,
            "warmup_runs": args.warmup_runs,
            "inputs": inputs,
            "batch_assumed_for": batch_assumed_for,
            "outputs": stats,
            "non_finite_outputs": non_finite,
            "latency_ms": {
                **latency_stats(latencies_s, skip=0, warmup_runs=args.warmup_runs),
                "runs": [round(t * 1000.0, 4) for t in latencies_s],
            },
            "onnxruntime": {"version": ort.__version__, "device": ort.get_device()},
            "versions": package_versions(),
        }
        atomic_write_json(run_dir / "smoke.json", smoke)
        manifest.add_output("smoke", run_dir / "smoke.json")
        manifest.update(providers_used=info["providers_used"], non_finite_outputs=non_finite)
        if non_finite:
            raise NonFiniteOutputs(f"non-finite values in model outputs: {counts}")
    return smoke


if __name__ == "__main__":
    raise SystemExit(main())
