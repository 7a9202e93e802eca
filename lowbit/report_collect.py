"""Collects what the report may use from the run dirs: every evaluation as a :class:`~lowbit.report_variant.Variant`
and every budget search that belongs to the FP32 baseline; the rest is dropped with its reason.

:func:`collect_variants` reads every ``metrics.json`` (:func:`lowbit.report_inputs.find_metrics`) into a row
(:func:`lowbit.report_variant.variant_from_metrics`), picks the FP32 baseline (the evaluated model without Q/DQ;
repeats become ``fp32_repeat``), checks every other row (:mod:`lowbit.report_inputs`) and every
``search-<mode>/search.json`` (:mod:`lowbit.report_search_check`) against it, drops budget-search candidates that
no used search cites, fills ``delta_ap``, and returns a :class:`Collected`. Evaluations on a search's
confirmation slice (``baseline-confirm-coco``, ``*-confirm-coco``) are set aside, not dropped as "other images",
and used only by the confirmation that cites them once :func:`lowbit.report_confirm.check_confirmation` accepts it. Nothing is written; an unusable
baseline, no usable quantized variant, or an annotation file changed since the run was scored raise
:class:`~lowbit.errors.UserError` naming the file.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lowbit import records
from lowbit import report_inputs as inputs
from lowbit.errors import UserError
from lowbit.report_confirm import Confirmation, check_confirmation, cited_paths
from lowbit.report_inputs import rel_path
from lowbit.report_revert import revert_summary
from lowbit.report_search_check import find_searches, read_search
from lowbit.report_variant import Variant, variant_from_metrics
from lowbit.runs import REPO_ROOT, resolve_repo_path

__all__ = ["Collected", "UsedSearch", "collect_variants"]


@dataclass(frozen=True)
class UsedSearch:
    """A ``search-<mode>/search.json`` that is a search of this run (:func:`lowbit.report_search_check.read_search`)."""

    path: str  # as rel_path writes it
    sha256: str
    data: dict[str, Any]  # the search record, as lowbit.search_run wrote it
    cited: frozenset[Path] = frozenset()  # resolved metrics paths of the evaluations its rows cite
    by_k: dict[int, str] = field(default_factory=dict)  # K -> metrics_path of the ranking's evaluation at K
    confirmation: Confirmation | None = None  # its checked confirmation block (None: none, or dropped)
    confirmation_problem: str | None = None  # why its confirmation block was dropped
    revert: dict[str, Any] | None = None  # its checked revert pass (lowbit.report_revert; None: none, or dropped)
    revert_row: Variant | None = None  # the row of the pass's final float set, when confirmed

    @property
    def ran_confirmation(self) -> bool:
        """Whether the search ran a confirmation (checked or dropped)."""
        return self.data.get("confirmation") is not None

    @property
    def pick_k(self) -> int | None:
        """The search's pick: the confirmed K, else the K found (None when nothing met the budget)."""
        if self.data.get("pick_k") is not None:
            return int(self.data["pick_k"])
        return int(self.data["search"]["k"]) if self.data["search"].get("found") else None


@dataclass(frozen=True)
class Collected:
    """Everything the report is computed from: the rows, the searches, and what was left out."""

    run_dirs: list[str]  # as rel_path writes them
    dataset: dict[str, Any]  # report.json's "dataset" (the baseline's)
    variants: tuple[Variant, ...]  # baseline first, then by mode, K and label
    searches: tuple[UsedSearch, ...]
    notes: tuple[str, ...]  # about the run as a whole (the rows carry their own)
    dropped: tuple[dict[str, str], ...]  # [{path, reason}]: every record found and left out
    provenance: dict[str, Any]  # report.json's "provenance"
    ann_file: Path | None = None  # the annotation file with the baseline's ann_sha256 (the intervals' ground truth)

    @property
    def baseline(self) -> Variant:
        """The FP32 evaluation every other row is compared with."""
        return next(v for v in self.variants if v.role == "baseline")


def _dataset_summary(baseline: Variant) -> dict:
    ds = baseline.source.dataset
    images_dir = Path(str(ds.get("images_dir", "")))
    parts = images_dir.parts
    name = "/".join(parts[parts.index("datasets") + 1 :]) if "datasets" in parts else "/".join(parts[-2:])
    ids = ds.get("image_ids") or []
    return {
        "name": name or str(images_dir),
        "images_dir": ds.get("images_dir"),
        "ann_file": ds.get("ann_file"),
        "ann_sha256": ds.get("ann_sha256"),
        "num_images": len(ids),
        "image_id_range": [ids[0], ids[-1]] if ids else None,
        "postprocess": baseline.source.postprocess,
    }


