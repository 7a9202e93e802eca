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
    onnx/<model>-<mode>-k{K}[_random{SEED}].inputs.json     what it was built from and evaluated with
    <mode>-k{K}[_random{SEED}]-coco/metrics.json            its evaluation (``lowbit.evaluate``)

A candidate whose record matches (same full model, same nodes, same evaluation settings, files with
the recorded sha256) is reused without running anything; anything else is rebuilt.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lowbit.logs import get_logger
from lowbit.runs import UserError, atomic_write_json, sha256_file

log = get_logger("candidates")

RECORD_SCHEMA_VERSION = 2
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

    def record(self) -> dict[str, Any]:
        out = asdict(self)
        out["data_root"] = str(self.data_root)
        return out


@dataclass
class RequantizeConfig:
    """What ``requantize`` builds need: the FP32 model, calibration tensor and quantizer settings."""

    onnx_path: Path
    calib_path: Path
    calibration_method: str | None = None
    calibration_eps: list[str] = field(default_factory=lambda: ["cpu"])
    high_precision_dtype: str = "fp32"


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

    @property
    def ap(self) -> float:
        """mAP50-95 in AP points (x 100), the unit of ``--budget-ap``."""
        return self.map50_95 * 100.0


def candidate_name(mode: str, k: int, random_seed: int | None = None) -> str:
    """``<mode>-k{K}`` or ``<mode>-k{K}_random{SEED}``."""
    return f"{mode}-k{k}" + ("" if random_seed is None else f"_random{random_seed}")


