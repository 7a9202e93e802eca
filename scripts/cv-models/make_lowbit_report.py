"""Comparison report of low-bit variants: report.md, report.json and pareto.png from existing evaluations.

Reads every ``metrics.json`` written by ``eval_yolov10m_onnx_coco.py`` under the ``--run-dir`` folders
(the FP32 baseline and each INT8/FP8 variant, e.g. ``baseline-coco/``, ``int8-coco/``,
``fp8-k5-coco/``) and the quantizer manifests beside the evaluated models, then writes into
``--out-dir``:

* ``report.md``: the recommendation and its reason, one table row per variant (mAP50-95, mAP50,
  ΔAP vs FP32, latency p50/p90 and provider, TensorRT GPU time, model size, Q/DQ pairs, excluded
  and quantized nodes, quantization settings), the metrics file of each row, notes;
* ``report.json``: the same, keys documented in ``lowbit/report_json.py``;
* ``pareto.png``: ΔAP vs latency and vs model size, budget line, recommended variant marked;
* ``report.manifest.json`` and ``report.log``.

The recommendation: among quantized variants that lose at most ``--budget-ap`` AP points
(mAP50-95 × 100) against FP32, the fastest TensorRT GPU compute time when TensorRT was measured
(latencies within ``--latency-tie-pct`` % are timing noise: ties go to the more accurate variant);
without TensorRT, the largest share of Conv/MatMul MACs in low precision (``lowbit.mac_share``),
then the more accurate. ONNX Runtime latencies are listed with their provider but never rank
variants. FP32 when none is within budget.

Only records of this run are used (``lowbit/report_inputs.py``): an evaluation scored on other
annotations or images than the FP32 baseline, whose model file changed since, or quantized from
another model, and a ``search.json`` that is not a search of this run, are left out and listed under
"Dropped" in report.md (``dropped`` in report.json) with the reason. An unusable FP32 baseline, no
usable quantized variant, or an annotation file that changed since the run was scored (``--data-root``,
else the run's ``workflow.json``, else the file the baseline names) stop the report with one error.
With budget-search results (``search-<mode>/search.json``) in the run dir, ``search-curves.png``
plots ΔAP against K per mode with the random controls and the budget line.

With ``--tensorrt auto`` and ``trtexec`` installed, one engine per variant is built under
``<out-dir>/tensorrt/`` (FP16 for the float model, strongly typed for Q/DQ models) and timed the way
ModelOpt's examples do (``lowbit/trt.py``); a rerun reuses an engine result whose model and settings
are unchanged (delete ``<out-dir>/tensorrt/`` to re-measure). Without TensorRT every TensorRT cell
reads "not measured: TensorRT not installed".

Example (the workflow's last step; any set of run dirs works)::

    python scripts/cv-models/make_lowbit_report.py --run-dir tmp/yolov10m_lowbit/2026-11-27_10-31-05
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lowbit import trt
from lowbit.cli import cli_entry, make_parser, non_negative_int, positive_float
from lowbit.report import ReportSettings, make_report
from lowbit.report_intervals import DEFAULT_N_BOOT
from lowbit.report_recommend import DEFAULT_BUDGET_AP, DEFAULT_LATENCY_TIE_PCT


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(__doc__)
    parser.add_argument(
        "--run-dir",
        type=Path,
        nargs="+",
        required=True,
        help="run dir(s) holding */metrics.json evaluations (one model, one image set)",
    )
    parser.add_argument(
        "--out-dir", type=Path, default=None, help="where the report goes; None means the first --run-dir"
    )
    parser.add_argument(
        "--budget-ap",
        type=positive_float,
        default=DEFAULT_BUDGET_AP,
        help="largest accepted mAP50-95 loss vs FP32, AP points (mAP x 100; finite, > 0)",
    )
    parser.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help="dataset whose annotations/instances_val2017.json must still be the file the run was scored on; "
        "None means the run's workflow.json, then the annotation file the FP32 metrics name (checked when present)",
    )
    parser.add_argument(
        "--latency-tie-pct",
        type=float,
        default=DEFAULT_LATENCY_TIE_PCT,
        help="latencies within this percentage of the fastest tie; the most accurate of them is recommended",
    )
    parser.add_argument(
        "--tensorrt",
        choices=("auto", "off"),
        default="auto",
        help="auto: build and time a TensorRT engine per variant when trtexec exists; off: never",
    )
    parser.add_argument(
        "--trtexec",
        type=Path,
        default=None,
        help="trtexec executable; None means PATH, then /usr/src/tensorrt/bin/trtexec",
    )
    parser.add_argument(
        "--trt-qdq-mode",
        choices=trt.QDQ_MODES,
        default="stronglyTyped",
        help="TensorRT build of Q/DQ models: stronglyTyped (tensor types as in the graph, as ModelOpt's examples) "
        "or mixed (--fp16 plus --int8/--fp8: TensorRT may run non-quantized layers in FP16)",
    )
    parser.add_argument(
        "--trt-iterations", type=int, default=trt.DEFAULT_ITERATIONS, help="timed trtexec inferences (minimum)"
    )
    parser.add_argument(
        "--trt-warmup-ms", type=int, default=trt.DEFAULT_WARMUP_MS, help="trtexec warm-up, milliseconds"
    )
    parser.add_argument(
        "--ci-replicates",
        type=non_negative_int,
        default=DEFAULT_N_BOOT,
        help="paired bootstrap replicates over images per ΔAP interval (95 %%, seed 0); 0: no intervals, else >= 2",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report in --out-dir")
    parser.add_argument("--verbose", action="store_true", help="debug logging on the console")
    return parser


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # ReportSettings has one field per flag: a flag added here without its field fails at once
    result = make_report(ReportSettings(**vars(args)), argv)
    print(result.summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
