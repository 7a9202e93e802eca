"""Budget search of one mode: the fewest float nodes, along a ranking, whose evaluated candidate fits the budget.

For a mode (INT8 or FP8) and a ranking (a layer-sensitivity report), :func:`run_search`

0. checks that its inputs belong together (:func:`lowbit.search_checks.check_inputs`; :func:`search_and_write`,
   the script's run, checks them before it writes anything);
1. maps the ranking onto the quantized nodes of the mode's full Q/DQ model
   (:func:`lowbit.candidates_ranking.match_ranking`; layers that match none are listed in a warning);
2. runs :func:`lowbit.budget_search.search_smallest_k` where probing K builds the candidate with the
   top-K nodes in float and evaluates it on the evaluation slice (:class:`lowbit.candidates.CandidateStore`:
   every probe is a real evaluation, cached on disk by content, so a rerun reuses the Ks it evaluated);
   A probe is within the budget when its loss plus ``z(confidence)`` times its paired standard error is
   (:mod:`lowbit.search_confirm`), so a point that fits only by luck of the images does not count;
3. confirms the pick on the confirmation slice, images the search never saw, and moves up by a fixed rule
   when it fails there (:func:`lowbit.search_confirm.confirm_pick`);
4. with ``revert_probes``, runs the revert pass from the confirmed pick (:mod:`lowbit.search_revert`): its float
   nodes tried back in low precision, least sensitive first, the result confirmed like the pick;
5. at the final K, evaluates ``random_seeds`` random controls (K nodes drawn from the same ranked
   nodes with seeds 0..N-1) and says whether the ranking beats chance there (its ΔAP minus the mean
   ΔAP of the controls, in AP points).

``search.json`` keys (AP points = mAP50-95 x 100; ``delta_ap`` = loss against FP32, >= 0 is a loss,
the convention of :mod:`lowbit.budget_search`; every record is described in docs/records.md):
``schema_version`` (``lowbit.records.SCHEMA_VERSIONS["search"]``, 1), ``kind`` ("search"), ``mode``,
``ranking`` {report, source, method, nodes, unmatched_layers [{rank, name, reason}]}, ``budget_ap``,
``baseline_ap``, ``baseline_metrics``, ``full_model``, ``build``,
``search`` (:meth:`SearchResult.to_dict`: ``k``, ``found``, ``reason``, ``probes``, ``curve`` [{k, map, delta,
meets, std_error, margin}] ...), ``confidence`` (one-sided level of the within-budget test), ``z``,
``confirmation`` (:func:`lowbit.search_confirm.confirm_pick`'s block, with ``images.num_images``,
``images.image_ids_sha256``, ``images.ann_sha256``) or null, ``pick_k`` (the confirmed K, else the search's),
``revert`` (the revert pass: tries, final float nodes, confirmation attempts; keys in docs/records.md) or null,
``parallel``, ``candidates`` [{k, name, random_seed, ap, delta_ap, metrics_path, model_path, reused,
model_sha256, metrics_sha256, paired_delta (ΔAP = candidate − FP32 with its 95 % paired bootstrap interval,
:class:`lowbit.ap_bootstrap.PairedDelta`; null for random controls)}], ``random_control`` {k, seeds, aps, deltas, mean_delta, sd_delta, min_delta,
max_delta, ranking_delta, margin_ap, beats_chance, candidates} or null (K = 0 or no seeds), ``random_band``
[the same at every probed K > 0 with ``random_band``, else only the K found], ``settings`` (:func:`search_settings`),
``provenance`` {``full_model_sha256``, ``onnx_sha256``, ``ranking_sha256``, ``baseline_metrics_sha256``,
``k0_metrics_sha256`` (null without ``--k0-metrics``), ``confirm_baseline_metrics_sha256`` (null without), ``calib_sha256`` (``requantize`` builds, else null),
``ann_sha256``, ``image_ids_sha256``, ``num_images``, ``quantizer_manifest`` (the manifest the full model's mode
and source were checked against, or null), ``settings_sha256`` (:func:`lowbit.records.settings_sha256` of
``settings``)}, ``notes`` (the warnings of the input checks), ``wall_s``.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import statistics
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from lowbit import records
from lowbit.budget_search import DEFAULT_MAX_PROBES, Probe, judge, search_smallest_k
from lowbit.candidates import CandidateStore, EvalConfig, Evaluated
from lowbit.candidates_build import RequantizeConfig
from lowbit.candidates_ranking import random_nodes
from lowbit.interval_cache import IntervalCache
from lowbit.logs import get_logger
from lowbit.search_checks import SearchInputs, check_config, check_inputs
from lowbit.search_confirm import (
    DEFAULT_CONFIDENCE,
    ConfirmConfig,
    IntervalJob,
    SliceIntervals,
    confirm_pick,
    confirm_step,
    evaluated_files,
    interval_in_worker,
    z_score,
)
from lowbit.search_revert import REVERT_DIR, revert_confirmation, revert_pass

__all__ = [
    "DEFAULT_BUDGET_AP",
    "DEFAULT_RANDOM_SEEDS",
    "SCRIPT",
    "SearchConfig",
    "provenance",
    "random_control",
    "run_search",
    "search_and_write",
    "search_markdown",
    "search_settings",
]

log = get_logger("search_run")

SCRIPT = "search_yolov10m_lowbit_budget.py"  # the manifest's ``script``
DEFAULT_BUDGET_AP = 0.5  # AP points (mAP50-95 x 100) a candidate may lose against FP32
DEFAULT_RANDOM_SEEDS = 3  # random controls at the K found
CI_CONFIDENCE = 0.95  # two-sided level of the intervals written beside every candidate


@dataclass
class SearchConfig:
    """One mode's search. Paths: ``ranking`` report, FP32 model, the mode's full Q/DQ model, FP32 metrics."""

    mode: str
    ranking: Path
    onnx_path: Path
    full_model: Path
    baseline_metrics: Path
    run_root: Path
    evaluation: EvalConfig
    budget_ap: float = DEFAULT_BUDGET_AP
    random_seeds: int = DEFAULT_RANDOM_SEEDS
    max_probes: int = DEFAULT_MAX_PROBES
    seed_ks: list[int] = field(default_factory=list)
    k0_metrics: Path | None = None  # an evaluation of the full model made elsewhere (the int8 step's)
    random_band: bool = False  # also random controls at every other probed K (the band of the ΔAP-vs-K plot)
    build: str = "full"
    requantize: RequantizeConfig | None = None  # for build="requantize"
    parallel: int = 1  # candidates evaluated at once, each in a worker process (1: in this process)
    confidence: float = DEFAULT_CONFIDENCE  # how sure "within budget" must be (0.5: the point estimate)
    confirm: ConfirmConfig | None = None  # the confirmation slice (None: the pick is not confirmed)
    revert_probes: int = 0  # tries of the revert pass after the pick (:mod:`lowbit.search_revert`; 0: none)


def search_settings(cfg: SearchConfig, inputs: SearchInputs) -> dict[str, Any]:
    """The settings that decide a search's result, by content (no paths): ``search.json``'s ``settings``."""
    requantize = None
    if cfg.build == "requantize" and cfg.requantize is not None:
        rq = cfg.requantize
        requantize = {
            "calib_sha256": inputs.digests.get("calib"),
            "calibration_method": rq.calibration_method,
            "calibration_eps": list(rq.calibration_eps),
            "high_precision_dtype": rq.high_precision_dtype,
        }
    return {
        "mode": cfg.mode,
        "budget_ap": cfg.budget_ap,
        "random_seeds": cfg.random_seeds,
        "max_probes": cfg.max_probes,
        "seed_ks": list(cfg.seed_ks),
        "random_band": cfg.random_band,
        "parallel": cfg.parallel,
        "build": cfg.build,
        "requantize": requantize,
        "evaluation": cfg.evaluation.content(inputs.dataset),
        "confidence": cfg.confidence,
        "revert_probes": cfg.revert_probes,
        "confirm": None
        if cfg.confirm is None
        else {
            "count": cfg.confirm.count,
            "skip": cfg.confirm.skip,
            "max_attempts": cfg.confirm.max_attempts,
            "image_ids_sha256": inputs.confirm_dataset.image_ids_sha256,
        },
    }


def provenance(cfg: SearchConfig, inputs: SearchInputs) -> dict[str, Any]:
    """``search.json``'s ``provenance``: what the search was computed from, by sha256."""
    d = inputs.digests
    return {
        "full_model_sha256": d["full_model"],
        "onnx_sha256": d["onnx"],
        "ranking_sha256": d["ranking"],
        "baseline_metrics_sha256": d["baseline_metrics"],
        "k0_metrics_sha256": d.get("k0_metrics"),
        "confirm_baseline_metrics_sha256": d.get("confirm_baseline_metrics"),
        "calib_sha256": d.get("calib"),
        "ann_sha256": inputs.dataset.ann_sha256,
        "image_ids_sha256": inputs.dataset.image_ids_sha256,
        "num_images": len(inputs.dataset.image_ids),
        "quantizer_manifest": inputs.quantizer_manifest,
        "settings_sha256": records.settings_sha256(search_settings(cfg, inputs)),
    }


