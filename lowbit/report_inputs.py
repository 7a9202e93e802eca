"""What the comparison report may use, checked against the FP32 baseline; what it may not, with the reason.

Every file is read through :mod:`lowbit.records`, so a missing, truncated, non-finite or foreign file (one
that names another ``kind``, or none: written before records named their kind) ends in one
:class:`~lowbit.errors.UserError` that names it. The records and these rules are in docs/records.md. :func:`lowbit.report.collect_variants` turns
that error into one of two outcomes:

* **dropped**: one variant's ``metrics.json`` or one ``search.json`` is left out of the report and listed
  under ``dropped`` [{path, reason}] in report.json and report.md (and logged as a warning);
* **error**: the FP32 baseline's metrics are unusable, no quantized variant is left, or the annotation
  file the run was scored on has changed since (every number would be about the old annotations).

The reference (:class:`Reference`) is the FP32 baseline's metrics: model sha256, annotation sha256,
image-id digest (:func:`lowbit.records.dataset_provenance`) and post-processing. A variant is used only
when :func:`variant_problem` finds nothing: same annotations, images and post-processing as the
baseline, its model file still the one it was evaluated on (:func:`find_model_file`), and, when its
quantizer manifest or candidate record names one, quantized from the baseline's model. A ``search.json``
is used only when :func:`read_search` finds it to be a search of this run.
"""

from __future__ import annotations

import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowbit import records
from lowbit.errors import UserError
from lowbit.runs import REPO_ROOT, resolve_repo_path, sha256_file

# Two AP values (AP points, mAP50-95 x 100) closer than this are equal: half the last digit the report shows
# (ΔAP +0.00), so a writer that rounds its numbers is not taken for a tampered one.
AP_TOL = 0.005
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
        if "metrics.json" in files:
            candidates.append(Path(root) / "metrics.json")
    return sorted(candidates)


def find_model_file(
    model_path: str, sha: str, metrics_path: Path, run_dir: Path, hasher: Hasher
) -> tuple[Path | None, str | None]:
    """``(file, None)``: where the evaluated model is now (the recorded path from the cwd or the repo root, else
    ``onnx/<name>`` of the run dir), with the sha256 it was evaluated with; ``(None, why)`` when no such file."""
    recorded = Path(model_path)
    places = [recorded] + ([REPO_ROOT / recorded] if not recorded.is_absolute() else [])
    places += [run_dir / "onnx" / recorded.name, metrics_path.parent.parent / "onnx" / recorded.name]
    existing = [p for p in places if p.is_file()]
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


@dataclass
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
    fp32_metrics_sha256: set[str] = field(default_factory=set)  # the baseline's file and its repeats'

    @classmethod
    def of(cls, baseline: dict) -> Reference:
        ds = records.dataset_provenance({"dataset": baseline["_dataset"]})
        return cls(
            baseline["_metrics_file"],
            baseline["map50_95"] * 100.0,
            baseline["model_sha256"],
            ds["ann_sha256"],
            ds["image_ids_sha256"],
            ds["num_images"],
            list(baseline["_dataset"].get("image_ids") or []),
            _postprocess(baseline),
        )


def _postprocess(variant: dict) -> dict:
    pp = variant["_postprocess"]
    return {k: pp.get(k) for k in ("mode", "conf", "iou", "max_det", "imgsz")}


def _ids_text(ids: list) -> str:
    return f"{len(ids)} images" + (f", ids {ids[0]}..{ids[-1]}" if ids else "")


def variant_problem(v: dict, ref: Reference) -> str | None:
    """Why evaluation ``v`` cannot be compared with the baseline, or None when it can."""
    base = rel_path(ref.metrics_path)
    ds = records.dataset_provenance({"dataset": v["_dataset"]})
    if ds["ann_sha256"] != ref.ann_sha256:
        return (
            f"scored on annotations sha256 {str(ds['ann_sha256'])[:12]} ({v['_dataset'].get('ann_file')}), "
            f"the FP32 baseline {base} on sha256 {str(ref.ann_sha256)[:12]}"
        )
    if ds["image_ids_sha256"] != ref.image_ids_sha256:
        return (
            f"scored on other images ({_ids_text(v['_dataset'].get('image_ids') or [])}) than the FP32 baseline "
            f"{base} ({_ids_text(ref.image_ids)})"
        )
    if _postprocess(v) != ref.postprocess:
        return f"post-processing {_postprocess(v)} differs from the FP32 baseline {base}'s {ref.postprocess}"
    if v["_model_problem"]:
        return v["_model_problem"]
    source = v["source_model_sha256"]
    if source and source != ref.model_sha256:
        return (
            f"quantized from model sha256 {source[:12]} (per {v['model_manifest']}), not from the FP32 "
            f"baseline's model (sha256 {ref.model_sha256[:12]}, {base})"
        )
    return None


