"""The report's intervals and confirmation slice (lowbit/report_intervals.py, report_confirm.py, the eligibility rule
of report_recommend.py, the deployed-width weight size of report_costs.py).

Intervals are computed on a real (small) ground truth with real detections, so every number can be recomputed
with lowbit.ap_bootstrap; the confirmation tests reuse test_report_trust's consistent search run and add a
confirmation slice to it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from test_ap_bootstrap import _detections, _instances
from test_report import RunDir
from test_report_trust import BUDGET, SearchRun, _dropped

from lowbit import ap_bootstrap, records
from lowbit.coco_eval import evaluate_bbox, load_coco
from lowbit.report import ReportSettings, make_report
from lowbit.report_costs import weight_bytes
from lowbit.report_json import search_summary
from lowbit.report_plots import plot_search_curves

ALL_IDS = [1, 2, 3, 4, 5, 6, 7, 8]
N_BOOT = 200


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------------------------------------------------
# the helper: the FP32 replicates computed once


def test_paired_reference_equals_paired_delta_ci_from_matches(tmp_path):
    instances = _instances()
    (tmp_path / "gt.json").write_text(json.dumps(instances))
    gt = load_coco(tmp_path / "gt.json")
    ref = ap_bootstrap.match_images(gt, _detections(instances, 0.12, 0), ALL_IDS)
    variants = [ap_bootstrap.match_images(gt, _detections(instances, s, i), ALL_IDS) for i, s in enumerate((0.2, 0.3))]
    shared = ap_bootstrap.PairedReference(ref, n_boot=N_BOOT, seed=5)
    for var in variants:  # the same reference object reused for every variant
        for confidence in (0.95, 0.8):
            got = shared.delta(var, confidence)
            assert got == ap_bootstrap.paired_delta_ci_from_matches(ref, var, N_BOOT, confidence, 5)  # exactly
    assert shared.delta(variants[0]) != ap_bootstrap.PairedReference(ref, N_BOOT, seed=6).delta(variants[0])
    with pytest.raises(ap_bootstrap.UserError):
        shared.delta(ap_bootstrap.match_images(gt, _detections(instances, 0.2, 0), ALL_IDS[:-1]))


# ----------------------------------------------------------------------------------------------------------------------
# intervals on every ΔAP, end to end


class ScoredRun:
    """A run dir on a real ground truth: every evaluation's mAP is that of its detections.json."""

    def __init__(self, root: Path):
        self.run = RunDir(root)
        self.instances = _instances()
        self.run.ann_file.write_text(json.dumps(self.instances))
        self.ann_sha = _sha(self.run.ann_file.read_bytes())
        self.gt = load_coco(self.run.ann_file)
        self.dets: dict[str, list[dict]] = {}

    def scored(self, metrics: Path, dets: list[dict], record_sha: bool = True) -> Path:
        """Write ``dets`` beside ``metrics`` and put their mAP (and sha256) into it, as the evaluator does."""
        ids = json.loads(metrics.read_text())["dataset"]["image_ids"]
        stats, _ = evaluate_bbox(self.gt, dets, ids)
        (metrics.parent / "detections.json").write_text(json.dumps(dets))
        doc = json.loads(metrics.read_text())
        doc["metrics"].update(map50_95=stats["map50_95"], map50=stats["map50"], num_detections=len(dets))
        if record_sha:
            doc["detections_sha256"] = _sha((metrics.parent / "detections.json").read_bytes())
        metrics.write_text(json.dumps(doc))
        self.dets[metrics.parent.name] = dets
        return metrics

    def baseline(self, ids=ALL_IDS, step="baseline-coco") -> Path:
        m = self.run.baseline(image_ids=ids, ann_sha=self.ann_sha, step=step)
        return self.scored(m, _detections(self.instances, 0.12, 0))

    def variant(self, step: str, stem: str, shift: float, seed: int, record_sha: bool = True, **kw) -> Path:
        m = self.run.variant(step, stem, 0.5, 0.6, 50.0, ann_sha=self.ann_sha, **kw)
        return self.scored(m, _detections(self.instances, shift, seed), record_sha)


