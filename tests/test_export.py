"""Raw one-to-one head export: checkpoint-format I/O and names, torch/ONNX agreement, input errors."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from lowbit.cli import imgsz_problem
from lowbit.decode import grid_sizes, num_anchors
from lowbit.errors import UserError
from lowbit.export import (
    check_export_imgsz,
    export_raw_head_onnx,
    head_output_name,
    load_yolov10,
    prepare_raw_head_model,
    raw_head_reference,
)

EXPORTER = "scripts/cv-models/export_yolov10_raw_onnx.py"
OUTPUT = "/model.23/Concat_3_output_0"


def _dims(value_info):
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value_info.type.tensor_type.shape.dim]


def test_io_matches_checkpoint_format(tiny_yolov10_onnx, tiny_yolov10_spec):
    model = onnx.load(str(tiny_yolov10_onnx))
    imgsz = tiny_yolov10_spec["imgsz"]
    assert [i.name for i in model.graph.input] == ["images"]
    assert [o.name for o in model.graph.output] == [OUTPUT]
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert _dims(model.graph.input[0]) == [1, 3, imgsz, imgsz]
    assert _dims(model.graph.output[0]) == [1, tiny_yolov10_spec["channels"], tiny_yolov10_spec["anchors"]]
    onnx.checker.check_model(model, full_check=True)


def test_node_names_follow_the_module_hierarchy(tiny_yolov10_onnx):
    graph = onnx.load(str(tiny_yolov10_onnx)).graph
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert convs[0].name == "/model.0/conv/Conv"
    assert all(re.fullmatch(r"/model\.\d+(/[\w.]+)*/Conv", n.name) for n in convs), [n.name for n in convs]
    # Conv+BN fused: no BatchNormalization left, every Conv carries a bias.
    assert not [n for n in graph.node if n.op_type == "BatchNormalization"]
    assert all(len(n.input) == 3 for n in convs)
    # Only the one-to-one head is exported; the one-to-many branch (cv2/cv3) is gone.
    head_convs = [n.name for n in convs if n.name.startswith("/model.23/")]
    assert head_convs and all("/one2one_cv" in name for name in head_convs)
    last = [n for n in graph.node if OUTPUT in n.output]
    assert len(last) == 1 and last[0].op_type == "Concat" and last[0].name == "/model.23/Concat_3"
    # The three per-level concatenations (box DFL + class logits) feed it through Reshapes.
    assert {n.name for n in graph.node if n.op_type == "Concat" and n.name.startswith("/model.23/")} == {
        "/model.23/Concat",
        "/model.23/Concat_1",
        "/model.23/Concat_2",
        "/model.23/Concat_3",
    }


def test_onnx_matches_ultralytics_one2one_outputs(tiny_yolov10_pt, tiny_yolov10_onnx, tiny_yolov10_spec):
    # Reference: ultralytics' own unmodified forward, one2one boxes (64 DFL logits) + class logits.
    loaded = load_yolov10(tiny_yolov10_pt)
    imgsz = tiny_yolov10_spec["imgsz"]
    images = torch.rand(1, 3, imgsz, imgsz, generator=torch.Generator().manual_seed(123))
    reference = raw_head_reference(loaded.model, images).numpy()
    with torch.no_grad():
        _, preds = loaded.model(images)
    assert np.array_equal(reference[:, :64], preds["one2one"]["boxes"].numpy())

    session = ort.InferenceSession(str(tiny_yolov10_onnx), providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {"images": images.numpy()})
    assert output.shape == reference.shape == (1, tiny_yolov10_spec["channels"], tiny_yolov10_spec["anchors"])
    scale = np.abs(reference).max()
    assert np.abs(output - reference).max() <= 1e-4 * scale
    # The output depends on the image (not just head biases), so the agreement covers the backbone.
    other = raw_head_reference(loaded.model, torch.rand(images.shape, generator=torch.Generator().manual_seed(7)))
    assert np.abs(other.numpy() - reference).max() > 100 * np.abs(output - reference).max()
    # The one-to-many branch differs (it is a separate head), so matching it would be a wrong export.
    many = torch.cat((preds["one2many"]["boxes"], preds["one2many"]["scores"]), 1).numpy()
    assert np.abs(output - many).max() > 1e-3


def test_yaml_export_with_other_nc_and_imgsz(tmp_path, load_script):
    out = tmp_path / "tiny-nc3.onnx"
    rc = load_script(EXPORTER).main(["--weights", "yolov10n.yaml", "--nc", "3", "--imgsz", "64", "--out", str(out)])
    assert rc == 0
    model = onnx.load(str(out))
    assert _dims(model.graph.output[0]) == [1, 64 + 3, num_anchors(64)] == [1, 67, 84]
    manifest = json.loads(out.with_suffix(".manifest.json").read_text())
    assert manifest["status"] == "ok"
    assert manifest["extra"]["agreement"]["rel_diff"] <= 1e-4
    assert manifest["extra"]["graph"]["output_name"] == OUTPUT
    assert oct(out.stat().st_mode & 0o777) != oct(0o600)  # not the temp file's private mode


def test_output_name_rule():
    assert head_output_name(23, 3) == OUTPUT
    assert num_anchors(640) == 8400


def test_grid_sizes_are_the_backbone_feature_maps_at_a_side_off_the_stride(tiny_yolov10_pt):
    # The backbone (layers 0-10, each fed by the one before) downsamples with stride-2 convs, kernel 3, pad 1:
    # out = ceil(in / 2). At 100 px its maps are 50, 25, then 13 / 7 / 4 at strides 8 / 16 / 32, the grids the
    # anchors sit on: ceil(100 / s), not 100 // s (12 / 6 / 3).
    backbone = load_yolov10(tiny_yolov10_pt).model.model[:11]
    assert all(layer.f == -1 for layer in backbone)
    x, sides = torch.zeros(1, 3, 100, 100), []
    with torch.no_grad():
        for layer in backbone:
            x = layer(x)
            sides.append(tuple(x.shape[-2:]))
    assert list(dict.fromkeys(sides))[2:] == grid_sizes(100) == [(13, 13), (7, 7), (4, 4)]
    assert num_anchors(100) == 13 * 13 + 7 * 7 + 4 * 4


def test_anchor_count_is_what_the_exported_graph_outputs_at_a_side_off_the_stride(tiny_yolov10_pt, tmp_path):
    # 90 is no multiple of 32, yet the whole model runs on it: its grids 12 / 6 / 3 (ceil(90 / s)) line up with
    # the neck's x2 upsampling. The exporter checks its graph against num_anchors, so the count must be what the
    # graph really outputs (rounding down would expect 11 / 5 / 2, 150 anchors, and refuse the export).
    model = prepare_raw_head_model(load_yolov10(tiny_yolov10_pt).model)
    out = tmp_path / "side90.onnx"
    graph = export_raw_head_onnx(model, out, 90)
    assert graph["output_shape"] == [1, 144, num_anchors(90)] == [1, 144, 12 * 12 + 6 * 6 + 3 * 3]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {"images": np.zeros((1, 3, 90, 90), np.float32)})
    assert output.shape == (1, 144, num_anchors(90))
    # The command line still asks for a multiple of the largest stride (the cli rule, then the model's own).
    with pytest.raises(UserError) as raised:
        check_export_imgsz(90, 32)
    assert raised.value.flag == "--imgsz"
    with pytest.raises(UserError, match="multiple of 64"):
        check_export_imgsz(96, 64)  # a P6 model's stride is stricter than the cli's 32
    assert check_export_imgsz(640, 32) == 640


def _refused_flag(load_script, argv: list[str]) -> str:
    """The flag of the UserError ``main`` refuses ``argv`` with."""
    with pytest.raises(UserError) as raised:
        load_script(EXPORTER).main.__wrapped__(argv)
    return raised.value.flag


@pytest.mark.parametrize(
    "weights",
    [
        "{tmp}/missing.pt",
        "{tmp}/no/such/dir/model.yaml",
        "nonexistent-arch.yaml",  # neither a file nor an architecture shipped with ultralytics
        "{tmp}/model.onnx",  # not a .pt or .yaml
        "{tmp}/dangling.pt",
    ],
)
def test_bad_weights_path(tmp_path, capsys, load_script, weights):
    (tmp_path / "dangling.pt").symlink_to(tmp_path / "gone.pt")
    out = tmp_path / "out.onnx"
    argv = ["--weights", weights.format(tmp=tmp_path), "--out", str(out)]
    rc = load_script(EXPORTER).main(argv)
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --weights") and len(err.splitlines()) == 1
    if weights.endswith("dangling.pt"):
        assert str(tmp_path / "gone.pt") in err  # the link's target is named
    assert _refused_flag(load_script, argv) == "--weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling.pt"]  # nothing written


def test_not_a_checkpoint(tmp_path, load_script):
    weights = tmp_path / "garbage.pt"
    weights.write_text("not a checkpoint")
    out = tmp_path / "out.onnx"
    argv = ["--weights", str(weights), "--out", str(out)]
    assert load_script(EXPORTER).main(argv) == 2
    assert _refused_flag(load_script, argv) == "--weights"
    assert not out.exists() and not out.with_suffix(".manifest.json").exists()


def test_model_without_one2one_head_is_refused(tmp_path, load_script):
    argv = ["--weights", "yolov8n.yaml", "--imgsz", "64", "--out", str(tmp_path / "o.onnx")]
    assert _refused_flag(load_script, argv) == "--weights"
    assert list(tmp_path.iterdir()) == []


def test_nc_mismatch_for_checkpoint(tmp_path, load_script, tiny_yolov10_pt):
    argv = ["--weights", str(tiny_yolov10_pt), "--nc", "3", "--out", str(tmp_path / "o.onnx")]
    assert load_script(EXPORTER).main(argv) == 2
    assert _refused_flag(load_script, argv) == "--nc"


def test_imgsz_must_be_a_stride_multiple(tmp_path, capsys, load_script):
    rc = load_script(EXPORTER).main(["--weights", "yolov10n.yaml", "--imgsz", "100", "--out", str(tmp_path / "o.onnx")])
    assert rc == 2  # argparse's usage error, naming the flag
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("error: argument --imgsz: " + imgsz_problem(100))
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite(tmp_path, capsys, load_script):
    out = tmp_path / "exists.onnx"
    out.write_bytes(b"keep me")
    rc = load_script(EXPORTER).main(["--weights", "yolov10n.yaml", "--imgsz", "64", "--out", str(out)])
    assert rc == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (
        _refused_flag(load_script, ["--weights", "yolov10n.yaml", "--imgsz", "64", "--out", str(out)]) == "--overwrite"
    )
    assert out.read_bytes() == b"keep me"
