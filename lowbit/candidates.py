"""Low-bit candidates with the top-K ranked nodes in float: built, evaluated and cached by K.

Two ways to build the candidate for a list of float nodes:

* ``full`` (default): :func:`lowbit.qdq_edit.remove_qdq_for_nodes` on the calibrated full Q/DQ model
  of the mode (the int8 step's model, or FP8 with no exclusions). Nothing is recalibrated: the scales
  are those of the full model, which ModelOpt computed on the float model, so they are the scales a
  re-quantization would compute again. Seconds per candidate.
* ``requantize``: ModelOpt quantizes the FP32 model again with ``nodes_to_exclude``
  (:func:`lowbit.quantize.quantize_onnx`); a full calibration per candidate. Where ModelOpt's
  placement rules move a Q/DQ pair because of an exclusion (e.g. in front of an Add whose consumers
  all became float), the two graphs differ; :func:`compare_builds` measures by how much.

Files, under ``run_root`` (names the report reads: ``-k{K}`` / ``-k{K}_random{SEED}``):

    onnx/<model>-<mode>-k{K}[_random{SEED}].onnx            the candidate (K = 0: the full model itself)
    onnx/<model>-<mode>-k{K}[_random{SEED}].inputs.json     what it was built from (``full_model``: the path of
                                                            the full model) and evaluated with
    <mode>-k{K}[_random{SEED}]-coco/metrics.json            its evaluation (``lowbit.evaluate``)

The record (``kind`` "candidate", ``schema_version`` 2; see docs/records.md) is keyed by content, never by a
path: ``build`` {``method``, ``full_model_sha256``, ``nodes``, and for ``requantize`` ``onnx_sha256``,
``calib_sha256``, ``quantize``},
``evaluation`` (:meth:`EvalConfig.content`: ``ann_sha256``, ``image_ids_sha256``, ``num_images``,
``max_images``, ``imgsz``, ``providers``, the postprocessing thresholds ...), ``model_sha256`` and
``metrics_sha256``. A candidate is reused without running anything when all of these match this run's and
its metrics.json itself says it scored that model on those images of that annotation file; anything else
is rebuilt and evaluated again, with a log line naming what differs (an annotation file edited in place
is thus noticed, the same ``--data-root`` notwithstanding; a record or metrics.json that names no ``kind``,
written before records named their kind, is foreign and its candidate evaluated again).
"""

from __future__ import annotations

import argparse
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lowbit import records
from lowbit.errors import UserError
from lowbit.logs import get_logger
from lowbit.runs import atomic_write_json, atomic_write_text, manifest_run, sha256_file
from lowbit.schemes import Scheme, find_schemes

log = get_logger("candidates")

RECORD_KIND = "candidate"  # the record beside a search candidate
RECORD_SCHEMA_VERSION = records.SCHEMA_VERSIONS[RECORD_KIND]
BUILDS = ("full", "requantize")


@dataclass
class EvalConfig:
    """Evaluation settings of every candidate (``lowbit.evaluate.EvalSettings`` fields)."""

    data_root: Path
    max_images: int
    providers: list[str] = field(default_factory=lambda: ["CPUExecutionProvider"])
    imgsz: int = 640
    warmup_runs: int = 10
    skip_latency: int = 10
    # Probes only need accuracy: cuDNN's heuristic pick skips the seconds of algorithm benchmarking per
    # candidate session (6.6 s -> 3.0 s first run for the INT8 demo model on an H200, same p50).
    cudnn_conv_algo_search: str = "HEURISTIC"

    def record(self) -> dict[str, Any]:
        out = asdict(self)
        out["data_root"] = str(self.data_root)
        return out

    def eval_settings(self, onnx_path: Path, out: Path | None = None):
        """The :class:`lowbit.evaluate.EvalSettings` of one candidate's evaluation."""
        from lowbit.evaluate import EvalSettings

        return EvalSettings(onnx_path=onnx_path, data_root=self.data_root, max_images=self.max_images,
                            providers=list(self.providers), warmup_runs=self.warmup_runs,
                            skip_latency=self.skip_latency, imgsz=self.imgsz,
                            cudnn_conv_algo_search=self.cudnn_conv_algo_search, out=out, overwrite=True)  # fmt: skip

    def postprocess(self) -> dict[str, Any]:
        """The evaluator's postprocessing of every candidate: its defaults (the search does not change them)."""
        defaults = self.eval_settings(Path("model.onnx"))
        return {"nms": defaults.nms, "conf": defaults.conf, "iou": defaults.iou, "max_det": defaults.max_det}

    def content(self, dataset: DatasetKey) -> dict[str, Any]:
        """What an evaluation's numbers depend on, by content: the images (annotation file sha256, image ids)
        and every setting but the folder the data lives in; the postprocessing is recorded so that a change of
        the evaluator's defaults is noticed."""
        out = {key: value for key, value in asdict(self).items() if key != "data_root"}
        out.update(
            ann_sha256=dataset.ann_sha256,
            image_ids_sha256=dataset.image_ids_sha256,
            num_images=len(dataset.image_ids),
            postprocess=self.postprocess(),
        )
        return out


