"""scripts/cv-models/eval_yolov10m_onnx_coco.py end to end on a tiny generated COCO-layout dataset.

The "oracle" ONNX models output a constant tensor that encodes the ground-truth boxes of the
dataset (every image has the same size and the same annotations), so a correct pipeline
(letterbox geometry, DFL decode, top-k, box scaling, category mapping, COCO scoring) must reach
mAP 1.0, and any mistake in one of those steps shows up as a lower number.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lowbit.runs import REPO_ROOT

SCRIPT = REPO_ROOT / "scripts" / "cv-models" / "eval_yolov10m_onnx_coco.py"
IMGSZ = 64  # anchors 8*8 + 4*4 + 2*2 = 84
NUM_ANCHORS = 84
IMAGE_W, IMAGE_H = 96, 64  # landscape: letterbox pads top and bottom
IMAGE_IDS = [42, 7, 19]  # unsorted on purpose: evaluation order is ascending id
CATEGORIES = [{"id": 7, "name": "kite"}, {"id": 3, "name": "boat"}]  # contiguous index 0 -> id 3, 1 -> id 7
GT = [(3, [10.0, 8.0, 30.0, 20.0]), (7, [50.0, 30.0, 24.0, 28.0])]  # (category_id, xywh) in every image


def _load_script():
    spec = importlib.util.spec_from_file_location("eval_yolov10m_onnx_coco", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


eval_script = _load_script()


# ---------------------------------------------------------------------------------------------------------------------
# tiny dataset and models


@pytest.fixture()
def dataset(tmp_path) -> Path:
    root = tmp_path / "coco"
    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for image_id in IMAGE_IDS:
        name = f"{image_id:012d}.jpg"
        cv2.imwrite(str(root / "val2017" / name), rng.integers(0, 256, (IMAGE_H, IMAGE_W, 3), dtype=np.uint8))
        images.append({"id": image_id, "file_name": name, "width": IMAGE_W, "height": IMAGE_H})
        for cat_id, box in GT:
            annotations.append(
                {"id": len(annotations) + 1, "image_id": image_id, "category_id": cat_id, "bbox": box,
                 "area": box[2] * box[3], "iscrowd": 0}
            )
    ann = {"images": images, "annotations": annotations, "categories": CATEGORIES}
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(ann))
    return root


def _letterbox_geometry():
    gain = IMGSZ / max(IMAGE_W, IMAGE_H)
    new_w, new_h = min(math.ceil(IMAGE_W * gain), IMGSZ), min(math.ceil(IMAGE_H * gain), IMGSZ)
    pad_x, pad_y = round((IMGSZ - new_w) / 2 - 0.1), round((IMGSZ - new_h) / 2 - 0.1)
    return new_w / IMAGE_W, new_h / IMAGE_H, pad_x, pad_y


def _gt_in_input_pixels():
    gx, gy, px, py = _letterbox_geometry()
    sorted_ids = sorted(c["id"] for c in CATEGORIES)
    out = []
    for cat_id, (x, y, w, h) in GT:
        out.append((sorted_ids.index(cat_id), [x * gx + px, y * gy + py, (x + w) * gx + px, (y + h) * gy + py]))
    return out


def _dfl_logits(distance: float) -> np.ndarray:
    """16 bin logits whose softmax expectation is ``distance`` (mass split over two neighbouring bins)."""
    logits = np.full(16, -100.0, np.float32)
    low = int(math.floor(distance))
    frac = distance - low
    if frac < 1e-6:
        logits[low] = 0.0
    else:
        logits[low], logits[low + 1] = math.log(1 - frac), math.log(frac)
    return logits


def oracle_raw_output(nc: int = 2) -> np.ndarray:
    """[1, 64 + nc, 84] raw head output that decodes to exactly the ground truth (one anchor per box, P3)."""
    raw = np.zeros((1, 64 + nc, NUM_ANCHORS), np.float32)
    raw[0, 64:, :] = -20.0  # sigmoid ~ 2e-9: below --conf, never reported
    grid = IMGSZ // 8
    for cls, (x1, y1, x2, y2) in _gt_in_input_pixels():
        cx, cy = (x1 + x2) / 2 / 8, (y1 + y2) / 2 / 8
        gx, gy = int(cx), int(cy)
        ax, ay = gx + 0.5, gy + 0.5
        anchor = gy * grid + gx
        for side, dist in enumerate([ax - x1 / 8, ay - y1 / 8, x2 / 8 - ax, y2 / 8 - ay]):
            assert 0 <= dist < 15
            raw[0, side * 16 : (side + 1) * 16, anchor] = _dfl_logits(dist)
        raw[0, 64 + cls, anchor] = 10.0
    return raw


def oracle_end2end_output() -> np.ndarray:
    rows = np.zeros((1, 300, 6), np.float32)
    for i, (cls, box) in enumerate(_gt_in_input_pixels()):
        rows[0, i] = [*box, 0.9, cls]
    return rows


def constant_output_model(path: Path, output: np.ndarray, input_shape=(1, 3, IMGSZ, IMGSZ)) -> Path:
    """ONNX model: ``output + 0 * mean(images)`` (the input is really consumed)."""
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, list(input_shape))
    y = helper.make_tensor_value_info("output0", TensorProto.FLOAT, list(output.shape))
    nodes = [
        helper.make_node("ReduceMean", ["images"], ["mean4"], axes=[1, 2, 3], keepdims=1),
        helper.make_node("Reshape", ["mean4", "shape3"], ["mean3"]),
        helper.make_node("Mul", ["mean3", "zero"], ["zeroed"]),
        helper.make_node("Add", ["zeroed", "const"], ["output0"]),
    ]
    inits = [
        numpy_helper.from_array(np.array([1, 1, 1], np.int64), "shape3"),
        numpy_helper.from_array(np.zeros((1, 1, 1), np.float32), "zero"),
        numpy_helper.from_array(output.astype(np.float32), "const"),
    ]
    graph = helper.make_graph(nodes, "oracle", [x], [y], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


@pytest.fixture()
def raw_model(tmp_path) -> Path:
    return constant_output_model(tmp_path / "raw.onnx", oracle_raw_output())


def _args(model: Path, data_root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--onnx-path", str(model), "--data-root", str(data_root), "--imgsz", str(IMGSZ),
        "--warmup-runs", "2", "--skip-latency", "1", "--out", str(out), *extra,
    ]


def _expect_failure(capsys, argv: list[str], out: Path, *fragments: str) -> str:
    rc = eval_script.main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    for fragment in fragments:
        assert fragment in err, err
    assert not out.exists(), "a failed run must not leave metrics.json behind"
    return err


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


def test_end2end_layout_and_max_images_larger_than_set(dataset, tmp_path, capsys):
    model = constant_output_model(tmp_path / "e2e.onnx", oracle_end2end_output())
    out = tmp_path / "run" / "metrics.json"
    rc = eval_script.main(_args(model, dataset, out, "--max-images", "100", "--workers", "0"))
    err = capsys.readouterr().err
    assert rc == 0, err
    metrics = json.loads(out.read_text())
    assert metrics["model"]["output"]["layout"] == "end2end"
    assert metrics["postprocess"]["mode"] == "end2end"
    assert metrics["metrics"]["map50_95"] == pytest.approx(1.0)
    assert metrics["dataset"]["image_ids"] == [7, 19, 42]
    assert "larger than the set; using all 3 images" in err
    assert metrics["dataset"]["notes"] == ["--max-images 100 is larger than the set; using all 3 images"]


def test_nms_mode_and_overwrite(dataset, raw_model, tmp_path, capsys):
    out = tmp_path / "run" / "metrics.json"
    assert eval_script.main(_args(raw_model, dataset, out)) == 0
    _expect_failure_keep = eval_script.main(_args(raw_model, dataset, out, "--nms"))
    assert _expect_failure_keep == 2 and "--overwrite" in capsys.readouterr().err
    assert eval_script.main(_args(raw_model, dataset, out, "--nms", "--overwrite")) == 0
    metrics = json.loads(out.read_text())
    assert metrics["postprocess"] == {"mode": "nms", "conf": 0.001, "iou": 0.7, "max_det": 300, "imgsz": IMGSZ}
    assert metrics["metrics"]["map50_95"] == pytest.approx(1.0)


def test_runs_as_a_script_from_the_repo_root(dataset, raw_model, tmp_path):
    out = tmp_path / "run" / "metrics.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT.relative_to(REPO_ROOT)), *_args(raw_model, dataset, out, "--max-images", "1")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "mAP50-95" in proc.stdout and out.is_file()


# ---------------------------------------------------------------------------------------------------------------------
# bad input: exit 2, a message naming the problem, no metrics.json


def test_missing_data_root(raw_model, tmp_path, capsys):
    out = tmp_path / "run" / "metrics.json"
    _expect_failure(capsys, _args(raw_model, tmp_path / "nowhere", out), out, "--data-root", "does not exist")
    assert not out.parent.exists()  # validation happens before any output folder is made


def test_missing_annotation_file(dataset, raw_model, tmp_path, capsys):
    out = tmp_path / "run" / "metrics.json"
    missing = tmp_path / "missing.json"
    _expect_failure(capsys, _args(raw_model, dataset, out, "--ann-file", str(missing)), out, "--ann-file", str(missing))
    (dataset / "annotations" / "instances_val2017.json").unlink()
    _expect_failure(capsys, _args(raw_model, dataset, out), out, "--data-root", "instances_val2017.json")


def test_missing_image_fails_or_is_skipped(dataset, raw_model, tmp_path, capsys):
    missing = dataset / "val2017" / f"{19:012d}.jpg"
    missing.unlink()
    out = tmp_path / "run" / "metrics.json"
    _expect_failure(capsys, _args(raw_model, dataset, out), out, "1 of 3 images", str(missing), "--skip-missing")
    assert eval_script.main(_args(raw_model, dataset, out, "--skip-missing")) == 0
    metrics = json.loads(out.read_text())
    assert metrics["dataset"]["num_images_skipped"] == 1
    assert metrics["dataset"]["images_skipped"][0]["id"] == 19
    assert metrics["dataset"]["image_ids"] == [7, 42]
    assert metrics["metrics"]["map50_95"] == pytest.approx(1.0)  # the skipped image's boxes are not counted


def test_corrupt_image_fails_or_is_skipped(dataset, raw_model, tmp_path, capsys):
    corrupt = dataset / "val2017" / f"{42:012d}.jpg"
    corrupt.write_bytes(b"not a jpeg")
    out = tmp_path / "run" / "metrics.json"
    _expect_failure(capsys, _args(raw_model, dataset, out), out, "cannot read image", str(corrupt), "--skip-missing")
    manifest = json.loads((out.parent / "manifest.json").read_text())
    assert manifest["status"] == "failed"
    assert eval_script.main(_args(raw_model, dataset, out, "--skip-missing")) == 0
    metrics = json.loads(out.read_text())
    assert metrics["dataset"]["images_skipped"] == [
        {"id": 42, "file": str(corrupt), "reason": "not a decodable image (corrupt or unsupported format)"}
    ]


def test_model_input_not_three_channel_image(dataset, tmp_path, capsys):
    model = constant_output_model(tmp_path / "gray.onnx", oracle_raw_output(), input_shape=(1, 1, IMGSZ, IMGSZ))
    out = tmp_path / "run" / "metrics.json"
    _expect_failure(capsys, _args(model, dataset, out), out, "has shape [1, 1, 64, 64]; expected [1,3,H,W]")


def test_unknown_output_layout(dataset, tmp_path, capsys):
    model = constant_output_model(tmp_path / "odd.onnx", np.zeros((1, 10, NUM_ANCHORS), np.float32))
    out = tmp_path / "run" / "metrics.json"
    _expect_failure(capsys, _args(model, dataset, out), out, "unknown model output layout [1, 10, 84]")


def test_provider_errors(dataset, raw_model, tmp_path, capsys):
    out = tmp_path / "run" / "metrics.json"
    _expect_failure(
        capsys,
        _args(raw_model, dataset, out, "--providers", "CPUExecutionProvider", "--disable-cpu-fallback"),
        out,
        "--disable-cpu-fallback",
    )
    argv = _args(raw_model, dataset, out, "--providers", "GPU")
    _expect_failure(capsys, argv, out, "unknown execution provider 'GPU'")
    assert not out.parent.exists()  # provider checks come before the run folder is made


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--max-images", "0"], "--max-images must be >= 1"),
        (["--imgsz", "100"], "--imgsz must be a positive multiple of 32"),
        (["--imgsz", "128"], "--imgsz 128 does not match the model input"),
        (["--conf", "1.5"], "--conf must be in [0, 1)"),
    ],
)
def test_bad_numbers(dataset, raw_model, tmp_path, capsys, extra, message):
    out = tmp_path / "run" / "metrics.json"
    _expect_failure(capsys, _args(raw_model, dataset, out) + extra, out, message)


def test_missing_model_file(dataset, tmp_path, capsys):
    out = tmp_path / "run" / "metrics.json"
    _expect_failure(capsys, _args(tmp_path / "nope.onnx", dataset, out), out, "--onnx-path", "does not exist")


def test_latency_stats_drop_skipped_samples():
    stats = eval_script.latency_stats([1.0, 0.002, 0.004, 0.006], skip=1, warmup_runs=3)
    assert stats["n"] == 3 and stats["skipped"] == 1 and stats["warmup_runs"] == 3
    assert stats["mean"] == pytest.approx(4.0) and stats["median"] == stats["p50"] == pytest.approx(4.0)
    assert stats["min"] == pytest.approx(2.0) and stats["max"] == pytest.approx(6.0)
    assert eval_script.latency_stats([0.1], skip=5, warmup_runs=0)["mean"] is None


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
    argv = ["--onnx-path", str(tiny_yolov10_onnx), "--data-root", str(root), "--imgsz", str(tiny_yolov10_spec["imgsz"]),
            "--warmup-runs", "1", "--skip-latency", "0", "--out", str(out)]  # fmt: skip
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


def test_benchmark_command_runs(dataset, raw_model, tmp_path, capsys):
    """Smoke run of scripts/cv-models/bench_eval_pipeline.py (the numbers themselves are not asserted)."""
    spec = importlib.util.spec_from_file_location("bench_eval_pipeline", SCRIPT.parent / "bench_eval_pipeline.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench" / "bench.json"
    argv = ["--onnx-path", str(raw_model), "--data-root", str(dataset), "--imgsz", str(IMGSZ), "--max-images", "3",
            "--workers", "1", "--warmup-runs", "1", "--out", str(out)]  # fmt: skip
    assert bench.main(argv) == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    assert result["images"] == 3
    assert set(result["end_to_end_vs_session_run"]) >= {"eval_loop_s", "session_run_s", "overhead_pct"}
    assert set(result["data_pipeline"]) >= {"single_thread_images_per_s", "pool_images_per_s", "scaling_efficiency"}
    assert (out.parent / "eval" / "metrics.json").is_file()
    assert "overhead" in capsys.readouterr().out
