"""Budget search of one mode: the fewest float nodes, along a ranking, whose evaluated candidate fits the budget.

For a mode (INT8 or FP8) and a ranking (a layer-sensitivity report), :func:`run_search`

0. checks that its inputs belong together (:func:`check_inputs`, run by the CLI before it writes anything):
   the full model is a Q/DQ model of the mode (its quantizer manifest, else its Q/DQ graph) quantized from
   ``--onnx-path`` (the manifest's sha256, and its quantized nodes are nodes of that graph); the ranking
   ranks that model in that mode; the FP32 (and K=0) metrics scored ``--onnx-path`` (``--full-model``) on the
   very images the candidates will be scored on (annotation sha256, image ids); the evaluation settings,
   data root and providers are usable;
1. maps the ranking onto the quantized nodes of the mode's full Q/DQ model
   (:func:`lowbit.candidates.match_ranking`; layers that match none are listed in a warning);
2. runs :func:`lowbit.budget_search.search_smallest_k` where probing K builds the candidate with the
   top-K nodes in float and evaluates it on the evaluation slice (:class:`lowbit.candidates.CandidateStore`:
   every probe is a real evaluation, cached on disk by content, so a rerun reuses the Ks it evaluated);
3. at the K found, evaluates ``random_seeds`` random controls (K nodes drawn from the same ranked
   nodes with seeds 0..N-1) and says whether the ranking beats chance there (its ΔAP minus the mean
   ΔAP of the controls, in AP points).

``search.json`` keys (AP points = mAP50-95 x 100; ``delta_ap`` = loss against FP32, >= 0 is a loss,
the convention of :mod:`lowbit.budget_search`; every record is described in docs/records.md):
``schema_version`` (``lowbit.records.SCHEMA_VERSIONS["search"]``, 1), ``kind`` ("search"), ``mode``,
``ranking`` {report, source, method, nodes, unmatched_layers [{rank, name, reason}]}, ``budget_ap``,
``baseline_ap``, ``baseline_metrics``, ``full_model``, ``build``,
``search`` (:meth:`SearchResult.to_dict`: ``k``, ``found``, ``reason``, ``probes``, ``curve`` ...),
``parallel``, ``candidates`` [{k, name, random_seed, ap, delta_ap, metrics_path, model_path, reused,
model_sha256, metrics_sha256}], ``random_control`` {k, seeds, aps, deltas, mean_delta, sd_delta, min_delta,
max_delta, ranking_delta, margin_ap, beats_chance, candidates} or null (K = 0 or no seeds), ``random_band``
[the same at every probed K > 0 with ``random_band``, else only the K found], ``settings`` (:func:`search_settings`),
``provenance`` {``full_model_sha256``, ``onnx_sha256``, ``ranking_sha256``, ``baseline_metrics_sha256``,
``k0_metrics_sha256`` (null without ``--k0-metrics``), ``calib_sha256`` (``requantize`` builds, else null),
``ann_sha256``, ``image_ids_sha256``, ``num_images``, ``quantizer_manifest`` (the manifest the full model's mode
and source were checked against, or null), ``settings_sha256`` (:func:`lowbit.records.settings_sha256` of
``settings``)}, ``notes`` (the warnings of the input checks), ``wall_s``.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from lowbit import records
from lowbit.budget_search import DEFAULT_MAX_PROBES, search_smallest_k
from lowbit.candidates import (
    CandidateStore,
    DatasetKey,
    EvalConfig,
    Evaluated,
    dataset_key,
    map_of,
    match_ranking,
    random_nodes,
    unmatched_warning,
)
from lowbit.errors import UserError
from lowbit.logs import get_logger
from lowbit.runs import sha256_file

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


@dataclass
class SearchInputs:
    """What :func:`check_inputs` established about a search's inputs, so that nothing is read twice.

    Attributes:
        nodes: the ranked quantized nodes of the full model, most sensitive first.
        unmatched: ranked layers that are no quantized node of the full model ({rank, name, reason}).
        report: the ranking report (``lowbit.sensitivity_report.load_report``).
        baseline_ap: FP32 mAP50-95 in AP points; ``k0_ap``: the full model's, or None without ``--k0-metrics``.
        dataset: the evaluation slice by content (annotation sha256, image ids).
        digests: sha256 by role: ``full_model``, ``onnx``, ``ranking``, ``baseline_metrics``, ``k0_metrics``,
            ``calib`` (None where there is no such file).
        quantizer_manifest: the manifest that the full model's mode and source were checked against, or None.
        notes: warnings (a provenance that could not be verified, ranked layers left out).
    """

    nodes: list[str]
    unmatched: list[dict[str, Any]]
    report: dict[str, Any]
    baseline_ap: float
    k0_ap: float | None
    dataset: DatasetKey
    digests: dict[str, str | None]
    quantizer_manifest: str | None = None
    notes: list[str] = field(default_factory=list)


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
    negative = [k for k in cfg.seed_ks if k < 0]
    if negative:
        raise UserError(f"--seed-ks values must be >= 0, got {negative}", flag="--seed-ks")


# ----------------------------------------------------------------------------------------------------------------------
# do the inputs belong together? (all before anything is written or built)


def check_inputs(cfg: SearchConfig) -> SearchInputs:
    """Check that the search's inputs belong together and can be used, before anything is written or built.

    Every mismatch is one :class:`~lowbit.errors.UserError` naming the flag (or file) to fix: the evaluation
    settings, data root and providers; ``--onnx-path``/``--full-model`` readable ONNX models whose input fits
    ``--imgsz``; ``--full-model`` a Q/DQ model of ``--mode`` quantized from ``--onnx-path``; ``--ranking`` a
    ranking of that model in that mode; ``--seed-ks`` within the ranked nodes; ``--baseline-metrics`` and
    ``--k0-metrics`` finite scores of ``--onnx-path`` and ``--full-model`` on the evaluation slice.
    """
    from lowbit.onnx_stats import load_model_proto

    check_config(cfg)
    _check_evaluation(cfg.evaluation)
    fp32 = load_model_proto(cfg.onnx_path, "--onnx-path")
    full = load_model_proto(cfg.full_model, "--full-model")
    for proto, path, flag in ((fp32, cfg.onnx_path, "--onnx-path"), (full, cfg.full_model, "--full-model")):
        _check_model_input(proto, path, flag, cfg.evaluation.imgsz)
    digests = _digests(cfg)
    notes: list[str] = []
    manifest = _check_full_model(cfg, fp32, full, digests, notes)
    with records.shape_checked(cfg.ranking, "--ranking"):
        report = _check_ranking(cfg, digests, notes)
    ranked = match_ranking(report, fp32, full, "--ranking", cfg.ranking, cfg.full_model)
    warning = unmatched_warning(ranked, cfg.ranking, cfg.full_model)
    if warning:
        notes.append(warning)
    outside = sorted({k for k in cfg.seed_ks if not 0 <= k <= len(ranked.nodes)})
    if outside:
        raise UserError(
            f"--seed-ks values {outside} are outside 0..{len(ranked.nodes)}: --ranking {cfg.ranking} "
            f"maps {len(ranked.nodes)} quantized nodes of --full-model",
            flag="--seed-ks",
        )
    dataset = dataset_key(cfg.evaluation)
    with records.shape_checked(cfg.baseline_metrics, "--baseline-metrics"):
        baseline_ap = _check_metrics(
            cfg.baseline_metrics, "--baseline-metrics", digests["onnx"], f"--onnx-path {cfg.onnx_path}", cfg, dataset
        )
    k0_ap = None
    if cfg.k0_metrics is not None:
        with records.shape_checked(cfg.k0_metrics, "--k0-metrics"):
            k0_ap = _check_metrics(
                cfg.k0_metrics, "--k0-metrics", digests["full_model"], f"--full-model {cfg.full_model}", cfg, dataset
            )
    return SearchInputs(ranked.nodes, ranked.unmatched, report, baseline_ap, k0_ap, dataset, digests, manifest, notes)


def _check_evaluation(evaluation: EvalConfig) -> None:
    """The evaluator's own checks of its settings, providers and data paths (no session, nothing written)."""
    from lowbit.evaluate import resolve_data_paths, validate_settings
    from lowbit.ort_session import check_providers

    settings = evaluation.eval_settings(Path("model.onnx"))
    validate_settings(settings)
    check_providers(list(evaluation.providers), False, "--providers")
    resolve_data_paths(settings)