@dataclass(frozen=True)
class DatasetKey:
    """The evaluation slice by content: sha256 of the annotation file and the image ids selected from it."""

    ann_file: Path
    ann_sha256: str
    image_ids: tuple[int, ...]

    @property
    def image_ids_sha256(self) -> str:
        return records.image_ids_sha256(self.image_ids)


def dataset_key(evaluation: EvalConfig, flag: str = "--data-root") -> DatasetKey:
    """Read ``evaluation``'s annotation file (the evaluator's paths and checks) and select its image ids.

    Raises:
        UserError(flag): no ``--data-root``, no image folder, or a missing or malformed annotation file.
    """
    from lowbit.coco_eval import load_coco, select_image_ids
    from lowbit.evaluate import resolve_data_paths

    _, ann_file, ann_flag = resolve_data_paths(evaluation.eval_settings(Path("model.onnx")))
    coco = load_coco(ann_file, ann_flag)
    return DatasetKey(ann_file, sha256_file(ann_file), tuple(select_image_ids(coco, evaluation.max_images)))


@dataclass
class RequantizeConfig:
    """What ``requantize`` builds need: the FP32 model, calibration tensor and quantizer settings."""

    onnx_path: Path
    calib_path: Path
    calibration_method: str | None = None
    calibration_eps: list[str] = field(default_factory=lambda: ["cpu"])
    high_precision_dtype: str = "auto"


@dataclass
class Evaluated:
    """One evaluated candidate: ``k`` float nodes (``nodes``), ``map50_95`` (0..1) and its files."""

    name: str
    k: int
    nodes: list[str]
    random_seed: int | None
    map50_95: float
    model_path: Path
    metrics_path: Path
    reused: bool
    model_sha256: str | None = None
    metrics_sha256: str | None = None

    @property
    def ap(self) -> float:
        """mAP50-95 in AP points (x 100), the unit of ``--budget-ap``."""
        return self.map50_95 * 100.0


def candidate_name(mode: str, k: int, random_seed: int | None = None) -> str:
    """``<mode>-k{K}`` or ``<mode>-k{K}_random{SEED}``."""
    return f"{mode}-k{k}" + ("" if random_seed is None else f"_random{random_seed}")


def read_map(metrics_path: Path, flag: str) -> float:
    """``metrics.map50_95`` of an evaluator ``metrics.json`` (0..1), a finite number, or one UserError naming ``flag``."""
    return map_of(records.read_record(metrics_path, "metrics", flag=flag), metrics_path, flag)


def map_of(metrics: dict[str, Any], path: Path, flag: str) -> float:
    """``metrics.map50_95`` of a metrics record read from ``path``: finite, else one UserError naming ``flag``."""
    value = (metrics.get("metrics") or {}).get("map50_95") if isinstance(metrics.get("metrics"), dict) else None
    return records.require_finite(f"{flag}: {path}", "metrics.map50_95", value, flag=flag)


def metrics_mismatch(metrics: dict[str, Any], model_sha256: str, dataset: DatasetKey) -> str | None:
    """What in a metrics record disagrees with "this model on these images", or None when nothing does."""
    scored = records.dataset_provenance(metrics)
    if (metrics.get("model") or {}).get("sha256") != model_sha256:
        return "its metrics.json scored another model file"
    if scored["ann_sha256"] != dataset.ann_sha256:
        return "the annotation file changed since it was scored"
    if scored["image_ids_sha256"] != dataset.image_ids_sha256:
        return "it was scored on other images"
    return None


def _read_record(path: Path, kind: str = RECORD_KIND) -> tuple[dict | None, str | None]:
    """``(record, None)``: the record of ``kind`` beside a candidate; ``(None, why not)`` when it is missing,
    unreadable, names no kind or another one, or is of another schema version (:func:`lowbit.records.read_record`)."""
    try:
        return records.read_record(path, kind), None
    except UserError as e:
        return None, str(e)


