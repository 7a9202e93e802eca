"""Comparison report of the evaluated variants of one model: table, recommendation and Pareto plot.

Inputs are what the card's scripts already wrote; nothing is re-measured here except, optionally,
TensorRT engines (see :mod:`lowbit.trt`):

* every ``metrics.json`` under the run dirs that is a metrics record (``kind`` "metrics",
  ``schema_version`` 1, ``status`` "ok"), e.g. ``baseline-coco/``, ``int8-coco/``, ``fp8-k5-coco/``;
* for each evaluated model (metrics ``model.path``), its ``<stem>.manifest.json`` of kind ``quantize``
  (:mod:`lowbit.quantize`) when it lies beside the model and describes the same file
  (``extra.output_sha256`` equals the evaluated ``model.sha256``): quantization settings,
  excluded nodes, quantized node count, the source model's sha256 and the exclusion scheme;
* for a budget-search candidate without one, its ``<stem>.inputs.json`` record of kind ``candidate``
  (:class:`lowbit.candidates.CandidateStore`, same ``model_sha256``): the nodes put in float, and the
  quantizer manifest of the full Q/DQ model it was cut from (the record's ``full_model``, checked against
  its ``build.full_model_sha256`` as above) for the quantization settings.

The FP32 baseline is the evaluated model without Q/DQ; its metrics are the reference every other record
is checked against (:mod:`lowbit.report_inputs`): every file is read through :mod:`lowbit.records`, and a
variant scored on other annotations, images or post-processing, whose model file changed since it was
evaluated, or quantized from another model, is dropped with its reason, as is a ``search.json`` that is not
a search of this run. An unusable baseline, no usable quantized variant, or an annotation file changed
since the run was scored raise :class:`~lowbit.errors.UserError` naming the file. Every record read and written
here is described in docs/records.md.

``report.json`` keys (``schema_version``: ``lowbit.records.SCHEMA_VERSIONS["report"]``, ``kind``: "report"):

* ``run_dirs``: the run dirs read; ``created_at``
* ``dataset``: ``name``, ``images_dir``, ``ann_file``, ``ann_sha256``, ``num_images``, ``image_id_range``
  [first, last], ``postprocess`` {mode, conf, iou, max_det, imgsz}
* ``budget_ap``: largest accepted mAP50-95 loss, AP points (×100); ``latency_tie_pct``
* ``baseline``: ``label``, ``map50_95``, ``map50``, ``metrics_path``, ``model_sha256``
* ``variants``: one dict per evaluation, baseline first; keys:
  ``label``, ``role`` ("baseline" | "fp32_repeat" | "quantized" | "random_control"), ``quant_mode``
  ("fp32" | "int8" | "fp8" | ...), ``map50_95``, ``map50`` (0..1, copied from metrics.json),
  ``delta_ap`` / ``delta_ap50`` ((variant − baseline) × 100, AP points), ``latency_ms`` {p50, p90,
  mean, n} (ORT ``session.run`` wall time, copied), ``provider`` (first of ``providers_used``),
  ``providers_used``, ``tensorrt`` (see :func:`lowbit.trt.benchmark_engine`; ``status`` always set),
  ``model_path``, ``model_file`` (resolved path or null), ``model_sha256``, ``source_model_sha256`` (the
  float model it was quantized from, per its quantizer manifest; null when unknown), ``model_bytes`` (null when
  the file is gone or no longer the evaluated one), ``qdq_pairs``, ``quant_dtypes``,
  ``excluded_nodes`` (count; null when unknown), ``excluded_node_names``, ``num_quantized_nodes``,
  ``quant_settings`` (the quantizer's ``extra.settings``), ``candidate`` {k, random_seed,
  ranking_source, scheme} or null, ``metrics_path``, ``model_manifest`` (the quantizer manifest or the
  candidate record read; null when none), ``derived_from_full_model`` (a search candidate cut from the full
  Q/DQ model), ``run_dir``, ``notes`` [str]
* ``recommended``: ``variant`` (label), ``metrics_path``, ``reason``, ``latency_source``
  ("tensorrt" | "onnxruntime" | null), ``latency_provider``, ``latency_ms``, ``within_budget`` [labels]
* ``latency_axis``: the latency on the plot's x axis (``source``, ``description``); the recommendation names its own
  in ``recommended.latency_source``
* ``tensorrt``: ``status`` ("measured" | "not measured: TensorRT not installed" | "not measured: ..."),
  ``trtexec``, ``tensorrt_python``, ``qdq_mode``
* ``search``: one entry per budget search used (:func:`search_summary`)
* ``dropped``: [{``path``, ``reason``}]: every record found and left out (a variant's metrics, a search.json)
* ``provenance``: what the report was computed from, by content: ``model_sha256`` (the FP32 model),
  ``ann_sha256``, ``image_ids_sha256``, ``num_images``, ``records`` {path: sha256} of every record used
  (metrics, quantizer manifests and candidate records, search.json)
* ``notes``: [str]
"""

from __future__ import annotations

import datetime as _dt
import io
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lowbit import records
from lowbit import report_inputs as inputs
from lowbit.errors import UserError
from lowbit.logs import get_logger
from lowbit.report_inputs import rel_path as _rel
from lowbit.runs import REPO_ROOT

log = get_logger("report")

KIND = "report"  # report.json's "kind"
SCHEMA_VERSION = records.SCHEMA_VERSIONS[KIND]
QUANTIZER_KIND = "quantize"  # the "kind" of the quantizer's <stem>.manifest.json
DEFAULT_BUDGET_AP = 0.5  # AP points (mAP50-95 x 100) a quantized variant may lose against FP32
# TensorRT latencies this close (%) to the fastest count as a tie, broken by accuracy: trtexec medians of one
# engine rebuilt and re-timed differ by about 1-3 %, so smaller differences are timing noise.
DEFAULT_LATENCY_TIE_PCT = 3.0
TRT_NOT_INSTALLED = "not measured: TensorRT not installed"
TRT_DISABLED = "not measured: disabled (--tensorrt off)"
# Providers whose latency of a Q/DQ model reflects TensorRT's (the EP builds a TensorRT engine).
TRT_LIKE_PROVIDERS = ("TensorrtExecutionProvider",)
SEARCH_PLOT = "search-curves.png"
_EPS = 1e-9  # float slack for the budget comparison
_STEM_K = re.compile(r"-k(\d+)(?:_random(\d+))?$")


# ----------------------------------------------------------------------------------------------------------------------
# small helpers


def short_provider(provider: str | None) -> str:
    """``CPUExecutionProvider`` -> ``CPU EP``; ``TensorrtExecutionProvider`` -> ``TensorRT EP``."""
    if not provider:
        return "unknown provider"
    name = provider.removesuffix("ExecutionProvider")
    return {"Tensorrt": "TensorRT"}.get(name, name) + " EP"


def _read_json(path: Path | None, notes: list[str] | None = None) -> Any:
    """An optional JSON file beside a model (manifest, record, scheme): None when absent; unreadable, truncated or
    non-finite -> None and a note naming it (:func:`lowbit.records.read_json`)."""
    if path is None or not Path(path).is_file():
        return None
    try:
        return records.read_json(path)
    except UserError as e:
        if notes is not None:
            notes.append(f"{e}; not used")
        return None


def _fmt(value: float | None, spec: str, missing: str = "-") -> str:
    return missing if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _mode_from_dtypes(dtypes: Iterable[str]) -> str:
    dtypes = [str(d).lower() for d in dtypes]
    if any(d.startswith(("float8", "fp8")) for d in dtypes):
        return "fp8" if not any(d in ("int8", "uint8") for d in dtypes) else "int8+fp8"
    if any(d in ("int8", "uint8") for d in dtypes):
        return "int8"
    if any(d in ("int4", "uint4") for d in dtypes):
        return "int4"
    return "qdq"