def _make(root: Path, n_boot: int = N_BOOT, budget: float = 5.0) -> dict:
    settings = ReportSettings(run_dir=[root], budget_ap=budget, tensorrt="off", ci_replicates=n_boot, overwrite=True)
    return make_report(settings, []).report


@pytest.fixture()
def scored_run(tmp_path) -> ScoredRun:
    s = ScoredRun(tmp_path / "run")
    s.baseline()
    s.variant("int8-coco", "m-int8", 0.2, 1, image_ids=ALL_IDS)
    s.variant("int8-max-coco", "m-int8-max", 0.3, 2, method="max", image_ids=ALL_IDS, record_sha=False)
    s.variant("fp8-coco", "m-fp8", 0.15, 3, mode="fp8", method="max", image_ids=ALL_IDS)
    return s


def test_every_delta_ap_has_its_paired_interval(scored_run):
    report = _make(scored_run.run.root)
    base = scored_run.dets["baseline-coco"]
    rows = {Path(v["metrics_path"]).parent.name: v for v in report["variants"]}
    assert rows["baseline-coco"]["delta_ap_ci"] is None
    for step in ("int8-coco", "int8-max-coco", "fp8-coco"):
        want = ap_bootstrap.paired_delta_ci(scored_run.gt, base, scored_run.dets[step], ALL_IDS, n_boot=N_BOOT)
        ci = rows[step]["delta_ap_ci"]
        assert ci == {
            "ci_low": want.ci_low,
            "ci_high": want.ci_high,
            "std_error": want.std_error,
            "n_boot": N_BOOT,
            "confidence": 0.95,
            "seed": 0,
            "n_images": len(ALL_IDS),
        }
        assert ci["ci_low"] < ci["ci_high"] and abs(rows[step]["delta_ap"] - want.delta_ap) < 1e-6
        md = (scored_run.run.root / "report.md").read_text()
        cell = f"{rows[step]['delta_ap'] + 0.0:+.2f} [{ci['ci_low'] + 0.0:+.2f}, {ci['ci_high'] + 0.0:+.2f}]"
        assert f"| {cell} |" in md
    block = report["intervals"]
    assert block["n_boot"] == N_BOOT and block["computed"] == 3 and block["seconds"] > 0
    assert "docs/uncertainty.md" in (scored_run.run.root / "report.md").read_text()
    # the older evaluation (no detections_sha256) was checked by ids, count and mAP, and says so
    assert any("INT8 max/fp32 is not named" in n and "older evaluator" in n for n in report["notes"]), report["notes"]
    # the recommendation says how sure it is
    assert "[" in report["recommended"]["reason"] and "paired bootstrap" in report["recommended"]["reason"]


def test_detections_that_are_not_the_evaluated_ones_get_no_interval(scored_run):
    root = scored_run.run.root
    changed = root / "int8-coco" / "detections.json"  # recorded by sha256: any change is caught
    dets = json.loads(changed.read_text())
    changed.write_text(json.dumps(dets[:-1]))
    old = root / "int8-max-coco" / "detections.json"  # not recorded: a count that disagrees is caught
    old.write_text(json.dumps(json.loads(old.read_text())[:-1]))
    swapped = root / "fp8-coco" / "detections.json"  # not recorded, right count, other detections: the mAP differs
    doc = json.loads((root / "fp8-coco" / "metrics.json").read_text())
    del doc["detections_sha256"]
    (root / "fp8-coco" / "metrics.json").write_text(json.dumps(doc))
    swapped.write_text(json.dumps(_detections(scored_run.instances, 0.4, 9)))
    report = _make(root)
    rows = {Path(v["metrics_path"]).parent.name: v for v in report["variants"]}
    for step, why in (("int8-coco", "sha256"), ("int8-max-coco", "detections, its metrics.json"), ("fp8-coco", "mAP")):
        assert rows[step]["delta_ap_ci"] is None
        assert any(n.startswith("no ΔAP interval") and why in n for n in rows[step]["notes"]), rows[step]["notes"]
    assert report["intervals"]["computed"] == 0