class CandidateStore:
    """Builds and evaluates the candidates of one mode, reusing those already evaluated with the same inputs.

    "The same inputs" is decided by content (the module docstring's record): the sha256 of the full model,
    the candidate model, its metrics, the annotation file and the image ids, and the evaluation settings;
    never by the paths they were read from.

    Args:
        run_root: the run directory (files as in the module docstring).
        mode: ``int8`` or ``fp8`` (names the files).
        model_stem: ``<model>`` in the file names (the FP32 model's stem).
        full_model: the calibrated Q/DQ model of the mode (every node quantized).
        evaluation: evaluation settings.
        build: ``full`` or ``requantize``.
        requantize: needed with ``build="requantize"``.
        suffix: appended to ``<mode>-k{K}`` in file names (e.g. ``-requant`` for a comparison).
        executor: a ``concurrent.futures`` process pool that runs the evaluations (None: in this
            process). With one, :meth:`evaluate` may be called from several threads at once: each
            candidate is built in the calling thread and evaluated in a worker process.
        dataset: the evaluation slice by content (None: read from ``evaluation`` on first use).
        full_sha256: sha256 of ``full_model`` when the caller has it (None: computed on first use).
    """

    def __init__(self, run_root: Path, mode: str, model_stem: str, full_model: Path, evaluation: EvalConfig,
                 build: str = "full", requantize: RequantizeConfig | None = None, suffix: str = "",
                 executor=None, dataset: DatasetKey | None = None, full_sha256: str | None = None):  # fmt: skip
        if build not in BUILDS:
            raise UserError(f"--build must be one of {', '.join(BUILDS)}, got {build!r}", flag="--build")
        if build == "requantize" and requantize is None:
            raise UserError("--build requantize needs the FP32 model and calibration tensor", flag="--calib-path")
        self.run_root, self.mode, self.stem = Path(run_root), mode, model_stem
        self.full_model, self.evaluation, self.build, self.requantize = Path(full_model), evaluation, build, requantize
        self.suffix = suffix
        self.executor = executor  # a process pool: evaluations run there, so that several run at once
        self._full_sha: str | None = full_sha256
        self._dataset: DatasetKey | None = dataset
        self._full_proto = None
        self._lock = threading.Lock()

    @property
    def full_sha(self) -> str:
        if self._full_sha is None:
            self._full_sha = sha256_file(self.full_model)
        return self._full_sha

    @property
    def dataset(self) -> DatasetKey:
        with self._lock:
            if self._dataset is None:
                self._dataset = dataset_key(self.evaluation)
        return self._dataset

    def paths(self, k: int, random_seed: int | None = None) -> tuple[str, Path, Path]:
        """``(name, model path, metrics path)`` of a candidate."""
        name = candidate_name(self.mode, k, random_seed) + self.suffix
        if k == 0 and self.build == "full":
            model = self.full_model  # nothing to remove: the full model is the K=0 candidate
        else:
            model = self.run_root / "onnx" / f"{self.stem}-{name}.onnx"
            if model.resolve() == Path(self.full_model).resolve():  # a rebuild never overwrites the search's input
                model = model.with_name(f"{self.stem}-{name}-{self.build}.onnx")
        return name, model, self.run_root / f"{name}-coco" / "metrics.json"

    def _build_record(self, nodes: list[str]) -> dict[str, Any]:
        record: dict[str, Any] = {"method": self.build, "full_model_sha256": self.full_sha, "nodes": list(nodes)}
        if self.build == "requantize":
            rq = self.requantize
            record.update(onnx_sha256=sha256_file(rq.onnx_path), calib_sha256=sha256_file(rq.calib_path),
                          quantize={"mode": self.mode, "calibration_method": rq.calibration_method,
                                    "calibration_eps": list(rq.calibration_eps),
                                    "high_precision_dtype": rq.high_precision_dtype})  # fmt: skip
        return record

    def stale_reason(self, record_path: Path, model: Path, metrics: Path, build: dict, evaluation: dict) -> str | None:
        """Why the candidate on disk cannot be reused (None: it can), each input compared by content."""
        if not record_path.exists():
            return "not evaluated before"
        record, why = _read_record(record_path)
        if record is None:
            return f"no usable record of its inputs ({why})"
        recorded_build = record.get("build") or {}
        if recorded_build != build:
            if recorded_build.get("full_model_sha256") != build["full_model_sha256"]:
                return "the full model changed"
            if recorded_build.get("nodes") != build["nodes"]:
                return "other nodes in float"
            return "other re-quantization inputs"
        recorded_eval = record.get("evaluation") or {}
        if recorded_eval != evaluation:
            if "ann_sha256" not in recorded_eval:
                return "its record names the data by path, not by content"
            if recorded_eval.get("ann_sha256") != evaluation["ann_sha256"]:
                return "the annotation file changed"
            if recorded_eval.get("image_ids_sha256") != evaluation["image_ids_sha256"]:
                return "other evaluation images"
            keys = sorted(key for key in evaluation if recorded_eval.get(key) != evaluation[key])
            return f"other evaluation settings ({', '.join(keys) or 'keys'})"
        if not model.is_file() or record.get("model_sha256") != sha256_file(model):
            return "its model file changed"
        if not metrics.is_file() or record.get("metrics_sha256") != sha256_file(metrics):
            return "its metrics file changed"
        try:
            scored = records.read_record(metrics, "metrics")
        except UserError as e:
            return str(e)
        return metrics_mismatch(scored, record["model_sha256"], self.dataset)

    def evaluate(self, nodes: list[str], random_seed: int | None = None) -> Evaluated:
        """Build (if needed) and evaluate the candidate with ``nodes`` in float; cached by its record."""
        k = len(nodes)
        name, model, metrics = self.paths(k, random_seed)
        record_path = model.with_suffix(".inputs.json")  # beside the model it describes, where the report looks
        if model == self.full_model:  # K=0 of a full build: the record must not pass for the full model's own
            record_path = self.run_root / "onnx" / f"{self.stem}-{name}.inputs.json"
        build, evaluation = self._build_record(nodes), self.evaluation.content(self.dataset)
        why = self.stale_reason(record_path, model, metrics, build, evaluation)
        if why is None:
            record, _ = _read_record(record_path)
            log.info("%s: evaluated before with these inputs (by sha256), reused (%s)", name, metrics)
            ap, shas = read_map(metrics, "candidate metrics"), (record["model_sha256"], record["metrics_sha256"])
            return Evaluated(name, k, list(nodes), random_seed, ap, model, metrics, True, *shas)
        log.info("%s: %s; building and evaluating it", name, why)
        record_path.unlink(missing_ok=True)  # a failed rebuild must not leave the old record looking current
        if model != self.full_model:
            self._write_model(nodes, model)
        log.info("%s: evaluating %s (%d nodes in float)", name, model, k)
        from lowbit.evaluate import evaluate

        settings = self.evaluation.eval_settings(model, metrics)
        if self.executor is None:
            evaluate(settings)
        else:
            self.executor.submit(evaluate_in_worker, settings).result()  # re-raises the worker's error here
        model_sha, metrics_sha = sha256_file(model), sha256_file(metrics)
        scored = records.read_record(metrics, "metrics", flag="candidate metrics")
        changed = metrics_mismatch(scored, model_sha, self.dataset)
        if changed:  # e.g. the annotation file was replaced while the search ran
            raise UserError(
                f"--data-root: the evaluation of {name} ({metrics}) does not match this search: {changed}; "
                "did the dataset change while the search ran? Run it again",
                flag="--data-root",
            )
        atomic_write_json(record_path, {**records.header(RECORD_KIND), "candidate": name, "build": build,
                                        "full_model": str(self.full_model),
                                        "ranking_nodes": list(nodes), "random_seed": random_seed,
                                        "evaluation": evaluation, "model_sha256": model_sha,
                                        "metrics_sha256": metrics_sha})  # fmt: skip
        ap = map_of(scored, metrics, "candidate metrics")
        return Evaluated(name, k, list(nodes), random_seed, ap, model, metrics, False, model_sha, metrics_sha)

    def _write_model(self, nodes: list[str], model: Path) -> None:
        model.parent.mkdir(parents=True, exist_ok=True)
        if self.build == "full":
            build_from_full_model(self._full(), nodes, model)
        else:
            build_requantized(self.requantize, self.mode, nodes, model)

    def _full(self):
        import onnx

        with self._lock:
            if self._full_proto is None:
                self._full_proto = onnx.load(str(self.full_model))
        return self._full_proto