def check_annotations(
    ref: Reference, recorded_ann: str | None, run_dirs: list[Path], data_root: Path | None, hasher: Hasher
) -> list[str]:
    """Raise UserError when the annotation file of the run no longer has the sha256 the baseline was scored on.

    The file is ``DATA_ROOT/annotations/instances_val2017.json`` of ``--data-root`` when given (it must exist),
    else that of each run dir's ``workflow.json`` ``args.data_root`` and the baseline's ``dataset.ann_file``,
    those that exist. Returns notes on what could not be checked.
    """
    if data_root is not None:
        ann = resolve_repo_path(data_root) / ANNOTATIONS
        if not ann.is_file():
            raise UserError(f"--data-root: {ann} does not exist", flag="--data-root")
        places, notes = [(ann, "--data-root")], []
    else:
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


# ----------------------------------------------------------------------------------------------------------------------
# budget search results


def find_searches(run_dirs: list[Path]) -> list[Path]:
    """Every ``search-<mode>/search.json`` in the run dirs, each once."""
    found, seen = [], set()
    for run_dir in run_dirs:
        for path in sorted(Path(run_dir).glob("search-*/search.json")):
            if path.resolve() not in seen:
                seen.add(path.resolve())
                found.append(path)
    return found


def _close(a: Any, b: float) -> bool:
    return math.isclose(float(a), b, rel_tol=0.0, abs_tol=AP_TOL)