# ----------------------------------------------------------------------------------------------------------------------
# the search


def _row(ev: Evaluated, baseline_ap: float, paired=None) -> dict[str, Any]:
    """``search.json``'s row of one evaluated candidate (``delta_ap``: its loss against FP32, AP points)."""
    return {
        "paired_delta": None if paired is None else asdict(paired),
        "k": ev.k,
        "name": ev.name,
        "random_seed": ev.random_seed,
        "ap": ev.ap,
        "delta_ap": baseline_ap - ev.ap,
        "metrics_path": str(ev.metrics_path),
        "model_path": str(ev.model_path),
        "reused": ev.reused,
        "model_sha256": ev.model_sha256,
        "metrics_sha256": ev.metrics_sha256,
    }


def random_control(
    store: CandidateStore, pool: list[str], k: int, seeds: int, baseline_ap: float, ranking_ap: float, parallel: int = 1
) -> dict[str, Any] | None:
    """Evaluate ``seeds`` random K-node candidates (``parallel`` at once); mean/spread of their loss and the
    ranking's margin over it."""
    if k == 0 or seeds == 0:
        return None

    def one(seed: int):
        return store.evaluate(random_nodes(pool, k, seed), random_seed=seed)

    with ThreadPoolExecutor(min(parallel, seeds), thread_name_prefix="control") as threads:
        evaluated = list(threads.map(one, range(seeds)))
    deltas = [baseline_ap - ev.ap for ev in evaluated]
    mean = statistics.fmean(deltas)
    ranking_delta = baseline_ap - ranking_ap
    return {
        "k": k,
        "seeds": list(range(seeds)),
        "aps": [ev.ap for ev in evaluated],
        "deltas": deltas,
        "mean_delta": mean,
        "sd_delta": statistics.stdev(deltas) if len(deltas) > 1 else 0.0,
        "min_delta": min(deltas),
        "max_delta": max(deltas),
        "ranking_delta": ranking_delta,
        "margin_ap": mean - ranking_delta,  # > 0: the ranking loses less than chance does
        "beats_chance": ranking_delta < mean,
        "candidates": [_row(ev, baseline_ap) for ev in evaluated],
    }


