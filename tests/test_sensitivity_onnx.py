"""ONNX-native layer sensitivity (onnx_layer_sensitivity.py over lowbit.sensitivity_run: the local, single and loo
rankings, also with torch unimportable) on the tiny YOLOv10 fixture, report layers mapped onto a graph
(lowbit.sensitivity_onnx), the shared report helpers (lowbit.sensitivity_report) and compare_sensitivity_reports.py."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from lowbit import sensitivity_local as local
from lowbit import sensitivity_onnx as sens
from lowbit import sensitivity_report as report_io
from lowbit.errors import UserError

SCRIPT = "scripts/cv-models/onnx_layer_sensitivity.py"
REPO = Path(__file__).resolve().parent.parent
# Runs a script with torch unimportable: a meta-path finder refuses torch and every torch.* module, and the
# names asked for are printed last, so the test sees any attempt, caught by the code or not.
NO_TORCH = """
import runpy, sys

attempts = []


class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            attempts.append(name)
            raise ImportError(f"torch is blocked in this test ({name})")
        return None


sys.meta_path.insert(0, NoTorch())
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    print("TORCH_IMPORT_ATTEMPTS=" + ",".join(attempts), file=sys.stderr)
"""
COMPARE = "scripts/cv-models/compare_sensitivity_reports.py"
# A Conv -> SiLU -> Conv chain inside the backbone (the SiLU output feeds only the second Conv).
PRODUCER = "/model.6/m.0/cv1/conv/Conv"
HARD_NODE = "/model.6/m.0/cv2/conv/Conv"
OUTLIER_SCALE = 1e4
NUM_IMAGES = 3


def _make_hard_to_quantize(src: Path, dst: Path) -> None:
    """Copy of ``src`` where HARD_NODE's input channel 0 and weight column 0 are hard to quantize.

    The producer's output channel 0 (weight and bias) is multiplied by OUTLIER_SCALE and HARD_NODE's
    weights reading that channel are divided by it, so the float model computes nearly the same
    function (SiLU is close to linear for large inputs) but HARD_NODE sees one activation channel
    10^4 times larger than the others (a per-tensor activation scale wipes out the rest) and one
    weight column 10^4 times smaller than the rest of each output channel (per-channel weight scales
    round it away). Its local error must dominate the report; every other node is left as it was.
    """
    model = onnx.load(str(src))
    nodes = {n.name: n for n in model.graph.node}
    producer, hard = nodes[PRODUCER], nodes[HARD_NODE]
    consumers = [n for n in model.graph.node if producer.output[0] in n.input]
    assert {n.op_type for n in consumers} == {"Sigmoid", "Mul"}, "fixture graph changed: pick another chain"
    inits = {init.name: init for init in model.graph.initializer}

    def edit(name, fn):
        array = numpy_helper.to_array(inits[name]).copy()
        fn(array)
        inits[name].CopyFrom(numpy_helper.from_array(array.astype(np.float32), name))

    edit(producer.input[1], lambda w: w.__setitem__(0, w[0] * OUTLIER_SCALE))
    edit(producer.input[2], lambda b: b.__setitem__(0, b[0] * OUTLIER_SCALE))
    edit(hard.input[1], lambda w: w.__setitem__((slice(None), 0), w[:, 0] / OUTLIER_SCALE))
    onnx.save(model, str(dst))


@pytest.fixture(scope="module")
def calib_npy(tmp_path_factory, tiny_yolov10_spec) -> Path:
    size = tiny_yolov10_spec["imgsz"]
    path = tmp_path_factory.mktemp("sens_calib") / "calib.npy"
    np.save(path, np.random.default_rng(1).random((NUM_IMAGES + 1, 3, size, size), dtype=np.float32))
    return path


@pytest.fixture(scope="module")
def hard_onnx(tiny_yolov10_onnx, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hard") / "tiny-hard.onnx"
    _make_hard_to_quantize(tiny_yolov10_onnx, path)
    return path


@pytest.fixture(scope="module")
def runs(load_script, hard_onnx, calib_npy, tmp_path_factory) -> dict[str, Path]:
    """INT8 then FP8 sensitivity of the hard model; the FP8 run also compares itself with the INT8 report."""
    root = tmp_path_factory.mktemp("sens_runs")
    out = {}
    for precision in ("int8", "fp8"):
        out_dir = root / precision
        argv = [
            "--onnx-path",
            str(hard_onnx),
            "--calib-path",
            str(calib_npy),
            "--num-images",
            str(NUM_IMAGES),
            "--precision",
            precision,
            "--out-dir",
            str(out_dir),
        ]
        if precision == "fp8":
            argv += ["--compare-with", str(out["int8"] / "layer-sensitivity-report.json")]
        assert load_script(SCRIPT).main(argv) == 0
        out[precision] = out_dir
    return out


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_report_follows_schema_and_is_not_degenerate(runs, hard_onnx, precision):
    out_dir = runs[precision]
    report = json.loads((out_dir / "layer-sensitivity-report.json").read_text())
    assert report["schema_version"] == 1 and report["kind"] == "sensitivity" and report["source"] == "onnx"
    assert report["precision"] == precision and report["quant_format"] == f"{precision}-{precision}"
    assert report["method"]["higher_is_more_sensitive"] is True and report["method"]["score"] == "local_rel_mse"
    assert report["data"] == {"images": NUM_IMAGES, "source": report["data"]["source"], "imgsz": 160}
    assert report["device"] == "cpu" and report["wall_s"] > 0

    fp32 = onnx.load(str(hard_onnx))
    node_names = {n.name for n in fp32.graph.node}
    initializers = {i.name for i in fp32.graph.initializer}
    layers = report["layers"]
    assert len(layers) > 50
    assert [layer["rank"] for layer in layers] == list(range(1, len(layers) + 1))
    for layer in layers:
        assert list(layer) == list(report_io.LAYER_KEYS)
        assert layer["name"] == layer["onnx_node"] and layer["name"] in node_names
        assert layer["weight"] is None or layer["weight"] in initializers
    scores = np.array([layer["score"] for layer in layers])
    assert np.all(np.isfinite(scores)) and np.all(scores >= 0)
    assert np.all(np.diff(scores) <= 0), "layers must be sorted by descending score"
    assert scores.max() > 0 and len(np.unique(scores)) > len(scores) // 2, "scores are degenerate"
    assert sum(layer["op_type"] == "Conv" for layer in layers) > 30
    # INT8 quantizes every Conv weight; ModelOpt's FP8 mode leaves a few Conv weights in FP32 (input-only Q/DQ)
    convs = [layer for layer in layers if layer["op_type"] == "Conv"]
    with_weight = sum(layer["weight"] is not None for layer in convs)
    assert with_weight == len(convs) if precision == "int8" else with_weight >= 0.9 * len(convs)

    # every quantized node of the model ModelOpt produced is scored, and nothing else
    quantize_manifest = json.loads(next((out_dir / "qdq").glob("*.manifest.json")).read_text())
    assert sorted(layer["name"] for layer in layers) == sorted(quantize_manifest["extra"]["quantized_nodes"])

    rows = list(csv.DictReader((out_dir / "layer-sensitivity-report.csv").open()))
    assert [r["name"] for r in rows] == [layer["name"] for layer in layers]
    assert float(rows[0]["score"]) == layers[0]["score"]
    assert (out_dir / "layer-sensitivity-report.md").read_text().count("\n| ") == len(layers) + 2  # header, rule, rows
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["status"] == "ok" and manifest["extra"]["fp32_recovery_rel_diff"] < 1e-5
    assert manifest["kind"] == "sensitivity" and quantize_manifest["kind"] == "quantize"


@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_hard_to_quantize_node_ranks_first(runs, precision):
    layers = json.loads((runs[precision] / "layer-sensitivity-report.json").read_text())["layers"]
    assert layers[0]["name"] == HARD_NODE
    assert layers[0]["score"] > 5 * layers[1]["score"]
    # The producer's weights were scaled too, but per output channel, which per-channel weight scales
    # absorb: a score that tracked magnitudes rather than quantization error would rank it high as well.
    producer = next(layer for layer in layers if layer["name"] == PRODUCER)
    assert producer["rank"] > len(layers) // 2


def test_local_error_matches_a_hand_computation(runs, hard_onnx, calib_npy):
    """The in-graph score of one Conv equals Q/DQ done by hand (numpy INT8 rounding, torch conv) on FP32 inputs."""
    import onnxruntime as ort
    import torch

    qdq = onnx.load(str(next((runs["int8"] / "qdq").glob("*.onnx"))))
    node_name = "/model.7/cv1/conv/Conv"
    inits = {i.name: numpy_helper.to_array(i).copy() for i in qdq.graph.initializer}
    producers = {out: n for n in qdq.graph.node for out in n.output}
    node = next(n for n in qdq.graph.node if n.name == node_name)
    q_x = producers[producers[node.input[0]].input[0]]
    q_w = producers[producers[node.input[1]].input[0]]
    x_scale, x_zero = inits[q_x.input[1]], inits[q_x.input[2]].astype(np.float64)
    w = inits[q_w.input[0]]
    w_scale, w_zero = inits[q_w.input[1]][:, None, None, None], inits[q_w.input[2]][:, None, None, None]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["group"] == 1 and attrs["strides"] == [1, 1] and attrs["kernel_shape"] == [1, 1]

    def fake_quant(values, scale, zero):
        return (np.clip(np.round(values / scale) + zero, -128, 127) - zero) * scale

    fp32 = onnx.load(str(hard_onnx))
    fp32.graph.output.append(onnx.helper.make_tensor_value_info(q_x.input[0], onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(fp32.SerializeToString(), providers=["CPUExecutionProvider"])
    bias = torch.from_numpy(inits[node.input[2]])
    sse = ref = 0.0
    for image in local.iter_batches(np.load(calib_npy), NUM_IMAGES):
        x = session.run([q_x.input[0]], {"images": image})[0]
        y = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), bias).double()
        y_q = torch.nn.functional.conv2d(
            torch.from_numpy(fake_quant(x, x_scale, x_zero).astype(np.float32)),
            torch.from_numpy(fake_quant(w, w_scale, w_zero).astype(np.float32)),
            bias,
        ).double()
        sse += float(((y_q - y) ** 2).sum())
        ref += float((y**2).sum())
    layers = json.loads((runs["int8"] / "layer-sensitivity-report.json").read_text())["layers"]
    score = next(layer["score"] for layer in layers if layer["name"] == node_name)
    assert score == pytest.approx(sse / ref, rel=1e-3)


def test_qdq_path_reuses_a_quantized_model(load_script, runs, hard_onnx, calib_npy, tmp_path, capsys):
    qdq_path = next((runs["int8"] / "qdq").glob("*.onnx"))
    out_dir = tmp_path / "reuse"
    argv = [
        "--onnx-path",
        str(hard_onnx),
        "--calib-path",
        str(calib_npy),
        "--num-images",
        str(NUM_IMAGES),
        "--precision",
        "int8",
        "--qdq-path",
        str(qdq_path),
        "--out-dir",
        str(out_dir),
    ]
    assert load_script(SCRIPT).main(argv) == 0
    again = json.loads((out_dir / "layer-sensitivity-report.json").read_text())["layers"]
    first = json.loads((runs["int8"] / "layer-sensitivity-report.json").read_text())["layers"]
    assert [layer["name"] for layer in again] == [layer["name"] for layer in first]
    assert [layer["score"] for layer in again] == pytest.approx([layer["score"] for layer in first], rel=1e-6)
    assert not (out_dir / "qdq").exists()

    # the same Q/DQ model is INT8: claiming it is FP8 is refused before any scoring
    argv_fp8 = argv[:-2] + ["--out-dir", str(tmp_path / "wrong")]
    argv_fp8[argv_fp8.index("int8")] = "fp8"
    assert load_script(SCRIPT).main(argv_fp8) == 2
    assert "--qdq-path" in capsys.readouterr().err


def test_ranking_agreement_written(runs):
    agreement = json.loads((runs["fp8"] / "ranking-agreement.json").read_text())
    assert agreement["a"]["precision"] == "fp8" and agreement["b"]["precision"] == "int8"
    fp8_layers = json.loads((runs["fp8"] / "layer-sensitivity-report.json").read_text())["layers"]
    assert agreement["matched"] == len(fp8_layers)  # every FP8-quantized node is also INT8-quantized here
    assert -1.0 <= agreement["spearman"] <= 1.0
    assert set(agreement["top_k"]) == {"5", "10", "20"}
    # the deliberately hard node tops both rankings
    assert agreement["top_k"]["5"]["a"][0] == agreement["top_k"]["5"]["b"][0] == HARD_NODE
    assert agreement["top_k"]["5"]["overlap"] >= 1


@pytest.mark.parametrize(
    "method, method_name",
    [("single", "onnx_one_at_a_time_drift"), ("loo", "onnx_leave_one_out_drift"), ("local", "onnx_local_qdq_error")],
)
def test_onnx_rankings_run_without_torch(runs, hard_onnx, calib_npy, tmp_path, method, method_name):
    """Every ONNX ranking of the script, on the CPU, runs in a process where ``import torch`` fails, and never asks."""
    qdq_path = next((runs["int8"] / "qdq").glob("*.onnx"))
    out_dir = tmp_path / method
    argv = [
        SCRIPT,
        "--onnx-path",
        str(hard_onnx),
        "--calib-path",
        str(calib_npy),
        "--num-images",
        "1",
        "--precision",
        "int8",
        "--method",
        method,
        "--batch-size",
        "1",
        "--intra-op-threads",
        "1",
        "--qdq-path",
        str(qdq_path),
        "--out-dir",
        str(out_dir),
    ]
    result = subprocess.run(
        [sys.executable, "-c", NO_TORCH, *argv], check=False, cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.splitlines()[-1] == "TORCH_IMPORT_ATTEMPTS=", result.stderr[-3000:]
    report = json.loads((out_dir / "layer-sensitivity-report.json").read_text())
    assert report["method"]["name"] == method_name and report["data"]["images"] == 1
    layers = report["layers"]
    expected = json.loads((runs["int8"] / "layer-sensitivity-report.json").read_text())["layers"]
    assert sorted(layer["name"] for layer in layers) == sorted(layer["name"] for layer in expected)
    assert all(np.isfinite(layer["score"]) for layer in layers) and layers[0]["name"] == HARD_NODE
    if method != "local":
        assert report["method"]["settings"]["drift_device"] == "cpu"


def test_refuses_to_overwrite_and_bad_calibration(load_script, runs, hard_onnx, calib_npy, tmp_path, capsys):
    out_dir = runs["int8"]
    before = (out_dir / "layer-sensitivity-report.json").stat().st_mtime_ns
    argv = [
        "--onnx-path",
        str(hard_onnx),
        "--calib-path",
        str(calib_npy),
        "--precision",
        "int8",
        "--out-dir",
        str(out_dir),
    ]
    assert load_script(SCRIPT).main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out_dir / "layer-sensitivity-report.json").stat().st_mtime_ns == before

    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((2, 3, 64, 64), dtype=np.float32))
    argv = ["--onnx-path", str(hard_onnx), "--calib-path", str(wrong), "--out-dir", str(tmp_path / "x")]
    assert load_script(SCRIPT).main(argv) == 2
    assert "--calib-path" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------------------------------------------------
# pure functions


def test_scope_key_recovers_torch_module_names():
    assert sens.scope_key("/model.2/cv1/conv/Conv") == ("model.2.cv1.conv", "Conv")
    assert sens.scope_key("/model.22/m.0/cv1/cv1.2/conv/Conv") == ("model.22.m.0.cv1.2.conv", "Conv")
    assert sens.scope_key("/model.23/one2one_cv3.0/one2one_cv3.0.0/one2one_cv3.0.0.0/conv/Conv") == (
        "model.23.one2one_cv3.0.0.0.conv",
        "Conv",
    )
    assert sens.scope_key("/model.10/attn/MatMul_1") == ("model.10.attn", "MatMul")
    assert sens.scope_key("Conv_12") is None


def test_spearman_and_compare_reports(tiny_yolov10_onnx):
    assert report_io.spearman([1, 2, 3, 4], [1, 2, 3, 4]) == pytest.approx(1.0)
    assert report_io.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert report_io.spearman([1], [1]) is None

    model = onnx.load(str(tiny_yolov10_onnx))
    convs = [n for n in model.graph.node if n.op_type == "Conv"][:12]
    onnx_layers = report_io.rank_layers(
        [
            {"name": n.name, "op_type": "Conv", "weight": n.input[1], "onnx_node": n.name, "score": float(12 - i)}
            for i, n in enumerate(convs)
        ]
    )
    # a torch-style report of the same ranking, reversed, plus a layer that exists nowhere
    torch_layers = report_io.rank_layers(
        [
            {
                "name": n.input[1][: -len(".weight")],
                "op_type": "Conv2d",
                "weight": n.input[1],
                "onnx_node": None,
                "score": float(i),
            }
            for i, n in enumerate(convs)
        ]
        + [{"name": "model.99.bogus", "op_type": "Conv2d", "weight": None, "onnx_node": None, "score": -1.0}]
    )
    a = {"layers": onnx_layers, "source": "onnx"}
    b = {"layers": torch_layers, "source": "torch"}
    result = report_io.compare_reports(a, b, sens.NodeMatcher(model), ks=(5, 10, 20))
    assert result["matched"] == 12
    assert result["spearman"] == pytest.approx(-1.0)
    assert result["top_k"]["5"]["overlap"] == 0 and result["top_k"]["10"]["overlap"] == 8
    assert "20" not in result["top_k"]  # K larger than the matched set is skipped
    assert [u["name"] for u in result["b"]["unmatched"]] == ["model.99.bogus"]
    same = report_io.compare_reports(a, a, sens.NodeMatcher(model))
    assert same["spearman"] == pytest.approx(1.0) and same["top_k"]["5"]["fraction"] == 1.0


def test_load_report_rejects_bad_files(tmp_path):
    path = tmp_path / "r.json"
    layers = [{"name": "a", "rank": 1}, {"name": "b", "rank": 3}]
    path.write_text(json.dumps({"schema_version": 1, "kind": "sensitivity", "layers": layers}))
    with pytest.raises(UserError, match="ranks are not 1..2") as e:
        report_io.load_report(path, "--report-json")
    assert e.value.flag == "--report-json"
    for kind, why in ((None, "names no kind"), ("metrics", "is a 'metrics' record")):  # another writer's file
        path.write_text(json.dumps({"schema_version": 1, "layers": [layers[0]], **({"kind": kind} if kind else {})}))
        with pytest.raises(UserError, match=why) as e:
            report_io.load_report(path, "--report-json")
        assert e.value.flag == "--report-json"
    path.write_text("not json")
    with pytest.raises(UserError, match="not a readable JSON"):
        report_io.load_report(path, "--report-json")


# ----------------------------------------------------------------------------------------------------------------------
# compare_sensitivity_reports.py


def _hand_report(path: Path, source: str, entries: list[dict]) -> Path:
    """A small report of the shared schema, written as the tools write it; ``entries`` best first."""
    layers = report_io.rank_layers([{**entry, "score": float(len(entries) - i)} for i, entry in enumerate(entries)])
    report = report_io.make_report(
        source=source,
        model=Path("model.onnx"),
        model_sha256="0" * 64,
        precision="fp8",
        method={"name": "hand", "description": "hand-written", "score": "s", "higher_is_more_sensitive": True},
        data={"images": 1, "source": "none", "imgsz": 64},
        device="cpu",
        wall_s=0.0,
        layers=layers,
    )
    return report_io.write_report(path, report)["json"]


def test_compare_script_pairs_two_existing_reports(load_script, tmp_path, capsys):
    """An ONNX report and a torch report of the same six convs, in opposite orders, plus one layer each side only."""
    onnx_entries = [
        {
            "name": f"/model.{i}/conv/Conv",
            "op_type": "Conv",
            "weight": f"model.{i}.conv.weight",
            "onnx_node": f"/model.{i}/conv/Conv",
        }
        for i in range(6)
    ] + [{"name": "/model.10/Add", "op_type": "Add", "weight": None, "onnx_node": "/model.10/Add"}]
    torch_entries = [
        {"name": f"model.{i}.conv", "op_type": "Conv", "weight": f"model.{i}.conv.weight", "onnx_node": None}
        for i in reversed(range(6))
    ] + [{"name": "model.9.m", "op_type": "MaxPool", "weight": None, "onnx_node": None}]
    report_a = _hand_report(tmp_path / "a", "onnx", onnx_entries)
    report_b = _hand_report(tmp_path / "b", "torch", torch_entries)
    out = tmp_path / "cmp" / "agreement.json"
    argv = ["--report-a", str(report_a), "--report-b", str(report_b), "--out", str(out), "--k", "3", "5", "10"]
    assert load_script(COMPARE).main(argv) == 0
    assert "6 matched layers, Spearman -1.0" in capsys.readouterr().out

    agreement = json.loads(out.read_text())
    assert agreement["matched"] == 6 and agreement["spearman"] == pytest.approx(-1.0)
    assert set(agreement["top_k"]) == {"3", "5"}  # K larger than the matched set is skipped
    assert agreement["top_k"]["3"]["overlap"] == 0 and agreement["top_k"]["5"]["overlap"] == 4
    # the torch layers land on the ONNX report's node names through their shared weight names
    assert agreement["top_k"]["3"]["b"] == ["/model.5/conv/Conv", "/model.4/conv/Conv", "/model.3/conv/Conv"]
    assert agreement["a"]["not_in_other"] == ["/model.10/Add"] and agreement["b"]["not_in_other"] == ["model.9.m"]
    assert agreement["a"]["report"] == str(report_a) and agreement["b"]["source"] == "torch"
    assert agreement["graph"] is None
    assert json.loads(out.with_suffix(".manifest.json").read_text())["status"] == "ok"

    # never overwrites without --overwrite; a bad report is named by its flag and writes nothing
    before = out.read_bytes()
    assert load_script(COMPARE).main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == before
    bogus = tmp_path / "bogus.json"
    bogus.write_text(json.dumps({"schema_version": 1, "layers": []}))
    other = tmp_path / "other.json"
    assert load_script(COMPARE).main(["--report-a", str(report_a), "--report-b", str(bogus), "--out", str(other)]) == 2
    assert "--report-b" in capsys.readouterr().err and not other.exists()


def test_compare_script_maps_onto_a_graph(load_script, tiny_yolov10_onnx, tmp_path):
    """ONNX rows without weights and torch rows share no report column; --onnx-path pairs them through the graph."""
    convs = [n for n in onnx.load(str(tiny_yolov10_onnx)).graph.node if n.op_type == "Conv"][:4]
    report_a = _hand_report(
        tmp_path / "a",
        "onnx",
        [{"name": n.name, "op_type": "Conv", "weight": None, "onnx_node": n.name} for n in convs],
    )
    report_b = _hand_report(
        tmp_path / "b",
        "torch",
        [
            {"name": n.input[1][: -len(".weight")], "op_type": "Conv", "weight": n.input[1], "onnx_node": None}
            for n in convs
        ],
    )
    common = ["--report-a", str(report_a), "--report-b", str(report_b), "--k", "2"]
    assert load_script(COMPARE).main([*common, "--out", str(tmp_path / "columns.json")]) == 0
    assert json.loads((tmp_path / "columns.json").read_text())["matched"] == 0
    argv = [*common, "--out", str(tmp_path / "graph.json"), "--onnx-path", str(tiny_yolov10_onnx)]
    assert load_script(COMPARE).main(argv) == 0
    agreement = json.loads((tmp_path / "graph.json").read_text())
    assert agreement["matched"] == 4 and agreement["spearman"] == pytest.approx(1.0)
    assert agreement["top_k"]["2"]["a"] == agreement["top_k"]["2"]["b"] == [n.name for n in convs[:2]]
    assert agreement["graph"] == str(tiny_yolov10_onnx)


def test_drift_image_selection_scores_the_images_that_drift_most(
    load_script, runs, hard_onnx, calib_npy, tmp_path, capsys
):
    """--image-selection drift: each pool image's full-model drift is the one the single ranking reports for that
    image alone; the ranking scores exactly the top --num-images of them, with the scores of those images."""
    from lowbit.sensitivity_gated import image_drifts
    from lowbit.sensitivity_single import single_sensitivity

    qdq_path = next((runs["int8"] / "qdq").glob("*.onnx"))
    qdq_model = onnx.load(str(qdq_path))
    pool = np.load(calib_npy)  # NUM_IMAGES + 1 images
    drifts = image_drifts(qdq_model, pool, ["CPUExecutionProvider"], batch_size=2)
    assert drifts.shape == (len(pool),) and len(set(np.round(drifts, 9))) == len(pool)
    for i in (0, len(pool) - 1):  # the same number as the single ranking's all-quantized reference on that image
        alone = single_sensitivity(qdq_model, pool[i : i + 1], ["CPUExecutionProvider"])
        assert drifts[i] == pytest.approx(alone.reference["all_layers_quantized"], rel=1e-6)
    out_dir = tmp_path / "drift"
    base = ["--onnx-path", str(hard_onnx), "--calib-path", str(calib_npy), "--precision", "int8"]
    base += ["--qdq-path", str(qdq_path), "--method", "single"]
    argv = base + ["--num-images", "2", "--image-selection", "drift", "--selection-pool", str(len(pool))]
    assert load_script(SCRIPT).main(argv + ["--out-dir", str(out_dir)]) == 0
    report = json.loads((out_dir / "layer-sensitivity-report.json").read_text())
    selection = report["method"]["settings"]["image_selection"]
    want = sorted(np.argsort(-drifts)[:2].tolist())
    assert selection["by"] == "drift" and selection["chosen"] == want and selection["pool"] == len(pool)
    assert selection["pool_drifts"] == pytest.approx(drifts.tolist(), abs=1e-6)
    direct = single_sensitivity(qdq_model, pool[want], ["CPUExecutionProvider"])
    scores = {layer["name"]: layer["score"] for layer in direct.layers}
    assert {layer["name"]: layer["score"] for layer in report["layers"]} == pytest.approx(scores, rel=1e-6)
    capsys.readouterr()
    # a pool smaller than the images asked for, or a ranking that scores no images: refused by flag
    small = base + ["--num-images", "2", "--image-selection", "drift", "--selection-pool", "1"]
    assert load_script(SCRIPT).main(small + ["--out-dir", str(tmp_path / "small")]) == 2
    assert "--selection-pool" in capsys.readouterr().err and not (tmp_path / "small").exists()
    local_argv = [a if a != "single" else "local" for a in argv]
    assert load_script(SCRIPT).main(local_argv + ["--out-dir", str(tmp_path / "local")]) == 2
    assert "--image-selection" in capsys.readouterr().err and not (tmp_path / "local").exists()