def _check_model_input(proto, path: Path, flag: str, imgsz: int) -> None:
    """The evaluator's input check on the graph's declared input, without building a session."""
    from lowbit.model_input import check_graph_image_input

    check_graph_image_input(proto, imgsz, path, flag)


def _digests(cfg: SearchConfig) -> dict[str, str | None]:
    def digest(path: Path | None) -> str | None:
        return sha256_file(path) if path is not None else None

    calib = cfg.requantize.calib_path if cfg.build == "requantize" and cfg.requantize is not None else None
    return {
        "full_model": digest(cfg.full_model),
        "onnx": digest(cfg.onnx_path),
        "ranking": digest(cfg.ranking),
        "baseline_metrics": digest(cfg.baseline_metrics),
        "k0_metrics": digest(cfg.k0_metrics),
        "calib": digest(calib),
    }


def qdq_mode(info: dict[str, Any]) -> str | None:
    """``fp8`` or ``int8`` from :func:`lowbit.qdq_graph.qdq_info` (the rule of the ONNX sensitivity tool: any
    float8 Q/DQ makes it FP8); None for another quantized type (int4 ...) or no Q/DQ at all."""
    if info["is_fp8"]:
        return "fp8"
    if info["quant_dtypes"] and set(info["quant_dtypes"]) <= {"int8", "uint8"}:
        return "int8"
    return None


