"""Q/DQ removal for chosen nodes (lowbit.qdq_edit) and the output-drift rankings on the gated graph
(lowbit.sensitivity_gated): leave-one-out (lowbit.sensitivity_loo) and one node alone (lowbit.sensitivity_single).

The graphs are hand-built and quantized here the way ModelOpt writes them (float weight -> Q -> DQ
per output channel, one per-tensor Q/DQ pair per activation tensor, scales from the float model's
activations), or with weights stored as int8 constants (ONNX Runtime's quantizer layout).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from lowbit import sensitivity_report as report_io
from lowbit.errors import UserError
from lowbit.ort_session import CFG_DISABLE_QUANT_QDQ
from lowbit.qdq_edit import remove_all_qdq, remove_qdq_for_nodes
from lowbit.qdq_graph import qdq_summary
from lowbit.sensitivity_gated import build_gated_model, gate_feeds
from lowbit.sensitivity_loo import loo_sensitivity, method_description
from lowbit.sensitivity_run import drift_ranking_of
from lowbit.sensitivity_single import single_sensitivity

REG_MAX = 2
NC = 3
CHANNELS = 4 * REG_MAX + NC
SIZE = 8
HARD = "conv_b"
OUTLIER = 1e3
CPU = ["CPUExecutionProvider"]


def _conv(name, x, w, b, y, pads=1):
    return helper.make_node("Conv", [x, w, b], [y], name=name, pads=[pads] * 4)


def chain_model(hard: bool = True) -> onnx.ModelProto:
    """x[N,4,8,8] -> conv_a -> Relu -> conv_b -> Relu -> conv_c (1x1) -> Reshape -> raw [N, 11, 64].

    With ``hard``, conv_a's output channel 0 is scaled by OUTLIER and conv_b's weights reading it
    divided by OUTLIER: the float function is unchanged (Relu is positively homogeneous), but conv_b's
    per-tensor input scale then rounds every other channel away.
    """
    rng = np.random.default_rng(0)
    wa = rng.standard_normal((8, 4, 3, 3)).astype(np.float32) / 6
    ba = rng.standard_normal(8).astype(np.float32) * 0.1
    wb = rng.standard_normal((8, 8, 3, 3)).astype(np.float32) / 8
    wc = rng.standard_normal((CHANNELS, 8, 1, 1)).astype(np.float32) * 1.5
    if hard:
        wa[0] *= OUTLIER
        ba[0] *= OUTLIER
        wb[:, 0] /= OUTLIER
    inits = [
        numpy_helper.from_array(v, n)
        for n, v in [
            ("wa", wa),
            ("ba", ba),
            ("wb", wb),
            ("bb", np.zeros(8, np.float32)),
            ("wc", wc),
            ("bc", np.zeros(CHANNELS, np.float32)),
            ("shape", np.array([0, CHANNELS, -1], np.int64)),
        ]
    ]
    nodes = [
        _conv("conv_a", "x", "wa", "ba", "a"),
        helper.make_node("Relu", ["a"], ["a_r"], name="relu_a"),
        _conv("conv_b", "a_r", "wb", "bb", "b"),
        helper.make_node("Relu", ["b"], ["b_r"], name="relu_b"),
        _conv("conv_c", "b_r", "wc", "bc", "c", pads=0),
        helper.make_node("Reshape", ["c", "shape"], ["raw"], name="reshape"),
    ]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, SIZE, SIZE])],
        [helper.make_tensor_value_info("raw", TensorProto.FLOAT, ["N", CHANNELS, SIZE * SIZE])],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def _run(model: onnx.ModelProto, feeds: dict, outputs=None) -> list[np.ndarray]:
    """Run with ORT's Q/DQ fusion off: Q/DQ arithmetic in float, as the gated graph computes it."""
    options = ort.SessionOptions()
    options.add_session_config_entry(CFG_DISABLE_QUANT_QDQ, "1")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=CPU)
    return session.run(outputs, feeds)


def _activation_amax(model: onnx.ModelProto, tensors: list[str], images: np.ndarray) -> dict[str, float]:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in tensors)
    values = _run(probe, {"x": images}, tensors)
    return {t: float(np.abs(v).max()) for t, v in zip(tensors, values)}


