"""Each workflow step's settings, declared once: a frozen dataclass per card script whose fields are the script's flags.

A field declared as ``field(metadata=flag(...))`` is one flag of the script (and, for the three scripts the model
card calls through a bash wrapper, the wrapper's env var for it). The fields are declared in the order the script's
wrapper writes its flags, so :meth:`ScriptSettings.argv` is the wrapper's command and :meth:`ScriptSettings.env` the
environment that makes the wrapper run it (tests/test_workflow.py runs each wrapper with ``env()`` and compares with
``argv()``). The rules, the same for every field:

==============  ==========================================  ========================
field value      argv                                        env
==============  ==========================================  ========================
``None``         nothing                                     unset
``bool``         the flag when true (else its ``off`` flag)  ``1`` / ``0``
``tuple``        the flag, then each item                    the items, space-joined
anything else    the flag, then ``str(value)``               ``str(value)``
==============  ==========================================  ========================

Fields without :func:`flag` metadata are not flags: what a step reads through a file (the images a calibration
list names), or which of its outputs later steps read. :meth:`ScriptSettings.inputs` and :meth:`ScriptSettings.outputs` come
from the same fields, and :meth:`ScriptSettings.step` makes the :class:`lowbit.steps.Step` the scheduler runs.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from lowbit.runs import REPO_ROOT
from lowbit.steps import Step

__all__ = [
    "SCRIPTS",
    "SENSITIVITY_REPORT",
    "CalibListSettings",
    "CalibSettings",
    "DatasetSettings",
    "EvalSettings",
    "MaterializeSettings",
    "OnnxSensitivitySettings",
    "QuantizeSettings",
    "ReportSettings",
    "SchemesSettings",
    "ScriptSettings",
    "SearchSettings",
    "SmokeSettings",
    "TorchSweepSettings",
    "dataset_files",
    "flag",
]

SCRIPTS = REPO_ROOT / "scripts" / "cv-models"
SENSITIVITY_REPORT = "layer-sensitivity-report.json"  # the file both rankings write in their per_layer folder


def flag(name: str, env: str | None = None, *, off: str | None = None) -> dict[str, str | None]:
    """A settings field's metadata: it is the script's flag ``name`` (``off``: the flag a false bool gives) and the
    wrapper's env var ``env``. Use as ``field(metadata=flag(...))``."""
    return {"flag": name, "env": env, "off": off}


def dataset_files(data_root: Path) -> tuple[Path, Path]:
    """The evaluation data of a COCO-layout root, as every evaluating step reads it: the annotations and the images."""
    return data_root / "annotations" / "instances_val2017.json", data_root / "val2017"


@dataclass(frozen=True, kw_only=True)
class ScriptSettings:
    """The settings of one script run; subclasses declare ``script`` (and ``wrapper``) and their fields."""

    script: ClassVar[Path]
    wrapper: ClassVar[Path | None] = None  # the card's bash wrapper of the script, if any
    reuse_existing: ClassVar[bool] = False  # see Step.reuse_existing

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # lists become tuples: settings are values
            if isinstance(getattr(self, f.name), list):
                object.__setattr__(self, f.name, tuple(getattr(self, f.name)))

    def _flags(self) -> list[tuple[dict, Any]]:
        return [(f.metadata, getattr(self, f.name)) for f in dataclasses.fields(self) if "flag" in f.metadata]

    def argv(self) -> list[str]:
        """The script's arguments, in field order."""
        argv: list[str] = []
        for meta, value in self._flags():
            if value is None:
                continue
            if isinstance(value, bool):
                argv += [meta["flag"]] if value else [meta["off"]] if meta["off"] else []
            elif isinstance(value, tuple):
                argv += [meta["flag"], *map(str, value)]
            else:
                argv += [meta["flag"], str(value)]
        return argv

    def env(self) -> dict[str, str]:
        """The env vars that make :attr:`wrapper` run the script with :meth:`argv`."""
        if self.wrapper is None:
            raise TypeError(f"{type(self).__name__}: {self.script.name} has no bash wrapper")
        env = {}
        for meta, value in self._flags():
            if meta["env"] is None or value is None:
                continue
            if isinstance(value, bool):
                env[meta["env"]] = "1" if value else "0"
            elif isinstance(value, tuple):
                env[meta["env"]] = " ".join(map(str, value))
            else:
                env[meta["env"]] = str(value)
        return env

    def command(self) -> list[str]:
        return [sys.executable, str(self.script), *self.argv()]

    def inputs(self) -> list[Path]:
        """Every file and folder the script reads."""
        return []

    def outputs(self) -> list[Path]:
        """What the script must leave behind."""
        raise NotImplementedError

    def cites(self) -> list[Path]:
        """JSON records among the inputs or outputs whose named models and metrics count too (see Step.cites)."""
        return []

    def step(self, name: str, family: str = "") -> Step:
        """The scheduler's step running this script; ``family`` groups steps for ``--force``."""
        return Step(
            name,
            self.command(),
            outputs=self.outputs(),
            inputs=self.inputs(),
            family=family,
            reuse_existing=self.reuse_existing,
            cites=self.cites(),
            settings=self,
        )


