"""Checks that a ``search-<mode>/search.json`` is a search of this run before the report uses it (:func:`read_search`).

A search is used only when it names the FP32 baseline's AP and, in its ``provenance``, the baseline's model,
annotations and image ids; its full model and ranking files are unchanged since; every candidate row cites an
evaluation the report uses (:mod:`lowbit.report_inputs`), with that evaluation's AP, ΔAP, model and file sha256;
and the K found, every probe (its ``meets`` being loss + ``margin`` within the budget), the pick and the random
controls are those rows' numbers. The ``confirmation`` block is checked apart (:mod:`lowbit.report_confirm`): a
confirmation that fails its checks is dropped, the search stands. Anything else is a
:class:`~lowbit.errors.UserError` whose message is the reason the search is dropped.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from lowbit import records
from lowbit.errors import UserError
from lowbit.report_inputs import Hasher, Reference, rel_path
from lowbit.report_variant import Variant
from lowbit.runs import resolve_repo_path

__all__ = ["AP_TOL", "SearchCheck", "ap_close", "find_searches", "read_search"]

# Two AP values (AP points, mAP50-95 x 100) closer than this are equal: half the last digit the report shows
# (ΔAP +0.00), so a writer that rounds its numbers is not taken for a tampered one.
AP_TOL = 0.005


def find_searches(run_dirs: list[Path]) -> list[Path]:
    """Every ``search-<mode>/search.json`` in the run dirs, each once."""
    found, seen = [], set()
    for run_dir in run_dirs:
        for path in sorted(Path(run_dir).glob("search-*/search.json")):
            if path.resolve() not in seen:
                seen.add(path.resolve())
                found.append(path)
    return found


def ap_close(a: Any, b: float) -> bool:
    """Two AP values (points) that a record and the file it cites must share, to within ``AP_TOL``."""
    return math.isclose(float(a), b, rel_tol=0.0, abs_tol=AP_TOL)


class SearchCheck:
    """Checks one ``search.json`` against the baseline and this report's evaluations; ``fail`` raises."""

    def __init__(
        self, path: Path, data: dict, ref: Reference, used: list[Variant], dropped: dict[Path, str], hasher: Hasher
    ):
        self.path, self.data, self.ref, self.hasher = path, data, ref, hasher
        self.used = {Path(v.source.metrics_file).resolve(): v for v in used}
        self.cited: list[Variant] = []  # the evaluations its rows cite
        self.by_k: dict[int, Variant] = {}  # the ranking's evaluation at each K (rows, and K=0 when given)
        self.dropped = dropped
        self.baseline_ap = float(data["baseline_ap"])
        self.prov = data.get("provenance")

    def fail(self, text: str) -> None:
        raise UserError(f"{self.path}: {text}", flag=str(self.path))

    def run(self) -> None:
        ref = self.ref
        if not ap_close(self.baseline_ap, ref.ap):
            self.fail(
                f"its FP32 AP is {self.baseline_ap:.4f}, but this run's FP32 baseline {rel_path(ref.metrics_path)} "
                f"has {ref.ap:.4f}: the search belongs to another run"
            )
        if self.prov is not None:
            self.check_provenance()
        rows = {}
        for row in self.data["candidates"]:
            v = self.check_row(row)
            if row.get("random_seed") is None:
                rows[int(row["k"])] = float(row["ap"])
                self.by_k[int(row["k"])] = v
        s = self.data["search"]
        known = {int(p["k"]): float(p["map"]) for p in s.get("known") or []}
        ap_at = self.ap_at(rows, known)
        k = int(s["k"])
        if k not in rows and k not in known:
            self.fail(f"its K found ({k}) is none of its candidate rows (K {sorted(rows)})")
        self.check_point(f"K found ({k})", s["map"], s["delta"], ap_at(k))
        extra_points = list((self.data.get("confirmation") or {}).get("search_points") or [])
        for point in list(s["curve"]) + list(s["probes"]) + extra_points:
            pk = int(point["k"])
            self.check_point(f"probe K={pk}", point["map"], point["delta"], ap_at(pk))
            # within budget: the loss plus its margin (z(confidence) x paired SE; 0 for searches without one)
            margin = float(point.get("margin") or 0.0)
            if bool(point["meets"]) != (float(point["delta"]) + margin <= float(self.data["budget_ap"])):
                self.fail(
                    f"probe K={pk} says meets={point['meets']} for a loss of {point['delta']} AP (margin "
                    f"{margin:g}) against a budget of {self.data['budget_ap']} AP"
                )
        pick_k = self.data.get("pick_k")
        if pick_k is not None and int(pick_k) not in rows and int(pick_k) not in known:
            self.fail(f"its pick ({pick_k}) is none of its candidate rows (K {sorted(rows)})")
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
                same = v.source.metrics_sha256 == prov["k0_metrics_sha256"]
            elif prov.get("full_model_sha256"):
                same = v.model_sha256 == prov["full_model_sha256"]
            else:
                same = full_file is not None and v.model_file and Path(v.model_file).resolve() == full_file
            if same and ap_close(ap, v.map50_95 * 100.0):
                self.by_k.setdefault(k, v)
                return
        self.fail(f"K={k} (AP {ap:.4f}) comes from no evaluation of its full model {full} that this report uses")

    def check_point(self, what: str, ap: Any, delta: Any, expected_ap: float) -> None:
        if not ap_close(ap, expected_ap):
            self.fail(f"{what}: AP {float(ap):.4f}, but its candidate's metrics have {expected_ap:.4f}")
        if not ap_close(delta, self.baseline_ap - expected_ap):
            self.fail(
                f"{what}: loss {float(delta):+.4f} AP, but FP32 AP - candidate AP = "
                f"{self.baseline_ap - expected_ap:+.4f}"
            )

    def evaluation(self, metrics_path: str) -> Variant:
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

    def check_row(self, row: dict) -> Variant:
        v = self.evaluation(row["metrics_path"])
        name = row.get("name") or f"K={row['k']}"
        ap = v.map50_95 * 100.0
        if not ap_close(row["ap"], ap):
            self.fail(f"candidate {name}: AP {float(row['ap']):.4f}, but {v.metrics_path} has {ap:.4f}")
        if not ap_close(row["delta_ap"], self.baseline_ap - ap):
            self.fail(
                f"candidate {name}: loss {float(row['delta_ap']):+.4f} AP, but FP32 AP - its AP "
                f"({v.metrics_path}) = {self.baseline_ap - ap:+.4f}"
            )
        if row.get("metrics_sha256") and row["metrics_sha256"] != v.source.metrics_sha256:
            self.fail(
                f"candidate {name}: {v.metrics_path} changed since the search (sha256 "
                f"{v.source.metrics_sha256[:12]}, recorded {str(row['metrics_sha256'])[:12]})"
            )
        if row.get("model_sha256") and row["model_sha256"] != v.model_sha256:
            self.fail(
                f"candidate {name}: model sha256 {str(row['model_sha256'])[:12]}, but {v.metrics_path} "
                f"evaluated sha256 {v.model_sha256[:12]}"
            )
        return v

    def check_control(self, rc: dict, ap_at) -> None:
        """Random controls at one K: their APs are their rows', their statistics recomputed from those."""
        rows = list(rc["candidates"])
        for row in rows:
            self.check_row(row)
        aps = [float(r["ap"]) for r in rows]
        deltas = [self.baseline_ap - a for a in aps]
        if not aps or len(aps) != len(rc["aps"]) or not all(ap_close(a, b) for a, b in zip(rc["aps"], aps)):
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
            if key in rc and not ap_close(rc[key], value):
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


def read_search(
    path: Path, ref: Reference, used: list[Variant], dropped: dict[Path, str], hasher: Hasher
) -> tuple[dict, frozenset[Path], dict[int, Variant]]:
    """The ``search.json`` at ``path`` when it is a search of this run, else UserError whose message is the reason.

    Returns ``(search record, cited, by_k)``: ``cited`` holds the resolved ``metrics.json`` paths of the evaluations
    in ``used`` that its rows cite (the budget-search candidates this search stands behind); ``by_k`` the ranking's
    evaluation at each K (its rows without a random seed, and K=0 when given to the search).

    Checks: a search record (``kind`` "search" and its ``schema_version``; none of them means an older writer or
    another file), all numbers finite; ``baseline_ap`` is the baseline's AP; its ``provenance`` (when present)
    names the baseline's model, annotations and image ids, and its full model and ranking files are unchanged;
    every candidate row cites an evaluation this report uses, with that evaluation's AP, ΔAP, model and file
    sha256; the K found, every probe and the random controls are those rows' numbers.
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
    return data, frozenset(Path(v.source.metrics_file).resolve() for v in check.cited), dict(check.by_k)
