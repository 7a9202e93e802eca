"""Comparison report (lowbit/report*.py, lowbit/trt.py, make_lowbit_report.py) on fake but schema-faithful run dirs.

The metrics.json files follow eval_yolov10m_onnx_coco.py's schema (keys copied from a real run, lists
shortened); quantizer manifests follow quantize_yolov10m_onnx.py's; models are small byte blobs since
the report only hashes and sizes them.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import fields, replace
from pathlib import Path

import pytest

from lowbit import report_collect, trt
from lowbit.errors import UserError
from lowbit.report import ReportSettings
from lowbit.report_collect import collect_variants
from lowbit.report_costs import TRT_NOT_INSTALLED, add_mac_share
from lowbit.report_markdown import settings_text
from lowbit.report_recommend import latency_axis, recommend, sessions_text
from lowbit.report_variant import Variant
from lowbit.runs import REPO_ROOT

SCRIPT = "scripts/cv-models/make_lowbit_report.py"
IMAGE_IDS = [1, 2, 3, 5, 8]
# The annotation file every RunDir holds (annotations/instances_val2017.json): the report checks that the
# file the baseline names still has the sha256 it was scored on.
ANN_BYTES = b'{"images": [], "annotations": [], "categories": []}'
ANN_SHA = hashlib.sha256(ANN_BYTES).hexdigest()

# A TensorRT 10 trtexec performance summary, in the format printed by printEpilog() in
# NVIDIA/TensorRT samples/common/sampleReporting.cpp (release 10.x: "min = .. ms, max = .. ms, mean = .. ms,
# median = .. ms" followed by one "percentile(P%) = .. ms" per --percentile value, default 90,95,99),
# each line behind trtexec's "[date-time] [I] " log prefix; numbers are illustrative.
TRTEXEC_SAMPLE = """\
&&&& RUNNING TensorRT.trtexec [TensorRT v100300] # trtexec --onnx=model.onnx --stronglyTyped
[11/27/2026-10:31:05] [I] TensorRT version: 10.3.0
[11/27/2026-10:31:42] [I] === Performance summary ===
[11/27/2026-10:31:42] [I] Throughput: 812.345 qps
[11/27/2026-10:31:42] [I] Latency: min = 1.20508 ms, max = 1.40015 ms, mean = 1.2251 ms, median = 1.22168 ms, percentile(90%) = 1.23511 ms, percentile(95%) = 1.24219 ms, percentile(99%) = 1.29688 ms
[11/27/2026-10:31:42] [I] Enqueue Time: min = 0.00195312 ms, max = 0.0214844 ms, mean = 0.00287573 ms, median = 0.00268555 ms, percentile(90%) = 0.00317383 ms, percentile(95%) = 0.00341797 ms, percentile(99%) = 0.00488281 ms
[11/27/2026-10:31:42] [I] H2D Latency: min = 0 ms, max = 0 ms, mean = 0 ms, median = 0 ms, percentile(90%) = 0 ms, percentile(95%) = 0 ms, percentile(99%) = 0 ms
[11/27/2026-10:31:42] [I] GPU Compute Time: min = 1.20508 ms, max = 1.40015 ms, mean = 1.2251 ms, median = 1.22168 ms, percentile(90%) = 1.23511 ms, percentile(95%) = 1.24219 ms, percentile(99%) = 1.29688 ms
[11/27/2026-10:31:42] [I] D2H Latency: min = 0 ms, max = 0 ms, mean = 0 ms, median = 0 ms, percentile(90%) = 0 ms, percentile(95%) = 0 ms, percentile(99%) = 0 ms
[11/27/2026-10:31:42] [I] Total Host Walltime: 3.00241 s
[11/27/2026-10:31:42] [I] Total GPU Compute Time: 2.98808 s
[11/27/2026-10:31:42] [I] Explanations of the performance metrics are printed in the verbose logs.
&&&& PASSED TensorRT.trtexec [TensorRT v100300] # trtexec --onnx=model.onnx --stronglyTyped
"""
# Older trtexec (TensorRT 8.x) printed a single percentile(99%), as in the same file's 8.x version.
TRTEXEC_SAMPLE_OLD = """\
[07/22/2022-23:37:09] [I] === Performance summary ===
[07/22/2022-23:37:09] [I] Throughput: 1004.27 qps
[07/22/2022-23:37:09] [I] Latency: min = 1.17474 ms, max = 4.4541 ms, mean = 1.20348 ms, median = 1.1897 ms, percentile(99%) = 1.50061 ms
[07/22/2022-23:37:09] [I] GPU Compute Time: min = 0.965637 ms, max = 4.24448 ms, mean = 0.993252 ms, median = 0.97998 ms, percentile(99%) = 1.29016 ms
[07/22/2022-23:37:09] [I] Total GPU Compute Time: 2.99465 s
"""


# ----------------------------------------------------------------------------------------------------------------------
# fake run dirs


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def metrics_doc(
    model_path: str,
    model_sha: str,
    map50_95: float,
    map50: float,
    p50: float | None,
    *,
    quant_dtypes=(),
    qdq_pairs: int = 0,
    provider: str = "CPUExecutionProvider",
    image_ids=IMAGE_IDS,
    ann_sha: str = ANN_SHA,
    conf: float = 0.001,
) -> dict:
    """A metrics.json as eval_yolov10m_onnx_coco.py writes it (kind "metrics", schema_version 1)."""
    is_qdq = bool(quant_dtypes)
    return {
        "schema_version": 1,
        "kind": "metrics",
        "script": "eval_yolov10m_onnx_coco.py",
        "status": "ok",
        "created_at": "2026-11-27T00:46:13",
        "model": {
            "path": model_path,
            "sha256": model_sha,
            "input": {"name": "images", "shape": [1, 3, 640, 640], "dtype": "tensor(float)"},
            "output": {
                "name": "/model.23/Concat_3_output_0",
                "shape": [1, 144, 8400],
                "layout": "raw",
                "num_classes": 80,
            },
            "qdq": {
                "qdq_pairs": qdq_pairs,
                "quant_dtypes": list(quant_dtypes),
                "is_fp8": any(d.startswith("float8") for d in quant_dtypes),
                "is_qdq": is_qdq,
            },
        },
        "dataset": {
            "images_dir": "datasets/demo-shapes/val2017",
            "ann_file": "datasets/demo-shapes/annotations/instances_val2017.json",
            "ann_sha256": ann_sha,
            "num_images_in_set": 600,
            "max_images": len(image_ids),
            "num_images_selected": len(image_ids),
            "num_images_evaluated": len(image_ids),
            "image_ids": list(image_ids),
            "num_images_skipped": 0,
            "images_skipped": [],
            "num_categories": 80,
            "category_ids": [1, 2, 3],
            "notes": [],
        },
        "postprocess": {"mode": "topk", "conf": conf, "iou": None, "max_det": 300, "imgsz": 640},
        "metrics": {
            "map50_95": map50_95,
            "map50": map50,
            "map75": map50_95,
            "per_class_ap": {"red circle": map50_95},
            "num_detections": 1234,
        },
        "latency_ms": {
            "n": 0 if p50 is None else 97,
            "warmup_runs": 3,
            "skipped": 3,
            "mean": None if p50 is None else p50 * 1.02,
            "median": p50,
            "p50": p50,
            "p90": None if p50 is None else p50 * 1.25,
            "p95": None,
            "p99": None,
            "min": None,
            "max": None,
            "std": None,
        },
        "throughput": {"images": len(image_ids), "loop_wall_s": 1.0, "images_per_s": 5.0, "workers": 4},
        "providers": {
            "providers_requested": [provider],
            "providers_used": [provider],
            "provider_options": {provider: {}},
            "session_config": {},
            "graph_optimization_level": "ORT_ENABLE_ALL",
            "intra_op_threads": 0,
            "disable_cpu_fallback": False,
        },
        "timing_s": {"session_create": 0.1, "warmup": 0.3, "loop": 1.0, "coco_eval": 0.5, "total": 2.0},
        "args": {"onnx_path": model_path},
        "versions": {"python": "3.11.7"},
    }


def quant_manifest(
    source_path: str,
    source_sha: str,
    output_path: str,
    output_sha: str,
    mode: str,
    method: str,
    excluded: list[str],
    exclude_json: str | None = None,
    quantized_nodes: int = 40,
    qdq_pairs: int = 60,
    hp: str = "fp32",
) -> dict:
    """``<stem>.manifest.json`` as quantize_yolov10m_onnx.py writes it (the keys the report reads)."""
    settings = {
        "quantize_mode": mode,
        "calibration_method": method,
        "calibration_eps_requested": ["cpu"],
        "high_precision_dtype": hp,
        "use_zero_point": False,
        "use_zero_point_effective": False,
        "passes": ["concat_elimination"],
        "calibrate_per_node": False,
        "calibration_images": 16,
        "nodes_to_exclude": excluded,
    }
    return {
        "kind": "quantize",
        "script": "quantize_yolov10m_onnx.py",
        "argv": ["scripts/cv-models/quantize_yolov10m_onnx.py"],
        "args": {
            "onnx_path": source_path,
            "calib_path": "calib.npy",
            "output_path": output_path,
            "quantize_mode": mode,
            "exclude_json": exclude_json,
            "nodes_to_exclude": [],
        },
        "inputs": {source_path: source_sha, "calib.npy": "0" * 64},
        "outputs": {"model": output_path},
        "status": "ok",
        "error": None,
        "extra": {
            "settings": settings,
            "calibration_eps_used": ["CPUExecutionProvider"],
            "quantize_s": 1.0,
            "output_sha256": output_sha,
            "qdq_pairs": qdq_pairs,
            "quantized_nodes": ["/model.0/conv/Conv"] * quantized_nodes,
            "num_quantized_nodes": quantized_nodes,
            "excluded_nodes": excluded,
        },
    }


class RunDir:
    """Builds a workflow-layout run dir: onnx/<model>.onnx (+ manifest), <step>-coco/metrics.json, schemes/."""

    def __init__(self, root: Path, fp32_bytes: bytes = b"fp32-model" * 100):
        self.root = root
        (root / "onnx").mkdir(parents=True, exist_ok=True)
        self.fp32_path = root / "fp32.onnx"
        self.fp32_path.write_bytes(fp32_bytes)
        self.fp32_sha = _sha(fp32_bytes)
        self.ann_file = root / "annotations" / "instances_val2017.json"
        self.ann_file.parent.mkdir(exist_ok=True)
        self.ann_file.write_bytes(ANN_BYTES)

    def baseline(self, map50_95=0.5, map50=0.7, p50=90.0, step="baseline-coco", **kw) -> Path:
        return self._write_metrics(step, metrics_doc(str(self.fp32_path), self.fp32_sha, map50_95, map50, p50, **kw))

    def variant(
        self,
        step: str,
        stem: str,
        map50_95: float,
        map50: float,
        p50: float | None,
        *,
        mode="int8",
        method="entropy",
        excluded=(),
        k=None,
        seed=None,
        manifest=True,
        size=900,
        **kw,
    ) -> Path:
        data = (stem.encode() * (size // len(stem) + 1))[:size]
        model = self.root / "onnx" / f"{stem}.onnx"
        model.write_bytes(data)
        exclude_json = None
        if k is not None:
            schemes = self.root / "schemes"
            schemes.mkdir(exist_ok=True)
            name = f"scheme_k{k}" + (f"_random{seed}" if seed is not None else "") + ".json"
            scheme = {"k": k, "nodes_to_exclude": list(excluded), "layers": list(excluded), "report": "r.json"}
            if seed is not None:
                scheme["random_seed"] = seed
            (schemes / name).write_text(json.dumps(scheme))
            (schemes / "schemes_summary.json").write_text(json.dumps({"report_source": "onnx"}))
            exclude_json = str(schemes / name)
        if manifest:
            doc = quant_manifest(
                str(self.fp32_path), self.fp32_sha, str(model), _sha(data), mode, method, list(excluded), exclude_json
            )
            model.with_suffix(".manifest.json").write_text(json.dumps(doc))
        dtypes = ["float8e4m3fn"] if mode == "fp8" else ["int8"]
        return self._write_metrics(
            step, metrics_doc(str(model), _sha(data), map50_95, map50, p50, quant_dtypes=dtypes, qdq_pairs=60, **kw)
        )

    def _write_metrics(self, step: str, doc: dict) -> Path:
        doc["dataset"]["ann_file"] = str(self.ann_file)  # as the evaluator records it: the file it read
        path = self.root / step / "metrics.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc))
        return path


@pytest.fixture()
def no_tensorrt(monkeypatch):
    """Make the machine look TensorRT-free whatever is installed."""
    monkeypatch.setattr(trt, "find_trtexec", lambda explicit=None: None)
    monkeypatch.setattr(trt, "tensorrt_python_version", lambda: None)


@pytest.fixture()
def workflow_run(tmp_path) -> RunDir:
    """Baseline, INT8 entropy, INT8 max, FP8 K=0/5 and a K=5 random control, in the card's layout."""
    run = RunDir(tmp_path / "run")
    run.baseline(map50_95=0.5428, map50=0.6641, p50=89.8)
    run.variant("int8-coco", "yolov10m-int8-qdq", 0.5289, 0.6531, 191.3)
    run.variant("int8-max-fp32-coco", "yolov10m-int8-max-fp32", 0.5350, 0.6600, 185.0, method="max")
    run.variant("fp8-k0-coco", "yolov10m-fp8-k0", 0.5300, 0.6550, 300.0, mode="fp8", method="max", k=0)
    run.variant(
        "fp8-k5-coco",
        "yolov10m-fp8-k5",
        0.5390,
        0.6620,
        310.0,
        mode="fp8",
        method="max",
        k=5,
        excluded=[f"/model.{i}/conv/Conv" for i in range(5)],
    )
    run.variant(
        "fp8-k5_random7-coco",
        "yolov10m-fp8-k5_random7",
        0.5310,
        0.6560,
        120.0,
        mode="fp8",
        method="max",
        k=5,
        seed=7,
        excluded=[f"/model.{i}/cv1/conv/Conv" for i in range(5)],
    )
    return run