def _ranking_info(path: Path, inputs: SearchInputs) -> dict[str, Any]:
    report = inputs.report
    method = report.get("method") or {}
    return {
        "report": str(path),
        "source": report.get("source"),
        "method": method.get("name"),
        "nodes": inputs.nodes,
        "unmatched_layers": inputs.unmatched,
    }


def _workers(parallel: int):
    """A pool of ``parallel`` worker processes for the evaluations, or None (evaluate in this process).

    Processes, not threads: an evaluation's postprocessing, scoring and JSON writing hold the GIL.
    On an H200 three evaluations of the INT8 demo model side by side took 16.0 s, one alone 15.1 s.
    ``spawn``: the workers create their own CUDA context instead of inheriting a forked one.
    """
    if parallel == 1:
        return contextlib.nullcontext(None)
    return ProcessPoolExecutor(parallel, mp_context=multiprocessing.get_context("spawn"))


def run_search(cfg: SearchConfig, inputs: SearchInputs | None = None) -> dict[str, Any]:
    """Search one mode (see the module docstring); returns the ``search.json`` dict (not written).

    Args:
        inputs: the result of :func:`lowbit.search_checks.check_inputs` on ``cfg`` when the caller ran it already (None: run here).
    """
    check_config(cfg)
    if inputs is None:
        inputs = check_inputs(cfg)
    with _workers(cfg.parallel) as executor:
        return _search(cfg, inputs, executor)


