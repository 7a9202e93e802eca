"""The report uses only records of this run (lowbit/report_inputs.py): what it leaves out, and when it stops.

Each test damages one file of a consistent run folder (FP32 baseline, the full INT8 model, two budget-search
candidates, a random control, and the search.json that cites them), runs the report command, and checks
that the damaged record is named with its reason under ``dropped`` (or in the one error), and that nothing
taken from it is listed or recommended.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from test_report import ANN_SHA, IMAGE_IDS, SCRIPT, RunDir, _sha

from lowbit import budget_search, records

BUDGET = 0.5  # AP points, the search's and the report's
BASE_MAP = 0.50
FULL_MAP = 0.490  # K=0: loses 1.0 AP
CANDIDATE_MAPS = {1: 0.494, 2: 0.4975}  # K=1 loses 0.6, K=2 loses 0.25: the K found is 2
CONTROL_MAP = 0.492  # K=2 with two nodes drawn at random (seed 0)
NODES = ["/model.2/cv1/conv/Conv", "/model.0/conv/Conv"]


class SearchRun:
    """A run folder as the workflow leaves it after an INT8 budget search, every record consistent."""

    def __init__(self, root: Path, base_map: float = BASE_MAP, fp32_bytes: bytes = b"fp32-model" * 100):
        self.run = RunDir(root, fp32_bytes)
        self.root, self.base_map = root, base_map
        self.baseline = self.run.baseline(map50_95=base_map, map50=0.70, p50=90.0)
        self.k0 = self.run.variant("int8-coco", "m-int8-qdq", FULL_MAP, 0.69, 50.0)
        self.full = root / "onnx" / "m-int8-qdq.onnx"
        self.ranking = root / "ranking.json"
        ranking = {"schema_version": 1, "kind": "sensitivity", "source": "onnx", "nodes": NODES}
        self.ranking.write_text(json.dumps(ranking))
        self.metrics = {k: self._candidate(f"int8-k{k}", NODES[:k], ap) for k, ap in CANDIDATE_MAPS.items()}
        self.control = self._candidate("int8-k2_random0", list(reversed(NODES)), CONTROL_MAP, seed=0)
        self.search_path = root / "search-int8" / "search.json"
        self.write_search(self.search_doc())

    def _candidate(self, name: str, nodes: list[str], map50_95: float, seed: int | None = None) -> Path:
        """A candidate cut from the full model: its model, its ``.inputs.json`` record, its evaluation."""
        metrics = self.run.variant(f"{name}-coco", f"m-{name}", map50_95, 0.68, 50.0, manifest=False)
        model = self.root / "onnx" / f"m-{name}.onnx"
        record = {
            "schema_version": 2,
            "kind": "candidate",
            "candidate": name,
            "model_sha256": _sha(model.read_bytes()),
            "full_model": str(self.full),
            "random_seed": seed,
            "metrics_sha256": _sha(metrics.read_bytes()),
            "build": {"method": "full", "full_model_sha256": _sha(self.full.read_bytes()), "nodes": nodes},
        }
        model.with_suffix(".inputs.json").write_text(json.dumps(record))
        return metrics

    def _row(self, k: int, metrics: Path, seed: int | None = None) -> dict:
        doc = json.loads(metrics.read_text())
        ap = doc["metrics"]["map50_95"] * 100.0
        name = f"int8-k{k}" + (f"_random{seed}" if seed is not None else "")
        return {
            "k": k,
            "name": name,
            "random_seed": seed,
            "ap": ap,
            "delta_ap": self.base_map * 100.0 - ap,
            "metrics_path": str(metrics),
            "model_path": doc["model"]["path"],
            "reused": False,
            "model_sha256": doc["model"]["sha256"],
            "metrics_sha256": _sha(metrics.read_bytes()),
        }

    def search_doc(self) -> dict:
        """search.json as lowbit.search_run writes it (schema_version 1, provenance, per-candidate sha256)."""
        baseline_ap = self.base_map * 100.0
        aps = {k: m * 100.0 for k, m in CANDIDATE_MAPS.items()}
        result = budget_search.search_smallest_k(
            lambda k: aps[k], len(NODES), BUDGET, baseline_ap, known={0: FULL_MAP * 100.0}
        )
        control_row = self._row(2, self.control, seed=0)
        deltas = [control_row["delta_ap"]]
        ranking_delta = baseline_ap - aps[2]
        control = {
            "k": 2,
            "seeds": [0],
            "aps": [control_row["ap"]],
            "deltas": deltas,
            "mean_delta": deltas[0],
            "sd_delta": 0.0,
            "min_delta": deltas[0],
            "max_delta": deltas[0],
            "ranking_delta": ranking_delta,
            "margin_ap": statistics.fmean(deltas) - ranking_delta,
            "beats_chance": ranking_delta < deltas[0],
            "candidates": [control_row],
        }
        return {
            "schema_version": 1,
            "kind": "search",
            "mode": "int8",
            "ranking": {
                "report": str(self.ranking),
                "source": "onnx",
                "method": "single",
                "nodes": NODES,
                "unmatched_layers": [],
            },
            "budget_ap": BUDGET,
            "baseline_ap": baseline_ap,
            "baseline_metrics": str(self.baseline),
            "full_model": str(self.full),
            "build": "full",
            "parallel": 1,
            "search": result.to_dict(),
            "candidates": [self._row(k, self.metrics[k]) for k in sorted(self.metrics)],
            "random_control": control,
            "random_band": [control],
            "settings": {},
            "provenance": {
                "full_model_sha256": _sha(self.full.read_bytes()),
                "onnx_sha256": self.run.fp32_sha,
                "ranking_sha256": _sha(self.ranking.read_bytes()),
                "baseline_metrics_sha256": _sha(self.baseline.read_bytes()),
                "k0_metrics_sha256": _sha(self.k0.read_bytes()),
                "calib_sha256": None,
                "ann_sha256": ANN_SHA,
                "image_ids_sha256": records.image_ids_sha256(IMAGE_IDS),
                "num_images": len(IMAGE_IDS),
                "quantizer_manifest": None,
                "settings_sha256": records.settings_sha256({}),
            },
            "notes": [],
            "wall_s": 1.0,
        }

    def write_search(self, doc: dict) -> None:
        self.search_path.parent.mkdir(exist_ok=True)
        self.search_path.write_text(json.dumps(doc))

    def rewrite_metrics(self, path: Path, edit) -> None:
        doc = json.loads(path.read_text())
        edit(doc)
        path.write_text(json.dumps(doc))  # json writes NaN as the bare token NaN, as a careless writer would


@pytest.fixture()
def search_run(tmp_path) -> SearchRun:
    return SearchRun(tmp_path / "run")


def _report(load_script, run: SearchRun, *extra: str) -> dict:
    main = load_script(SCRIPT).main
    assert main(["--run-dir", str(run.root), "--tensorrt", "off", "--budget-ap", str(BUDGET), *extra]) == 0
    return json.loads((run.root / "report.json").read_text())


def _error(load_script, run: SearchRun, capsys, *extra: str) -> str:
    capsys.readouterr()
    main = load_script(SCRIPT).main
    assert main(["--run-dir", str(run.root), "--tensorrt", "off", *extra]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and "Traceback" not in err
    assert not (run.root / "report.json").exists()
    return err


def _dropped(report: dict, path: Path) -> str:
    """The reason ``path`` was left out; it is listed once, in report.json and in report.md's Dropped section."""
    reasons = [d["reason"] for d in report["dropped"] if Path(d["path"]) == path.resolve()]
    assert len(reasons) == 1, report["dropped"]
    md = (path.parent.parent / "report.md").read_text()  # <run>/<step>/metrics.json, <run>/search-int8/search.json
    assert "## Dropped" in md and f"`{path.resolve()}`" in md
    return reasons[0]