# ----------------------------------------------------------------------------------------------------------------------
# discovery


def resolve_model_file(model_path: str, metrics_path: Path, run_dir: Path) -> Path | None:
    """Where the evaluated model is now: as recorded (cwd, then repo root), else ``onnx/<name>`` of the run dir."""
    recorded = Path(model_path)
    candidates = [recorded]
    if not recorded.is_absolute():
        candidates.append(REPO_ROOT / recorded)
    candidates += [run_dir / "onnx" / recorded.name, metrics_path.parent.parent / "onnx" / recorded.name]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return None


def _scheme_info(manifest: dict | None, model_path: str, run_dir: Path, notes: list[str]) -> dict | None:
    """``{k, random_seed, ranking_source, scheme}`` of a candidate built from an exclusion scheme, else None."""
    scheme_path = None
    args = (manifest or {}).get("args") or {}
    if args.get("exclude_json"):
        recorded = Path(args["exclude_json"])
        for candidate in (recorded, REPO_ROOT / recorded, run_dir / "schemes" / recorded.name):
            if candidate.is_file():
                scheme_path = candidate
                break
    scheme = _read_json(scheme_path, notes)
    if isinstance(scheme, dict) and "k" in scheme:
        source = None
        summary = _read_json(scheme_path.parent / "schemes_summary.json", notes)
        if isinstance(summary, dict):
            source = summary.get("report_source")
        if source is None and scheme.get("report"):
            report = _read_json(Path(scheme["report"])) or _read_json(REPO_ROOT / scheme["report"])
            if isinstance(report, dict):
                source = report.get("source")
        return {
            "k": int(scheme["k"]),
            "random_seed": scheme.get("random_seed"),
            "ranking_source": source,
            "scheme": _rel(scheme_path),
        }
    match = _STEM_K.search(Path(model_path).stem)
    if match:  # the materializer's file naming: <model>-<mode>-k{K}[_random{SEED}].onnx
        return {
            "k": int(match.group(1)),
            "random_seed": int(match.group(2)) if match.group(2) else None,
            "ranking_source": None,
            "scheme": None,
        }
    return None


def _load_model_manifest(model_file: Path | None, sha: str, notes: list[str]) -> tuple[dict | None, Path | None]:
    if model_file is None:
        return None, None
    path = model_file.with_suffix(".manifest.json")
    manifest = _read_json(path, notes)
    if not isinstance(manifest, dict) or manifest.get("kind") != QUANTIZER_KIND:
        return None, None
    if manifest.get("status") != "ok":
        notes.append(f"quantizer manifest {_rel(path)} has status {manifest.get('status')!r}; not used")
        return None, None
    if (manifest.get("extra") or {}).get("output_sha256") != sha:
        notes.append(f"quantizer manifest {_rel(path)} describes another file than the evaluated model; not used")
        return None, None
    return manifest, path


def _load_candidate_record(model_file: Path | None, sha: str, run_dir: Path,
                           notes: list[str]) -> tuple[dict | None, Path | None]:  # fmt: skip
    """A budget-search candidate's record (``<stem>.inputs.json`` of kind ``candidate``, written by
    :class:`lowbit.candidates.CandidateStore`) and
    the quantizer manifest of the full Q/DQ model it was cut from (``build.method == "full"``), when both describe it.

    Returns ``(manifest-like dict, record path)``: the full model's manifest with ``extra`` adjusted to the candidate
    (``excluded_nodes`` = the nodes put in float, ``num_quantized_nodes`` reduced by them), or the re-quantization
    settings of ``build.method == "requantize"``; ``(None, None)`` when there is no such record.
    """
    if model_file is None:
        return None, None
    path = model_file.with_name(model_file.stem + ".inputs.json")
    if not path.is_file():
        return None, None
    try:
        record = records.read_record(path, "candidate")
    except UserError as e:  # unreadable, no kind (an older record), a fixed-K candidate's record ...
        notes.append(f"{e}; not used")
        return None, None
    if not isinstance(record.get("build"), dict):
        return None, None
    if record.get("model_sha256") != sha:
        notes.append(f"candidate record {_rel(path)} describes another file than the evaluated model; not used")
        return None, None
    build, nodes = record["build"], list(record["build"].get("nodes") or [])
    if build.get("method") == "requantize":
        q = build.get("quantize") or {}
        settings = {"quantize_mode": q.get("mode"), "calibration_method": q.get("calibration_method"),
                    "high_precision_dtype": q.get("high_precision_dtype"), "nodes_to_exclude": nodes}  # fmt: skip
        return {"extra": {"settings": settings, "excluded_nodes": nodes}, "derived": "requantized",
                "source_model_sha256": build.get("onnx_sha256")}, path
    full_file = resolve_model_file(record["full_model"], path, run_dir) if record.get("full_model") else None
    full, full_path = _load_model_manifest(full_file, build.get("full_model_sha256"), notes)
    if full is None:
        notes.append(f"candidate record {_rel(path)}: no quantizer manifest of its full model "
                     f"{record.get('full_model')}; quantization settings unknown")  # fmt: skip
        return {"extra": {"excluded_nodes": nodes}, "derived": "full"}, path
    extra = dict(full.get("extra") or {})
    quantized = extra.get("num_quantized_nodes")
    extra.update(excluded_nodes=nodes, num_quantized_nodes=quantized - len(nodes) if quantized is not None else None)
    return {**full, "extra": extra, "derived": "full", "full_manifest": full_path}, path


def _label(metrics: dict, mode: str, settings: dict | None, candidate: dict | None, stem: str) -> tuple[str, str]:
    """(label, role) of one evaluation."""
    if not metrics["model"]["qdq"].get("is_qdq"):
        dtype = str(metrics["model"].get("input", {}).get("dtype", ""))
        return ("FP16" if "float16" in dtype else "FP32"), "baseline"
    mode_text = mode.upper()
    if candidate is not None:
        k = candidate["k"]
        if candidate.get("random_seed") is not None:
            return f"{mode_text} K={k} random control (seed {candidate['random_seed']})", "random_control"
        source = candidate.get("ranking_source")
        return f"{mode_text} K={k}" + (f" ({source} ranking)" if source and k > 0 else ""), "quantized"
    if settings:
        label = f"{mode_text} {settings.get('calibration_method')}/{settings.get('high_precision_dtype')}"
        excluded = len(settings.get("nodes_to_exclude") or [])
        return label + (f" excl {excluded}" if excluded else ""), "quantized"
    return f"{mode_text} ({stem})", "quantized"