def _store(
    cfg: SearchConfig, inputs: SearchInputs, executor, confirm: bool = False, root: Path | None = None, suffix: str = ""
) -> CandidateStore:
    """The mode's candidates on the search slice, or (``confirm``) the same models on the confirmation slice;
    ``root``, ``suffix``: where and under which name suffix they are kept (default: the run root, none)."""
    evaluation, dataset = cfg.evaluation, inputs.dataset
    baseline, flag = cfg.baseline_metrics, "--baseline-metrics"
    if confirm:
        evaluation = replace(evaluation, max_images=cfg.confirm.count, skip_images=cfg.confirm.skip)
        dataset = inputs.confirm_dataset
        baseline, flag = cfg.confirm.baseline_metrics, "--confirm-baseline-metrics"
    then = None
    if executor is not None:  # each worker computes its candidate's interval: the search reads it from the cache
        job = IntervalJob(baseline, flag, dataset.ann_file, dataset.ann_sha256, cfg.run_root, CI_CONFIDENCE)
        then = functools.partial(interval_in_worker, job)
    return CandidateStore(
        root or cfg.run_root,
        cfg.mode,
        cfg.onnx_path.stem,
        cfg.full_model,
        evaluation,
        build=cfg.build,
        requantize=cfg.requantize,
        executor=executor,
        dataset=dataset,
        full_sha256=inputs.digests["full_model"],
        slice_tag="confirm" if confirm else "",
        suffix=suffix,
        then=then,
    )


def _search(cfg: SearchConfig, inputs: SearchInputs, executor) -> dict[str, Any]:
    from lowbit.coco_eval import load_coco

    t0 = time.perf_counter()
    for note in inputs.notes:
        log.warning("%s", note)
    baseline_ap, nodes, z = inputs.baseline_ap, inputs.nodes, z_score(cfg.confidence)
    store = _store(cfg, inputs, executor)
    coco = load_coco(inputs.dataset.ann_file, "--data-root")
    intervals = SliceIntervals(
        coco, cfg.baseline_metrics, "--baseline-metrics", inputs.dataset.ann_sha256, IntervalCache(cfg.run_root)
    )
    known = {0: inputs.k0_ap} if inputs.k0_ap is not None else {}
    evaluated: dict[int, Evaluated] = {}
    paired: dict[int, Any] = {}

    def evaluate(k: int) -> float:
        evaluated[k] = store.evaluate(nodes[:k])
        ap = evaluated[k].ap
        log.info("%s K=%d: AP %.2f (ΔAP %+.2f vs FP32 %.2f)", cfg.mode, k, ap, ap - baseline_ap, baseline_ap)
        return evaluated[k].ap

    def std_error(k: int) -> float:
        metrics = evaluated[k].metrics_path if k in evaluated else cfg.k0_metrics
        paired[k] = intervals.paired(metrics, CI_CONFIDENCE, "--k0-metrics" if k not in evaluated else "candidate")
        return paired[k].std_error

    result = search_smallest_k(
        evaluate,
        len(nodes),
        cfg.budget_ap,
        baseline_ap,
        max_probes=cfg.max_probes,
        seed_ks=cfg.seed_ks,
        known=known,
        parallel=cfg.parallel,
        std_error=std_error,
        z=z,
    )
    log.info("%s: K=%d (%s)", cfg.mode, result.k, result.reason)
    confirm_intervals = None  # on the confirmation slice: the pick's and the revert pass's confirmations share it
    if cfg.confirm is not None and result.found:
        confirm_intervals = SliceIntervals(
            coco,
            cfg.confirm.baseline_metrics,
            "--confirm-baseline-metrics",
            inputs.confirm_dataset.ann_sha256,
            IntervalCache(cfg.run_root),
        )
    confirmation = None
    if confirm_intervals is not None:
        confirmation = _confirm(cfg, inputs, executor, confirm_intervals, result, evaluate, std_error, z)
    pick_k = confirmation["k"] if confirmation and confirmation["confirmed"] else result.k
    pick_ap = evaluated[pick_k].ap if pick_k in evaluated else result.map
    revert = None
    if cfg.revert_probes and pick_k > 0 and result.found and (confirmation is None or confirmation["confirmed"]):
        revert = _revert(cfg, inputs, executor, intervals, confirm_intervals, pick_k, z)
    seeds, parallel = cfg.random_seeds, cfg.parallel
    control = random_control(store, nodes, pick_k, seeds, baseline_ap, pick_ap, parallel)
    band = [control] if control else []
    if cfg.random_band:
        for point in result.curve():
            if point.k not in (0, pick_k):
                band.append(random_control(store, nodes, point.k, seeds, baseline_ap, point.map, parallel))
    return {
        **records.header("search"),
        "mode": cfg.mode,
        "ranking": _ranking_info(cfg.ranking, inputs),
        "budget_ap": cfg.budget_ap,
        "baseline_ap": baseline_ap,
        "baseline_metrics": str(cfg.baseline_metrics),
        "full_model": str(cfg.full_model),
        "build": cfg.build,
        "parallel": cfg.parallel,
        "confidence": cfg.confidence,
        "z": z,
        "search": result.to_dict(),
        "confirmation": confirmation,
        "pick_k": pick_k,
        "revert": revert,
        "candidates": [_row(evaluated[k], baseline_ap, paired.get(k)) for k in sorted(evaluated)],
        "random_control": control,
        "random_band": sorted((b for b in band if b), key=lambda b: b["k"]),
        "settings": search_settings(cfg, inputs),
        "provenance": provenance(cfg, inputs),
        "notes": list(inputs.notes),
        "wall_s": round(time.perf_counter() - t0, 2),
    }