def test_no_intervals_when_asked_for_none(scored_run):
    report = _make(scored_run.run.root, n_boot=0)
    assert all(v["delta_ap_ci"] is None for v in report["variants"])
    assert report["intervals"]["n_boot"] == 0 and any(n.startswith("no ΔAP intervals") for n in report["notes"])
    with pytest.raises(ap_bootstrap.UserError, match="--ci-replicates"):
        _make(scored_run.run.root, n_boot=1)


def test_confirmation_attempts_are_paired_with_their_own_slices_fp32(scored_run):
    from lowbit.report_inputs import Hasher
    from lowbit.report_intervals import compute_intervals
    from lowbit.report_variant import variant_from_metrics

    ids = [5, 6, 8]
    confirm_base = scored_run.baseline(ids=ids, step="baseline-confirm-coco")
    attempt = scored_run.variant("int8-k2-confirm-coco", "m-int8-k2", 0.25, 4, image_ids=ids)
    hasher, root = Hasher(), scored_run.run.root

    def row(path: Path):
        return variant_from_metrics(json.loads(path.read_text()), path, root, hasher)

    base, other = row(root / "baseline-coco" / "metrics.json"), row(root / "int8-coco" / "metrics.json")
    result = compute_intervals(
        base, [base, other], [(row(confirm_base), [row(attempt)])], scored_run.run.ann_file, N_BOOT, hasher
    )
    want = ap_bootstrap.paired_delta_ci(
        scored_run.gt, scored_run.dets["baseline-confirm-coco"], scored_run.dets["int8-k2-confirm-coco"], ids, N_BOOT
    )
    assert result.paired[row(attempt).metrics_path] == want and want.n_images == 3
    # an attempt paired with the search slice's FP32 instead would be refused (other images)
    wrong = compute_intervals(base, [base, row(attempt)], [], scored_run.run.ann_file, N_BOOT, hasher)
    assert "different image ids" in wrong.reasons[row(attempt).metrics_path]


# ----------------------------------------------------------------------------------------------------------------------
# the confirmation slice

CONFIRM_IDS = [11, 12, 13]
CONFIRM_BASE = 0.51


class ConfirmedRun(SearchRun):
    """test_report_trust's search run with a confirmation slice: FP32 and the pick (K=2) evaluated on it."""

    def confirm(self, pick_map: float, budget: float = BUDGET) -> dict:
        self.confirm_base = self.run.baseline(
            map50_95=CONFIRM_BASE, map50=0.7, p50=90.0, step="baseline-confirm-coco", image_ids=CONFIRM_IDS
        )
        self.attempt = self.run.variant(
            "int8-k2-confirm-coco", "m-int8-k2", pick_map, 0.68, 50.0, manifest=False, image_ids=CONFIRM_IDS
        )
        doc = self.search_doc()
        model = json.loads(self.attempt.read_text())["model"]
        ap, base_ap = pick_map * 100.0, CONFIRM_BASE * 100.0
        within = base_ap - ap <= budget
        doc["confirmation"] = {
            "images": {
                "skip": 10,
                "count": 3,
                "num_images": 3,
                "image_ids_sha256": records.image_ids_sha256(CONFIRM_IDS),
                "ann_sha256": doc["provenance"]["ann_sha256"],
            },
            "baseline_metrics": str(self.confirm_base),
            "baseline_ap": base_ap,
            "rule": "confirmed when its loss there is within the budget",
            "step": 1,
            "attempts": [
                {
                    "k": 2,
                    "name": "int8-k2",
                    "model_path": model["path"],
                    "model_sha256": model["sha256"],
                    "metrics_path": str(self.attempt),
                    "metrics_sha256": _sha(self.attempt.read_bytes()),
                    "ap": ap,
                    "delta_ap": base_ap - ap,
                    "paired_delta": {
                        "delta_ap": ap - base_ap,
                        "ci_low": ap - base_ap - 0.2,
                        "ci_high": ap - base_ap + 0.2,
                        "std_error": 0.1,
                        "n_images": 3,
                        "n_boot": 1000,
                        "confidence": 0.95,
                        "seed": 0,
                    },
                    "within_budget": within,
                }
            ],
            "k": 2 if within else None,
            "confirmed": within,
        }
        doc["pick_k"] = 2
        doc["provenance"]["confirm_baseline_metrics_sha256"] = _sha(self.confirm_base.read_bytes())
        self.write_search(doc)
        return doc