# report.json's top-level keys, a variant row's keys and the recommendation's, in their written order; kept as
# compact tables (fmt: skip), since one key per line would spread each order over a screen.
REPORT_KEYS = [
    "schema_version", "kind", "created_at", "run_dirs", "dataset", "budget_ap", "latency_tie_pct", "baseline",
    "variants", "recommended", "latency_axis", "cost_axis", "tensorrt", "intervals", "confirmation", "search",
    "dropped", "provenance", "notes",
]  # fmt: skip
VARIANT_KEYS = [
    "label", "role", "quant_mode", "map50_95", "map50", "delta_ap", "delta_ap50", "delta_ap_ci", "confirmation",
    "latency_ms", "provider", "providers_used", "tensorrt", "model_path", "model_file", "model_sha256",
    "source_model_sha256", "model_bytes", "weight_bytes", "qdq_pairs", "quant_dtypes", "excluded_nodes", "excluded_node_names", "num_quantized_nodes", "quant_settings",
    "candidate", "metrics_path", "model_manifest", "derived_from_full_model", "run_dir", "notes", "mac_share",
    "low_precision_macs", "total_macs",
]  # fmt: skip
RECOMMENDED_KEYS = [
    "cost_source", "mac_share", "variant", "metrics_path", "reason", "latency_source", "latency_provider",
    "latency_ms", "within_budget", "not_eligible",
]  # fmt: skip