def _confirm(
    cfg: SearchConfig, inputs: SearchInputs, executor, intervals: SliceIntervals, result, evaluate, std_error, z
):
    """The confirmation block (:func:`lowbit.search_confirm.confirm_pick`); ``intervals`` on the confirmation slice."""
    confirm_store = _store(cfg, inputs, executor, confirm=True)
    points = {p.k: p for p in result.curve()}
    curve = set(points)  # the search's own points; the rest are the confirmation's

    def search_point(k: int) -> Probe:
        if k not in points:
            ap = evaluate(k)
            points[k] = judge(k, ap, result.baseline, cfg.budget_ap, std_error(k), z)
        return points[k]

    block = confirm_pick(
        result.k,
        result.ks_max,
        cfg.budget_ap,
        cfg.confirm,
        search_point,
        lambda k: confirm_store.evaluate(inputs.nodes[:k]),
        intervals,
        CI_CONFIDENCE,
    )
    block["images"].update(
        num_images=len(inputs.confirm_dataset.image_ids),
        image_ids_sha256=inputs.confirm_dataset.image_ids_sha256,
        ann_sha256=inputs.confirm_dataset.ann_sha256,
    )
    block["search_points"] = [asdict(points[k]) for k in sorted(points) if k not in curve]
    return block


def _revert(
    cfg: SearchConfig,
    inputs: SearchInputs,
    executor,
    intervals: SliceIntervals,
    confirm_intervals: SliceIntervals | None,
    pick_k: int,
    z: float,
):
    """``search.json``'s ``revert`` block: the revert pass (:mod:`lowbit.search_revert`) from the pick's float nodes,
    each try with its files and paired interval, and its confirmation (:func:`lowbit.search_revert.revert_confirmation`,
    with ``confirm_intervals``; none without a confirmation slice)."""
    root = cfg.run_root / f"search-{cfg.mode}" / REVERT_DIR
    files: dict[int, dict[str, Any]] = {}  # by try: the last evaluation of each (a parallel round may redo one)

    lock = threading.Lock()  # one interval at a time: the FP32 replicates are computed once, on first use

    def probe(nodes: list[str], i: int) -> Probe:
        ev = _store(cfg, inputs, executor, root=root, suffix=f"_revert{i:02d}").evaluate(nodes)
        with lock:
            paired = intervals.paired(ev.metrics_path, CI_CONFIDENCE, "candidate")
        point = judge(ev.k, ev.ap, inputs.baseline_ap, cfg.budget_ap, paired.std_error, z)
        verdict = "meets the budget" if point.meets else "misses it"
        log.info("%s revert try %d: K=%d ΔAP %+.2f (%s)", cfg.mode, i, ev.k, -point.delta, verdict)
        files[i] = {**evaluated_files(ev), "suffix": f"_revert{i:02d}", "paired_delta": asdict(paired)}
        return point

    result = revert_pass(inputs.nodes[:pick_k], probe, cfg.revert_probes, cfg.parallel)
    block = result.to_dict()
    for i, row in enumerate(block["tries"], start=1):
        row.update(files[i])
    block["confirmation"] = None
    if result.gained and confirm_intervals is not None:

        def confirm(i: int, nodes: list[str]) -> tuple[dict[str, Any], bool]:
            ev = _store(cfg, inputs, executor, confirm=True, root=root, suffix=f"_revert{i:02d}").evaluate(nodes)
            paired = confirm_intervals.paired(ev.metrics_path, CI_CONFIDENCE)
            within = -paired.delta_ap <= cfg.budget_ap
            verdict = "within the budget" if within else "outside the budget"
            log.info(
                "%s revert: K=%d ΔAP %+.2f on the confirmation slice: %s", cfg.mode, ev.k, paired.delta_ap, verdict
            )
            return {**evaluated_files(ev), "paired_delta": asdict(paired)}, within

        step = confirm_step(len(inputs.nodes))
        block["confirmation"] = revert_confirmation(result, step, cfg.confirm.max_attempts, confirm)
    block["confirmed"] = bool(block["confirmation"] and block["confirmation"]["confirmed"])
    return block


