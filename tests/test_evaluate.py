"""lowbit.evaluate on tiny generated COCO-layout datasets and tiny ONNX models.

The "oracle" ONNX models output a constant tensor that encodes the ground-truth boxes of the
dataset (every image has the same size and the same annotations), so a correct pipeline
(letterbox geometry, DFL decode, top-k, box scaling, category mapping, COCO scoring) must reach
mAP 1.0, and any mistake in one of those steps shows up as a lower number. Noisy variants of the
same outputs give non-trivial APs, which must equal pycocotools' (the reference) within 1e-4.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lowbit import coco_eval, ort_session
from lowbit.errors import UserError
from lowbit.evaluate import EvalResult, EvalSettings, NonFiniteOutputError, evaluate, latency_provider
from lowbit.latency import latency_stats
from lowbit.runs import REPO_ROOT

IMGSZ = 64  # anchors 8*8 + 4*4 + 2*2 = 84
NUM_ANCHORS = 84
IMAGE_W, IMAGE_H = 96, 64  # landscape: letterbox pads top and bottom
IMAGE_IDS = [42, 7, 19]  # unsorted on purpose: evaluation order is ascending id
CATEGORIES = [{"id": 7, "name": "kite"}, {"id": 3, "name": "boat"}]  # contiguous index 0 -> id 3, 1 -> id 7
GT = [(3, [10.0, 8.0, 30.0, 20.0]), (7, [50.0, 30.0, 24.0, 28.0])]  # (category_id, xywh) in every image
DEMO_ONNX = REPO_ROOT / "models/cv-models/yolov10n-demo-shapes/yolov10n-demo-shapes.onnx"


# ---------------------------------------------------------------------------------------------------------------------
# tiny dataset and models (also used by test_eval_script.py)


def make_dataset(root: Path, annotate: bool = True) -> Path:
    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for image_id in IMAGE_IDS:
        name = f"{image_id:012d}.jpg"
        cv2.imwrite(str(root / "val2017" / name), rng.integers(0, 256, (IMAGE_H, IMAGE_W, 3), dtype=np.uint8))
        images.append({"id": image_id, "file_name": name, "width": IMAGE_W, "height": IMAGE_H})
        for cat_id, box in GT if annotate else []:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": cat_id,
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                }
            )
    ann = {"images": images, "annotations": annotations, "categories": CATEGORIES}
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(ann))
    return root


@pytest.fixture()
def dataset(tmp_path) -> Path:
    return make_dataset(tmp_path / "coco")


def _letterbox_geometry():
    gain = IMGSZ / max(IMAGE_W, IMAGE_H)
    new_w, new_h = min(math.ceil(IMAGE_W * gain), IMGSZ), min(math.ceil(IMAGE_H * gain), IMGSZ)
    pad_x, pad_y = round((IMGSZ - new_w) / 2 - 0.1), round((IMGSZ - new_h) / 2 - 0.1)
    return new_w / IMAGE_W, new_h / IMAGE_H, pad_x, pad_y


def gt_in_input_pixels():
    gx, gy, px, py = _letterbox_geometry()
    sorted_ids = sorted(c["id"] for c in CATEGORIES)
    out = []
    for cat_id, (x, y, w, h) in GT:
        out.append((sorted_ids.index(cat_id), [x * gx + px, y * gy + py, (x + w) * gx + px, (y + h) * gy + py]))
    return out


def _dfl_logits(distance: float) -> np.ndarray:
    """16 bin logits whose softmax expectation is ``distance`` (mass split over two neighbouring bins)."""
    logits = np.full(16, -100.0, np.float32)
    low = math.floor(distance)
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
    for cls, (x1, y1, x2, y2) in gt_in_input_pixels():
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
    for i, (cls, box) in enumerate(gt_in_input_pixels()):
        rows[0, i] = [*box, 0.9, cls]
    return rows


def noisy_end2end_output(seed: int = 0) -> np.ndarray:
    """[1, 300, 6] rows: 120 jittered copies of the ground truth (some far off, some of the wrong class), scores
    spread over (0, 1), sorted by score; the other rows are empty (score 0, never reported)."""
    rng = np.random.default_rng(seed)
    truth = gt_in_input_pixels()
    rows = np.zeros((1, 300, 6), np.float32)
    for i in range(120):
        cls, box = truth[i % len(truth)]
        spread = 1.5 + (i % 5) if i % 3 else 12.0
        x1, y1, x2, y2 = np.clip(np.asarray(box) + rng.normal(0, spread, 4), 0, IMGSZ)
        label = cls if rng.random() < 0.8 else 1 - cls
        rows[0, i] = [min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2), rng.uniform(0.01, 0.99), label]
    return rows[:, np.argsort(-rows[0, :, 4], kind="stable")]


def noisy_decoded_output(seed: int = 0) -> np.ndarray:
    """[1, 4 + 2, 84] decoded layout (cx, cy, w, h + sigmoid scores) from the noisy end-to-end rows."""
    rows = noisy_end2end_output(seed)[0][:NUM_ANCHORS]
    out = np.zeros((1, 6, NUM_ANCHORS), np.float32)
    out[0, 0] = (rows[:, 0] + rows[:, 2]) / 2
    out[0, 1] = (rows[:, 1] + rows[:, 3]) / 2
    out[0, 2] = rows[:, 2] - rows[:, 0]
    out[0, 3] = rows[:, 3] - rows[:, 1]
    cls = rows[:, 5].astype(int)
    out[0, 4 + cls, np.arange(NUM_ANCHORS)] = rows[:, 4]
    return out


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


def settings(model: Path, data_root: Path, out: Path, **overrides) -> EvalSettings:
    return EvalSettings(
        onnx_path=model, data_root=data_root, imgsz=IMGSZ, warmup_runs=2, skip_latency=1, out=out, **overrides
    )


def expect_user_error(s: EvalSettings, flag: str, error=UserError) -> UserError:
    """The run fails with ``error`` about ``flag`` and leaves no metrics.json."""
    with pytest.raises(error) as info:
        evaluate(s)
    assert info.value.flag == flag, info.value
    assert not Path(s.out).exists(), "a failed run must not leave metrics.json behind"
    return info.value


def assert_same_as_pycocotools(result: EvalResult) -> None:
    """metrics.json's 12 stats equal pycocotools' on the written detections.json, within 1e-4."""
    ann_file = Path(result.record["dataset"]["ann_file"])
    coco = coco_eval.load_coco(ann_file)
    records = json.loads(result.detections_path.read_text())
    reference = coco_eval.pycocotools_stats(coco, records, result.record["dataset"]["image_ids"])
    ours = [result.record["metrics"][k] for k in coco_eval.STAT_KEYS]
    np.testing.assert_allclose(ours, reference, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# the API and metrics.json


def test_settings_mirror_the_cli_flags(load_script):
    parser = load_script("scripts/cv-models/eval_yolov10m_onnx_coco.py").build_parser()
    defaults = vars(parser.parse_args(["--onnx-path", "m.onnx"]))
    fields = {f.name for f in dataclasses.fields(EvalSettings)}
    assert fields == set(defaults)
    assert dataclasses.asdict(EvalSettings(onnx_path=Path("m.onnx"))) == defaults


def test_oracle_model_scores_one_with_timed_stages(dataset, raw_model, tmp_path):
    out = tmp_path / "run" / "metrics.json"
    result = evaluate(settings(raw_model, dataset, out, max_images=2, workers=2))
    assert isinstance(result, EvalResult) and result.path == out and result.run_dir == out.parent
    assert result.map50_95 == pytest.approx(1.0) and result.map50 == pytest.approx(1.0)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result.record))
    record = result.record
    assert record["kind"] == "metrics" and record["schema_version"] == 1  # what its readers look for
    assert record["metrics"]["per_class_ap"] == {"boat": pytest.approx(1.0), "kite": pytest.approx(1.0)}
    assert record["dataset"]["image_ids"] == [7, 19]
    assert set(record["timing_s"]) == {"prepare", "session_create", "warmup", "infer", "postprocess", "score", "total"}
    assert record["latency_ms"]["provider"] == "CPUExecutionProvider"
    assert record["latency_ms"]["cpu_nodes"] is None
    assert record["args"]["workers"] == 2 and record["args"]["onnx_path"] == str(raw_model)
    manifest = json.loads((out.parent / "manifest.json").read_text())
    assert manifest["status"] == "ok" and manifest["kind"] == "evaluate"


def test_detections_json_holds_plain_coco_results(dataset, raw_model, tmp_path):
    result = evaluate(settings(raw_model, dataset, tmp_path / "run" / "metrics.json"))
    detections = json.loads(result.detections_path.read_text())
    assert len(detections) == 2 * len(IMAGE_IDS)
    for det in detections:
        assert set(det) == {"image_id", "category_id", "bbox", "score"}
        assert len(det["bbox"]) == 4


@pytest.mark.parametrize("layout, make_output", [("end2end", noisy_end2end_output), ("decoded", noisy_decoded_output)])
def test_metric_equals_pycocotools_on_noisy_layouts(dataset, tmp_path, layout, make_output):
    model = constant_output_model(tmp_path / f"{layout}.onnx", make_output())
    result = evaluate(settings(model, dataset, tmp_path / "run" / "metrics.json", conf=0.0))
    assert result.record["model"]["output"]["layout"] == layout
    assert 0.05 < result.map50_95 < 0.95  # a non-trivial AP, so the comparison means something
    assert_same_as_pycocotools(result)


@pytest.fixture(scope="module")
def demo_slice(demo_val_slice) -> Path:
    """The first 12 images of the demo val split."""
    return demo_val_slice(12)


def test_demo_detector_metric_equals_pycocotools(demo_slice, tmp_path):
    s = EvalSettings(onnx_path=DEMO_ONNX, data_root=demo_slice, warmup_runs=0, skip_latency=0, out=tmp_path / "m.json")
    result = evaluate(s)
    assert result.record["model"]["output"]["layout"] == "raw"
    assert result.map50_95 > 0.3  # a trained model
    assert_same_as_pycocotools(result)


# ---------------------------------------------------------------------------------------------------------------------
# providers and latency labels


def test_session_info_is_copied_and_the_latency_provider_named(dataset, raw_model, tmp_path, monkeypatch):
    real = ort_session.build_session

    def with_placement(*args, **kwargs):
        session, info = real(*args, **kwargs)
        return session, {**info, "node_placement": {"CPUExecutionProvider": 4}, "cpu_nodes": ["a", "b"]}

    monkeypatch.setattr(ort_session, "build_session", with_placement)
    result = evaluate(settings(raw_model, dataset, tmp_path / "run" / "metrics.json"))
    providers = result.record["providers"]
    assert providers["node_placement"] == {"CPUExecutionProvider": 4} and providers["cpu_nodes"] == ["a", "b"]
    assert providers["disable_cpu_fallback"] is False and "qdq" not in providers
    assert result.record["latency_ms"]["provider"] == "CPUExecutionProvider"
    assert result.record["latency_ms"]["cpu_nodes"] == 2


def test_a_cpu_latency_is_never_labelled_gpu():
    cuda, cpu = "CUDAExecutionProvider", "CPUExecutionProvider"
    assert latency_provider({"providers_used": [cuda, cpu], "node_placement": {cuda: 0, cpu: 120}}) == cpu
    assert latency_provider({"providers_used": [cuda, cpu], "node_placement": {cuda: 118, cpu: 2}}) == cuda
    assert latency_provider({"providers_used": [cpu]}) == cpu


def test_latency_stats_drop_skipped_samples():
    stats = latency_stats([1.0, 0.002, 0.004, 0.006], skip=1, warmup_runs=3)
    assert stats["n"] == 3 and stats["skipped"] == 1 and stats["warmup_runs"] == 3
    assert stats["mean"] == pytest.approx(4.0) and stats["median"] == stats["p50"] == pytest.approx(4.0)
    assert stats["min"] == pytest.approx(2.0) and stats["max"] == pytest.approx(6.0)
    empty = latency_stats([0.1], skip=5, warmup_runs=0)
    assert empty["n"] == 0 and empty["skipped"] == 1 and empty["mean"] is None


# ---------------------------------------------------------------------------------------------------------------------
# bad inputs: an error naming the input, no metrics.json


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_outputs_are_an_error_naming_model_and_image(dataset, tmp_path, value):
    output = oracle_raw_output()
    output[0, 4, 5] = value  # one DFL logit of one anchor
    model = constant_output_model(tmp_path / "broken.onnx", output)
    out = tmp_path / "run" / "metrics.json"
    error = expect_user_error(settings(model, dataset, out), "--onnx-path", NonFiniteOutputError)
    assert str(model) in str(error) and "image 7 " in str(error)  # the first image in evaluation order
    assert not (out.parent / "detections.json").exists()
    assert json.loads((out.parent / "manifest.json").read_text())["status"] == "failed"


def test_annotations_without_any_box_are_refused(tmp_path, raw_model):
    root = make_dataset(tmp_path / "empty", annotate=False)
    out = tmp_path / "run" / "metrics.json"
    expect_user_error(settings(raw_model, root, out), "--data-root")
    ann = root / "annotations" / "instances_val2017.json"
    expect_user_error(settings(raw_model, root, out, ann_file=ann), "--ann-file")
    assert not out.parent.exists()  # refused before any output


def test_a_slice_without_ground_truth_is_refused(dataset, raw_model, tmp_path):
    ann_file = dataset / "annotations" / "instances_val2017.json"
    ann = json.loads(ann_file.read_text())
    ann["annotations"] = [a for a in ann["annotations"] if a["image_id"] != 7]
    ann_file.write_text(json.dumps(ann))
    expect_user_error(settings(raw_model, dataset, tmp_path / "run" / "metrics.json", max_images=1), "--max-images")


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda ann: ann["images"][1].pop("file_name"), id="image-without-file_name"),
        pytest.param(lambda ann: ann["images"][0].update(id="7"), id="image-id-not-int"),
        pytest.param(lambda ann: ann["annotations"][0].pop("bbox"), id="annotation-without-bbox"),
        pytest.param(lambda ann: ann["annotations"][0].update(bbox=[1, 2, 3]), id="bbox-of-three"),
        pytest.param(lambda ann: ann.update(images={"id": 1}), id="images-not-a-list"),
    ],
)
def test_malformed_annotation_entries(dataset, raw_model, tmp_path, mutate):
    ann_file = dataset / "annotations" / "instances_val2017.json"
    ann = json.loads(ann_file.read_text())
    mutate(ann)
    ann_file.write_text(json.dumps(ann))
    expect_user_error(settings(raw_model, dataset, tmp_path / "run" / "metrics.json", ann_file=ann_file), "--ann-file")


@pytest.mark.parametrize("content", ["{not json", "", "[1, 2]", "\udcff"])
def test_malformed_annotation_json(dataset, raw_model, tmp_path, content):
    ann_file = tmp_path / "bad.json"
    ann_file.write_bytes(content.encode("utf-8", "surrogateescape"))
    expect_user_error(settings(raw_model, dataset, tmp_path / "run" / "metrics.json", ann_file=ann_file), "--ann-file")


def test_out_that_is_a_folder_or_under_a_file(dataset, raw_model, tmp_path):
    folder = tmp_path / "a-folder"
    folder.mkdir()
    with pytest.raises(UserError) as info:
        evaluate(settings(raw_model, dataset, folder, overwrite=True))
    assert info.value.flag == "--out" and not any(folder.iterdir())
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    expect_user_error(settings(raw_model, dataset, blocker / "run" / "metrics.json"), "--out")


@pytest.mark.parametrize("manifest", [{"kind": "quantize", "status": "ok"}, {"script": "eval_yolov10m_onnx_coco.py"}])
def test_out_in_the_folder_of_another_run_is_refused(dataset, raw_model, tmp_path, manifest):
    """A manifest.json of another kind, or of none (written before manifests named their kind), is another run's."""
    out = tmp_path / "run" / "metrics.json"
    out.parent.mkdir()
    (out.parent / "manifest.json").write_text(json.dumps(manifest))
    expect_user_error(settings(raw_model, dataset, out), "--out")
    assert json.loads((out.parent / "manifest.json").read_text()) == manifest and not out.exists()