def evaluate_in_worker(settings) -> None:
    """:func:`lowbit.evaluate.evaluate` in a worker process: its log goes to the run's eval.log, warnings to stderr."""
    from lowbit.evaluate import evaluate

    evaluate(settings)


def build_from_full_model(full_qdq, nodes: list[str], out_path: Path, flag: str = "--ranking") -> Path:
    """Write ``full_qdq`` (a loaded ``ModelProto``) with ``nodes`` in float to ``out_path`` (atomically)."""
    import onnx

    from lowbit.qdq_edit import remove_qdq_for_nodes

    edited = remove_qdq_for_nodes(full_qdq, nodes, flag=flag)
    tmp = out_path.with_name(out_path.name + ".tmp")
    onnx.save(edited, str(tmp))
    tmp.replace(out_path)
    return out_path


def build_requantized(cfg: RequantizeConfig, mode: str, nodes: list[str], out_path: Path) -> Path:
    """Quantize ``cfg.onnx_path`` again with ModelOpt, ``nodes`` in ``nodes_to_exclude``."""
    from lowbit.quantize import QuantizeSettings, quantize_onnx

    settings = QuantizeSettings(onnx_path=cfg.onnx_path, calib_path=cfg.calib_path, output_path=out_path,
                                quantize_mode=mode, calibration_method=cfg.calibration_method,
                                calibration_eps=list(cfg.calibration_eps),
                                high_precision_dtype=cfg.high_precision_dtype, nodes_to_exclude=list(nodes),
                                overwrite=True)  # fmt: skip
    return quantize_onnx(settings).output_path


# ----------------------------------------------------------------------------------------------------------------------
# ranking -> node names


@dataclass
class RankedNodes:
    """A ranking mapped onto a Q/DQ model: its quantized ``nodes`` in rank order (most sensitive first), and the
    ``unmatched`` report layers ({rank, name, reason}) that are no quantized node of it."""

    nodes: list[str]
    unmatched: list[dict[str, Any]]