def search_markdown(data: dict[str, Any]) -> str:
    """A short Markdown summary of one ``search.json``."""
    s = data["search"]
    verdict = "found" if s["found"] else "NOT found"
    headline = (
        f"Budget {data['budget_ap']:g} AP against FP32 {data['baseline_ap']:.2f} AP: K={s['k']} {verdict} "
        f"(ΔAP {0.0 - s['delta'] + 0.0:+.2f}); {s['reason']}."
    )
    title = f"# {data['mode'].upper()} budget search ({data['ranking']['method']} ranking)"
    test = f"within budget: loss + {data['z']:.2f} SE <= {data['budget_ap']:g} (confidence {data['confidence']:g})"
    lines = [title, "", headline, "", test, "", "| K | AP | ΔAP | SE | meets |", "|---:|---:|---:|---:|:---:|"]
    for p in s["curve"]:
        lines.append(f"| {p['k']} | {p['map']:.2f} | {_delta_cells(p)} | {'yes' if p['meets'] else 'no'} |")
    conf = data.get("confirmation")
    if conf:
        intro = f"Confirmation on {conf['images']['num_images']} images the search never saw ({conf['rule']}):"
        rows = [
            f"- K={a['k']}: {_attempt_text(a)} (search slice {-a['search_delta_ap']:+.2f})" for a in conf["attempts"]
        ]
        lines += ["", intro, *rows, f"- {'confirmed: K=' + str(conf['k']) if conf['confirmed'] else 'not confirmed'}"]
    lines += _revert_lines(data.get("revert"))
    rc = data.get("random_control")
    if rc:
        control = (
            f"Random controls at K={rc['k']} (seeds {rc['seeds']}): ΔAP mean {-rc['mean_delta']:+.2f}, "
            f"sd {rc['sd_delta']:.2f}, range [{-rc['max_delta']:+.2f}, {-rc['min_delta']:+.2f}]; ranking "
            f"{-rc['ranking_delta']:+.2f}: {'beats' if rc['beats_chance'] else 'does not beat'} chance by "
            f"{rc['margin_ap']:+.2f} AP."
        )
        lines += ["", control]
    return "\n".join(lines) + "\n"


def _delta_cells(p: dict[str, Any]) -> str:
    """The ``ΔAP | SE`` cells of a probe or try (ΔAP = −loss; no SE where none was measured)."""
    se = "" if p.get("std_error") is None else f"{p['std_error']:.2f}"
    return f"{0.0 - p['delta'] + 0.0:+.2f} | {se}"


