"""The budget search's candidates: each built once, evaluated, and reused by content (:class:`CandidateStore`).

A candidate is the mode's Q/DQ model with the top-K ranked nodes in float, built the store's way
(``full`` or ``requantize``, :mod:`lowbit.candidates_build`) and evaluated on the evaluation slice.

Files, under ``run_root`` (names the report reads: ``-k{K}`` / ``-k{K}_random{SEED}``):

    onnx/<model>-<mode>-k{K}[_random{SEED}].onnx            the candidate (K = 0: the full model itself)
    onnx/<model>-<mode>-k{K}[_random{SEED}].inputs.json     what it was built from (``full_model``: the path of
                                                            the full model) and evaluated with
    <mode>-k{K}[_random{SEED}]-coco/metrics.json            its evaluation (``lowbit.evaluate``)

The record (``kind`` "candidate", ``schema_version`` 2; see docs/records.md) is keyed by content, never by a
path: ``build`` {``method``, ``full_model_sha256``, ``nodes``, and for ``requantize`` ``onnx_sha256``,
``calib_sha256``, ``quantize``},
``evaluation`` (:meth:`EvalConfig.content`: ``ann_sha256``, ``image_ids_sha256``, ``num_images``,
``max_images``, ``imgsz``, ``providers``, the postprocessing thresholds ...), ``model_sha256`` and
``metrics_sha256``. A candidate is reused without running anything when all of these match this run's and
its metrics.json itself says it scored that model on those images of that annotation file; anything else
is rebuilt and evaluated again, with a log line naming what differs (an annotation file edited in place
is thus noticed, the same ``--data-root`` notwithstanding; a record or metrics.json that names no ``kind``,
written before records named their kind, is foreign and its candidate evaluated again).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lowbit import records
from lowbit.candidates_build import BUILDS, RequantizeConfig, build_from_full_model, build_requantized
from lowbit.errors import UserError
from lowbit.logs import get_logger
from lowbit.runs import atomic_write_json, sha256_file
from lowbit.schemes import candidate_tag

__all__ = [
    "RECORD_KIND",
    "RECORD_SCHEMA_VERSION",
    "CandidateStore",
    "DatasetKey",
    "EvalConfig",
    "Evaluated",
    "candidate_files",
    "candidate_name",
    "dataset_key",
    "evaluate_in_worker",
    "inputs_record_path",
    "map_of",
    "metrics_mismatch",
    "read_map",
    "record_or_reason",
]

log = get_logger("candidates")

RECORD_KIND = "candidate"  # the record beside a search candidate
RECORD_SCHEMA_VERSION = records.SCHEMA_VERSIONS[RECORD_KIND]


@dataclass
class EvalConfig:
    """Evaluation settings of every candidate (``lowbit.evaluate.EvalSettings`` fields)."""

    data_root: Path
    max_images: int
    providers: list[str] = field(default_factory=lambda: ["CPUExecutionProvider"])
    imgsz: int = 640
    warmup_runs: int = 10
    skip_latency: int = 10
    # Probes only need accuracy: cuDNN's heuristic pick skips the seconds of algorithm benchmarking per
    # candidate session (6.6 s -> 3.0 s first run for the INT8 demo model on an H200, same p50).
    cudnn_conv_algo_search: str = "HEURISTIC"
    skip_images: int = 0  # image ids left out before max_images counts (a confirmation slice)
    sessions: int = 1  # ORT sessions side by side (CPU EP; lowbit.evaluate_prepare.auto_sessions): same detections

    @classmethod
    def from_args(cls, args, **settings) -> EvalConfig:
        """From the evaluation flags of the scripts that evaluate candidates (``--data-root``, ``--max-images``,
        ``--providers``, ``--imgsz``, ``--warmup-runs``, ``--skip-latency``); ``settings``: the other fields."""
        return cls(
            args.data_root,
            args.max_images,
            list(args.providers),
            args.imgsz,
            args.warmup_runs,
            args.skip_latency,
            **settings,
        )

    def record(self) -> dict[str, Any]:
        out = asdict(self)
        out["data_root"] = str(self.data_root)
        return out

    def eval_settings(self, onnx_path: Path, out: Path | None = None):
        """The :class:`lowbit.evaluate.EvalSettings` of one candidate's evaluation."""
        from lowbit.evaluate import EvalSettings

        return EvalSettings(
            onnx_path=onnx_path,
            data_root=self.data_root,
            max_images=self.max_images,
            skip_images=self.skip_images,
            providers=list(self.providers),
            warmup_runs=self.warmup_runs,
            skip_latency=self.skip_latency,
            imgsz=self.imgsz,
            cudnn_conv_algo_search=self.cudnn_conv_algo_search,
            sessions=self.sessions,
            out=out,
            overwrite=True,
        )

    def postprocess(self) -> dict[str, Any]:
        """The evaluator's postprocessing of every candidate: its defaults (the search does not change them)."""
        defaults = self.eval_settings(Path("model.onnx"))
        return {"nms": defaults.nms, "conf": defaults.conf, "iou": defaults.iou, "max_det": defaults.max_det}

    def content(self, dataset: DatasetKey) -> dict[str, Any]:
        """What an evaluation's numbers depend on, by content: the images (annotation file sha256, image ids)
        and every setting but the folder the data lives in; the postprocessing is recorded so that a change of
        the evaluator's defaults is noticed."""
        out = {key: value for key, value in asdict(self).items() if key != "data_root"}
        out.update(
            ann_sha256=dataset.ann_sha256,
            image_ids_sha256=dataset.image_ids_sha256,
            num_images=len(dataset.image_ids),
            postprocess=self.postprocess(),
        )
        return out