def match_ranking(
    report: dict[str, Any],
    fp32_model,
    qdq_model,
    flag: str = "--ranking",
    report_path: Path | None = None,
    qdq_path: Path | None = None,
) -> RankedNodes:
    """Map the layers of a loaded report onto the quantized nodes of ``qdq_model``.

    Report layers map onto the FP32 graph as the scheme maker maps them (``lowbit.schemes.map_layers``);
    layers that map to no node, or to a node the Q/DQ model does not quantize, are ``unmatched``.

    Args:
        fp32_model, qdq_model: ``ModelProto`` or paths (loaded without external data).

    Raises:
        UserError(flag): no layer maps to a quantized node (a ranking of another model or mode).
    """
    from lowbit.qdq_graph import find_quantized_nodes, load_graph_proto
    from lowbit.schemes import map_layers
    from lowbit.sensitivity_onnx import NodeMatcher

    mapping = map_layers(report, NodeMatcher(load_graph_proto(fp32_model)))
    quantized = {n.name for n in find_quantized_nodes(load_graph_proto(qdq_model).graph)}
    nodes = [m["onnx_node"] for m in mapping.matched if m["onnx_node"] in quantized]
    unmatched = [{"rank": u["rank"], "name": u["name"], "reason": u.get("reason")} for u in mapping.unmatched]
    unmatched += [
        {"rank": m["rank"], "name": m["name"], "reason": f"{m['onnx_node']} is not quantized in the Q/DQ model"}
        for m in mapping.matched
        if m["onnx_node"] not in quantized
    ]
    if not nodes:
        raise UserError(
            f"{flag}: no layer of {report_path or 'the ranking'} maps to a quantized node of "
            f"{qdq_path or 'the Q/DQ model'} ({len(report['layers'])} layers, none matches); "
            "was the ranking made for another model or mode?",
            flag=flag,
        )
    return RankedNodes(nodes, sorted(unmatched, key=lambda u: u["rank"]))


def unmatched_warning(ranked: RankedNodes, report_path: Path, qdq_path: Path, flag: str = "--ranking") -> str | None:
    """The warning that lists the ranked layers left out (None when every layer matched)."""
    if not ranked.unmatched:
        return None
    listed = "; ".join(f"#{u['rank']} {u['name']}" for u in ranked.unmatched)
    total = len(ranked.nodes) + len(ranked.unmatched)
    return (
        f"{flag}: {len(ranked.unmatched)} of {total} ranked layers of {report_path} match no quantized node of "
        f"{qdq_path} and are left out of the search: {listed}"
    )


def ranked_nodes(report_path: Path, fp32_model_path, qdq_model_path, flag: str = "--ranking") -> list[str]:
    """The nodes of the Q/DQ model in the report's rank order (most sensitive first) (:func:`match_ranking`).

    Layers that match no quantized node are left out, with one warning listing them; none matching is an error.
    """
    from lowbit.sensitivity_report import load_report

    report = load_report(Path(report_path), flag)
    ranked = match_ranking(report, fp32_model_path, qdq_model_path, flag, report_path, qdq_model_path)
    warning = unmatched_warning(ranked, report_path, qdq_model_path, flag)
    if warning:
        log.warning("%s", warning)
    return ranked.nodes


def random_nodes(pool: list[str], k: int, seed: int) -> list[str]:
    """``k`` nodes of ``pool`` drawn with ``seed`` (pool sorted by name: the draw ignores the ranking)."""
    import numpy as np

    ordered = sorted(pool)
    picks = sorted(np.random.default_rng(seed).choice(len(ordered), size=k, replace=False).tolist())
    return [ordered[i] for i in picks]


# ----------------------------------------------------------------------------------------------------------------------
# full-model edit vs ModelOpt re-quantization


def compare_builds(full: CandidateStore, requant: CandidateStore, nodes_by_k: dict[int, list[str]]) -> list[dict]:
    """Evaluate both builds of each ``{K: float nodes}``; rows ``{k, ap_full_model, ap_requantize, diff_ap}``
    (AP points; ``diff_ap`` = full-model edit minus re-quantization)."""
    rows = []
    for k in sorted(nodes_by_k):
        a, b = full.evaluate(nodes_by_k[k]), requant.evaluate(nodes_by_k[k])
        rows.append({"k": k, "ap_full_model": a.ap, "ap_requantize": b.ap, "diff_ap": a.ap - b.ap,
                     "full_model_metrics": str(a.metrics_path), "requantize_metrics": str(b.metrics_path)})  # fmt: skip
    return rows


def compare_table(rows: list[dict], tolerance_ap: float = 0.05) -> str:
    """Markdown table of :func:`compare_builds` rows, with whether each K agrees within ``tolerance_ap``."""
    lines = ["| K | AP full-model edit | AP ModelOpt re-quantization | diff (AP) | within tolerance |",
             "|---:|---:|---:|---:|:---:|"]  # fmt: skip
    for r in rows:
        ok = "yes" if abs(r["diff_ap"]) <= tolerance_ap else "no"
        lines.append(f"| {r['k']} | {r['ap_full_model']:.2f} | {r['ap_requantize']:.2f} | {r['diff_ap']:+.2f} | {ok} |")
    return "\n".join(lines) + f"\n\ntolerance: {tolerance_ap:g} AP\n"


