"""Output decoding: parity with ultralytics' torch decode on one raw tensor, layouts, NMS."""

from __future__ import annotations

import numpy as np
import pytest

from lowbit import decode
from lowbit.errors import UserError

IMGSZ = 160  # anchors: 20*20 + 10*10 + 5*5 = 525


@pytest.fixture(scope="module")
def v10_head_outputs():
    """Raw head tensors of a random-init ultralytics YOLOv10n head and ultralytics' own decode of them.

    Random feature maps are fed to the head and the last convs get a wide random init: the stock bias
    init makes nearly every class score equal, and ties would make top-k order arbitrary.
    """
    import torch
    from ultralytics import YOLO

    torch.manual_seed(0)
    model = YOLO("yolov10n.yaml").model.eval()
    head = model.model[-1]
    for seq in [*head.one2one_cv2, *head.one2one_cv3, *head.cv2, *head.cv3]:
        torch.nn.init.normal_(seq[-1].weight, std=0.5)
        torch.nn.init.normal_(seq[-1].bias, std=1.0)
    feats = [
        torch.randn(1, head.one2one_cv2[i][0].conv.in_channels, IMGSZ // s, IMGSZ // s)
        for i, s in enumerate(decode.STRIDES)
    ]
    with torch.no_grad():
        head.end2end = True  # one-to-one branch, xyxy boxes, top-k postprocess
        one2one = head.forward_head(feats, **head.one2one)
        decoded_o2o = head._inference(one2one)  # [1, 4+nc, A] xyxy + sigmoid
        end2end = head.postprocess(decoded_o2o.permute(0, 2, 1))  # [1, 300, 6]
        head.end2end = False  # one-to-many branch, xywh boxes (what ultralytics runs NMS on)
        one2many = head.forward_head(feats, **head.one2many)
        decoded_o2m = head._inference(one2many)
    raw_o2o = torch.cat([one2one["boxes"], one2one["scores"]], 1).numpy()
    raw_o2m = torch.cat([one2many["boxes"], one2many["scores"]], 1).numpy()
    return {
        "raw_o2o": raw_o2o,
        "decoded_o2o": decoded_o2o.numpy(),
        "end2end": end2end.numpy(),
        "raw_o2m": raw_o2m,
        "decoded_o2m": decoded_o2m,
        "nc": head.nc,
    }


def _assert_same_rows(dets: decode.Detections, expected: np.ndarray, atol: float) -> None:
    """Every detection matches its own row of ``expected`` [N, 6] (class equal, box and score within atol).

    Matched one to one rather than position by position: detections whose float32 scores tie (many
    anchors of a random head share a score to the last bit) come out in arbitrary order, in torch too.
    """
    assert len(dets) == len(expected)
    used = np.zeros(len(expected), dtype=bool)
    for box, score, cls in zip(dets.boxes, dets.scores, dets.classes):
        candidates = np.flatnonzero(
            ~used
            & (expected[:, 5].astype(np.int64) == cls)
            & (np.abs(expected[:, 4] - score) <= atol)
            & (np.abs(expected[:, :4] - box).max(axis=1) <= atol)
        )
        assert candidates.size, f"no match for class {cls} score {score} box {box}"
        used[candidates[0]] = True


def test_anchors_match_ultralytics_make_anchors():
    import torch
    from ultralytics.utils.tal import make_anchors

    feats = [torch.zeros(1, 1, IMGSZ // s, IMGSZ // s) for s in decode.STRIDES]
    points, strides = make_anchors(feats, torch.tensor(decode.STRIDES, dtype=torch.float32), 0.5)
    ours_points, ours_strides = decode.make_anchors(IMGSZ)
    np.testing.assert_array_equal(ours_points, points.numpy())
    np.testing.assert_array_equal(ours_strides, strides.numpy()[:, 0])
    assert decode.num_anchors(640) == 8400 and decode.num_anchors(64) == 84


def test_raw_decode_matches_ultralytics_per_anchor(v10_head_outputs):
    raw, expected = v10_head_outputs["raw_o2o"], v10_head_outputs["decoded_o2o"][0]
    assert raw.shape == (1, 64 + 80, 525)
    boxes, scores = decode.decode_raw(raw, IMGSZ)
    assert np.abs(boxes - expected[:4].T).max() <= 1e-4
    assert np.abs(scores - expected[4:].T).max() <= 1e-4


def test_topk_matches_ultralytics_v10_postprocess(v10_head_outputs):
    expected = v10_head_outputs["end2end"][0]  # [300, 6] x1 y1 x2 y2 score cls
    boxes, scores = decode.decode_raw(v10_head_outputs["raw_o2o"], IMGSZ)
    reference = decode.topk_one2one(boxes, scores, max_det=300)  # decode every anchor, then select
    layout = decode.detect_layout(v10_head_outputs["raw_o2o"].shape, IMGSZ, num_classes=80)
    fast = decode.postprocess(v10_head_outputs["raw_o2o"], layout, IMGSZ, conf=0.0, max_det=300)  # select, then decode
    for dets in (reference, fast):
        assert len(dets) == 300
        assert np.abs(dets.scores - expected[:, 4]).max() <= 1e-4  # same ranking
        _assert_same_rows(dets, expected, atol=1e-4)


def test_postprocess_raw_applies_conf_after_topk(v10_head_outputs):
    layout = decode.detect_layout(v10_head_outputs["raw_o2o"].shape, IMGSZ, num_classes=80)
    assert layout == decode.OutputLayout("raw", 80, 525)
    end2end = v10_head_outputs["end2end"][0]
    conf = float(np.median(end2end[:, 4]))
    dets = decode.postprocess(v10_head_outputs["raw_o2o"], layout, IMGSZ, conf=conf, max_det=300)
    expected = end2end[end2end[:, 4] > conf]  # what ultralytics' validator keeps for end-to-end output
    assert len(dets) == len(expected) > 0
    np.testing.assert_allclose(dets.scores, expected[:, 4], atol=1e-4)


def test_end2end_layout_is_filtered_like_ultralytics(v10_head_outputs):
    import torch
    from ultralytics.utils.nms import non_max_suppression

    out = v10_head_outputs["end2end"]
    layout = decode.detect_layout(out.shape, IMGSZ, num_classes=80)
    assert layout.kind == "end2end"
    dets = decode.postprocess(out, layout, IMGSZ, conf=0.5, max_det=100)
    expected = non_max_suppression(torch.from_numpy(out), 0.5, 0.7, max_det=100, end2end=True)[0].numpy()
    np.testing.assert_array_equal(dets.boxes, expected[:, :4])
    np.testing.assert_array_equal(dets.classes, expected[:, 5].astype(np.int64))


def test_nms_matches_ultralytics_non_max_suppression(v10_head_outputs):
    from ultralytics.utils.nms import non_max_suppression

    decoded = v10_head_outputs["decoded_o2m"]  # torch [1, 84, A], xywh + sigmoid
    # ~1000 candidates: enough overlaps to exercise suppression, few enough to keep CPU NMS fast
    conf, iou = float(np.quantile(decoded[0, 4:].numpy(), 0.975)), 0.7
    expected = non_max_suppression(decoded.clone(), conf, iou, multi_label=True, max_det=300)[0].numpy()

    candidates = int((decoded[0, 4:] > conf).sum())
    assert len(expected) < min(candidates, 300)  # some boxes were really suppressed

    layout = decode.detect_layout(decoded.shape, IMGSZ, num_classes=80)
    assert layout.kind == "decoded"
    ours = decode.postprocess(decoded.numpy(), layout, IMGSZ, conf=conf, max_det=300, nms=True, iou=iou)
    assert len(ours) == len(expected) > 0
    np.testing.assert_allclose(ours.scores, expected[:, 4], atol=1e-6)
    _assert_same_rows(ours, expected, atol=1e-4)

    # the raw one-to-many tensor through our DFL decode gives the same detections
    raw_layout = decode.detect_layout(v10_head_outputs["raw_o2m"].shape, IMGSZ, num_classes=80)
    from_raw = decode.postprocess(v10_head_outputs["raw_o2m"], raw_layout, IMGSZ, conf=conf, nms=True, iou=iou)
    _assert_same_rows(from_raw, expected, atol=1e-3)


def test_nms_suppresses_same_class_overlaps_only():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60]], np.float32)
    scores = np.zeros((4, 2), np.float32)
    scores[0, 0], scores[1, 0], scores[2, 1], scores[3, 0] = 0.9, 0.8, 0.7, 0.6
    dets = decode.nms_class_aware(boxes, scores, conf=0.5, iou=0.5)
    assert dets.scores.tolist() == pytest.approx([0.9, 0.7, 0.6])  # box 1 suppressed by box 0 (same class)
    assert dets.classes.tolist() == [0, 1, 0]
    assert len(decode.nms_class_aware(boxes, scores, conf=0.95)) == 0