def _not_used(report: dict, metrics: Path) -> None:
    """Nothing of the evaluation ``metrics`` is a row, the recommendation or a record the report used."""
    assert all(not v["metrics_path"].endswith(f"{metrics.parent.name}/metrics.json") for v in report["variants"])
    assert not report["recommended"]["metrics_path"].endswith(f"{metrics.parent.name}/metrics.json")
    assert all(not p.endswith(f"{metrics.parent.name}/metrics.json") for p in report["provenance"]["records"])


def _search_dropped(report: dict, run: SearchRun) -> str:
    reason = _dropped(report, run.search_path)
    assert str(run.search_path) in reason
    assert report["search"] == [] and not (run.root / "search-curves.png").exists()
    assert str(run.search_path.resolve()) not in report["provenance"]["records"]
    return reason


# ----------------------------------------------------------------------------------------------------------------------
# the consistent run


def test_consistent_run_uses_every_record_and_the_search(load_script, search_run):
    report = _report(load_script, search_run)
    assert report["dropped"] == []
    assert report["schema_version"] == records.SCHEMA_VERSIONS["report"]
    assert [s["k"] for s in report["search"]] == [2] and (search_run.root / "search-curves.png").is_file()
    assert report["recommended"]["variant"] == "INT8 K=2"
    prov = report["provenance"]
    assert prov["model_sha256"] == search_run.run.fp32_sha and prov["ann_sha256"] == ANN_SHA
    assert prov["image_ids_sha256"] == records.image_ids_sha256(IMAGE_IDS)
    used = {
        Path(p).name if Path(p).name != "metrics.json" else Path(p).parent.name: sha
        for p, sha in prov["records"].items()
    }
    assert used["search.json"] == _sha(search_run.search_path.read_bytes())
    assert used["baseline-coco"] == _sha(search_run.baseline.read_bytes())
    assert "m-int8-k2.inputs.json" in used and "m-int8-qdq.manifest.json" in used
    assert len([p for p in prov["records"] if p.endswith("metrics.json")]) == len(report["variants"]) == 5