def _by_label(variants) -> dict[str, dict]:
    """Rows by label, as report.json writes them (a collected :class:`Variant` through its ``to_dict``)."""
    rows = [v.to_dict() if isinstance(v, Variant) else v for v in variants]
    return {v["label"]: v for v in rows}


# ----------------------------------------------------------------------------------------------------------------------
# rows


def test_rows_labels_and_delta_ap(workflow_run):
    collected = collect_variants([workflow_run.root])
    rows = _by_label(collected.variants)
    assert list(rows) == [
        "FP32",
        "FP8 K=0",
        "FP8 K=5 (onnx ranking)",
        "FP8 K=5 random control (seed 7)",
        "INT8 entropy/fp32",
        "INT8 max/fp32",
    ]
    base = rows["FP32"]
    assert base["role"] == "baseline" and base["delta_ap"] == 0.0 and base["excluded_nodes"] == 0
    assert base["model_bytes"] == workflow_run.fp32_path.stat().st_size
    k5 = rows["FP8 K=5 (onnx ranking)"]
    assert k5["delta_ap"] == pytest.approx((0.5390 - 0.5428) * 100)
    assert k5["delta_ap"] == (k5["map50_95"] - base["map50_95"]) * 100.0  # the exact formula, no rounding
    assert k5["delta_ap50"] == (0.6620 - 0.6641) * 100.0
    assert k5["excluded_nodes"] == 5 and k5["excluded_node_names"][0] == "/model.0/conv/Conv"
    assert k5["num_quantized_nodes"] == 40 and k5["qdq_pairs"] == 60
    assert k5["candidate"]["k"] == 5 and k5["candidate"]["ranking_source"] == "onnx"
    assert k5["quant_settings"]["calibration_method"] == "max"
    assert k5["model_bytes"] == 900 and k5["provider"] == "CPUExecutionProvider"
    assert rows["FP8 K=5 random control (seed 7)"]["role"] == "random_control"
    assert rows["INT8 entropy/fp32"]["latency_ms"]["p50"] == 191.3
    assert collected.dataset["num_images"] == len(IMAGE_IDS)
    assert collected.dataset["name"] == "demo-shapes/val2017"


