"""Intervals kept by content (lowbit/interval_cache.py): the search computes each probe's paired interval once, the
report reuses it, and an interval is never reused for other inputs.

Every kept interval is compared with one computed afresh by lowbit.ap_bootstrap on the same detections.
"""

from __future__ import annotations

import json
from pathlib import Path

from test_report_ci import ALL_IDS, N_BOOT, ScoredRun, _make

from lowbit import ap_bootstrap
from lowbit.interval_cache import DIRNAME, IntervalCache
from lowbit.search_confirm import IntervalJob, SliceIntervals, interval_in_worker


def _slice(s: ScoredRun, cache: IntervalCache, n_boot: int = N_BOOT) -> SliceIntervals:
    return SliceIntervals(
        s.gt, s.run.root / "baseline-coco" / "metrics.json", "--baseline-metrics", s.ann_sha, cache, n_boot
    )


def _fresh(s: ScoredRun, step: str, n_boot: int = N_BOOT, confidence: float = 0.95):
    return ap_bootstrap.paired_delta_ci(s.gt, s.dets["baseline-coco"], s.dets[step], ALL_IDS, n_boot, confidence)


def _run(tmp_path) -> ScoredRun:
    s = ScoredRun(tmp_path / "run")
    s.baseline()
    s.variant("int8-coco", "m-int8", 0.2, 1, image_ids=ALL_IDS)
    s.variant("fp8-coco", "m-fp8", 0.15, 3, mode="fp8", method="max", image_ids=ALL_IDS)
    return s


def test_a_kept_interval_is_the_one_computed_afresh_and_skips_the_matching(tmp_path):
    s = _run(tmp_path)
    cache = IntervalCache(s.run.root)
    metrics = s.run.root / "int8-coco" / "metrics.json"
    first = _slice(s, cache).paired(metrics)
    assert first == _fresh(s, "int8-coco") and (cache.hits, cache.misses) == (0, 1)
    assert len(list((s.run.root / DIRNAME).glob("*.json"))) == 1
    again = _slice(s, cache)
    assert again.paired(metrics) == first and (cache.hits, cache.misses) == (1, 1)
    assert again._paired is None  # FP32 was neither matched nor redrawn for a kept interval
    # another confidence, another replicate count: other intervals, computed
    assert again.paired(metrics, 0.8) == _fresh(s, "int8-coco", confidence=0.8)
    assert _slice(s, cache, n_boot=N_BOOT + 1).paired(metrics) == _fresh(s, "int8-coco", n_boot=N_BOOT + 1)
    assert cache.misses == 3


def test_other_detections_or_a_changed_entry_are_never_served(tmp_path, caplog):
    s = _run(tmp_path)
    cache = IntervalCache(s.run.root)
    metrics = s.run.root / "int8-coco" / "metrics.json"
    before = _slice(s, cache).paired(metrics)
    s.scored(metrics, s.dets["fp8-coco"])  # the same evaluation folder, re-evaluated: other detections
    s.dets["int8-coco"] = s.dets["fp8-coco"]
    after = _slice(s, cache).paired(metrics)
    assert after == _fresh(s, "int8-coco") and after != before and cache.hits == 0
    # an entry edited by hand no longer matches the parts of its key: computed again and rewritten
    for entry in (s.run.root / DIRNAME).glob("*.json"):
        doc = json.loads(entry.read_text())
        doc["parts"]["n_boot"] = 7
        doc["interval"]["ci_low"] = -99.0
        entry.write_text(json.dumps(doc))
    assert _slice(s, cache).paired(metrics) == after and cache.hits == 0
    assert "unusable" in caplog.text


def test_the_report_reuses_the_searchs_intervals(tmp_path):
    s = _run(tmp_path)
    search = _slice(s, IntervalCache(s.run.root))
    for step in ("int8-coco", "fp8-coco"):
        search.paired(s.run.root / step / "metrics.json")
    report = _make(s.run.root)
    assert report["intervals"]["computed"] == 2 and report["intervals"]["cached"] == 2
    rows = {Path(v["metrics_path"]).parent.name: v for v in report["variants"]}
    for step in ("int8-coco", "fp8-coco"):
        want = _fresh(s, step)
        assert (rows[step]["delta_ap_ci"]["ci_low"], rows[step]["delta_ap_ci"]["std_error"]) == (
            want.ci_low,
            want.std_error,
        )
    # without the cache the report computes the same numbers itself
    for entry in (s.run.root / DIRNAME).glob("*.json"):
        entry.unlink()
    fresh = _make(s.run.root)
    assert fresh["intervals"]["cached"] == 0
    assert [v["delta_ap_ci"] for v in fresh["variants"]] == [v["delta_ap_ci"] for v in report["variants"]]


def test_an_interval_computed_in_a_worker_is_the_one_the_search_reads(tmp_path, caplog):
    s = _run(tmp_path)
    baseline = s.run.root / "baseline-coco" / "metrics.json"
    job = IntervalJob(baseline, "--baseline-metrics", s.run.ann_file, s.ann_sha, s.run.root, 0.95, N_BOOT)
    for step in ("int8-coco", "fp8-coco"):
        interval_in_worker(job, s.run.root / step / "metrics.json")
    cache = IntervalCache(s.run.root)
    search = _slice(s, cache)
    for step in ("int8-coco", "fp8-coco"):
        assert search.paired(s.run.root / step / "metrics.json") == _fresh(s, step)
    assert (cache.hits, cache.misses) == (2, 0) and search._paired is None
    # an evaluation of other images: nothing is kept, and the search process raises the error itself
    s.variant("other-coco", "m-other", 0.2, 5, image_ids=ALL_IDS[:-1])
    interval_in_worker(job, s.run.root / "other-coco" / "metrics.json")
    assert "left to the search process" in caplog.text
    assert len(list((s.run.root / DIRNAME).glob("*.json"))) == 2
