"""The revert pass (lowbit.search_revert): its order and rule, the search's record of it (stand-in evaluations, as in
test_search_run.py), and the report's checks of that record (lowbit.report_revert)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_report import _sha
from test_report_ci import CONFIRM_BASE, CONFIRM_IDS, ConfirmedRun, _confirm_report
from test_report_trust import NODES as NODES_R
from test_report_trust import _dropped
from test_search_run import BASELINE_AP, NODES, FakeStore, _confirm, setup  # noqa: F401 (fixture)

from lowbit import search_run
from lowbit.budget_search import judge
from lowbit.errors import UserError
from lowbit.report_inputs import Hasher
from lowbit.report_revert import revert_summary
from lowbit.search_revert import revert_confirmation, revert_pass

# AP points lost by each of the ranking's first 20 nodes when quantized (the rest cost nothing). The ranking puts
# nodes 12 and 13 too high: they cost nothing, so a float set need not keep them although the prefix does.
COST = {n: (0.0 if i in (12, 13) else 0.125) for i, n in enumerate(NODES[:20])}


def _loss(nodes) -> float:
    return sum(c for n, c in COST.items() if n not in set(nodes))


def test_tries_the_least_sensitive_first_and_keeps_what_meets_the_budget():
    tried = []

    def probe(nodes, i):
        tried.append((i, len(nodes)))
        return judge(len(nodes), BASELINE_AP - _loss(nodes), BASELINE_AP, 0.5)

    result = revert_pass(NODES[:16], probe, max_probes=5)  # the prefix K=16 loses 4 x 0.125 = 0.5
    assert [t.node for t in result.tries] == [NODES[i] for i in (15, 14, 13, 12, 11)]
    assert [t.kept for t in result.tries] == [False, False, True, True, False]
    assert result.nodes == [n for n in NODES[:16] if n not in (NODES[12], NODES[13])] and result.gained == 2
    assert result.untried == [NODES[i] for i in range(10, -1, -1)]
    assert [k for _, k in tried] == [15, 15, 15, 14, 13]  # each try drops one node from the current set
    assert result.final_probe.k == 14 and result.final_probe.delta == pytest.approx(0.5)
    assert revert_pass(NODES[:16], probe, max_probes=0).nodes == NODES[:16]
    with pytest.raises(ValueError, match="max_probes"):
        revert_pass(NODES[:16], probe, max_probes=-1)


@pytest.mark.parametrize("parallel", [2, 3, 7])
def test_parallel_rounds_give_the_one_at_a_time_result(parallel):
    def probe(nodes, i):
        return judge(len(nodes), BASELINE_AP - _loss(nodes), BASELINE_AP, 0.5)

    one = revert_pass(NODES[:16], probe, max_probes=7)
    many = revert_pass(NODES[:16], probe, max_probes=7, parallel=parallel)
    assert [(t.node, t.probe, t.kept) for t in many.tries] == [(t.node, t.probe, t.kept) for t in one.tries]
    assert many.nodes == one.nodes and many.untried == one.untried and one.discarded == 0
    assert many.discarded > 0  # the rounds evaluated tries after a failure, and evaluated them again


def _costly(nodes, seed):
    return BASELINE_AP - _loss(nodes) - (1.0 if seed is not None else 0.0)


def test_the_search_records_its_revert_pass_and_confirms_the_final_set(setup, tmp_path):  # noqa: F811
    cfg = setup(_costly, random_seeds=0, confirm=_confirm(tmp_path), revert_probes=5)
    data = search_run.run_search(cfg)
    assert data["pick_k"] == 16 and data["confirmation"]["confirmed"]
    r = data["revert"]
    assert r["start_k"] == 16 and r["k"] == 14 and r["gained"] == 2 and r["reverted"] == [NODES[13], NODES[12]]
    assert [t["kept"] for t in r["tries"]] == [False, False, True, True, False]
    assert all(Path(t["metrics_path"]).is_relative_to(tmp_path / "search-int8" / "revert") for t in r["tries"])
    assert [t["suffix"] for t in r["tries"]] == [f"_revert{i:02d}" for i in range(1, 6)]
    conf = r["confirmation"]
    assert [(a["k"], a["try"], a["within_budget"]) for a in conf["attempts"]] == [(14, 4, True)]
    assert conf["confirmed"] and conf["k"] == 14 and conf["nodes"] == r["nodes"] and conf["step"] == 2
    assert r["confirmed"] and FakeStore.confirm_calls == [16, 14]
    assert data["settings"]["revert_probes"] == 5
    text = search_run.search_markdown(data)
    assert "Revert pass from the pick's 16 float nodes" in text and "- confirmed: K=14" in text


@pytest.mark.parametrize(("max_attempts", "confirmed"), [(3, 6), (2, None)])
def test_a_final_set_that_misses_on_new_images_steps_back(max_attempts, confirmed):
    # every node of the pick's 10 is kept back in low precision on the search slice; on new images a set of fewer
    # than 5 float nodes misses the budget: the final set (2) misses, then 4 (= 2 + step), then 6 is confirmed
    start = NODES[:10]
    result = revert_pass(start, lambda nodes, i: judge(len(nodes), BASELINE_AP, BASELINE_AP, 0.5), max_probes=8)
    assert [len(n) for _, n in result.kept_sets()] == list(range(9, 1, -1)) and len(result.nodes) == 2

    def confirm(i, nodes):
        return {"name": f"try{i}"}, len(nodes) >= 5

    conf = revert_confirmation(result, 2, max_attempts, confirm)
    assert [a["k"] for a in conf["attempts"]] == [2, 4, 6][:max_attempts]
    assert conf["k"] == confirmed and conf["confirmed"] == (confirmed is not None)
    if confirmed:
        assert conf["try"] == 4 and conf["nodes"] == start[:6] and conf["attempts"][-1]["name"] == "try4"


def test_no_revert_pass_when_the_pick_is_not_confirmed(setup, tmp_path):  # noqa: F811
    cfg = setup(_costly, confirm_curve=lambda nodes, seed: BASELINE_AP - 2.0, random_seeds=0, revert_probes=5)
    cfg.confirm = _confirm(tmp_path, max_attempts=1)
    data = search_run.run_search(cfg)
    assert not data["confirmation"]["confirmed"] and data["revert"] is None


def _record(path: Path, ap: float, model_sha: str, ids: list[int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    metrics = {"map50_95": ap / 100.0}
    record = {
        "schema_version": 1,
        "kind": "metrics",
        "status": "ok",
        "metrics": metrics,
        "model": {"sha256": model_sha},
        "dataset": {"image_ids": ids},
    }
    path.write_text(json.dumps(record))
    return path


def _search_with_revert(tmp_path: Path) -> dict:
    """A search.json's revert block over real files: the final set K=14, confirmed at ΔAP -0.4."""
    hasher = Hasher()
    model = tmp_path / "search-int8" / "revert" / "onnx" / "m-int8-k14_revert04.onnx"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"model")
    sha = hasher(model)
    final = _record(tmp_path / "search-int8" / "revert" / "int8-k14_revert04-coco" / "metrics.json", 49.5, sha, [1, 2])
    conf = _record(final.parent.parent / "int8-k14_revert04-confirm-coco" / "metrics.json", 49.6, sha, [5, 6])
    base = _record(tmp_path / "baseline-confirm-coco" / "metrics.json", 50.0, "f" * 64, [5, 6])

    def files(metrics: Path, ap: float) -> dict:
        return {
            "model_path": str(model),
            "model_sha256": sha,
            "metrics_path": str(metrics),
            "metrics_sha256": hasher(metrics),
            "ap": ap,
        }

    tries = [
        {"node": NODES[15], "k": 15, "delta": 0.625, "margin": 0.0, "kept": False},
        {"node": NODES[14], "k": 15, "delta": 0.625, "margin": 0.0, "kept": False},
        {"node": NODES[13], "k": 15, "delta": 0.5, "margin": 0.0, "kept": True},
        {"node": NODES[12], "k": 14, "delta": 0.5, "margin": 0.0, "kept": True, **files(final, 49.5)},
    ]
    paired = {"delta_ap": -0.4, "ci_low": -0.6, "ci_high": -0.2, "std_error": 0.1, "n_images": 2}
    nodes = [n for n in NODES[:16] if n not in (NODES[12], NODES[13])]
    revert = {
        "start_k": 16,
        "k": 14,
        "gained": 2,
        "nodes": nodes,
        "tries": tries,
        "confirmation": {
            "step": 2,
            "rule": "r",
            "attempts": [{"try": 4, "k": 14, **files(conf, 49.6), "paired_delta": paired, "within_budget": True}],
            "k": 14,
            "nodes": list(nodes),
            "try": 4,
            "confirmed": True,
        },
    }
    return {"budget_ap": 0.5, "confirmation": {"baseline_metrics": str(base)}, "revert": revert}