def _check_full_model(cfg: SearchConfig, fp32, full, digests: dict, notes: list[str]) -> str | None:
    """``--full-model``: a Q/DQ model of ``--mode`` (by its graph, and by its quantizer manifest when one describes
    it), quantized from ``--onnx-path`` (the manifest's sha256; its quantized nodes are nodes of that graph).
    Returns the manifest's path, or None."""
    from lowbit.qdq_graph import find_quantized_nodes, qdq_info

    info = qdq_info(full)
    if not info["is_qdq"]:
        raise UserError(
            f"--full-model: {cfg.full_model} has no Q/DQ nodes; pass the calibrated {cfg.mode} Q/DQ "
            "model (every node quantized)",
            flag="--full-model",
        )
    graph_mode = qdq_mode(info)
    if graph_mode != cfg.mode:
        raise UserError(
            f"--full-model: {cfg.full_model} quantizes to {', '.join(info['quant_dtypes'])} "
            f"({graph_mode or 'no searchable mode'}), but --mode is {cfg.mode}",
            flag="--full-model",
        )
    manifest, why_not = records.quantizer_manifest_for(cfg.full_model, digests["full_model"])
    if manifest is not None:
        if manifest["quantize_mode"] != cfg.mode:
            raise UserError(
                f"--full-model: its quantizer manifest {manifest['path']} says quantize_mode "
                f"{manifest['quantize_mode']!r}, but --mode is {cfg.mode}",
                flag="--full-model",
            )
        if manifest["onnx_sha256"] is None:
            notes.append(f"--full-model: {manifest['path']} records no sha256 of the FP32 model it was quantized from")
        elif manifest["onnx_sha256"] != digests["onnx"]:
            raise UserError(
                f"--onnx-path: {cfg.onnx_path} (sha256 {digests['onnx'][:12]}...) is not the model --full-model "
                f"{cfg.full_model} was quantized from: its quantizer manifest {manifest['path']} records "
                f"{manifest['onnx_path']} (sha256 {manifest['onnx_sha256'][:12]}...)",
                flag="--onnx-path",
            )
    else:
        notes.append(
            f"--full-model: {why_not}; its mode was read from its Q/DQ graph and its FP32 model checked by "
            "node names only"
        )
    fp32_names = {node.name for node in fp32.graph.node}
    foreign = [n.name for n in find_quantized_nodes(full.graph) if n.name not in fp32_names]
    if foreign:
        raise UserError(
            f"--onnx-path: {len(foreign)} quantized node(s) of --full-model {cfg.full_model} are not nodes "
            f"of {cfg.onnx_path} (first: {foreign[0]}); was it quantized from another model?",
            flag="--onnx-path",
        )
    return manifest["path"] if manifest else None


