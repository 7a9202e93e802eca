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

from lowbit.logs import get_logger, setup_logging
from lowbit.runs import (
    CARD_ONNX_PATH,
    UserError,
    atomic_write_json,
    check_input_file,
    manifest_run,
    resolve_repo_path,
)
from lowbit.cli import cli_entry

SCRIPT = "make_yolov10m_candidate_schemes.py"
DEFAULT_ONNX = CARD_ONNX_PATH
SUMMARY_FILE = "schemes_summary.json"
LOG_FILE = "make_yolov10m_candidate_schemes.log"
log = get_logger("candidate_schemes")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--report-json", type=Path, required=True, help="layer-sensitivity-report.json (torch sweep or ONNX-native)"
    )
    parser.add_argument("--out-dir", type=Path, required=True, help="folder for scheme_k{K}.json and the summary")
    parser.add_argument("--onnx-path", type=Path, default=DEFAULT_ONNX, help="ONNX graph the schemes apply to")
    parser.add_argument(
        "--k",
        type=int,
        nargs="+",
        default=[0, 5, 10, 20],
        help="numbers of top-ranked layers to exclude, one scheme each",
    )
    parser.add_argument(
        "--max-unmatched-frac",
        type=float,
        default=0.2,
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


def scheme_files(out_dir: Path) -> list[Path]:
    """Files of an earlier run in ``out_dir`` (schemes, random controls, summary, manifest, log)."""
    return sorted(out_dir.glob("scheme_k*.json")) + [
        p for p in (out_dir / SUMMARY_FILE, out_dir / "manifest.json", out_dir / LOG_FILE) if p.exists()
    ]


def map_layers(report: dict, matcher) -> tuple[list[dict], list[dict], list[dict]]:
    """Report layers in rank order -> ``(matched, unmatched, duplicates)``.

    ``matched`` entries: ``rank``, ``name``, ``onnx_node``, ``via``; ``unmatched``: ``rank``, ``name``,
    ``reason``. A layer mapping to a node that a better-ranked layer already took goes to
    ``duplicates`` (``rank``, ``name``, ``onnx_node``, ``taken_by``), so no node is excluded twice.
    """
    matched, unmatched, duplicates, claimed = [], [], [], {}
    for layer in report["layers"]:
        match = matcher.match(layer)
        if match.node is None:
            unmatched.append({"rank": layer["rank"], "name": layer["name"], "reason": match.reason})
        elif match.node in claimed:
            duplicates.append(
                {"rank": layer["rank"], "name": layer["name"], "onnx_node": match.node, "taken_by": claimed[match.node]}
            )
        else:
            claimed[match.node] = layer["name"]
            matched.append({"rank": layer["rank"], "name": layer["name"], "onnx_node": match.node, "via": match.via})
    return matched, unmatched, duplicates


def check_ks(
    ks: list[int], report: dict, matched: list[dict], unmatched: list[dict], max_frac: float, report_path: Path
) -> None:
    """K within the report, enough mapped layers, and not too many unmatched among the top max(K)."""
    n_layers = len(report["layers"])
    too_big = [k for k in ks if k > n_layers]
    if too_big:
        raise UserError(f"--k {max(too_big)}: {report_path} ranks only {n_layers} layers")
    top = max(ks)
    if top == 0:
        return
    missing = [u for u in unmatched if u["rank"] <= top]
    if len(missing) > max_frac * top:
        shown = "; ".join(f"#{u['rank']} {u['name']}: {u['reason']}" for u in missing[:3])
        raise UserError(
            f"{len(missing)} of the top {top} layers of {report_path} map to no node of --onnx-path "
            f"(more than --max-unmatched-frac {max_frac:g}): the report and the ONNX graph do not share names or "
            f"weights. First: {shown}. Score this graph with onnx_layer_sensitivity.py, or pass the ONNX the "
            "report was made for"
        )
    if top > len(matched):
        raise UserError(f"--k {top}: only {len(matched)} layers of {report_path} map to nodes of --onnx-path")


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import numpy as np
    import onnx

    from lowbit.sensitivity_onnx import NodeMatcher
    from lowbit.sensitivity_report import load_report

    if any(k < 0 for k in args.k):
        raise UserError("--k values must be >= 0")
    if not 0.0 <= args.max_unmatched_frac <= 1.0:
        raise UserError(f"--max-unmatched-frac must be between 0 and 1, got {args.max_unmatched_frac}")
    ks = sorted(set(args.k))
    report_path = check_input_file(resolve_repo_path(args.report_json), "--report-json")
    onnx_path = check_input_file(resolve_repo_path(args.onnx_path), "--onnx-path")
    report = load_report(report_path, "--report-json")
    try:
        # Only names are needed: skip external weight files.
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as e:  # protobuf raises several types for a file that is not a model
        raise UserError(f"--onnx-path: {onnx_path} is not a readable ONNX model ({e})") from e

    out_dir: Path = args.out_dir
    previous = scheme_files(out_dir) if out_dir.is_dir() else []
    if previous and not args.overwrite:
        raise UserError(
            f"--out-dir {out_dir} already holds schemes ({previous[0].name}); pass --overwrite to replace them"
        )

    matcher = NodeMatcher(model)
    matched, unmatched, duplicates = map_layers(report, matcher)
    check_ks(ks, report, matched, unmatched, args.max_unmatched_frac, report_path)

    out_dir.mkdir(parents=True, exist_ok=True)
    for path in previous:  # --overwrite: drop every earlier scheme so the folder holds one consistent set
        path.unlink()
    setup_logging(out_dir / LOG_FILE)
    with manifest_run(out_dir / "manifest.json", SCRIPT, vars(args), argv) as manifest:
        report_sha = manifest.add_input(report_path)
        onnx_sha = manifest.add_input(onnx_path)
        common = {
            "report": str(report_path),
            "report_sha256": report_sha,
            "onnx_path": str(onnx_path),
            "onnx_sha256": onnx_sha,
            "precision": report.get("precision"),
        }
        written = {}
        for k in ks:
            chosen = matched[:k]
            scheme = {
                "k": k,
                "nodes_to_exclude": [m["onnx_node"] for m in chosen],
                "layers": [m["name"] for m in chosen],
                **common,
            }
            path = out_dir / f"scheme_k{k}.json"
            atomic_write_json(path, scheme)
            written[str(k)] = str(path)
            manifest.add_output(f"scheme_k{k}", path)
            log.info("K=%d: excluding %s", k, ", ".join(scheme["nodes_to_exclude"]) or "nothing")

        random_written = {}
        if args.random_control is not None:
            # Drawn from every mapped layer, in graph order, so a scheme depends only on the seed and the graph.
            pool = sorted(matched, key=lambda m: matcher.order.get(m["onnx_node"], 0))
            rng = np.random.default_rng(args.random_control)
            for k in ks:
                if k == 0:
                    continue
                picks = sorted(rng.choice(len(pool), size=k, replace=False).tolist())
                chosen = [pool[i] for i in picks]
                path = out_dir / f"scheme_k{k}_random{args.random_control}.json"
                atomic_write_json(
                    path,
                    {
                        "k": k,
                        "nodes_to_exclude": [m["onnx_node"] for m in chosen],
                        "layers": [m["name"] for m in chosen],
                        **common,
                        "random_seed": args.random_control,
                    },
                )
                random_written[str(k)] = str(path)
                manifest.add_output(f"scheme_k{k}_random{args.random_control}", path)

        vias = {}
        for m in matched:
            vias[m["via"]] = vias.get(m["via"], 0) + 1
        summary = {
            "ks": ks,
            "report": str(report_path),
            "report_source": report.get("source"),
            "precision": report.get("precision"),
            "onnx_path": str(onnx_path),
            "layers": len(report["layers"]),
            "matched_count": len(matched),
            "unmatched_count": len(unmatched),
            "matched_via": vias,
            "max_unmatched_frac": args.max_unmatched_frac,
            "schemes": written,
            "random_control": {"seed": args.random_control, "schemes": random_written} if random_written else None,
            "matched": matched,
            "unmatched": unmatched,
            "duplicates": duplicates,
        }
        atomic_write_json(out_dir / SUMMARY_FILE, summary)
        manifest.add_output("summary", out_dir / SUMMARY_FILE)
        manifest.update(matched=len(matched), unmatched=len(unmatched), matched_via=vias)
        if unmatched:
            log.warning(
                "%d of %d report layers map to no node (first: %s: %s); see %s",
                len(unmatched), len(report["layers"]), unmatched[0]["name"], unmatched[0]["reason"], SUMMARY_FILE,
            )

    extra = f" + {len(random_written)} random controls (seed {args.random_control})" if random_written else ""
    print(
        f"wrote {len(written)} schemes (K = {', '.join(map(str, ks))}){extra} to {out_dir}; "
        f"{len(matched)}/{len(report['layers'])} report layers mapped to ONNX nodes"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
