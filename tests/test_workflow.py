"""The main job end to end on the tiny fixture: every step, the report, and a second run that skips everything."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
WORKFLOW = REPO / "scripts/cv-models/run_yolov10m_lowbit_workflow.py"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_yolov10_onnx, tiny_yolov10_spec, load_script):
    root = tmp_path_factory.mktemp("wf")
    data = root / "data"
    assert load_script("scripts/cv-models/make_demo_dataset.py").main(
        ["--out-root", str(data), "--splits", "val", "--num-val", "6", "--workers", "1"]
    ) == 0
    calib_list = root / "calib.txt"
    calib_list.write_text("".join(f"{p}\n" for p in sorted((data / "val2017").glob("*.jpg"))[4:6]))
    argv = [
        "--onnx-path", str(tiny_yolov10_onnx), "--data-root", str(data), "--calib-list", str(calib_list),
        "--max-images", "4", "--imgsz", str(tiny_yolov10_spec["imgsz"]), "--ks", "0", "2",
        "--sensitivity-images", "2", "--output-root", str(root / "runs"), "--run-id", "tiny",
    ]
    return root, argv


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(WORKFLOW), *argv], cwd=REPO, capture_output=True, text=True, timeout=900)


def test_workflow_end_to_end_then_resume(tiny_run):
    root, argv = tiny_run
    first = _run(argv)
    assert first.returncode == 0, first.stderr[-3000:]
    run = root / "runs" / "tiny"
    for path in ("baseline-coco/metrics.json", "calib/calib_yolov10m_160.npy", "onnx/yolov10m-int8-qdq.onnx",
                 "int8-coco/metrics.json", "schemes/scheme_k0.json", "schemes/scheme_k2.json",
                 "onnx/yolov10m-fp8-k0.onnx", "onnx/yolov10m-fp8-k2.onnx", "fp8-k2-coco/metrics.json",
                 "schemes-int8/scheme_k2.json", "onnx/yolov10m-int8-k2.onnx", "int8-k2-coco/metrics.json",
                 "report.md", "report.json", "pareto.png"):
        assert (run / path).exists(), path
    # INT8 with no exclusions is the int8 step; it is not quantized a second time as a K=0 candidate
    assert not (run / "onnx" / "yolov10m-int8-k0.onnx").exists()
    assert list((run / "baseline-onnx").glob("*/smoke.json"))

    # the report's numbers are the per-step metrics files' numbers
    report = json.loads((run / "report.json").read_text())
    by_metrics = {Path(v["metrics_path"]).resolve(): v for v in report["variants"]}
    for metrics_path in run.glob("*-coco/metrics.json"):
        metrics = json.loads(metrics_path.read_text())["metrics"]
        variant = by_metrics[metrics_path.resolve()]
        assert variant["map50_95"] == metrics["map50_95"] and variant["map50"] == metrics["map50"]
    assert len(by_metrics) == 5  # FP32, INT8, FP8 K=0, FP8 K=2, INT8 K=2

    # second run: every step is skipped, nothing is rewritten
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and ".steps" not in p.parts and p.name != "workflow.json" and p.suffix != ".log"}
    second = _run(argv)
    assert second.returncode == 0, second.stderr[-3000:]
    step_lines = [line for line in second.stderr.splitlines() if "] " in line and ("skipped" in line or "running" in line)]
    assert step_lines and all("skipped" in line for line in step_lines), "\n".join(step_lines)
    after = {p: p.stat().st_mtime_ns for p in before}
    assert before == after

    # --force reruns one step (and only what depends on a changed output)
    third = _run([*argv, "--force", "report"])
    assert third.returncode == 0
    assert any("report" in line and "running" in line for line in third.stderr.splitlines())


def test_missing_checkpoint_is_one_clear_error(tmp_path):
    result = _run(["--onnx-path", str(tmp_path / "nope.onnx"), "--output-root", str(tmp_path)])
    assert result.returncode == 2
    assert "--onnx-path" in result.stderr and "does not exist" in result.stderr
    assert not any(tmp_path.iterdir())


def test_failed_step_leaves_no_record(tmp_path, tiny_run):
    root, argv = tiny_run
    bad_list = tmp_path / "bad.txt"
    bad_list.write_text(str(tmp_path / "missing.jpg") + "\n")
    args = [a if a != str(root / "calib.txt") else str(bad_list) for a in argv]
    args[args.index("--run-id") + 1] = "broken"
    result = _run(args)
    assert result.returncode == 1 and "step calib failed" in result.stderr
    run = root / "runs" / "broken"
    assert not (run / ".steps" / "calib.json").exists() and not (run / "calib" / "calib_yolov10m_160.npy").exists()
    assert not (run / "report.md").exists()
