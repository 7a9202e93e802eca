"""ModelOpt INT8/FP8 quantization script and its bash wrapper, on the tiny YOLOv10 fixture."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
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
        ["--onnx-path", str(tiny_yolov10_onnx), "--calib-path", str(calib_npy), "--output-path", str(out),
         "--calibration-eps", "cuda:0", "cpu", "--use-zero-point"]
    )
    assert rc == 0
    return out


def test_int8_output_manifest_and_ort_load(int8_run, tiny_yolov10_onnx, tiny_yolov10_pt):
    manifest = json.loads(int8_run.with_suffix(".manifest.json").read_text())
    # ModelOpt rewrites its input file; the user's model must be untouched (digest taken before quantizing)
    from lowbit.runs import sha256_file

    assert manifest["inputs"][str(tiny_yolov10_onnx)] == sha256_file(tiny_yolov10_onnx)
    assert manifest["status"] == "ok"
    extra = manifest["extra"]
    assert extra["settings"]["high_precision_dtype"] == "fp32"
    assert extra["settings"]["calibration_method"] == "entropy"
    # use_zero_point is passed through but recorded as having no effect outside int4
    assert extra["settings"]["use_zero_point"] is True and extra["settings"]["use_zero_point_effective"] is False
    # no GPU here: the requested cuda:0 must not be reported as used
    assert extra["calibration_eps_used"] == ["CPUExecutionProvider"]
    assert extra["qdq_pairs"] > 50 and extra["num_quantized_nodes"] > 30
    assert any(name.endswith("/Conv") for name in extra["quantized_nodes"])
    assert manifest["outputs"]["modelopt_log"].endswith(".modelopt.log")
    assert Path(manifest["outputs"]["modelopt_log"]).read_text().strip()
    assert not Path(f"{int8_run.with_suffix('')}.work").exists()

    model = onnx.load(str(int8_run))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") >= ops.count("QuantizeLinear")
    # fp32 high precision: no float16 tensors anywhere
    assert all(init.data_type != onnx.TensorProto.FLOAT16 for init in model.graph.initializer)


def test_refuses_to_overwrite(load_script, int8_run, tiny_yolov10_onnx, calib_npy, capsys):
    before = int8_run.stat().st_mtime_ns
    rc = load_script(SCRIPT).main(
        ["--onnx-path", str(tiny_yolov10_onnx), "--calib-path", str(calib_npy), "--output-path", str(int8_run)]
    )
    assert rc == 2
    assert "--overwrite" in capsys.readouterr().err
    assert int8_run.stat().st_mtime_ns == before


def test_exact_patterns_are_anchored(load_script):
    patterns = load_script(SCRIPT).exact_patterns(["/model.2/cv1/conv/Conv"])
    assert re.match(patterns[0], "/model.2/cv1/conv/Conv")
    assert not re.match(patterns[0], "/model.2/cv1/conv/Conv_1")
    assert not re.match(patterns[0], "/model.22/cv1/conv/Conv")
    assert not re.match(patterns[0], "/modelX2/cv1/conv/Conv")


def test_fp8_with_exclusions(tmp_path, load_script, tiny_yolov10_onnx, calib_npy):
    model = onnx.load(str(tiny_yolov10_onnx), load_external_data=False)
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    excluded = convs[:2]
    scheme = tmp_path / "scheme.json"
    scheme.write_text(json.dumps({"nodes_to_exclude": [excluded[1]]}))
    out = tmp_path / "tiny-fp8.onnx"
    rc = load_script(SCRIPT).main(
        ["--onnx-path", str(tiny_yolov10_onnx), "--calib-path", str(calib_npy), "--output-path", str(out),
         "--quantize-mode", "fp8", "--nodes-to-exclude", excluded[0], "--exclude-json", str(scheme)]
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


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_model", "--onnx-path"),
        ("bad_calib_shape", "--calib-path"),
        ("unknown_node", "--nodes-to-exclude"),
        ("int4", "Gemm/MatMul"),
        ("unknown_op_type", "--op-types-to-quantize"),
    ],
)
def test_bad_input_is_one_clear_error(case, message, tmp_path, load_script, tiny_yolov10_onnx, calib_npy, capsys):
    args = {"--onnx-path": str(tiny_yolov10_onnx), "--calib-path": str(calib_npy)}
    extra: list[str] = []
    if case == "missing_model":
        args["--onnx-path"] = str(tmp_path / "nope.onnx")
    elif case == "bad_calib_shape":
        wrong = tmp_path / "wrong.npy"
        np.save(wrong, np.zeros((2, 3, 32, 32), np.float32))
        args["--calib-path"] = str(wrong)
    elif case == "unknown_node":
        extra = ["--nodes-to-exclude", "/model.999/Conv"]
    elif case == "int4":
        extra = ["--quantize-mode", "int4"]
    elif case == "unknown_op_type":
        extra = ["--op-types-to-quantize", "Conv2d"]
    out = tmp_path / "out.onnx"
    argv = [x for kv in args.items() for x in kv] + ["--output-path", str(out), *extra]
    rc = load_script(SCRIPT).main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and err.count("\n") == 1
    assert not out.exists()


def test_wrapper_maps_op_types_to_quantize(tmp_path, tiny_yolov10_onnx, calib_npy):
    result = _wrapper(
        {"RUN_ROOT": str(tmp_path), "CALIB_PATH": str(calib_npy), "ONNX_PATH": str(tiny_yolov10_onnx),
         "OP_TYPES_TO_QUANTIZE": "Conv"},
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
    env.update({"PYTHON": sys.executable}, **env_extra)
    return subprocess.run(["bash", str(WRAPPER)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_wrapper_requires_run_root_and_calib_path(tmp_path):
    result = _wrapper({}, tmp_path)
    assert result.returncode != 0 and "RUN_ROOT is required" in result.stderr


def test_wrapper_rejects_unknown_use_zero_point(tmp_path, calib_npy):
    result = _wrapper({"RUN_ROOT": str(tmp_path), "CALIB_PATH": str(calib_npy), "USE_ZERO_POINT": "maybe"}, tmp_path)
    assert result.returncode == 2 and "USE_ZERO_POINT" in result.stderr
    assert not (tmp_path / "onnx").exists()


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
    assert result.returncode == 0, result.stderr[-2000:]
    out = tmp_path / "onnx" / "yolov10m-int8-qdq.onnx"
    settings = json.loads(out.with_suffix(".manifest.json").read_text())["extra"]["settings"]
    assert settings["calibration_method"] == "max"
    assert settings["use_zero_point"] is False  # the string "False" is a real False, unlike ModelOpt's CLI
    assert settings["calibration_eps_requested"] == ["cuda:0", "cpu"]


def test_fp16_high_precision_records_the_cpu_rounding_hazard(tmp_path, load_script, tiny_yolov10_onnx, calib_npy):
    out = tmp_path / "tiny-int8-fp16.onnx"
    rc = load_script(SCRIPT).main(
        ["--onnx-path", str(tiny_yolov10_onnx), "--calib-path", str(calib_npy), "--output-path", str(out),
         "--high-precision-dtype", "fp16"]
    )
    assert rc == 0
    hazard = json.loads(out.with_suffix(".manifest.json").read_text())["extra"]["fp16_quantize_hazard"]
    from lowbit.qdq_inspect import probe_fp16_quantize_rounding

    if probe_fp16_quantize_rounding()["rounding"] == "nearest_even":
        assert hazard is None  # a fixed onnxruntime: nothing to warn about
    else:
        assert hazard["fp16_quantize_inputs"] > 50 and "float16" in hazard["message"]