@dataclass(frozen=True)
class DatasetKey:
    """The evaluation slice by content: sha256 of the annotation file and the image ids selected from it."""

    ann_file: Path
    ann_sha256: str
    image_ids: tuple[int, ...]

    @property
    def image_ids_sha256(self) -> str:
        return records.image_ids_sha256(self.image_ids)


def dataset_key(evaluation: EvalConfig, flag: str = "--data-root") -> DatasetKey:
    """Read ``evaluation``'s annotation file (the evaluator's paths and checks) and select its image ids.

    Raises:
        UserError(flag): no ``--data-root``, no image folder, or a missing or malformed annotation file.
    """
    from lowbit.coco_eval import load_coco, select_image_ids
    from lowbit.evaluate import resolve_data_paths

    _, ann_file, ann_flag = resolve_data_paths(evaluation.eval_settings(Path("model.onnx")))
    coco = load_coco(ann_file, ann_flag)
    return DatasetKey(
        ann_file, sha256_file(ann_file), tuple(select_image_ids(coco, evaluation.max_images, evaluation.skip_images))
    )


@dataclass
class Evaluated:
    """One evaluated candidate: ``k`` float nodes (``nodes``), ``map50_95`` (0..1) and its files."""

    name: str
    k: int
    nodes: list[str]
    random_seed: int | None
    map50_95: float
    model_path: Path
    metrics_path: Path
    reused: bool
    model_sha256: str | None = None
    metrics_sha256: str | None = None

    @property
    def ap(self) -> float:
        """mAP50-95 in AP points (x 100), the unit of ``--budget-ap``."""
        return self.map50_95 * 100.0


def candidate_name(mode: str, k: int, random_seed: int | None = None) -> str:
    """``<mode>-k{K}`` or ``<mode>-k{K}_random{SEED}``."""
    return f"{mode}-{candidate_tag(k, random_seed)}"


def candidate_files(run_root: Path, model_stem: str, name: str) -> tuple[Path, Path]:
    """``(model, metrics)`` of candidate ``name``: ``onnx/<model>-<name>.onnx`` and ``<name>-coco/metrics.json``."""
    return run_root / "onnx" / f"{model_stem}-{name}.onnx", run_root / f"{name}-coco" / "metrics.json"


def inputs_record_path(model_path: Path) -> Path:
    """``<model stem>.inputs.json``: a candidate's record, beside the model it describes (where the report looks)."""
    return model_path.with_suffix(".inputs.json")


