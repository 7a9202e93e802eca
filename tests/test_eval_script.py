"""scripts/cv-models/eval_yolov10m_onnx_coco.py: the command line over lowbit.evaluate, end to end.

Uses the oracle datasets and models of test_evaluate.py (constant outputs that decode to the ground
truth, so a correct pipeline reaches mAP 1.0). Failures are checked by exit status, by the flag the
error is about (the same settings run through lowbit.evaluate), and by the absence of metrics.json.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from test_evaluate import (
    GT,
    IMGSZ,
    NUM_ANCHORS,
    constant_output_model,
    make_dataset,
    oracle_end2end_output,
    oracle_raw_output,
)

from lowbit.errors import UserError
from lowbit.evaluate import EvalSettings, evaluate
from lowbit.runs import REPO_ROOT

SCRIPT = REPO_ROOT / "scripts" / "cv-models" / "eval_yolov10m_onnx_coco.py"


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


eval_script = _load(SCRIPT)


@pytest.fixture()
def dataset(tmp_path) -> Path:
    return make_dataset(tmp_path / "coco")


@pytest.fixture()
def raw_model(tmp_path) -> Path:
    return constant_output_model(tmp_path / "raw.onnx", oracle_raw_output())


def _args(model: Path, data_root: Path, out: Path, *extra: str) -> list[str]:
    timing = f"--imgsz {IMGSZ} --warmup-runs 2 --skip-latency 1".split()
    return ["--onnx-path", str(model), "--data-root", str(data_root), *timing, "--out", str(out), *extra]


def _expect_failure(argv: list[str], out: Path, flag: str) -> None:
    """Exit status 2 from the command line, a UserError about ``flag`` from the library, no metrics.json."""
    assert eval_script.main(argv) == 2
    assert not out.exists(), "a failed run must not leave metrics.json behind"
    with pytest.raises(UserError) as info:
        evaluate(EvalSettings(**vars(eval_script.build_parser().parse_args(argv))))
    assert info.value.flag == flag, info.value
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------------
# happy paths


def test_oracle_raw_model_scores_map_one(dataset, raw_model, tmp_path, capsys):
    out = tmp_path / "run" / "metrics.json"
    rc = eval_script.main(_args(raw_model, dataset, out, "--max-images", "2", "--workers", "2"))
    stdout = capsys.readouterr().out
    assert rc == 0
    metrics = json.loads(out.read_text())
    assert metrics["metrics"]["map50_95"] == pytest.approx(1.0)
    assert metrics["metrics"]["map50"] == pytest.approx(1.0)
    assert metrics["metrics"]["per_class_ap"] == {"boat": pytest.approx(1.0), "kite": pytest.approx(1.0)}
    assert metrics["dataset"]["image_ids"] == [7, 19]  # first two ids in ascending order
    assert metrics["dataset"]["num_images_in_set"] == 3
    assert metrics["model"]["output"] == {"name": "output0", "shape": [1, 66, 84], "layout": "raw", "num_classes": 2}
    assert metrics["model"]["sha256"] and metrics["dataset"]["ann_sha256"]
    assert metrics["postprocess"]["mode"] == "topk"
    assert metrics["providers"]["providers_used"] == ["CPUExecutionProvider"]
    latency = metrics["latency_ms"]
    assert latency["n"] == 1 and latency["skipped"] == 1 and latency["warmup_runs"] == 2
    assert set(latency) >= {"mean", "median", "p50", "p90", "p95", "p99", "min", "max", "std"}
    assert set(metrics["stages_ms"]) == {"decode", "preprocess", "inference", "postprocess", "wait"}
    assert metrics["throughput"]["images"] == 2 and metrics["throughput"]["images_per_s"] > 0

    detections = json.loads((out.parent / "detections.json").read_text())
    assert len(detections) == 4 and {d["category_id"] for d in detections} == {3, 7}
    for det in detections:  # boxes come back in original pixels
        expected = dict(GT)[det["category_id"]]
        np.testing.assert_allclose(det["bbox"], expected, atol=0.01)
    manifest = json.loads((out.parent / "manifest.json").read_text())
    assert manifest["status"] == "ok" and manifest["outputs"]["metrics"] == str(out)
    assert (out.parent / "eval.log").is_file()
    assert "mAP50-95   1.0000" in stdout
    assert "latency    on CPUExecutionProvider:" in stdout  # the summary names the device of the latency


def test_end2end_layout_and_max_images_larger_than_set(dataset, tmp_path, capsys):
    model = constant_output_model(tmp_path / "e2e.onnx", oracle_end2end_output())
    out = tmp_path / "run" / "metrics.json"
    rc = eval_script.main(_args(model, dataset, out, "--max-images", "100", "--workers", "0"))
    assert rc == 0, capsys.readouterr().err
    metrics = json.loads(out.read_text())
    assert metrics["model"]["output"]["layout"] == "end2end"
    assert metrics["postprocess"]["mode"] == "end2end"
    assert metrics["metrics"]["map50_95"] == pytest.approx(1.0)
    assert metrics["dataset"]["image_ids"] == [7, 19, 42]
    assert metrics["dataset"]["notes"] == ["--max-images 100 is larger than the set; using all 3 images"]


def test_skip_images_selects_the_later_slice_and_refuses_an_empty_one(dataset, tmp_path, capsys):
    model = constant_output_model(tmp_path / "e2e.onnx", oracle_end2end_output())
    out = tmp_path / "later" / "metrics.json"
    rc = eval_script.main(_args(model, dataset, out, "--skip-images", "1", "--max-images", "1", "--workers", "0"))
    assert rc == 0, capsys.readouterr().err
    metrics = json.loads(out.read_text())
    assert metrics["dataset"]["image_ids"] == [19] and metrics["dataset"]["skip_images"] == 1
    assert {d["image_id"] for d in json.loads((out.parent / "detections.json").read_text())} <= {19}
    empty = tmp_path / "empty" / "metrics.json"
    assert eval_script.main(_args(model, dataset, empty, "--skip-images", "3", "--workers", "0")) == 2
    assert "--skip-images" in capsys.readouterr().err and not empty.parent.exists()


def test_nms_mode_and_overwrite(dataset, raw_model, tmp_path):
    out = tmp_path / "run" / "metrics.json"
    assert eval_script.main(_args(raw_model, dataset, out)) == 0
    first = out.read_bytes()
    assert eval_script.main(_args(raw_model, dataset, out, "--nms")) == 2  # a completed result is kept
    assert out.read_bytes() == first
    with pytest.raises(UserError) as info:
        evaluate(EvalSettings(**vars(eval_script.build_parser().parse_args(_args(raw_model, dataset, out)))))
    assert info.value.flag == "--overwrite"
    assert eval_script.main(_args(raw_model, dataset, out, "--nms", "--overwrite")) == 0
    metrics = json.loads(out.read_text())
    assert metrics["postprocess"] == {"mode": "nms", "conf": 0.001, "iou": 0.7, "max_det": 300, "imgsz": IMGSZ}
    assert metrics["metrics"]["map50_95"] == pytest.approx(1.0)


def test_runs_as_a_script_from_the_repo_root(dataset, raw_model, tmp_path):
    out = tmp_path / "run" / "metrics.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT.relative_to(REPO_ROOT)), *_args(raw_model, dataset, out, "--max-images", "1")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "mAP50-95" in proc.stdout and out.is_file()


# ---------------------------------------------------------------------------------------------------------------------
# bad input: exit 2, a message naming the problem, no metrics.json


def test_missing_data_root(raw_model, tmp_path):
    out = tmp_path / "run" / "metrics.json"
    _expect_failure(_args(raw_model, tmp_path / "nowhere", out), out, "--data-root")
    assert not out.parent.exists()  # validation happens before any output folder is made


def test_missing_annotation_file(dataset, raw_model, tmp_path):
    out = tmp_path / "run" / "metrics.json"
    _expect_failure(_args(raw_model, dataset, out, "--ann-file", str(tmp_path / "missing.json")), out, "--ann-file")
    (dataset / "annotations" / "instances_val2017.json").unlink()
    _expect_failure(_args(raw_model, dataset, out), out, "--data-root")


def test_missing_image_fails_or_is_skipped(dataset, raw_model, tmp_path):
    missing = dataset / "val2017" / f"{19:012d}.jpg"
    missing.unlink()
    out = tmp_path / "run" / "metrics.json"
    _expect_failure(_args(raw_model, dataset, out), out, "--data-root")
    assert eval_script.main(_args(raw_model, dataset, out, "--skip-missing")) == 0
    metrics = json.loads(out.read_text())
    assert metrics["dataset"]["num_images_skipped"] == 1
    assert metrics["dataset"]["images_skipped"][0]["id"] == 19
    assert metrics["dataset"]["image_ids"] == [7, 42]
    assert metrics["metrics"]["map50_95"] == pytest.approx(1.0)  # the skipped image's boxes are not counted


def test_corrupt_image_fails_or_is_skipped(dataset, raw_model, tmp_path):
    corrupt = dataset / "val2017" / f"{42:012d}.jpg"
    corrupt.write_bytes(b"not a jpeg")
    out = tmp_path / "run" / "metrics.json"
    _expect_failure(_args(raw_model, dataset, out), out, "--data-root")
    manifest = json.loads((out.parent / "manifest.json").read_text())
    assert manifest["status"] == "failed"
    assert eval_script.main(_args(raw_model, dataset, out, "--skip-missing")) == 0
    metrics = json.loads(out.read_text())
    assert [(s["id"], s["file"]) for s in metrics["dataset"]["images_skipped"]] == [(42, str(corrupt))]


def test_model_input_not_three_channel_image(dataset, tmp_path):
    model = constant_output_model(tmp_path / "gray.onnx", oracle_raw_output(), input_shape=(1, 1, IMGSZ, IMGSZ))
    out = tmp_path / "run" / "metrics.json"
    _expect_failure(_args(model, dataset, out), out, "--onnx-path")


def test_unknown_output_layout(dataset, tmp_path):
    model = constant_output_model(tmp_path / "odd.onnx", np.zeros((1, 10, NUM_ANCHORS), np.float32))
    out = tmp_path / "run" / "metrics.json"
    _expect_failure(_args(model, dataset, out), out, "--onnx-path")


def test_nan_output_exits_two_without_metrics(dataset, tmp_path):
    output = oracle_raw_output()
    output[0, 64, :] = np.nan  # every logit of one class
    model = constant_output_model(tmp_path / "nan.onnx", output)
    out = tmp_path / "run" / "metrics.json"
    _expect_failure(_args(model, dataset, out), out, "--onnx-path")
    assert not (out.parent / "detections.json").exists()


def test_provider_errors(dataset, raw_model, tmp_path):
    out = tmp_path / "run" / "metrics.json"
    argv = _args(raw_model, dataset, out, "--providers", "CPUExecutionProvider", "--disable-cpu-fallback")
    assert eval_script.main(argv) == 2 and not out.exists()
    with pytest.raises(UserError) as info:
        evaluate(EvalSettings(**vars(eval_script.build_parser().parse_args(argv))))
    assert info.value.flag in ("--providers", "--disable-cpu-fallback")
    _expect_failure(_args(raw_model, dataset, out, "--providers", "GPU"), out, "--providers")
    assert not out.parent.exists()  # provider checks come before the run folder is made


@pytest.mark.parametrize(
    "extra, flag",
    [
        (["--max-images", "0"], "--max-images"),
        (["--imgsz", "100"], "--imgsz"),
        (["--imgsz", "128"], "--imgsz"),  # a multiple of 32, but not the model's input size
        (["--conf", "1.5"], "--conf"),
        (["--iou", "0"], "--iou"),
        (["--max-det", "0"], "--max-det"),
        (["--workers", "-1"], "--workers"),
        (["--warmup-runs", "-1"], "--warmup-runs"),
        (["--skip-latency", "-1"], "--skip-latency"),
    ],
)
def test_bad_numbers(dataset, raw_model, tmp_path, extra, flag):
    out = tmp_path / "run" / "metrics.json"
    argv = _args(raw_model, dataset, out) + extra
    assert eval_script.main(argv) == 2 and not out.exists()
    # the library checks the same value for callers that build EvalSettings themselves
    value = float(extra[1]) if "." in extra[1] else int(extra[1])
    s = EvalSettings(
        **{
            **vars(eval_script.build_parser().parse_args(_args(raw_model, dataset, out))),
            flag.lstrip("-").replace("-", "_"): value,
        }
    )
    with pytest.raises(UserError) as info:
        evaluate(s)
    assert info.value.flag == flag and not out.exists()


def test_cudnn_search_outside_the_offered_values(dataset, raw_model, tmp_path, capsys):
    out = tmp_path / "run" / "metrics.json"
    # argparse's choices: ORT's DEFAULT is not offered
    assert eval_script.main(_args(raw_model, dataset, out, "--cudnn-conv-algo-search", "DEFAULT")) == 2
    assert "--cudnn-conv-algo-search" in capsys.readouterr().err and not out.exists()
    s = EvalSettings(
        **{
            **vars(eval_script.build_parser().parse_args(_args(raw_model, dataset, out))),
            "cudnn_conv_algo_search": "DEFAULT",
        }
    )
    with pytest.raises(UserError) as info:
        evaluate(s)
    assert info.value.flag == "--cudnn-conv-algo-search" and not out.exists()


def test_missing_model_file(dataset, tmp_path):
    out = tmp_path / "run" / "metrics.json"
    _expect_failure(_args(tmp_path / "nope.onnx", dataset, out), out, "--onnx-path")


def test_exported_yolov10_onnx_runs_end_to_end(tiny_yolov10_onnx, tiny_yolov10_spec, tmp_path, capsys):
    """The real raw-head export (nc=80, 160 px) against a COCO-style set with 80 category ids."""
    root = tmp_path / "coco80"
    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    rng = np.random.default_rng(0)
    images = []
    for image_id, (h, w) in enumerate([(120, 200), (300, 90)], start=1):
        cv2.imwrite(str(root / "val2017" / f"{image_id}.jpg"), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        images.append({"id": image_id, "file_name": f"{image_id}.jpg", "width": w, "height": h})
    coco_like_ids = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]  # COCO's 80
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 50, 40], "area": 2000, "iscrowd": 0},
        {"id": 2, "image_id": 2, "category_id": 90, "bbox": [5, 50, 60, 100], "area": 6000, "iscrowd": 0},
    ]
    categories = [{"id": i, "name": f"c{i}"} for i in coco_like_ids]
    ann = {"images": images, "annotations": annotations, "categories": categories}
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(ann))
    out = tmp_path / "run" / "metrics.json"
    timing = f"--imgsz {tiny_yolov10_spec['imgsz']} --warmup-runs 1 --skip-latency 0".split()
    argv = ["--onnx-path", str(tiny_yolov10_onnx), "--data-root", str(root), *timing, "--out", str(out)]
    assert eval_script.main(argv) == 0, capsys.readouterr().err
    metrics = json.loads(out.read_text())
    assert metrics["model"]["output"]["shape"] == [1, 144, tiny_yolov10_spec["anchors"]]
    assert metrics["model"]["output"]["layout"] == "raw" and metrics["model"]["output"]["num_classes"] == 80
    detections = json.loads((out.parent / "detections.json").read_text())
    assert len(detections) == 2 * 300  # random weights: every top-k row clears conf 0.001
    assert {d["category_id"] for d in detections} <= set(coco_like_ids)
    for det in detections:  # clipped to the original image
        w, h = (200, 120) if det["image_id"] == 1 else (90, 300)
        x, y, bw, bh = det["bbox"]
        assert 0 <= x <= x + bw <= w + 1e-3 and 0 <= y <= y + bh <= h + 1e-3


def test_benchmark_prints_both_ratios_and_a_row_per_worker_count(dataset, raw_model, tmp_path, capsys):
    """scripts/cv-models/bench_eval_pipeline.py on a tiny slice (the speeds themselves are not asserted)."""
    bench = _load(SCRIPT.parent / "bench_eval_pipeline.py")
    out = tmp_path / "bench" / "bench.json"
    sweep = f"--imgsz {IMGSZ} --max-images 3 --workers 0 2 --warmup-runs 1".split()
    argv = ["--onnx-path", str(raw_model), "--data-root", str(dataset), *sweep, "--out", str(out)]
    assert bench.main(argv) == 0, capsys.readouterr().err
    stdout = capsys.readouterr().out
    result = json.loads(out.read_text())
    metric = result["metric_step"]
    assert metric["identical"] and metric["max_abs_stat_diff"] <= 1e-4 and metric["detections"] == 6
    assert metric["faster_coco_eval_s"] > 0 and metric["pycocotools_s"] > 0 and metric["speedup"] > 0
    assert result["session_run"]["images"] == 3 and result["session_run"]["images_per_s"] > 0
    assert [row["workers"] for row in result["end_to_end"]] == [0, 2]
    for row in result["end_to_end"]:
        assert row["ratio_to_session_run"] > 0 and row["latency_provider"] == "CPUExecutionProvider"
        assert Path(row["metrics_path"]).is_file()
    assert result["best_workers"] in (0, 2)
    assert "(a) metric" in stdout and "(b) session.run alone" in stdout
    assert "workers  0" in stdout and "workers  2" in stdout
    assert bench.main(argv) == 2 and json.loads(out.read_text()) == result  # nothing completed is overwritten