def test_the_report_summarises_a_revert_pass_whose_files_check_out(tmp_path):
    data = _search_with_revert(tmp_path)
    summary = revert_summary(tmp_path / "search.json", data, Hasher())
    assert summary["k"] == 14 and summary["gained"] == 2 and summary["confirmed"] and summary["tries"] == 4
    assert summary["search_delta_ap"] == -0.5 and summary["confirmation"]["attempts"][0]["delta_ap"] == -0.4
    assert summary["confirmed_k"] == 14 and summary["metrics_path"].endswith("int8-k14_revert04-coco/metrics.json")
    assert revert_summary(tmp_path / "search.json", {"revert": None}, Hasher()) is None


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda d, p: d["revert"].update(gained=3), "do not fit"),
        (lambda d, p: d["revert"]["tries"][0].update(kept=True), "try 1 says kept=True"),
        (lambda d, p: d["revert"]["nodes"].append(NODES[13]), "do not fit"),
        (lambda d, p: d["revert"]["confirmation"]["attempts"][0].update(ap=49.9), "is not the"),
        (lambda d, p: d["revert"]["confirmation"]["attempts"][0]["paired_delta"].update(delta_ap=-0.2), "AP less the"),
        (lambda d, p: d["revert"]["confirmation"]["attempts"][0].update({"try": 3}), "kept no such set"),
        (lambda d, p: d["revert"]["confirmation"].update(confirmed=False), "does not follow"),
        (lambda d, p: d["revert"]["confirmation"]["nodes"].pop(), "confirmed nodes"),
        (lambda d, p: Path(d["revert"]["tries"][3]["metrics_path"]).write_text("{}"), "changed since the search"),
        (lambda d, p: _record(p / "baseline-confirm-coco" / "metrics.json", 50.0, "f" * 64, [7, 8]), "other images"),
        (lambda d, p: d["revert"].pop("tries"), "incomplete"),
    ],
)
def test_the_report_drops_a_revert_pass_that_does_not_add_up(tmp_path, edit, reason):
    data = _search_with_revert(tmp_path)
    edit(data, tmp_path)
    with pytest.raises(UserError, match=reason):
        revert_summary(tmp_path / "search.json", data, Hasher())


