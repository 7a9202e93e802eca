"""Print an ONNX model's size, parameter count, MACs/FLOPs and I/O (the model card's "Model Stats" block).

Parameters are counted from initializer tensors; compute is the MACs of Conv/MatMul/Gemm nodes at
the input shape (symbolic batch dims set to --batch; other symbolic dims need --input-shape);
FLOPs = 2 x MACs. With --json-out the numbers are also saved as JSON, with a manifest beside it.

Example:
    python scripts/cv-models/onnx_model_stats.py \
        --model models/cv-models/yolov10m/checkpoints/yolov10m.onnx --markdown
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lowbit.cli import cli_entry, make_parser, positive_int
from lowbit.logs import get_logger, setup_logging
from lowbit.onnx_stats import format_markdown, format_text, model_stats, parse_input_shapes
from lowbit.runs import (
    atomic_write_json,
    check_input_file,
    check_output_path,
    manifest_run,
    resolve_repo_path,
)

log = get_logger("onnx_model_stats")


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(__doc__)
    parser.add_argument("--model", type=Path, required=True, help="the .onnx file")
    parser.add_argument("--batch", type=positive_int, default=1, help="size used for symbolic batch (first) dims")
    parser.add_argument(
        "--input-shape",
        nargs="+",
        default=None,
        metavar="NAME=D0,D1,...",
        help="shape for inputs with symbolic non-batch dims, e.g. images=1,3,640,640 "
        "(the name may be left out for a one-input model)",
    )
    parser.add_argument("--markdown", action="store_true", help="print the card's Markdown block instead of text")
    parser.add_argument("--json-out", type=Path, default=None, help="also write the numbers to this JSON file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json-out")
    parser.add_argument("--verbose", action="store_true", help="debug logging on the console")
    return parser


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(verbose=args.verbose)
    model = check_input_file(resolve_repo_path(args.model), "--model")
    overrides = parse_input_shapes(args.input_shape)
    if args.json_out is not None:
        check_output_path(args.json_out, "--json-out", args.overwrite, suffix=".json")

    if args.json_out is None:
        stats = model_stats(model, batch=args.batch, input_shapes=overrides)
    else:
        manifest_path = args.json_out.with_suffix(".manifest.json")
        with manifest_run(
            manifest_path, "scripts/cv-models/onnx_model_stats.py", vars(args), argv, kind="stats"
        ) as manifest:
            manifest.add_input(model)
            stats = model_stats(model, batch=args.batch, input_shapes=overrides)
            atomic_write_json(args.json_out, stats)
            manifest.add_output("stats", args.json_out)
        log.info("wrote %s", args.json_out)
    if stats["unresolved_compute_nodes"]:
        log.warning(
            "%d Conv/MatMul/Gemm nodes have unknown shapes and are not counted: %s",
            len(stats["unresolved_compute_nodes"]),
            ", ".join(stats["unresolved_compute_nodes"][:5]),
        )
    print(format_markdown(stats) if args.markdown else format_text(stats), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