class SearchCheck:
    """Checks one ``search.json`` against the baseline and this report's evaluations; ``fail`` raises."""

    def __init__(
        self, path: Path, data: dict, ref: Reference, used: list[dict], dropped: dict[Path, str], hasher: Hasher
    ):
        self.path, self.data, self.ref, self.hasher = path, data, ref, hasher
        self.used = {Path(v["_metrics_file"]).resolve(): v for v in used}
        self.cited: list[dict] = []  # the evaluations its rows cite
        self.dropped = dropped
        self.baseline_ap = float(data["baseline_ap"])
        self.prov = data.get("provenance")

    def fail(self, text: str) -> None:
        raise UserError(f"{self.path}: {text}", flag=str(self.path))

    def run(self) -> None:
        ref = self.ref
        if not _close(self.baseline_ap, ref.ap):
            self.fail(
                f"its FP32 AP is {self.baseline_ap:.4f}, but this run's FP32 baseline {rel_path(ref.metrics_path)} "
                f"has {ref.ap:.4f}: the search belongs to another run"
            )
        if self.prov is not None:
            self.check_provenance()
        rows = {}
        for row in self.data["candidates"]:
            self.check_row(row)
            if row.get("random_seed") is None:
                rows[int(row["k"])] = float(row["ap"])
        s = self.data["search"]
        known = {int(p["k"]): float(p["map"]) for p in s.get("known") or []}
        ap_at = self.ap_at(rows, known)
        k = int(s["k"])
        if k not in rows and k not in known:
            self.fail(f"its K found ({k}) is none of its candidate rows (K {sorted(rows)})")
        self.check_point(f"K found ({k})", s["map"], s["delta"], ap_at(k))
        for point in list(s["curve"]) + list(s["probes"]):
            pk = int(point["k"])
            self.check_point(f"probe K={pk}", point["map"], point["delta"], ap_at(pk))
            if bool(point["meets"]) != (float(point["delta"]) <= float(self.data["budget_ap"])):
                self.fail(
                    f"probe K={pk} says meets={point['meets']} for a loss of {point['delta']} AP against a "
                    f"budget of {self.data['budget_ap']} AP"
                )
        if bool(s["found"]) != any(p["meets"] for p in s["curve"]):
            self.fail(f"found={s['found']} disagrees with its probes")
        controls = [self.data.get("random_control")] + list(self.data.get("random_band") or [])
        for control in filter(None, controls):
            self.check_control(control, ap_at)

    def ap_at(self, rows: dict[int, float], known: dict[int, float]):
        """The AP at K of a row, else of a known point (K=0 from the full model's own evaluation), checked."""

        def ap(k: int) -> float:
            if k in rows:
                return rows[k]
            if k in known:
                self.check_known(k, known[k])
                return known[k]
            self.fail(f"K={k} has no candidate row (K {sorted(rows)})")

        return ap

    def check_known(self, k: int, ap: float) -> None:
        """A point given to the search (``--k0-metrics``: the full model's evaluation, K=0) must be an evaluation
        of its full model that this report uses, with that AP."""
        prov = self.prov or {}
        full = self.data.get("full_model")
        full_file = resolve_repo_path(full).resolve() if full else None
        if k != 0:
            self.fail(f"K={k} was given to the search, not evaluated by it (only K=0, the full model, may be)")
        for v in self.used.values():
            if prov.get("k0_metrics_sha256"):
                same = v["_metrics_sha256"] == prov["k0_metrics_sha256"]
            elif prov.get("full_model_sha256"):
                same = v["model_sha256"] == prov["full_model_sha256"]
            else:
                same = full_file is not None and v["model_file"] and Path(v["model_file"]).resolve() == full_file
            if same and _close(ap, v["map50_95"] * 100.0):
                return
        self.fail(f"K={k} (AP {ap:.4f}) comes from no evaluation of its full model {full} that this report uses")

    def check_point(self, what: str, ap: Any, delta: Any, expected_ap: float) -> None:
        if not _close(ap, expected_ap):
            self.fail(f"{what}: AP {float(ap):.4f}, but its candidate's metrics have {expected_ap:.4f}")
        if not _close(delta, self.baseline_ap - expected_ap):
            self.fail(
                f"{what}: loss {float(delta):+.4f} AP, but FP32 AP - candidate AP = "
                f"{self.baseline_ap - expected_ap:+.4f}"
            )

    def evaluation(self, metrics_path: str) -> dict:
        """The used evaluation a row cites, or fail naming the metrics file and why it is not used."""
        recorded = Path(metrics_path)
        places = [resolve_repo_path(recorded)]
        if not recorded.is_absolute():  # relative to the cwd of the search: its run dir holds <name>-coco/
            places.append(self.path.parent.parent / recorded.parent.name / recorded.name)
        for place in places:
            key = place.resolve()
            if key in self.used:
                self.cited.append(self.used[key])
                return self.used[key]
            if key in self.dropped:
                self.fail(f"cites {rel_path(place)}, which this report dropped ({self.dropped[key]})")
        if not any(p.is_file() for p in places):
            self.fail(f"cites {metrics_path}, which does not exist")
        self.fail(f"cites {metrics_path}, which is none of the evaluations under the run dirs")

    def check_row(self, row: dict) -> None:
        v = self.evaluation(row["metrics_path"])
        name = row.get("name") or f"K={row['k']}"
        ap = v["map50_95"] * 100.0
        if not _close(row["ap"], ap):
            self.fail(f"candidate {name}: AP {float(row['ap']):.4f}, but {v['metrics_path']} has {ap:.4f}")
        if not _close(row["delta_ap"], self.baseline_ap - ap):
            self.fail(
                f"candidate {name}: loss {float(row['delta_ap']):+.4f} AP, but FP32 AP - its AP "
                f"({v['metrics_path']}) = {self.baseline_ap - ap:+.4f}"
            )
        if row.get("metrics_sha256") and row["metrics_sha256"] != v["_metrics_sha256"]:
            self.fail(
                f"candidate {name}: {v['metrics_path']} changed since the search (sha256 "
                f"{v['_metrics_sha256'][:12]}, recorded {str(row['metrics_sha256'])[:12]})"
            )
        if row.get("model_sha256") and row["model_sha256"] != v["model_sha256"]:
            self.fail(
                f"candidate {name}: model sha256 {str(row['model_sha256'])[:12]}, but {v['metrics_path']} "
                f"evaluated sha256 {v['model_sha256'][:12]}"
            )

    def check_control(self, rc: dict, ap_at) -> None:
        """Random controls at one K: their APs are their rows', their statistics recomputed from those."""
        rows = list(rc["candidates"])
        for row in rows:
            self.check_row(row)
        aps = [float(r["ap"]) for r in rows]
        deltas = [self.baseline_ap - a for a in aps]
        if not aps or len(aps) != len(rc["aps"]) or not all(_close(a, b) for a, b in zip(rc["aps"], aps)):
            self.fail(f"random controls at K={rc['k']}: APs {rc['aps']} are not those of their candidates {aps}")
        ranking_delta = self.baseline_ap - ap_at(int(rc["k"]))
        mean = statistics.fmean(deltas)
        expected = {
            "mean_delta": mean,
            "min_delta": min(deltas),
            "max_delta": max(deltas),
            "sd_delta": statistics.stdev(deltas) if len(deltas) > 1 else 0.0,
            "ranking_delta": ranking_delta,
            "margin_ap": mean - ranking_delta,
        }
        for key, value in expected.items():
            if key in rc and not _close(rc[key], value):
                self.fail(f"random controls at K={rc['k']}: {key} {rc[key]}, recomputed {value:.4f}")
        if "beats_chance" in rc and bool(rc["beats_chance"]) != (ranking_delta < mean):
            self.fail(f"random controls at K={rc['k']}: beats_chance={rc['beats_chance']} disagrees with their losses")

    def check_provenance(self) -> None:
        """``provenance`` (``lowbit.search_run.provenance``): the baseline's model, annotations and image ids, this
        report's FP32 metrics, and full model and ranking files unchanged since."""
        prov, ref = self.prov, self.ref
        if not isinstance(prov, dict):
            self.fail("its provenance is not an object")
        for key, what, want in (
            ("onnx_sha256", "FP32 model", ref.model_sha256),
            ("ann_sha256", "annotation file", ref.ann_sha256),
            ("image_ids_sha256", "image ids", ref.image_ids_sha256),
        ):
            if prov.get(key) != want:
                self.fail(
                    f"it was run against {what} sha256 {str(prov.get(key))[:12]}, but this run's FP32 baseline "
                    f"{rel_path(ref.metrics_path)} has {str(want)[:12]}: the search belongs to another run"
                )
        metrics_sha = prov.get("baseline_metrics_sha256")
        if metrics_sha is not None and metrics_sha not in ref.fp32_metrics_sha256:
            self.fail(f"its FP32 metrics (sha256 {str(metrics_sha)[:12]}) are none of this report's FP32 evaluations")
        for key, recorded in (
            ("full_model_sha256", self.data.get("full_model")),
            ("ranking_sha256", (self.data.get("ranking") or {}).get("report")),
        ):
            file = resolve_repo_path(recorded) if recorded else None
            if prov.get(key) and file is not None and file.is_file() and self.hasher(file) != prov[key]:
                self.fail(
                    f"{rel_path(file)} changed since the search (sha256 now {self.hasher(file)[:12]}, "
                    f"the search used {str(prov[key])[:12]})"
                )