def _with_revert(run, confirm_map: float = 0.507) -> Path:
    """``run`` (test_report_ci's confirmed search, pick K=2) with a revert pass that put NODES[1] back in low
    precision: the final set K=1, 0.3 AP lost on the search slice and (``confirm_map``) on the confirmation slice."""
    doc = run.confirm(pick_map=0.507)
    stem, root = "m-int8-k1_revert01", run.root / "search-int8" / "revert"
    final = run.run.variant("search-int8/revert/int8-k1_revert01-coco", stem, 0.497, 0.68, 50.0, manifest=False)
    conf = run.run.variant(
        "search-int8/revert/int8-k1_revert01-confirm-coco",
        stem,
        confirm_map,
        0.68,
        50.0,
        manifest=False,
        image_ids=CONFIRM_IDS,
    )
    model = run.root / "onnx" / f"{stem}.onnx"
    sha = _sha(model.read_bytes())
    record = {
        "schema_version": 2,
        "kind": "candidate",
        "candidate": "int8-k1_revert01",
        "model_sha256": sha,
        "full_model": str(run.full),
        "random_seed": None,
        "metrics_sha256": _sha(final.read_bytes()),
        "build": {"method": "full", "full_model_sha256": _sha(run.full.read_bytes()), "nodes": [NODES_R[0]]},
    }
    model.with_suffix(".inputs.json").write_text(json.dumps(record))
    base, base_confirm = 50.0, CONFIRM_BASE * 100.0

    def files(metrics: Path, ap: float) -> dict:
        return {
            "name": "int8-k1_revert01",
            "model_path": str(model),
            "model_sha256": sha,
            "metrics_path": str(metrics),
            "metrics_sha256": _sha(metrics.read_bytes()),
            "ap": ap,
        }

    paired = {
        "delta_ap": confirm_map * 100 - base_confirm,
        "std_error": 0.1,
        "n_images": 3,
        "n_boot": 1000,
        "confidence": 0.95,
        "seed": 0,
    }
    paired.update(ci_low=paired["delta_ap"] - 0.2, ci_high=paired["delta_ap"] + 0.2)
    within = -paired["delta_ap"] <= 0.5
    doc["revert"] = {
        "start_k": 2,
        "k": 1,
        "gained": 1,
        "nodes": [NODES_R[0]],
        "reverted": [NODES_R[1]],
        "untried": [NODES_R[0]],
        "tries": [
            {
                "node": NODES_R[1],
                "k": 1,
                "map": 49.7,
                "delta": base - 49.7,
                "meets": True,
                "std_error": 0.1,
                "margin": 0.084,
                "kept": True,
                "suffix": "_revert01",
                **files(final, 49.7),
            }
        ],
        "confirmation": {
            "step": 1,
            "rule": "r",
            "attempts": [
                {"try": 1, "k": 1, **files(conf, confirm_map * 100), "paired_delta": paired, "within_budget": within}
            ],
            "k": 1 if within else None,
            "nodes": [NODES_R[0]] if within else None,
            "try": 1 if within else None,
            "confirmed": within,
        },
        "confirmed": within,
    }
    assert root.is_dir()
    run.write_search(doc)
    return conf


