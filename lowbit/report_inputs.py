"""What the comparison report may use, checked against the FP32 baseline; what it may not, with the reason.

Every file is read through :mod:`lowbit.records`, so a missing, truncated, non-finite or foreign file (one
that names another ``kind``, or none: written before records named their kind) ends in one
:class:`~lowbit.errors.UserError` that names it. The records and these rules are in docs/records.md.
:func:`lowbit.report_collect.collect_variants` turns that error into one of two outcomes:

* **dropped**: one variant's ``metrics.json`` or one ``search.json`` is left out of the report and listed
  under ``dropped`` [{path, reason}] in report.json and report.md (and logged as a warning);
* **error**: the FP32 baseline's metrics are unusable, no quantized variant is left, or the annotation
  file the run was scored on has changed since (every number would be about the old annotations).

The reference (:class:`Reference`) is the FP32 baseline's metrics: model sha256, annotation sha256,
image-id digest (:func:`lowbit.records.dataset_provenance`) and post-processing. A variant is used only
when :func:`variant_problem` finds nothing: same annotations, images and post-processing as the
baseline, its model file still the one it was evaluated on (:func:`find_model_file`), and, when its
quantizer manifest or candidate record names one, quantized from the baseline's model. A ``search.json``
is used only when :func:`lowbit.report_search_check.read_search` finds it to be a search of this run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lowbit import records
from lowbit.errors import UserError
from lowbit.runs import REPO_ROOT, resolve_repo_path, sha256_file
from lowbit.search_revert import REVERT_DIR

if TYPE_CHECKING:  # lowbit.report_variant imports this module
    from lowbit.report_variant import Variant

__all__ = [
    "ANNOTATIONS",
    "Hasher",
    "MetricsFile",
    "Reference",
    "check_annotations",
    "drop",
    "find_metrics",
    "find_model_file",
    "model_places",
    "read_metrics",
    "rel_path",
    "variant_problem",
    "verified_annotations",
]

ANNOTATIONS = Path("annotations") / "instances_val2017.json"  # under a COCO-layout --data-root


def rel_path(path: Path | str) -> str:
    """Path as the user typed it when under the repo root, else absolute."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path.resolve())


def drop(dropped: list[dict], path: Path | str, reason: str) -> None:
    """Record that the file at ``path`` is left out of the report, and why."""
    dropped.append({"path": rel_path(path), "reason": reason})


class Hasher:
    """sha256 of files by resolved path, each file hashed once per report (models are large)."""

    def __init__(self) -> None:
        self._cache: dict[Path, str] = {}

    def __call__(self, path: Path) -> str:
        key = Path(path).resolve()
        if key not in self._cache:
            self._cache[key] = sha256_file(key)
        return self._cache[key]


# ----------------------------------------------------------------------------------------------------------------------
# evaluations


@dataclass
class MetricsFile:
    """One ``metrics.json`` found under a run dir: its record, or why it cannot be read."""

    path: Path
    run_dir: Path
    record: dict | None
    error: str | None = None
    is_float: bool = False  # of a model without Q/DQ (or, unreadable, in a baseline* folder): the baseline's kind


def read_metrics(path: Path) -> dict:
    """An evaluator ``metrics.json`` (a record of kind ``metrics``) every number of which is finite, or UserError
    naming the file."""
    record = records.read_record(path, "metrics")
    if record.get("status") != "ok":
        raise UserError(f"{path} has status {record.get('status')!r}: the evaluation did not finish", flag=str(path))
    where = records.find_non_finite(record)
    if where:
        raise UserError(f"{path}: {where} is not a finite number", flag=str(path))
    try:
        for key in ("map50_95", "map50"):
            records.require_finite(path, f"metrics.{key}", record["metrics"][key])
        model, dataset = record["model"], record["dataset"]
        if not (isinstance(model["path"], str) and isinstance(model["sha256"], str)):
            raise TypeError("model.path and model.sha256 must be strings")
        ids = dataset["image_ids"]
        if not (isinstance(ids, list) and all(isinstance(i, int) for i in ids)):
            raise TypeError("dataset.image_ids must be a list of integers")
        for section in (model["qdq"], *(record.get(k) or {} for k in ("postprocess", "latency_ms", "providers"))):
            if not isinstance(section, dict):
                raise TypeError("model.qdq, postprocess, latency_ms and providers must be JSON objects")
    except (KeyError, TypeError) as e:
        raise UserError(f"{path} is not a complete metrics record ({type(e).__name__}: {e})", flag=str(path)) from e
    return record


def _classify_unreadable(path: Path) -> bool:
    """Whether an unusable ``metrics.json`` looks like the FP32 baseline's (then the report cannot go on)."""
    try:  # a NaN still parses this way and says what it was the evaluation of
        data = records.read_json(path, allow_non_finite=True)
        return not bool(((data.get("model") or {}).get("qdq") or {}).get("is_qdq"))
    except (UserError, AttributeError, TypeError):
        return path.parent.name.startswith("baseline")  # truncated: the workflow's folder name is all there is