def _sort_key(v: Variant) -> tuple:
    role_rank = {"baseline": 0, "fp32_repeat": 1}.get(v.role, 2)
    cand = v.candidate
    return (
        role_rank,
        v.quant_mode,
        cand.k if cand else -1,
        cand is not None and cand.random_seed is not None,
        (cand.random_seed if cand else None) or 0,
        v.label,
        v.metrics_path,
    )


def _pick_baseline(variants: list[Variant], confirm_cited: set[Path] = frozenset()) -> list[Variant]:
    """``variants`` with every FP32 evaluation but the first (the baseline) marked ``fp32_repeat``; an FP32
    evaluation a search's confirmation cites (another image slice) is the baseline only when there is no other.

    Raises:
        UserError: the FP32 evaluations are of different models.
    """
    floats = [v for v in variants if v.role == "baseline"]
    models: dict[str, list[str]] = {}
    for v in floats:
        models.setdefault(v.model_sha256, []).append(v.metrics_path)
    if len(models) > 1:
        listing = "; ".join(f"sha256 {sha[:12]}: {', '.join(paths)}" for sha, paths in models.items())
        raise UserError(
            f"--run-dir: the FP32 evaluations are of different models ({listing}); report one model at a time",
            flag="--run-dir",
        )
    on_search_slice = [v for v in floats if Path(v.source.metrics_file).resolve() not in confirm_cited]
    baseline = (on_search_slice or floats)[0]  # discovery order: first run dir given, then path order
    return [replace(v, role="fp32_repeat") if v.role == "baseline" and v is not baseline else v for v in variants]


def _read_evaluations(run_dirs: list[Path], hasher: inputs.Hasher, dropped: list[dict]) -> list[Variant]:
    """A row per readable evaluation; an unreadable one is dropped, unless it is the FP32 baseline's (an error)."""
    variants = []
    for found in inputs.find_metrics(run_dirs):
        if found.error is None:
            variants.append(variant_from_metrics(found.record, found.path, found.run_dir, hasher))
        elif found.is_float:
            raise UserError(f"--run-dir: the FP32 baseline's metrics cannot be used: {found.error}", flag="--run-dir")
        else:
            inputs.drop(dropped, found.path, found.error)
    return variants


def _listing(dropped: list[dict]) -> str:
    return "; ".join(f"{d['path']}: {d['reason']}" for d in dropped)


def _usable(
    variants: list[Variant],
    ref: inputs.Reference,
    dropped: list[dict],
    confirm_cited: set[Path] = frozenset(),
    aside: dict[Path, tuple[Variant, str]] | None = None,
) -> list[Variant]:
    """The baseline, then the evaluations comparable with it (:func:`lowbit.report_inputs.variant_problem`);
    others dropped, except those a confirmation cites (``confirm_cited``), kept in ``aside`` with their problem."""
    baseline = next(v for v in variants if v.role == "baseline")
    if baseline.source.model_problem:
        baseline = baseline.with_note(f"{baseline.source.model_problem}: its size and TensorRT latency are unknown")
    used = [baseline]
    for v in variants:
        if v.role == "baseline":
            continue
        problem = inputs.variant_problem(v, ref)
        key = Path(v.source.metrics_file).resolve()
        if problem and aside is not None and key in confirm_cited:
            aside[key] = (v, problem)
        elif problem:
            inputs.drop(dropped, v.source.metrics_file, f"{v.metrics_path}: {problem}")
        else:
            used.append(v)
    compared = [v for v in used if v.role in ("quantized", "random_control")]
    if dropped and not compared:
        raise UserError(
            f"--run-dir: no quantized variant is left to compare with {baseline.metrics_path}: {_listing(dropped)}",
            flag="--run-dir",
        )
    return used


def _confirm_cited(run_dirs: list[Path]) -> set[Path]:
    """The resolved metrics paths the ``confirmation`` blocks of the run dirs' search.json files cite (read as plain
    JSON: which evaluations to set aside; the searches are checked later)."""
    cited: set[Path] = set()
    for path in find_searches(run_dirs):
        try:
            cited |= cited_paths(path, records.read_json(path))
        except UserError:
            continue
    return cited