def test_dfl_expectation_of_one_hot_bins():
    logits = np.full((64, 3), -50.0, np.float32)
    for side, bin_ in enumerate([0, 5, 15, 7]):
        logits[side * 16 + bin_, :] = 50.0
    np.testing.assert_allclose(decode.dfl_expectation(logits)[:, 0], [0, 5, 15, 7], atol=1e-5)


@pytest.mark.parametrize(
    "shape, nc",
    [
        ([1, 144, 8000], 80),  # anchor count does not fit imgsz 640
        ([1, 100, 8400], 80),  # neither 64+80 nor 4+80 channels
        ([1, 8400, 144], 80),  # transposed
        ([2, 144, 8400], 80),  # batch 2
        ([1, 144], None),
        ([1, 3, 8400], None),
    ],
)
def test_unknown_layouts_raise_user_error_naming_the_shape(shape, nc):
    with pytest.raises(UserError) as info:
        decode.detect_layout(shape, 640, num_classes=nc)
    assert info.value.flag == "--onnx-path"
    assert str(shape) in str(info.value)  # the shape, not wording, is what the user needs to see
    with pytest.raises(UserError) as info:
        decode.detect_layout(shape, 640, num_classes=nc, flag="--model")
    assert info.value.flag == "--model"


def test_layout_detection_for_the_card_model_shapes():
    assert decode.detect_layout([1, 144, 8400], 640, 80) == decode.OutputLayout("raw", 80, 8400)
    assert decode.detect_layout([1, 84, 8400], 640, 80) == decode.OutputLayout("decoded", 80, 8400)
    assert decode.detect_layout([1, 300, 6], 640, 80) == decode.OutputLayout("end2end", None, 300)
    assert decode.detect_layout(["batch", 144, 8400], 640) == decode.OutputLayout("raw", 80, 8400)


