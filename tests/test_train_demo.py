"""train_demo_detector.py: a tiny offline CPU run produces a checkpoint, metrics and a completed manifest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lowbit import synth
from lowbit.errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = "scripts/cv-models/train_demo_detector.py"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train-demo") / "demo-shapes"
    synth.generate_split(root, "train", 16, workers=1)
    synth.generate_split(root, "val", 8, workers=1)
    return root / "yolo" / "data.yaml"


def test_tiny_cpu_training_run(tiny_data: Path, tmp_path: Path):
    # A subprocess, as users run it: ultralytics reads YOLO_OFFLINE/YOLO_CONFIG_DIR at import time, and
    # deterministic torch settings must not leak into other tests.
    env = {k: v for k, v in os.environ.items() if not k.startswith("YOLO_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    flags = {"--data": tiny_data, "--epochs": 1, "--batch": 4, "--workers": 0, "--imgsz": 64, "--device": "cpu"}
    flags.update({"--cache": "none", "--project": tmp_path, "--name": "run"})
    cmd = [sys.executable, str(REPO_ROOT / SCRIPT), *(str(part) for flag in flags.items() for part in flag)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    run_dir = tmp_path / "run"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    best = Path(metrics["best_pt"])
    assert best.is_file() and best.parent == run_dir / "ultralytics" / "weights"
    assert metrics["epochs_completed"] == 1
    for key in ("map50_95", "map50", "precision", "recall"):
        assert isinstance(metrics[key], float) and 0.0 <= metrics[key] <= 1.0
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "ok" and manifest["outputs"]["best_pt"] == str(best)
    # ultralytics' settings stayed inside the run directory, with network sync off
    settings = json.loads(next((run_dir / "ultralytics-settings").rglob("settings.json")).read_text())
    assert settings["sync"] is False
    args = (run_dir / "ultralytics" / "args.yaml").read_text()
    assert "plots: false" in args and "hsv_h: 0.0" in args and "seed: 0" in args

    import torch

    checkpoint = torch.load(best, map_location="cpu", weights_only=False)
    model = checkpoint["ema"] or checkpoint["model"]
    assert model.yaml["nc"] == 80 and "v10Detect" in str(model.yaml["head"])
    assert model.names[0] == "red circle" and len(model.names) == 80


def test_missing_data_names_the_flag_and_generator(load_script, tmp_path: Path, capsys):
    argv = ["--data", str(tmp_path / "nope.yaml"), "--project", str(tmp_path)]
    assert load_script(SCRIPT).main(argv) == 2
    assert "make_demo_dataset.py" in capsys.readouterr().err  # says how to make the missing file
    with pytest.raises(UserError) as raised:
        load_script(SCRIPT).main.__wrapped__(argv)
    assert raised.value.flag == "--data"
    assert not any(tmp_path.iterdir()), "no run directory for a rejected command"


def test_missing_train_split_is_reported(tmp_path: Path, load_script, capsys):
    synth.generate_split(tmp_path / "ds", "val", 2, workers=1)
    argv = ["--data", str(tmp_path / "ds" / "yolo" / "data.yaml"), "--project", str(tmp_path)]
    assert load_script(SCRIPT).main(argv) == 2
    assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(UserError) as raised:
        load_script(SCRIPT).main.__wrapped__(argv)
    assert raised.value.flag == "--data"


def test_imgsz_must_be_a_stride_multiple(tiny_data: Path, load_script, tmp_path: Path, capsys):
    rc = load_script(SCRIPT).main(["--data", str(tiny_data), "--imgsz", "100", "--project", str(tmp_path)])
    assert rc == 2 and "--imgsz" in capsys.readouterr().err