def _variant_from_metrics(metrics: dict, metrics_path: Path, run_dir: Path, hasher: inputs.Hasher) -> dict:
    """One row of the report from an evaluation read by :func:`lowbit.report_inputs.read_metrics`.

    ``_model_problem`` says why its model file is not the evaluated one (None when it is); ``model_file`` is
    then None and the row is dropped (a quantized variant) or noted (the baseline) by :func:`collect_variants`.
    """
    model = metrics["model"]
    qdq = model.get("qdq") or {}
    notes: list[str] = []
    model_file, model_problem = inputs.find_model_file(model["path"], model["sha256"], metrics_path, run_dir, hasher)
    model_bytes = model_file.stat().st_size if model_file else None
    manifest, manifest_path = _load_model_manifest(model_file, model["sha256"], notes)
    if manifest is None:  # a budget-search candidate: its record names the nodes in float and the full model
        manifest, manifest_path = _load_candidate_record(model_file, model["sha256"], run_dir, notes)
    extra = (manifest or {}).get("extra") or {}
    settings = extra.get("settings")
    is_qdq = bool(qdq.get("is_qdq"))
    mode = "fp32" if not is_qdq else ((settings or {}).get("quantize_mode") or _mode_from_dtypes(qdq.get("quant_dtypes", [])))
    candidate = _scheme_info(manifest, model["path"], run_dir, notes) if is_qdq else None
    label, role = _label(metrics, mode, settings, candidate, Path(model["path"]).stem)
    if not is_qdq and label == "FP16":
        mode = "fp16"
    excluded = extra.get("excluded_nodes") if manifest else None
    if excluded is None and settings is not None:
        excluded = settings.get("nodes_to_exclude")
    source_sha = (manifest or {}).get("source_model_sha256")
    if manifest and source_sha is None:
        source_sha = (manifest.get("inputs") or {}).get(str((manifest.get("args") or {}).get("onnx_path")))
    providers_used = (metrics.get("providers") or {}).get("providers_used") or []
    latency = metrics.get("latency_ms") or {}
    return {
        "label": label,
        "role": role,
        "quant_mode": mode,
        "map50_95": metrics["metrics"]["map50_95"],
        "map50": metrics["metrics"]["map50"],
        "delta_ap": None,
        "delta_ap50": None,
        "latency_ms": {k: latency.get(k) for k in ("p50", "p90", "mean", "n")},
        "provider": providers_used[0] if providers_used else None,
        "providers_used": list(providers_used),
        "tensorrt": None,
        "model_path": model["path"],
        "model_file": str(model_file) if model_file else None,
        "model_sha256": model["sha256"],
        "source_model_sha256": source_sha,
        "model_bytes": model_bytes,
        "qdq_pairs": qdq.get("qdq_pairs"),
        "quant_dtypes": list(qdq.get("quant_dtypes") or []),
        "excluded_nodes": (len(excluded) if excluded is not None else (0 if not is_qdq else None)),
        "excluded_node_names": list(excluded) if excluded is not None else None,
        "num_quantized_nodes": extra.get("num_quantized_nodes") if manifest else (0 if not is_qdq else None),
        "quant_settings": settings,
        "candidate": candidate,
        "metrics_path": _rel(metrics_path),
        "model_manifest": _rel(manifest_path) if manifest_path else None,
        "derived_from_full_model": (manifest or {}).get("derived") == "full",
        "_derived": (manifest or {}).get("derived"),
        "run_dir": _rel(run_dir),
        "notes": notes,
        "_metrics_file": metrics_path,
        "_metrics_sha256": hasher(metrics_path),
        "_manifest_files": [p for p in (manifest_path, (manifest or {}).get("full_manifest")) if p is not None],
        "_model_problem": model_problem,
        "_dataset": metrics["dataset"],
        "_postprocess": metrics.get("postprocess") or {},
    }


def _dataset_summary(variant: dict) -> dict:
    ds = variant["_dataset"]
    images_dir = Path(str(ds.get("images_dir", "")))
    parts = images_dir.parts
    name = "/".join(parts[parts.index("datasets") + 1:]) if "datasets" in parts else "/".join(parts[-2:])
    ids = ds.get("image_ids") or []
    return {
        "name": name or str(images_dir),
        "images_dir": ds.get("images_dir"),
        "ann_file": ds.get("ann_file"),
        "ann_sha256": ds.get("ann_sha256"),
        "num_images": len(ids),
        "image_id_range": [ids[0], ids[-1]] if ids else None,
        "postprocess": variant["_postprocess"],
    }


def _sort_key(v: dict) -> tuple:
    role_rank = {"baseline": 0, "fp32_repeat": 1}.get(v["role"], 2)
    cand = v["candidate"] or {}
    return (
        role_rank,
        v["quant_mode"],
        cand.get("k", -1),
        cand.get("random_seed") is not None,
        cand.get("random_seed") or 0,
        v["label"],
        v["metrics_path"],
    )


def _pick_baseline(floats: list[dict]) -> dict:
    """The FP32 evaluation the others are compared with; repeats become ``fp32_repeat``.

    Raises:
        UserError: the FP32 evaluations are of different models.
    """
    models = {}
    for v in floats:
        models.setdefault(v["model_sha256"], []).append(v["metrics_path"])
    if len(models) > 1:
        listing = "; ".join(f"sha256 {sha[:12]}: {', '.join(paths)}" for sha, paths in models.items())
        raise UserError(
            f"--run-dir: the FP32 evaluations are of different models ({listing}); report one model at a time",
            flag="--run-dir",
        )
    baseline = floats[0]  # discovery order: first run dir given, then path order
    for v in floats[1:]:
        v["role"] = "fp32_repeat"
    return baseline


def _read_evaluations(run_dirs: list[Path], hasher: inputs.Hasher, dropped: list[dict]) -> list[dict]:
    """A row per readable evaluation; an unreadable one is dropped, unless it is the FP32 baseline's (an error)."""
    variants = []
    for found in inputs.find_metrics(run_dirs):
        if found.error is None:
            variants.append(_variant_from_metrics(found.record, found.path, found.run_dir, hasher))
        elif found.is_float:
            raise UserError(f"--run-dir: the FP32 baseline's metrics cannot be used: {found.error}", flag="--run-dir")
        else:
            inputs.drop(dropped, found.path, found.error)
    return variants


def _listing(dropped: list[dict]) -> str:
    return "; ".join(f"{d['path']}: {d['reason']}" for d in dropped)


def _usable(variants: list[dict], baseline: dict, ref: inputs.Reference, dropped: list[dict]) -> list[dict]:
    """The evaluations comparable with the baseline (:func:`lowbit.report_inputs.variant_problem`); others dropped."""
    used = [baseline]
    if baseline["_model_problem"]:
        baseline["notes"].append(f"{baseline['_model_problem']}: its size and TensorRT latency are unknown")
    for v in variants:
        if v is baseline:
            continue
        problem = inputs.variant_problem(v, ref)
        if problem:
            inputs.drop(dropped, v["_metrics_file"], f"{v['metrics_path']}: {problem}")
        else:
            used.append(v)
    compared = [v for v in used if v["role"] in ("quantized", "random_control")]
    if dropped and not compared:
        raise UserError(
            f"--run-dir: no quantized variant is left to compare with {baseline['metrics_path']}: {_listing(dropped)}",
            flag="--run-dir",
        )
    return used


def _read_searches(
    run_dirs: list[Path], ref: inputs.Reference, used: list[dict], dropped: list[dict], hasher: inputs.Hasher
) -> list[dict]:
    """Every ``search-<mode>/search.json`` that is a search of this run (:func:`lowbit.report_inputs.read_search`)."""
    dropped_at = {(REPO_ROOT / d["path"]).resolve(): d["reason"].removeprefix(f"{d['path']}: ") for d in dropped}
    searches = []
    for path in inputs.find_searches(run_dirs):
        try:
            data = inputs.read_search(path, ref, used, dropped_at, hasher)
        except UserError as e:
            inputs.drop(dropped, path, str(e))
            continue
        searches.append({**data, "path": _rel(path), "_sha256": hasher(path)})
    return searches


