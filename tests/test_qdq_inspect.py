"""Q/DQ float16 inspection (lowbit.qdq_inspect, qdq_inspect_text): scales, initializers; the onnxruntime rounding
probe and the fp32-quantize rewrite (lowbit.qdq_fp16); the tensor-by-tensor comparison (lowbit.onnx_compare)."""

from __future__ import annotations

import csv
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from lowbit import onnx_compare, qdq_fp16
from lowbit import qdq_inspect as qi
from lowbit import qdq_inspect_text as qi_text
from lowbit.errors import UserError

SCRIPT = "scripts/cv-models/inspect_qdq_model.py"


def _conv_qdq_model(dtype: int, act_scale: float, weight_scales: list[float], weight=None, bias=None):
    """images -> Q/DQ -> Conv(Q/DQ per-channel weight, bias) -> out, all float tensors of ``dtype``.

    Two output channels, one input channel, 1x1 kernel, input [1,1,2,2]. Node names: ``act_q``,
    ``act_dq``, ``w_q``, ``w_dq``, ``conv``.
    """
    np_dtype = np.float16 if dtype == TensorProto.FLOAT16 else np.float32
    weight = np.array([[[[0.5]]], [[[-0.25]]]], np_dtype) if weight is None else weight.astype(np_dtype)
    bias = np.array([0.1, -0.1], np_dtype) if bias is None else bias.astype(np_dtype)
    inits = [
        numpy_helper.from_array(np.array(act_scale, np_dtype), "act_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "act_zp"),
        numpy_helper.from_array(weight, "w"),
        numpy_helper.from_array(np.array(weight_scales, np_dtype), "w_scale"),
        numpy_helper.from_array(np.zeros(2, np.int8), "w_zp"),
        numpy_helper.from_array(bias, "b"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["images", "act_scale", "act_zp"], ["act_q_out"], name="act_q"),
        helper.make_node("DequantizeLinear", ["act_q_out", "act_scale", "act_zp"], ["act_dq_out"], name="act_dq"),
        helper.make_node("QuantizeLinear", ["w", "w_scale", "w_zp"], ["w_q_out"], name="w_q", axis=0),
        helper.make_node("DequantizeLinear", ["w_q_out", "w_scale", "w_zp"], ["w_dq_out"], name="w_dq", axis=0),
        helper.make_node("Conv", ["act_dq_out", "w_dq_out", "b"], ["out"], name="conv"),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("images", dtype, [1, 1, 2, 2])],
        [helper.make_tensor_value_info("out", dtype, [1, 2, 2, 2])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)
    onnx.checker.check_model(model)
    return model


def _pair(report, q_node):
    return next(p for p in report["pairs"] if p["q_node"] == q_node)


def test_fp16_value_counts_thresholds():
    values = np.array([0.0, 1.0, 1e-4, 5e-5, 4e-8, 2e-8, 1e-9, 7e4, np.inf], np.float64)
    counts = qi.fp16_value_counts(values)
    assert counts == {
        "nonzero": 7,  # inf is not counted as a finite non-zero
        "subnormal": 4,  # 5e-5, 4e-8, 2e-8, 1e-9
        "to_zero": 2,  # 2e-8, 1e-9 (4e-8 rounds up to 5.96e-8)
        "below_min_subnormal": 3,  # 4e-8, 2e-8, 1e-9
        "overflow": 1,
        "nonfinite": 1,
    }


def test_fp16_scales_normal_subnormal_zero_and_clamped():
    # act scale 0 (what an underflow to zero leaves), weight scales: one normal, one subnormal (1e-6)
    model = _conv_qdq_model(TensorProto.FLOAT16, 0.0, [0.01, 1e-6])
    report = qi.inspect_qdq(model)
    act, weight = _pair(report, "act_q"), _pair(report, "w_q")
    assert act["kind"] == "activation" and weight["kind"] == "weight"
    assert act["scale"]["dtype"] == "FLOAT16" and act["input_dtype"] == "FLOAT16"
    assert act["scale"]["zero_in_fp16"] == 1 and act["consumers"] == ["conv"]
    assert weight["scale"]["subnormal_in_fp16"] == 1 and weight["scale"]["zero_in_fp16"] == 0
    assert weight["dq_nodes"] == ["w_dq"] and weight["consumers"] == ["conv"]
    counts = report["counts"]
    assert counts["pairs"] == 2 and counts["scales_fp16"] == 2
    assert counts["scales_below_fp16_min_normal"] == 1  # the weight pair (the zero scale is not "below normal")
    assert counts["scales_zero_in_fp16"] == 1
    assert counts["fp16_quantize_inputs"] == 2
    assert report["affected_nodes"] == ["conv"]
    assert report["zero_scale_pairs"] == ["act_q"] and report["low_scale_pairs"] == ["w_q"]
    line = qi_text.verdict(report)[0]
    assert line.startswith("1 of 2 Q/DQ scales below fp16 min normal") and "1 quantize to zero in fp16" in line
    assert line.endswith("affected nodes: conv")
    assert qi.findings_present(report)  # a zero scale always changes results

    clamped = qi.inspect_qdq(_conv_qdq_model(TensorProto.FLOAT16, 0.02, [0.01, qdq_fp16.FP16_MIN_SUBNORMAL]))
    assert clamped["counts"]["scales_clamped_in_fp16"] == 1 and clamped["counts"]["scales_zero_in_fp16"] == 0


def test_fp16_quantize_nodes_are_the_reports_fp16_quantize_inputs():
    model = _conv_qdq_model(TensorProto.FLOAT16, 0.1, [0.01, 0.01])
    report = qi.inspect_qdq(model)
    assert qdq_fp16.fp16_quantize_nodes(model) == report["fp16_quantize_nodes"] == ["act_q", "w_q"]
    assert qdq_fp16.fp16_quantize_nodes(_conv_qdq_model(TensorProto.FLOAT, 0.1, [0.01, 0.01])) == []


def test_fp32_scales_report_what_fp16_would_do():
    model = _conv_qdq_model(TensorProto.FLOAT, 0.02, [1e-9, 4e-8])
    report = qi.inspect_qdq(model)
    weight = _pair(report, "w_q")
    assert weight["scale"]["dtype"] == "FLOAT" and weight["input_dtype"] == "FLOAT"
    assert weight["scale"]["subnormal_in_fp16"] == 2
    assert weight["scale"]["zero_in_fp16"] == 1  # 1e-9 flushes to 0 in a cast; 4e-8 rounds to 5.96e-8
    assert weight["scale"]["clamped_in_fp16"] == 2  # both are below 5.96e-8: ModelOpt would clamp them
    assert report["counts"]["fp16_quantize_inputs"] == 0 and report["counts"]["scales_fp32"] == 2


def test_source_comparison_flags_underflow_overflow_and_readers():
    source_weight = np.array([[[[1e-9]]], [[[-0.25]]]], np.float32)
    source_bias = np.array([2e-8, 7e4], np.float32)  # a bias is not re-quantized: its damage stays
    source = _conv_qdq_model(TensorProto.FLOAT, 0.02, [0.01, 0.01], weight=source_weight, bias=source_bias)
    # what ModelOpt's conversion stores: below-subnormal values replaced by 5.96e-8, overflow clamped
    fp16 = _conv_qdq_model(
        TensorProto.FLOAT16,
        0.02,
        [0.01, 0.01],
        weight=np.array([[[[qdq_fp16.FP16_MIN_SUBNORMAL]]], [[[-0.25]]]]),
        bias=np.array([qdq_fp16.FP16_MIN_SUBNORMAL, qdq_fp16.FP16_MAX]),
    )
    report = qi.inspect_qdq(fp16, source)
    comparison = report["source_comparison"]
    assert comparison["matched"] == 4  # w, b and the two scales (this source is a Q/DQ model too)
    findings = {f["initializer"]: f for f in comparison["findings"]}
    assert findings["w"]["below_min_subnormal"] == 1 and findings["w"]["to_zero"] == 1
    assert findings["w"]["readers"] == ["QuantizeLinear"] and findings["w"]["quantized"] is True
    assert findings["b"]["overflow"] == 1 and findings["b"]["readers"] == ["Conv"]
    assert findings["b"]["quantized"] is False
    assert report["initializers"]["fp16_min_subnormal_values"] == 2
    text = "\n".join(qi_text.verdict(report))
    assert "2 with values below fp16's smallest subnormal" in text and "1 overflowing" in text
    assert "read by non-quantizing nodes: b" in text
    assert qi.findings_present(report)


def test_probe_reports_a_known_rounding():
    probe = qdq_fp16.probe_fp16_quantize_rounding()
    assert probe["onnxruntime"] == ort.__version__ and probe["provider"] == "CPUExecutionProvider"
    assert probe["rounding"] in (qdq_fp16.ROUNDING_NEAREST_EVEN, qdq_fp16.ROUNDING_TOWARD_ZERO)
    expected = (
        [1, 2, 2, 3, -1, -2, -3] if probe["rounding"] == qdq_fp16.ROUNDING_NEAREST_EVEN else [0, 1, 2, 2, 0, -1, -2]
    )
    assert probe["outputs"] == expected


def test_fp32_quantize_rewrite_rounds_to_nearest_even():
    scale = 0.1
    model = _conv_qdq_model(TensorProto.FLOAT16, scale, [0.01, 0.01])
    fixed, changed = qdq_fp16.with_fp32_quantize(model)
    assert changed == 2
    onnx.checker.check_model(fixed)
    names = {init.name for init in fixed.graph.initializer}
    assert "act_scale_fp32_for_quantize" in names and "w_fp32_for_quantize" in names
    q_inputs = [n.input[0] for n in fixed.graph.node if n.op_type == "QuantizeLinear"]
    assert q_inputs == ["images_fp32_for_quantize", "w_fp32_for_quantize"]
    assert qi.inspect_qdq(fixed)["counts"]["fp16_quantize_inputs"] == 0

    x = np.array([0.06, 0.15, 0.25, -0.06], np.float16).reshape(1, 1, 2, 2)
    exposed = onnx.ModelProto()
    exposed.CopyFrom(fixed)
    exposed.graph.output.append(helper.make_tensor_value_info("act_q_out", TensorProto.INT8, [1, 1, 2, 2]))
    session = ort.InferenceSession(exposed.SerializeToString(), providers=["CPUExecutionProvider"])
    q = session.run(["act_q_out"], {"images": x})[0]
    s16 = np.float32(np.float16(scale))
    np.testing.assert_array_equal(q, np.rint(x.astype(np.float32) / s16).astype(np.int8))


def test_compare_runs_finds_the_first_diverging_tensor():
    model = _conv_qdq_model(TensorProto.FLOAT, 0.02, [0.01, 0.01])
    images = np.random.default_rng(0).random((2, 1, 2, 2), dtype=np.float32)
    same = onnx_compare.compare_runs(model, model, images)
    assert same["images"] == 2 and same["compared"] >= 5 and same["first_diverging"] == []
    assert same["outputs"]["out"]["rel_error"] == 0.0

    changed = _conv_qdq_model(TensorProto.FLOAT, 0.02, [0.01, 0.01], weight=np.array([[[[0.5]]], [[[0.25]]]]))
    result = onnx_compare.compare_runs(model, changed, images, threshold=0.05)
    first = result["first_diverging"][0]
    assert first["tensor"] == "w_q_out" and first["op"] == "QuantizeLinear" and first["node"] == "w_q"
    assert [r["tensor"] for r in result["first_diverging"]] == ["w_q_out", "w_dq_out", "out"]
    assert result["outputs"]["out"]["rel_error"] > 0.05


@pytest.fixture()
def zero_scale_model(tmp_path):
    path = tmp_path / "zero-scale.onnx"
    onnx.save(_conv_qdq_model(TensorProto.FLOAT16, 0.0, [0.01, 1e-6]), path)
    return path


def test_script_writes_json_csv_manifest_and_fails_on_findings(load_script, zero_scale_model, tmp_path, capsys):
    script = load_script(SCRIPT)
    json_out, csv_out = tmp_path / "r.inspect.json", tmp_path / "r.pairs.csv"
    rc = script.main(["--onnx-path", str(zero_scale_model), "--json-out", str(json_out), "--csv-out", str(csv_out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "1 of 2 Q/DQ scales below fp16 min normal" in printed and "affected nodes: conv" in printed
    report = json.loads(json_out.read_text())
    assert report["findings"] is True and report["counts"]["scales_zero_in_fp16"] == 1
    assert report["runtime"]["rounding"] in (qdq_fp16.ROUNDING_NEAREST_EVEN, qdq_fp16.ROUNDING_TOWARD_ZERO)
    rows = list(csv.DictReader(csv_out.open()))
    assert [r["q_node"] for r in rows] == ["act_q", "w_q"] and rows[0]["zero_in_fp16"] == "1"
    manifest = json.loads((tmp_path / "r.inspect.manifest.json").read_text())
    assert manifest["status"] == "ok" and str(zero_scale_model) in manifest["inputs"]

    assert script.main(["--onnx-path", str(zero_scale_model), "--fail-on-findings"]) == 1
    # completed results are not replaced without --overwrite
    assert script.main(["--onnx-path", str(zero_scale_model), "--json-out", str(json_out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "flag"),
    [
        (["--calib-path", "CALIB"], "--calib-path"),  # nothing to compare against
        (["--reference-onnx", "MODEL"], "--reference-onnx"),  # used only with --calib-path
        (["--source-onnx", "MISSING"], "--source-onnx"),
        (["--json-out", "OUT.txt"], "--json-out"),
        (["--write-fp32-quantize", "MODEL"], "--write-fp32-quantize"),  # would overwrite the input
    ],
    ids=["calib-without-reference", "reference-without-calib", "missing-source", "json-suffix", "rewrite-over-input"],
)
def test_script_rejects_bad_input(load_script, zero_scale_model, tmp_path, capsys, extra, flag):
    calib = tmp_path / "calib.npy"
    np.save(calib, np.zeros((1, 1, 2, 2), np.float32))
    subst = {
        "CALIB": str(calib),
        "MODEL": str(zero_scale_model),
        "MISSING": str(tmp_path / "none.onnx"),
        "OUT.txt": str(tmp_path / "out.txt"),
    }
    argv = ["--onnx-path", str(zero_scale_model), *[subst.get(a, a) for a in extra]]
    assert load_script(SCRIPT).main(argv) == 2
    assert capsys.readouterr().err.count("error:") == 1
    with pytest.raises(UserError) as raised:
        load_script(SCRIPT).main.__wrapped__(argv)
    assert raised.value.flag == flag


def test_zero_images_is_a_usage_error(load_script, zero_scale_model, capsys):
    assert load_script(SCRIPT).main(["--onnx-path", str(zero_scale_model), "--num-images", "0"]) == 2
    assert "error: argument --num-images" in capsys.readouterr().err.splitlines()[-1]


def test_script_refuses_a_rewrite_of_an_fp32_model(load_script, tmp_path):
    model = tmp_path / "fp32.onnx"
    onnx.save(_conv_qdq_model(TensorProto.FLOAT, 0.02, [0.01, 0.01]), model)
    out = tmp_path / "fixed.onnx"
    argv = ["--onnx-path", str(model), "--write-fp32-quantize", str(out)]
    assert load_script(SCRIPT).main(argv) == 2
    with pytest.raises(UserError) as raised:  # no float16 QuantizeLinear to rewrite
        load_script(SCRIPT).main.__wrapped__(argv)
    assert raised.value.flag == "--write-fp32-quantize"
    assert not out.exists() and not (tmp_path / "fixed.inspect.manifest.json").exists()


def test_script_rejects_calibration_of_the_wrong_shape(load_script, zero_scale_model, tmp_path, capsys):
    calib = tmp_path / "calib.npy"
    np.save(calib, np.zeros((1, 3, 2, 2), np.float32))
    rc = load_script(SCRIPT).main(
        ["--onnx-path", str(zero_scale_model), "--reference-onnx", str(zero_scale_model), "--calib-path", str(calib)]
    )
    assert rc == 2
    assert "--calib-path" in capsys.readouterr().err


def test_tiny_yolov10_fp16_high_precision(load_script, tiny_yolov10_onnx, tiny_yolov10_spec, tmp_path, capsys):
    """ModelOpt INT8 with fp16 high precision on the tiny fixture: every Q input is fp16, the runtime
    rounding is probed, the dynamic run compares against the FP32 source, the rewrite runs."""
    size = tiny_yolov10_spec["imgsz"]
    calib = tmp_path / "calib.npy"
    np.save(calib, np.random.default_rng(0).random((2, 3, size, size), dtype=np.float32))
    qdq = tmp_path / "tiny-int8-fp16.onnx"
    rc = load_script("scripts/cv-models/quantize_yolov10m_onnx.py").main(
        [
            "--onnx-path",
            str(tiny_yolov10_onnx),
            "--calib-path",
            str(calib),
            "--output-path",
            str(qdq),
            "--high-precision-dtype",
            "fp16",
            "--calibration-method",
            "max",
        ]
    )
    assert rc == 0
    capsys.readouterr()
    json_out, fixed = tmp_path / "tiny.inspect.json", tmp_path / "tiny-fp32q.onnx"
    rc = load_script(SCRIPT).main(
        [
            "--onnx-path",
            str(qdq),
            "--source-onnx",
            str(tiny_yolov10_onnx),
            "--calib-path",
            str(calib),
            "--num-images",
            "1",
            "--json-out",
            str(json_out),
            "--write-fp32-quantize",
            str(fixed),
        ]
    )
    assert rc == 0
    report = json.loads(json_out.read_text())
    counts = report["counts"]
    assert counts["pairs"] > 50 and counts["scales_fp16"] == counts["pairs"]
    assert counts["fp16_quantize_inputs"] == sum(1 for p in report["pairs"] if p["q_node"])
    assert {c["to"] for c in report["casts"]} == {"FLOAT16", "FLOAT"}  # input cast in, output cast out
    assert report["source_comparison"]["matched"] > 50
    dynamic = report["dynamic"]
    assert dynamic["images"] == 1 and dynamic["compared"] > 50
    (output_name,) = dynamic["outputs"]
    assert np.isfinite(dynamic["outputs"][output_name]["rel_error"])
    check = report["fp32_quantize_check"]
    assert check["nodes"] == counts["fp16_quantize_inputs"] and output_name in check["outputs"]
    if report["runtime"]["rounding"] == qdq_fp16.ROUNDING_TOWARD_ZERO:
        assert report["findings"] is True and any("rounds them toward zero" in v for v in report["verdict"])
        assert check["outputs"][output_name] > 0  # truncated vs correctly rounded integers differ
    rewritten = onnx.load(str(fixed))
    assert qi.inspect_qdq(rewritten)["counts"]["fp16_quantize_inputs"] == 0
    assert "first tensors with rel error" in capsys.readouterr().out


def test_calibration_for_a_model_with_dynamic_height_and_width(tmp_path):
    """Dynamic H/W take any size; a wrong channel count or a non-array file is a --calib-path error."""
    from lowbit.errors import UserError

    calib = tmp_path / "calib.npy"
    np.save(calib, np.zeros((2, 3, 16, 24), np.float32))
    assert onnx_compare.load_images(calib, 1, [1, 3, "height", "width"]).shape == (1, 3, 16, 24)
    assert onnx_compare.load_images(calib, 5, ["batch", 3, None, None]).shape == (2, 3, 16, 24)
    np.save(calib, np.zeros((2, 1, 16, 24), np.float32))
    with pytest.raises(UserError) as exc:
        onnx_compare.load_images(calib, 1, [1, 3, "height", "width"])
    assert exc.value.flag == "--calib-path" and "None" not in str(exc.value)
    empty = tmp_path / "empty.npy"
    empty.write_bytes(b"")
    archive = tmp_path / "calib.npz"
    np.savez(archive, x=np.zeros((1, 3, 4, 4), np.float32))
    for bad in (empty, archive):
        with pytest.raises(UserError) as exc:
            onnx_compare.load_images(bad, 1, [1, 3, 4, 4], flag="--calib")
        assert exc.value.flag == "--calib"
