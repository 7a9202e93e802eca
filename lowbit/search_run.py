"""Budget search of one mode: the fewest float nodes, along a ranking, whose evaluated candidate fits the budget.

For a mode (INT8 or FP8) and a ranking (a layer-sensitivity report), :func:`run_search`

1. maps the ranking onto the quantized nodes of the mode's full Q/DQ model
   (:func:`lowbit.candidates.ranked_nodes`);
2. runs :func:`lowbit.budget_search.search_smallest_k` where probing K builds the candidate with the
   top-K nodes in float and evaluates it on the evaluation slice (:class:`lowbit.candidates.CandidateStore`:
   every probe is a real evaluation, cached on disk, so a rerun reuses the Ks it evaluated);
3. at the K found, evaluates ``random_seeds`` random controls (K nodes drawn from the same ranked
   nodes with seeds 0..N-1) and says whether the ranking beats chance there (its ΔAP minus the mean
   ΔAP of the controls, in AP points).

``search.json`` keys (AP points = mAP50-95 x 100; ``delta_ap`` = loss against FP32, >= 0 is a loss,
the convention of :mod:`lowbit.budget_search`):
``mode``, ``ranking`` {report, source, method, nodes}, ``budget_ap``, ``baseline_ap``, ``build``,
``search`` (:meth:`SearchResult.to_dict`: ``k``, ``found``, ``reason``, ``probes``, ``curve`` ...),
``parallel``, ``candidates`` [{k, name, ap, delta_ap, metrics_path, model_path, reused}], ``random_control``
{k, seeds, aps, deltas, mean_delta, sd_delta, min_delta, max_delta, ranking_delta, margin_ap,
beats_chance} or null (K = 0 or no seeds), ``random_band`` [the same at every probed K > 0 with
``random_band``, else only the K found], ``wall_s``.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowbit.budget_search import DEFAULT_MAX_PROBES, search_smallest_k
from lowbit.candidates import CandidateStore, EvalConfig, Evaluated, random_nodes, ranked_nodes, read_map
from lowbit.logs import get_logger
from lowbit.runs import UserError

log = get_logger("search_run")

DEFAULT_BUDGET_AP = 0.5  # AP points (mAP50-95 x 100) a candidate may lose against FP32
DEFAULT_RANDOM_SEEDS = 3  # random controls at the K found


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
    requantize: Any = None  # lowbit.candidates.RequantizeConfig for build="requantize"
    parallel: int = 1  # candidates evaluated at once, each in a worker process (1: in this process)


def check_config(cfg: SearchConfig) -> None:
    """The numbers of a search's settings, each error naming its flag (run before anything is written)."""
    if not cfg.budget_ap > 0:
        raise UserError(f"--budget-ap must be > 0 AP points, got {cfg.budget_ap}", flag="--budget-ap")
    if cfg.random_seeds < 0:
        raise UserError(f"--random-seeds must be >= 0, got {cfg.random_seeds}", flag="--random-seeds")
    if cfg.max_probes < 1:
        raise UserError(f"--max-probes must be >= 1, got {cfg.max_probes}", flag="--max-probes")
    if cfg.parallel < 1:
        raise UserError(f"--parallel-probes must be >= 1, got {cfg.parallel}", flag="--parallel-probes")


def _row(ev: Evaluated, baseline_ap: float) -> dict[str, Any]:
    return {"k": ev.k, "name": ev.name, "random_seed": ev.random_seed, "ap": ev.ap, "delta_ap": baseline_ap - ev.ap,
            "metrics_path": str(ev.metrics_path), "model_path": str(ev.model_path), "reused": ev.reused}  # fmt: skip


def random_control(store: CandidateStore, pool: list[str], k: int, seeds: int, baseline_ap: float,
                   ranking_ap: float, parallel: int = 1) -> dict[str, Any] | None:  # fmt: skip
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


def _ranking_info(path: Path, nodes: list[str]) -> dict[str, Any]:
    from lowbit.sensitivity_report import load_report

    report = load_report(path, "--ranking")
    method = report.get("method") or {}
    return {"report": str(path), "source": report.get("source"), "method": method.get("name"), "nodes": nodes}


def _workers(parallel: int):
    """A pool of ``parallel`` worker processes for the evaluations, or None (evaluate in this process).

    Processes, not threads: an evaluation's postprocessing, scoring and JSON writing hold the GIL.
    On an H200 three evaluations of the INT8 demo model side by side took 16.0 s, one alone 15.1 s.
    ``spawn``: the workers create their own CUDA context instead of inheriting a forked one.
    """
    if parallel == 1:
        return contextlib.nullcontext(None)
    return ProcessPoolExecutor(parallel, mp_context=multiprocessing.get_context("spawn"))


