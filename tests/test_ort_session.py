"""ONNX Runtime session construction (lowbit.ort_session): provider options, the provider checks and library probes
as build_session reports them, node placement, model inputs."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_ort_providers import fails, loads, probe_or_skip

from lowbit import model_input, ort_providers, ort_session
from lowbit.errors import UserError

TRT, CUDA, CPU = ort_session.TRT, ort_session.CUDA, ort_session.CPU
HAS_NVIDIA_DRIVER = Path("/dev/nvidiactl").exists()
LIBRARY = re.compile(r"lib[\w.+-]+\.so\.\d+")


def _conv_model(input_shape=(1, 3, 8, 8), elem_type=TensorProto.FLOAT) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("images", elem_type, list(input_shape))
    y = helper.make_tensor_value_info("out", elem_type, None)
    channels = input_shape[1] if isinstance(input_shape[1], int) else 3
    w = numpy_helper.from_array(np.ones((2, channels, 1, 1), np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["images", "w"], ["out"])], "conv", [x], [y], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


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


def test_cudnn_search_reaches_the_cuda_options_only():
    trt, cuda, cpu = ort_session.provider_options_mixed(
        [TRT, CUDA, CPU], None, {"is_qdq": True, "is_fp8": False}, cudnn_conv_algo_search="HEURISTIC"
    )
    assert cuda["cudnn_conv_algo_search"] == "HEURISTIC"
    assert "cudnn_conv_algo_search" not in trt and cpu == {}


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
    assert model_input.check_image_input(session, imgsz=8) == ("images", [1, 3, 8, 8], "tensor(float)")


def test_fp8_qdq_model_runs_on_cpu_with_qdq_fusion_off(tmp_path, qdq_add_model):
    path = tmp_path / "fp8.onnx"
    onnx.save(qdq_add_model(TensorProto.FLOAT8E4M3FN), path)
    session, info = ort_session.build_session(path, [CPU])
    assert info["session_config"] == {ort_session.CFG_DISABLE_QUANT_QDQ: "1"}
    out = session.run(None, {"images": np.full((1, 3, 8, 8), 0.5, np.float32)})[0]
    assert out.shape == (1, 3, 8, 8) and np.isfinite(out).all()


def test_unknown_provider_is_a_user_error(float_model):
    with pytest.raises(UserError) as exc:
        ort_session.build_session(float_model, ["CudaProvider"])
    assert exc.value.flag == "--providers"


def test_unavailable_provider_is_a_user_error(float_model, monkeypatch):
    monkeypatch.setattr(ort_providers, "available_providers", lambda: [CPU])
    with pytest.raises(UserError) as exc:
        ort_session.build_session(float_model, [TRT, CUDA], flag="--x")
    assert exc.value.flag == "--x" and TRT in str(exc.value)


def test_cpu_with_disable_cpu_fallback_is_a_contradiction(float_model):
    with pytest.raises(UserError) as exc:
        ort_session.build_session(float_model, [CUDA, CPU], disable_cpu_fallback=True, probe=loads)
    assert exc.value.flag == "--providers"


def test_disable_cpu_fallback_sets_the_session_config(float_model, monkeypatch):
    """The session is created with ORT's disable_cpu_ep_fallback entry, without the CPU EP, without ORT's retry."""
    import onnxruntime as ort

    seen = {}

    class FakeSession:
        def __init__(self, path, sess_options, providers, enable_fallback=1):
            seen["config"] = sess_options.get_session_config_entry(ort_session.CFG_DISABLE_CPU_FALLBACK)
            seen["providers"] = [name for name, _ in providers]
            seen["enable_fallback"] = enable_fallback
            self._providers = seen["providers"]

        def get_providers(self):
            return self._providers

    monkeypatch.setattr(ort, "InferenceSession", FakeSession)
    _, info = ort_session.build_session(float_model, [TRT, CUDA], disable_cpu_fallback=True, probe=loads)
    assert seen == {"config": "1", "providers": [TRT, CUDA], "enable_fallback": 0}
    assert info["session_config"] == {ort_session.CFG_DISABLE_CPU_FALLBACK: "1"}


# ---------------------------------------------------------------------------------------------------------------------
# provider libraries


@pytest.mark.parametrize("disable_cpu_fallback", [True, False])
@pytest.mark.parametrize("providers", [[TRT, CUDA], [CUDA], [TRT]])
def test_a_gpu_provider_whose_library_is_missing_is_named(float_model, providers, disable_cpu_fallback):
    """On a machine without the CUDA/TensorRT libraries: one error naming the provider and the missing library."""
    requested = providers if disable_cpu_fallback else providers + [CPU]
    failing = [probe_or_skip(p) for p in providers]
    with pytest.raises(UserError) as exc:
        ort_session.build_session(float_model, requested, disable_cpu_fallback=disable_cpu_fallback)
    assert exc.value.flag == "--providers"
    for probe in failing:
        assert probe.missing and LIBRARY.fullmatch(probe.missing[0])
        assert probe.provider in str(exc.value) and probe.missing[0] in str(exc.value)


def test_missing_tensorrt_message_names_library_and_the_providers_that_would_work(float_model):
    with pytest.raises(UserError) as exc:
        ort_session.build_session(float_model, [TRT, CUDA], True, probe=fails(TRT="libnvinfer.so.10"))
    assert exc.value.flag == "--providers"
    assert "libnvinfer.so.10" in str(exc.value)
    assert f"--providers {CUDA} --disable-cpu-fallback" in str(exc.value)


# ---------------------------------------------------------------------------------------------------------------------
# node placement


def test_cpu_session_places_every_node_on_the_cpu(tmp_path):
    model = _conv_model()
    model.graph.node[0].name = "conv"
    model.graph.node.append(helper.make_node("Relu", ["out"], ["relu"], name="relu"))
    model.graph.output[0].name = "relu"
    session, info = ort_session.build_session(model, [CPU], graph_optimization_level="ORT_DISABLE_ALL")
    assert info["node_placement"] == {CPU: 2}
    assert info["cpu_nodes"] is None  # CPU-only: not listed
    assert ort_session.node_placement(session) == ({CPU: 2}, ["conv", "relu"])


def test_gpu_session_records_the_nodes_left_on_the_cpu(float_model, monkeypatch):
    import onnxruntime as ort

    class Node:
        def __init__(self, name, op_type):
            self.name, self.op_type = name, op_type

    class Subgraph:
        def __init__(self, ep_name, nodes):
            self.ep_name, self._nodes = ep_name, nodes

        def get_nodes(self):
            return self._nodes

    class FakeSession:
        def __init__(self, path, sess_options, providers, enable_fallback=1):
            assert sess_options.get_session_config_entry(ort_session.CFG_RECORD_PLACEMENT) == "1"

        def get_providers(self):
            return [CUDA, CPU]

        def get_provider_graph_assignment_info(self):
            return [Subgraph(CUDA, [Node("conv", "Conv")]), Subgraph(CPU, [Node("bias_dq", "DequantizeLinear")])]

    monkeypatch.setattr(ort, "InferenceSession", FakeSession)
    _, info = ort_session.build_session(float_model, [CUDA, CPU], probe=loads)
    assert info["node_placement"] == {CPU: 1, CUDA: 1}
    assert info["cpu_nodes"] == ["bias_dq"]


def test_disable_cpu_fallback_failure_names_the_cpu_nodes(float_model, monkeypatch):
    import onnxruntime as ort

    class Subgraph:
        ep_name = CPU

        def get_nodes(self):
            return [type("Node", (), {"name": "bias_dq", "op_type": "DequantizeLinear"})()]

    class FakeSession:
        def __init__(self, path, sess_options, providers, enable_fallback=1):
            if sess_options.get_session_config_entry(ort_session.CFG_DISABLE_CPU_FALLBACK) == "1":
                raise RuntimeError("... but fallback to CPU EP has been explicitly disabled by the user.")

        def get_provider_graph_assignment_info(self):
            return [Subgraph()]

    monkeypatch.setattr(ort, "InferenceSession", FakeSession)
    with pytest.raises(UserError) as exc:
        ort_session.build_session(float_model, [CUDA], disable_cpu_fallback=True, probe=loads)
    assert exc.value.flag == "--disable-cpu-fallback" and "bias_dq" in str(exc.value)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_NVIDIA_DRIVER, reason="needs an NVIDIA GPU with CUDA/cuDNN libraries")
def test_gpu_only_session_on_a_gpu(float_model, tmp_path):
    _, info = ort_session.build_session(float_model, [CUDA], disable_cpu_fallback=True)
    # onnxruntime 1.31 lists CPUExecutionProvider in get_providers() even with fallback disabled; what ran
    # where is the node placement
    assert info["providers_used"][0] == CUDA
    assert info["cpu_nodes"] == [] and set(info["node_placement"]) == {CUDA}


# ---------------------------------------------------------------------------------------------------------------------
# models and inputs


def test_in_memory_models_and_session_options(tmp_path):
    model = _conv_model()
    for source in (model, model.SerializeToString()):
        session, info = ort_session.build_session(
            source,
            [CPU],
            graph_optimization_level="ORT_DISABLE_ALL",
            log_severity_level=3,
            session_config={ort_session.CFG_DISABLE_QUANT_QDQ: "1"},
        )
        assert info["graph_optimization_level"] == "ORT_DISABLE_ALL"
        assert info["session_config"] == {ort_session.CFG_DISABLE_QUANT_QDQ: "1"}
        assert session.get_session_options().get_session_config_entry(ort_session.CFG_DISABLE_QUANT_QDQ) == "1"


def test_not_an_onnx_model_names_the_flag(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"definitely not protobuf")
    with pytest.raises(UserError) as exc:
        ort_session.build_session(bad, [CPU], model_flag="--model")
    assert exc.value.flag == "--model"


def _identity_model(path: Path, shape, elem_type=TensorProto.FLOAT) -> Path:
    x = helper.make_tensor_value_info("images", elem_type, list(shape))
    y = helper.make_tensor_value_info("out", elem_type, list(shape))
    graph = helper.make_graph([helper.make_node("Identity", ["images"], ["out"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.mark.parametrize(
    "shape, elem_type",
    [
        ((1, 1, 8, 8), TensorProto.FLOAT),
        ((2, 3, 8, 8), TensorProto.FLOAT),
        ((1, 3, 8), TensorProto.FLOAT),
        ((1, 3, 8, 8), TensorProto.DOUBLE),
        ((1, "c", "h", "w"), TensorProto.FLOAT),
    ],
)
def test_input_validator_rejects_non_images(tmp_path, shape, elem_type):
    path = _identity_model(tmp_path / "m.onnx", shape, elem_type)
    session, _ = ort_session.build_session(path, [CPU])
    with pytest.raises(UserError) as exc:
        model_input.check_image_input(session, model_path=path)
    assert exc.value.flag == "--onnx-path"


def test_input_validator_accepts_dynamic_batch_and_size(tmp_path):
    path = _identity_model(tmp_path / "m.onnx", ("batch", 3, "height", "width"))
    session, _ = ort_session.build_session(path, [CPU])
    assert model_input.check_image_input(session, imgsz=640)[1] == ["batch", 3, "height", "width"]
    assert model_input.check_image_input(session)[1] == ["batch", 3, "height", "width"]


def test_input_validator_checks_imgsz(float_model):
    session, _ = ort_session.build_session(float_model, [CPU])
    with pytest.raises(UserError) as exc:
        model_input.check_image_input(session, imgsz=640)
    assert exc.value.flag == "--imgsz"


def _qdq_conv_with_float_bias() -> onnx.ModelProto:
    """x -> Q/DQ -> Conv(weight through DQ of an int8 initializer, float bias) -> Q/DQ -> y (a QDQ node unit)."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(np.array(0.02, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "x_zp"),
        numpy_helper.from_array(rng.integers(-127, 127, (4, 3, 3, 3)).astype(np.int8), "w_q"),
        numpy_helper.from_array(np.array(0.01, np.float32), "w_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "w_zp"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "bias"),
        numpy_helper.from_array(np.array(0.05, np.float32), "y_scale"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"], name="x_q"),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"], name="x_dq"),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w_dq"], name="w_dq"),
        helper.make_node("Conv", ["x_dq", "w_dq", "bias"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("QuantizeLinear", ["c", "y_scale", "x_zp"], ["c_q"], name="c_q"),
        helper.make_node("DequantizeLinear", ["c_q", "y_scale", "x_zp"], ["y"], name="c_dq"),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq_conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)


def test_bias_rewrite_is_disabled_for_gpu_sessions_of_qdq_models(monkeypatch):
    """ORT's WeightBiasQuantization adds int32 bias DequantizeLinear nodes the CUDA EP cannot run: off for GPU EPs."""
    import onnxruntime as ort

    model = _qdq_conv_with_float_bias()
    options = ort.SessionOptions()
    options.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    rewritten = lambda disabled: [
        n
        for n in ort_session.node_placement(
            ort.InferenceSession(model.SerializeToString(), options, providers=[CPU], disabled_optimizers=disabled)
        )[1]
        if "bias" in n
    ]
    if not rewritten([]):
        pytest.skip(f"onnxruntime {ort.__version__} does not rewrite the bias of this Q/DQ conv")
    assert rewritten(list(ort_session.GPU_QDQ_DISABLED_OPTIMIZERS)) == []

    seen = {}

    class Spy:
        def __init__(self, source, sess_options, providers, enable_fallback=1, disabled_optimizers=None):
            seen[providers[0][0]] = list(disabled_optimizers or [])
            self._providers = [name for name, _ in providers] + [CPU]

        def get_providers(self):
            return self._providers

    monkeypatch.setattr(ort, "InferenceSession", Spy)
    _, info = ort_session.build_session(model, [CUDA, CPU], probe=loads)
    assert seen[CUDA] == ["WeightBiasQuantization"] and info["disabled_optimizers"] == ["WeightBiasQuantization"]