def _without_uncited_candidates(variants: list[dict], dropped: list[dict]) -> list[dict]:
    """Budget-search candidates that a used ``search.json`` cites, and every other variant.

    A candidate left in the run dir by an earlier search (another ranking, budget or build) still matches the
    baseline, but no current search stands behind it: it is dropped, never recommended beside the search shown.
    """
    kept = []
    for v in variants:
        if v["_derived"] in ("full", "requantized") and not v.get("_cited_by_search"):
            why = "a budget-search candidate that no search.json of this report cites (left by an earlier search)"
            inputs.drop(dropped, v["_metrics_file"], why)
            continue
        kept.append(v)
    return kept


def _provenance(ref: inputs.Reference, used: list[dict], searches: list[dict], hasher: inputs.Hasher) -> dict:
    """report.json's ``provenance``: the baseline's keys and the sha256 of every record the report used."""
    used_records = {}
    for v in used:
        used_records[v["metrics_path"]] = v["_metrics_sha256"]
        for path in v["_manifest_files"]:  # the quantizer manifest or candidate record, and its full model's manifest
            used_records[_rel(path)] = hasher(path)
    for s in searches:
        used_records[s["path"]] = s["_sha256"]
    return {
        "model_sha256": ref.model_sha256,
        "ann_sha256": ref.ann_sha256,
        "image_ids_sha256": ref.image_ids_sha256,
        "num_images": ref.num_images,
        "records": used_records,
    }


def collect_variants(run_dirs: Iterable[Path], data_root: Path | None = None) -> dict:
    """Read every evaluation and budget search under ``run_dirs`` and keep those that belong to the FP32 baseline.

    Returns ``{"run_dirs", "dataset", "baseline", "variants", "searches", "notes", "dropped", "provenance"}``;
    ``delta_ap`` is filled against the baseline; ``tensorrt`` is left None for :func:`build_report`.
    ``data_root``: the dataset whose annotation file must still be the one the run was scored on
    (:func:`lowbit.report_inputs.check_annotations`).

    Raises:
        UserError: a run dir is missing or holds no evaluation; the FP32 evaluation is missing or unusable, or
            the FP32 evaluations are of different models; no quantized variant is usable; the annotation file
            changed since the run was scored. Each names the file.
    """
    run_dirs = [Path(d) for d in run_dirs]
    for run_dir in run_dirs:
        if not run_dir.is_dir():
            raise UserError(f"--run-dir: {run_dir} is not a directory", flag="--run-dir")
    hasher, dropped = inputs.Hasher(), []
    variants = _read_evaluations(run_dirs, hasher, dropped)
    where = ", ".join(str(d) for d in run_dirs)
    if not variants and not dropped:
        raise UserError(f"--run-dir: no metrics record (a metrics.json of kind 'metrics') under {where}", flag="--run-dir")
    floats = [v for v in variants if v["role"] == "baseline"]
    if not floats:
        raise UserError(
            f"--run-dir: no FP32 evaluation (a metrics.json of a model without Q/DQ) under {where}; evaluate the "
            "float model first (card step 1, baseline-coco/metrics.json)"
            + (f"; left out: {_listing(dropped)}" if dropped else ""),
            flag="--run-dir",
        )
    baseline = _pick_baseline(floats)
    ref = inputs.Reference.of(baseline)
    notes = inputs.check_annotations(ref, baseline["_dataset"].get("ann_file"), run_dirs, data_root, hasher)
    variants = _usable(variants, baseline, ref, dropped)
    ref.fp32_metrics_sha256 = {v["_metrics_sha256"] for v in variants if v["role"] in ("baseline", "fp32_repeat")}
    searches = _read_searches(run_dirs, ref, variants, dropped, hasher)
    variants = _without_uncited_candidates(variants, dropped)
    unknown_source = [v["label"] for v in variants if v["role"] in ("quantized", "random_control")
                      and not v["source_model_sha256"]]
    if unknown_source:
        notes.append(
            "no quantizer manifest for " + ", ".join(unknown_source)
            + ": that they were quantized from the FP32 model could not be checked"
        )

    for v in variants:
        v["delta_ap"] = (v["map50_95"] - baseline["map50_95"]) * 100.0
        v["delta_ap50"] = (v["map50"] - baseline["map50"]) * 100.0

    # Labels must identify a row: repeats get the folder of their metrics file appended.
    counts: dict[str, int] = {}
    for v in variants:
        counts[v["label"]] = counts.get(v["label"], 0) + 1
    for v in variants:
        if counts[v["label"]] > 1 and v is not baseline:
            v["label"] += f" [{Path(v['metrics_path']).parent.name}]"
    variants.sort(key=_sort_key)
    return {
        "searches": searches,
        "run_dirs": [_rel(d) for d in run_dirs],
        "dataset": _dataset_summary(baseline),
        "baseline": baseline,
        "variants": variants,
        "notes": notes,
        "dropped": dropped,
        "provenance": _provenance(ref, variants, searches, hasher),
    }


# ----------------------------------------------------------------------------------------------------------------------
# recommendation


def _trt_ms(v: dict, key: str = "median") -> float | None:
    trt = v.get("tensorrt") or {}
    if trt.get("status") != "measured":
        return None
    return (trt.get("gpu_compute_ms") or {}).get(key)


def latency_axis(variants: list[dict]) -> dict:
    """The one latency every variant is compared on: TensorRT GPU compute time when measured for all, else ORT p50."""
    if variants and all(_trt_ms(v) is not None for v in variants):
        return {"source": "tensorrt", "description": "TensorRT GPU compute time (trtexec median)", "providers": []}
    providers = sorted({v["provider"] for v in variants if v["provider"]})
    described = ", ".join(short_provider(p) for p in providers) or "unknown provider"
    return {
        "source": "onnxruntime",
        "description": f"ONNX Runtime session.run p50 ({described})",
        "providers": providers,
    }


def variant_latency(v: dict, axis: dict, key: str = "p50") -> float | None:
    """Latency of ``v`` on ``axis``: TensorRT median/p90 or ORT p50/p90, ms."""
    if axis["source"] == "tensorrt":
        return _trt_ms(v, "median" if key == "p50" else key)
    return (v.get("latency_ms") or {}).get(key)


def _recommendation(pick: dict, reason: str, axis: dict | None = None, within: list[dict] | None = None,
                    cost_source: str | None = None) -> dict:  # fmt: skip
    """The ``recommended`` dict of the report for ``pick``."""
    return {
        "cost_source": cost_source,
        "mac_share": pick.get("mac_share"),
        "variant": pick["label"],
        "metrics_path": pick["metrics_path"],
        "reason": reason,
        "latency_source": axis["source"] if axis else None,
        "latency_provider": None if axis is None else (
            "TensorRT (trtexec GPU compute time)" if axis["source"] == "tensorrt" else pick["provider"]
        ),
        "latency_ms": variant_latency(pick, axis) if axis else None,
        "within_budget": [v["label"] for v in (within or [])],
    }


def _fastest_within(within: list[dict], timed: list[dict], axis: dict, budget_ap: float, latency_tie_pct: float):
    """The fastest timed variant (ties within ``latency_tie_pct`` % go to the most accurate) and the reason text."""
    fastest = min(variant_latency(v, axis) for v in timed)
    tied = [v for v in timed if variant_latency(v, axis) <= fastest * (1.0 + latency_tie_pct / 100.0)]
    pick = sorted(tied, key=lambda v: (-v["map50_95"], variant_latency(v, axis), v["label"]))[0]
    where = "TensorRT GPU compute time" if axis["source"] == "tensorrt" else f"{short_provider(pick['provider'])} p50"
    parts = [
        f"{pick['label']} is the fastest of the {len(within)} quantized variant(s) within the {budget_ap:g} AP "
        f"budget ({variant_latency(pick, axis):.2f} ms {where}, ΔAP {pick['delta_ap']:+.2f})"
    ]
    others = [v["label"] for v in tied if v is not pick]
    if others:
        parts.append(
            f"{', '.join(others)} ran within {latency_tie_pct:g}% of the fastest and {pick['label']} is the most "
            "accurate of them"
        )
    return pick, parts


