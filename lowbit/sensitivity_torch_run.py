"""One torch-sweep run: inputs checked, a run folder with its log and manifest, the sweep, the manifest's summary.

What ``yolov10m_layer_sensitivity.py`` does, as one call (:func:`run_torch_sweep`) over a typed
:class:`SweepSettings` (its fields are the script's flags). The sweep itself is ``lowbit.sensitivity_torch``;
the weights, images and device checks are ``lowbit.sensitivity_torch_inputs``'. Writes::

    <output_root>/<run-id>/manifest.json, layer_sensitivity.log
    <output_root>/<run-id>/outputs/<model>/<format>/per_layer/layer-sensitivity-report.{json,csv,md}
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowbit import sensitivity_torch_inputs as sweep_inputs
from lowbit.calib import load_calib_tensor
from lowbit.errors import UserError
from lowbit.logs import get_logger, setup_logging
from lowbit.runs import check_input_file, manifest_run, new_run_dir, resolve_repo_path, timestamp

__all__ = ["DEFAULT_OUTPUT_ROOT", "LOG_NAME", "SCRIPT", "SweepRun", "SweepSettings", "run_torch_sweep"]

SCRIPT = "scripts/cv-models/yolov10m_layer_sensitivity.py"  # the manifest's "script"
DEFAULT_OUTPUT_ROOT = Path("tmp/yolov10m_layer_sensitivity")
LOG_NAME = "layer_sensitivity.log"


@dataclass
class SweepSettings:
    """What to sweep and how; one field per flag of ``yolov10m_layer_sensitivity.py``, in its order.

    Attributes:
        weights: ``.pt`` or ``.yaml``; None: ``models/yolo10/yolov10m.pt`` if linked, else the demo detector.
        images: image list (one path per line); ignored when ``calib_npy`` is given.
        calib_npy: calibration tensor float32 ``[N, 3, imgsz, imgsz]`` instead of ``images``.
        num_images: images to calibrate and score (the first N, >= 1).
        imgsz: square input side (a multiple of 32).
        batch_size: images per forward pass.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        formats: keys of ``lowbit.sensitivity_torch_inputs.QUANT_FORMATS``; one report each.
        metric: key of ``lowbit.drift.METRICS``.
        output_root: run folders are created under it; ``run_id``: the run folder's name (None: a timestamp).
        seed: seed of a ``.yaml`` architecture's random weights.
        overwrite: reuse an existing ``run_id`` folder; ``verbose``: debug logging on the console.
    """

    weights: Path | None = None
    images: Path = sweep_inputs.DEFAULT_IMAGE_LIST
    calib_npy: Path | None = None
    num_images: int = 32
    imgsz: int = 640
    batch_size: int = 8
    device: str = "auto"
    formats: list[str] = dataclasses.field(default_factory=lambda: ["fp8-fp8"])
    metric: str = "det_kl"
    output_root: Path = DEFAULT_OUTPUT_ROOT
    run_id: str | None = None
    seed: int = 0
    overwrite: bool = False
    verbose: bool = False

    def as_args(self) -> dict[str, Any]:
        """The manifest's ``args``: every field by name, in order (what ``vars(args)`` of the script held)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass
class SweepRun:
    """The run folder and ``lowbit.sensitivity_torch.run_sweep``'s results (one dict per format)."""

    run_dir: Path
    results: list[dict[str, Any]]