# ----------------------------------------------------------------------------------------------------------------------
# candidates from scheme files (materialize_yolov10m_lowbit_candidates.py): ModelOpt re-quantization per
# scheme, or, with ``args.from_full_model``, the full Q/DQ model with the scheme's nodes' Q/DQ pairs removed

SCHEME_RECORD_KIND = "scheme-candidate"  # the record beside a fixed-K candidate
SCHEME_RECORD_SCHEMA_VERSION = records.SCHEMA_VERSIONS[SCHEME_RECORD_KIND]


def _build_scheme_model(args, c) -> tuple[int, int]:
    """Write candidate ``c``'s model; returns ``(Q/DQ pairs, quantized nodes)`` of the result."""
    if getattr(args, "from_full_model", None):
        import onnx

        from lowbit.qdq_graph import qdq_summary

        log.info("%s: removing the Q/DQ pairs of %d nodes from %s", c.name, c.scheme.k, args.from_full_model)
        c.model_path.parent.mkdir(parents=True, exist_ok=True)
        build_from_full_model(onnx.load(str(args.from_full_model)), c.scheme.nodes_to_exclude, c.model_path,
                              flag="--schemes-dir")  # fmt: skip
        summary = qdq_summary(onnx.load(str(c.model_path)).graph)
        return int(summary.get("qdq_pairs", 0)), len(summary.get("quantized_nodes", []))
    from lowbit.quantize import quantize_onnx

    log.info("%s: quantizing with %d excluded nodes", c.name, c.scheme.k)
    result = quantize_onnx(quantize_settings(args, c), argv=None)
    return result.qdq_pairs, len(result.quantized_nodes)


@dataclass
class SchemeCandidate:
    """One scheme to materialize: where its files go, what it must be built from, and what to redo."""

    scheme: Scheme
    name: str  # <mode>-k{K}[_random{SEED}]
    model_path: Path
    metrics_path: Path
    build: dict  # the inputs and settings the model must come from
    evaluation: dict | None  # the evaluation settings its metrics must come from (None without --eval)
    record: dict | None  # the record of an earlier build, when it matches
    quantize: bool = True
    evaluate: bool = False

    @property
    def record_path(self) -> Path:
        return self.model_path.with_suffix(".inputs.json")


# ----------------------------------------------------------------------------------------------------------------------
# checks, all before anything is quantized


def check_materialize_settings(args: argparse.Namespace) -> None:
    """Numbers and modes; with ``--eval`` the evaluator's own checks of the evaluation settings."""
    from lowbit.quantize import refuse_int4

    if not args.ks or min(args.ks) < 0:
        raise UserError(f"--ks values must be >= 0, got {args.ks}", flag="--ks")
    refuse_int4(args.quant_mode, "--quant-mode")
    if args.eval:
        from lowbit.evaluate import resolve_data_paths, validate_settings
        from lowbit.ort_session import check_providers

        settings = eval_settings(args, args.onnx_path, args.run_root / "check" / "metrics.json")
        validate_settings(settings)
        resolve_data_paths(settings)
        check_providers(args.providers, disable_cpu_fallback=False, flag="--providers")


def eval_settings(args: argparse.Namespace, model_path: Path, out: Path):
    from lowbit.evaluate import EvalSettings

    return EvalSettings(
        onnx_path=model_path, data_root=args.data_root, max_images=args.max_images, providers=list(args.providers),
        warmup_runs=args.warmup_runs, skip_latency=args.skip_latency, imgsz=args.imgsz, out=out, overwrite=True,
    )  # fmt: skip


def quantize_settings(args: argparse.Namespace, candidate: SchemeCandidate):
    from lowbit.quantize import QuantizeSettings

    return QuantizeSettings(
        onnx_path=args.onnx_path, calib_path=args.calib_path, output_path=candidate.model_path,
        quantize_mode=args.quant_mode, calibration_method=args.calibration_method,
        calibration_eps=list(args.calibration_eps), high_precision_dtype=args.high_precision_dtype,
        exclude_json=candidate.scheme.path, overwrite=True,
    )  # fmt: skip


def check_schemes_fit(args: argparse.Namespace, candidates: list[SchemeCandidate]) -> None:
    """Every candidate the quantizer will run on passes its checks (the calibration tensor is read once)."""
    from lowbit.quantize import validate_settings

    todo = [c for c in candidates if c.quantize]
    if not todo or getattr(args, "from_full_model", None):  # remove_qdq_for_nodes names unknown nodes itself
        return
    node_names = {n.name for n in validate_settings(quantize_settings(args, todo[0])).model.graph.node}
    for c in todo[1:]:
        unknown = [n for n in c.scheme.nodes_to_exclude if n not in node_names]
        if unknown:
            raise UserError(
                f"--schemes-dir: {c.scheme.path} excludes {len(unknown)} node(s) that --onnx-path does not have "
                f"(first: {unknown[0]}); were the schemes made for another model?",
                flag="--schemes-dir",
            )


# ----------------------------------------------------------------------------------------------------------------------
# what to (re)build