def add_mac_share(variants: list[dict]) -> None:
    """Fill ``mac_share`` (low-precision share of Conv/MatMul/Gemm MACs, 0..1), ``low_precision_macs`` and
    ``total_macs`` of each variant from its model file (``lowbit.mac_share``); None when the file is gone."""
    from lowbit.mac_share import low_precision_mac_share

    for v in variants:
        if v.get("mac_share") is not None:
            continue
        share = None
        if v["model_file"]:
            try:
                share = low_precision_mac_share(Path(v["model_file"]), flag="model file")
            except (UserError, ValueError) as e:  # shapes that cannot be inferred: the cost is unknown, not a failure
                v["notes"].append(f"low-precision MAC share unknown: {e}")
        elif v["role"] == "baseline":
            v["mac_share"], v["low_precision_macs"], v["total_macs"] = 0.0, 0, None
            continue
        v["mac_share"] = share.share if share else None
        v["low_precision_macs"] = share.low_precision_macs if share else None
        v["total_macs"] = share.total_macs if share else None


def _by_mac_share(within: list[dict], budget_ap: float) -> tuple[dict, str]:
    """Most MACs in low precision first, then the most accurate; never ORT latency."""
    def key(v: dict) -> tuple:
        share = v.get("mac_share")
        return (-(share if share is not None else -1.0), -v["map50_95"], v["label"])

    ranked = sorted(within, key=key)
    pick = ranked[0]
    share = pick.get("mac_share")
    share_text = "unknown" if share is None else f"{share * 100:.1f}%"
    reason = (f"{pick['label']} runs the largest share of its Conv/MatMul MACs in low precision ({share_text}) of the "
              f"{len(within)} quantized variant(s) within the {budget_ap:g} AP budget (ΔAP {pick['delta_ap']:+.2f}); "
              "equal shares go to the more accurate. TensorRT was not measured, so variants are ranked by "
              "low-precision MAC share, which predicts TensorRT speed, not by ONNX Runtime latency, which does not")  # fmt: skip
    return pick, reason


def recommend(
    variants: list[dict],
    budget_ap: float = DEFAULT_BUDGET_AP,
    latency_tie_pct: float = DEFAULT_LATENCY_TIE_PCT,
) -> dict:
    """Pick the variant to ship; ORT latencies never decide (they are noisy and do not predict TensorRT).

    Rule: among quantized variants (random controls excluded) with ``delta_ap >= -budget_ap``:

    * TensorRT measured for them and the baseline: the fastest TensorRT GPU compute time; latencies
      within ``latency_tie_pct`` % of the fastest are ties (timing noise) and the most accurate of them
      wins; FP32 when the pick is not faster than FP32;
    * otherwise: the largest low-precision MAC share (``mac_share``), then the most accurate.

    FP32 is recommended when no quantized variant is within budget.

    Returns:
        ``{"variant", "metrics_path", "reason", "latency_source", "latency_provider", "latency_ms",
        "cost_source", "mac_share", "within_budget"}``; ``cost_source``: "tensorrt" | "mac_share" | null.
    """
    baseline = next(v for v in variants if v["role"] == "baseline")
    quantized = [v for v in variants if v["role"] == "quantized"]
    if not quantized:
        return _recommendation(baseline, f"{baseline['label']}: no quantized variant was evaluated")
    within = [v for v in quantized if v["delta_ap"] >= -budget_ap - _EPS]
    if not within:
        best = max(quantized, key=lambda v: v["delta_ap"])
        return _recommendation(
            baseline,
            f"no quantized variant stays within the {budget_ap:g} AP budget: the most accurate, {best['label']}, "
            f"loses {-best['delta_ap']:.2f} AP (mAP50-95 {best['map50_95']:.4f} vs {baseline['map50_95']:.4f}); "
            f"keep {baseline['label']}",
        )
    axis = latency_axis(within + [baseline])
    if axis["source"] != "tensorrt":
        pick, reason = _by_mac_share(within, budget_ap)
        return _recommendation(pick, reason, None, within, "mac_share")
    pick, parts = _fastest_within(within, within, axis, budget_ap, latency_tie_pct)
    pick_ms, base_ms = variant_latency(pick, axis), variant_latency(baseline, axis)
    if base_ms is not None and pick_ms >= base_ms:
        reason = (f"{parts[0]}, but it is not faster than {baseline['label']} ({pick_ms:.2f} vs {base_ms:.2f} ms "
                  f"TensorRT GPU compute time); keep {baseline['label']}")  # fmt: skip
        return _recommendation(baseline, reason, axis, within, "tensorrt")
    if base_ms is not None:
        parts.append(f"{base_ms / pick_ms:.2f}x faster than {baseline['label']} ({base_ms:.2f} ms)")
    return _recommendation(pick, "; ".join(parts), axis, within, "tensorrt")


# ----------------------------------------------------------------------------------------------------------------------
# report


def _public(variant: dict) -> dict:
    return {k: v for k, v in variant.items() if not k.startswith("_")}


def build_report(
    collected: dict,
    budget_ap: float = DEFAULT_BUDGET_AP,
    latency_tie_pct: float = DEFAULT_LATENCY_TIE_PCT,
    tensorrt: dict | None = None,
    searches: list[dict] | None = None,
) -> dict:
    """The report dict (keys in the module docstring) from :func:`collect_variants`' output.

    Args:
        collected: output of :func:`collect_variants`.
        budget_ap: accepted mAP50-95 loss, AP points (finite, > 0).
        latency_tie_pct: see :func:`recommend`.
        tensorrt: ``{"status", "trtexec", "tensorrt_python", "qdq_mode", "results": {metrics_path: result}}``;
            None means TensorRT was not looked for (status "not measured: TensorRT not installed").
        searches: ``search.json`` dicts of the budget search (``lowbit.search_run``); None: those
            :func:`collect_variants` found under the run dirs.
    """
    if not (math.isfinite(budget_ap) and budget_ap > 0):
        raise ValueError(f"budget_ap must be a finite number > 0, got {budget_ap}")
    tensorrt = dict(tensorrt or {"status": TRT_NOT_INSTALLED})
    results = tensorrt.pop("results", {}) or {}
    variants = collected["variants"]
    for v in variants:
        res = results.get(v["metrics_path"])
        if res is None:
            status = tensorrt["status"] if tensorrt["status"] != "measured" else "not measured: not benchmarked"
            res = {"status": status}
        v["tensorrt"] = res
    measured = [v for v in variants if v["tensorrt"].get("status") == "measured"]
    if results and measured:
        tensorrt["status"] = "measured"
    elif results:  # TensorRT ran but nothing came out of it
        tensorrt["status"] = "not measured: every trtexec run failed (see the variants' tensorrt.status)"

    baseline = collected["baseline"]
    add_mac_share(variants)
    recommended = recommend(variants, budget_ap, latency_tie_pct)
    axis = latency_axis(variants)
    notes = list(collected["notes"])
    notes += _report_notes(variants, baseline, axis, tensorrt)
    searches = [search_summary(s) for s in (searches if searches is not None else collected.get("searches", []))]
    return {
        **records.header(KIND),
        "created_at": _dt.datetime.now().isoformat(timespec="seconds"),
        "run_dirs": collected["run_dirs"],
        "dataset": collected["dataset"],
        "budget_ap": budget_ap,
        "latency_tie_pct": latency_tie_pct,
        "baseline": {
            "label": baseline["label"],
            "map50_95": baseline["map50_95"],
            "map50": baseline["map50"],
            "metrics_path": baseline["metrics_path"],
            "model_sha256": baseline["model_sha256"],
        },
        "variants": [_public(v) for v in variants],
        "recommended": recommended,
        "latency_axis": {"source": axis["source"], "description": axis["description"]},
        "cost_axis": cost_axis(axis),
        "tensorrt": tensorrt,
        "search": searches,
        "dropped": list(collected.get("dropped") or []),
        "provenance": collected.get("provenance"),
        "notes": notes,
    }


