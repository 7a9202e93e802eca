"""Whether a budget search's inputs belong together and can be used, checked before anything is written or built.

:func:`check_inputs` (run by ``search_yolov10m_lowbit_budget.py`` before it writes anything): the full model is a
Q/DQ model of the mode (its quantizer manifest, else its Q/DQ graph) quantized from ``--onnx-path`` (the
manifest's sha256, and its quantized nodes are nodes of that graph); the ranking ranks that model in that mode;
the FP32 (and K=0) metrics scored ``--onnx-path`` (``--full-model``) on the very images the candidates will be
scored on (annotation sha256, image ids), with the candidates' letterbox size and postprocessing; the FP32
metrics of the confirmation slice scored the same model on the images ``--confirm-skip``/``--confirm-images``
select, none of which is in the search slice; the evaluation settings, data root and providers are usable. Every mismatch is one :class:`~lowbit.errors.UserError` naming the
flag to fix; what could not be verified becomes a note (:attr:`SearchInputs.notes`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lowbit import records
from lowbit.candidates import DatasetKey, EvalConfig, dataset_key, map_of
from lowbit.candidates_ranking import match_ranking, unmatched_warning
from lowbit.errors import UserError
from lowbit.runs import sha256_file

if TYPE_CHECKING:  # lowbit.search_run imports this module
    from lowbit.search_run import SearchConfig

__all__ = ["SearchInputs", "check_config", "check_inputs", "qdq_mode"]


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
        confirm_dataset: the confirmation slice by content (None without a confirmation).
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
    confirm_dataset: DatasetKey | None = None


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
    if cfg.revert_probes < 0:
        raise UserError(f"--revert-probes must be >= 0, got {cfg.revert_probes}", flag="--revert-probes")
    from lowbit.search_confirm import z_score

    z_score(cfg.confidence)
    if cfg.confirm is not None and cfg.confirm.count < 1:
        raise UserError(f"--confirm-images must be >= 1, got {cfg.confirm.count}", flag="--confirm-images")
    if cfg.confirm is not None and cfg.confirm.max_attempts < 1:
        raise UserError(f"--max-confirm must be >= 1, got {cfg.confirm.max_attempts}", flag="--max-confirm")
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
    from lowbit.model_input import check_graph_image_input
    from lowbit.onnx_stats import load_model_proto

    check_config(cfg)
    _check_evaluation(cfg.evaluation)
    fp32 = load_model_proto(cfg.onnx_path, "--onnx-path")
    full = load_model_proto(cfg.full_model, "--full-model")
    for proto, path, flag in ((fp32, cfg.onnx_path, "--onnx-path"), (full, cfg.full_model, "--full-model")):
        check_graph_image_input(proto, cfg.evaluation.imgsz, path, flag)  # the evaluator's check, no session
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
    inputs = SearchInputs(ranked.nodes, ranked.unmatched, report, baseline_ap, k0_ap, dataset, digests, manifest, notes)
    if cfg.confirm is not None:
        inputs.confirm_dataset = _check_confirmation(cfg, digests, dataset)
    return inputs


def _check_confirmation(cfg: SearchConfig, digests: dict, dataset: DatasetKey) -> DatasetKey:
    """The confirmation slice: images outside the search slice, and FP32 metrics of ``--onnx-path`` on them."""
    confirm = cfg.confirm
    selected = dataset_key(replace(cfg.evaluation, max_images=confirm.count, skip_images=confirm.skip))
    if not selected.image_ids:
        raise UserError(
            f"--confirm-skip: {dataset.ann_file} has no images after the first {confirm.skip}; a confirmation slice "
            "needs images the search never sees (the demo generator makes them: make_demo_dataset.py --num-val 1100)",
            flag="--confirm-skip",
        )
    shared = sorted(set(selected.image_ids) & set(dataset.image_ids))
    if shared:
        raise UserError(
            f"--confirm-skip {confirm.skip}: the confirmation slice shares {len(shared)} images with the search "
            f"slice (first id {shared[0]}); skip at least --max-images {cfg.evaluation.max_images}",
            flag="--confirm-skip",
        )
    flag = "--confirm-baseline-metrics"
    with records.shape_checked(confirm.baseline_metrics, flag):
        _check_metrics(
            confirm.baseline_metrics,
            flag,
            digests["onnx"],
            f"--onnx-path {cfg.onnx_path}",
            cfg,
            selected,
            "--confirm-*",
        )
    return selected


def _check_evaluation(evaluation: EvalConfig) -> None:
    """The evaluator's own checks of its settings, providers and data paths (no session, nothing written)."""
    from lowbit.evaluate import resolve_data_paths, validate_settings
    from lowbit.ort_providers import check_providers

    settings = evaluation.eval_settings(Path("model.onnx"))
    validate_settings(settings)
    check_providers(list(evaluation.providers), False, "--providers")
    resolve_data_paths(settings)


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
        "confirm_baseline_metrics": digest(cfg.confirm.baseline_metrics) if cfg.confirm is not None else None,
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
    path: Path,
    flag: str,
    model_sha: str,
    model_label: str,
    cfg: SearchConfig,
    dataset: DatasetKey,
    slice_flags: str | None = None,
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
            f"that {slice_flags or f'--max-images {cfg.evaluation.max_images}'} selects from {dataset.ann_file} (image ids "
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