def _differences(expected: dict, recorded: dict | None) -> list[str]:
    recorded = recorded or {}
    return [key for key in expected if expected[key] != recorded.get(key)]


def plan_candidates(args: argparse.Namespace, schemes: list[Scheme], digests: dict[str, str]) -> list[SchemeCandidate]:
    """One SchemeCandidate per scheme, each marked to quantize and/or evaluate.

    Without ``--overwrite`` a candidate whose record matches is kept, and one whose model, record or
    metrics disagree with this run's inputs or settings is an error naming ``--overwrite``: nothing is
    quantized then, and no summary claims inputs that the candidates were not built from.
    """
    stem = args.onnx_path.stem
    quant = {"quant_mode": args.quant_mode, "high_precision_dtype": args.high_precision_dtype,
             "calibration_method": args.calibration_method, "calibration_eps": list(args.calibration_eps)}  # fmt: skip
    evaluation = ({"data_root": str(args.data_root), "max_images": args.max_images, "providers": list(args.providers),
                   "imgsz": args.imgsz, "warmup_runs": args.warmup_runs, "skip_latency": args.skip_latency}
                  if args.eval else None)  # fmt: skip
    candidates, stale = [], []
    for scheme in schemes:
        name = f"{args.quant_mode}-{scheme.tag}"
        build = {"onnx_sha256": digests["onnx"], "calib_sha256": digests["calib"],
                 "scheme_sha256": sha256_file(scheme.path), "quantize": quant}  # fmt: skip
        if digests.get("full_model"):  # built by removing Q/DQ pairs from this model, not by ModelOpt
            build["from_full_model_sha256"] = digests["full_model"]
        c = SchemeCandidate(scheme, name, args.run_root / "onnx" / f"{stem}-{name}.onnx",
                      args.run_root / f"{name}-coco" / "metrics.json", build, evaluation, None)  # fmt: skip
        if args.overwrite:
            c.evaluate = evaluation is not None
            problems = []
        else:
            problems = _stale_parts(c)
        if problems:
            stale.append(f"{name} ({', '.join(problems)})")
        candidates.append(c)
    if stale:
        raise UserError(
            f"--run-root {args.run_root} holds candidates built from other inputs or settings than this run's: "
            f"{'; '.join(stale)}. Pass --overwrite (OVERWRITE=1) to rebuild them, or use another --run-root",
            flag="--overwrite",
        )
    return candidates


def _stale_parts(c: SchemeCandidate) -> list[str]:
    """Mark what ``c`` needs; returns what disagrees with an earlier build (empty: nothing is stale)."""
    exists = c.model_path.exists() or c.record_path.exists()
    if not exists:
        c.evaluate = c.evaluation is not None
        return []
    record, why = _read_record(c.record_path, SCHEME_RECORD_KIND) if c.record_path.exists() else (None, None)
    if record is None:
        return ["no record of its inputs" + (f" ({why})" if why else "")]
    if not c.model_path.is_file():
        return ["model file missing"]
    differences = _differences(c.build, record.get("build"))
    if record.get("model_sha256") != sha256_file(c.model_path):
        differences.append("model file changed")
    if differences:
        return [_INPUT_NAMES.get(d, d) for d in differences]
    c.record, c.quantize = record, False
    if c.evaluation is None:
        return []
    metrics_ok = c.metrics_path.is_file() and record.get("metrics_sha256") == sha256_file(c.metrics_path)
    if metrics_ok and record.get("evaluation") == c.evaluation:
        return []
    if c.metrics_path.exists() or record.get("evaluation") is not None:
        return ["evaluation settings or metrics differ"]
    c.evaluate = True
    return []


_INPUT_NAMES = {
    "onnx_sha256": "--onnx-path / ONNX_PATH differs",
    "calib_sha256": "--calib-path / CALIB_PATH differs",
    "scheme_sha256": "its scheme differs",
    "quantize": "quantization settings differ",
}


# ----------------------------------------------------------------------------------------------------------------------
# building, evaluating, summarizing


def materialize_one(args: argparse.Namespace, c: SchemeCandidate) -> dict:
    """Quantize and/or evaluate ``c`` as planned; returns its record (also written beside the model)."""
    from lowbit.evaluate import evaluate

    record = dict(c.record or {})
    if c.quantize:
        c.record_path.unlink(missing_ok=True)  # a failed rebuild must not leave the old record looking current
        pairs, quantized = _build_scheme_model(args, c)
        record = {**records.header(SCHEME_RECORD_KIND), "candidate": c.name, "build": c.build,
                  "model_sha256": sha256_file(c.model_path), "qdq_pairs": pairs,
                  "num_quantized_nodes": quantized, "evaluation": None, "metrics_sha256": None}  # fmt: skip
        atomic_write_json(c.record_path, record)
    else:
        log.info("%s: %s was built from these inputs, kept", c.name, c.model_path)
    if c.evaluate:
        log.info("%s: evaluating", c.name)
        evaluate(eval_settings(args, c.model_path, c.metrics_path))
        record.update(evaluation=c.evaluation, metrics_sha256=sha256_file(c.metrics_path))
        atomic_write_json(c.record_path, record)
    return record