def _read_searches(
    run_dirs: list[Path],
    ref: inputs.Reference,
    used: list[Variant],
    dropped: list[dict],
    hasher: inputs.Hasher,
    aside: dict[Path, tuple[Variant, str]],
) -> tuple[list[UsedSearch], set[Path]]:
    """Every ``search-<mode>/search.json`` that is a search of this run
    (:func:`lowbit.report_search_check.read_search`), with its confirmation checked
    (:func:`lowbit.report_confirm.check_confirmation`: one that fails is dropped, the search stays), and the resolved
    metrics paths of the evaluations they cite."""
    dropped_at = {(REPO_ROOT / d["path"]).resolve(): d["reason"].removeprefix(f"{d['path']}: ") for d in dropped}
    aside_rows = {key: v for key, (v, _) in aside.items()}
    searches, cited = [], set()
    for path in find_searches(run_dirs):
        try:
            data, cited_here, by_k = read_search(path, ref, used, dropped_at, hasher)
        except UserError as e:
            inputs.drop(dropped, path, str(e))
            continue
        confirmation, problem = None, None
        try:
            confirmation = check_confirmation(path, data, ref, aside_rows, by_k)
        except UserError as e:
            problem = str(e)
            inputs.drop(dropped, path, f"{problem} (the confirmation is left out; the search is used)")
        revert = None
        try:
            revert = revert_summary(path, data, hasher)
        except UserError as e:
            inputs.drop(dropped, path, f"{e} (the revert pass is left out; the search is used)")
        row = _revert_row(path, revert, ref, hasher, dropped)
        cited |= cited_here
        by_k_paths = {k: v.metrics_path for k, v in by_k.items()}
        searches.append(
            UsedSearch(
                rel_path(path),
                hasher(path),
                data,
                frozenset(cited_here),
                by_k_paths,
                confirmation,
                problem,
                revert,
                row,
            )
        )
    return searches, cited


def _revert_row(
    path: Path, summary: dict | None, ref: inputs.Reference, hasher: inputs.Hasher, dropped: list[dict]
) -> Variant | None:
    """The row of a confirmed revert pass's final float set (:mod:`lowbit.report_revert`) of the search at ``path``:
    its evaluation on the search slice, comparable with the baseline like any row; one that is not is dropped with
    its reason (the search and the pass's summary stand)."""
    if not (summary and summary["confirmed"] and summary["metrics_path"]):
        return None
    metrics = resolve_repo_path(summary["metrics_path"])
    try:
        record = inputs.read_metrics(metrics)
    except UserError as e:
        inputs.drop(dropped, metrics, f"the revert pass's final set: {e}")
        return None
    v = variant_from_metrics(record, metrics, path.parent.parent, hasher)
    problem = inputs.variant_problem(v, ref)
    if problem:
        inputs.drop(dropped, metrics, f"the revert pass's final set: {v.metrics_path}: {problem}")
        return None
    return v


def _drop_unused_aside(aside: dict[Path, tuple[Variant, str]], searches: list[UsedSearch], dropped: list[dict]) -> None:
    """Drop the set-aside evaluations no checked confirmation uses, with the reason they are not comparable."""
    used = {
        Path(v.source.metrics_file).resolve() for s in searches if s.confirmation for v in s.confirmation.evaluations
    }
    for key, (v, problem) in aside.items():
        if key not in used:
            inputs.drop(dropped, v.source.metrics_file, f"{v.metrics_path}: {problem}")


def _without_uncited_candidates(variants: list[Variant], dropped: list[dict], cited: set[Path]) -> list[Variant]:
    """Budget-search candidates that a used ``search.json`` cites (``cited``: resolved metrics paths), and every
    other variant.

    A candidate left in the run dir by an earlier search (another ranking, budget or build) still matches the
    baseline, but no current search stands behind it: it is dropped, never recommended beside the search shown.
    """
    kept = []
    for v in variants:
        if v.source.derived in ("full", "requantized") and Path(v.source.metrics_file).resolve() not in cited:
            why = "a budget-search candidate that no search.json of this report cites (left by an earlier search)"
            inputs.drop(dropped, v.source.metrics_file, why)
            continue
        kept.append(v)
    return kept


def _provenance(ref: inputs.Reference, used: list[Variant], searches: list[UsedSearch], hasher: inputs.Hasher) -> dict:
    """report.json's ``provenance``: the baseline's keys and the sha256 of every record the report used."""
    used_records = {}
    for v in used:
        used_records[v.metrics_path] = v.source.metrics_sha256
        for path in v.source.manifest_files:  # the quantizer manifest or candidate record, and its full model's
            used_records[rel_path(path)] = hasher(path)
    for s in searches:
        used_records[s.path] = s.sha256
        for v in s.confirmation.evaluations if s.confirmation else ():
            used_records[v.metrics_path] = v.source.metrics_sha256
    return {
        "model_sha256": ref.model_sha256,
        "ann_sha256": ref.ann_sha256,
        "image_ids_sha256": ref.image_ids_sha256,
        "num_images": ref.num_images,
        "records": used_records,
    }