def _confirm_report(load_script, run: ConfirmedRun, budget: float = 0.7) -> dict:
    main = load_script("scripts/cv-models/make_lowbit_report.py").main
    assert main(["--run-dir", str(run.root), "--tensorrt", "off", "--budget-ap", str(budget), "--overwrite"]) == 0
    return json.loads((run.root / "report.json").read_text())


def test_a_confirmed_pick_is_the_only_eligible_search_candidate(load_script, tmp_path):
    run = ConfirmedRun(tmp_path / "run")
    run.confirm(pick_map=0.507)  # loses 0.3 AP on the confirmation slice: within the search's 0.5
    report = _confirm_report(load_script, run)
    dropped = {Path(d["path"]).parent.name for d in report["dropped"]}
    assert not dropped & {"baseline-confirm-coco", "int8-k2-confirm-coco"}, report["dropped"]
    rows = {v["label"]: v for v in report["variants"]}
    pick = next(v for v in report["variants"] if v["metrics_path"].endswith("int8-k2-coco/metrics.json"))
    assert pick["confirmation"]["within_budget"] and pick["confirmation"]["n_images"] == 3
    assert pick["confirmation"]["delta_ap"] == pytest.approx((0.507 - CONFIRM_BASE) * 100)
    assert pick["confirmation"]["interval_source"].startswith("search.json")  # no detections here to recompute
    (entry,) = report["confirmation"]
    assert entry["status"] == "confirmed" and entry["k"] == 2 and entry["pick"] == pick["label"]
    # K=1 loses 0.6 AP: within the report's 0.7 budget, but a probe the confirmation never saw
    k1 = next(label for label, v in rows.items() if v["metrics_path"].endswith("int8-k1-coco/metrics.json"))
    assert k1 in report["recommended"]["not_eligible"] and k1 not in report["recommended"]["within_budget"]
    assert report["recommended"]["variant"] == pick["label"]
    assert "confirmation images" in report["recommended"]["reason"]
    md = (run.root / "report.md").read_text()
    assert "**INT8 confirmation**" in md and "on 3 images (within budget)" in md
    assert any(p.endswith("baseline-confirm-coco/metrics.json") for p in report["provenance"]["records"])


def test_an_unconfirmed_pick_is_not_recommended(load_script, tmp_path):
    run = ConfirmedRun(tmp_path / "run")
    run.confirm(pick_map=0.50)  # loses 1.0 AP on new images
    report = _confirm_report(load_script, run)
    assert report["confirmation"][0]["status"] == "not confirmed"
    assert report["recommended"]["variant"] == "FP32"
    assert "not confirmed" in report["recommended"]["reason"]
    # without the confirmation block the same run recommends the pick (today's rule)
    doc = json.loads(run.search_path.read_text())
    doc["confirmation"], doc["pick_k"] = None, 2
    run.write_search(doc)
    report = _confirm_report(load_script, run)
    assert report["recommended"]["variant"] != "FP32" and report["recommended"]["not_eligible"] == {}