def test_variant_without_manifest_is_labelled_from_metrics(tmp_path):
    run = RunDir(tmp_path / "run")
    run.baseline()
    run.variant("x-coco", "custom-model", 0.49, 0.69, 50.0, manifest=False)
    rows = _by_label(collect_variants([run.root]).variants)
    row = rows["INT8 (custom-model)"]
    assert row["excluded_nodes"] is None and row["num_quantized_nodes"] is None and row["quant_settings"] is None
    assert row["qdq_pairs"] == 60  # the evaluator's count is still there


def test_search_candidate_is_described_by_its_record_and_the_full_models_manifest(tmp_path, monkeypatch):
    run = RunDir(tmp_path / "run")
    run.baseline()
    run.variant("int8-coco", "m-int8-qdq", 0.52, 0.66, 50.0)  # the full Q/DQ model, with its quantizer manifest
    full_sha = _sha((run.root / "onnx" / "m-int8-qdq.onnx").read_bytes())
    run.variant("int8-k2-coco", "m-int8-k2", 0.53, 0.67, 50.0, manifest=False)
    model = run.root / "onnx" / "m-int8-k2.onnx"
    floated = ["/model.2/cv1/conv/Conv", "/model.0/conv/Conv"]
    record = {
        "schema_version": 2,
        "kind": "candidate",
        "candidate": "int8-k2",
        "model_sha256": _sha(model.read_bytes()),
        "full_model": str(run.root / "onnx" / "m-int8-qdq.onnx"),
        "build": {"method": "full", "full_model_sha256": full_sha, "nodes": floated},
    }
    record_path = run.root / "onnx" / "m-int8-k2.inputs.json"
    record_path.write_text(json.dumps(record))
    # no search.json cites it: a candidate left by an earlier search is dropped, never recommended
    collected = collect_variants([run.root])
    assert "INT8 K=2" not in _by_label(collected.variants)
    assert any("int8-k2-coco" in d["path"] and "no search.json" in d["reason"] for d in collected.dropped)
    # as if a search cited it
    monkeypatch.setattr(report_collect, "_without_uncited_candidates", lambda variants, dropped, cited: variants)
    row = _by_label(collect_variants([run.root]).variants)["INT8 K=2"]
    assert row["excluded_node_names"] == floated and row["excluded_nodes"] == 2
    assert row["num_quantized_nodes"] == 40 - 2 and row["derived_from_full_model"]
    assert row["quant_settings"]["calibration_method"] == "entropy" and row["source_model_sha256"] == run.fp32_sha
    assert "2 nodes' Q/DQ removed" in settings_text(row)
    # a record of another file is not trusted, and says so
    record_path.write_text(json.dumps({**record, "model_sha256": "0" * 64}))
    row = _by_label(collect_variants([run.root]).variants)["INT8 K=2"]
    assert row["excluded_nodes"] is None and row["quant_settings"] is None
    assert any("describes another file" in note for note in row["notes"])


# ----------------------------------------------------------------------------------------------------------------------
# recommendation


def _row(label, map50_95, p50, role="quantized", provider="CPUExecutionProvider", trt_ms=None, share=None) -> Variant:
    return Variant(
        label=label,
        role=role,
        quant_mode="fp32" if role == "baseline" else "int8",
        map50_95=map50_95,
        map50=map50_95,
        metrics_path=f"{label}/metrics.json",
        delta_ap=(map50_95 - 0.50) * 100.0,
        latency_ms={"p50": p50, "p90": p50},
        provider=provider,
        mac_share=share if share is not None else (0.0 if role == "baseline" else None),
        tensorrt={"status": "measured", "gpu_compute_ms": {"median": trt_ms, "p90": trt_ms}}
        if trt_ms
        else {"status": TRT_NOT_INSTALLED},
    )


def test_recommend_without_tensorrt_ranks_by_mac_share_never_ort_latency():
    rows = [
        _row("FP32", 0.50, 100.0, role="baseline"),
        _row("A", 0.497, 60.0, share=0.95),  # -0.3 AP, most MACs in low precision
        _row("B", 0.499, 20.0, share=0.80),  # -0.1 AP, fastest on the CPU EP: irrelevant
        _row("C", 0.480, 10.0, share=1.00),  # -2.0 AP: out of budget
    ]
    rec = recommend(rows, budget_ap=1.0)
    assert rec.variant == "A" and rec.cost_source == "mac_share" and rec.mac_share == 0.95
    assert rec.within_budget == ("A", "B") and rec.latency_source is None
    # the CPU timings can be anything: the pick does not move
    noisy = [replace(r, latency_ms={"p50": 1000.0 - i, "p90": 1000.0}) for i, r in enumerate(rows)]
    assert recommend(noisy, budget_ap=1.0).variant == "A"
    assert recommend(rows, budget_ap=2.5).variant == "C"  # a bigger budget lets C in