def _with_delta_ap(variants: list[Variant], baseline: Variant) -> list[Variant]:
    """``delta_ap`` / ``delta_ap50`` against the baseline, AP points; repeated labels get their folder appended."""
    variants = [
        replace(
            v,
            delta_ap=(v.map50_95 - baseline.map50_95) * 100.0,
            delta_ap50=(v.map50 - baseline.map50) * 100.0,
        )
        for v in variants
    ]
    # Labels must identify a row: repeats get the folder of their metrics file appended.
    counts: dict[str, int] = {}
    for v in variants:
        counts[v.label] = counts.get(v.label, 0) + 1
    return [
        replace(v, label=v.label + f" [{Path(v.metrics_path).parent.name}]")
        if counts[v.label] > 1 and v.role != "baseline"
        else v
        for v in variants
    ]


def _baseline_of(variants: list[Variant], dropped: list[dict], where: str) -> Variant:
    """The FP32 evaluation's row, or UserError when there is none (nothing can be compared)."""
    if not variants and not dropped:
        raise UserError(
            f"--run-dir: no metrics record (a metrics.json of kind 'metrics') under {where}", flag="--run-dir"
        )
    floats = [v for v in variants if v.role == "baseline"]
    if not floats:
        raise UserError(
            f"--run-dir: no FP32 evaluation (a metrics.json of a model without Q/DQ) under {where}; evaluate the "
            "float model first (card step 1, baseline-coco/metrics.json)"
            + (f"; left out: {_listing(dropped)}" if dropped else ""),
            flag="--run-dir",
        )
    return floats[0]


def collect_variants(run_dirs: Iterable[Path], data_root: Path | None = None) -> Collected:
    """Read every evaluation and budget search under ``run_dirs`` and keep those that belong to the FP32 baseline.

    ``delta_ap`` is filled against the baseline; ``tensorrt`` and ``mac_share`` are left None for
    :func:`lowbit.report_json.build_report`. ``data_root``: the dataset whose annotation file must still be the one
    the run was scored on (:func:`lowbit.report_inputs.check_annotations`).

    Raises:
        UserError: a run dir is missing or holds no evaluation; the FP32 evaluation is missing or unusable, or
            the FP32 evaluations are of different models; no quantized variant is usable; the annotation file
            changed since the run was scored. Each names the file.
    """
    run_dirs = [Path(d) for d in run_dirs]
    for run_dir in run_dirs:
        if not run_dir.is_dir():
            raise UserError(f"--run-dir: {run_dir} is not a directory", flag="--run-dir")
    hasher, dropped = inputs.Hasher(), []
    variants = _read_evaluations(run_dirs, hasher, dropped)
    _baseline_of(variants, dropped, ", ".join(str(d) for d in run_dirs))
    confirm_cited = _confirm_cited(run_dirs)
    variants = _pick_baseline(variants, confirm_cited)
    baseline = next(v for v in variants if v.role == "baseline")
    ref = inputs.Reference.of(baseline)
    recorded_ann = baseline.source.dataset.get("ann_file")
    notes = inputs.check_annotations(ref, recorded_ann, run_dirs, data_root, hasher)
    ann_file = inputs.verified_annotations(ref, recorded_ann, run_dirs, data_root, hasher)
    aside: dict[Path, tuple[Variant, str]] = {}
    variants = _usable(variants, ref, dropped, confirm_cited, aside)
    fp32_sha = frozenset(v.source.metrics_sha256 for v in variants if v.role in ("baseline", "fp32_repeat"))
    ref = replace(ref, fp32_metrics_sha256=fp32_sha)
    searches, cited = _read_searches(run_dirs, ref, variants, dropped, hasher, aside)
    reverted = [s.revert_row for s in searches if s.revert_row is not None]
    variants += reverted
    cited |= {Path(v.source.metrics_file).resolve() for v in reverted}
    _drop_unused_aside(aside, searches, dropped)
    variants = _without_uncited_candidates(variants, dropped, cited)
    unknown_source = [
        v.label for v in variants if v.role in ("quantized", "random_control") and not v.source_model_sha256
    ]
    if unknown_source:
        notes.append(
            "no quantizer manifest for "
            + ", ".join(unknown_source)
            + ": that they were quantized from the FP32 model could not be checked"
        )
    baseline = next(v for v in variants if v.role == "baseline")  # with its notes
    variants = sorted(_with_delta_ap(variants, baseline), key=_sort_key)
    return Collected(
        run_dirs=[rel_path(d) for d in run_dirs],
        dataset=_dataset_summary(baseline),
        variants=tuple(variants),
        searches=tuple(searches),
        notes=tuple(notes),
        dropped=tuple(dropped),
        provenance=_provenance(ref, variants, searches, hasher),
        ann_file=ann_file,
    )