def cost_axis(axis: dict) -> dict:
    """What ranks the variants within budget and is the Pareto plot's x: TensorRT latency, else the MAC share."""
    if axis["source"] == "tensorrt":
        return {"source": "tensorrt", "description": axis["description"]}
    return {"source": "mac_share", "description": "share of Conv/MatMul/Gemm MACs left in float, % (lower is faster "
            "under TensorRT; from the graph, lowbit.mac_share)"}  # fmt: skip


def search_summary(data: dict) -> dict:
    """The report's record of one ``search.json``: K found, reason, every probe (ΔAP = AP − FP32 AP) and controls."""
    s = data["search"]
    rc = data.get("random_control")
    control = None
    if rc:
        control = {key: rc[key] for key in ("k", "seeds", "aps", "mean_delta", "sd_delta", "min_delta", "max_delta",
                                            "ranking_delta", "margin_ap", "beats_chance")}  # fmt: skip
    ranking = data.get("ranking") or {}
    return {
        "mode": data["mode"],
        "path": data.get("path"),
        "ranking": {"method": ranking.get("method"), "source": ranking.get("source"), "report": ranking.get("report")},
        "budget_ap": data["budget_ap"],
        "baseline_ap": data["baseline_ap"],
        "build": data.get("build"),
        "k": s["k"],
        "found": s["found"],
        "delta_ap": 0.0 - s["delta"] + 0.0,  # + 0.0: no "-0.00" for a zero loss
        "reason": s["reason"],
        "ks_max": s["ks_max"],
        "order": s["order"],
        "probes": [{"k": p["k"], "ap": p["map"], "delta_ap": 0.0 - p["delta"] + 0.0, "meets": p["meets"]}
                   for p in s["curve"]],
        "random_control": control,
        "random_band": [{key: b[key] for key in ("k", "mean_delta", "sd_delta", "min_delta", "max_delta")}
                        for b in data.get("random_band") or []],
    }


def search_markdown(searches: list[dict]) -> list[str]:
    """The ``## Budget search`` section of report.md (empty when there was no search)."""
    if not searches:
        return []
    intro = ("Per mode, the smallest K (most sensitive nodes left in float) whose evaluated candidate is within "
             f"the budget; every probe is an evaluation on the slice above. Curves: `{SEARCH_PLOT}`.")
    header = ("| mode | ranking | K found | ΔAP at K | probes (K: ΔAP) | random controls at K: ΔAP mean ± sd "
              "[min, max] | ranking beats chance by | how the search ended |")
    lines = ["", "## Budget search", "", intro, "", header, "|---|---|---:|---:|---|---|---:|---|"]
    for s in searches:
        probes = ", ".join(f"{p['k']}: {p['delta_ap']:+.2f}" for p in s["probes"])
        rc = s["random_control"]
        control = margin = "-"
        if rc:
            control = (f"{-rc['mean_delta']:+.2f} ± {rc['sd_delta']:.2f} [{-rc['max_delta']:+.2f}, "
                       f"{-rc['min_delta']:+.2f}] ({len(rc['seeds'])} seeds)")  # fmt: skip
            margin = f"{rc['margin_ap']:+.2f} AP ({'yes' if rc['beats_chance'] else 'no'})"
        k = f"{s['k']}" if s["found"] else f"none ({s['k']} best)"
        lines.append(f"| {s['mode'].upper()} | {s['ranking']['method']} | {k} | {s['delta_ap']:+.2f} | {probes} | "
                     f"{control} | {margin} | {s['reason']} |")  # fmt: skip
    return lines


def dropped_markdown(dropped: list[dict]) -> list[str]:
    """The ``## Dropped`` section of report.md: every record found and left out, and why (empty when none)."""
    if not dropped:
        return []
    intro = "Found under the run dirs but not used: nothing above comes from these files."
    lines = ["", "## Dropped", "", intro, "", "| file | reason |", "|---|---|"]
    for d in dropped:
        lines.append(f"| `{d['path']}` | {' '.join(d['reason'].split()).replace('|', '/')} |")
    return lines


def _report_notes(variants: list[dict], baseline: dict, axis: dict, tensorrt: dict) -> list[str]:
    notes = []
    by_provider: dict[str, list[str]] = {}
    for v in variants:
        by_provider.setdefault(short_provider(v["provider"]), []).append(v["label"])
    if len(by_provider) > 1:
        notes.append(
            "ONNX Runtime latencies were measured on different providers: "
            + "; ".join(f"{p}: {', '.join(labels)}" for p, labels in by_provider.items())
        )
    if tensorrt["status"] == "measured":
        failed = [f"{v['label']} ({v['tensorrt']['status']})" for v in variants if v["tensorrt"]["status"] != "measured"]
        if failed:
            notes.append("TensorRT latency missing for " + "; ".join(failed))
        strongly = [
            v["label"] for v in variants
            if v["tensorrt"].get("precision") == "stronglyTyped"
            and (v["quant_settings"] or {}).get("high_precision_dtype") == "fp32"
        ]
        if strongly:
            notes.append(
                "strongly typed engines of " + ", ".join(strongly) + " keep their non-quantized layers in FP32 "
                "(high_precision_dtype fp32) while the float model is built in FP16; --trt-qdq-mode mixed lets "
                "TensorRT use FP16 there too"
            )
        notes.append("TensorRT engines were timed with trtexec on random inputs; their accuracy was not measured "
                     "(mAP comes from ONNX Runtime)")
    if axis["source"] == "onnxruntime" and any(v["provider"] == "CPUExecutionProvider" for v in variants):
        notes.append("CPU-EP latency of Q/DQ models does not predict TensorRT speed: ONNX Runtime's CPU kernels "
                     "run quantized graphs differently from TensorRT's INT8/FP8 kernels")
    base_bytes = baseline["model_bytes"]
    similar = [
        v["label"] for v in variants
        if v["role"] in ("quantized", "random_control") and base_bytes and v["model_bytes"]
        and v["model_bytes"] >= 0.9 * base_bytes
    ]
    if similar:
        notes.append(
            "model size is the ONNX file size; the Q/DQ files of " + ", ".join(similar) + " are about as large "
            "as FP32 because they keep float weights beside their Q/DQ scales (TensorRT stores the weights in "
            "low precision when it builds the engine)"
        )
    if any(v["role"] == "random_control" for v in variants):
        notes.append("random controls (K nodes excluded at random) are shown to judge the ranking and are never "
                     "recommended")
    for v in variants:
        for note in v["notes"]:
            notes.append(f"{v['label']}: {note}")
    return notes


def _settings_text(v: dict) -> str:
    s = v.get("quant_settings")
    if v["role"] in ("baseline", "fp32_repeat"):
        return "-"
    if not s:
        return "unknown (no quantizer manifest)"
    text = f"{s.get('quantize_mode')} {s.get('calibration_method')}, hp {s.get('high_precision_dtype')}"
    if s.get("calibration_images") is not None:
        text += f", {s['calibration_images']} calib imgs"
    cand = v.get("candidate")
    if cand and cand.get("scheme"):
        text += f", {Path(cand['scheme']).name}"
    if v.get("derived_from_full_model") and v.get("excluded_nodes"):
        text += f"; full model with {v['excluded_nodes']} nodes' Q/DQ removed"
    return text