# ----------------------------------------------------------------------------------------------------------------------
# card steps 1-3: data, smoke test, evaluation, calibration


@dataclass(frozen=True, kw_only=True)
class DatasetSettings(ScriptSettings):
    """``make_demo_dataset.py``: the demo's generated dataset."""

    script: ClassVar[Path] = SCRIPTS / "make_demo_dataset.py"
    reuse_existing: ClassVar[bool] = True  # generated data, not a run result: complete whenever it exists

    out_root: Path = field(metadata=flag("--out-root"))
    splits: tuple[str, ...] = field(default=("val",), metadata=flag("--splits"))

    def outputs(self) -> list[Path]:
        ann, images = dataset_files(self.out_root)
        return [images, ann]


@dataclass(frozen=True, kw_only=True)
class SmokeSettings(ScriptSettings):
    """``run_random_onnx_inference.py``: one inference on random input."""

    script: ClassVar[Path] = REPO_ROOT / "models" / "cv-models" / "helpers" / "run_random_onnx_inference.py"

    model: Path = field(metadata=flag("--model"))
    output_root: Path = field(metadata=flag("--output-root"))
    providers: tuple[str, ...] = field(metadata=flag("--providers"))

    def inputs(self) -> list[Path]:
        return [self.model]

    def outputs(self) -> list[Path]:
        return [self.output_root]


@dataclass(frozen=True, kw_only=True)
class EvalSettings(ScriptSettings):
    """``eval_yolov10m_onnx_coco.py``: COCO mAP of one model on the evaluation slice."""

    script: ClassVar[Path] = SCRIPTS / "eval_yolov10m_onnx_coco.py"

    onnx_path: Path = field(metadata=flag("--onnx-path"))
    data_root: Path = field(metadata=flag("--data-root"))
    max_images: int = field(metadata=flag("--max-images"))
    skip_images: int | None = field(default=None, metadata=flag("--skip-images"))
    providers: tuple[str, ...] = field(metadata=flag("--providers"))
    imgsz: int = field(metadata=flag("--imgsz"))
    overwrite: bool = field(default=True, metadata=flag("--overwrite"))
    out: Path = field(metadata=flag("--out"))

    def inputs(self) -> list[Path]:
        return [self.onnx_path, *dataset_files(self.data_root)]

    def outputs(self) -> list[Path]:
        return [self.out]


@dataclass(frozen=True, kw_only=True)
class CalibListSettings(ScriptSettings):
    """``make_calib_list.py``: a calibration image list drawn outside the evaluation slice."""

    script: ClassVar[Path] = SCRIPTS / "make_calib_list.py"

    data_root: Path = field(metadata=flag("--data-root"))
    eval_max_images: int = field(metadata=flag("--eval-max-images"))
    num: int = field(metadata=flag("--num"))
    out: Path = field(metadata=flag("--out"))

    def inputs(self) -> list[Path]:
        return [dataset_files(self.data_root)[0]]

    def outputs(self) -> list[Path]:
        return [self.out]


@dataclass(frozen=True, kw_only=True)
class CalibSettings(ScriptSettings):
    """``make_yolov10m_calib_npy.py``: the calibration tensor from an image list."""

    script: ClassVar[Path] = SCRIPTS / "make_yolov10m_calib_npy.py"

    image_list: Path = field(metadata=flag("--list"))
    out: Path = field(metadata=flag("--out"))
    imgsz: int = field(metadata=flag("--imgsz"))
    overwrite: bool = field(default=True, metadata=flag("--overwrite"))
    images: tuple[Path, ...] = ()  # what the list names (or the folder they will be drawn from): read too

    def inputs(self) -> list[Path]:
        return [self.image_list, *self.images]

    def outputs(self) -> list[Path]:
        return [self.out]