def _check_ranking(cfg: SearchConfig, digests: dict, notes: list[str]) -> dict[str, Any]:
    """``--ranking``: a sensitivity report (finite, of its schema) of ``--mode`` that ranks ``--onnx-path``."""
    from lowbit.sensitivity_report import QUANT_FORMAT_BY_PRECISION, load_report

    flag, label = "--ranking", f"--ranking {cfg.ranking}"
    records.read_record(cfg.ranking, "sensitivity", flag=flag)  # truncated, NaN scores, another schema
    report = load_report(cfg.ranking, flag)
    precision, quant_format = report.get("precision"), report.get("quant_format")
    if precision != cfg.mode or quant_format not in (None, QUANT_FORMAT_BY_PRECISION.get(cfg.mode)):
        raise UserError(
            f"{label} ranks layers for precision {precision!r} (quant_format {quant_format!r}), but "
            f"--mode is {cfg.mode}: the files do not belong together",
            flag=flag,
        )
    source, ranked_sha = report.get("source"), report.get("model_sha256")
    if source == "onnx":  # it ranks the FP32 ONNX model itself, through a Q/DQ model of it
        records.require_equal(
            label, "model_sha256", ranked_sha, digests["onnx"], f"--onnx-path {cfg.onnx_path}", flag=flag
        )
        qdq_sha = ((report.get("method") or {}).get("settings") or {}).get("qdq_model_sha256")
        if qdq_sha and qdq_sha != digests["full_model"]:
            notes.append(
                f"{label} was computed on another Q/DQ model of --onnx-path than --full-model "
                f"{cfg.full_model} (another calibration); its node order is used as it is"
            )
    elif source == "torch":  # it ranks the checkpoint: --onnx-path must have been exported from it
        export, why_not = records.manifest_for(cfg.onnx_path, "export", "onnx_sha256", digests["onnx"])
        if export is None:
            notes.append(
                f"{label} ranks checkpoint {report.get('model')}; whether --onnx-path was exported from it "
                f"is not verified ({why_not})"
            )
        elif ranked_sha not in set((export.get("inputs") or {}).values()):
            raise UserError(
                f"{label} ranks checkpoint {report.get('model')} (sha256 {str(ranked_sha)[:12]}...), but "
                f"--onnx-path {cfg.onnx_path} was exported from {list(export.get('inputs') or {})}: "
                "the files do not belong together",
                flag=flag,
            )
    else:
        notes.append(f"{label} has source {source!r}; the model it ranks is not verified")
    return report


def _check_metrics(
    path: Path, flag: str, model_sha: str, model_label: str, cfg: SearchConfig, dataset: DatasetKey
) -> float:
    """A metrics record that scored the model with ``model_sha`` on the evaluation slice; its mAP in AP points."""
    label = f"{flag} {path}"
    metrics = records.read_record(path, "metrics", flag=flag)
    ap = map_of(metrics, path, flag) * 100.0
    records.require_equal(
        label, "model.sha256", (metrics.get("model") or {}).get("sha256"), model_sha, model_label, flag=flag
    )
    scored = records.dataset_provenance(metrics)
    records.require_equal(
        label,
        "dataset.ann_sha256",
        scored["ann_sha256"],
        dataset.ann_sha256,
        f"the annotation file {dataset.ann_file}",
        flag=flag,
    )
    if scored["image_ids_sha256"] != dataset.image_ids_sha256:
        raise UserError(
            f"{label} was scored on {scored['num_images']} other images than the {len(dataset.image_ids)} "
            f"that --max-images {cfg.evaluation.max_images} selects from {dataset.ann_file} (image ids "
            "differ): the files do not belong together",
            flag=flag,
        )
    _check_scoring(metrics.get("postprocess") or {}, label, flag, cfg.evaluation)
    return ap