def _share_text(v: dict) -> str:
    share = v.get("mac_share")
    return "unknown" if share is None else f"{share * 100:.1f}"


def _trt_text(v: dict) -> str:
    trt = v.get("tensorrt") or {}
    if trt.get("status") != "measured":
        return "failed" if str(trt.get("status", "")).startswith("failed") else "not measured"
    gpu = trt.get("gpu_compute_ms") or {}
    return f"{_fmt(gpu.get('median'), '.3f')} / {_fmt(gpu.get('p90'), '.3f')} ({trt.get('precision')})"


def report_markdown(report: dict, plot_name: str | None = "pareto.png") -> str:
    """``report.md``: recommendation, one table row per variant, sources and notes."""
    ds = report["dataset"]
    rec = report["recommended"]
    pp = ds["postprocess"]
    id_range = ds["image_id_range"]
    lines = [
        "# Low-bit variants: comparison report",
        "",
        f"- Dataset: **{ds['name']}**, {ds['num_images']} images"
        + (f" (ids {id_range[0]}..{id_range[1]})" if id_range else "")
        + f", annotations `{ds['ann_file']}` (sha256 {str(ds['ann_sha256'])[:12]})",
        f"- Post-processing: {pp.get('mode')}, conf {pp.get('conf')}, max_det {pp.get('max_det')}, imgsz {pp.get('imgsz')}",
        f"- Baseline: {report['baseline']['label']} mAP50-95 {report['baseline']['map50_95']:.4f}; ΔAP = (mAP50-95 − "
        f"baseline) × 100, AP points; budget: ΔAP ≥ −{report['budget_ap']:g} AP",
        f"- Cost used for the recommendation and the Pareto plot: {report['cost_axis']['description']}; "
        "ORT latencies are listed with their provider but never rank variants (noisy, and they do not predict TensorRT)",
        f"- TensorRT: {report['tensorrt']['status']}",
        f"- Run dirs: {', '.join('`' + d + '`' for d in report['run_dirs'])}",
        f"- Records left out: {len(report.get('dropped') or [])}" + (" (see Dropped)" if report.get("dropped") else ""),
        "",
        "## Recommendation",
        "",
        f"**{rec['variant']}** — {rec['reason']}.",
        "",
        "## Variants",
        "",
        "| variant | mAP50-95 | mAP50 | ΔAP | low-precision MACs % | ORT p50 ms | ORT p90 ms | ORT provider | "
        "TRT GPU ms median / p90 | size MB | Q/DQ pairs | excluded nodes | quantized nodes | quantization |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---|",
    ]
    for v in report["variants"]:
        name = f"**{v['label']}** (recommended)" if v["label"] == rec["variant"] else v["label"]
        lat = v["latency_ms"]
        size = _fmt(v["model_bytes"] / 1e6 if v["model_bytes"] else None, ".2f", "unknown")
        lines.append(
            f"| {name} | {v['map50_95']:.4f} | {v['map50']:.4f} | {v['delta_ap']:+.2f} | {_share_text(v)} | "
            f"{_fmt(lat.get('p50'), '.2f')} | "
            f"{_fmt(lat.get('p90'), '.2f')} | {short_provider(v['provider'])} | {_trt_text(v)} | {size} | "
            f"{_fmt(v['qdq_pairs'], 'd')} | {_fmt(v['excluded_nodes'], 'd', 'unknown')} | "
            f"{_fmt(v['num_quantized_nodes'], 'd', 'unknown')} | {_settings_text(v)} |"
        )
    lines += search_markdown(report.get("search") or [])
    lines += dropped_markdown(report.get("dropped") or [])
    lines += ["", "## Sources", "", "Every number above is copied from the file named here (report.json keeps them all).", "",
              "| variant | metrics | model | quantizer manifest or candidate record |", "|---|---|---|---|"]
    for v in report["variants"]:
        lines.append(
            f"| {v['label']} | `{v['metrics_path']}` | `{v['model_path']}` | "
            + (f"`{v['model_manifest']}`" if v["model_manifest"] else "-")
            + " |"
        )
    if report["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    if plot_name:
        lines += ["", f"![ΔAP vs cost and model size]({plot_name})"]
        if report.get("search"):
            lines += ["", f"![ΔAP vs K per mode]({SEARCH_PLOT})"]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------------
# plot


def _pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not beaten in both x (lower is better) and y (higher is better), sorted by x."""
    front, best_y = [], -math.inf
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best_y:
            front.append((x, y))
            best_y = y
    return front


def _place_labels(ax, items: list[tuple[float, float, str, bool]], renderer) -> None:
    """Annotate points, trying a few offsets per label so that labels overlap neither each other nor the points."""
    offsets = [(7, 7, "left"), (7, -13, "left"), (-7, 7, "right"), (-7, -13, "right"),
               (7, 19, "left"), (7, -25, "left"), (-7, 19, "right"), (-7, -25, "right")]
    ax_box = ax.get_window_extent(renderer)
    point_boxes = []
    for x, y, _, _ in items:
        px, py = ax.transData.transform((x, y))
        point_boxes.append((px - 5, py - 5, px + 5, py + 5))
    placed: list[tuple[float, float, float, float]] = []

    def overlaps(a, b) -> bool:
        return not (a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1])

    # the recommended point first, then left to right: it gets the best spot
    for x, y, text, is_rec in sorted(items, key=lambda it: (not it[3], it[0], -it[1])):
        best = None
        for dx, dy, ha in offsets:
            ann = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), ha=ha, fontsize=8.5,
                              fontweight="bold" if is_rec else "normal")
            bb = ann.get_window_extent(renderer)
            box = (bb.x0, bb.y0, bb.x1, bb.y1)
            inside = ax_box.x0 <= box[0] and box[2] <= ax_box.x1 and ax_box.y0 <= box[1] and box[3] <= ax_box.y1
            clash = any(overlaps(box, other) for other in placed + point_boxes)
            if inside and not clash:
                best = (ann, box)
                break
            ann.remove()
        if best is None:  # nothing free: first choice, overlapping
            dx, dy, ha = offsets[0]
            ann = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), ha=ha, fontsize=8.5,
                              fontweight="bold" if is_rec else "normal")
            bb = ann.get_window_extent(renderer)
            best = (ann, (bb.x0, bb.y0, bb.x1, bb.y1))
        placed.append(best[1])


_MARKERS = ["o", "^", "D", "v", "P", "s"]


def _point_style(v: dict, providers: list[str], per_provider: bool) -> tuple[str, str, str]:
    """``(color, marker, legend kind)`` of one variant's point."""
    if v["role"] in ("baseline", "fp32_repeat"):
        return "black", "s", "FP32"
    if v["role"] == "random_control":
        return "0.5", "x", "random control"
    if per_provider:
        marker = _MARKERS[providers.index(v["provider"] or "") % len(_MARKERS)]
        return "tab:blue", marker, f"quantized, {short_provider(v['provider'])}"
    return "tab:blue", "o", "quantized"


def _scatter_variants(ax, report: dict, xs: list[float | None], providers: list[str], per_provider: bool) -> list:
    """One point per variant with a known x, the pick starred; returns the label items to place."""
    rec = report["recommended"]["variant"]
    items, seen_kinds = [], set()
    for v, x in zip(report["variants"], xs):
        if x is None:
            continue
        color, marker, kind = _point_style(v, providers, per_provider)
        ax.scatter([x], [v["delta_ap"]], s=60, c=color, marker=marker, zorder=3,
                   label=None if kind in seen_kinds else kind)  # fmt: skip
        seen_kinds.add(kind)
        if v["label"] == rec:
            ax.scatter([x], [v["delta_ap"]], s=420, marker="*", facecolors="gold", edgecolors="darkred",
                       linewidths=1.2, zorder=4, label="recommended")  # fmt: skip
        items.append((x, v["delta_ap"], v["label"] + (" (recommended)" if v["label"] == rec else ""), v["label"] == rec))
    return items


def _draw_panel(ax, report: dict, xs: list[float | None], xlabel: str, providers: list[str], per_provider: bool,
                y_range: tuple[float, float]) -> list:  # fmt: skip
    """One ΔAP-vs-x panel: points, Pareto front, FP32 and budget lines; returns the label items to place."""
    budget = report["budget_ap"]
    items = _scatter_variants(ax, report, xs, providers, per_provider)
    pts = [(x, y) for x, y, _, _ in items]
    front = _pareto_front(pts)
    if len(front) > 1:
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", ls=":", c="tab:green",
                lw=1.2, zorder=2, label="Pareto front")  # fmt: skip
    if not pts:
        ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes, fontsize=12)
    missing = [v["label"] for v, x in zip(report["variants"], xs) if x is None]
    if missing and pts:
        ax.text(0.01, 0.01, "not plotted (unknown): " + ", ".join(missing), transform=ax.transAxes,
                fontsize=7.5, color="0.35", va="bottom")  # fmt: skip
    ax.axhline(0.0, c="0.4", lw=1, label=f"{report['baseline']['label']} (ΔAP 0)")
    ax.axhline(-budget, c="tab:red", ls="--", lw=1.2, label=f"budget −{budget:g} AP")
    ax.axhspan(y_range[0], -budget, color="tab:red", alpha=0.06)
    ax.set_ylim(*y_range)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("ΔAP vs FP32 (mAP50-95 points)")
    ax.grid(alpha=0.3)
    if pts:
        xs_ok = [p[0] for p in pts]
        span = (max(xs_ok) - min(xs_ok)) or max(abs(xs_ok[0]), 1.0)
        ax.set_xlim(min(xs_ok) - 0.08 * span, max(xs_ok) + 0.45 * span)  # room for labels on the right
    ax.legend(loc="upper right", fontsize=8, framealpha=0.85)
    return items