@dataclass(frozen=True, kw_only=True)
class QuantizeSettings(ScriptSettings):
    """``quantize_yolov10m_onnx.py`` as ``quantize_yolov10m_int8_onnx.sh`` calls it."""

    script: ClassVar[Path] = SCRIPTS / "quantize_yolov10m_onnx.py"
    wrapper: ClassVar[Path] = SCRIPTS / "quantize_yolov10m_int8_onnx.sh"

    onnx_path: Path = field(metadata=flag("--onnx-path", "ONNX_PATH"))
    calib_path: Path = field(metadata=flag("--calib-path", "CALIB_PATH"))
    output_path: Path = field(metadata=flag("--output-path"))  # the wrapper's RUN_ROOT/onnx/OUTPUT_NAME: see env()
    quantize_mode: str = field(metadata=flag("--quantize-mode", "QUANTIZE_MODE"))
    calibration_eps: tuple[str, ...] = field(metadata=flag("--calibration-eps", "CALIBRATION_EPS"))
    high_precision_dtype: str = field(metadata=flag("--high-precision-dtype", "HIGH_PRECISION_DTYPE"))
    calibration_method: str | None = field(default=None, metadata=flag("--calibration-method", "CALIBRATION_METHOD"))
    use_zero_point: bool = field(
        default=False, metadata=flag("--use-zero-point", "USE_ZERO_POINT", off="--no-use-zero-point")
    )
    passes: tuple[str, ...] = field(
        default=("concat_elimination",), metadata=flag("--passes")
    )  # the wrapper's PASSES: see env()
    overwrite: bool = field(default=True, metadata=flag("--overwrite", "OVERWRITE"))

    def env(self) -> dict[str, str]:
        if self.output_path.parent.name != "onnx":
            raise ValueError(f"the wrapper writes RUN_ROOT/onnx/OUTPUT_NAME, not {self.output_path}")
        return {
            **super().env(),
            "RUN_ROOT": str(self.output_path.parent.parent),
            "OUTPUT_NAME": self.output_path.name,
            "PASSES": " ".join(self.passes) or "none",
        }

    def inputs(self) -> list[Path]:
        return [self.onnx_path, self.calib_path]

    def outputs(self) -> list[Path]:
        return [self.output_path]


# ----------------------------------------------------------------------------------------------------------------------
# card step 4: rankings, the budget search, fixed-K schemes and candidates, the report


@dataclass(frozen=True, kw_only=True)
class OnnxSensitivitySettings(ScriptSettings):
    """``onnx_layer_sensitivity.py``: the ONNX-native ranking, on ``qdq_path`` when given (else it quantizes)."""

    script: ClassVar[Path] = SCRIPTS / "onnx_layer_sensitivity.py"

    onnx_path: Path = field(metadata=flag("--onnx-path"))
    calib_path: Path = field(metadata=flag("--calib-path"))
    num_images: int = field(metadata=flag("--num-images"))
    precision: str = field(metadata=flag("--precision"))
    method: str = field(metadata=flag("--method"))
    providers: tuple[str, ...] = field(metadata=flag("--providers"))
    calibration_eps: tuple[str, ...] | None = field(default=None, metadata=flag("--calibration-eps"))
    qdq_path: Path | None = field(default=None, metadata=flag("--qdq-path"))
    out_dir: Path = field(metadata=flag("--out-dir"))
    overwrite: bool = field(default=True, metadata=flag("--overwrite"))

    def inputs(self) -> list[Path]:
        return [self.onnx_path, self.calib_path] + ([self.qdq_path] if self.qdq_path else [])

    def outputs(self) -> list[Path]:
        return [self.out_dir / SENSITIVITY_REPORT]


