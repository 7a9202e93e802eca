"""Benchmark of the COCO evaluator's own cost: how close it runs to pure ``session.run``.

Example:

    python scripts/cv-models/bench_eval_pipeline.py \
      --onnx-path models/cv-models/yolov10m/checkpoints/yolov10m.onnx \
      --data-root datasets/coco2017/source-data --max-images 50 --imgsz 640 \
      --providers CPUExecutionProvider --workers 2

Reports, in one run, on the same images:

(a) the evaluator's end-to-end loop time (eval_yolov10m_onnx_coco.py's ``throughput.loop_wall_s``:
    decode + preprocess + inference + postprocess, warm-up and COCO scoring excluded) against the
    time of ``session.run`` alone over the same, already preprocessed inputs (measured before and
    after the evaluator, averaged) -> overhead in percent (goal: <= 5 % on CPU for yolov10m);
(b) images/s of the data pipeline alone (decode + letterbox in ``--workers`` threads) against the
    single-thread rate times ``--workers`` (ideal scaling);
(c) the pycocotools scoring time of those detections (no faster evaluator is used).

Writes ``bench.json`` (``--out``) plus the evaluator's own run under ``eval/`` next to it.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from lowbit.logs import get_logger, setup_logging
from lowbit.runs import (
    REPO_ROOT,
    UserError,
    atomic_write_json,
    check_input_file,
    load_script,
    new_run_dir,
    package_versions,
    refuse_overwrite,
    resolve_repo_path,
)
from lowbit.cli import cli_entry

log = get_logger("bench_eval")
EVAL_SCRIPT = Path(__file__).resolve().parent / "eval_yolov10m_onnx_coco.py"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Evaluator overhead vs pure session.run, and data-pipeline scaling.",
        allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--onnx-path", type=Path, required=True, help="ONNX model, input [1,3,H,W]")
    parser.add_argument("--data-root", type=Path, default=Path("datasets/coco2017/source-data"), help="COCO root")
    parser.add_argument("--images-dir", type=Path, default=None, help="image folder; None means DATA_ROOT/val2017")
    parser.add_argument(
        "--ann-file",
        type=Path,
        default=None,
        help="instances json; None means DATA_ROOT/annotations/instances_val2017.json",
    )
    parser.add_argument("--max-images", type=int, default=50, help="first N image ids (ascending)")
    parser.add_argument("--imgsz", type=int, default=640, help="square letterbox side, pixels")
    parser.add_argument("--providers", nargs="+", default=["CPUExecutionProvider"], help="ORT providers, in order")
    parser.add_argument("--disable-cpu-fallback", action="store_true", help="fail if any node would run on CPU")
    parser.add_argument("--workers", type=int, default=4, help="prefetch threads of the evaluator and for (b)")
    parser.add_argument("--warmup-runs", type=int, default=3, help="untimed session.run calls before each timing")
    parser.add_argument(
        "--out", type=Path, default=None, help="bench.json path; None means tmp/bench_eval_pipeline/<time>/bench.json"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing bench.json")
    return parser


def _pure_session_run(session, input_name: str, output_name: str, tensors: list[np.ndarray], warmup: int) -> float:
    for _ in range(warmup):
        session.run([output_name], {input_name: tensors[0]})
    t0 = time.perf_counter()
    for x in tensors:
        session.run([output_name], {input_name: x})
    return time.perf_counter() - t0


def _pipeline_rate(items, imgsz: int, workers: int) -> float:
    from lowbit.preprocess import iter_prepared

    t0 = time.perf_counter()
    n = sum(1 for _ in iter_prepared(items, imgsz, workers))
    return n / (time.perf_counter() - t0)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    eval_script = load_script(EVAL_SCRIPT)
    from lowbit import coco_eval, ort_session
    from lowbit.preprocess import prepare_image

    if args.max_images < 1:
        raise UserError(f"--max-images must be >= 1, got {args.max_images}")
    if args.workers < 1:
        raise UserError(f"--workers must be >= 1 for the scaling comparison, got {args.workers}")
    onnx_path = check_input_file(resolve_repo_path(args.onnx_path), "--onnx-path")
    images_dir, ann_file = eval_script.resolve_data_paths(args)
    if args.out is None:
        out = new_run_dir(REPO_ROOT / "tmp" / "bench_eval_pipeline") / "bench.json"
    else:
        out = args.out if args.out.is_absolute() else Path.cwd() / args.out
        refuse_overwrite(out, args.overwrite)

    coco = coco_eval.load_coco(ann_file, "--ann-file" if args.ann_file else "--data-root")
    ids = coco_eval.select_image_ids(coco, args.max_images)
    items = [(i, images_dir / coco.imgs[i]["file_name"]) for i in ids]
    missing = [str(p) for _, p in items if not p.is_file()]
    if missing:
        raise UserError(f"{len(missing)} selected images are missing (first: {missing[0]})")

    # (b) data pipeline alone; files read once first so both rates see a warm page cache
    for _, path in items:
        path.read_bytes()
    single_rate = _pipeline_rate(items, args.imgsz, 0)
    pool_rate = _pipeline_rate(items, args.imgsz, args.workers)

    # (a) pure session.run on preprocessed inputs, the evaluator, pure session.run again
    tensors = []
    for key, path in items:
        prepared = prepare_image(key, path, args.imgsz)
        if prepared.error is not None:
            raise UserError(str(prepared.error))
        tensors.append(prepared.chw[None])
    session, info = ort_session.build_session(
        onnx_path, args.providers, args.disable_cpu_fallback, cache_dir=out.parent / "ort_cache"
    )
    input_name, _, input_dtype = ort_session.check_image_input(session, args.imgsz, onnx_path)
    if input_dtype == "tensor(float16)":
        tensors = [t.astype(np.float16) for t in tensors]
    output_name = session.get_outputs()[0].name
    pure_before = _pure_session_run(session, input_name, output_name, tensors, args.warmup_runs)

    eval_argv = [
        "--onnx-path", str(onnx_path), "--images-dir", str(images_dir), "--ann-file", str(ann_file),
        "--max-images", str(args.max_images), "--imgsz", str(args.imgsz), "--providers", *args.providers,
        "--warmup-runs", str(args.warmup_runs), "--skip-latency", "0", "--workers", str(args.workers),
        "--out", str(out.parent / "eval" / "metrics.json"), "--overwrite",
    ]  # fmt: skip
    if args.disable_cpu_fallback:
        eval_argv.append("--disable-cpu-fallback")
    result, _ = eval_script.run_eval(eval_script.build_parser().parse_args(eval_argv), eval_argv)
    setup_logging(out.parent / "bench.log")  # the evaluator pointed the logger at its own file

    pure_after = _pure_session_run(session, input_name, output_name, tensors, args.warmup_runs)
    pure_s = (pure_before + pure_after) / 2
    loop_s = result["throughput"]["loop_wall_s"]
    n = len(tensors)
    stages = result["stages_ms"]
    bench = {
        "model": str(onnx_path),
        "images": n,
        "imgsz": args.imgsz,
        "providers_used": info["providers_used"],
        "workers": args.workers,
        "end_to_end_vs_session_run": {
            "eval_loop_s": loop_s,
            "session_run_s": round(pure_s, 4),
            "session_run_s_before": round(pure_before, 4),
            "session_run_s_after": round(pure_after, 4),
            "overhead_pct": round((loop_s - pure_s) / pure_s * 100, 2),
            "eval_images_per_s": result["throughput"]["images_per_s"],
            "session_run_images_per_s": round(n / pure_s, 3),
            "eval_stage_means_ms": {name: values["mean"] for name, values in stages.items()},
        },
        "data_pipeline": {
            "single_thread_images_per_s": round(single_rate, 3),
            "pool_images_per_s": round(pool_rate, 3),
            "ideal_images_per_s": round(single_rate * args.workers, 3),
            "scaling_efficiency": round(pool_rate / (single_rate * args.workers), 3),
        },
        "coco_eval": {"evaluator": "pycocotools", "seconds": result["timing_s"]["coco_eval"]},
        "host_cpus": os.cpu_count(),
        "versions": package_versions(),
    }
    atomic_write_json(out, bench)

    e2e, pipe = bench["end_to_end_vs_session_run"], bench["data_pipeline"]
    print(
        "\n".join(
            [
                f"model            {onnx_path}  ({n} images, imgsz {args.imgsz}, {', '.join(info['providers_used'])})",
                f"(a) eval loop    {loop_s:.3f} s   session.run alone {pure_s:.3f} s "
                f"(before {pure_before:.3f}, after {pure_after:.3f})   overhead {e2e['overhead_pct']:+.2f} %",
                "    stage means  " + "  ".join(f"{k} {v:.2f} ms" for k, v in e2e["eval_stage_means_ms"].items()),
                f"(b) pipeline     {pipe['pool_images_per_s']:.1f} images/s with {args.workers} workers   "
                f"single thread {pipe['single_thread_images_per_s']:.1f} x {args.workers} = "
                f"{pipe['ideal_images_per_s']:.1f}   efficiency {pipe['scaling_efficiency']:.2f}",
                f"(c) pycocotools  {bench['coco_eval']['seconds']:.3f} s",
                f"bench.json       {out}",
            ]
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
