"""Random-tensor smoke script: artifacts of a good run, and one clear error per bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lowbit.runs import REPO_ROOT, sha256_file

SMOKE = "models/cv-models/helpers/run_random_onnx_inference.py"


def _tiny_graph(path, input_shape, nodes, outputs, initializers=()):
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, input_shape)],
        outputs,
        initializer=list(initializers),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _relu_model(path, input_shape):
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, input_shape)
    return _tiny_graph(path, input_shape, [helper.make_node("Relu", ["images"], ["y"])], [out])


def _run_dirs(root):
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.exists() else []


def test_smoke_on_tiny_yolov10_writes_complete_artifacts(tiny_yolov10_onnx, tiny_yolov10_spec, tmp_path, load_script):
    root = tmp_path / "baseline-onnx"
    args = ["--model", str(tiny_yolov10_onnx), "--output-root", str(root), "--runs", "3", "--warmup-runs", "1"]
    assert load_script(SMOKE).main(args) == 0
    (run_dir,) = _run_dirs(root)
    smoke = json.loads((run_dir / "smoke.json").read_text())
    assert smoke["status"] == "ok"
    assert smoke["model_sha256"] == sha256_file(tiny_yolov10_onnx)
    assert smoke["providers_requested"] == smoke["providers_used"] == ["CPUExecutionProvider"]
    assert smoke["session_config"] == {} and "CPUExecutionProvider" in smoke["provider_options"]
    assert smoke["inputs"] == [
        {"name": "images", "type": "tensor(float)", "shape": [1, 3, 160, 160], "distribution": "uniform[0,1)"}
    ]
    (output,) = smoke["outputs"]
    assert output["name"] == "/model.23/Concat_3_output_0"
    assert output["shape"] == [1, tiny_yolov10_spec["channels"], tiny_yolov10_spec["anchors"]]
    assert output["dtype"] == "float32"
    assert output["nan_count"] == output["inf_count"] == 0
    assert output["min"] <= output["mean"] <= output["max"] and output["std"] > 0
    latency = smoke["latency_ms"]
    assert len(latency["runs"]) == 3 and all(t > 0 for t in latency["runs"])
    assert latency["min"] <= latency["p50"] <= latency["max"]
    assert smoke["versions"]["onnx"] and smoke["onnxruntime"]["version"]

    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "ok"
    assert manifest["inputs"] == {str(tiny_yolov10_onnx): smoke["model_sha256"]}
    assert manifest["outputs"]["smoke"] == str(run_dir / "smoke.json")
    assert (run_dir / "run.log").read_text()

    # Same seed, same inputs: identical output statistics; a new run directory, nothing overwritten.
    assert load_script(SMOKE).main(args) == 0
    first, second = _run_dirs(root)
    again = json.loads((second / "smoke.json").read_text())
    assert first == run_dir and again["outputs"] == smoke["outputs"]


def test_smoke_runs_as_a_script_from_the_repo_root(tmp_path):
    model = _relu_model(tmp_path / "relu.onnx", [1, 3, 8, 8])
    root = tmp_path / "runs"
    proc = subprocess.run(
        [sys.executable, SMOKE, "--model", str(model), "--output-root", str(root), "--runs", "1"],
        cwd=REPO_ROOT,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok: ")
    (run_dir,) = _run_dirs(root)
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "ok"


def test_symbolic_batch_is_set_to_one(tmp_path, load_script):
    model = _relu_model(tmp_path / "relu.onnx", ["batch", 3, 8, 8])
    root = tmp_path / "runs"
    assert load_script(SMOKE).main(["--model", str(model), "--output-root", str(root), "--runs", "1"]) == 0
    smoke = json.loads((_run_dirs(root)[0] / "smoke.json").read_text())
    assert smoke["inputs"][0]["shape"] == [1, 3, 8, 8] and smoke["batch_assumed_for"] == ["images"]


def _assert_clean_failure(capsys, root, rc, expected_rc, *fragments):
    assert rc == expected_rc
    lines = capsys.readouterr().err.strip().splitlines()
    # one error line, last; argparse's usage errors print the usage above it
    assert [line for line in lines if "error:" in line] == lines[-1:] and "Traceback" not in lines[0], lines
    err = lines[-1]
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert _run_dirs(root) == []  # nothing that could pass for a result


def test_missing_model(tmp_path, capsys, load_script):
    root = tmp_path / "runs"
    rc = load_script(SMOKE).main(["--model", str(tmp_path / "nope.onnx"), "--output-root", str(root)])
    _assert_clean_failure(capsys, root, rc, 2, "--model", "nope.onnx")


def test_dangling_symlink_names_its_target(tmp_path, capsys, load_script):
    link = tmp_path / "checkpoints" / "yolov10m.onnx"
    link.parent.mkdir()
    target = tmp_path / "external" / "yolov10m.onnx"
    link.symlink_to(target)
    root = tmp_path / "runs"
    rc = load_script(SMOKE).main(["--model", str(link), "--output-root", str(root)])
    _assert_clean_failure(capsys, root, rc, 2, "--model", str(target))


@pytest.mark.parametrize("content", [b"", b"this is not a protobuf \x00\xff", b"\x08\x07"])
def test_not_an_onnx_model(tmp_path, capsys, load_script, content):
    model = tmp_path / "model.onnx"
    model.write_bytes(content)
    root = tmp_path / "runs"
    rc = load_script(SMOKE).main(["--model", str(model), "--output-root", str(root)])
    _assert_clean_failure(capsys, root, rc, 2, "--model", str(model))


def test_non_static_dims_need_input_shape(tmp_path, capsys, load_script):
    model = _relu_model(tmp_path / "dyn.onnx", ["N", 3, "height", "width"])
    root = tmp_path / "runs"
    rc = load_script(SMOKE).main(["--model", str(model), "--output-root", str(root)])
    _assert_clean_failure(
        capsys, root, rc, 2, "non-static dims [N, 3, height, width]", "--input-shape images=1,3,height,width"
    )
    args = ["--model", str(model), "--output-root", str(root), "--runs", "1", "--input-shape", "images=1,3,16,24"]
    assert load_script(SMOKE).main(args) == 0
    smoke = json.loads((_run_dirs(root)[0] / "smoke.json").read_text())
    assert smoke["outputs"][0]["shape"] == [1, 3, 16, 24]


@pytest.mark.parametrize("provider", ["DmlExecutionProvider", "NoSuchExecutionProvider"])
def test_unavailable_provider(tmp_path, capsys, load_script, provider):
    model = _relu_model(tmp_path / "relu.onnx", [1, 3, 8, 8])
    root = tmp_path / "runs"
    rc = load_script(SMOKE).main(["--model", str(model), "--output-root", str(root), "--providers", provider])
    _assert_clean_failure(capsys, root, rc, 2, "--providers", provider)


def test_nan_output_fails_with_stats_written(tmp_path, capsys, load_script):
    # Inputs are uniform in [0, 1): log(x - 2) is NaN everywhere, x / 0 is +Inf (or NaN at x == 0).
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    zero = numpy_helper.from_array(np.array(0.0, np.float32), "zero")
    nodes = [
        helper.make_node("Sub", ["images", "two"], ["shifted"]),
        helper.make_node("Log", ["shifted"], ["log_out"]),
        helper.make_node("Div", ["images", "zero"], ["div_out"]),
        helper.make_node("Relu", ["images"], ["ok_out"]),
    ]
    outputs = [
        helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 2, 4, 4])
        for name in ("log_out", "div_out", "ok_out")
    ]
    model = _tiny_graph(tmp_path / "nan.onnx", [1, 2, 4, 4], nodes, outputs, [two, zero])
    root = tmp_path / "runs"
    rc = load_script(SMOKE).main(["--model", str(model), "--output-root", str(root), "--runs", "1"])
    assert rc == 1
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert [line for line in err_lines if "error" in line.lower()] == err_lines[-1:]
    err = err_lines[-1]
    assert err.startswith("error: non-finite values in model outputs")
    assert "log_out (32 NaN, 0 Inf)" in err and "div_out" in err and "ok_out" not in err

    (run_dir,) = _run_dirs(root)
    smoke = json.loads((run_dir / "smoke.json").read_text())
    assert smoke["status"] == "failed" and smoke["non_finite_outputs"] == ["log_out", "div_out"]
    by_name = {o["name"]: o for o in smoke["outputs"]}
    assert by_name["log_out"]["nan_count"] == 32 and by_name["log_out"]["min"] is None
    assert by_name["div_out"]["inf_count"] + by_name["div_out"]["nan_count"] == 32
    assert by_name["ok_out"]["nan_count"] == by_name["ok_out"]["inf_count"] == 0
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "non-finite" in manifest["error"]


@pytest.mark.parametrize("flag, value", [("--runs", "0"), ("--warmup-runs", "-1"), ("--batch", "0")])
def test_counts_must_be_positive(tmp_path, capsys, load_script, flag, value):
    model = _relu_model(tmp_path / "relu.onnx", [1, 3, 8, 8])
    root = tmp_path / "runs"
    rc = load_script(SMOKE).main(["--model", str(model), "--output-root", str(root), flag, value])
    _assert_clean_failure(capsys, root, rc, 2, flag)