@dataclass(frozen=True, kw_only=True)
class TorchSweepSettings(ScriptSettings):
    """``yolov10m_layer_sensitivity.py`` as ``run_yolov10m_layer_sensitivity_sweep.sh`` calls it."""

    script: ClassVar[Path] = SCRIPTS / "yolov10m_layer_sensitivity.py"
    wrapper: ClassVar[Path] = SCRIPTS / "run_yolov10m_layer_sensitivity_sweep.sh"

    weights: Path = field(metadata=flag("--weights", "WEIGHTS"))
    calib_npy: Path = field(metadata=flag("--calib-npy", "CALIB_NPY"))
    num_images: int = field(metadata=flag("--num-images", "NUM_IMAGES"))
    formats: tuple[str, ...] = field(metadata=flag("--formats", "FORMATS"))
    output_root: Path = field(metadata=flag("--output-root", "OUTPUT_ROOT"))
    run_id: str = field(metadata=flag("--run-id", "RUN_ID"))
    overwrite: bool = field(default=True, metadata=flag("--overwrite", "OVERWRITE"))

    def inputs(self) -> list[Path]:
        return [self.weights, self.calib_npy]

    def outputs(self) -> list[Path]:
        from lowbit.sensitivity_torch import report_dir  # lazy: the sweep's module is only needed for its layout

        run_dir = self.output_root / self.run_id
        return [report_dir(run_dir, fmt, self.weights) / SENSITIVITY_REPORT for fmt in self.formats]


@dataclass(frozen=True, kw_only=True)
class SearchSettings(ScriptSettings):
    """``search_yolov10m_lowbit_budget.py`` for one mode; ``k0_metrics``: INT8 K=0 is the int8-eval step's."""

    script: ClassVar[Path] = SCRIPTS / "search_yolov10m_lowbit_budget.py"

    mode: str = field(metadata=flag("--mode"))
    run_root: Path = field(metadata=flag("--run-root"))
    ranking: Path = field(metadata=flag("--ranking"))
    onnx_path: Path = field(metadata=flag("--onnx-path"))
    full_model: Path = field(metadata=flag("--full-model"))
    baseline_metrics: Path = field(metadata=flag("--baseline-metrics"))
    budget_ap: float = field(metadata=flag("--budget-ap"))
    random_seeds: int = field(metadata=flag("--random-seeds"))
    max_probes: int = field(metadata=flag("--max-probes"))
    parallel_probes: int = field(metadata=flag("--parallel-probes"))
    build: str = field(metadata=flag("--build"))
    data_root: Path = field(metadata=flag("--data-root"))
    max_images: int = field(metadata=flag("--max-images"))
    providers: tuple[str, ...] = field(metadata=flag("--providers"))
    imgsz: int = field(metadata=flag("--imgsz"))
    k0_metrics: Path | None = field(default=None, metadata=flag("--k0-metrics"))
    random_band: bool = field(default=False, metadata=flag("--random-band"))
    confidence: float | None = field(default=None, metadata=flag("--confidence"))
    confirm_baseline_metrics: Path | None = field(default=None, metadata=flag("--confirm-baseline-metrics"))
    confirm_images: int | None = field(default=None, metadata=flag("--confirm-images"))
    confirm_skip: int | None = field(default=None, metadata=flag("--confirm-skip"))
    revert_probes: int | None = field(default=None, metadata=flag("--revert-probes"))  # None: no revert pass
    # requantized candidates only (--build requantize)
    calib_path: Path | None = field(default=None, metadata=flag("--calib-path"))
    calibration_eps: tuple[str, ...] | None = field(default=None, metadata=flag("--calibration-eps"))
    high_precision_dtype: str | None = field(default=None, metadata=flag("--high-precision-dtype"))
    calibration_method: str | None = field(default=None, metadata=flag("--calibration-method"))

    def inputs(self) -> list[Path]:
        inputs = [self.ranking, self.full_model, self.baseline_metrics, self.onnx_path, *dataset_files(self.data_root)]
        optional = (self.k0_metrics, self.confirm_baseline_metrics, self.calib_path)
        return inputs + [p for p in optional if p is not None]

    def outputs(self) -> list[Path]:
        return [self.run_root / f"search-{self.mode}" / "search.json"]

    def cites(self) -> list[Path]:
        return self.outputs()


