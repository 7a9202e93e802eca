"""ONNX Runtime session construction: provider options, provider checks, Q/DQ detection."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lowbit import ort_session
from lowbit.runs import UserError

TRT, CUDA, CPU = ort_session.TRT, ort_session.CUDA, ort_session.CPU
HAS_NVIDIA_DRIVER = Path("/dev/nvidiactl").exists()


def _conv_model(input_shape=(1, 3, 8, 8), elem_type=TensorProto.FLOAT) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("images", elem_type, list(input_shape))
    y = helper.make_tensor_value_info("out", elem_type, None)
    channels = input_shape[1] if isinstance(input_shape[1], int) else 3
    w = numpy_helper.from_array(np.ones((2, channels, 1, 1), np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["images", "w"], ["out"])], "conv", [x], [y], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _qdq_add_model(dtype: int) -> onnx.ModelProto:
    """images -> (Q/DQ) x2 -> Add -> Q/DQ -> Relu: the DQ-Add-Q pattern ORT fuses into QLinearAdd."""
    nodes, inits = [], []
    for name, src in (("a", "images"), ("b", "images"), ("c", "sum")):
        inits += [
            numpy_helper.from_array(np.array(0.05, np.float32), f"{name}_scale"),
            helper.make_tensor(f"{name}_zp", dtype, [], [0]),
        ]
        nodes += [
            helper.make_node("QuantizeLinear", [src, f"{name}_scale", f"{name}_zp"], [f"{name}_q"]),
            helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_scale", f"{name}_zp"], [f"{name}_dq"]),
        ]
        if name == "b":
            nodes.append(helper.make_node("Add", ["a_dq", "b_dq"], ["sum"]))
    nodes.append(helper.make_node("Relu", ["c_dq"], ["out"]))
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 8, 8])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, 8, 8])
    graph = helper.make_graph(nodes, "qdq_add", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


@pytest.fixture()
def float_model(tmp_path) -> Path:
    path = tmp_path / "float.onnx"
    onnx.save(_conv_model(), path)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# provider options (pure)


def test_trt_options_float_model_with_caches(tmp_path):
    opts = ort_session.provider_options([TRT, CUDA, CPU], tmp_path / "cache", is_qdq=False, is_fp8=False)
    trt, cuda, cpu = opts
    assert trt["trt_fp16_enable"] is True
    assert "trt_int8_enable" not in trt
    assert trt["trt_engine_cache_enable"] is True and trt["trt_timing_cache_enable"] is True
    assert trt["trt_engine_cache_path"] == str(tmp_path / "cache" / "trt_engines")
    assert trt["trt_timing_cache_path"] == str(tmp_path / "cache" / "trt_timing")
    assert cuda["cudnn_conv_algo_search"] == "EXHAUSTIVE" and cuda["do_copy_in_default_stream"] is True
    assert cpu == {}


def test_trt_options_int8_and_fp8_qdq():
    (int8,) = ort_session.provider_options([TRT], None, is_qdq=True, is_fp8=False)
    assert int8["trt_int8_enable"] is True and int8["trt_fp16_enable"] is True
    assert "trt_engine_cache_enable" not in int8  # no cache dir, no cache options
    (fp8,) = ort_session.provider_options([TRT], None, is_qdq=True, is_fp8=True)
    assert fp8["trt_fp16_enable"] is True and "trt_int8_enable" not in fp8
    mixed = ort_session.provider_options_mixed(
        [CUDA, TRT], None, {"is_qdq": True, "is_fp8": True, "quant_dtypes": ["float8e4m3fn", "int8"]}
    )
    assert mixed[1]["trt_int8_enable"] is True and "trt_int8_enable" not in mixed[0]


def test_options_follow_provider_order():
    opts = ort_session.provider_options([CPU, CUDA], None, False, False)
    assert opts[0] == {} and "cudnn_conv_algo_search" in opts[1]


# ---------------------------------------------------------------------------------------------------------------------
# Q/DQ detection


def test_qdq_info_float_int8_fp8(tmp_path):
    assert ort_session.qdq_info(_conv_model()) == {
        "qdq_pairs": 0, "quant_dtypes": [], "is_fp8": False, "is_qdq": False
    }
    int8 = ort_session.qdq_info(_qdq_add_model(TensorProto.INT8))
    assert int8 == {"qdq_pairs": 3, "quant_dtypes": ["int8"], "is_fp8": False, "is_qdq": True}
    path = tmp_path / "fp8.onnx"
    onnx.save(_qdq_add_model(TensorProto.FLOAT8E4M3FN), path)
    fp8 = ort_session.qdq_info(path)
    assert fp8 == {"qdq_pairs": 3, "quant_dtypes": ["float8e4m3fn"], "is_fp8": True, "is_qdq": True}


# ---------------------------------------------------------------------------------------------------------------------
# sessions


def test_cpu_session_records_what_it_did(float_model, tmp_path):
    session, info = ort_session.build_session(float_model, [CPU], cache_dir=tmp_path / "cache")
    assert info["providers_requested"] == [CPU]
    assert info["providers_used"] == [CPU] == session.get_providers()
    assert info["provider_options"] == {CPU: {}}
    assert info["session_config"] == {}
    assert info["graph_optimization_level"] == "ORT_ENABLE_ALL"
    assert info["qdq"]["is_qdq"] is False
    assert ort_session.check_image_input(session, imgsz=8) == ("images", [1, 3, 8, 8], "tensor(float)")


def test_fp8_qdq_model_runs_on_cpu_with_qdq_fusion_off(tmp_path):
    path = tmp_path / "fp8.onnx"
    onnx.save(_qdq_add_model(TensorProto.FLOAT8E4M3FN), path)
    session, info = ort_session.build_session(path, [CPU])
    assert info["session_config"] == {ort_session.CFG_DISABLE_QUANT_QDQ: "1"}
    out = session.run(None, {"images": np.full((1, 3, 8, 8), 0.5, np.float32)})[0]
    assert out.shape == (1, 3, 8, 8) and np.isfinite(out).all()


def test_unknown_provider_is_a_user_error(float_model):
    message = r"--providers: unknown execution provider 'CudaProvider'.*CPUExecutionProvider"
    with pytest.raises(UserError, match=message):
        ort_session.build_session(float_model, ["CudaProvider"])


def test_unavailable_provider_is_a_user_error(float_model, monkeypatch):
    monkeypatch.setattr(ort_session, "available_providers", lambda: [CPU])
    message = r"--x: TensorrtExecutionProvider is not available.*available: CPUExecutionProvider"
    with pytest.raises(UserError, match=message):
        ort_session.build_session(float_model, [TRT, CUDA], flag="--x")


def test_cpu_with_disable_cpu_fallback_is_a_contradiction(float_model):
    with pytest.raises(UserError, match="includes CPUExecutionProvider but --disable-cpu-fallback"):
        ort_session.build_session(float_model, [CUDA, CPU], disable_cpu_fallback=True)


def test_disable_cpu_fallback_sets_the_session_config(float_model, monkeypatch):
    """The session is created with ORT's disable_cpu_ep_fallback entry and without the CPU EP."""
    import onnxruntime as ort

    seen = {}

    class FakeSession:
        def __init__(self, path, sess_options, providers):
            seen["config"] = sess_options.get_session_config_entry(ort_session.CFG_DISABLE_CPU_FALLBACK)
            seen["providers"] = [name for name, _ in providers]
            self._providers = seen["providers"]

        def get_providers(self):
            return self._providers

    monkeypatch.setattr(ort, "InferenceSession", FakeSession)
    _, info = ort_session.build_session(float_model, [TRT, CUDA], disable_cpu_fallback=True)
    assert seen == {"config": "1", "providers": [TRT, CUDA]}
    assert info["session_config"] == {ort_session.CFG_DISABLE_CPU_FALLBACK: "1"}


