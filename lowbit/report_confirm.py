"""Checks a budget search's ``confirmation`` block (the pick evaluated on a slice the search never saw) against the
evaluations it cites, before the report uses it (:func:`check_confirmation`).

``search-<mode>/search.json``'s ``confirmation`` (:func:`lowbit.search_confirm.confirm_pick`) cites an FP32
evaluation on the confirmation slice (``baseline-confirm-coco``) and one evaluation per attempt
(``<mode>-k{K}-confirm-coco``). Those are scored on other images than the FP32 baseline, so
:func:`lowbit.report_collect.collect_variants` sets them aside instead of dropping them, and this module uses them
only when every cited file is one of them and:

* its metrics file has the sha256 recorded (``provenance.confirm_baseline_metrics_sha256``, ``metrics_sha256``);
* the FP32 one scored the baseline's model, each attempt the model of the search's candidate row at its K;
* each scored ``confirmation.images.image_ids_sha256``, the baseline's annotation file and post-processing, on
  images none of which the search slice holds;
* the APs, losses, ``within_budget`` (loss <= budget), ``k`` and ``confirmed`` are those files' numbers.

Anything else is a :class:`~lowbit.errors.UserError` whose message is why the confirmation is dropped; the search
itself stands (its pick is then not confirmed). AP values are in points (mAP50-95 x 100).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowbit import records
from lowbit.errors import UserError
from lowbit.report_inputs import Reference, rel_path
from lowbit.report_search_check import AP_TOL, ap_close
from lowbit.report_variant import Variant
from lowbit.runs import resolve_repo_path

__all__ = ["ConfirmAttempt", "Confirmation", "check_confirmation", "cited_paths"]

_PP_KEYS = ("mode", "conf", "iou", "max_det", "imgsz")


@dataclass(frozen=True)
class ConfirmAttempt:
    """One K evaluated on the confirmation slice, checked against its metrics file."""

    k: int
    name: str
    evaluation: Variant  # the confirmation-slice evaluation (its delta_ap is not filled)
    ap: float  # AP points, from its metrics.json
    delta_ap: float  # AP − the slice's FP32 AP: variant − FP32, negative = loss
    within_budget: bool
    recorded: dict[str, Any] | None  # paired_delta as search.json recorded it (variant − FP32)


@dataclass(frozen=True)
class Confirmation:
    """A checked confirmation block of one search."""

    mode: str
    search_path: str  # as rel_path writes it
    baseline: Variant  # the FP32 evaluation on the confirmation slice
    baseline_ap: float  # AP points
    images: dict[str, Any]
    rule: str
    attempts: tuple[ConfirmAttempt, ...]
    k: int | None  # the confirmed K, None when no attempt was within the budget
    confirmed: bool

    @property
    def evaluations(self) -> list[Variant]:
        """The evaluations it cites: the FP32 one first."""
        return [self.baseline] + [a.evaluation for a in self.attempts]


def _places(search_path: Path, recorded: str) -> list[Path]:
    """Where a cited metrics file may be: as recorded, then ``<run dir>/<folder>/metrics.json`` of the search's run."""
    rec = Path(recorded)
    places = [resolve_repo_path(rec)]
    if not rec.is_absolute():
        places.append(search_path.parent.parent / rec.parent.name / rec.name)
    return places


def cited_paths(search_path: Path, data: Any) -> set[Path]:
    """The resolved metrics paths a search.json's ``confirmation`` cites (empty when it has none or is unreadable)."""
    conf = data.get("confirmation") if isinstance(data, dict) else None
    if not isinstance(conf, dict):
        return set()
    cited = [conf.get("baseline_metrics")] + [a.get("metrics_path") for a in conf.get("attempts") or []]
    return {p.resolve() for c in cited if isinstance(c, str) for p in _places(search_path, c)}


