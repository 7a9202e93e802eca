"""Export an ultralytics YOLOv10 to ONNX in the yolov10m checkpoint's format (raw one-to-one head).

Output: input ``images`` FLOAT [1,3,S,S]; one output ``/model.23/Concat_3_output_0`` FLOAT
[1, 64 + nc, A] (per anchor: 4 x 16 DFL logits, then nc class logits; A = 8400 at S = 640),
Conv+BN fused. The export is checked against ultralytics' own one-to-one outputs on a random
image (ONNX Runtime CPU vs torch) and deleted again if they disagree.

Writes ``--out`` plus ``<stem>.manifest.json`` and ``<stem>.export.log`` beside it.

Example (architecture only, random weights; no download):
    python scripts/cv-models/export_yolov10_raw_onnx.py \
        --weights yolov10m.yaml --imgsz 640 --out tmp/export/yolov10m-arch.onnx
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lowbit.cli import cli_entry, imgsz, int_range, make_parser, non_negative_int, positive_float, positive_int
from lowbit.export import (
    DEFAULT_OPSET,
    DEFAULT_RTOL,
    check_export_imgsz,
    export_raw_head_onnx,
    exported_parameter_count,
    load_yolov10,
    onnx_vs_reference,
    prepare_raw_head_model,
    raw_head_reference,
)
from lowbit.logs import get_logger, setup_logging
from lowbit.runs import (
    check_output_path,
    manifest_run,
    resolve_repo_path,
    sha256_file,
)

log = get_logger("export_yolov10_raw_onnx")


class ExportMismatch(Exception):
    """The exported graph does not reproduce the torch model's output."""


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(__doc__)
    parser.add_argument(
        "--weights",
        type=Path,
        required=True,
        help="ultralytics YOLOv10 .pt checkpoint (local file), or a .yaml architecture "
        "(a path, or a name shipped with ultralytics such as yolov10m.yaml; random weights)",
    )
    parser.add_argument(
        "--nc", type=positive_int, default=None, help="number of classes for a .yaml build; None: the yaml's own nc"
    )
    parser.add_argument("--imgsz", type=imgsz, default=640, help="square input size in pixels (multiple of 32)")
    parser.add_argument("--out", type=Path, required=True, help="destination .onnx file")
    parser.add_argument("--opset", type=int_range(13, 20), default=DEFAULT_OPSET, help="ONNX opset version (13-20)")
    parser.add_argument(
        "--seed", type=non_negative_int, default=0, help="seed for .yaml random weights and the check image"
    )
    parser.add_argument(
        "--rtol",
        type=positive_float,
        default=DEFAULT_RTOL,
        help="max |onnx - torch| allowed, relative to max |torch| on the check image",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--verbose", action="store_true", help="debug logging on the console")
    return parser


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    check_output_path(out, "--out", args.overwrite, suffix=".onnx")
    weights = resolve_repo_path(args.weights)

    setup_logging(verbose=args.verbose)
    loaded = load_yolov10(weights, nc=args.nc, seed=args.seed)
    head = loaded.model.model[-1]
    check_export_imgsz(args.imgsz, int(max(head.stride.tolist())))
    # Inputs are valid: from here on the log also goes to a file beside the export.
    setup_logging(out.with_suffix(".export.log"), verbose=args.verbose)

    manifest_path = out.with_suffix(".manifest.json")
    try:
        graph, num_params, agreement = _export(args, loaded, out, manifest_path, argv)
    except ExportMismatch as exc:
        log.error("%s", exc)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"wrote {out}: {graph['input_name']} {graph['input_shape']} -> {graph['output_name']} "
        f"{graph['output_shape']}, opset {graph['opset']}, {num_params:,} params; "
        f"onnx vs torch max |diff| {agreement['max_abs_diff']:.3g} (max |out| {agreement['max_abs_reference']:.3g})"
    )
    return 0


def _export(args: argparse.Namespace, loaded, out: Path, manifest_path: Path, argv: list[str] | None):
    import torch

    with manifest_run(
        manifest_path, "scripts/cv-models/export_yolov10_raw_onnx.py", vars(args), argv, kind="export"
    ) as manifest:
        manifest.add_input(loaded.source)
        generator = torch.Generator().manual_seed(args.seed)
        images = torch.rand(1, 3, args.imgsz, args.imgsz, generator=generator)
        log.info("reference forward (unfused, ultralytics one2one branch) at %d px", args.imgsz)
        reference = raw_head_reference(loaded.model, images)

        model = prepare_raw_head_model(loaded.model)
        log.info("exporting %s (%s, nc=%d) -> %s", loaded.source, loaded.kind, loaded.nc, out)
        graph = export_raw_head_onnx(model, out, args.imgsz, args.opset)
        num_params = exported_parameter_count(model)
        agreement = onnx_vs_reference(out, reference, images)
        manifest.add_output("onnx", out)
        manifest.update(
            source_kind=loaded.kind,
            nc=loaded.nc,
            graph=graph,
            torch_fused_params=num_params,
            agreement=agreement,
            rtol=args.rtol,
        )
        if agreement["rel_diff"] > args.rtol:
            out.unlink(missing_ok=True)
            raise ExportMismatch(
                f"ONNX output differs from torch by {agreement['max_abs_diff']:.3g} "
                f"({agreement['rel_diff']:.3g} of max |torch| {agreement['max_abs_reference']:.3g}, "
                f"allowed {args.rtol:g}); {out} was removed"
            )
        manifest.update(onnx_sha256=sha256_file(out))
    return graph, num_params, agreement


if __name__ == "__main__":
    raise SystemExit(main())