def _validate(settings: SweepSettings) -> dict:
    """Cheap checks and image loading, before any run dir exists (torch is imported only to find a .yaml)."""
    run_id = settings.run_id
    if run_id is not None and (not run_id or "/" in run_id or run_id in (".", "..")):
        raise UserError(f"--run-id must be a plain directory name, got {run_id!r}", flag="--run-id")

    root = settings.output_root
    output_root = root if root.is_absolute() else Path.cwd() / root
    run_dir = None if run_id is None else output_root / run_id
    if run_dir is not None and run_dir.exists() and not settings.overwrite:
        raise UserError(
            f"{run_dir} already exists; pass --overwrite to reuse it, or another --run-id", flag="--overwrite"
        )

    weights = sweep_inputs.resolve_weights(None if settings.weights is None else resolve_repo_path(settings.weights))
    if weights.suffix.lower() in (".yaml", ".yml"):
        from lowbit.export import resolve_yaml  # may import ultralytics to find a shipped architecture

        weights = resolve_yaml(weights)
    else:
        check_input_file(weights, "--weights")

    if settings.calib_npy is not None:
        data_path = resolve_repo_path(settings.calib_npy)
        images = load_calib_tensor(data_path, "--calib-npy", imgsz=settings.imgsz, max_images=settings.num_images)
        image_files = None
    else:
        data_path = resolve_repo_path(settings.images)
        default_list = sweep_inputs.DEFAULT_IMAGE_LIST
        if settings.images == default_list and not (data_path.exists() or data_path.is_symlink()):
            raise UserError(
                f"--images: the default image list {default_list} does not exist; pass --images LIST "
                "(one image path per line) or --calib-npy FILE",
                flag="--images",
            )
        images, image_files = sweep_inputs.load_images_from_list(data_path, settings.num_images, settings.imgsz)
    if images.shape[0] < settings.num_images:
        get_logger("layer_sensitivity").warning(
            "%s holds %d images, fewer than --num-images %d: using all", data_path, images.shape[0], settings.num_images
        )
    return {
        "weights": weights,
        "data_path": data_path,
        "images": images,
        "image_files": image_files,
        "output_root": output_root,
        "run_dir": run_dir,
    }


def _format_summary(result: dict[str, Any]) -> dict[str, Any]:
    """The manifest's ``formats.<format>`` entry of one format's result."""
    report = result["report"]
    return {
        "num_layers": len(report["layers"]),
        "op_counts": result["op_counts"],
        "not_run": result["not_run"],
        "layer_calls": result["layer_calls"],
        "reference": report["reference"],
        "secondary_score": result["secondary_score"],
        "secondary_reference": result["secondary_reference"],
        "metric_agreement_spearman": result["metric_agreement_spearman"],
        "secondary_per_layer": result["secondary"],
        "wall_s": report["wall_s"],
        "timings_s": {k: round(v, 3) for k, v in result["timings_s"].items()},
    }


def run_torch_sweep(settings: SweepSettings, argv: list[str] | None = None, t_start: float | None = None) -> SweepRun:
    """Check the inputs, make the run folder, sweep every format, and complete the manifest.

    Args:
        settings: the run's settings (the script's flags).
        argv: the command line recorded in the manifest (None: ``sys.argv``).
        t_start: ``time.perf_counter()`` of the command's start (default: now); the reports' ``wall_s`` count from it.

    Raises:
        UserError: a bad input (naming its flag), before any run folder is created.
    """
    from lowbit.sensitivity_torch import run_sweep

    t_start = time.perf_counter() if t_start is None else t_start
    setup_logging(verbose=settings.verbose)  # console only until the run dir exists
    checked = _validate(settings)
    device = sweep_inputs.select_device(settings.device)
    sweep_inputs.import_mtq()  # fail on a broken install before creating the run dir

    if checked["run_dir"] is not None:
        run_dir = checked["run_dir"]
        run_dir.mkdir(parents=True, exist_ok=True)
    else:
        run_dir = new_run_dir(checked["output_root"], timestamp())
    logger = setup_logging(run_dir / LOG_NAME, verbose=settings.verbose)
    logger.info("run dir %s", run_dir)

    argv = sys.argv if argv is None else argv
    with manifest_run(run_dir / "manifest.json", SCRIPT, settings.as_args(), argv, kind="sensitivity") as manifest:
        weights_sha = manifest.add_input(checked["weights"])
        manifest.add_input(checked["data_path"])
        image_files = checked["image_files"]
        manifest.update(
            run_dir=run_dir,
            device=device,
            weights=checked["weights"],
            images=[str(p) for p in image_files] if image_files else None,
            num_images=int(checked["images"].shape[0]),
        )
        inputs = sweep_inputs.SweepInputs(
            weights=checked["weights"],
            weights_sha256=weights_sha,
            images=checked["images"],
            data_source=str(checked["data_path"]),
            imgsz=settings.imgsz,
            formats=list(dict.fromkeys(settings.formats)),
            metric=settings.metric,
            batch_size=settings.batch_size,
            device=device,
            seed=settings.seed,
        )
        results = run_sweep(inputs, run_dir, t_start=t_start)
        per_format = {}
        for result in results:
            fmt = result["report"]["quant_format"]
            for ext, path in result["paths"].items():
                manifest.add_output(f"{fmt}.{ext}", path)
            per_format[fmt] = _format_summary(result)
        manifest.update(formats=per_format)
    return SweepRun(run_dir, results)