def read_search(path: Path, ref: Reference, used: list[dict], dropped: dict[Path, str], hasher: Hasher) -> dict:
    """The ``search.json`` at ``path`` when it is a search of this run, else UserError whose message is the reason.

    Checks: a search record (``kind`` "search" and its ``schema_version``; none of them means an older writer or
    another file), all numbers finite; ``baseline_ap`` is the baseline's AP; its ``provenance`` (when present) names the baseline's model,
    annotations and image ids, and its full model and ranking files are unchanged; every candidate row cites an
    evaluation this report uses, with that evaluation's AP, ΔAP, model and file sha256; the K found, every probe
    and the random controls are those rows' numbers.
    """
    raw = records.read_json(path)
    if isinstance(raw, dict) and "schema_version" not in raw:
        raise UserError(
            f"{path} has no schema_version: the schema is missing (written by an older search, or not a "
            "search record); run the search again",
            flag=str(path),
        )
    data = records.read_record(path, "search")
    where = records.find_non_finite(data)
    if where:
        raise UserError(f"{path}: {where} is not a finite number", flag=str(path))
    check = SearchCheck(path, data, ref, used, dropped, hasher)
    try:
        check.run()
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise UserError(f"{path} is not a complete search record ({type(e).__name__}: {e})", flag=str(path)) from e
    for variant in check.cited:
        variant["_cited_by_search"] = True
    return data