@pytest.mark.skipif(HAS_NVIDIA_DRIVER, reason="checks the failure path of a machine without an NVIDIA GPU")
def test_gpu_only_request_fails_cleanly_without_a_gpu(float_model):
    with pytest.raises(UserError, match="--disable-cpu-fallback: ONNX Runtime would run nodes"):
        ort_session.build_session(float_model, [CUDA], disable_cpu_fallback=True)
    # without --disable-cpu-fallback ORT's Python wrapper silently retries on CPU: still an error here
    with pytest.raises(UserError, match="could not create CUDAExecutionProvider"):
        ort_session.build_session(float_model, [CUDA, CPU])


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_NVIDIA_DRIVER, reason="needs an NVIDIA GPU with CUDA/cuDNN libraries")
def test_gpu_only_session_on_a_gpu(float_model, tmp_path):
    _, info = ort_session.build_session(float_model, [CUDA], disable_cpu_fallback=True)
    assert info["providers_used"] == [CUDA]


def test_not_an_onnx_model_names_the_path(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"definitely not protobuf")
    with pytest.raises(UserError, match=f"{bad}"):
        ort_session.build_session(bad, [CPU])


@pytest.mark.parametrize(
    "shape, elem_type, message",
    [
        ((1, 1, 8, 8), TensorProto.FLOAT, r"shape \[1, 1, 8, 8\]; expected \[1,3,H,W\]"),
        ((2, 3, 8, 8), TensorProto.FLOAT, r"shape \[2, 3, 8, 8\]"),
        ((1, 3, 8), TensorProto.FLOAT, r"shape \[1, 3, 8\]"),
        ((1, 3, 8, 8), TensorProto.DOUBLE, r"type tensor\(double\)"),
    ],
)
def test_input_validator_names_the_shape(tmp_path, shape, elem_type, message):
    x = helper.make_tensor_value_info("images", elem_type, list(shape))
    y = helper.make_tensor_value_info("out", elem_type, list(shape))
    graph = helper.make_graph([helper.make_node("Identity", ["images"], ["out"])], "g", [x], [y])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    session, _ = ort_session.build_session(path, [CPU])
    with pytest.raises(UserError, match=message):
        ort_session.check_image_input(session, model_path=path)


def test_input_validator_checks_imgsz(float_model):
    session, _ = ort_session.build_session(float_model, [CPU])
    with pytest.raises(UserError, match="--imgsz 640 does not match .* pass --imgsz 8"):
        ort_session.check_image_input(session, imgsz=640)
    symbolic = _conv_model(("batch", 3, "h", "w"))
    import onnxruntime as ort

    sym_session = ort.InferenceSession(symbolic.SerializeToString(), providers=[CPU])
    assert ort_session.check_image_input(sym_session, imgsz=640)[1] == ["batch", 3, "h", "w"]