def run_search(cfg: SearchConfig) -> dict[str, Any]:
    """Search one mode (see the module docstring); returns the ``search.json`` dict (not written)."""
    check_config(cfg)
    with _workers(cfg.parallel) as executor:
        return _search(cfg, executor)


def _search(cfg: SearchConfig, executor) -> dict[str, Any]:
    t0 = time.perf_counter()
    baseline_ap = read_map(cfg.baseline_metrics, "--baseline-metrics") * 100.0
    nodes = ranked_nodes(cfg.ranking, cfg.onnx_path, cfg.full_model, "--ranking")
    store = CandidateStore(cfg.run_root, cfg.mode, cfg.onnx_path.stem, cfg.full_model, cfg.evaluation,
                           build=cfg.build, requantize=cfg.requantize, executor=executor)  # fmt: skip
    known = {0: read_map(cfg.k0_metrics, "--k0-metrics") * 100.0} if cfg.k0_metrics else {}
    evaluated: dict[int, Evaluated] = {}

    def evaluate(k: int) -> float:
        evaluated[k] = store.evaluate(nodes[:k])
        log.info("%s K=%d: AP %.2f (ΔAP %+.2f vs FP32 %.2f)", cfg.mode, k, evaluated[k].ap,
                 evaluated[k].ap - baseline_ap, baseline_ap)  # fmt: skip
        return evaluated[k].ap

    seed_ks = [k for k in cfg.seed_ks if 0 <= k <= len(nodes)]
    result = search_smallest_k(evaluate, len(nodes), cfg.budget_ap, baseline_ap, max_probes=cfg.max_probes,
                               seed_ks=seed_ks, known=known, parallel=cfg.parallel)  # fmt: skip
    log.info("%s: K=%d (%s)", cfg.mode, result.k, result.reason)
    control = random_control(store, nodes, result.k, cfg.random_seeds, baseline_ap, result.map, cfg.parallel)
    band = [control] if control else []
    if cfg.random_band:
        for point in result.curve():
            if point.k not in (0, result.k):
                band.append(random_control(store, nodes, point.k, cfg.random_seeds, baseline_ap, point.map,
                                           cfg.parallel))  # fmt: skip
    return {
        "mode": cfg.mode,
        "ranking": _ranking_info(cfg.ranking, nodes),
        "budget_ap": cfg.budget_ap,
        "baseline_ap": baseline_ap,
        "baseline_metrics": str(cfg.baseline_metrics),
        "full_model": str(cfg.full_model),
        "build": cfg.build,
        "parallel": cfg.parallel,
        "search": result.to_dict(),
        "candidates": [_row(evaluated[k], baseline_ap) for k in sorted(evaluated)],
        "random_control": control,
        "random_band": sorted((b for b in band if b), key=lambda b: b["k"]),
        "wall_s": round(time.perf_counter() - t0, 2),
    }


def search_markdown(data: dict[str, Any]) -> str:
    """A short Markdown summary of one ``search.json``."""
    s = data["search"]
    verdict = "found" if s["found"] else "NOT found"
    headline = (f"Budget {data['budget_ap']:g} AP against FP32 {data['baseline_ap']:.2f} AP: K={s['k']} {verdict} "
                f"(ΔAP {0.0 - s['delta'] + 0.0:+.2f}); {s['reason']}.")  # fmt: skip
    lines = [f"# {data['mode'].upper()} budget search ({data['ranking']['method']} ranking)", "", headline, "",
             "| K | AP | ΔAP | meets |", "|---:|---:|---:|:---:|"]  # fmt: skip
    for p in s["curve"]:
        lines.append(f"| {p['k']} | {p['map']:.2f} | {0.0 - p['delta'] + 0.0:+.2f} | {'yes' if p['meets'] else 'no'} |")
    rc = data.get("random_control")
    if rc:
        control = (f"Random controls at K={rc['k']} (seeds {rc['seeds']}): ΔAP mean {-rc['mean_delta']:+.2f}, "
                   f"sd {rc['sd_delta']:.2f}, range [{-rc['max_delta']:+.2f}, {-rc['min_delta']:+.2f}]; ranking "
                   f"{-rc['ranking_delta']:+.2f}: {'beats' if rc['beats_chance'] else 'does not beat'} chance by "
                   f"{rc['margin_ap']:+.2f} AP.")  # fmt: skip
        lines += ["", control]
    return "\n".join(lines) + "\n"