@pytest.mark.parametrize("content", [b"", b"not a model"])
def test_a_file_that_is_no_onnx_model(dataset, tmp_path, content):
    model = tmp_path / "broken.onnx"
    model.write_bytes(content)
    out = tmp_path / "run" / "metrics.json"
    expect_user_error(settings(model, dataset, out), "--onnx-path")
    assert not out.parent.exists()


# ---------------------------------------------------------------------------------------------------------------------
# --sessions: sessions side by side must not change a single detection


def _qdq_demo_model(path: Path, qtype: int | None) -> Path:
    """The demo detector with a Q/DQ pair on every Conv's input and weight (per-tensor scales), or as shipped."""
    model = onnx.load(str(DEMO_ONNX))
    if qtype is None:
        return DEMO_ONNX
    graph, inits = model.graph, {t.name: t for t in model.graph.initializer}
    qmax = 127.0 if qtype == TensorProto.INT8 else 448.0
    nodes = []
    for node in graph.node:
        if node.op_type == "Conv":
            for slot, tensor in enumerate(node.input[:2]):
                name = f"{node.name}_in{slot}"
                peak = float(np.abs(numpy_helper.to_array(inits[tensor])).max()) if tensor in inits else 8.0
                graph.initializer.extend(
                    [
                        numpy_helper.from_array(np.array(max(peak, 1e-6) / qmax, np.float32), f"{name}_scale"),
                        helper.make_tensor(f"{name}_zp", qtype, [], [0]),
                    ]
                )
                nodes += [
                    helper.make_node("QuantizeLinear", [tensor, f"{name}_scale", f"{name}_zp"], [f"{name}_q"]),
                    helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_scale", f"{name}_zp"], [f"{name}_dq"]),
                ]
                node.input[slot] = f"{name}_dq"
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    model.opset_import[0].version = max(model.opset_import[0].version, 19)
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("qtype", [None, TensorProto.INT8, TensorProto.FLOAT8E4M3FN], ids=["fp32", "int8", "fp8"])
def test_sessions_side_by_side_give_the_same_detections(demo_slice, tmp_path, qtype):
    model = _qdq_demo_model(tmp_path / "qdq.onnx", qtype)
    runs = {}
    for n in (1, 2):
        s = EvalSettings(
            onnx_path=model,
            data_root=demo_slice,
            warmup_runs=1,
            skip_latency=0,
            sessions=n,
            out=tmp_path / f"s{n}/m.json",
        )
        runs[n] = evaluate(s)
    one, two = runs[1], runs[2]
    assert one.detections_path.read_bytes() == two.detections_path.read_bytes()
    assert one.record["metrics"] == two.record["metrics"] and one.record["metrics"]["num_detections"] > 0
    assert one.record["dataset"]["image_ids"] == two.record["dataset"]["image_ids"]
    assert (one.record["latency_ms"]["sessions"], two.record["latency_ms"]["sessions"]) == (1, 2)
    assert two.record["latency_ms"]["n"] == len(two.record["dataset"]["image_ids"])
    assert two.record["providers"]["sessions"] == 2 and two.record["args"]["sessions"] == 2


def test_sessions_side_by_side_keep_the_first_non_finite_image(dataset, tmp_path):
    model = constant_output_model(tmp_path / "nan.onnx", np.full((1, 4 * 16 + 2, NUM_ANCHORS), np.nan, np.float32))
    with pytest.raises(NonFiniteOutputError, match="on image 7 "):
        evaluate(settings(model, dataset, tmp_path / "run" / "metrics.json", sessions=2))
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.parametrize(
    ("sessions", "providers", "match"),
    [(0, ["CPUExecutionProvider"], "must be >= 1"), (2, ["CUDAExecutionProvider"], "CPU EP alone")],
)
def test_sessions_out_of_range_name_the_flag(dataset, raw_model, tmp_path, sessions, providers, match):
    e = expect_user_error(
        settings(raw_model, dataset, tmp_path / "m.json", sessions=sessions, providers=providers), "--sessions"
    )
    assert match in str(e)