def test_recommend_equal_mac_share_goes_to_the_more_accurate():
    rows = [
        _row("FP32", 0.50, 100.0, role="baseline"),
        _row("A", 0.495, 10.0, share=0.9),
        _row("B", 0.499, 90.0, share=0.9),
        _row("C", 0.4999, 5.0, share=0.5),
    ]
    assert recommend(rows, budget_ap=1.0).variant == "B"


def test_recommend_budget_edge_is_inclusive():
    rows = [_row("FP32", 0.50, 100.0, role="baseline"), _row("A", 0.49, 50.0, share=0.9)]  # exactly -1.0 AP
    assert recommend(rows, budget_ap=1.0).variant == "A"


def test_recommend_none_within_budget_keeps_fp32():
    rows = [_row("FP32", 0.50, 100.0, role="baseline"), _row("A", 0.48, 50.0), _row("B", 0.47, 40.0)]
    rec = recommend(rows, budget_ap=1.0)
    assert rec.variant == "FP32"
    assert "no quantized variant stays within the 1 AP budget" in rec.reason
    assert "A" in rec.reason and "2.00 AP" in rec.reason


def test_recommend_tensorrt_latencies_within_noise_tie_and_go_to_the_more_accurate():
    rows = [
        _row("FP32", 0.50, 100.0, role="baseline", trt_ms=2.0),
        _row("A", 0.495, 50.0, trt_ms=1.00, share=1.0),
        _row("B", 0.499, 50.0, trt_ms=1.02, share=0.9),  # within 3 % of A and more accurate: wins
        _row("C", 0.4999, 50.0, trt_ms=1.30, share=0.8),  # most accurate but 30 % slower: no tie
    ]
    rec = recommend(rows, budget_ap=1.0)
    assert rec.variant == "B" and rec.cost_source == "tensorrt" and rec.latency_ms == 1.02
    assert recommend(rows, budget_ap=1.0, latency_tie_pct=0.0).variant == "A"
    rows2 = [
        _row("FP32", 0.50, 100.0, role="baseline", trt_ms=2.0),
        _row("Y", 0.498, 5.0, trt_ms=1.0),
        _row("X", 0.498, 9.0, trt_ms=1.0),
    ]
    assert recommend(rows2, latency_tie_pct=0.0).variant == "X"  # exact tie: accuracy, then name


def test_recommend_never_picks_a_random_control():
    rows = [
        _row("FP32", 0.50, 100.0, role="baseline"),
        _row("K5", 0.498, 80.0, share=0.9),
        _row("K5 random", 0.499, 10.0, role="random_control", share=0.99),
    ]
    assert recommend(rows).variant == "K5"


def test_recommend_tensorrt_keeps_fp32_when_not_faster():
    rows = [
        _row("FP32", 0.50, 100.0, role="baseline", trt_ms=2.0),
        _row("A", 0.498, 500.0, trt_ms=1.2),  # slow on CPU, fast on TensorRT
        _row("B", 0.499, 50.0, trt_ms=1.8),
    ]
    rec = recommend(rows)
    assert rec.variant == "A" and rec.latency_source == "tensorrt" and rec.latency_ms == 1.2
    slower = [_row("FP32", 0.50, 100.0, role="baseline", trt_ms=1.0), _row("A", 0.498, 50.0, trt_ms=1.2)]
    rec = recommend(slower)
    assert rec.variant == "FP32" and rec.cost_source == "tensorrt"


def test_recommend_without_quantized_variants():
    rec = recommend([_row("FP32", 0.50, 10.0, role="baseline")])
    assert rec.variant == "FP32" and "no quantized variant was evaluated" in rec.reason


# ----------------------------------------------------------------------------------------------------------------------
# the command