def test_exported_onnx_decodes_like_ultralytics(tiny_yolov10_pt, tiny_yolov10_onnx, tiny_yolov10_spec):
    """Exporter + our numpy decode == ultralytics' own one-to-one decode of the torch model, per anchor.

    Per anchor rather than after top-k: this fixture's logits saturate (all 300 best scores are
    exactly 1.0 in float32), so the order of the top-k rows is arbitrary in both implementations.
    """
    import onnxruntime as ort
    import torch

    from lowbit.preprocess import preprocess

    imgsz = tiny_yolov10_spec["imgsz"]
    chw, _ = preprocess(np.random.default_rng(1).integers(0, 256, (120, 200, 3), dtype=np.uint8), imgsz)
    model = torch.load(tiny_yolov10_pt, weights_only=False)["model"].float().eval()
    head = model.model[-1]
    head.end2end = True
    with torch.no_grad():
        _, preds = model(torch.from_numpy(chw[None]))
        expected = head._inference(preds["one2one"])[0].numpy()  # [4 + nc, A]: xyxy, sigmoid scores

    session = ort.InferenceSession(str(tiny_yolov10_onnx), providers=["CPUExecutionProvider"])
    raw = session.run(None, {session.get_inputs()[0].name: chw[None]})[0]
    assert decode.detect_layout(raw.shape, imgsz, num_classes=tiny_yolov10_spec["nc"]).kind == "raw"
    boxes, scores = decode.decode_raw(raw, imgsz)
    # the exporter's own check allows ~4e-4 between fused ONNX and torch logits (max |logit| ~ 1e2)
    np.testing.assert_allclose(boxes, expected[:4].T, atol=1e-2)
    np.testing.assert_allclose(scores, expected[4:].T, atol=1e-4)


@pytest.mark.parametrize("key, nms", [("decoded_o2m", True), ("decoded_o2m", False), ("end2end", False)])
def test_metric_on_decoded_and_end2end_outputs_equals_pycocotools(v10_head_outputs, tmp_path, key, nms):
    """faster-coco-eval (the evaluator's metric) and pycocotools score the same decoded detections alike.

    Ground truth: the 40 best end-to-end rows, jittered (not clipped: this random head's boxes reach
    far outside the image), plus a few boxes no detection matches, so the AP is neither 0 nor 1.
    """
    import json

    from lowbit import coco_eval

    rng = np.random.default_rng(0)
    rows = v10_head_outputs["end2end"][0][:40]
    annotations = []
    for x1, y1, x2, y2, _, cls in rows:
        box = np.array([x1, y1, x2 - x1, y2 - y1]) + rng.normal(0, 0.05 * (x2 - x1), 4)  # random-head boxes overflow
        annotations.append(
            {
                "id": len(annotations) + 1,
                "image_id": 1,
                "category_id": int(cls) + 1,
                "bbox": [float(v) for v in box],
                "area": float(box[2] * box[3]),
                "iscrowd": 0,
            }
        )
    for cls in range(5):
        annotations.append(
            {
                "id": len(annotations) + 1,
                "image_id": 1,
                "category_id": cls + 1,
                "bbox": [5.0, 5.0, 20.0, 20.0],
                "area": 400.0,
                "iscrowd": 0,
            }
        )
    dataset = {
        "images": [{"id": 1, "file_name": "1.jpg", "width": IMGSZ, "height": IMGSZ}],
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": f"c{i}"} for i in range(v10_head_outputs["nc"])],
    }
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(dataset))
    coco = coco_eval.load_coco(path)
    output = np.asarray(v10_head_outputs[key])
    layout = decode.detect_layout(output.shape, IMGSZ, num_classes=v10_head_outputs["nc"])
    dets = decode.postprocess(output, layout, IMGSZ, conf=0.001, nms=nms)
    cat_ids, _ = coco_eval.category_mapping(coco)
    records = coco_eval.detections_to_records(1, dets.boxes, dets.scores, dets.classes, cat_ids)
    metrics, _ = coco_eval.evaluate_bbox(coco, records, [1])
    reference = coco_eval.pycocotools_stats(coco, records, [1])
    np.testing.assert_allclose([metrics[k] for k in coco_eval.STAT_KEYS], reference, atol=1e-4, rtol=0)
    if key == "end2end":
        assert 0.05 < metrics["map50_95"] < 0.95