# ----------------------------------------------------------------------------------------------------------------------
# search.json: a search of this run, or dropped


def test_search_copied_from_a_run_with_another_baseline_is_dropped(load_script, search_run, tmp_path):
    other = SearchRun(tmp_path / "other", base_map=0.53, fp32_bytes=b"another fp32 model")
    search_run.search_path.write_bytes(other.search_path.read_bytes())
    reason = _search_dropped(_report(load_script, search_run), search_run)
    assert "FP32 AP is 53.0000" in reason and "another run" in reason


def test_search_of_another_fp32_model_is_dropped(load_script, search_run):
    doc = search_run.search_doc()
    doc["provenance"]["onnx_sha256"] = "f" * 64
    search_run.write_search(doc)
    reason = _search_dropped(_report(load_script, search_run), search_run)
    assert "FP32 model sha256 ffffffffffff" in reason


def test_search_with_a_tampered_k_is_dropped(load_script, search_run):
    doc = search_run.search_doc()
    doc["search"]["k"] = 47
    search_run.write_search(doc)
    reason = _search_dropped(_report(load_script, search_run), search_run)
    assert "K found (47) is none of its candidate rows" in reason


def test_search_with_a_tampered_delta_ap_is_dropped(load_script, search_run):
    doc = search_run.search_doc()
    doc["search"]["delta"] = -5.0  # shown as ΔAP +5.00 at the K found
    search_run.write_search(doc)
    reason = _search_dropped(_report(load_script, search_run), search_run)
    assert "K found (2): loss -5.0000 AP" in reason
    # a candidate row's ΔAP, and a random control's statistics, are checked as well
    doc = search_run.search_doc()
    doc["candidates"][0]["delta_ap"] += 5.0
    search_run.write_search(doc)
    assert "candidate int8-k1: loss" in _search_dropped(_report(load_script, search_run, "--overwrite"), search_run)
    doc = search_run.search_doc()
    doc["random_control"]["mean_delta"] = -5.0
    search_run.write_search(doc)
    reason = _search_dropped(_report(load_script, search_run, "--overwrite"), search_run)
    assert "random controls at K=2: mean_delta -5.0" in reason