def test_a_confirmed_revert_pass_is_a_row_the_report_may_recommend(load_script, tmp_path):
    run = ConfirmedRun(tmp_path / "run")
    _with_revert(run)
    report = _confirm_report(load_script, run)
    row = next(v for v in report["variants"] if v["label"] == "INT8 K=1 (revert pass)")
    assert row["candidate"]["revert_try"] == 1 and row["excluded_nodes"] == 1
    assert row["confirmation"]["within_budget"] and row["confirmation"]["interval_source"].startswith("search.json")
    assert (
        row["label"] not in report["recommended"]["not_eligible"]
        and row["label"] in report["recommended"]["within_budget"]
    )
    (s,) = report["search"]
    assert s["revert"]["k"] == 1 and s["revert"]["gained"] == 1 and s["revert"]["confirmed"]
    assert not report["dropped"], report["dropped"]
    assert "**INT8 revert pass**" in (run.root / "report.md").read_text()
    assert (run.root / "search-curves.png").read_bytes()[:4] == b"\x89PNG"  # drawn with the pass's two points


def test_a_revert_pass_that_misses_on_new_images_is_no_row(load_script, tmp_path):
    run = ConfirmedRun(tmp_path / "run")
    _with_revert(run, confirm_map=0.50)  # loses 1.0 AP on the confirmation slice
    report = _confirm_report(load_script, run)
    assert not any("revert" in v["label"] for v in report["variants"])
    assert report["search"][0]["revert"]["confirmed"] is False
    assert "Not confirmed on new images: the pick stands." in (run.root / "report.md").read_text()


def test_a_revert_pass_whose_files_changed_is_dropped_and_the_search_stands(load_script, tmp_path):
    run = ConfirmedRun(tmp_path / "run")
    conf = _with_revert(run)
    run.rewrite_metrics(conf, lambda d: d["metrics"].update(map50_95=0.509))
    report = _confirm_report(load_script, run)
    assert "revert pass" in _dropped(report, run.search_path) and report["search"][0]["revert"] is None
    assert not any("revert" in v["label"] for v in report["variants"])
    assert report["recommended"]["variant"] != "FP32"  # the search's confirmed pick stands


@pytest.mark.parametrize("parallel", [2, 3])
@pytest.mark.parametrize(
    ("back", "kept"),
    [
        (lambda removed: False, "none"),  # a pick at the edge: every try fails
        (lambda removed: True, "all"),  # every try is kept
        (lambda removed: all(NODES.index(n) % 3 for n in removed), "some"),  # kept and failed tries mixed
    ],
    ids=["all-fail", "all-kept", "mixed"],
)
def test_each_round_guesses_from_the_last_try_and_keeps_the_one_at_a_time_result(parallel, back, kept):
    evaluated: list[int] = []

    def probe(nodes, i):
        evaluated.append(i)
        removed = [n for n in NODES[:10] if n not in nodes]
        return judge(len(nodes), BASELINE_AP - (0.2 if back(removed) else 0.8), BASELINE_AP, 0.5)

    one = revert_pass(NODES[:10], probe, max_probes=9)
    assert {"none": 0, "all": 9}.get(kept, one.gained) == one.gained and (kept != "some" or 0 < one.gained < 9)
    evaluated.clear()
    many = revert_pass(NODES[:10], probe, max_probes=9, parallel=parallel)
    assert [(t.node, t.probe, t.kept) for t in many.tries] == [(t.node, t.probe, t.kept) for t in one.tries]
    assert many.nodes == one.nodes and len(evaluated) == 9 + many.discarded
    if kept in ("none", "all"):  # only the first round of a run of failures guesses wrong
        assert many.discarded == (parallel - 1 if kept == "none" else 0)