def _attempt_text(a: dict[str, Any]) -> str:
    """A confirmation attempt's ΔAP, its interval and whether it is within the budget."""
    pd, verdict = a["paired_delta"], "within" if a["within_budget"] else "outside"
    return f"ΔAP {pd['delta_ap']:+.2f} [{pd['ci_low']:+.2f}, {pd['ci_high']:+.2f}]: {verdict} the budget"


def _revert_lines(revert: dict[str, Any] | None) -> list[str]:
    """search.md's revert pass: every try, the final set and its confirmation."""
    if not revert:
        return []
    headline = (
        f"Revert pass from the pick's {revert['start_k']} float nodes, least sensitive first (a node stays in low "
        f"precision when the search slice's test still holds): {revert['gained']} back in low precision, "
        f"{revert['k']} left in float."
    )
    lines = [
        "",
        headline,
        "",
        "| try | node back in low precision | K | ΔAP | SE | kept |",
        "|---:|---|---:|---:|---:|:---:|",
    ]
    for i, t in enumerate(revert["tries"], start=1):
        lines.append(f"| {i} | `{t['node']}` | {t['k']} | {_delta_cells(t)} | {'yes' if t['kept'] else 'no'} |")
    conf = revert.get("confirmation")
    if conf:
        rows = [
            f"- K={a['k']} (after try {a['try']}): {_attempt_text(a)}; model {a['model_path']}"
            for a in conf["attempts"]
        ]
        verdict = f"confirmed: K={conf['k']}" if conf["confirmed"] else "not confirmed: the pick stands"
        lines += ["", f"Confirmation on the confirmation slice ({conf['rule']}):", *rows, f"- {verdict}"]
    return lines


def search_and_write(cfg: SearchConfig, manifest_args: dict[str, Any], argv: list[str] | None) -> dict[str, Any]:
    """``search_yolov10m_lowbit_budget.py``'s run: check the inputs, then, holding ``run_root``, search and write
    ``<run_root>/search-<mode>/`` (``search.json``, ``search.md``, ``search.log``, ``manifest.json``).

    Args:
        manifest_args: the script's flags as the manifest records them.
        argv: the script's command line (None: ``sys.argv``).

    Returns:
        The ``search.json`` dict.
    """
    from lowbit.run_lock import hold_run_folder

    inputs = check_inputs(cfg)  # every mismatch ends here, before search-<mode>/ exists
    with hold_run_folder(cfg.run_root, "--run-root"):  # one writer per run folder (a no-op inside the workflow)
        return _search_into_run(cfg, inputs, manifest_args, argv)


def _search_into_run(
    cfg: SearchConfig, inputs: SearchInputs, manifest_args: dict[str, Any], argv: list[str] | None
) -> dict[str, Any]:
    from lowbit.logs import setup_logging
    from lowbit.runs import atomic_write_json, atomic_write_text, manifest_run

    out_dir = cfg.run_root / f"search-{cfg.mode}"
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("search.json", "search.md"):  # an earlier result must not outlive a failed rerun
        (out_dir / name).unlink(missing_ok=True)
    setup_logging(out_dir / "search.log")
    with manifest_run(out_dir / "manifest.json", SCRIPT, manifest_args, argv, kind="search") as manifest:
        files = {
            "ranking": cfg.ranking,
            "onnx": cfg.onnx_path,
            "full_model": cfg.full_model,
            "baseline_metrics": cfg.baseline_metrics,
            "k0_metrics": cfg.k0_metrics,
            "confirm_baseline_metrics": cfg.confirm.baseline_metrics if cfg.confirm is not None else None,
        }
        for role, path in files.items():
            if path is not None:
                manifest.add_input(path, inputs.digests[role])
        manifest.add_input(inputs.dataset.ann_file, inputs.dataset.ann_sha256)
        data = run_search(cfg, inputs)
        atomic_write_json(out_dir / "search.json", data)
        atomic_write_text(out_dir / "search.md", search_markdown(data))
        manifest.add_output("search", out_dir / "search.json")
    return data
