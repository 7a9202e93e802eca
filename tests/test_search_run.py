"""The per-mode budget search (lowbit.search_run) with a stand-in evaluation: curve shapes, random controls,
cached candidates, and the report's record and plot of it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import pytest

from lowbit import candidates, candidates_ranking, coco_eval, search_checks, search_run
from lowbit import report as rep
from lowbit.ap_bootstrap import PairedDelta
from lowbit.errors import UserError
from lowbit.search_confirm import ConfirmConfig

NODES = [f"/model.{i}/conv/Conv" for i in range(40)]
BASELINE_AP = 50.0


class FakeStore:
    """Stands in for CandidateStore: the AP of a candidate is a function of its float nodes (``confirm_curve`` on
    the confirmation slice, ``curve`` on the search slice)."""

    calls: ClassVar[list[tuple[int, int | None]]] = []
    confirm_calls: ClassVar[list[int]] = []
    aps: ClassVar[dict[Path, float]] = {}  # AP points by metrics path, read back by FakeIntervals

    def __init__(self, run_root, mode, stem, full_model, evaluation, slice_tag="", **kw):
        self.run_root, self.mode, self.slice_tag = Path(run_root), mode, slice_tag

    def evaluate(self, nodes, random_seed=None):
        if self.slice_tag:
            FakeStore.confirm_calls.append(len(nodes))
            ap = FakeStore.confirm_curve(nodes, random_seed)
        else:
            FakeStore.calls.append((len(nodes), random_seed))
            ap = FakeStore.curve(nodes, random_seed)
        name = candidates.candidate_name(self.mode, len(nodes), random_seed)
        folder = f"{name}-{self.slice_tag}-coco" if self.slice_tag else f"{name}-coco"
        metrics = self.run_root / folder / "metrics.json"
        FakeStore.aps[metrics] = ap
        return candidates.Evaluated(
            name, len(nodes), list(nodes), random_seed, ap / 100.0, self.run_root / f"{name}.onnx", metrics, False
        )


class FakeIntervals:
    """Stands in for search_confirm.SliceIntervals: ΔAP from the recorded APs, standard error ``FakeIntervals.se``."""

    se: ClassVar[float] = 0.0

    def __init__(self, coco, baseline_metrics, flag, ann_sha256, cache=None):
        self.base = _ap(baseline_metrics)
        self.baseline_map50_95 = self.base / 100.0

    def paired(self, metrics_path, confidence=0.95, flag=""):
        ap = FakeStore.aps[metrics_path] if metrics_path in FakeStore.aps else _ap(metrics_path)
        d, h = ap - self.base, 1.96 * FakeIntervals.se
        return PairedDelta(d, d - h, d + h, FakeIntervals.se, 4, 10, confidence, 0)


def _ap(path: Path) -> float:
    return json.loads(Path(path).read_text())["metrics"]["map50_95"] * 100.0


def _metrics(path: Path, map50_95: float) -> Path:
    path.write_text(json.dumps({"metrics": {"map50_95": map50_95}}))
    return path


def _checked_inputs(cfg: search_run.SearchConfig) -> search_checks.SearchInputs:
    """Stands in for search_checks.check_inputs (its checks have their own tests in test_search_trust.py)."""

    ap = _ap
    dataset = candidates.DatasetKey(cfg.run_root / "instances_val2017.json", "a" * 64, (1, 2, 3, 4))
    digests = {role: "b" * 64 for role in ("full_model", "onnx", "ranking", "baseline_metrics")}
    report = {"source": "onnx", "method": {"name": "loo"}}
    k0_ap = ap(cfg.k0_metrics) if cfg.k0_metrics else None
    confirm = candidates.DatasetKey(dataset.ann_file, "a" * 64, (5, 6, 7)) if cfg.confirm else None
    return search_checks.SearchInputs(
        list(NODES), [], report, ap(cfg.baseline_metrics), k0_ap, dataset, digests, confirm_dataset=confirm
    )


@pytest.fixture()
def setup(tmp_path, monkeypatch):
    monkeypatch.setattr(search_run, "CandidateStore", FakeStore)
    monkeypatch.setattr(search_run, "check_inputs", _checked_inputs)
    monkeypatch.setattr(search_run, "SliceIntervals", FakeIntervals)
    monkeypatch.setattr(coco_eval, "load_coco", lambda ann_file, flag="": None)
    FakeStore.calls, FakeStore.confirm_calls, FakeStore.aps, FakeIntervals.se = [], [], {}, 0.0

    def config(curve, confirm_curve=None, **kw):
        FakeStore.curve = staticmethod(curve)
        FakeStore.confirm_curve = staticmethod(confirm_curve or curve)
        evaluation = candidates.EvalConfig(tmp_path / "data", 4)
        return search_run.SearchConfig(
            mode="int8",
            ranking=tmp_path / "r.json",
            onnx_path=tmp_path / "m.onnx",
            full_model=tmp_path / "full.onnx",
            baseline_metrics=_metrics(tmp_path / "base.json", BASELINE_AP / 100.0),
            run_root=tmp_path,
            evaluation=evaluation,
            **kw,
        )

    return config


def _ranked(loss_at):
    """AP along the ranking: ``loss_at(k)`` AP points lost with the top-k in float; random picks lose 1 AP more."""

    def curve(nodes, seed):
        return BASELINE_AP - loss_at(len(nodes)) - (1.0 if seed is not None else 0.0)

    return curve


def test_monotone_curve_finds_the_smallest_k_with_random_controls(setup):
    data = search_run.run_search(setup(_ranked(lambda k: max(0.0, 2.0 - 0.1 * k))))  # meets from K=15
    s = data["search"]
    assert s["found"] and s["k"] == 15 and "bisection converged" in s["reason"]
    ks = [k for k, seed in FakeStore.calls if seed is None]
    assert len(ks) == len(set(ks)) <= 9  # each K evaluated once, logarithmically many
    rc = data["random_control"]
    assert rc["k"] == 15 and rc["seeds"] == [0, 1, 2] and len(rc["aps"]) == 3
    assert rc["mean_delta"] == pytest.approx(1.5) and rc["ranking_delta"] == pytest.approx(0.5)
    assert rc["beats_chance"] and rc["margin_ap"] == pytest.approx(1.0) and rc["sd_delta"] == pytest.approx(0.0)
    assert [c["k"] for c in data["candidates"]] == sorted(ks)


def test_random_band_covers_every_probed_k(setup):
    data = search_run.run_search(setup(_ranked(lambda k: max(0.0, 2.0 - 0.1 * k)), random_seeds=2, random_band=True))
    probed = sorted(p["k"] for p in data["search"]["curve"] if p["k"] > 0)
    assert [b["k"] for b in data["random_band"]] == probed
    assert all(b["seeds"] == [0, 1] for b in data["random_band"])
    summary = rep.search_summary(data)
    assert [b["k"] for b in summary["random_band"]] == probed
    assert rep.plot_search_curves({"search": [summary], "budget_ap": 0.5})[:4] == b"\x89PNG"


def test_non_monotone_curve_is_scanned_below(setup):
    # meets at K=3, K=10 and K>=30 only: the seeds show K=10 meeting and K=20 failing, so the Ks that
    # bisection skipped below 10 are evaluated and the real smallest, 3, is found
    data = search_run.run_search(
        setup(_ranked(lambda k: 0.2 if k in (3, 10) or k >= 30 else 1.0), seed_ks=[5, 10, 20], max_probes=40)
    )
    s = data["search"]
    assert s["k"] == 3 and s["scanned"] and s["exhaustive_below"] and [10, 20] in s["monotone_violations"]


def test_nothing_meets_the_budget_keeps_the_best_point(setup):
    data = search_run.run_search(setup(_ranked(lambda k: 3.0 - 0.01 * k)))
    s = data["search"]
    assert not s["found"] and s["k"] == len(NODES) and "no evaluated K meets" in s["reason"]
    assert data["random_control"]["k"] == len(NODES)


def test_k0_meets_the_budget_with_one_evaluation_and_no_controls(setup):
    data = search_run.run_search(setup(_ranked(lambda k: 0.1)))
    assert data["search"]["k"] == 0 and FakeStore.calls == [(0, None)] and data["random_control"] is None


def test_known_k0_is_not_evaluated_again(setup, tmp_path):
    k0 = _metrics(tmp_path / "k0.json", (BASELINE_AP - 2.0) / 100.0)
    data = search_run.run_search(setup(_ranked(lambda k: 0.0 if k >= 1 else 2.0), k0_metrics=k0, random_seeds=0))
    assert data["search"]["k"] == 1 and (0, None) not in FakeStore.calls


def test_standard_error_margin_moves_the_pick_up(setup):
    # loss 2 - 0.1 K: the point estimate meets from K=15; with SE 0.5 at confidence 0.8 (z 0.84) the loss
    # plus 0.42 must be within 0.5, which first holds at K=20
    FakeIntervals.se = 0.5
    data = search_run.run_search(setup(_ranked(lambda k: max(0.0, 2.0 - 0.1 * k)), random_seeds=0, confidence=0.8))
    assert data["search"]["k"] == 20 and data["pick_k"] == 20 and data["z"] == pytest.approx(0.8416, abs=1e-4)
    rows = {c["k"]: c for c in data["candidates"]}
    assert rows[20]["paired_delta"]["std_error"] == 0.5
    point = search_run.run_search(setup(_ranked(lambda k: max(0.0, 2.0 - 0.1 * k)), random_seeds=0, confidence=0.5))
    assert point["search"]["k"] == 15 and point["z"] == 0.0


def _confirm(tmp_path, max_attempts=3) -> ConfirmConfig:
    return ConfirmConfig(_metrics(tmp_path / "confirm-base.json", BASELINE_AP / 100.0), 3, 600, max_attempts)


def test_a_pick_that_fails_on_new_images_moves_up_by_the_documented_step(setup, tmp_path):
    # search slice: meets from K=15; new images lose 0.3 AP more, so K=15 and 17 fail there and K=19 holds
    # (step = ceil(40 / 20) = 2)
    search = lambda k: max(0.0, 2.0 - 0.1 * k)
    data = search_run.run_search(
        setup(
            _ranked(search),
            confirm_curve=_ranked(lambda k: search(k) + 0.3),
            random_seeds=0,
            confirm=_confirm(tmp_path),
        )
    )
    conf = data["confirmation"]
    assert data["search"]["k"] == 15 and conf["step"] == 2 and FakeStore.confirm_calls == [15, 17, 19]
    assert [a["within_budget"] for a in conf["attempts"]] == [False, False, True]
    assert conf["confirmed"] and conf["k"] == 19 and data["pick_k"] == 19
    assert conf["attempts"][0]["delta_ap"] == pytest.approx(0.8) and conf["attempts"][0][
        "search_delta_ap"
    ] == pytest.approx(0.5)
    assert [p["k"] for p in conf["search_points"]] == [17, 19]  # evaluated on the search slice first
    assert conf["images"]["num_images"] == 3 and "confirmed when its loss" in conf["rule"]
    assert "Confirmation on 3 images" in search_run.search_markdown(data)
    summary = rep.search_summary(data)  # the report's curve holds the Ks the confirmation evaluated too
    assert [p["k"] for p in summary["probes"]] == sorted(
        p["k"] for p in data["search"]["curve"] + conf["search_points"]
    )
    assert summary["pick_k"] == 19 and 19 in [p["k"] for p in summary["probes"]]


def test_an_unconfirmed_pick_is_said_so_and_not_moved(setup, tmp_path):
    data = search_run.run_search(
        setup(
            _ranked(lambda k: max(0.0, 2.0 - 0.1 * k)),
            confirm_curve=_ranked(lambda k: 2.0),
            random_seeds=0,
            confirm=_confirm(tmp_path, max_attempts=2),
        )
    )
    conf = data["confirmation"]
    assert not conf["confirmed"] and conf["k"] is None and len(conf["attempts"]) == 2
    assert data["pick_k"] == data["search"]["k"] == 15


@pytest.mark.parametrize(
    ("field", "value", "flag"),
    [
        ("budget_ap", 0.0, "--budget-ap"),
        ("random_seeds", -1, "--random-seeds"),
        ("max_probes", 0, "--max-probes"),
        ("parallel", 0, "--parallel-probes"),
    ],
)
def test_bad_settings_name_their_flag(setup, field, value, flag):
    with pytest.raises(UserError) as exc:
        search_run.run_search(setup(_ranked(lambda k: 0.0), **{field: value}))
    assert exc.value.flag == flag


@pytest.mark.parametrize(
    ("extra", "flag"),
    [
        (["--parallel-probes", "0"], "--parallel-probes"),
        (["--max-probes", "0"], "--max-probes"),
        (["--budget-ap", "-1"], "--budget-ap"),
    ],
)
def test_cli_bad_numbers_fail_before_the_search_folder_exists(tmp_path, load_script, capsys, extra, flag):
    files = {name: tmp_path / f"{name}.json" for name in ("ranking", "onnx", "full", "baseline")}
    for path in files.values():
        path.write_text("{}")
    run_root = tmp_path / "run"
    argv = [
        "--mode",
        "int8",
        "--run-root",
        str(run_root),
        "--ranking",
        str(files["ranking"]),
        "--onnx-path",
        str(files["onnx"]),
        "--full-model",
        str(files["full"]),
        "--baseline-metrics",
        str(files["baseline"]),
        "--data-root",
        str(tmp_path),
        *extra,
    ]
    assert load_script("scripts/cv-models/search_yolov10m_lowbit_budget.py").main(argv) == 2
    assert f"error: {flag}" in capsys.readouterr().err
    assert not run_root.exists()


def test_report_records_the_search_and_plots_the_curve(setup):
    data = search_run.run_search(setup(_ranked(lambda k: max(0.0, 2.0 - 0.1 * k))))
    summary = rep.search_summary(data)
    assert summary["k"] == 15 and summary["found"] and summary["random_control"]["beats_chance"]
    assert [p["k"] for p in summary["probes"]] == sorted(p["k"] for p in summary["probes"])
    assert all(p["delta_ap"] <= 0 for p in summary["probes"])  # ΔAP = AP - FP32: a loss is negative
    png = rep.plot_search_curves({"search": [summary, {**summary, "mode": "fp8"}], "budget_ap": 0.5})
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    lines = "\n".join(rep.search_markdown([summary]))
    assert "| INT8 | loo | 15 |" in lines


def test_random_nodes_are_seeded_and_ignore_the_ranking_order():
    a = candidates_ranking.random_nodes(NODES, 5, seed=1)
    assert a == candidates_ranking.random_nodes(list(reversed(NODES)), 5, seed=1) and len(set(a)) == 5
    assert a != candidates_ranking.random_nodes(NODES, 5, seed=2)
