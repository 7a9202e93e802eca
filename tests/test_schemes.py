"""lowbit.schemes and make_yolov10m_candidate_schemes.py: report layers -> exact ONNX node exclusions, on the tiny YOLOv10 graph."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from lowbit import schemes
from lowbit import sensitivity_report as report_io
from lowbit.errors import UserError
from lowbit.runs import sha256_file

SCRIPT = "scripts/cv-models/make_yolov10m_candidate_schemes.py"


def _conv_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.op_type == "Conv"]


def _write_report(path: Path, layers: list[dict], source: str = "torch", precision: str = "fp8") -> Path:
    report = report_io.make_report(
        source=source,
        model=Path("models/yolo10/yolov10m.pt"),
        model_sha256="0" * 64,
        precision=precision,
        method={"name": "test", "description": "synthetic", "score": "s", "higher_is_more_sensitive": True},
        data={"images": 1, "source": "none", "imgsz": 160},
        device="cpu",
        wall_s=0.0,
        layers=report_io.rank_layers(layers),
    )
    path.write_text(json.dumps(report))
    return path


def _torch_layers(model: onnx.ModelProto, seed: int = 0) -> list[dict]:
    """A torch-sweep style ranking of every Conv: module names, half with ``weight`` given, no ``onnx_node``."""
    scores = np.random.default_rng(seed).random(len(_conv_nodes(model)))
    layers = []
    for i, (node, score) in enumerate(zip(_conv_nodes(model), scores)):
        module = node.input[1][: -len(".weight")]
        layers.append(
            {
                "name": module,
                "op_type": "Conv2d",
                "weight": node.input[1] if i % 2 else None,
                "onnx_node": None,
                "score": float(score),
            }
        )
    return layers


@pytest.fixture(scope="module")
def fp32_model(tiny_yolov10_onnx) -> onnx.ModelProto:
    return onnx.load(str(tiny_yolov10_onnx))


@pytest.fixture(scope="module")
def torch_report(fp32_model, tmp_path_factory) -> Path:
    return _write_report(tmp_path_factory.mktemp("report") / "layer-sensitivity-report.json", _torch_layers(fp32_model))


def _run(load_script, *args) -> int:
    return load_script(SCRIPT).main([str(a) for a in args])


def test_torch_report_maps_through_weight_names(load_script, fp32_model, torch_report, tiny_yolov10_onnx, tmp_path):
    out = tmp_path / "schemes"
    rc = _run(
        load_script,
        "--report-json",
        torch_report,
        "--out-dir",
        out,
        "--onnx-path",
        tiny_yolov10_onnx,
        "--random-control",
        7,
    )
    assert rc == 0
    by_weight = {n.input[1]: n.name for n in _conv_nodes(fp32_model)}
    ranked = json.loads(torch_report.read_text())["layers"]
    node_names = {n.name for n in fp32_model.graph.node}
    from lowbit import quantize

    for k in (0, 5, 10, 20):
        scheme = json.loads((out / f"scheme_k{k}.json").read_text())
        assert scheme["k"] == k and scheme["precision"] == "fp8"
        assert scheme["layers"] == [layer["name"] for layer in ranked[:k]]
        assert scheme["nodes_to_exclude"] == [by_weight[layer["name"] + ".weight"] for layer in ranked[:k]]
        assert scheme["report_sha256"] == sha256_file(torch_report)
        assert scheme["onnx_sha256"] == sha256_file(tiny_yolov10_onnx)
        assert Path(scheme["report"]) == torch_report and Path(scheme["onnx_path"]) == tiny_yolov10_onnx
        # exact names: each anchored pattern the quantizer builds selects exactly its own node
        for name in scheme["nodes_to_exclude"]:
            assert name in node_names
            pattern = quantize.exact_patterns([name])[0]
            assert [n for n in node_names if re.match(pattern, n)] == [name]
        # and the quantizer accepts the file as --exclude-json
        args = argparse.Namespace(nodes_to_exclude=[], exclude_json=out / f"scheme_k{k}.json")
        assert quantize.parse_exclusions(args, node_names) == scheme["nodes_to_exclude"]
    assert json.loads((out / "scheme_k0.json").read_text())["nodes_to_exclude"] == []

    summary = json.loads((out / "schemes_summary.json").read_text())
    assert summary["ks"] == [0, 5, 10, 20]
    assert summary["matched_count"] == len(ranked) and summary["unmatched"] == []
    assert summary["matched_via"] == {"weight": len(ranked)}
    assert json.loads((out / "manifest.json").read_text())["status"] == "ok"

    randoms = sorted(out.glob("scheme_k*_random7.json"))
    assert [p.name for p in randoms] == ["scheme_k10_random7.json", "scheme_k20_random7.json", "scheme_k5_random7.json"]
    matched_nodes = set(by_weight.values())
    for path in randoms:
        scheme = json.loads(path.read_text())
        assert scheme["random_seed"] == 7
        assert len(scheme["nodes_to_exclude"]) == len(set(scheme["nodes_to_exclude"])) == scheme["k"]
        assert set(scheme["nodes_to_exclude"]) <= matched_nodes


def test_random_control_is_deterministic(load_script, torch_report, tiny_yolov10_onnx, tmp_path):
    picks = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert (
            _run(
                load_script,
                "--report-json",
                torch_report,
                "--out-dir",
                out,
                "--onnx-path",
                tiny_yolov10_onnx,
                "--k",
                0,
                10,
                "--random-control",
                3,
            )
            == 0
        )
        names = sorted(p.name for p in out.glob("scheme_k*.json"))
        assert names == ["scheme_k0.json", "scheme_k10.json", "scheme_k10_random3.json"]
        picks.append(json.loads((out / "scheme_k10_random3.json").read_text())["nodes_to_exclude"])
    assert picks[0] == picks[1]


def test_maps_through_qdq_weights_and_by_name_convention(load_script, fp32_model, torch_report, tmp_path):
    ranked = json.loads(torch_report.read_text())["layers"]
    expected = {n.input[1][: -len(".weight")]: n.name for n in _conv_nodes(fp32_model)}

    # (a) a Q/DQ graph: weights reach their Conv through QuantizeLinear -> DequantizeLinear
    qdq = onnx.ModelProto()
    qdq.CopyFrom(fp32_model)
    extra = []
    for node in _conv_nodes(qdq):
        weight = node.input[1]
        scale, zero = f"{weight}_scale", f"{weight}_zero_point"
        qdq.graph.initializer.extend(
            [
                helper.make_tensor(scale, onnx.TensorProto.FLOAT, [], [0.01]),
                helper.make_tensor(zero, onnx.TensorProto.INT8, [], [0]),
            ]
        )
        extra += [
            helper.make_node("QuantizeLinear", [weight, scale, zero], [f"{weight}_q"], name=f"{weight}_QuantizeLinear"),
            helper.make_node("DequantizeLinear", [f"{weight}_q", scale, zero], [f"{weight}_dq"], name=f"{weight}_DQ"),
        ]
        node.input[1] = f"{weight}_dq"
    nodes = extra + list(qdq.graph.node)
    del qdq.graph.node[:]
    qdq.graph.node.extend(nodes)
    qdq_path = tmp_path / "qdq.onnx"
    onnx.save(qdq, str(qdq_path))
    out = tmp_path / "via_qdq"
    assert _run(load_script, "--report-json", torch_report, "--out-dir", out, "--onnx-path", qdq_path, "--k", 10) == 0
    scheme = json.loads((out / "scheme_k10.json").read_text())
    assert scheme["nodes_to_exclude"] == [expected[layer["name"]] for layer in ranked[:10]]
    assert json.loads((out / "schemes_summary.json").read_text())["matched_via"] == {"weight": len(ranked)}

    # (b) opaque initializer names (as some exporters write them): only the node-name convention links them
    opaque = onnx.ModelProto()
    opaque.CopyFrom(fp32_model)
    renames = {init.name: f"onnx::Conv_{i}" for i, init in enumerate(opaque.graph.initializer)}
    for init in opaque.graph.initializer:
        init.name = renames[init.name]
    for node in opaque.graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = renames.get(name, name)
    opaque_path = tmp_path / "opaque.onnx"
    onnx.save(opaque, str(opaque_path))
    out = tmp_path / "via_names"
    rc = _run(load_script, "--report-json", torch_report, "--out-dir", out, "--onnx-path", opaque_path, "--k", 20)
    assert rc == 0
    scheme = json.loads((out / "scheme_k20.json").read_text())
    assert scheme["nodes_to_exclude"] == [expected[layer["name"]] for layer in ranked[:20]]
    summary = json.loads((out / "schemes_summary.json").read_text())
    assert summary["matched_via"] == {"name_convention": len(ranked)}
    assert "/model.2/cv1/conv/Conv" in {m["onnx_node"] for m in summary["matched"] if m["name"] == "model.2.cv1.conv"}


def test_onnx_report_uses_its_node_names(load_script, fp32_model, tiny_yolov10_onnx, tmp_path):
    adds = [n.name for n in fp32_model.graph.node if n.op_type == "Add"][:3]
    convs = [n for n in _conv_nodes(fp32_model)][:5]
    layers = [
        {"name": a, "op_type": "Add", "weight": None, "onnx_node": a, "score": 10.0 - i} for i, a in enumerate(adds)
    ]
    layers += [
        {"name": c.name, "op_type": "Conv", "weight": c.input[1], "onnx_node": c.name, "score": 1.0 - 0.1 * i}
        for i, c in enumerate(convs)
    ]
    report = _write_report(tmp_path / "onnx-report.json", layers, source="onnx", precision="int8")
    out = tmp_path / "out"
    rc = _run(load_script, "--report-json", report, "--out-dir", out, "--onnx-path", tiny_yolov10_onnx, "--k", 0, 5)
    assert rc == 0
    scheme = json.loads((out / "scheme_k5.json").read_text())
    assert scheme["nodes_to_exclude"] == adds + [c.name for c in convs[:2]]
    assert scheme["precision"] == "int8"
    assert json.loads((out / "schemes_summary.json").read_text())["matched_via"] == {"onnx_node": 8}


def test_fails_when_too_many_top_layers_do_not_map(fp32_model, tiny_yolov10_onnx, tmp_path):
    layers = _torch_layers(fp32_model)
    for i, layer in enumerate(sorted(layers, key=lambda x: -x["score"])[:20]):
        if i % 4:  # 15 of the top 20: names and weights that exist in no graph
            layer.update(name=f"backbone.block{i}.conv", weight=None)
    report = _write_report(tmp_path / "bogus.json", layers)
    out = tmp_path / "out"
    with pytest.raises(UserError) as exc:
        schemes.build_schemes(report, tiny_yolov10_onnx, out, [0, 5, 10, 20])
    assert exc.value.flag == "--max-unmatched-frac"
    assert not out.exists()

    # a few unmatched layers (3 of the top 20 = 15% <= 20%) are skipped and listed; K still counts mapped nodes
    layers = _torch_layers(fp32_model)
    top = sorted(layers, key=lambda x: -x["score"])
    for layer in top[:3]:
        layer.update(name=layer["name"].replace("model.", "net."), weight=None)
    report = _write_report(tmp_path / "few.json", layers)
    result = schemes.build_schemes(report, tiny_yolov10_onnx, out, [0, 5, 10, 20])
    assert [u["rank"] for u in result.summary["unmatched"]] == [1, 2, 3]
    assert all(u["reason"] for u in result.summary["unmatched"])
    scheme = json.loads((out / "scheme_k20.json").read_text())
    assert len(scheme["nodes_to_exclude"]) == 20 and scheme["layers"][0] == top[3]["name"]


@pytest.mark.parametrize(
    ("ks", "frac", "flag"),
    [([0, 10_000], 0.2, "--k"), ([-1], 0.2, "--k"), ([], 0.2, "--k"), ([5], 1.5, "--max-unmatched-frac")],
)
def test_bad_settings_name_their_flag(ks, frac, flag, torch_report, tiny_yolov10_onnx, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UserError) as exc:
        schemes.build_schemes(torch_report, tiny_yolov10_onnx, out, ks, max_unmatched_frac=frac)
    assert exc.value.flag == flag
    assert not out.exists()


def test_bad_k_and_overwrite(load_script, torch_report, tiny_yolov10_onnx, tmp_path):
    out = tmp_path / "out"
    assert (
        _run(load_script, "--report-json", torch_report, "--out-dir", out, "--onnx-path", tiny_yolov10_onnx, "--k", -1)
        == 2
    )
    assert not out.exists()
    assert (
        _run(
            load_script,
            "--report-json",
            torch_report,
            "--out-dir",
            out,
            "--onnx-path",
            tiny_yolov10_onnx,
            "--random-control",
            1,
        )
        == 0
    )
    with pytest.raises(UserError) as exc:
        schemes.build_schemes(torch_report, tiny_yolov10_onnx, out, [0, 5])
    assert exc.value.flag == "--overwrite"
    # --overwrite replaces the whole set: the random controls of the first run do not linger
    assert (
        _run(
            load_script,
            "--report-json",
            torch_report,
            "--out-dir",
            out,
            "--onnx-path",
            tiny_yolov10_onnx,
            "--k",
            0,
            5,
            "--overwrite",
        )
        == 0
    )
    assert sorted(p.name for p in out.glob("scheme_k*.json")) == ["scheme_k0.json", "scheme_k5.json"]

    missing = tmp_path / "missing.json"
    rc = _run(load_script, "--report-json", missing, "--out-dir", tmp_path / "o2", "--onnx-path", tiny_yolov10_onnx)
    assert rc == 2 and not (tmp_path / "o2").exists()
    with pytest.raises(UserError) as exc:
        load_script(SCRIPT).main.__wrapped__(["--report-json", str(missing), "--out-dir", str(tmp_path / "o2")])
    assert exc.value.flag == "--report-json"
    not_a_report = tmp_path / "not_a_report.json"
    not_a_report.write_text("[1, 2]")
    with pytest.raises(UserError) as exc:
        schemes.build_schemes(not_a_report, tiny_yolov10_onnx, tmp_path / "o3", [0])
    assert exc.value.flag == "--report-json"


@pytest.mark.parametrize(
    "content",
    [
        "",  # zero bytes
        "not json",
        "[]",
        '{"nodes_to_exclude": []}',  # no k
        '{"k": 1, "nodes_to_exclude": "a"}',
        '{"k": 2, "nodes_to_exclude": ["a"]}',  # k disagrees with the list
        '{"k": 2, "nodes_to_exclude": ["a", "a"]}',
        '{"k": -1, "nodes_to_exclude": []}',
        '{"k": true, "nodes_to_exclude": ["a"]}',
        '{"k": 1, "nodes_to_exclude": [3]}',
        '{"k": 0, "nodes_to_exclude": [], "random_seed": "x"}',
    ],
)
def test_malformed_scheme_is_a_user_error(content, tmp_path):
    path = tmp_path / "scheme_k0.json"
    path.write_text(content)
    with pytest.raises(UserError) as exc:
        schemes.load_scheme(path, "--schemes-dir")
    assert exc.value.flag == "--schemes-dir"


def test_scheme_file_name_must_match_its_k(tmp_path):
    path = tmp_path / "scheme_k5.json"
    path.write_text(json.dumps({"k": 0, "nodes_to_exclude": []}))
    with pytest.raises(UserError) as exc:
        schemes.load_scheme(path, "--schemes-dir")
    assert exc.value.flag == "--schemes-dir"
    path = tmp_path / "scheme_k2_random3.json"
    path.write_text(json.dumps({"k": 2, "nodes_to_exclude": ["a", "b"], "random_seed": 3}))
    scheme = schemes.load_scheme(path, "--schemes-dir")
    assert (scheme.k, scheme.random_seed, scheme.tag) == (2, 3, "k2_random3")


def test_find_schemes_names_the_missing_k(tmp_path):
    schemes.write_scheme(tmp_path / "scheme_k0.json", {"k": 0, "nodes_to_exclude": []})
    with pytest.raises(UserError) as exc:
        schemes.find_schemes(tmp_path, [0, 5], include_random=False)
    assert exc.value.flag == "--schemes-dir"
    assert [s.k for s in schemes.find_schemes(tmp_path, [0], include_random=True)] == [0]


def test_spearman_averages_ties_like_scipy():
    assert report_io.spearman([1, 2, 3, 4], [1, 2, 3, 4]) == pytest.approx(1.0)
    assert report_io.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert report_io.spearman([1], [1]) is None
    assert report_io.spearman([1, 1, 1], [1, 2, 3]) is None
    # ties share their average rank: [1, 2.5, 2.5, 4] against [1, 2, 3, 4]
    assert report_io.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833, abs=1e-6)