def find_metrics(run_dirs: list[Path]) -> list[MetricsFile]:
    """Every ``metrics.json`` under ``run_dirs`` (symlinks followed, each file once), read and classified.

    A file that parses as JSON and is no metrics record (:func:`_is_other_file`: a training run's ``metrics.json``)
    is no evaluation and is skipped; anything else that cannot be used (truncated, non-finite, no ``kind``,
    another schema version, incomplete) comes back with its ``error``.
    """
    found, seen = [], set()
    for run_dir in run_dirs:
        for path in _walk_metrics(run_dir):
            if path.resolve() in seen:  # nested or repeated run dirs
                continue
            seen.add(path.resolve())
            try:
                record = read_metrics(path)
            except UserError as e:
                try:
                    data = records.read_json(path, allow_non_finite=True)
                except UserError:
                    data = None
                if data is not None and _is_other_file(data):
                    continue  # parses, and is no evaluation (a training run's metrics.json, say)
                found.append(MetricsFile(path, run_dir, None, str(e), _classify_unreadable(path)))
                continue
            found.append(MetricsFile(path, run_dir, record, None, not record["model"].get("qdq", {}).get("is_qdq")))
    return found


def _is_other_file(data: Any) -> bool:
    """Whether a parsed ``metrics.json`` is some other file than a metrics record: a record of another kind, or
    no record at all (no ``kind``, no ``schema_version``: a training run's metrics). A record without ``kind`` but
    with a ``schema_version`` was written before records named their kind: it is reported, not skipped."""
    if not isinstance(data, dict):
        return True
    if "kind" in data:
        return data["kind"] != "metrics"
    return "schema_version" not in data


def _walk_metrics(run_dir: Path) -> list[Path]:
    candidates, visited = [], set()
    # followlinks: a run dir may hold symlinks to evaluations made elsewhere.
    for root, dirs, files in os.walk(run_dir, followlinks=True):
        real = os.path.realpath(root)
        if real in visited:  # a link back up the tree
            dirs.clear()
            continue
        visited.add(real)
        if Path(root).name.startswith("search-") and REVERT_DIR in dirs:  # a search's tries (lowbit.report_revert)
            dirs.remove(REVERT_DIR)
        if "metrics.json" in files:
            candidates.append(Path(root) / "metrics.json")
    return sorted(candidates)


def model_places(model_path: str, metrics_path: Path, run_dir: Path) -> list[Path]:
    """Where a recorded model may be now, in order: the recorded path from the cwd, from the repo root, then
    ``onnx/<name>`` of the run dir and of the folder above ``metrics_path``'s folder."""
    recorded = Path(model_path)
    places = [recorded] + ([REPO_ROOT / recorded] if not recorded.is_absolute() else [])
    return places + [run_dir / "onnx" / recorded.name, metrics_path.parent.parent / "onnx" / recorded.name]


def find_model_file(
    model_path: str, sha: str, metrics_path: Path, run_dir: Path, hasher: Hasher
) -> tuple[Path | None, str | None]:
    """``(file, None)``: where the evaluated model is now (:func:`model_places`), with the sha256 it was
    evaluated with; ``(None, why)`` when no such file."""
    existing = [p for p in model_places(model_path, metrics_path, run_dir) if p.is_file()]
    for candidate in existing:
        if hasher(candidate) == sha:
            return candidate, None
    if not existing:
        return None, f"model file changed since it was evaluated: {model_path} no longer exists"
    now = hasher(existing[0])
    return None, (
        f"model file changed since it was evaluated: {rel_path(existing[0])} has sha256 {now[:12]} "
        f"({existing[0].stat().st_size} bytes), the evaluation was of sha256 {sha[:12]}"
    )


@dataclass(frozen=True)
class Reference:
    """The FP32 baseline's metrics: what every other record must have been computed from."""

    metrics_path: Path
    ap: float  # mAP50-95 x 100, AP points
    model_sha256: str
    ann_sha256: str | None
    image_ids_sha256: str
    num_images: int
    image_ids: list[int]
    postprocess: dict
    fp32_metrics_sha256: frozenset[str] = field(default_factory=frozenset)  # the baseline's file and its repeats'

    @classmethod
    def of(cls, baseline: Variant) -> Reference:
        ds = records.dataset_provenance({"dataset": baseline.source.dataset})
        return cls(
            baseline.source.metrics_file,
            baseline.map50_95 * 100.0,
            baseline.model_sha256,
            ds["ann_sha256"],
            ds["image_ids_sha256"],
            ds["num_images"],
            list(baseline.source.dataset.get("image_ids") or []),
            _postprocess(baseline),
        )