def read_map(metrics_path: Path, flag: str) -> float:
    """``metrics.map50_95`` of an evaluator ``metrics.json`` (0..1), a finite number, or one UserError naming ``flag``."""
    return map_of(records.read_record(metrics_path, "metrics", flag=flag), metrics_path, flag)


def map_of(metrics: dict[str, Any], path: Path, flag: str) -> float:
    """``metrics.map50_95`` of a metrics record read from ``path``: finite, else one UserError naming ``flag``."""
    value = (metrics.get("metrics") or {}).get("map50_95") if isinstance(metrics.get("metrics"), dict) else None
    return records.require_finite(f"{flag}: {path}", "metrics.map50_95", value, flag=flag)


def metrics_mismatch(metrics: dict[str, Any], model_sha256: str, dataset: DatasetKey) -> str | None:
    """What in a metrics record disagrees with "this model on these images", or None when nothing does."""
    scored = records.dataset_provenance(metrics)
    if (metrics.get("model") or {}).get("sha256") != model_sha256:
        return "its metrics.json scored another model file"
    if scored["ann_sha256"] != dataset.ann_sha256:
        return "the annotation file changed since it was scored"
    if scored["image_ids_sha256"] != dataset.image_ids_sha256:
        return "it was scored on other images"
    return None


def record_or_reason(path: Path, kind: str = RECORD_KIND) -> tuple[dict | None, str | None]:
    """``(record, None)``: the record of ``kind`` beside a candidate; ``(None, why not)`` when it is missing,
    unreadable, names no kind or another one, or is of another schema version (:func:`lowbit.records.read_record`)."""
    try:
        return records.read_record(path, kind), None
    except UserError as e:
        return None, str(e)


def evaluate_in_worker(settings, then: Callable[[Path], None] | None = None) -> None:
    """:func:`lowbit.evaluate.evaluate` in a worker process: its log goes to the run's eval.log, warnings to stderr.

    ``then(metrics_path)``, when given, runs next in the same worker (e.g. the candidate's paired interval,
    :func:`lowbit.search_confirm.interval_in_worker`).
    """
    from lowbit.evaluate import evaluate

    evaluate(settings)
    if then is not None:
        then(Path(settings.out))