@dataclass(frozen=True, kw_only=True)
class SchemesSettings(ScriptSettings):
    """``make_yolov10m_candidate_schemes.py``: top-K exclusion schemes from a ranking."""

    script: ClassVar[Path] = SCRIPTS / "make_yolov10m_candidate_schemes.py"

    report_json: Path = field(metadata=flag("--report-json"))
    out_dir: Path = field(metadata=flag("--out-dir"))
    onnx_path: Path = field(metadata=flag("--onnx-path"))
    ks: tuple[int, ...] = field(metadata=flag("--k"))
    overwrite: bool = field(default=True, metadata=flag("--overwrite"))
    random_control: int | None = field(default=None, metadata=flag("--random-control"))
    declared_ks: tuple[int, ...] = ()  # the K whose scheme files are declared outputs: those a later step reads

    def inputs(self) -> list[Path]:
        return [self.report_json, self.onnx_path]

    def outputs(self) -> list[Path]:
        return [self.out_dir / f"scheme_k{k}.json" for k in self.declared_ks]


@dataclass(frozen=True, kw_only=True)
class MaterializeSettings(ScriptSettings):
    """``materialize_yolov10m_lowbit_candidates.py`` as ``materialize_yolov10m_lowbit_candidates.sh`` calls it."""

    script: ClassVar[Path] = SCRIPTS / "materialize_yolov10m_lowbit_candidates.py"
    wrapper: ClassVar[Path] = SCRIPTS / "materialize_yolov10m_lowbit_candidates.sh"

    run_root: Path = field(metadata=flag("--run-root", "RUN_ROOT"))
    calib_path: Path = field(metadata=flag("--calib-path", "CALIB_PATH"))
    schemes_dir: Path = field(metadata=flag("--schemes-dir", "SCHEMES_DIR"))
    onnx_path: Path = field(metadata=flag("--onnx-path", "ONNX_PATH"))
    ks: tuple[int, ...] = field(metadata=flag("--ks", "KS"))
    quant_mode: str = field(metadata=flag("--quant-mode", "QUANT_MODE"))
    high_precision_dtype: str = field(metadata=flag("--high-precision-dtype", "HIGH_PRECISION_DTYPE"))
    data_root: Path = field(metadata=flag("--data-root", "DATA_ROOT"))
    max_images: int = field(metadata=flag("--max-images", "MAX_IMAGES"))
    providers: tuple[str, ...] = field(metadata=flag("--providers", "PROVIDERS"))
    imgsz: int = field(metadata=flag("--imgsz", "IMGSZ"))
    calibration_eps: tuple[str, ...] = field(metadata=flag("--calibration-eps", "CALIBRATION_EPS"))
    calibration_method: str | None = field(default=None, metadata=flag("--calibration-method", "CALIBRATION_METHOD"))
    evaluate: bool = field(default=True, metadata=flag("--eval", "EVAL"))
    include_random: bool = field(default=False, metadata=flag("--include-random", "INCLUDE_RANDOM"))
    overwrite: bool = field(default=True, metadata=flag("--overwrite", "OVERWRITE"))

    def inputs(self) -> list[Path]:
        schemes = [self.schemes_dir / f"scheme_k{k}.json" for k in self.ks]
        return [self.onnx_path, self.calib_path, *dataset_files(self.data_root), *schemes]

    def outputs(self) -> list[Path]:
        return [self.run_root / f"candidates-{self.quant_mode}" / "summary.json"]

    def cites(self) -> list[Path]:
        return self.outputs()


@dataclass(frozen=True, kw_only=True)
class ReportSettings(ScriptSettings):
    """``make_lowbit_report.py``: the comparison report of every evaluation in the run dir."""

    script: ClassVar[Path] = SCRIPTS / "make_lowbit_report.py"

    run_dir: Path = field(metadata=flag("--run-dir"))
    out_dir: Path = field(metadata=flag("--out-dir"))
    budget_ap: float = field(metadata=flag("--budget-ap"))
    overwrite: bool = field(default=True, metadata=flag("--overwrite"))
    evaluated: tuple[Path, ...] = ()  # the metrics files and records it reads (found in the run dir by the script)
    records: tuple[Path, ...] = ()  # the searches' and candidates' records among them, with the files they name
    search_curves: bool = False  # a budget search ran: the report draws its curves

    def inputs(self) -> list[Path]:
        return list(self.evaluated)

    def outputs(self) -> list[Path]:
        names = ["report.md", "report.json", "pareto.png"] + (["search-curves.png"] if self.search_curves else [])
        return [self.out_dir / name for name in names]

    def cites(self) -> list[Path]:
        return list(self.records)