def _check_scoring(postprocess: dict[str, Any], label: str, flag: str, evaluation: EvalConfig) -> None:
    """The letterbox size and postprocessing of a metrics record are the candidates' (same images, same scoring)."""
    candidates = evaluation.postprocess()
    expected = {"imgsz": evaluation.imgsz, "conf": candidates["conf"], "max_det": candidates["max_det"]}
    differ = [
        f"{key} {postprocess.get(key)!r} (candidates: {value!r})"
        for key, value in expected.items()
        if postprocess.get(key) != value
    ]
    if postprocess.get("mode") == "nms":
        differ.append("NMS postprocessing (candidates: one-to-one top-k)")
    if differ:
        raise UserError(f"{label} was scored with {', '.join(differ)}: the numbers are not comparable", flag=flag)


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
        "calib_sha256": d.get("calib"),
        "ann_sha256": inputs.dataset.ann_sha256,
        "image_ids_sha256": inputs.dataset.image_ids_sha256,
        "num_images": len(inputs.dataset.image_ids),
        "quantizer_manifest": inputs.quantizer_manifest,
        "settings_sha256": records.settings_sha256(search_settings(cfg, inputs)),
    }


# ----------------------------------------------------------------------------------------------------------------------
# the search


def _row(ev: Evaluated, baseline_ap: float) -> dict[str, Any]:
    return {"k": ev.k, "name": ev.name, "random_seed": ev.random_seed, "ap": ev.ap, "delta_ap": baseline_ap - ev.ap,
            "metrics_path": str(ev.metrics_path), "model_path": str(ev.model_path), "reused": ev.reused,
            "model_sha256": ev.model_sha256, "metrics_sha256": ev.metrics_sha256}  # fmt: skip


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
        inputs: the result of :func:`check_inputs` on ``cfg`` when the caller ran it already (None: run here).
    """
    check_config(cfg)
    if inputs is None:
        inputs = check_inputs(cfg)
    with _workers(cfg.parallel) as executor:
        return _search(cfg, inputs, executor)


def _search(cfg: SearchConfig, inputs: SearchInputs, executor) -> dict[str, Any]:
    t0 = time.perf_counter()
    for note in inputs.notes:
        log.warning("%s", note)
    baseline_ap, nodes = inputs.baseline_ap, inputs.nodes
    store = CandidateStore(cfg.run_root, cfg.mode, cfg.onnx_path.stem, cfg.full_model, cfg.evaluation,
                           build=cfg.build, requantize=cfg.requantize, executor=executor, dataset=inputs.dataset,
                           full_sha256=inputs.digests["full_model"])  # fmt: skip
    known = {0: inputs.k0_ap} if inputs.k0_ap is not None else {}
    evaluated: dict[int, Evaluated] = {}

    def evaluate(k: int) -> float:
        evaluated[k] = store.evaluate(nodes[:k])
        log.info("%s K=%d: AP %.2f (ΔAP %+.2f vs FP32 %.2f)", cfg.mode, k, evaluated[k].ap,
                 evaluated[k].ap - baseline_ap, baseline_ap)  # fmt: skip
        return evaluated[k].ap

    result = search_smallest_k(evaluate, len(nodes), cfg.budget_ap, baseline_ap, max_probes=cfg.max_probes,
                               seed_ks=cfg.seed_ks, known=known, parallel=cfg.parallel)  # fmt: skip
    log.info("%s: K=%d (%s)", cfg.mode, result.k, result.reason)
    control = random_control(store, nodes, result.k, cfg.random_seeds, baseline_ap, result.map, cfg.parallel)
    band = [control] if control else []
    if cfg.random_band:
        for point in result.curve():
            if point.k not in (0, result.k):
                band.append(random_control(store, nodes, point.k, cfg.random_seeds, baseline_ap, point.map,
                                           cfg.parallel))  # fmt: skip
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
        "search": result.to_dict(),
        "candidates": [_row(evaluated[k], baseline_ap) for k in sorted(evaluated)],
        "random_control": control,
        "random_band": sorted((b for b in band if b), key=lambda b: b["k"]),
        "settings": search_settings(cfg, inputs),
        "provenance": provenance(cfg, inputs),
        "notes": list(inputs.notes),
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