def summary_row(args: argparse.Namespace, c: SchemeCandidate, record: dict) -> dict:
    row = {
        "candidate": c.name,
        "k": c.scheme.k,
        "random_control": c.scheme.random_seed is not None,
        "scheme": str(c.scheme.path),
        "model": str(c.model_path),
        "inputs_record": str(c.record_path),
        "excluded_nodes": c.scheme.nodes_to_exclude,
        "qdq_pairs": record["qdq_pairs"],
        "num_quantized_nodes": record["num_quantized_nodes"],
        "model_bytes": c.model_path.stat().st_size,
    }
    if args.eval:
        result = records.read_record(c.metrics_path, "metrics")
        row.update(metrics=str(c.metrics_path), map50_95=result["metrics"]["map50_95"],
                   map50=result["metrics"]["map50"], latency_ms_p50=result["latency_ms"]["p50"])  # fmt: skip
    return row


def summary_markdown(rows: list[dict]) -> str:
    lines = ["| candidate | excluded | Q/DQ pairs | mAP50-95 | mAP50 | p50 ms |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        ap, ap50 = (f"{r[key]:.4f}" if r.get(key) is not None else "-" for key in ("map50_95", "map50"))
        p50 = f"{r['latency_ms_p50']:.1f}" if r.get("latency_ms_p50") is not None else "-"  # None: too few timed runs
        lines.append(f"| {r['candidate']} | {len(r['excluded_nodes'])} | {r['qdq_pairs']} | {ap} | {ap50} | {p50} |")
    return "\n".join(lines) + "\n"




def materialize_candidates(args: argparse.Namespace, argv: list[str] | None, script: str) -> list[dict]:
    """Build (and with ``args.eval`` evaluate) every scheme's candidate; writes the summary; returns its rows.

    ``args``: the materializer's flags (``run_root``, ``calib_path``, ``schemes_dir``, ``onnx_path``, ``ks``,
    ``quant_mode``, ``from_full_model`` ...), already checked for existence.
    """
    from lowbit.logs import setup_logging

    check_materialize_settings(args)
    schemes = find_schemes(args.schemes_dir, sorted(set(args.ks)), args.include_random, "--schemes-dir")
    digests = {"onnx": sha256_file(args.onnx_path), "calib": sha256_file(args.calib_path)}
    if args.from_full_model:
        digests["full_model"] = sha256_file(args.from_full_model)
    candidates = plan_candidates(args, schemes, digests)
    check_schemes_fit(args, candidates)
    out_dir = args.run_root / f"candidates-{args.quant_mode}"
    setup_logging(out_dir / "materialize.log")
    rows = []
    with manifest_run(out_dir / "manifest.json", script, vars(args), argv, kind="materialize") as manifest:
        manifest.add_input(args.onnx_path, digests["onnx"])
        manifest.add_input(args.calib_path, digests["calib"])
        for name in ("summary.json", "summary.md"):  # an earlier summary must not outlive a failed rerun
            (out_dir / name).unlink(missing_ok=True)
        for c in candidates:
            manifest.add_input(c.scheme.path, c.build["scheme_sha256"])
            rows.append(summary_row(args, c, materialize_one(args, c)))
            manifest.update(candidates=rows)
        atomic_write_json(out_dir / "summary.json", {"quant_mode": args.quant_mode, "candidates": rows})
        atomic_write_text(out_dir / "summary.md", summary_markdown(rows))
        manifest.add_output("summary", out_dir / "summary.json")
    return rows


def compare_requantize(args: argparse.Namespace) -> list[dict]:
    """Both builds of every scheme K (``args.ks``), evaluated into ``args.compare_dir``; :func:`compare_builds` rows.

    Needs ``args.from_full_model`` (the calibrated full Q/DQ model) and the evaluation flags.
    """
    if not args.from_full_model:
        raise UserError("--compare-requantize needs --from-full-model (the calibrated full Q/DQ model)",
                        flag="--from-full-model")  # fmt: skip
    check_materialize_settings(args)
    schemes = [s for s in find_schemes(args.schemes_dir, sorted(set(args.ks)), False, "--schemes-dir")]
    evaluation = EvalConfig(args.data_root, args.max_images, list(args.providers), args.imgsz, args.warmup_runs,
                            args.skip_latency)  # fmt: skip
    requant = RequantizeConfig(args.onnx_path, args.calib_path, args.calibration_method, list(args.calibration_eps),
                               args.high_precision_dtype)  # fmt: skip
    stem = args.onnx_path.stem
    full = CandidateStore(args.compare_dir, args.quant_mode, stem, args.from_full_model, evaluation, "full")
    again = CandidateStore(args.compare_dir, args.quant_mode, stem, args.from_full_model, evaluation, "requantize",
                           requant, suffix="-requant")  # fmt: skip
    return compare_builds(full, again, {s.k: list(s.nodes_to_exclude) for s in schemes})