def read_map(metrics_path: Path, flag: str) -> float:
    """``metrics.map50_95`` of an evaluator ``metrics.json`` (0..1)."""
    try:
        return float(json.loads(Path(metrics_path).read_text(encoding="utf-8"))["metrics"]["map50_95"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{flag}: {metrics_path} is not an evaluator metrics.json with metrics.map50_95", flag=flag) from e


def _read_record(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("schema_version") == RECORD_SCHEMA_VERSION else None


class CandidateStore:
    """Builds and evaluates the candidates of one mode, reusing those already evaluated with the same inputs.

    Args:
        run_root: the run directory (files as in the module docstring).
        mode: ``int8`` or ``fp8`` (names the files).
        model_stem: ``<model>`` in the file names (the FP32 model's stem).
        full_model: the calibrated Q/DQ model of the mode (every node quantized).
        evaluation: evaluation settings.
        build: ``full`` or ``requantize``.
        requantize: needed with ``build="requantize"``.
        names: overrides ``<mode>-k{K}`` in file names (e.g. ``-requant`` copies for a comparison).
    """

    def __init__(self, run_root: Path, mode: str, model_stem: str, full_model: Path, evaluation: EvalConfig,
                 build: str = "full", requantize: RequantizeConfig | None = None, suffix: str = ""):  # fmt: skip
        if build not in BUILDS:
            raise UserError(f"--build must be one of {', '.join(BUILDS)}, got {build!r}", flag="--build")
        if build == "requantize" and requantize is None:
            raise UserError("--build requantize needs the FP32 model and calibration tensor", flag="--calib-path")
        self.run_root, self.mode, self.stem = Path(run_root), mode, model_stem
        self.full_model, self.evaluation, self.build, self.requantize = Path(full_model), evaluation, build, requantize
        self.suffix = suffix
        self._full_sha: str | None = None
        self._full_proto = None

    @property
    def full_sha(self) -> str:
        if self._full_sha is None:
            self._full_sha = sha256_file(self.full_model)
        return self._full_sha

    def paths(self, k: int, random_seed: int | None = None) -> tuple[str, Path, Path]:
        """``(name, model path, metrics path)`` of a candidate."""
        name = candidate_name(self.mode, k, random_seed) + self.suffix
        if k == 0 and self.build == "full":
            model = self.full_model  # nothing to remove: the full model is the K=0 candidate
        else:
            model = self.run_root / "onnx" / f"{self.stem}-{name}.onnx"
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

    def _reusable(self, record_path: Path, model: Path, metrics: Path, build: dict) -> bool:
        record = _read_record(record_path)
        if record is None or record.get("build") != build or record.get("evaluation") != self.evaluation.record():
            return False
        if not (model.is_file() and metrics.is_file()):
            return False
        return record.get("model_sha256") == sha256_file(model) and record.get("metrics_sha256") == sha256_file(metrics)

    def evaluate(self, nodes: list[str], random_seed: int | None = None) -> Evaluated:
        """Build (if needed) and evaluate the candidate with ``nodes`` in float; cached by its record."""
        k = len(nodes)
        name, model, metrics = self.paths(k, random_seed)
        record_path = self.run_root / "onnx" / f"{self.stem}-{name}.inputs.json"
        build = self._build_record(nodes)
        if self._reusable(record_path, model, metrics, build):
            log.info("%s: evaluated before with these inputs, reused (%s)", name, metrics)
            return Evaluated(name, k, list(nodes), random_seed, read_map(metrics, "candidate metrics"), model, metrics, True)
        record_path.unlink(missing_ok=True)  # a failed rebuild must not leave the old record looking current
        if model != self.full_model:
            self._write_model(nodes, model)
        log.info("%s: evaluating %s (%d nodes in float)", name, model, k)
        from lowbit.evaluate import EvalSettings, evaluate

        ev = self.evaluation
        evaluate(EvalSettings(onnx_path=model, data_root=ev.data_root, max_images=ev.max_images,
                              providers=list(ev.providers), warmup_runs=ev.warmup_runs, skip_latency=ev.skip_latency,
                              imgsz=ev.imgsz, out=metrics, overwrite=True))  # fmt: skip
        atomic_write_json(record_path, {"schema_version": RECORD_SCHEMA_VERSION, "candidate": name, "build": build,
                                        "ranking_nodes": list(nodes), "random_seed": random_seed,
                                        "evaluation": ev.record(), "model_sha256": sha256_file(model),
                                        "metrics_sha256": sha256_file(metrics)})  # fmt: skip
        return Evaluated(name, k, list(nodes), random_seed, read_map(metrics, "candidate metrics"), model, metrics, False)

    def _write_model(self, nodes: list[str], model: Path) -> None:
        model.parent.mkdir(parents=True, exist_ok=True)
        if self.build == "full":
            build_from_full_model(self._full(), nodes, model)
        else:
            build_requantized(self.requantize, self.mode, nodes, model)

    def _full(self):
        import onnx

        if self._full_proto is None:
            self._full_proto = onnx.load(str(self.full_model))
        return self._full_proto


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


def ranked_nodes(report_path: Path, fp32_model_path: Path, qdq_model_path: Path, flag: str = "--ranking") -> list[str]:
    """The nodes of the Q/DQ model in the report's rank order (most sensitive first).

    Report layers map onto the FP32 graph as the scheme maker maps them (``lowbit.schemes.map_layers``);
    layers that map to no node, or to a node the Q/DQ model does not quantize, are dropped.
    """
    import onnx

    from lowbit.qdq_graph import find_quantized_nodes
    from lowbit.schemes import map_layers
    from lowbit.sensitivity_onnx import NodeMatcher
    from lowbit.sensitivity_report import load_report

    report = load_report(Path(report_path), flag)
    fp32 = onnx.load(str(fp32_model_path), load_external_data=False)
    mapping = map_layers(report, NodeMatcher(fp32))
    quantized = {n.name for n in find_quantized_nodes(onnx.load(str(qdq_model_path), load_external_data=False).graph)}
    nodes = [m["onnx_node"] for m in mapping.matched if m["onnx_node"] in quantized]
    if not nodes:
        raise UserError(f"{flag}: no layer of {report_path} maps to a quantized node of {qdq_model_path}", flag=flag)
    return nodes


def random_nodes(pool: list[str], k: int, seed: int) -> list[str]:
    """``k`` nodes of ``pool`` drawn with ``seed`` (pool sorted by name: the draw ignores the ranking)."""
    import numpy as np

    ordered = sorted(pool)
    picks = sorted(np.random.default_rng(seed).choice(len(ordered), size=k, replace=False).tolist())
    return [ordered[i] for i in picks]


# ----------------------------------------------------------------------------------------------------------------------
# full-model edit vs ModelOpt re-quantization


def compare_builds(full: CandidateStore, requant: CandidateStore, ranking: list[str], ks: list[int]) -> list[dict]:
    """Evaluate both builds at each K of ``ks``; rows ``{k, map_full, map_requantize, diff_ap}`` (AP points)."""
    rows = []
    for k in sorted(set(ks)):
        if not 0 <= k <= len(ranking):
            raise UserError(f"--ks: K={k} is outside 0..{len(ranking)} (the ranked nodes)", flag="--ks")
        a, b = full.evaluate(ranking[:k]), requant.evaluate(ranking[:k])
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