def test_a_confirmation_that_does_not_check_out_is_dropped_and_the_search_stands(load_script, tmp_path):
    run = ConfirmedRun(tmp_path / "run")
    run.confirm(pick_map=0.507)
    run.rewrite_metrics(run.attempt, lambda d: d["metrics"].update(map50_95=0.509))  # changed since the search
    report = _confirm_report(load_script, run)
    reason = _dropped(report, run.search_path)
    assert "confirmation" in reason and "sha256" in reason
    assert len(report["search"]) == 1 and report["confirmation"][0]["status"].startswith("dropped")
    assert report["recommended"]["variant"] == "FP32"  # the pick is not confirmed; nothing else is within budget
    assert {Path(d["path"]).parent.name for d in report["dropped"]} >= {"int8-k2-confirm-coco"}


def test_probe_margins_are_part_of_the_within_budget_check(load_script, tmp_path):
    run = SearchRun(tmp_path / "run")
    doc = run.search_doc()
    for p in doc["search"]["curve"] + doc["search"]["probes"]:
        if p["k"] == 2:
            p.update(std_error=0.06, margin=0.1)  # 0.25 + 0.1 <= 0.5: still within
    run.write_search(doc)
    assert len(_confirm_report(load_script, run, BUDGET)["search"]) == 1
    for p in doc["search"]["curve"] + doc["search"]["probes"]:
        if p["k"] == 2:
            p.update(std_error=0.18, margin=0.3)  # 0.55 > 0.5: meets=True is no longer the search's own test
    run.write_search(doc)
    report = _confirm_report(load_script, run, BUDGET)
    assert "margin" in _dropped(report, run.search_path)


def test_search_curves_draw_intervals_and_attempts():
    curve = [
        {"k": 0, "map": 49.0, "delta": 1.0, "meets": False, "std_error": 0.2, "margin": 0.17},
        {"k": 2, "map": 49.75, "delta": 0.25, "meets": True, "std_error": 0.1, "margin": 0.08},
    ]
    search = {"k": 2, "found": True, "delta": 0.25, "map": 49.75, "reason": "r", "ks_max": 2, "order": [2]}
    doc = {"mode": "int8", "budget_ap": 0.5, "baseline_ap": 50.0, "search": {**search, "curve": curve}, "pick_k": 2}
    attempts = [{"k": 2, "delta_ap": -0.3, "ci_low": -0.6, "ci_high": 0.0, "std_error": 0.15, "within_budget": True}]
    summary = search_summary(doc, {2: {"ci_low": -0.5, "ci_high": 0.0}}, {"status": "confirmed", "attempts": attempts})
    assert summary["probes"][1]["ci_low"] == -0.5 and summary["probes"][0]["std_error"] == 0.2
    png = plot_search_curves({"search": [summary], "budget_ap": 0.5})
    assert png.startswith(b"\x89PNG")


# ----------------------------------------------------------------------------------------------------------------------
# weights at their deployed width


def test_weight_bytes_count_qdq_weights_at_one_byte(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.zeros((8, 4, 3, 3), np.float32), "w")
    b = numpy_helper.from_array(np.zeros(8, np.float32), "b")
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    zero = numpy_helper.from_array(np.array(0, np.int8), "z")
    nodes = [
        helper.make_node("QuantizeLinear", ["w", "s", "z"], ["wq"]),
        helper.make_node("DequantizeLinear", ["wq", "s", "z"], ["wd"]),
        helper.make_node("Conv", ["x", "wd", "b"], ["y"]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 6, 6])
    graph = helper.make_graph(nodes, "g", [x], [y], [w, b, scale, zero])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph), str(path))
    assert weight_bytes(path) == 8 * 4 * 3 * 3 * 1 + 8 * 4 + 4 + 1
    graph.ClearField("node")
    graph.node.extend([helper.make_node("Conv", ["x", "w", "b"], ["y"])])
    onnx.save(helper.make_model(graph), str(path))
    assert weight_bytes(path) == 8 * 4 * 3 * 3 * 4 + 8 * 4 + 4 + 1  # float weights at 4 bytes
