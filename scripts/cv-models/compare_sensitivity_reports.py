"""Compare two existing layer-sensitivity reports (Spearman rank correlation and top-K overlap), without scoring again.

Both reports are ``layer-sensitivity-report.json`` files of the shared schema (the torch sweep's or
``onnx_layer_sensitivity.py``'s). Their layers are paired through the report columns: ``onnx_node``,
else the ONNX node another layer lists for the same ``weight``, else ``weight``, else ``name``. Two
reports of one source always pair up; a torch report against an ONNX one pairs through the weight
names, and layers without a weight on one side are listed as ``not_in_other``. With ``--onnx-path``
both reports are mapped onto that graph's nodes instead, exactly as ``onnx_layer_sensitivity.py
--compare-with`` does. Writes ``--out`` (the same keys as ``ranking-agreement.json``) and a manifest
beside it (``<out>.manifest.json``).

Example (``SENS_RUN``: the torch sweep's run dir; ``ONNX_RUN``: ``onnx_layer_sensitivity.py``'s)::

    python scripts/cv-models/compare_sensitivity_reports.py \
        --report-a "$SENS_RUN/outputs/yolov10m/fp8-fp8/per_layer/layer-sensitivity-report.json" \
        --report-b "$ONNX_RUN/outputs/yolov10m/onnx-fp8/per_layer/layer-sensitivity-report.json" \
        --out "$SENS_RUN/agreement-torch-vs-onnx-fp8.json"
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lowbit.cli import cli_entry, make_parser, positive_int
from lowbit.logs import get_logger, setup_logging
from lowbit.runs import (
    atomic_write_json,
    check_input_file,
    check_output_path,
    manifest_run,
    resolve_repo_path,
)
from lowbit.sensitivity_report import compare_reports, load_report

SCRIPT = "compare_sensitivity_reports.py"
log = get_logger("compare_sensitivity_reports")


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(__doc__)
    parser.add_argument("--report-a", type=Path, required=True, help="first layer-sensitivity-report.json")
    parser.add_argument("--report-b", type=Path, required=True, help="second layer-sensitivity-report.json")
    parser.add_argument("--out", type=Path, required=True, help="agreement JSON to write")
    parser.add_argument(
        "--onnx-path",
        type=Path,
        default=None,
        help="map both reports onto this ONNX graph's nodes (as onnx_layer_sensitivity.py --compare-with does); "
        "unset: pair layers through the report columns",
    )
    parser.add_argument(
        "--k", type=positive_int, nargs="+", default=[5, 10, 20], help="top-K sizes whose overlap is reported"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return parser


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    path_a = check_input_file(resolve_repo_path(args.report_a), "--report-a")
    path_b = check_input_file(resolve_repo_path(args.report_b), "--report-b")
    report_a = load_report(path_a, "--report-a")
    report_b = load_report(path_b, "--report-b")
    matcher = None
    onnx_path = None
    if args.onnx_path is not None:
        # only for --onnx-path: pairing through the report columns needs no graph (nor onnx)
        from lowbit.onnx_stats import load_model_proto
        from lowbit.sensitivity_onnx import NodeMatcher

        onnx_path = check_input_file(resolve_repo_path(args.onnx_path), "--onnx-path")
        matcher = NodeMatcher(load_model_proto(onnx_path, "--onnx-path"))
    out: Path = args.out
    check_output_path(out, "--out", args.overwrite, suffix=".json")

    out.parent.mkdir(parents=True, exist_ok=True)
    setup_logging()
    with manifest_run(
        out.with_suffix(".manifest.json"), SCRIPT, vars(args), argv, kind="sensitivity-compare"
    ) as manifest:
        manifest.add_input(path_a)
        manifest.add_input(path_b)
        if onnx_path is not None:
            manifest.add_input(onnx_path)
        agreement = compare_reports(report_a, report_b, matcher, ks=sorted(set(args.k)))
        agreement["a"]["report"] = str(path_a)
        agreement["b"]["report"] = str(path_b)
        agreement["graph"] = None if onnx_path is None else str(onnx_path)
        if agreement["matched"] < 2:
            log.warning(
                "only %d layer(s) of the two reports pair up: no rank correlation (were they made for the same model?)",
                agreement["matched"],
            )
        atomic_write_json(out, agreement)
        manifest.add_output("agreement", out)
        manifest.update(matched=agreement["matched"], spearman=agreement["spearman"])

    overlap = ", ".join(f"top-{k} {v['overlap']}/{k}" for k, v in agreement["top_k"].items()) or "no top-K"
    print(f"{agreement['matched']} matched layers, Spearman {agreement['spearman']}, {overlap} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