def test_report_command_numbers_equal_metrics_files(load_script, workflow_run, no_tensorrt, capsys):
    main = load_script(SCRIPT).main
    assert main(["--run-dir", str(workflow_run.root), "--budget-ap", "1.0"]) == 0
    out = capsys.readouterr().out
    assert "recommended (*)" in out and "FP8 K=5 (onnx ranking)" in out

    root = workflow_run.root
    report = json.loads((root / "report.json").read_text())
    assert report["schema_version"] == 1 and report["kind"] == "report" and report["budget_ap"] == 1.0
    assert len(report["variants"]) == 6
    # report.json's keys, in the order readers and diffs of earlier reports see them
    assert list(report) == REPORT_KEYS and all(list(v) == VARIANT_KEYS for v in report["variants"])
    assert list(report["recommended"]) == RECOMMENDED_KEYS
    base = json.loads((root / "baseline-coco" / "metrics.json").read_text())
    for v in report["variants"]:
        metrics_file = Path(v["metrics_path"])
        metrics = json.loads((metrics_file if metrics_file.is_absolute() else REPO_ROOT / metrics_file).read_text())
        assert v["map50_95"] == metrics["metrics"]["map50_95"]
        assert v["map50"] == metrics["metrics"]["map50"]
        assert v["delta_ap"] == (metrics["metrics"]["map50_95"] - base["metrics"]["map50_95"]) * 100.0
        assert v["latency_ms"]["p50"] == metrics["latency_ms"]["p50"]
        assert v["latency_ms"]["p90"] == metrics["latency_ms"]["p90"]
        assert v["provider"] == metrics["providers"]["providers_used"][0]
        assert v["qdq_pairs"] == metrics["model"]["qdq"]["qdq_pairs"]
        assert v["model_sha256"] == metrics["model"]["sha256"]
        assert v["tensorrt"]["status"] == "not measured: TensorRT not installed"
        if v["model_manifest"]:
            manifest = json.loads(
                (REPO_ROOT / v["model_manifest"]).read_text()
                if not Path(v["model_manifest"]).is_absolute()
                else Path(v["model_manifest"]).read_text()
            )
            assert v["num_quantized_nodes"] == manifest["extra"]["num_quantized_nodes"]
            assert v["excluded_nodes"] == len(manifest["extra"]["excluded_nodes"])

    # within 1 AP: INT8 max (-0.78), FP8 K=5 (-0.38); these stand-in files are no ONNX graphs, so their MAC
    # share is unknown and accuracy decides (never the ORT latency; FP8 K=5 random is never recommended)
    assert report["recommended"]["variant"] == "FP8 K=5 (onnx ranking)"
    assert report["recommended"]["cost_source"] == "mac_share" and report["cost_axis"]["source"] == "mac_share"
    assert report["recommended"]["within_budget"] == ["FP8 K=5 (onnx ranking)", "INT8 max/fp32"]
    assert report["tensorrt"]["status"] == "not measured: TensorRT not installed"

    md = (root / "report.md").read_text()
    assert "**FP8 K=5 (onnx ranking)** (recommended)" in md
    assert "not measured: TensorRT not installed" in md
    assert md.count("\n| ") >= 2 * 6  # a row per variant in both tables
    for v in report["variants"]:
        assert f"| {v['map50_95']:.4f} | {v['map50']:.4f} | {v['delta_ap']:+.2f} | - | unknown |" in md
    png = (root / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    manifest = json.loads((root / "report.manifest.json").read_text())
    assert manifest["status"] == "ok" and manifest["extra"]["recommended"] == "FP8 K=5 (onnx ranking)"
    assert manifest["kind"] == "report"
    # the inputs are the records used, by content: 6 metrics files and the 5 quantizer manifests
    assert manifest["inputs"] == report["provenance"]["records"] and len(manifest["inputs"]) == 11
    assert report["provenance"]["model_sha256"] == workflow_run.fp32_sha and report["dropped"] == []

    # completed results are not replaced without --overwrite
    assert main(["--run-dir", str(root)]) == 2
    assert main(["--run-dir", str(root), "--overwrite", "--budget-ap", "0.5"]) == 0
    assert json.loads((root / "report.json").read_text())["recommended"]["variant"] == "FP8 K=5 (onnx ranking)"


def test_report_refuses_mismatched_image_sets(load_script, tmp_path, no_tensorrt, capsys):
    run_a, run_b = RunDir(tmp_path / "a"), RunDir(tmp_path / "b")
    run_a.baseline()
    run_b.variant("int8-coco", "int8", 0.49, 0.69, 50.0, image_ids=[1, 2, 3, 5, 9])
    # the quantizer manifest of run b names run a's FP32 model: only the image set differs
    manifest_path = run_b.root / "onnx" / "int8.manifest.json"
    doc = json.loads(manifest_path.read_text())
    doc["inputs"] = {str(run_a.fp32_path): run_a.fp32_sha}
    doc["args"]["onnx_path"] = str(run_a.fp32_path)
    manifest_path.write_text(json.dumps(doc))
    main = load_script(SCRIPT).main
    out_dir = tmp_path / "out"
    assert main(["--run-dir", str(run_a.root), str(run_b.root), "--out-dir", str(out_dir)]) == 2
    assert not out_dir.exists()
    with pytest.raises(UserError) as exc:
        collect_variants([run_a.root, run_b.root])
    assert exc.value.flag == "--run-dir"
    # same ids but another annotation file: refused too
    run_b.variant("int8-coco", "int8", 0.49, 0.69, 50.0, ann_sha="0" * 64)
    with pytest.raises(UserError) as exc:
        collect_variants([run_a.root, run_b.root])
    assert exc.value.flag == "--run-dir"


def test_report_refuses_mixed_postprocessing_and_models(tmp_path):
    run = RunDir(tmp_path / "run")
    run.baseline()
    run.variant("int8-coco", "int8", 0.49, 0.69, 50.0, conf=0.25)
    with pytest.raises(UserError) as exc:
        collect_variants([run.root])
    assert exc.value.flag == "--run-dir"

    other = RunDir(tmp_path / "other", fp32_bytes=b"another model")
    other.baseline()
    run.variant("int8-coco", "int8", 0.49, 0.69, 50.0)
    with pytest.raises(UserError) as exc:
        collect_variants([run.root, other.root])
    assert exc.value.flag == "--run-dir"

    # a variant quantized from another model than the evaluated FP32 one
    (run.root / "baseline-coco" / "metrics.json").unlink()
    with pytest.raises(UserError) as exc:
        collect_variants([other.root, run.root])
    assert exc.value.flag == "--run-dir"


def test_report_needs_an_fp32_evaluation(tmp_path):
    run = RunDir(tmp_path / "run")
    run.variant("int8-coco", "int8", 0.49, 0.69, 50.0)
    with pytest.raises(UserError) as exc:
        collect_variants([run.root])
    assert exc.value.flag == "--run-dir"
    with pytest.raises(UserError) as exc:
        collect_variants([tmp_path / "run" / "onnx"])
    assert exc.value.flag == "--run-dir"


def test_repeated_baseline_across_run_dirs_and_changed_model(tmp_path, no_tensorrt):
    run = RunDir(tmp_path / "run")
    run.baseline()
    run.variant("int8-coco", "int8", 0.499, 0.69, 50.0)
    copy = tmp_path / "second" / "baseline-coco"
    copy.mkdir(parents=True)
    (copy / "metrics.json").write_text((run.root / "baseline-coco" / "metrics.json").read_text())
    collected = collect_variants([run.root, tmp_path / "second"])
    roles = [v.role for v in collected.variants]
    assert roles.count("baseline") == 1 and roles.count("fp32_repeat") == 1
    labels = [v.label for v in collected.variants]
    assert len(set(labels)) == len(labels)
    # the model file changed after its evaluation: that evaluation is no longer of this file, and it was the only one
    (tmp_path / "run" / "onnx" / "int8.onnx").write_bytes(b"re-exported")
    with pytest.raises(UserError, match="model file changed since it was evaluated") as exc:
        collect_variants([run.root])
    assert (
        exc.value.flag == "--run-dir" and "int8.onnx" in str(exc.value) and "int8-coco/metrics.json" in str(exc.value)
    )


def test_report_tensorrt_off_and_symlinked_evaluations(load_script, workflow_run, tmp_path, capsys):
    # a run dir assembled from links to evaluations made elsewhere
    linked = tmp_path / "linked"
    linked.mkdir()
    for step in ("baseline-coco", "int8-coco"):
        os.symlink(workflow_run.root / step, linked / step)
    main = load_script(SCRIPT).main
    assert main(["--run-dir", str(linked), "--tensorrt", "off"]) == 0
    report = json.loads((linked / "report.json").read_text())
    assert [v["label"] for v in report["variants"]] == ["FP32", "INT8 entropy/fp32"]
    assert report["tensorrt"]["status"] == "not measured: disabled (--tensorrt off)"
    assert report["recommended"]["variant"] == "FP32"  # INT8 entropy loses 1.39 AP
    capsys.readouterr()


# ----------------------------------------------------------------------------------------------------------------------
# TensorRT (trtexec is absent here: command construction and parsing, plus a stand-in trtexec)


def test_trtexec_command_float_int8_fp8():
    fp16 = trt.trtexec_command("m.onnx", "m.engine", trt.engine_precision([]), timing_cache="t.cache")
    assert fp16[:3] == ["trtexec", "--onnx=m.onnx", "--fp16"]
    assert "--saveEngine=m.engine" in fp16 and "--timingCacheFile=t.cache" in fp16
    assert "--builderOptimizationLevel=3" in fp16
    for flag in (
        "--useCudaGraph",
        "--noDataTransfers",
        "--useSpinWait",
        "--warmUp=500",
        "--iterations=500",
        "--avgRuns=500",
    ):
        assert flag in fp16
    assert "--stronglyTyped" not in fp16 and "--int8" not in fp16

    int8 = trt.trtexec_command("q.onnx", "q.engine", trt.engine_precision(["int8"]), iterations=100, warmup_ms=200)
    assert "--stronglyTyped" in int8 and "--fp16" not in int8 and "--int8" not in int8
    assert "--builderOptimizationLevel=4" in int8 and "--iterations=100" in int8 and "--warmUp=200" in int8
    assert not any(a.startswith("--timingCacheFile") for a in int8)

    fp8 = trt.trtexec_command("f.onnx", "f.engine", trt.engine_precision(["float8e4m3fn"], "mixed"))
    assert fp8[2:4] == ["--fp16", "--fp8"] and "--stronglyTyped" not in fp8
    assert trt.engine_precision(["int8"], "mixed") == "int8"
    assert trt.engine_precision(["float8e4m3fn"]) == "stronglyTyped"
    assert trt.engine_precision(["int8", "float8e4m3fn"], "mixed") == "int8+fp8"
    with pytest.raises(ValueError):
        trt.trtexec_command("m.onnx", "m.engine", "int3")
    with pytest.raises(ValueError):
        trt.engine_precision(["int8"], "fast")


def test_parse_trtexec_latency():
    parsed = trt.parse_trtexec_latency(TRTEXEC_SAMPLE)
    gpu = parsed["gpu_compute_ms"]
    assert gpu == {
        "min": 1.20508,
        "max": 1.40015,
        "mean": 1.2251,
        "median": 1.22168,
        "p90": 1.23511,
        "p95": 1.24219,
        "p99": 1.29688,
    }
    assert parsed["throughput_qps"] == 812.345
    assert parsed["latency_ms"]["median"] == 1.22168  # "Latency:", not "H2D Latency:"
    assert parsed["trt_version"] == "10.3.0"
    old = trt.parse_trtexec_latency(TRTEXEC_SAMPLE_OLD)
    assert old["gpu_compute_ms"]["median"] == 0.97998 and old["gpu_compute_ms"]["p99"] == 1.29016
    assert "p90" not in old["gpu_compute_ms"]
    with pytest.raises(ValueError, match="GPU Compute Time"):
        trt.parse_trtexec_latency("&&&& FAILED TensorRT.trtexec [TensorRT v100300]\n")


def test_tensorrt_status_when_absent(no_tensorrt):
    status = trt.tensorrt_status()
    assert status == {"trtexec": None, "tensorrt_python": None, "status": "not measured: TensorRT not installed"}
    assert trt.tensorrt_available() is False
    result = trt.benchmark_engine("m.onnx", "out", "m", "fp16")
    assert result["status"] == "not measured: TensorRT not installed" and "gpu_compute_ms" not in result


def _fake_trtexec(path: Path, sample: str, exit_code: int = 0) -> Path:
    """A stand-in trtexec: prints ``sample`` and writes the --saveEngine file, like the real one."""
    sample_file = path.with_suffix(".txt")
    sample_file.write_text(sample)
    path.write_text(
        "#!/bin/sh\n"
        'for a in "$@"; do case $a in --saveEngine=*) printf engine > "${a#--saveEngine=}";; esac; done\n'
        f"cat '{sample_file}'\n"
        f"exit {exit_code}\n"
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_report_with_a_stand_in_trtexec(load_script, workflow_run, tmp_path, capsys):
    fake = _fake_trtexec(tmp_path / "trtexec", TRTEXEC_SAMPLE)
    main = load_script(SCRIPT).main
    out = tmp_path / "out"
    assert main(["--run-dir", str(workflow_run.root), "--out-dir", str(out), "--trtexec", str(fake)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["tensorrt"]["status"] == "measured" and report["latency_axis"]["source"] == "tensorrt"
    rows = _by_label(report["variants"])
    for v in rows.values():
        assert v["tensorrt"]["status"] == "measured"
        assert v["tensorrt"]["gpu_compute_ms"]["median"] == 1.22168
        assert Path(v["tensorrt"]["engine_path"]).read_text() == "engine"
    assert "--fp16" in rows["FP32"]["tensorrt"]["command"]
    assert "--stronglyTyped" in rows["INT8 entropy/fp32"]["tensorrt"]["command"]
    assert any(a.startswith("--saveEngine=") and a.endswith(".engine") for a in rows["FP32"]["tensorrt"]["command"])
    # all engines equally fast (same sample), so none is faster than FP32: keep FP32
    assert report["recommended"]["variant"] == "FP32" and "not faster than FP32" in report["recommended"]["reason"]
    assert "1.222 / 1.235 (stronglyTyped)" in (out / "report.md").read_text()
    # a rerun reuses unchanged engine results
    assert (
        main(["--run-dir", str(workflow_run.root), "--out-dir", str(out), "--trtexec", str(fake), "--overwrite"]) == 0
    )
    again = json.loads((out / "report.json").read_text())
    assert all(v["tensorrt"].get("reused") for v in again["variants"])
    capsys.readouterr()


def test_failed_trtexec_is_reported_not_invented(tmp_path, workflow_run, load_script, capsys):
    fake = _fake_trtexec(tmp_path / "trtexec", "[E] Error[4]: network parse failed\n", exit_code=1)
    main = load_script(SCRIPT).main
    out = tmp_path / "out"
    assert main(["--run-dir", str(workflow_run.root), "--out-dir", str(out), "--trtexec", str(fake)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["tensorrt"]["status"].startswith("not measured: every trtexec run failed")
    for v in report["variants"]:
        assert v["tensorrt"]["status"].startswith("failed: trtexec exit status 1")
        assert "gpu_compute_ms" not in v["tensorrt"]
    assert not list((out / "tensorrt").glob("*.engine")) and not list((out / "tensorrt").glob(".*partial"))
    assert report["latency_axis"]["source"] == "onnxruntime"
    assert "| failed |" in (out / "report.md").read_text()
    capsys.readouterr()


def test_cli_validation(load_script, tmp_path, capsys):
    main = load_script(SCRIPT).main
    # one settings field per flag, in the parser's order: report.manifest.json's "args" keep their keys and order
    args = load_script(SCRIPT).build_parser().parse_args(["--run-dir", str(tmp_path)])
    assert list(vars(args)) == [f.name for f in fields(ReportSettings)]
    assert main(["--run-dir", str(tmp_path / "missing")]) == 2
    script = load_script(SCRIPT)
    capsys.readouterr()
    assert main(["--run-dir", str(tmp_path), "--budget-ap", "-1"]) == 2  # argparse: finite and > 0
    assert "argument --budget-ap: must be > 0" in capsys.readouterr().err
    for extra, flag in (
        (["--latency-tie-pct", "-1"], "--latency-tie-pct"),
        (["--trt-iterations", "0"], "--trt-iterations"),
        (["--trtexec", str(tmp_path / "nope")], "--trtexec"),
    ):
        assert main(["--run-dir", str(tmp_path), *extra]) == 2
        with pytest.raises(UserError) as exc:
            ReportSettings(**vars(script.build_parser().parse_args(["--run-dir", str(tmp_path), *extra]))).check()
        assert exc.value.flag == flag


# ----------------------------------------------------------------------------------------------------------------------
# low-precision MAC share: the cost axis without TensorRT


def test_mac_share_of_each_variant_orders_the_recommendation(tmp_path):
    import onnx
    from test_mac_share import CONV1_MACS, CONV2_MACS, _graph

    models = {"both": _graph(quantize_conv2=True), "conv1": _graph(), "float": _graph(quantize_conv1=False)}
    rows = []
    for name, model in models.items():
        path = tmp_path / f"{name}.onnx"
        onnx.save(model, str(path))
        role = "baseline" if name == "float" else "quantized"
        row = _row(name, 0.499 if name == "conv1" else 0.497, 10.0, role=role)
        rows.append(replace(row, model_file=path, mac_share=None))  # the share is read from the graph
    rows.append(replace(_row("gone", 0.4999, 1.0), model_file=None, mac_share=None))
    rows = add_mac_share(rows)
    share = {r.label: r.mac_share for r in rows}
    assert share == {"both": 1.0, "conv1": CONV1_MACS / (CONV1_MACS + CONV2_MACS), "float": 0.0, "gone": None}
    assert rows[1].low_precision_macs == CONV1_MACS and rows[1].total_macs == CONV1_MACS + CONV2_MACS
    # all within budget: the most MACs in low precision wins over the more accurate "conv1" and the unknown "gone"
    rec = recommend(rows, budget_ap=1.0)
    assert rec.variant == "both" and rec.mac_share == 1.0


def test_the_latency_axis_says_when_sessions_ran_side_by_side():
    rows = [_row("FP32", 0.50, 100.0, role="baseline"), _row("A", 0.497, 60.0, share=0.95)]
    assert latency_axis(rows).description == "ONNX Runtime session.run p50 (CPU EP)" and sessions_text(rows) is None
    two = [replace(r, latency_ms={**r.latency_ms, "sessions": 2}) for r in rows]
    assert latency_axis(two).description.endswith("; each run timed beside 1 other session(s) of the model)")
    mixed = [two[0], rows[1]]
    assert "timed with 1 and 2 sessions side by side: not comparable" in latency_axis(mixed).description
    assert recommend(two, budget_ap=1.0).variant == recommend(rows, budget_ap=1.0).variant == "A"
