"""Candidate materializer (card step 4c) on the tiny YOLOv10 fixture."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = "scripts/cv-models/materialize_yolov10m_lowbit_candidates.py"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_yolov10_onnx, tiny_yolov10_spec, load_script):
    root = tmp_path_factory.mktemp("mat")
    size = tiny_yolov10_spec["imgsz"]
    calib = root / "calib.npy"
    np.save(calib, np.random.default_rng(0).random((2, 3, size, size), dtype=np.float32))
    convs = [n.name for n in onnx.load(str(tiny_yolov10_onnx), load_external_data=False).graph.node if n.op_type == "Conv"]
    schemes = root / "run" / "schemes"
    schemes.mkdir(parents=True)
    for k, names in ((0, []), (2, convs[3:5])):
        (schemes / f"scheme_k{k}.json").write_text(json.dumps({"k": k, "nodes_to_exclude": names}))
    (schemes / "scheme_k2_random7.json").write_text(json.dumps({"k": 2, "nodes_to_exclude": convs[10:12]}))
    data = root / "data"
    assert load_script("scripts/cv-models/make_demo_dataset.py").main(
        ["--out-root", str(data), "--splits", "val", "--num-val", "3", "--workers", "1"]
    ) == 0
    return {"root": root, "calib": calib, "onnx": tiny_yolov10_onnx, "data": data, "convs": convs, "size": size}


def test_materializes_each_k_with_its_exclusions_and_evaluates(setup, load_script):
    run = setup["root"] / "run"
    argv = ["--run-root", str(run), "--calib-path", str(setup["calib"]), "--onnx-path", str(setup["onnx"]),
            "--ks", "0", "2", "--quant-mode", "int8", "--include-random", "--eval", "--data-root", str(setup["data"]),
            "--max-images", "3", "--imgsz", str(setup["size"]), "--warmup-runs", "0", "--skip-latency", "0"]
    assert load_script(SCRIPT).main(argv) == 0
    summary = json.loads((run / "candidates-int8" / "summary.json").read_text())
    rows = {r["candidate"]: r for r in summary["candidates"]}
    assert set(rows) == {"int8-k0", "int8-k2", "int8-k2_random7"}
    assert rows["int8-k2"]["excluded_nodes"] == setup["convs"][3:5]
    assert rows["int8-k2_random7"]["random_control"] is True
    assert rows["int8-k0"]["num_quantized_nodes"] > rows["int8-k2"]["num_quantized_nodes"]
    for tag in ("k0", "k2"):
        model = run / "onnx" / f"yolov10m-int8-{tag}.onnx"
        quantized = set(json.loads(model.with_suffix(".manifest.json").read_text())["extra"]["quantized_nodes"])
        assert not quantized & set(rows[f"int8-{tag}"]["excluded_nodes"])
        metrics = json.loads((run / f"int8-{tag}-coco" / "metrics.json").read_text())
        assert rows[f"int8-{tag}"]["map50_95"] == metrics["metrics"]["map50_95"]

    # a second run reuses what is complete
    before = (run / "onnx" / "yolov10m-int8-k2.onnx").stat().st_mtime_ns
    assert load_script(SCRIPT).main(argv) == 0
    assert (run / "onnx" / "yolov10m-int8-k2.onnx").stat().st_mtime_ns == before


@pytest.mark.parametrize("case", ["missing_scheme", "int4", "missing_calib"])
def test_bad_input(case, setup, tmp_path, load_script, capsys):
    argv = ["--run-root", str(setup["root"] / "run"), "--calib-path", str(setup["calib"]), "--onnx-path", str(setup["onnx"])]
    expect = {"missing_scheme": "scheme_k5.json", "int4": "Gemm/MatMul", "missing_calib": "--calib-path"}[case]
    if case == "missing_scheme":
        argv += ["--ks", "0", "5"]
    elif case == "int4":
        argv += ["--quant-mode", "int4"]
    else:
        argv[3] = str(tmp_path / "none.npy")
    assert load_script(SCRIPT).main(argv) == 2
    assert expect in capsys.readouterr().err


def test_wrapper_requires_its_env_vars():
    env = {k: v for k, v in os.environ.items() if k not in ("RUN_ROOT", "CALIB_PATH")}
    result = subprocess.run(
        ["bash", str(REPO / "scripts/cv-models/materialize_yolov10m_lowbit_candidates.sh")],
        cwd=REPO, env={**env, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0 and "RUN_ROOT is required" in result.stderr
