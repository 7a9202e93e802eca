"""Low-precision MAC share (lowbit.mac_share) on hand-built Q/DQ graphs: the arithmetic, exactly."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lowbit.errors import UserError
from lowbit.mac_share import low_precision_mac_share

# conv1: [1,3,16,16] -> [1,8,16,16], 3x3 -> 16*16*8 * 3*9 MACs; conv2: 8 -> 4 channels, 1x1.
CONV1_MACS = 16 * 16 * 8 * 3 * 3 * 3
CONV2_MACS = 16 * 16 * 4 * 8
MATMUL_MACS = 4 * 256 * 256  # [4, 256] @ [256, 256]


def _qdq(prefix: str, tensor: str, dtype: int, scale_shape=(), axis=None, stored=False):
    """Nodes and initializers of a Q -> DQ pair on ``tensor`` (or, with ``stored``, one DQ of a quantized constant)."""
    scale = numpy_helper.from_array(np.full(scale_shape, 0.05, np.float32), f"{prefix}_scale")
    zero = helper.make_tensor(
        f"{prefix}_zp", dtype, list(scale_shape), np.zeros(int(np.prod(scale_shape)), int).tolist()
    )
    kwargs = {} if axis is None else {"axis": axis}
    dq_in = f"{prefix}_q"
    nodes = []
    if not stored:
        nodes.append(
            helper.make_node("QuantizeLinear", [tensor, scale.name, zero.name], [dq_in], name=f"{prefix}_Q", **kwargs)
        )
    else:
        dq_in = tensor
    nodes.append(
        helper.make_node(
            "DequantizeLinear", [dq_in, scale.name, zero.name], [f"{prefix}_dq"], name=f"{prefix}_DQ", **kwargs
        )
    )
    return nodes, [scale, zero], f"{prefix}_dq"


def _graph(quantize_conv1=True, quantize_conv2=False, dtype=TensorProto.INT8, matmul=False, batch="N"):
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((4, 8, 1, 1)).astype(np.float32), "w2")
    nodes, inits = [], [w1, w2]

    def conv_inputs(activation: str, weight: str, channels: int, quantized: bool) -> tuple[str, str]:
        """The conv's (activation, weight) inputs, each through a Q/DQ pair when ``quantized``."""
        if not quantized:
            return activation, weight
        n1, i1, act_in = _qdq(activation, activation, dtype)
        n2, i2, w_in = _qdq(weight, weight, dtype, scale_shape=(channels,), axis=0)
        nodes.extend(n1 + n2)
        inits.extend(i1 + i2)
        return act_in, w_in

    x_in, w1_in = conv_inputs("x", "w1", 8, quantize_conv1)
    nodes.append(helper.make_node("Conv", [x_in, w1_in], ["y1"], name="conv1", pads=[1, 1, 1, 1]))
    y1_in, w2_in = conv_inputs("y1", "w2", 4, quantize_conv2)
    nodes.append(helper.make_node("Conv", [y1_in, w2_in], ["y2"], name="conv2"))
    output = "y2"
    if matmul:
        nodes.append(helper.make_node("Reshape", ["y2", "shape"], ["flat"], name="reshape"))
        inits += [
            numpy_helper.from_array(np.array([4, 256], np.int64), "shape"),
            numpy_helper.from_array(np.ones((256, 256), np.float32), "wm"),
        ]
        nodes.append(helper.make_node("MatMul", ["flat", "wm"], ["out"], name="matmul"))
        output = "out"
    graph = helper.make_graph(
        nodes,
        "two_convs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 16, 16])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def test_one_of_two_convs_quantized():
    share = low_precision_mac_share(_graph())
    assert share.total_macs == CONV1_MACS + CONV2_MACS
    assert share.low_precision_macs == CONV1_MACS
    assert share.share == CONV1_MACS / (CONV1_MACS + CONV2_MACS)
    assert share.by_dtype == {"int8": CONV1_MACS}
    assert share.quantized_nodes == ["conv1"] and share.unknown_nodes == []


def test_fp8_everything_quantized_at_batch_2():
    fp8 = low_precision_mac_share(_graph(quantize_conv2=True, dtype=TensorProto.FLOAT8E4M3FN), batch=2)
    assert fp8.total_macs == fp8.low_precision_macs == 2 * (CONV1_MACS + CONV2_MACS) and fp8.share == 1.0
    assert fp8.by_dtype == {"float8e4m3fn": 2 * (CONV1_MACS + CONV2_MACS)}


def test_activation_only_qdq_does_not_count_and_matmul_is_counted():
    model = _graph(quantize_conv1=False, quantize_conv2=False, matmul=True)
    share = low_precision_mac_share(model)
    assert share.total_macs == CONV1_MACS + CONV2_MACS + MATMUL_MACS
    assert share.low_precision_macs == 0 and share.share == 0.0 and share.by_dtype == {}


def test_weight_stored_quantized_counts():
    """A DequantizeLinear of an int8 weight initializer (no QuantizeLinear) is a quantized weight too."""
    model = _graph(quantize_conv1=False)
    rng = np.random.default_rng(1)
    w_int8 = numpy_helper.from_array(rng.integers(-127, 127, (4, 8, 1, 1)).astype(np.int8), "w2_int8")
    nodes, inits, w_dq = _qdq("w2s", "w2_int8", TensorProto.INT8, scale_shape=(4,), axis=0, stored=True)
    graph = model.graph
    graph.initializer.extend([w_int8] + inits)
    conv2 = next(n for n in graph.node if n.name == "conv2")
    conv2.input[1] = w_dq
    index = list(graph.node).index(conv2)
    for offset, node in enumerate(nodes):
        graph.node.insert(index + offset, node)
    share = low_precision_mac_share(model)
    assert share.low_precision_macs == CONV2_MACS and share.by_dtype == {"int8": CONV2_MACS}


def test_unknown_shapes_are_listed_not_counted():
    model = _graph()
    graph = model.graph
    conv2 = next(n for n in graph.node if n.name == "conv2")
    # conv2's weight reshaped by a runtime shape tensor: its shape, hence its MACs, is unknown
    graph.input.append(helper.make_tensor_value_info("wshape", TensorProto.INT64, [4]))
    graph.node.insert(0, helper.make_node("Reshape", ["w2", "wshape"], ["w2_dynamic"], name="reshape_w2"))
    conv2.input[1] = "w2_dynamic"
    share = low_precision_mac_share(model)
    assert share.unknown_nodes == ["conv2"]
    assert share.total_macs == share.low_precision_macs == CONV1_MACS and share.share == 1.0


def test_symbolic_non_batch_dim_needs_a_shape():
    model = _graph()
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"
    with pytest.raises(UserError):
        low_precision_mac_share(model)
    assert low_precision_mac_share(model, input_shapes={"x": [1, 3, 16, 16]}).total_macs == CONV1_MACS + CONV2_MACS


def test_path_and_bad_file(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_graph(quantize_conv2=True), str(path))
    assert low_precision_mac_share(path).share == 1.0
    bad = tmp_path / "bad.onnx"
    bad.write_text("not a model")
    with pytest.raises(UserError):
        low_precision_mac_share(bad, flag="--candidate")
