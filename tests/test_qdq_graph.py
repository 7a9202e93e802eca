"""The Q/DQ graph reading shared by sessions, inspection, sensitivity and quantization checks."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lowbit import qdq_graph


def _conv_with_quantized_weight(quantize_weight: bool) -> onnx.ModelProto:
    """Q/DQ activation -> Conv(weight through an int8 DQ or plain, bias through an int32 DQ) and a second Conv
    reading the same activation pair with a float weight."""
    inits = [
        numpy_helper.from_array(np.array(0.1, np.float32), "act_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "act_zp"),
        numpy_helper.from_array(np.ones((2, 3, 1, 1), np.int8), "w_q"),
        numpy_helper.from_array(np.ones((2, 3, 1, 1), np.float32), "w_float"),
        numpy_helper.from_array(np.array([0.01, 0.01], np.float32), "w_scale"),
        numpy_helper.from_array(np.array([3, 4], np.int32), "bias_q"),
        numpy_helper.from_array(np.array([0.001, 0.001], np.float32), "bias_scale"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["images", "act_scale", "act_zp"], ["act_q"], name="act_q"),
        helper.make_node("DequantizeLinear", ["act_q", "act_scale", "act_zp"], ["act_dq"], name="act_dq"),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w_dq"], name="w_dq", axis=0),
        helper.make_node("DequantizeLinear", ["bias_q", "bias_scale"], ["bias_dq"], name="bias_dq", axis=0),
        helper.make_node("Conv", ["act_dq", "w_dq" if quantize_weight else "w_float", "bias_dq"], ["y1"], name="conv1"),
        helper.make_node("Conv", ["act_dq", "w_float"], ["y2"], name="conv2"),
    ]
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 4, 4])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y1", "y2")]
    graph = helper.make_graph(nodes, "conv_qdq", [x], outs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def test_qdq_info_float_int8_fp8(tmp_path, qdq_add_model):
    float_model = _conv_with_quantized_weight(False)
    del float_model.graph.node[:4]
    assert qdq_graph.qdq_info(float_model)["is_qdq"] is False
    int8 = qdq_graph.qdq_info(qdq_add_model(TensorProto.INT8))
    assert int8 == {"qdq_pairs": 3, "quant_dtypes": ["int8"], "is_fp8": False, "is_qdq": True}
    path = tmp_path / "fp8.onnx"
    onnx.save(qdq_add_model(TensorProto.FLOAT8E4M3FN), path)
    fp8 = qdq_graph.qdq_info(path)
    assert fp8 == {"qdq_pairs": 3, "quant_dtypes": ["float8e4m3fn"], "is_fp8": True, "is_qdq": True}


def test_int32_bias_dq_is_not_a_quantized_type():
    assert qdq_graph.qdq_info(_conv_with_quantized_weight(True))["quant_dtypes"] == ["int8"]


@pytest.mark.parametrize("quantize_weight, expected", [(True, ["conv1"]), (False, [])])
def test_a_conv_is_quantized_through_its_weight(quantize_weight, expected):
    model = _conv_with_quantized_weight(quantize_weight)
    summary = qdq_graph.qdq_summary(model)
    assert summary["quantized_nodes"] == expected
    assert summary["qdq_pairs"] == 1 and summary["dequantize_linear"] == 3
    found = qdq_graph.find_quantized_nodes(model.graph)
    assert [n.name for n in found] == expected
    if quantize_weight:
        assert found[0].weight is None  # a stored int8 weight: no float initializer behind it
        assert found[0].quantized_inputs == [0, 1, 2]


def test_pairs_consumers_and_producers(qdq_add_model):
    graph = qdq_add_model(TensorProto.INT8).graph
    pairs = qdq_graph.qdq_pairs(graph)
    assert sorted(pairs) == ["a_dq", "b_dq", "c_dq"]
    assert pairs["c_dq"].float_input == "sum" and pairs["c_dq"].quantize.name == "c_q"
    assert [n.name for n in qdq_graph.tensor_consumers(graph)["images"]] == ["a_q", "b_q"]
    assert qdq_graph.tensor_producers(graph)["sum"].name == "add"
    assert [n.name for n in qdq_graph.find_quantized_nodes(graph)] == ["add", "relu"]


@pytest.mark.parametrize(
    "code, name, quant, bits, magnitude",
    [
        (TensorProto.FLOAT, "FLOAT", "float", 32, None),
        (TensorProto.FLOAT16, "FLOAT16", "float16", 16, None),
        (TensorProto.INT8, "INT8", "int8", 8, 128.0),
        (TensorProto.UINT8, "UINT8", "uint8", 8, 255.0),
        (TensorProto.INT4, "INT4", "int4", 4, 8.0),
        (TensorProto.UINT4, "UINT4", "uint4", 4, 15.0),
        (TensorProto.FLOAT8E4M3FN, "FLOAT8E4M3FN", "float8e4m3fn", 8, 448.0),
        (TensorProto.FLOAT4E2M1, "FLOAT4E2M1", "float4e2m1", 4, None),
        (TensorProto.STRING, "STRING", "string", 0, None),
    ],
)
def test_dtype_names_bits_and_ranges(code, name, quant, bits, magnitude):
    assert qdq_graph.dtype_name(code) == name
    assert qdq_graph.quant_dtype_name(code) == quant
    assert qdq_graph.element_bits(code) == bits
    assert qdq_graph.quant_max_magnitude(code) == magnitude
    assert qdq_graph.dtype_name(None) is None and qdq_graph.dtype_name(999) == "TYPE_999"


def test_constants_and_element_types_have_one_reading():
    model = _conv_with_quantized_weight(True)
    model.graph.node.insert(0, helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.int8(7), "t")))
    model.graph.node.append(helper.make_node("Cast", ["y2"], ["y2_half"], to=TensorProto.FLOAT16))
    values = qdq_graph.constant_values(model.graph)
    assert list(values)[-1] == "k" and values["k"].name == "k"  # initializers first, then Constant outputs, renamed
    assert qdq_graph.constant_arrays(model.graph)["bias_q"].tolist() == [3, 4]
    types = qdq_graph.constant_elem_types(model.graph)
    assert types["k"] == TensorProto.INT8 and types["bias_q"] == TensorProto.INT32
    declared = qdq_graph.declared_elem_types(model.graph)
    assert declared["images"] == TensorProto.FLOAT and declared["w_q"] == TensorProto.INT8
    inferred = qdq_graph.inferred_elem_types(model)
    assert inferred["act_q"] == TensorProto.INT8 and inferred["y2_half"] == TensorProto.FLOAT16


def test_drop_unused_initializers_keeps_what_any_graph_reads():
    from lowbit.qdq_edit import drop_unused_initializers

    model = _conv_with_quantized_weight(False)  # conv1 reads w_float: without w_dq nothing reads w_q, w_scale
    graph = model.graph
    graph.node.remove(next(n for n in graph.node if n.name == "w_dq"))
    graph.input.append(helper.make_tensor_value_info("w_scale", TensorProto.FLOAT, [2]))  # an old-style input entry
    drop_unused_initializers(graph, {"w_q", "images"})  # only candidates go; a graph input that is no initializer stays
    names = [i.name for i in graph.initializer]
    assert "w_q" not in names and "w_scale" in names and [i.name for i in graph.input] == ["images", "w_scale"]
    drop_unused_initializers(graph)  # no candidates: every initializer nothing reads, and its graph-input entry
    assert "w_scale" not in [i.name for i in graph.initializer] and [i.name for i in graph.input] == ["images"]