def quantize(model, images, skip=(), stored_weights=False, calib_model=None) -> onnx.ModelProto:
    """INT8 Q/DQ on every Conv but ``skip``: one shared per-tensor pair per activation, per-channel weights.

    Activation scales come from ``calib_model`` (default ``model``) run on ``images``.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    convs = [n for n in graph.node if n.op_type == "Conv" and n.name not in skip]
    amax = _activation_amax(calib_model or model, sorted({n.input[0] for n in convs}), images)
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    new_nodes, pairs = [], {}

    def pair(tensor, scale, axis=None):
        zero = np.zeros(np.shape(scale), np.int8)
        graph.initializer.extend(
            [
                numpy_helper.from_array(np.asarray(scale, np.float32), f"{tensor}_scale"),
                numpy_helper.from_array(zero, f"{tensor}_zp"),
            ]
        )
        kw = {} if axis is None else {"axis": axis}
        source = tensor
        if stored_weights and tensor in inits:
            source = f"{tensor}_int8"
            shape = (-1,) + (1,) * (inits[tensor].ndim - 1)
            q = np.clip(np.round(inits[tensor] / np.reshape(scale, shape)), -128, 127).astype(np.int8)
            graph.initializer.append(numpy_helper.from_array(q, source))
        else:
            source = f"{tensor}_q"
            new_nodes.append(
                helper.make_node(
                    "QuantizeLinear",
                    [tensor, f"{tensor}_scale", f"{tensor}_zp"],
                    [source],
                    name=f"{tensor}_QuantizeLinear",
                    **kw,
                )
            )
        new_nodes.append(
            helper.make_node(
                "DequantizeLinear",
                [source, f"{tensor}_scale", f"{tensor}_zp"],
                [f"{tensor}_dq"],
                name=f"{tensor}_DequantizeLinear",
                **kw,
            )
        )
        return f"{tensor}_dq"

    for node in graph.node:
        if node in convs:
            x, w = node.input[0], node.input[1]
            if x not in pairs:
                pairs[x] = pair(x, amax[x] / 127)
            w_scale = np.abs(inits[w]).reshape(inits[w].shape[0], -1).max(axis=1) / 127
            node.input[0], node.input[1] = pairs[x], pair(w, w_scale, axis=0)
        new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    return out


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((6, 4, SIZE, SIZE)).astype(np.float32)


@pytest.fixture(scope="module")
def float_model() -> onnx.ModelProto:
    return chain_model()


@pytest.fixture(scope="module")
def qdq_model(float_model, images) -> onnx.ModelProto:
    return quantize(float_model, images)


# ----------------------------------------------------------------------------------------------------------------------
# remove_qdq_for_nodes


@pytest.mark.parametrize("stored_weights", [False, True])
def test_removing_one_node_equals_quantizing_without_it(float_model, images, stored_weights):
    qdq = quantize(float_model, images, stored_weights=stored_weights)
    edited = remove_qdq_for_nodes(qdq, [HARD])
    assert qdq_summary(qdq)["quantized_nodes"] == ["conv_a", "conv_b", "conv_c"]
    assert qdq_summary(edited)["quantized_nodes"] == ["conv_a", "conv_c"]
    reference = float_model
    if stored_weights:  # the float weight behind an int8 constant is its dequantized value
        reference = onnx.ModelProto()
        reference.CopyFrom(float_model)
        init = next(i for i in reference.graph.initializer if i.name == "wb")
        wb = numpy_helper.to_array(init)
        scale = np.abs(wb).reshape(8, -1).max(axis=1)[:, None, None, None] / 127
        init.CopyFrom(numpy_helper.from_array((np.round(wb / scale) * scale).astype(np.float32), "wb"))
        floats = {i.name: numpy_helper.to_array(i) for i in edited.graph.initializer}
        np.testing.assert_allclose(floats["wb_dq__float"], numpy_helper.to_array(init), rtol=1e-6)
    expected = quantize(reference, images, skip={HARD}, stored_weights=stored_weights, calib_model=float_model)
    (got,) = _run(edited, {"x": images})
    (want,) = _run(expected, {"x": images})
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # the unused Q/DQ nodes and their initializers are gone; the original model is untouched
    names = {n.name for n in edited.graph.node}
    assert "a_r_QuantizeLinear" not in names and "conv_a" in names
    assert next(n for n in qdq.graph.node if n.name == HARD).input[0] == "a_r_dq"
    assert "a_r_scale" not in {i.name for i in edited.graph.initializer}
    assert sum(n.op_type == "QuantizeLinear" for n in qdq.graph.node) > sum(
        n.op_type == "QuantizeLinear" for n in edited.graph.node
    )


@pytest.mark.parametrize("stored_weights", [False, True])
def test_removing_every_node_recovers_the_float_model(images, stored_weights):
    float_model = chain_model(hard=not stored_weights)  # int8 weights would round the hard column away
    qdq = quantize(float_model, images, stored_weights=stored_weights)
    edited = remove_all_qdq(qdq)
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in edited.graph.node)
    (got,) = _run(edited, {"x": images})
    (want,) = _run(float_model, {"x": images})
    if stored_weights:  # the float weights are the dequantized int8 ones: close, not equal
        assert np.abs(got - want).max() < 0.02 * np.abs(want).max()
    else:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_shared_pair_kept_for_the_other_consumer(images):
    """Two convs read one Q/DQ pair: excluding one leaves the pair in front of the other."""
    model = chain_model(hard=False)
    graph = model.graph
    graph.initializer.append(numpy_helper.from_array(np.ones((8, 4, 3, 3), np.float32) / 30, "wd"))
    graph.node.insert(1, _conv("conv_d", "x", "wd", "ba", "d"))
    graph.node.insert(2, helper.make_node("Add", ["a", "d"], ["ad"], name="add"))
    next(n for n in graph.node if n.name == "relu_a").input[0] = "ad"
    qdq = quantize(model, images)
    conv_a = next(n for n in qdq.graph.node if n.name == "conv_a")
    conv_d = next(n for n in qdq.graph.node if n.name == "conv_d")
    assert conv_a.input[0] == conv_d.input[0] == "x_dq"
    edited = remove_qdq_for_nodes(qdq, ["conv_a"])
    nodes = {n.name: n for n in edited.graph.node}
    assert nodes["conv_a"].input[0] == "x" and nodes["conv_a"].input[1] == "wa"
    assert nodes["conv_d"].input[0] == "x_dq" and "x_QuantizeLinear" in nodes
    assert qdq_summary(edited)["quantized_nodes"] == ["conv_b", "conv_c", "conv_d"]


def test_unknown_node_is_a_user_error(qdq_model):
    with pytest.raises(UserError) as info:
        remove_qdq_for_nodes(qdq_model, ["conv_a", "no_such_node"], flag="--exclude-nodes")
    assert info.value.flag == "--exclude-nodes"


# ----------------------------------------------------------------------------------------------------------------------
# leave-one-out


def test_gated_variants_equal_the_edited_models(float_model, qdq_model, images):
    gated, gates = build_gated_model(qdq_model)
    assert sorted(gates) == ["conv_a", "conv_b", "conv_c"]

    def gated_run(floated):
        return _run(gated, {"x": images, **gate_feeds(gates, floated)})[0]

    np.testing.assert_allclose(gated_run(set()), _run(qdq_model, {"x": images})[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(gated_run(set(gates)), _run(float_model, {"x": images})[0], rtol=1e-5, atol=1e-5)
    for name in gates:
        edited = remove_qdq_for_nodes(qdq_model, [name])
        np.testing.assert_allclose(gated_run({name}), _run(edited, {"x": images})[0], rtol=1e-6, atol=1e-6)


def test_hard_node_ranks_first(qdq_model, images, tmp_path):
    done = []
    result = loo_sensitivity(
        qdq_model,
        images,
        CPU,
        reg_max=REG_MAX,
        batch_size=4,
        intra_op_threads=1,
        work_dir=tmp_path,
        progress=lambda i, n: done.append(n),
    )
    assert done == [4, 2]  # symbolic batch: 6 images in batches of 4
    layers = result.layers
    assert next(layer["name"] for layer in layers) == HARD
    assert layers[0]["score"] > 5 * max(abs(layer["score"]) for layer in layers[1:])
    assert all(list(layer) == list(report_io.LAYER_KEYS) for layer in layers)
    assert {layer["weight"] for layer in layers} == {"wa", "wb", "wc"}
    assert (
        result.reference["all_layers_quantized"] > result.reference["no_layer_quantized"] == pytest.approx(0, abs=1e-9)
    )
    assert result.method["description"] == method_description("det_kl") and result.providers == CPU
    assert list(tmp_path.iterdir()) == []  # the gated model was temporary
    # the rows make a report that the shared reader accepts
    report = report_io.make_report(
        source="onnx",
        model="m.onnx",
        model_sha256="0" * 64,
        precision="int8",
        method=result.method,
        data={"images": result.images, "source": "x", "imgsz": SIZE},
        device="cpu",
        wall_s=result.wall_s,
        layers=layers,
        extra={"reference": result.reference},
    )
    paths = report_io.write_report(tmp_path / "report", report)
    assert report_io.load_report(paths["json"], "--report")["layers"][0]["name"] == HARD


def test_single_node_variant_scores_each_node_quantized_alone(float_model, qdq_model, images):
    """single: score = drift of the model with only that node quantized, which ranks the hard node first."""
    from lowbit.drift import METRICS, drift_sums, finish_scores

    result = single_sensitivity(qdq_model, images, CPU, reg_max=REG_MAX)
    assert result.layers[0]["name"] == HARD and result.method["score"] == METRICS["det_kl"]
    reference = _run(float_model, {"x": images})[0]
    others = [n for n in ("conv_a", "conv_b", "conv_c") if n != HARD]
    alone = _run(remove_qdq_for_nodes(qdq_model, others), {"x": images})[0]
    expected = finish_scores(drift_sums(reference, alone, REG_MAX))[METRICS["det_kl"]]
    hard_row = next(layer for layer in result.layers if layer["name"] == HARD)
    assert hard_row["score"] == pytest.approx(expected, rel=1e-3)
    # the dispatcher of the script's --method refuses a method that is no output-drift ranking
    again = drift_ranking_of("single", qdq_model, images, CPU, reg_max=REG_MAX).layers
    assert [layer["name"] for layer in again] == [layer["name"] for layer in result.layers]
    assert [layer["score"] for layer in again] == pytest.approx([layer["score"] for layer in result.layers], rel=1e-9)
    with pytest.raises(UserError) as exc:
        drift_ranking_of("both", qdq_model, images, CPU, reg_max=REG_MAX)
    assert exc.value.flag == "--method"


def test_rel_mse_metric_and_bad_inputs(qdq_model, images):
    result = loo_sensitivity(qdq_model, images[:2], CPU, metric="rel_mse", reg_max=REG_MAX)
    assert result.method["score"] == "loo_gain_output_drift_rel_mse" and result.layers[0]["name"] == HARD
    with pytest.raises(UserError) as info:
        loo_sensitivity(qdq_model, images, CPU, metric="nope")
    assert info.value.flag == "--metric"
    with pytest.raises(UserError) as info:
        loo_sensitivity(qdq_model, images, CPU, reg_max=16)  # 11 channels cannot hold 4 * 16 box bins
    assert info.value.flag == "--reg-max"
    with pytest.raises(UserError) as info:
        loo_sensitivity(qdq_model, images[0], CPU, reg_max=REG_MAX)
    assert info.value.flag == "--calib-path"


@pytest.mark.gpu
@pytest.mark.skipif(not Path("/dev/nvidiactl").exists(), reason="needs an NVIDIA GPU with CUDA/cuDNN libraries")
def test_cuda_ranking_matches_cpu(qdq_model, images):
    cpu = loo_sensitivity(qdq_model, images, CPU, reg_max=REG_MAX)
    cuda = loo_sensitivity(qdq_model, images, ["CUDAExecutionProvider", "CPUExecutionProvider"], reg_max=REG_MAX)
    assert [layer["name"] for layer in cuda.layers] == [layer["name"] for layer in cpu.layers]