def _postprocess(variant: Variant) -> dict:
    pp = variant.source.postprocess
    return {k: pp.get(k) for k in ("mode", "conf", "iou", "max_det", "imgsz")}


def _ids_text(ids: list) -> str:
    return f"{len(ids)} images" + (f", ids {ids[0]}..{ids[-1]}" if ids else "")


def variant_problem(v: Variant, ref: Reference) -> str | None:
    """Why evaluation ``v`` cannot be compared with the baseline, or None when it can."""
    base = rel_path(ref.metrics_path)
    dataset = v.source.dataset
    ds = records.dataset_provenance({"dataset": dataset})
    if ds["ann_sha256"] != ref.ann_sha256:
        return (
            f"scored on annotations sha256 {str(ds['ann_sha256'])[:12]} ({dataset.get('ann_file')}), "
            f"the FP32 baseline {base} on sha256 {str(ref.ann_sha256)[:12]}"
        )
    if ds["image_ids_sha256"] != ref.image_ids_sha256:
        return (
            f"scored on other images ({_ids_text(dataset.get('image_ids') or [])}) than the FP32 baseline "
            f"{base} ({_ids_text(ref.image_ids)})"
        )
    if _postprocess(v) != ref.postprocess:
        return f"post-processing {_postprocess(v)} differs from the FP32 baseline {base}'s {ref.postprocess}"
    if v.source.model_problem:
        return v.source.model_problem
    source = v.source_model_sha256
    if source and source != ref.model_sha256:
        return (
            f"quantized from model sha256 {source[:12]} (per {v.model_manifest}), not from the FP32 "
            f"baseline's model (sha256 {ref.model_sha256[:12]}, {base})"
        )
    return None


def _annotation_places(
    ref: Reference, recorded_ann: str | None, run_dirs: list[Path], data_root: Path | None
) -> tuple[list[tuple[Path, str]], list[str]]:
    """Where the run's annotation file may be, with the source that names it, and notes on what could not be read."""
    if data_root is not None:
        ann = resolve_repo_path(data_root) / ANNOTATIONS
        if not ann.is_file():
            raise UserError(f"--data-root: {ann} does not exist", flag="--data-root")
        return [(ann, "--data-root")], []
    places, notes = [], []
    for run_dir in run_dirs:
        workflow = run_dir / "workflow.json"
        if workflow.is_file():
            try:
                root = (records.read_json(workflow).get("args") or {}).get("data_root")
            except (UserError, AttributeError) as e:
                notes.append(f"the annotation file it names could not be checked: {e}")
                continue
            if root:
                places.append((resolve_repo_path(root) / ANNOTATIONS, f"{rel_path(workflow)} data_root"))
    if recorded_ann:
        places.append((resolve_repo_path(recorded_ann), f"{rel_path(ref.metrics_path)} dataset.ann_file"))
    return places, notes


def verified_annotations(
    ref: Reference, recorded_ann: str | None, run_dirs: list[Path], data_root: Path | None, hasher: Hasher
) -> Path | None:
    """The first annotation file of :func:`check_annotations`' places that has the baseline's ``ann_sha256`` (the
    ground truth the intervals are computed on), or None when none is found."""
    places, _ = _annotation_places(ref, recorded_ann, run_dirs, data_root)
    for ann, _source in places:
        if ann.is_file() and hasher(ann) == ref.ann_sha256:
            return ann
    return None


def check_annotations(
    ref: Reference, recorded_ann: str | None, run_dirs: list[Path], data_root: Path | None, hasher: Hasher
) -> list[str]:
    """Raise UserError when the annotation file of the run no longer has the sha256 the baseline was scored on.

    The file is ``DATA_ROOT/annotations/instances_val2017.json`` of ``--data-root`` when given (it must exist),
    else that of each run dir's ``workflow.json`` ``args.data_root`` and the baseline's ``dataset.ann_file``,
    those that exist. Returns notes on what could not be checked.
    """
    places, notes = _annotation_places(ref, recorded_ann, run_dirs, data_root)
    checked = set()
    for ann, source in places:
        if ann.resolve() in checked:
            continue
        checked.add(ann.resolve())
        if not ann.is_file():
            notes.append(
                f"annotation file {ann} (from {source}) not found: that the annotations are unchanged "
                "since the evaluations were not checked"
            )
            continue
        now = hasher(ann)
        if now != ref.ann_sha256:
            flag = "--data-root" if source == "--data-root" else str(ann)
            raise UserError(
                f"{ann} changed since the run was scored: sha256 now {now[:12]}, but the FP32 baseline "
                f"{rel_path(ref.metrics_path)} and every variant were scored on sha256 {str(ref.ann_sha256)[:12]}; "
                "evaluate again on the current annotations (or pass --data-root with the annotations of the run)",
                flag=flag,
            )
    return notes