def plot_pareto(report: dict) -> bytes:
    """PNG bytes: ΔAP vs latency (left) and vs model size (right), labelled, with budget line and the pick."""
    # Only the plot needs matplotlib. A Figure on an Agg canvas avoids pyplot's global state and any display.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    variants = report["variants"]
    axis = report["latency_axis"]
    ds = report["dataset"]
    fig = Figure(figsize=(14, 6.2), dpi=110)
    canvas = FigureCanvasAgg(fig)
    ax_lat, ax_size = fig.subplots(1, 2)
    providers = sorted({v["provider"] or "" for v in variants})
    ys = [v["delta_ap"] for v in variants]
    y_range = (min(ys + [-report["budget_ap"]]) - 0.6, max(ys + [0.0]) + 0.6)
    cost = report["cost_axis"]
    if cost["source"] == "tensorrt":
        lat_xs = [variant_latency(v, axis) for v in variants]
        xlabel, title = "latency, ms — " + axis["description"], "ΔAP vs TensorRT latency (up and left is better)"
    else:
        lat_xs = [None if v.get("mac_share") is None else 100.0 * (1.0 - v["mac_share"]) for v in variants]
        xlabel, title = "MACs left in float, % (TensorRT absent)", "ΔAP vs MACs left in float (up and left is better)"
    lat_items = _draw_panel(ax_lat, report, lat_xs, xlabel, providers, False, y_range)
    ax_lat.set_title(title, fontsize=10)
    size_xs = [v["model_bytes"] / 1e6 if v["model_bytes"] else None for v in variants]
    size_items = _draw_panel(ax_size, report, size_xs, "ONNX model file size, MB", providers, False, y_range)
    ax_size.set_title("ΔAP vs model size", fontsize=10)
    fig.suptitle(
        f"{ds['name']}: {ds['num_images']} images — FP32 mAP50-95 {report['baseline']['map50_95']:.4f} — "
        f"cost: {cost['description']}\nrecommended: {report['recommended']['variant']}",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    renderer = canvas.get_renderer()
    for ax, items in ((ax_lat, lat_items), (ax_size, size_items)):
        _place_labels(ax, items, renderer)
    buf = io.BytesIO()
    canvas.print_png(buf)
    return buf.getvalue()


def _search_panel(ax, searches: list[dict], budget: float) -> None:
    """ΔAP against K for every ranking of one mode, the random controls and the budget line."""
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:purple"]
    for i, s in enumerate(searches):
        color = colors[i % len(colors)]
        ks, ys = [p["k"] for p in s["probes"]], [p["delta_ap"] for p in s["probes"]]
        ax.plot(ks, ys, "o-", c=color, label=f"{s['ranking']['method'] or 'ranking'} (probes)")
        ax.scatter([s["k"]], [s["delta_ap"]], s=260, marker="*", c="gold", edgecolors="darkred", zorder=4,
                   label=f"K={s['k']} {'found' if s['found'] else '(budget not met)'}")  # fmt: skip
        band = s.get("random_band") or []
        if len(band) > 1:
            ax.fill_between([b["k"] for b in band], [-b["max_delta"] for b in band], [-b["min_delta"] for b in band],
                            color="0.6", alpha=0.25, label="random controls, min-max")  # fmt: skip
        rc = s["random_control"]
        if rc:
            mean, lo, hi = -rc["mean_delta"], -rc["max_delta"], -rc["min_delta"]
            ax.errorbar([rc["k"]], [mean], yerr=[[mean - lo], [hi - mean]], fmt="x", c="0.4", capsize=6,
                        label=f"random, {len(rc['seeds'])} seeds (mean, min-max)", zorder=3)  # fmt: skip
            ax.scatter([rc["k"]] * len(rc["aps"]), [a - s["baseline_ap"] for a in rc["aps"]], s=14, c="0.6", zorder=3)
    ax.axhline(0.0, c="0.4", lw=1)
    ax.axhline(-budget, c="tab:red", ls="--", lw=1.2, label=f"budget −{budget:g} AP")
    ax.set_xlabel("K (most sensitive nodes left in float)")
    ax.set_ylabel("ΔAP vs FP32 (mAP50-95 points)")
    ax.set_title(f"{searches[0]['mode'].upper()}: ΔAP vs K", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, framealpha=0.85)


def plot_search_curves(report: dict) -> bytes:
    """PNG bytes: one ΔAP-vs-K panel per mode of the budget search (every ranking searched in that mode)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    by_mode: dict[str, list[dict]] = {}
    for s in report.get("search") or []:
        by_mode.setdefault(s["mode"], []).append(s)
    if not by_mode:
        raise ValueError("the report holds no budget search")
    fig = Figure(figsize=(6.5 * len(by_mode), 5.0), dpi=110)
    canvas = FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(by_mode), squeeze=False)[0]
    for ax, (mode, searches) in zip(axes, sorted(by_mode.items())):
        _search_panel(ax, searches, report["budget_ap"])
    fig.tight_layout()
    buf = io.BytesIO()
    canvas.print_png(buf)
    return buf.getvalue()
