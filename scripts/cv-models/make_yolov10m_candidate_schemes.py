"""Turn a layer-sensitivity report into ONNX node exclusion schemes, one per K (card step 4b).

For each K in ``--k`` the scheme excludes the K highest-ranked report layers that map to a node of
``--onnx-path``. A layer maps through its ``onnx_node`` when that is a node of the graph, else through
its weight initializer (``weight``, or ``<name>.weight``; the exported ONNX keeps torch parameter names)
to the node that consumes it (also through Q/DQ or Cast nodes), else by the export's naming convention
(``model.2.cv1.conv`` <-> ``/model.2/cv1/conv/Conv``). Layers that map nowhere are skipped and listed
with the reason. When more than ``--max-unmatched-frac`` of the top max(K) layers cannot be mapped,
the report and the graph do not share names or weights (the model card's caveat about the ultralytics
assets and the ONNX checkpoint) and the script fails instead of writing schemes that exclude the wrong
layers; run ``onnx_layer_sensitivity.py`` on this graph to get a report that always maps.

Writes into ``--out-dir``: ``scheme_k{K}.json`` (``k``, ``nodes_to_exclude`` as exact node names,
``layers``, ``report``, ``report_sha256``, ``onnx_path``, ``onnx_sha256``, ``precision``;
``scheme_k0.json`` excludes nothing), ``schemes_summary.json`` (matched and unmatched layers),
``manifest.json`` and a log. With ``--random-control SEED`` also ``scheme_k{K}_random{SEED}.json``: K
nodes drawn at random from the mapped layers, to check that the ranking beats chance.
``quantize_yolov10m_onnx.py --exclude-json scheme_k{K}.json`` applies a scheme.

Example::

    python scripts/cv-models/make_yolov10m_candidate_schemes.py \
        --report-json "$SENS_RUN/outputs/yolov10m/fp8-fp8/per_layer/layer-sensitivity-report.json" \
        --out-dir "$RUN_ROOT/schemes"
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lowbit import schemes
from lowbit.cli import cli_entry, make_parser
from lowbit.runs import CARD_ONNX_PATH, check_input_file, resolve_repo_path


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(__doc__)
    parser.add_argument(
        "--report-json", type=Path, required=True, help="layer-sensitivity-report.json (torch sweep or ONNX-native)"
    )
    parser.add_argument("--out-dir", type=Path, required=True, help="folder for scheme_k{K}.json and the summary")
    parser.add_argument("--onnx-path", type=Path, default=CARD_ONNX_PATH, help="ONNX graph the schemes apply to")
    parser.add_argument(
        "--k",
        type=int,
        nargs="+",
        default=list(schemes.DEFAULT_KS),
        help="numbers of top-ranked layers to exclude, one scheme each",
    )
    parser.add_argument(
        "--max-unmatched-frac",
        type=float,
        default=schemes.DEFAULT_MAX_UNMATCHED_FRAC,
        help="fail when more than this fraction of the top max(K) report layers map to no ONNX node (0..1)",
    )
    parser.add_argument(
        "--random-control",
        type=int,
        default=None,
        metavar="SEED",
        help="also write scheme_k{K}_random{SEED}.json per K > 0: K mapped layers drawn at random (seeded)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace schemes already in --out-dir")
    return parser


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ks = schemes.check_settings(args.k, args.max_unmatched_frac)
    result = schemes.build_schemes(
        check_input_file(resolve_repo_path(args.report_json), "--report-json"),
        check_input_file(resolve_repo_path(args.onnx_path), "--onnx-path"),
        args.out_dir,
        ks,
        max_unmatched_frac=args.max_unmatched_frac,
        random_seed=args.random_control,
        overwrite=args.overwrite,
        manifest_args=vars(args),
        argv=argv,
    )
    summary = result.summary
    extra = f" + {len(result.random)} random controls (seed {args.random_control})" if result.random else ""
    print(
        f"wrote {len(result.schemes)} schemes (K = {', '.join(map(str, ks))}){extra} to {args.out_dir}; "
        f"{summary['matched_count']}/{summary['layers']} report layers mapped to ONNX nodes"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
