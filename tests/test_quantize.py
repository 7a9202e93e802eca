"""ModelOpt INT8/FP8 quantization script and its bash wrapper, on the tiny YOLOv10 fixture."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest

from lowbit.qdq_graph import tensor_consumers

REPO = Path(__file__).resolve().parent.parent
SCRIPT = "scripts/cv-models/quantize_yolov10m_onnx.py"
WRAPPER = REPO / "scripts/cv-models/quantize_yolov10m_int8_onnx.sh"


@pytest.fixture(scope="module")
def calib_npy(tmp_path_factory, tiny_yolov10_spec) -> Path:
    size = tiny_yolov10_spec["imgsz"]
    path = tmp_path_factory.mktemp("calib") / "calib.npy"
    np.save(path, np.random.default_rng(0).random((4, 3, size, size), dtype=np.float32))
    return path


@pytest.fixture(scope="module")
def int8_run(tmp_path_factory, load_script, tiny_yolov10_onnx, calib_npy):
    out = tmp_path_factory.mktemp("q") / "onnx" / "tiny-int8-qdq.onnx"
    rc = load_script(SCRIPT).main(
        [
            "--onnx-path",
            str(tiny_yolov10_onnx),
            "--calib-path",
            str(calib_npy),
            "--output-path",
            str(out),
            "--calibration-eps",
            "cpu",
            "--use-zero-point",
        ]
    )
    assert rc == 0
    return out


def test_int8_output_manifest_and_ort_load(int8_run, tiny_yolov10_onnx, tiny_yolov10_pt):
    manifest = json.loads(int8_run.with_suffix(".manifest.json").read_text())
    # ModelOpt rewrites its input file; the user's model must be untouched (digest taken before quantizing)
    from lowbit.runs import sha256_file

    assert manifest["inputs"][str(tiny_yolov10_onnx)] == sha256_file(tiny_yolov10_onnx)
    assert manifest["status"] == "ok" and manifest["kind"] == "quantize"
    extra = manifest["extra"]
    from lowbit.quantize import resolve_high_precision_dtype

    # the default "auto": fp32 on an onnxruntime that truncates float16 QuantizeLinear (1.24), fp16 on one that rounds
    assert extra["settings"]["high_precision_dtype_requested"] == "auto"
    assert extra["settings"]["high_precision_dtype"] == resolve_high_precision_dtype("auto")[0]
    assert extra["settings"]["calibration_method"] == "entropy"
    # use_zero_point is passed through but recorded as having no effect outside int4
    assert extra["settings"]["use_zero_point"] is True and extra["settings"]["use_zero_point_effective"] is False
    assert extra["calibration_eps_used"] == ["CPUExecutionProvider"]
    assert extra["qdq_pairs"] > 50 and extra["num_quantized_nodes"] > 30
    assert any(name.endswith("/Conv") for name in extra["quantized_nodes"])
    assert manifest["outputs"]["modelopt_log"].endswith(".modelopt.log")
    assert Path(manifest["outputs"]["modelopt_log"]).read_text().strip()
    assert not Path(f"{int8_run.with_suffix('')}.work").exists()
    assert extra["folded_bias_dequantize"] == []  # ModelOpt keeps this model's conv biases in float

    model = onnx.load(str(int8_run))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") >= ops.count("QuantizeLinear")
    # fp32 high precision: no float16 tensors anywhere; fp16: the weights are stored in float16
    has_fp16 = any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer)
    assert has_fp16 == (extra["settings"]["high_precision_dtype"] == "fp16")


def test_refuses_to_overwrite(load_script, int8_run, tiny_yolov10_onnx, calib_npy, capsys):
    before = int8_run.stat().st_mtime_ns
    rc = load_script(SCRIPT).main(
        ["--onnx-path", str(tiny_yolov10_onnx), "--calib-path", str(calib_npy), "--output-path", str(int8_run)]
    )
    assert rc == 2
    assert "--overwrite" in capsys.readouterr().err
    assert int8_run.stat().st_mtime_ns == before


def test_exact_patterns_are_anchored():
    from lowbit.quantize import exact_patterns

    patterns = exact_patterns(["/model.2/cv1/conv/Conv"])
    assert re.match(patterns[0], "/model.2/cv1/conv/Conv")
    assert not re.match(patterns[0], "/model.2/cv1/conv/Conv_1")
    assert not re.match(patterns[0], "/model.22/cv1/conv/Conv")
    assert not re.match(patterns[0], "/modelX2/cv1/conv/Conv")


def test_fp8_with_exclusions(tmp_path, load_script, tiny_yolov10_onnx, calib_npy):
    model = onnx.load(str(tiny_yolov10_onnx), load_external_data=False)
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    excluded = convs[:2]
    scheme = tmp_path / "scheme.json"
    scheme.write_text(json.dumps({"k": 1, "nodes_to_exclude": [excluded[1]]}))
    out = tmp_path / "tiny-fp8.onnx"
    rc = load_script(SCRIPT).main(
        [
            "--onnx-path",
            str(tiny_yolov10_onnx),
            "--calib-path",
            str(calib_npy),
            "--output-path",
            str(out),
            "--quantize-mode",
            "fp8",
            "--nodes-to-exclude",
            excluded[0],
            "--exclude-json",
            str(scheme),
        ]
    )
    assert rc == 0
    extra = json.loads(out.with_suffix(".manifest.json").read_text())["extra"]
    assert extra["settings"]["calibration_method"] == "max"
    assert extra["excluded_nodes"] == excluded
    assert not set(excluded) & set(extra["quantized_nodes"])
    assert len(extra["quantized_nodes"]) > 10
    quant = onnx.load(str(out))
    fp8 = onnx.TensorProto.FLOAT8E4M3FN
    assert any(init.data_type == fp8 for init in quant.graph.initializer)
    # the validation session needed the FP8 session option, and recorded it
    assert extra["validation"]["session"]["session_config"].get("session.disable_quant_qdq") == "1"


def test_wrapper_maps_op_types_to_quantize(tmp_path, tiny_yolov10_onnx, calib_npy):
    result = _wrapper(
        {
            "RUN_ROOT": str(tmp_path),
            "CALIB_PATH": str(calib_npy),
            "ONNX_PATH": str(tiny_yolov10_onnx),
            "OP_TYPES_TO_QUANTIZE": "Conv",
        },
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = tmp_path / "onnx" / "yolov10m-int8-qdq.onnx"
    settings = json.loads(out.with_suffix(".manifest.json").read_text())["extra"]["settings"]
    assert settings["op_types_to_quantize"] == ["Conv"]
    graph = onnx.load(str(out)).graph
    # ModelOpt quantizes a tensor, not an edge: a DQ output may also reach the Add/Concat beside a Conv,
    # but every Q/DQ pair must exist for a Conv
    consumers = tensor_consumers(graph)
    dqs = [n for n in graph.node if n.op_type == "DequantizeLinear"]
    assert dqs and all(any(c.op_type == "Conv" for c in consumers.get(n.output[0], [])) for n in dqs)


def _wrapper(env_extra: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RUN_ROOT", "CALIB_PATH", "USE_ZERO_POINT")}
    env.update({"PYTHON": sys.executable})
    env.update(env_extra)
    return subprocess.run(
        ["bash", str(WRAPPER)], check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


def test_wrapper_requires_run_root_and_calib_path(tmp_path):
    result = _wrapper({}, tmp_path)
    assert result.returncode != 0 and "RUN_ROOT is required" in result.stderr


@pytest.mark.parametrize("var", ["USE_ZERO_POINT", "OVERWRITE"])
def test_wrapper_rejects_a_non_boolean(var, tmp_path, calib_npy):
    result = _wrapper({"RUN_ROOT": str(tmp_path), "CALIB_PATH": str(calib_npy), var: "maybe"}, tmp_path)
    assert result.returncode == 2 and var in result.stderr
    assert not (tmp_path / "onnx").exists()


@pytest.mark.parametrize(
    "value, passed", [("true", True), ("YES", True), ("1", True), ("false", False), ("0", False), ("", False)]
)
def test_wrapper_maps_boolean_spellings(value, passed, tmp_path):
    # PYTHON=echo: the wrapper prints the command it would run, so the mapping is checked without quantizing
    result = _wrapper(
        {
            "RUN_ROOT": str(tmp_path),
            "CALIB_PATH": "c.npy",
            "OVERWRITE": value,
            "USE_ZERO_POINT": value,
            "PYTHON": "echo",
        },
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    argv = result.stdout.split()
    assert ("--overwrite" in argv) is passed
    assert ("--use-zero-point" in argv) is passed and ("--no-use-zero-point" in argv) is not passed


def test_wrapper_maps_card_env_vars(tmp_path, tiny_yolov10_onnx, calib_npy):
    result = _wrapper(
        {
            "RUN_ROOT": str(tmp_path),
            "CALIB_PATH": str(calib_npy),
            "ONNX_PATH": str(tiny_yolov10_onnx),
            "CALIBRATION_METHOD": "max",
            "USE_ZERO_POINT": "False",
            "CALIBRATION_EPS": "cuda:0 cpu",
        },
        tmp_path,
    )
    out = tmp_path / "onnx" / "yolov10m-int8-qdq.onnx"
    from lowbit import ort_providers

    if not ort_providers.probe_provider_library(ort_providers.CUDA).ok:
        # no loadable CUDA EP: the mapped --calibration-eps is refused before anything is written
        assert result.returncode == 2 and "--calibration-eps" in result.stderr and not out.exists()
        return
    assert result.returncode == 0, result.stderr[-2000:]
    settings = json.loads(out.with_suffix(".manifest.json").read_text())["extra"]["settings"]
    assert settings["calibration_method"] == "max"
    assert settings["use_zero_point"] is False  # the string "False" is a real False, unlike ModelOpt's CLI
    assert settings["calibration_eps_requested"] == ["cuda:0", "cpu"]


def test_fp16_high_precision_records_the_cpu_rounding_hazard(tmp_path, load_script, tiny_yolov10_onnx, calib_npy):
    out = tmp_path / "tiny-int8-fp16.onnx"
    rc = load_script(SCRIPT).main(
        [
            "--onnx-path",
            str(tiny_yolov10_onnx),
            "--calib-path",
            str(calib_npy),
            "--output-path",
            str(out),
            "--high-precision-dtype",
            "fp16",
        ]
    )
    assert rc == 0
    hazard = json.loads(out.with_suffix(".manifest.json").read_text())["extra"]["fp16_quantize_hazard"]
    from lowbit.qdq_fp16 import probe_fp16_quantize_rounding

    if probe_fp16_quantize_rounding()["rounding"] == "nearest_even":
        assert hazard is None  # a fixed onnxruntime: nothing to warn about
    else:
        assert hazard["fp16_quantize_inputs"] > 50 and "float16" in hazard["message"]


# --- int32 bias DequantizeLinear folding -------------------------------------------------------


def _int32_bias_qdq_model(zero_point: bool = False, output_qdq: bool = False) -> onnx.ModelProto:
    """x -> Q/DQ (int8) -> Conv(DQ int8 per-channel weight, DQ int32 per-channel bias) [-> Q/DQ] -> y.

    With ``output_qdq`` the Conv is a full DQ -> Conv -> Q group, the pattern ORT's CPU EP may fuse.
    """
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    out_ch, in_ch = 4, 3
    weight_q = rng.integers(-127, 128, (out_ch, in_ch, 3, 3), dtype=np.int8)
    weight_scale = rng.uniform(0.01, 0.05, out_ch).astype(np.float32)
    bias_scale = (weight_scale * np.float32(0.02)).astype(np.float32)
    bias_q = rng.integers(-(2**20), 2**20, out_ch, dtype=np.int32)
    inits = [
        numpy_helper.from_array(np.array(0.02, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "x_zp"),
        numpy_helper.from_array(weight_q, "w_q"),
        numpy_helper.from_array(weight_scale, "w_scale"),
        numpy_helper.from_array(bias_q, "b_q"),
        numpy_helper.from_array(bias_scale, "b_scale"),
    ]
    bias_inputs = ["b_q", "b_scale"]
    if zero_point:
        inits.append(numpy_helper.from_array(rng.integers(-50, 50, out_ch, dtype=np.int32), "b_zp"))
        bias_inputs.append("b_zp")
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"], name="x_q"),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"], name="x_dq"),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w"], name="w_dq", axis=0),
        helper.make_node("DequantizeLinear", bias_inputs, ["b"], name="/conv/Conv_bias_dq", axis=0),
        helper.make_node(
            "Conv", ["x_dq", "w", "b"], ["y_f" if output_qdq else "y"], name="/conv/Conv", pads=[1, 1, 1, 1]
        ),
    ]
    if output_qdq:
        inits += [
            numpy_helper.from_array(np.array(0.05, np.float32), "y_scale"),
            numpy_helper.from_array(np.array(0, np.int8), "y_zp"),
        ]
        nodes += [
            helper.make_node("QuantizeLinear", ["y_f", "y_scale", "y_zp"], ["y_q"], name="y_q"),
            helper.make_node("DequantizeLinear", ["y_q", "y_scale", "y_zp"], ["y"], name="y_dq"),
        ]
    graph = helper.make_graph(
        nodes,
        "int32_bias",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, in_ch, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, out_ch, 8, 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def _run(model: onnx.ModelProto, x: np.ndarray, optimize: bool) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("zero_point, output_qdq", [(False, False), (True, False), (False, True)])
def test_fold_int32_bias_dequantize_keeps_the_outputs(zero_point, output_qdq):
    from lowbit.qdq_edit import fold_int32_bias_dequantize

    model = _int32_bias_qdq_model(zero_point, output_qdq)
    x = np.random.default_rng(1).uniform(-1, 1, (1, 3, 8, 8)).astype(np.float32)
    before = {opt: _run(model, x, opt) for opt in (False, True)}

    folded = fold_int32_bias_dequantize(model)
    assert folded == ["/conv/Conv_bias_dq"]
    onnx.checker.check_model(model)
    names = {n.name for n in model.graph.node}
    assert "/conv/Conv_bias_dq" not in names and {"x_q", "x_dq", "w_dq"} <= names  # int8 Q/DQ untouched
    inits = {i.name: i for i in model.graph.initializer}
    assert inits["b"].data_type == onnx.TensorProto.FLOAT
    assert not {"b_q", "b_scale", "b_zp"} & set(inits)  # the int32 source and its scale are gone
    for opt in (False, True):
        np.testing.assert_array_equal(_run(model, x, opt), before[opt])
    assert fold_int32_bias_dequantize(model) == []  # idempotent


@pytest.mark.parametrize("scale_type", [np.float32, np.float16])
@pytest.mark.parametrize("per_axis", [True, False])
@pytest.mark.parametrize("zero_point", [False, True])
def test_fold_int32_bias_dequantize_is_ort_arithmetic_bit_for_bit(scale_type, per_axis, zero_point):
    """The folded bias is ``float32(q - zero_point) * float32(scale)``, rounded to float32 and then to the scale's type,
    as ORT's DequantizeLinear kernel computes it: bit for bit, int32 values beyond 2**24 included. A zero point here is
    zeros, as ORT's quantizer writes it (per axis: one per channel; per tensor: a scalar beside a [1] scale)."""
    from onnx import TensorProto, helper, numpy_helper

    from lowbit.qdq_edit import fold_int32_bias_dequantize

    rng = np.random.default_rng(3)
    n = 4096
    q = rng.integers(-(2**31), 2**31 - 1, n, dtype=np.int64).astype(np.int32)
    q[: n // 2] = rng.integers(-(2**20), 2**20, n // 2)  # typical bias magnitudes too
    high = 2e-5 if scale_type == np.float16 else 1e-2  # float16 products stay below 65504
    scale = rng.uniform(high / 100, high, n if per_axis else 1).astype(scale_type)
    inits = [numpy_helper.from_array(q, "b_q"), numpy_helper.from_array(scale, "b_scale")]
    if zero_point:
        inits.append(numpy_helper.from_array(np.zeros(n if per_axis else (), np.int32), "b_zp"))
    dq_inputs = ["b_q", "b_scale"] + (["b_zp"] if zero_point else [])
    elem = TensorProto.FLOAT16 if scale_type == np.float16 else TensorProto.FLOAT
    nodes = [
        helper.make_node("DequantizeLinear", dq_inputs, ["b"], name="b_dq", axis=0),
        helper.make_node("Add", ["x", "b"], ["y"], name="add"),
    ]
    io = [helper.make_tensor_value_info("x", elem, [n])], [helper.make_tensor_value_info("y", elem, [n])]
    graph = helper.make_graph(nodes, "bias", *io, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    assert fold_int32_bias_dequantize(model) == ["b_dq"]
    (folded,) = [numpy_helper.to_array(i) for i in model.graph.initializer if i.name == "b"]
    expected = (q.astype(np.int64).astype(np.float32) * scale.astype(np.float32)).astype(scale_type)
    assert folded.dtype == scale_type
    np.testing.assert_array_equal(folded.view(f"u{folded.itemsize}"), expected.view(f"u{expected.itemsize}"))
    assert [i.name for i in model.graph.initializer] == ["b"]  # the int32 source, scale and zero point are gone


def test_quantize_onnx_records_folded_nodes(tmp_path, monkeypatch):
    """The pipeline around ModelOpt: fold, verify, publish, manifest (ModelOpt replaced by a fixed Q/DQ model)."""
    from lowbit import quantize, quantize_modelopt

    fp32 = _int32_bias_qdq_model()
    source = tmp_path / "fp32.onnx"
    onnx.save(fp32, str(source))  # validation reads only the graph's nodes and input shape
    calib = tmp_path / "calib.npy"
    np.save(calib, np.random.default_rng(0).random((2, 3, 8, 8), dtype=np.float32))

    def fake_modelopt(settings, calib, method, nodes_to_exclude, work_input, work_output, log_file):
        log_file.write_text("modelopt log\n")
        onnx.save(_int32_bias_qdq_model(), str(work_output))
        return 0.1

    monkeypatch.setattr(quantize_modelopt, "run_modelopt", fake_modelopt)
    monkeypatch.setattr(quantize_modelopt, "calibration_eps_used", lambda path, eps: ["CPUExecutionProvider"])
    out = tmp_path / "out" / "model-int8.onnx"
    result = quantize.quantize_onnx(quantize.QuantizeSettings(onnx_path=source, calib_path=calib, output_path=out))
    assert isinstance(result, quantize.QuantizeResult)
    assert result.output_path == out and out.is_file()
    assert result.folded_bias_nodes == ["/conv/Conv_bias_dq"] and result.qdq_pairs == 1
    manifest = json.loads(result.manifest_path.read_text())
    assert manifest["status"] == "ok" and manifest["extra"]["folded_bias_dequantize"] == ["/conv/Conv_bias_dq"]
    assert not any(n.op_type == "DequantizeLinear" and n.input[0] == "b_q" for n in onnx.load(str(out)).graph.node)
    assert not Path(f"{out.with_suffix('')}.work").exists()


def test_failure_inside_the_pipeline_leaves_no_model_and_no_work_folder(
    tmp_path, monkeypatch, tiny_yolov10_onnx, calib_npy
):
    from lowbit import quantize, quantize_modelopt

    def broken_modelopt(*args):
        raise RuntimeError("ModelOpt failed")

    monkeypatch.setattr(quantize_modelopt, "run_modelopt", broken_modelopt)
    out = tmp_path / "m.onnx"
    with pytest.raises(RuntimeError):
        quantize.quantize_onnx(quantize.QuantizeSettings(tiny_yolov10_onnx, calib_npy, out))
    assert not out.exists() and not (tmp_path / "m.work").exists()
    assert json.loads((tmp_path / "m.manifest.json").read_text())["status"] == "failed"


# --- bad inputs: each names its flag and leaves nothing behind ---------------------------------


def _bad_calib(kind: str, path: Path, size: int) -> Path:
    good = np.random.default_rng(0).random((2, 3, size, size), dtype=np.float32)
    if kind == "calib_nan":
        good[1, 0, 3, 3] = np.nan
        np.save(path, good)
    elif kind == "calib_inf":
        good[0, 2, 0, 0] = np.inf
        np.save(path, good)
    elif kind == "calib_npz":
        with open(path, "wb") as f:  # an .npz archive under a .npy name, as a mistaken --calib-path is
            np.savez(f, calib=good)
    elif kind == "calib_empty_file":
        path.write_bytes(b"")
    elif kind == "calib_truncated":
        np.save(path, good)
        path.write_bytes(path.read_bytes()[:1000])
    elif kind == "calib_float64":
        np.save(path, good.astype(np.float64))
    elif kind == "calib_rank3":
        np.save(path, good[0])
    elif kind == "calib_one_channel":
        np.save(path, good[:, :1])
    elif kind == "calib_wrong_size":
        np.save(path, np.zeros((2, 3, 32, 32), np.float32))
    elif kind == "calib_no_images":
        np.save(path, good[:0])
    return path


BAD_INPUTS = {
    # case: expected flag
    "missing_model": "--onnx-path",
    "zero_byte_model": "--onnx-path",
    "model_is_a_folder": "--onnx-path",
    "model_with_dynamic_hw": "--onnx-path",
    "output_is_a_folder": "--output-path",
    "output_parent_is_a_file": "--output-path",
    "output_not_onnx": "--output-path",
    "output_parent_unwritable": "--output-path",
    "output_exists": "--overwrite",
    "int4": "--quantize-mode",
    "unknown_node": "--nodes-to-exclude",
    "exclude_json_without_list": "--exclude-json",
    "unknown_op_type": "--op-types-to-quantize",
    "unknown_calibration_ep": "--calibration-eps",
    "max_calib_images_zero": "--max-calib-images",
    "calib_missing": "--calib-path",
    "calib_nan": "--calib-path",
    "calib_inf": "--calib-path",
    "calib_npz": "--calib-path",
    "calib_empty_file": "--calib-path",
    "calib_truncated": "--calib-path",
    "calib_float64": "--calib-path",
    "calib_rank3": "--calib-path",
    "calib_one_channel": "--calib-path",
    "calib_wrong_size": "--calib-path",
    "calib_no_images": "--calib-path",
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_names_its_flag_before_any_work(
    case, tmp_path, monkeypatch, tiny_yolov10_onnx, calib_npy, tiny_yolov10_spec
):
    from lowbit import quantize, quantize_modelopt
    from lowbit.errors import UserError

    monkeypatch.setattr(
        quantize_modelopt, "run_modelopt", lambda *a: pytest.fail("validation must come before ModelOpt")
    )
    out = tmp_path / "run" / "out.onnx"
    fields: dict = {}
    if case == "missing_model":
        fields["onnx_path"] = tmp_path / "nope.onnx"
    elif case == "zero_byte_model":
        (tmp_path / "empty.onnx").write_bytes(b"")
        fields["onnx_path"] = tmp_path / "empty.onnx"
    elif case == "model_is_a_folder":
        fields["onnx_path"] = tmp_path
    elif case == "model_with_dynamic_hw":
        model = onnx.load(str(tiny_yolov10_onnx))
        for dim, name in zip(model.graph.input[0].type.tensor_type.shape.dim[2:], ("height", "width")):
            dim.dim_param = name
        onnx.save(model, str(tmp_path / "dynamic.onnx"))
        fields["onnx_path"] = tmp_path / "dynamic.onnx"
    elif case == "output_is_a_folder":
        out.mkdir(parents=True)
        fields["overwrite"] = True
    elif case == "output_parent_is_a_file":
        (tmp_path / "run").write_text("a file")
        out = tmp_path / "run" / "sub" / "out.onnx"
    elif case == "output_not_onnx":
        out = tmp_path / "run" / "out.onx"
    elif case == "output_parent_unwritable":  # tests may run as root, which ignores folder modes
        monkeypatch.setattr(os, "access", lambda path, mode: False)
    elif case == "output_exists":
        out.parent.mkdir()
        out.write_bytes(b"old")
    elif case == "int4":
        fields["quantize_mode"] = "int4"
    elif case == "unknown_node":
        fields["nodes_to_exclude"] = ["/model.999/Conv"]
    elif case == "exclude_json_without_list":
        (tmp_path / "scheme.json").write_text('{"layers": []}')
        fields["exclude_json"] = tmp_path / "scheme.json"
    elif case == "unknown_op_type":
        fields["op_types_to_quantize"] = ["Conv2d"]
    elif case == "unknown_calibration_ep":
        fields["calibration_eps"] = ["gpu"]
    elif case == "max_calib_images_zero":
        fields["max_calib_images"] = 0
    elif case == "calib_missing":
        fields["calib_path"] = tmp_path / "nope.npy"
    else:
        fields["calib_path"] = _bad_calib(case, tmp_path / "bad.npy", tiny_yolov10_spec["imgsz"])
    settings = quantize.QuantizeSettings(
        **{"onnx_path": tiny_yolov10_onnx, "calib_path": calib_npy, "output_path": out, **fields}
    )
    with pytest.raises(UserError) as info:
        quantize.quantize_onnx(settings)
    assert info.value.flag == BAD_INPUTS[case]
    written = [p for p in tmp_path.rglob("*") if p.name.startswith("out")]
    assert written == ([out] if case in ("output_exists", "output_is_a_folder") else [])


@pytest.mark.parametrize("method", ["max", "entropy"])
def test_nan_calibration_fails_in_the_cli_without_artifacts(
    method, tmp_path, load_script, tiny_yolov10_onnx, tiny_yolov10_spec, capsys
):
    calib = _bad_calib("calib_nan", tmp_path / "nan.npy", tiny_yolov10_spec["imgsz"])
    out = tmp_path / "q" / "out.onnx"
    rc = load_script(SCRIPT).main(
        [
            "--onnx-path",
            str(tiny_yolov10_onnx),
            "--calib-path",
            str(calib),
            "--output-path",
            str(out),
            "--calibration-method",
            method,
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "--calib-path" in err and err.count("\n") == 1
    assert not (tmp_path / "q").exists()  # no model, no .work/, no manifest


@pytest.mark.parametrize(
    "argv", [["--max-calib-images", "0"], ["--quantize-mode", "int2"], ["--exclude-json", "/nonexistent.json"]]
)
def test_cli_value_errors_name_the_flag(argv, tmp_path, load_script, tiny_yolov10_onnx, calib_npy, capsys):
    out = tmp_path / "out.onnx"
    rc = load_script(SCRIPT).main(
        ["--onnx-path", str(tiny_yolov10_onnx), "--calib-path", str(calib_npy), "--output-path", str(out), *argv]
    )
    assert rc == 2 and argv[0] in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_cli_output_under_a_file_is_one_line(tmp_path, tiny_yolov10_onnx, calib_npy):
    (tmp_path / "file").write_text("x")
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / SCRIPT),
            "--onnx-path",
            str(tiny_yolov10_onnx),
            "--calib-path",
            str(calib_npy),
            "--output-path",
            str(tmp_path / "file" / "out.onnx"),
        ],
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 2 and "--output-path" in result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1


@pytest.mark.parametrize(
    "rounding, expected", [("nearest_even", "fp16"), ("toward_zero", "fp32"), ("unavailable", "fp32")]
)
def test_auto_high_precision_follows_the_runtime_rounding(monkeypatch, rounding, expected):
    from lowbit import qdq_fp16, quantize

    monkeypatch.setattr(qdq_fp16, "probe_fp16_quantize_rounding", lambda: {"onnxruntime": "x", "rounding": rounding})
    assert quantize.resolve_high_precision_dtype("auto")[0] == expected
    assert quantize.resolve_high_precision_dtype("bf16") == ("bf16", "requested")


def test_auto_high_precision_is_fp32_on_a_truncating_onnxruntime():
    """This environment's verdict, from the real probe: fp16 only where float16 QuantizeLinear rounds correctly."""
    from lowbit.qdq_fp16 import probe_fp16_quantize_rounding
    from lowbit.quantize import resolve_high_precision_dtype

    rounding = probe_fp16_quantize_rounding()["rounding"]
    dtype, reason = resolve_high_precision_dtype("auto")
    assert dtype == ("fp16" if rounding == "nearest_even" else "fp32") and rounding in reason


def test_threaded_histograms_give_the_serial_model(tmp_path, monkeypatch, tiny_yolov10_onnx, calib_npy):
    """Entropy calibration with histograms built in threads writes the same bytes as the serial collector."""
    from onnxruntime.quantization.calibrate import HistogramCollector

    from lowbit import quantize, quantize_modelopt

    serial_collect = HistogramCollector.collect
    calls = []
    real = quantize_modelopt.tensor_parallel_histograms

    def counting(threads):
        calls.append(threads)
        return real(threads)

    monkeypatch.setattr(quantize_modelopt, "tensor_parallel_histograms", counting)
    histogram_threads = set()
    np_histogram = np.histogram

    def histogram(*args, **kwargs):
        histogram_threads.add(threading.current_thread().name.split("_")[0])
        return np_histogram(*args, **kwargs)

    monkeypatch.setattr(np, "histogram", histogram)
    digests = {}
    for threads in (1, 3):
        monkeypatch.setattr(quantize_modelopt, "HISTOGRAM_THREADS", threads)
        out = tmp_path / f"t{threads}" / "tiny-int8.onnx"
        settings = quantize.QuantizeSettings(
            onnx_path=tiny_yolov10_onnx, calib_path=calib_npy, output_path=out, calibration_method="entropy"
        )
        quantize.quantize_onnx(settings)
        digests[threads] = hashlib.sha256(out.read_bytes()).hexdigest()
        assert HistogramCollector.collect is serial_collect  # restored
    assert calls == [1, 3]
    assert histogram_threads == {"MainThread", "histogram"}  # the serial run, then the pool's threads
    assert digests[1] == digests[3]