def test_truncated_search_is_dropped(load_script, search_run):
    text = search_run.search_path.read_text()
    search_run.search_path.write_text(text[: len(text) // 2])
    reason = _search_dropped(_report(load_script, search_run), search_run)
    assert "not valid JSON (truncated or corrupted?)" in reason


def test_search_without_schema_version_is_dropped(load_script, search_run):
    doc = search_run.search_doc()
    del doc["schema_version"]
    search_run.write_search(doc)
    reason = _search_dropped(_report(load_script, search_run), search_run)
    assert "the schema is missing" in reason


def test_search_without_kind_is_dropped(load_script, search_run):
    doc = search_run.search_doc()
    del doc["kind"]  # written before records named their kind
    search_run.write_search(doc)
    reason = _search_dropped(_report(load_script, search_run), search_run)
    assert "names no kind" in reason


def test_deleted_candidate_metrics_are_not_cited(load_script, search_run):
    search_run.metrics[2].unlink()
    report = _report(load_script, search_run)
    reason = _search_dropped(report, search_run)
    assert f"cites {search_run.metrics[2]}, which does not exist" in reason
    _not_used(report, search_run.metrics[2])
    assert report["recommended"]["variant"] == "FP32"  # K=1 loses 0.6 AP: nothing left within 0.5


# ----------------------------------------------------------------------------------------------------------------------
# one variant's evaluation: dropped with its reason


def test_recommended_model_truncated_is_dropped(load_script, search_run):
    model = search_run.root / "onnx" / "m-int8-k2.onnx"
    model.write_bytes(model.read_bytes()[:400])
    report = _report(load_script, search_run)
    reason = _dropped(report, search_run.metrics[2])
    assert reason.startswith(f"{search_run.metrics[2]}: model file changed since it was evaluated")
    assert "m-int8-k2.onnx has sha256" in reason and "(400 bytes)" in reason
    assert (
        f"WARNING lowbit.make_report: left out {search_run.metrics[2]}: {search_run.metrics[2]}: model file changed"
        in (search_run.root / "report.log").read_text()
    )
    _not_used(report, search_run.metrics[2])
    assert report["recommended"]["variant"] == "FP32"
    # the search cites that evaluation, so it is dropped too, saying why
    assert "which this report dropped (model file changed" in _search_dropped(report, search_run)


def test_nan_in_one_variants_metrics_is_dropped_and_the_plots_are_drawn(load_script, search_run):
    search_run.rewrite_metrics(search_run.metrics[1], lambda d: d["metrics"].update(map50_95=float("nan")))
    report = _report(load_script, search_run)
    reason = _dropped(report, search_run.metrics[1])
    assert str(search_run.metrics[1]) in reason and "non-finite number NaN" in reason
    _not_used(report, search_run.metrics[1])
    # the search that cites it is dropped, and with it the candidates no other search stands behind
    assert report["recommended"]["variant"] == "FP32"
    png = (search_run.root / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    _search_dropped(report, search_run)  # it cites the NaN evaluation


def test_metrics_without_kind_are_dropped(load_script, search_run):
    search_run.rewrite_metrics(search_run.metrics[2], lambda d: d.pop("kind"))  # written before records named it
    report = _report(load_script, search_run)
    reason = _dropped(report, search_run.metrics[2])
    assert str(search_run.metrics[2]) in reason and "names no kind" in reason
    _not_used(report, search_run.metrics[2])
    assert report["recommended"]["variant"] == "FP32"
    assert "which this report dropped" in _search_dropped(report, search_run)  # it cites that evaluation


def test_metrics_of_another_kind_are_skipped(load_script, search_run):
    """A metrics.json that is another record (or no record: a training run's) is no evaluation, not a loss."""
    search_run.rewrite_metrics(search_run.metrics[2], lambda d: d.update(kind="sensitivity"))
    report = _report(load_script, search_run)
    assert all(Path(d["path"]) != search_run.metrics[2].resolve() for d in report["dropped"])
    _not_used(report, search_run.metrics[2])


def test_candidate_record_without_kind_is_not_used(load_script, search_run):
    record = search_run.root / "onnx" / "m-int8-k2.inputs.json"
    search_run.rewrite_metrics(record, lambda d: d.pop("kind"))
    variants = _report(load_script, search_run)["variants"]
    row = next(v for v in variants if v["metrics_path"].endswith("int8-k2-coco/metrics.json"))
    assert row["model_manifest"] is None and row["excluded_nodes"] is None
    assert any(str(record) in note and "names no kind" in note and note.endswith("not used") for note in row["notes"])


def test_variant_scored_on_other_image_ids_is_dropped(load_script, search_run):
    search_run.rewrite_metrics(search_run.metrics[2], lambda d: d["dataset"].update(image_ids=[1, 2, 3, 5, 9]))
    report = _report(load_script, search_run)
    reason = _dropped(report, search_run.metrics[2])
    assert reason.startswith(f"{search_run.metrics[2]}: scored on other images (5 images, ids 1..9)")
    assert "baseline-coco/metrics.json" in reason
    _not_used(report, search_run.metrics[2])
    assert report["recommended"]["variant"] == "FP32"


def test_variant_quantized_from_another_model_is_dropped(load_script, search_run):
    metrics = search_run.run.variant("int8-max-coco", "m-int8-max", 0.499, 0.69, 40.0, method="max")
    manifest = search_run.root / "onnx" / "m-int8-max.manifest.json"
    search_run.rewrite_metrics(manifest, lambda d: d["inputs"].update({str(search_run.run.fp32_path): "e" * 64}))
    report = _report(load_script, search_run)
    reason = _dropped(report, metrics)
    assert reason.startswith(f"{metrics}: quantized from model sha256 eeeeeeeeeeee") and "m-int8-max.manifest" in reason
    _not_used(report, metrics)
    assert report["recommended"]["variant"] == "INT8 K=2" and report["search"]  # the rest of the run is used


# ----------------------------------------------------------------------------------------------------------------------
# errors: the whole run cannot be reported


def test_annotations_changed_in_place_are_an_error(load_script, search_run, capsys, tmp_path):
    search_run.run.ann_file.write_bytes(b'{"images": [], "annotations": [{"id": 1}], "categories": []}')
    err = _error(load_script, search_run, capsys)
    assert str(search_run.run.ann_file) in err and "changed since the run was scored" in err
    # --data-root names the annotations to check instead; there the file must exist
    data_root = tmp_path / "data"
    (data_root / "annotations").mkdir(parents=True)
    assert "--data-root" in _error(load_script, search_run, capsys, "--data-root", str(data_root))
    (data_root / "annotations" / "instances_val2017.json").write_bytes(b"{}")
    err = _error(load_script, search_run, capsys, "--data-root", str(data_root))
    assert str(data_root / "annotations" / "instances_val2017.json") in err and "changed since" in err


def test_annotations_of_the_workflow_are_checked(load_script, search_run, capsys, tmp_path):
    data_root = tmp_path / "data"
    (data_root / "annotations").mkdir(parents=True)
    (data_root / "annotations" / "instances_val2017.json").write_bytes(b"edited")
    (search_run.root / "workflow.json").write_text(json.dumps({"args": {"data_root": str(data_root)}}))
    err = _error(load_script, search_run, capsys)
    assert str(data_root / "annotations" / "instances_val2017.json") in err


@pytest.mark.parametrize("value", ["inf", "nan", "0"])
def test_budget_ap_must_be_finite_and_positive(load_script, search_run, capsys, value):
    err = _error(load_script, search_run, capsys, "--budget-ap", value)
    assert "argument --budget-ap" in err


@pytest.mark.parametrize("damage", ["truncated", "nan"])
def test_unreadable_baseline_is_an_error_naming_it(load_script, search_run, capsys, damage):
    if damage == "truncated":
        search_run.baseline.write_text(search_run.baseline.read_text()[:100])
    else:
        search_run.rewrite_metrics(search_run.baseline, lambda d: d["latency_ms"].update(p50=float("nan")))
    err = _error(load_script, search_run, capsys)
    assert "FP32 baseline's metrics cannot be used" in err and str(search_run.baseline) in err


def test_baseline_without_kind_is_an_error_naming_it(load_script, search_run, capsys):
    search_run.rewrite_metrics(search_run.baseline, lambda d: d.pop("kind"))  # written before records named it
    err = _error(load_script, search_run, capsys)
    assert "FP32 baseline's metrics cannot be used" in err and str(search_run.baseline) in err
    assert "names no kind" in err


def test_no_usable_variant_is_an_error(load_script, search_run, capsys):
    for name in ("m-int8-qdq", "m-int8-k1", "m-int8-k2", "m-int8-k2_random0"):
        (search_run.root / "onnx" / f"{name}.onnx").unlink()
    err = _error(load_script, search_run, capsys)
    assert "no quantized variant is left" in err and "m-int8-k2.onnx no longer exists" in err


def test_a_candidate_left_by_an_earlier_search_is_dropped(load_script, search_run):
    """A candidate of an earlier search in the same run dir (here K=3, better than the search's pick and within
    budget) still matches the baseline, but no search.json of the run cites it: it is never recommended."""
    left = search_run._candidate("int8-k3", NODES[:3], 0.4995)
    report = _report(load_script, search_run)
    reason = _dropped(report, left)
    assert "no search.json" in reason
    _not_used(report, left)
    assert report["recommended"]["variant"] == "INT8 K=2"