class _Check:
    def __init__(self, path: Path, data: dict, ref: Reference, aside: dict[Path, Variant]):
        self.path, self.data, self.ref, self.aside = path, data, ref, aside
        self.conf = data["confirmation"]
        self.images = self.conf["images"]

    def fail(self, text: str) -> None:
        raise UserError(f"{self.path}: confirmation: {text}", flag=str(self.path))

    def evaluation(self, recorded: str) -> Variant:
        for place in _places(self.path, recorded):
            if place.resolve() in self.aside:
                return self.aside[place.resolve()]
        self.fail(f"cites {recorded}, which is no evaluation on other images than the search slice under the run dirs")

    def check_slice(self, v: Variant, what: str) -> None:
        """``v`` scored the confirmation images of the baseline's annotations, as the baseline post-processes."""
        ds = records.dataset_provenance({"dataset": v.source.dataset})
        if ds["image_ids_sha256"] != self.images.get("image_ids_sha256"):
            self.fail(f"{what} ({v.metrics_path}) scored other images than confirmation.images names")
        if ds["ann_sha256"] != self.ref.ann_sha256 or self.images.get("ann_sha256") not in (None, self.ref.ann_sha256):
            self.fail(f"{what} ({v.metrics_path}) was scored on another annotation file than the FP32 baseline")
        if "num_images" in self.images and int(self.images["num_images"]) != ds["num_images"]:
            self.fail(f"{what} ({v.metrics_path}) scored {ds['num_images']} images, not {self.images['num_images']}")
        pp = {k: v.source.postprocess.get(k) for k in _PP_KEYS}
        if pp != self.ref.postprocess:
            self.fail(f"{what} ({v.metrics_path}) post-processes as {pp}, the FP32 baseline as {self.ref.postprocess}")
        overlap = set(v.source.dataset.get("image_ids") or []) & set(self.ref.image_ids)
        if overlap:
            self.fail(f"{what} ({v.metrics_path}) shares {len(overlap)} images with the search slice")
        if v.source.model_problem:
            self.fail(f"{what} ({v.metrics_path}): {v.source.model_problem}")

    def baseline(self) -> tuple[Variant, float]:
        b = self.evaluation(self.conf["baseline_metrics"])
        if b.role not in ("baseline", "fp32_repeat") or b.model_sha256 != self.ref.model_sha256:
            self.fail(f"its FP32 evaluation {b.metrics_path} is not of the FP32 baseline's model")
        recorded = (self.data.get("provenance") or {}).get("confirm_baseline_metrics_sha256")
        if recorded and recorded != b.source.metrics_sha256:
            self.fail(f"{b.metrics_path} changed since the search (sha256 {b.source.metrics_sha256[:12]})")
        self.check_slice(b, "its FP32 evaluation")
        ap = b.map50_95 * 100.0
        if not ap_close(self.conf["baseline_ap"], ap):
            self.fail(f"baseline_ap {float(self.conf['baseline_ap']):.4f}, but {b.metrics_path} has {ap:.4f}")
        return b, ap

    def attempt(self, a: dict, base_ap: float, rows: dict[int, Variant], budget: float) -> ConfirmAttempt:
        k, name = int(a["k"]), str(a.get("name") or f"K={a['k']}")
        e = self.evaluation(a["metrics_path"])
        if a.get("metrics_sha256") != e.source.metrics_sha256:
            self.fail(f"attempt {name}: {e.metrics_path} has sha256 {e.source.metrics_sha256[:12]}, not the recorded")
        row = rows.get(k)
        if row is None:
            self.fail(f"attempt {name}: the search has no candidate row at K={k}")
        if not (a.get("model_sha256") == e.model_sha256 == row.model_sha256):
            self.fail(f"attempt {name}: {e.metrics_path} is not an evaluation of the search's K={k} candidate model")
        self.check_slice(e, f"attempt {name}")
        ap = e.map50_95 * 100.0
        loss = base_ap - ap
        if not (ap_close(a["ap"], ap) and ap_close(a["delta_ap"], loss)):
            self.fail(f"attempt {name}: AP {a['ap']} / loss {a['delta_ap']}, its metrics give {ap:.4f} / {loss:.4f}")
        within = loss <= budget
        if bool(a["within_budget"]) != within and abs(loss - budget) > AP_TOL:
            self.fail(f"attempt {name}: within_budget={a['within_budget']} for a loss of {loss:.4f} AP")
        paired = a.get("paired_delta")
        if isinstance(paired, dict) and not ap_close(paired.get("delta_ap", float("nan")), -loss):
            self.fail(f"attempt {name}: paired_delta.delta_ap {paired.get('delta_ap')} is not AP − FP32 AP")
        return ConfirmAttempt(k, name, e, ap, ap - base_ap, bool(a["within_budget"]), paired)

    def run(self, rows: dict[int, Variant], budget: float) -> Confirmation:
        base, base_ap = self.baseline()
        attempts = tuple(self.attempt(a, base_ap, rows, budget) for a in self.conf["attempts"])
        first = next((a for a in attempts if a.within_budget), None)
        if first is not None and first is not attempts[-1]:
            self.fail(f"attempts go on after K={first.k} was within the budget")
        k = first.k if first else None
        if bool(self.conf["confirmed"]) != (first is not None) or self.conf.get("k") != k:
            self.fail(f"k={self.conf.get('k')}, confirmed={self.conf['confirmed']} disagree with its attempts")
        search_k = int(self.data["search"]["k"])
        pick_k = self.data.get("pick_k")
        if pick_k is not None and int(pick_k) != (k if k is not None else search_k):
            self.fail(f"pick_k {pick_k} is neither the confirmed K nor, unconfirmed, the search's K ({search_k})")
        return Confirmation(
            mode=str(self.data["mode"]),
            search_path=rel_path(self.path),
            baseline=base,
            baseline_ap=base_ap,
            images=dict(self.images),
            rule=str(self.conf.get("rule") or ""),
            attempts=attempts,
            k=k,
            confirmed=first is not None,
        )


def check_confirmation(
    path: Path, data: dict, ref: Reference, aside: dict[Path, Variant], rows: dict[int, Variant]
) -> Confirmation | None:
    """The checked ``confirmation`` of the search at ``path`` (None when it ran none), else UserError with the reason.

    Args:
        path: the search.json; ``data`` its record, already checked by
            :func:`lowbit.report_search_check.read_search`.
        ref: the FP32 baseline on the search slice.
        aside: the evaluations on other images than the baseline's, by resolved metrics path.
        rows: the search's evaluation at each K (``read_search``'s ``by_k``).
    """
    if data.get("confirmation") is None:
        return None
    check = _Check(path, data, ref, aside)
    try:
        return check.run(rows, float(data["budget_ap"]))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UserError(f"{path}: confirmation is incomplete ({type(e).__name__}: {e})", flag=str(path)) from e
