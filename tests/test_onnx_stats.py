"""Model stats: parameter and MAC counts checked against independent counts, the card's block layout."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from lowbit.errors import UserError
from lowbit.export import exported_parameter_count, load_yolov10, prepare_raw_head_model
from lowbit.onnx_stats import format_markdown, model_stats, parse_input_shapes

STATS = "scripts/cv-models/onnx_model_stats.py"


def _save(model: onnx.ModelProto, path):
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _compute_graph(tmp_path, batch_dim="N"):
    """Grouped Conv, batched MatMul and a transposed Gemm with hand-computable MACs.

    Conv: x [N,4,10,12], W [6,2,3,3] (groups=2, pad 1) -> [N,6,10,12]: 720 * (2*3*3) = 12960 per image.
    MatMul: a [N,5,7] @ b [7,3] -> [N,5,3]: 15 * 7 = 105 per image.
    Gemm: g [7,4] with transA -> A^T [4,7] @ B [7,2] -> [4,2]: 8 * 7 = 56 (no batch dim).
    """
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((6, 2, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "bias"),
        numpy_helper.from_array(rng.standard_normal((7, 3)).astype(np.float32), "b"),
        numpy_helper.from_array(rng.standard_normal((7, 2)).astype(np.float32), "gb"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "bias"], ["y"], name="conv", group=2, pads=[1, 1, 1, 1]),
        helper.make_node("MatMul", ["a", "b"], ["m"], name="matmul"),
        helper.make_node("Gemm", ["g", "gb"], ["h"], name="gemm", transA=1),
        helper.make_node("Relu", ["y"], ["y_relu"], name="relu"),
    ]
    graph = helper.make_graph(
        nodes,
        "compute",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch_dim, 4, 10, 12]),
            helper.make_tensor_value_info("a", TensorProto.FLOAT, [batch_dim, 5, 7]),
            helper.make_tensor_value_info("g", TensorProto.FLOAT, [7, 4]),
        ],
        [
            helper.make_tensor_value_info("y_relu", TensorProto.FLOAT, [batch_dim, 6, 10, 12]),
            helper.make_tensor_value_info("m", TensorProto.FLOAT, [batch_dim, 5, 3]),
            helper.make_tensor_value_info("h", TensorProto.FLOAT, [4, 2]),
        ],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return _save(model, tmp_path / "compute.onnx")


def test_macs_of_hand_built_graph_are_exact(tmp_path):
    path = _compute_graph(tmp_path)
    stats = model_stats(path)
    assert stats["macs_by_op_type"] == {"Conv": 12960, "MatMul": 105, "Gemm": 56}
    assert stats["macs"] == 12960 + 105 + 56 and stats["flops"] == 2 * stats["macs"]
    assert stats["unresolved_compute_nodes"] == []
    assert stats["param_count"] == 6 * 2 * 3 * 3 + 6 + 7 * 3 + 7 * 2
    assert stats["param_bytes"] == 4 * stats["param_count"]
    assert stats["batch_assumed_for"] == ["x", "a"]
    assert stats["input_shapes"] == {"x": [1, 4, 10, 12], "a": [1, 5, 7], "g": [7, 4]}
    assert {o["name"]: o["shape"] for o in stats["outputs"]} == {"y_relu": [1, 6, 10, 12], "m": [1, 5, 3], "h": [4, 2]}

    batch3 = model_stats(path, batch=3)
    assert batch3["macs_by_op_type"] == {"Conv": 3 * 12960, "MatMul": 3 * 105, "Gemm": 56}


def test_symbolic_non_batch_dims_need_an_input_shape(tmp_path):
    inits = [numpy_helper.from_array(np.ones((2, 3, 1, 1), np.float32), "w")]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["images", "w"], ["y"], name="conv")],
        "dyn",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, "H", "W"])],
        initializer=inits,
    )
    path = _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "dyn.onnx")
    with pytest.raises(UserError, match=r"non-static dims \[N, 3, H, W\].*--input-shape images=1,3,H,W"):
        model_stats(path)
    stats = model_stats(path, input_shapes=parse_input_shapes(["images=1,3,8,16"]))
    assert stats["macs"] == 2 * 8 * 16 * 3
    with pytest.raises(UserError, match="dim 1 is fixed to 3"):
        model_stats(path, input_shapes=parse_input_shapes(["1,4,8,8"]))
    with pytest.raises(UserError, match="no model input named pixels"):
        model_stats(path, input_shapes=parse_input_shapes(["pixels=1,3,8,8"]))


def test_parameters_match_the_torch_model(tiny_yolov10_pt, tiny_yolov10_onnx):
    # Independent count: parameters of the fused torch model the graph was exported from.
    model = prepare_raw_head_model(load_yolov10(tiny_yolov10_pt).model)
    stats = model_stats(tiny_yolov10_onnx)
    assert stats["param_count"] == exported_parameter_count(model)
    assert stats["param_bytes"] == 4 * stats["param_count"]
    assert stats["file_size_bytes"] == tiny_yolov10_onnx.stat().st_size


def test_conv_macs_match_torch_hooks(tiny_yolov10_pt, tiny_yolov10_onnx, tiny_yolov10_spec):
    # Independent count: forward hooks on every nn.Conv2d of the fused model at the export size.
    model = prepare_raw_head_model(load_yolov10(tiny_yolov10_pt).model)
    conv_macs = []

    def hook(module, _inputs, output):
        conv_macs.append(output.numel() * (module.in_channels // module.groups) * module.weight[0, 0].numel())

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    imgsz = tiny_yolov10_spec["imgsz"]
    with torch.no_grad():
        model(torch.zeros(1, 3, imgsz, imgsz))
    for handle in handles:
        handle.remove()
    stats = model_stats(tiny_yolov10_onnx)
    assert stats["macs_by_op_type"]["Conv"] == sum(conv_macs)
    assert stats["macs_by_op_type"]["MatMul"] > 0  # the PSA attention block
    assert stats["unresolved_compute_nodes"] == []


# The card's block, line by line (numbers replaced by patterns).
CARD_BLOCK = [
    r"## Model Stats",
    r"",
    r"- \*\*ONNX file size\*\*: \d+\.\d\d MiB",
    r"- \*\*Parameter count\*\*: [\d,]+",
    r"- \*\*Parameter bytes\*\*: \d+\.\d\d MiB",
    r"- \*\*Compute \(MACs\)\*\*: \d+\.\d{3} GMACs @ input \[1, 3, 160, 160\] \(Conv/MatMul/Gemm\)",
    r"- \*\*Compute \(FLOPs\)\*\*: \d+\.\d{3} GFLOPs @ 2 FLOPs per MAC",
    r"- \*\*Assumed batch\*\*: 1 \(for symbolic batch dims\)",
    r"",
    (
        r"- \*\*Notes\*\*: Parameter count/bytes are computed from ONNX initializer tensors; compute is MACs from "
        r"Conv/MatMul/Gemm nodes only \(elementwise ops excluded\)\."
    ),
    r"",
    r"## ONNX I/O",
    r"",
    r"\*\*Inputs\*\* \(shape-inferred\)",
    r"- `images`: `FLOAT` `\[1, 3, 160, 160\]`",
    r"",
    r"\*\*Outputs\*\*",
    r"- `/model\.23/Concat_3_output_0`: `FLOAT` `\[1, 144, 525\]`",
]


def test_markdown_has_the_card_layout(tiny_yolov10_onnx, capsys, load_script):
    rc = load_script(STATS).main(["--model", str(tiny_yolov10_onnx), "--markdown"])
    assert rc == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(CARD_BLOCK)
    for pattern, line in zip(CARD_BLOCK, lines):
        assert re.fullmatch(pattern, line), (pattern, line)


def test_markdown_numbers_format_like_the_card():
    stats = {
        "file_size_mib": 61_550_000 / 2**20,
        "param_count": 15_359_498,
        "param_mib": 15_359_498 * 4 / 2**20,
        "gmacs": 29.6176,
        "gflops": 59.2352,
        "compute_ops": ["Conv", "MatMul", "Gemm"],
        "input_shapes": {"images": [1, 3, 640, 640]},
        "assumed_batch": 1,
        "unresolved_compute_nodes": [],
        "inputs": [{"name": "images", "dtype": "FLOAT", "shape": [1, 3, 640, 640]}],
        "outputs": [{"name": "/model.23/Concat_3_output_0", "dtype": "FLOAT", "shape": [1, 144, 8400]}],
    }
    text = format_markdown(stats)
    assert "- **Parameter count**: 15,359,498\n" in text
    assert "- **Parameter bytes**: 58.59 MiB\n" in text
    assert "- **Compute (MACs)**: 29.618 GMACs @ input [1, 3, 640, 640] (Conv/MatMul/Gemm)\n" in text
    assert "- **Compute (FLOPs)**: 59.235 GFLOPs @ 2 FLOPs per MAC\n" in text
    assert "- `/model.23/Concat_3_output_0`: `FLOAT` `[1, 144, 8400]`\n" in text


def test_json_out_with_manifest_and_no_silent_overwrite(tiny_yolov10_onnx, tmp_path, capsys, load_script):
    out = tmp_path / "stats" / "stats.json"
    script = load_script(STATS)
    assert script.main(["--model", str(tiny_yolov10_onnx), "--json-out", str(out)]) == 0
    stats = json.loads(out.read_text())
    assert stats["outputs"][0]["shape"] == [1, 144, 525]
    assert stats["flops"] == 2 * stats["macs"] > 0
    manifest = json.loads(out.with_suffix(".manifest.json").read_text())
    assert manifest["status"] == "ok" and str(tiny_yolov10_onnx) in manifest["inputs"]
    before = out.read_text()
    capsys.readouterr()
    assert script.main(["--model", str(tiny_yolov10_onnx), "--json-out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert out.read_text() == before
    assert script.main(["--model", str(tiny_yolov10_onnx), "--json-out", str(out), "--overwrite"]) == 0


@pytest.mark.parametrize("content", [None, b"plain text", b""])
def test_bad_model_file(tmp_path, capsys, load_script, content):
    model = tmp_path / "model.onnx"
    if content is not None:
        model.write_bytes(content)
    rc = load_script(STATS).main(["--model", str(model)])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --model") and str(model) in err and len(err.splitlines()) == 1