class CandidateStore:
    """Builds and evaluates the candidates of one mode, reusing those already evaluated with the same inputs.

    "The same inputs" is decided by content (the module docstring's record): the sha256 of the full model,
    the candidate model, its metrics, the annotation file and the image ids, and the evaluation settings;
    never by the paths they were read from.

    Args:
        run_root: the run directory (files as in the module docstring).
        mode: ``int8`` or ``fp8`` (names the files).
        model_stem: ``<model>`` in the file names (the FP32 model's stem).
        full_model: the calibrated Q/DQ model of the mode (every node quantized).
        evaluation: evaluation settings.
        build: ``full`` or ``requantize``.
        requantize: needed with ``build="requantize"``.
        suffix: appended to ``<mode>-k{K}`` in file names (e.g. ``-requant`` for a comparison).
        executor: a ``concurrent.futures`` process pool that runs the evaluations (None: in this
            process). With one, :meth:`evaluate` may be called from several threads at once: each
            candidate is built in the calling thread and evaluated in a worker process.
        dataset: the evaluation slice by content (None: read from ``evaluation`` on first use).
        full_sha256: sha256 of ``full_model`` when the caller has it (None: computed on first use).
        slice_tag: evaluate on another image slice (e.g. ``confirm``): the models are the same files as
            without it, the metrics go to ``<name>-<tag>-coco/`` with the record beside them.
        then: with an ``executor``, a picklable ``then(metrics_path)`` run in the worker after each evaluation.
    """

    def __init__(
        self,
        run_root: Path,
        mode: str,
        model_stem: str,
        full_model: Path,
        evaluation: EvalConfig,
        build: str = "full",
        requantize: RequantizeConfig | None = None,
        suffix: str = "",
        executor=None,
        dataset: DatasetKey | None = None,
        full_sha256: str | None = None,
        slice_tag: str = "",
        then: Callable[[Path], None] | None = None,
    ):
        if build not in BUILDS:
            raise UserError(f"--build must be one of {', '.join(BUILDS)}, got {build!r}", flag="--build")
        if build == "requantize" and requantize is None:
            raise UserError("--build requantize needs the FP32 model and calibration tensor", flag="--calib-path")
        self.run_root, self.mode, self.stem = Path(run_root), mode, model_stem
        self.full_model, self.evaluation, self.build, self.requantize = Path(full_model), evaluation, build, requantize
        self.suffix, self.slice_tag = suffix, slice_tag
        self.executor = executor  # a process pool: evaluations run there, so that several run at once
        self.then = then  # run in the worker after each evaluation there (evaluate_in_worker)
        self._full_sha: str | None = full_sha256
        self._dataset: DatasetKey | None = dataset
        self._full_proto = None
        self._lock = threading.Lock()

    @property
    def full_sha(self) -> str:
        if self._full_sha is None:
            self._full_sha = sha256_file(self.full_model)
        return self._full_sha

    @property
    def dataset(self) -> DatasetKey:
        with self._lock:
            if self._dataset is None:
                self._dataset = dataset_key(self.evaluation)
        return self._dataset

    def paths(self, k: int, random_seed: int | None = None) -> tuple[str, Path, Path]:
        """``(name, model path, metrics path)`` of a candidate."""
        name = candidate_name(self.mode, k, random_seed) + self.suffix
        model, metrics = candidate_files(self.run_root, self.stem, name)
        if self.slice_tag:
            metrics = self.run_root / f"{name}-{self.slice_tag}-coco" / "metrics.json"
        if k == 0 and self.build == "full":
            model = self.full_model  # nothing to remove: the full model is the K=0 candidate
        elif model.resolve() == Path(self.full_model).resolve():  # a rebuild never overwrites the search's input
            model = model.with_name(f"{self.stem}-{name}-{self.build}.onnx")
        return name, model, metrics

    def _build_record(self, nodes: list[str]) -> dict[str, Any]:
        record: dict[str, Any] = {"method": self.build, "full_model_sha256": self.full_sha, "nodes": list(nodes)}
        if self.build == "requantize":
            rq = self.requantize
            record.update(
                onnx_sha256=sha256_file(rq.onnx_path),
                calib_sha256=sha256_file(rq.calib_path),
                quantize={
                    "mode": self.mode,
                    "calibration_method": rq.calibration_method,
                    "calibration_eps": list(rq.calibration_eps),
                    "high_precision_dtype": rq.high_precision_dtype,
                },
            )
        return record

    def stale_reason(self, record_path: Path, model: Path, metrics: Path, build: dict, evaluation: dict) -> str | None:
        """Why the candidate on disk cannot be reused (None: it can), each input compared by content."""
        if not record_path.exists():
            return "not evaluated before"
        record, why = record_or_reason(record_path)
        if record is None:
            return f"no usable record of its inputs ({why})"
        recorded_build = record.get("build") or {}
        if recorded_build != build:
            if recorded_build.get("full_model_sha256") != build["full_model_sha256"]:
                return "the full model changed"
            if recorded_build.get("nodes") != build["nodes"]:
                return "other nodes in float"
            return "other re-quantization inputs"
        recorded_eval = record.get("evaluation") or {}
        if recorded_eval != evaluation:
            if "ann_sha256" not in recorded_eval:
                return "its record names the data by path, not by content"
            if recorded_eval.get("ann_sha256") != evaluation["ann_sha256"]:
                return "the annotation file changed"
            if recorded_eval.get("image_ids_sha256") != evaluation["image_ids_sha256"]:
                return "other evaluation images"
            keys = sorted(key for key in evaluation if recorded_eval.get(key) != evaluation[key])
            return f"other evaluation settings ({', '.join(keys) or 'keys'})"
        if not model.is_file() or record.get("model_sha256") != sha256_file(model):
            return "its model file changed"
        if not metrics.is_file() or record.get("metrics_sha256") != sha256_file(metrics):
            return "its metrics file changed"
        try:
            scored = records.read_record(metrics, "metrics")
        except UserError as e:
            return str(e)
        return metrics_mismatch(scored, record["model_sha256"], self.dataset)

    def evaluate(self, nodes: list[str], random_seed: int | None = None) -> Evaluated:
        """Build (if needed) and evaluate the candidate with ``nodes`` in float; cached by its record."""
        k = len(nodes)
        name, model, metrics = self.paths(k, random_seed)
        record_path = inputs_record_path(model)
        if self.slice_tag:  # the model's own record describes its search-slice evaluation
            record_path = metrics.parent / "candidate.inputs.json"
        elif model == self.full_model:  # K=0 of a full build: the record must not pass for the full model's own
            record_path = inputs_record_path(candidate_files(self.run_root, self.stem, name)[0])
        build, evaluation = self._build_record(nodes), self.evaluation.content(self.dataset)
        why = self.stale_reason(record_path, model, metrics, build, evaluation)
        if why is None:
            record, _ = record_or_reason(record_path)
            log.info("%s: evaluated before with these inputs (by sha256), reused (%s)", name, metrics)
            ap, shas = read_map(metrics, "candidate metrics"), (record["model_sha256"], record["metrics_sha256"])
            return Evaluated(name, k, list(nodes), random_seed, ap, model, metrics, True, *shas)
        log.info("%s: %s; building and evaluating it", name, why)
        record_path.unlink(missing_ok=True)  # a failed rebuild must not leave the old record looking current
        # another slice's store evaluates the model the search slice's store has just built or checked
        if model != self.full_model and not (self.slice_tag and model.is_file()):
            self._write_model(nodes, model)
        log.info("%s: evaluating %s (%d nodes in float)", name, model, k)
        scored, model_sha, metrics_sha = self._evaluate(name, model, metrics)
        record = {
            **records.header(RECORD_KIND),
            "candidate": name,
            "build": build,
            "full_model": str(self.full_model),
            "ranking_nodes": list(nodes),
            "random_seed": random_seed,
            "evaluation": evaluation,
            "model_sha256": model_sha,
            "metrics_sha256": metrics_sha,
        }
        atomic_write_json(record_path, record)
        ap = map_of(scored, metrics, "candidate metrics")
        return Evaluated(name, k, list(nodes), random_seed, ap, model, metrics, False, model_sha, metrics_sha)

    def _evaluate(self, name: str, model: Path, metrics: Path) -> tuple[dict[str, Any], str, str]:
        """Evaluate ``model`` into ``metrics`` (here or in a worker); its metrics record and both files' sha256."""
        from lowbit.evaluate import evaluate

        settings = self.evaluation.eval_settings(model, metrics)
        if self.executor is None:
            evaluate(settings)
        else:
            # re-raises the worker's error here
            self.executor.submit(evaluate_in_worker, settings, self.then).result()
        model_sha, metrics_sha = sha256_file(model), sha256_file(metrics)
        scored = records.read_record(metrics, "metrics", flag="candidate metrics")
        changed = metrics_mismatch(scored, model_sha, self.dataset)
        if changed:  # e.g. the annotation file was replaced while the search ran
            raise UserError(
                f"--data-root: the evaluation of {name} ({metrics}) does not match this search: {changed}; "
                "did the dataset change while the search ran? Run it again",
                flag="--data-root",
            )
        return scored, model_sha, metrics_sha

    def _write_model(self, nodes: list[str], model: Path) -> None:
        model.parent.mkdir(parents=True, exist_ok=True)
        if self.build == "full":
            build_from_full_model(self._full(), nodes, model)
        else:
            build_requantized(self.requantize, self.mode, nodes, model)

    def _full(self):
        import onnx

        with self._lock:
            if self._full_proto is None:
                self._full_proto = onnx.load(str(self.full_model))
        return self._full_proto
