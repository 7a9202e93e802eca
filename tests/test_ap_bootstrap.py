"""The image bootstrap of COCO mAP50-95 (lowbit.ap_bootstrap) held to faster-coco-eval on a small
hand-built set: weights of one give COCOeval's stats[0], integer weights give the evaluation of the
set with those images copied, and the paired interval is the percentile of the paired replicates."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lowbit import ap_bootstrap
from lowbit.coco_eval import evaluate_bbox, load_coco
from lowbit.errors import UserError

TOLERANCE = 1e-12
# Two categories with ground truth and one without (COCO leaves it out of the mean).
CATEGORIES = [{"id": 3, "name": "ring"}, {"id": 7, "name": "star"}, {"id": 9, "name": "absent"}]
IMAGE_IDS = [1, 2, 3, 4, 5, 6, 7, 8]


def _instances() -> dict:
    """8 images of 320x240: GT boxes [x, y, w, h] per (image, category); image 7 has none, and one crowd box."""
    boxes = {
        (1, 3): [[10, 10, 60, 40], [120, 50, 40, 40]],
        (1, 7): [[200, 100, 50, 70]],
        (2, 3): [[30, 30, 80, 80]],
        (3, 7): [[15, 20, 30, 30], [60, 60, 90, 50], [200, 10, 60, 60]],
        (4, 3): [[100, 100, 50, 50]],
        (4, 7): [[10, 150, 70, 60]],
        (5, 3): [[5, 5, 20, 20], [40, 40, 25, 25], [150, 150, 100, 60]],
        (6, 7): [[80, 20, 120, 90]],
        (8, 3): [[50, 120, 60, 60]],
    }
    annotations = [
        {"id": n, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
        for n, ((i, c), b) in enumerate(((key, box) for key, group in boxes.items() for box in group), start=1)
    ]
    crowd = [0, 0, 300, 240]
    annotations.append({"id": 99, "image_id": 8, "category_id": 7, "bbox": crowd, "area": 72000, "iscrowd": 1})
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 320, "height": 240} for i in IMAGE_IDS]
    return {"images": images, "annotations": annotations, "categories": CATEGORIES}


def _detections(instances: dict, shift: float, seed: int) -> list[dict]:
    """Every GT box found with a shift (IoU spread over the thresholds) plus false positives.

    Scores are distinct, so no two detections tie (ties are where a weighted replicate and an
    evaluation of copied images may order detections differently).
    """
    rng = np.random.default_rng(seed)
    records = []
    for ann in instances["annotations"]:
        if ann["iscrowd"]:
            continue
        x, y, w, h = ann["bbox"]
        dx, dy = rng.uniform(-shift, shift, 2) * np.array([w, h])
        records.append({"image_id": ann["image_id"], "category_id": ann["category_id"], "bbox": [x + dx, y + dy, w, h]})
    for image_id in IMAGE_IDS:
        for _ in range(3):
            x, y = rng.uniform(0, 250, 2)
            category = int(rng.choice([3, 7, 9]))
            records.append({"image_id": image_id, "category_id": category, "bbox": [x, y, 40.0, 30.0]})
    # Against the crowd box (crowd IoU = overlap / detection area): ignored at every threshold, and
    # 70% inside: ignored up to IoU 0.70 and a false positive above, so what counts varies with t.
    records.append({"image_id": 8, "category_id": 7, "bbox": [10.0, 10.0, 100.0, 100.0]})
    records.append({"image_id": 8, "category_id": 7, "bbox": [230.0, 10.0, 100.0, 100.0]})
    scores = rng.permutation(len(records)) / len(records) * 0.9 + 0.05
    return [dict(r, score=float(s)) for r, s in zip(records, scores)]


@pytest.fixture()
def dataset(tmp_path):
    instances = _instances()
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(instances))
    return load_coco(path), instances, _detections(instances, 0.12, 0), _detections(instances, 0.2, 1)


def _copied(instances: dict, records: list[dict], weights: np.ndarray, tmp_path):
    """The multiset of images as a dataset of its own: image i copied weights[i] times under new ids."""
    images, annotations, copies, new_ids = [], [], [], []
    for i, count in zip(IMAGE_IDS, weights):
        for _ in range(int(count)):
            new_id = len(new_ids) + 1
            new_ids.append(new_id)
            images.append({"id": new_id, "file_name": f"{new_id}.jpg", "width": 320, "height": 240})
            for ann in instances["annotations"]:
                if ann["image_id"] == i:
                    annotations.append(dict(ann, id=len(annotations) + 1, image_id=new_id))
            copies += [dict(r, image_id=new_id) for r in records if r["image_id"] == i]
    path = tmp_path / "copied.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    return load_coco(path), copies, new_ids


def test_weights_of_one_give_cocoeval_stats(dataset):
    gt, _, reference, variant = dataset
    for records in (reference, variant):
        matches = ap_bootstrap.match_images(gt, records, IMAGE_IDS)
        expected = evaluate_bbox(gt, records, IMAGE_IDS)[0]["map50_95"]
        assert matches.map50_95 == expected
        assert 0.1 < expected < 0.95  # neither trivial nor perfect: the precision curve matters
        assert abs(ap_bootstrap.weighted_map(matches, np.ones(len(IMAGE_IDS), dtype=int)) - expected) <= TOLERANCE


def test_integer_weights_equal_evaluating_copied_images(dataset, tmp_path):
    gt, instances, reference, _ = dataset
    matches = ap_bootstrap.match_images(gt, reference, IMAGE_IDS)
    weights = np.array([[0, 2, 1, 3, 0, 1, 0, 1], [1, 0, 0, 2, 3, 0, 1, 1], [8, 0, 0, 0, 0, 0, 0, 0]])
    got = ap_bootstrap.weighted_map(matches, weights)
    for row, value in zip(weights, got):
        copied_gt, copied_records, new_ids = _copied(instances, reference, row, tmp_path)
        assert abs(value - evaluate_bbox(copied_gt, copied_records, new_ids)[0]["map50_95"]) <= TOLERANCE


def test_replicate_without_ground_truth_is_nan(dataset):
    gt, _, reference, _ = dataset
    matches = ap_bootstrap.match_images(gt, reference, IMAGE_IDS)
    only_image_7 = np.eye(len(IMAGE_IDS), dtype=int)[IMAGE_IDS.index(7)]
    assert np.isnan(ap_bootstrap.weighted_map(matches, only_image_7))


def test_model_without_detections_scores_zero(dataset):
    gt, _, reference, _ = dataset
    empty = ap_bootstrap.match_images(gt, [], IMAGE_IDS)
    assert empty.map50_95 == 0.0 == evaluate_bbox(gt, [], IMAGE_IDS)[0]["map50_95"]
    weights = ap_bootstrap.bootstrap_weights(len(IMAGE_IDS), 20, seed=0)
    np.testing.assert_array_equal(ap_bootstrap.weighted_map(empty, weights), np.zeros(20))
    result = ap_bootstrap.paired_delta_ci(gt, reference, [], IMAGE_IDS, n_boot=20)
    assert result.delta_ap == -evaluate_bbox(gt, reference, IMAGE_IDS)[0]["map50_95"] * 100.0


def test_bootstrap_weights_resample_all_images():
    weights = ap_bootstrap.bootstrap_weights(8, 50, seed=3)
    assert weights.shape == (50, 8) and weights.dtype.kind == "i"
    assert (weights.sum(axis=1) == 8).all() and (weights >= 0).all()
    np.testing.assert_array_equal(weights, ap_bootstrap.bootstrap_weights(8, 50, seed=3))
    assert not np.array_equal(weights, ap_bootstrap.bootstrap_weights(8, 50, seed=4))


def test_paired_delta_is_percentile_of_paired_replicates(dataset):
    gt, _, reference, variant = dataset
    result = ap_bootstrap.paired_delta_ci(gt, reference, variant, IMAGE_IDS, n_boot=200, confidence=0.9, seed=5)
    ref_ap = evaluate_bbox(gt, reference, IMAGE_IDS)[0]["map50_95"]
    var_ap = evaluate_bbox(gt, variant, IMAGE_IDS)[0]["map50_95"]
    assert result.delta_ap == (var_ap - ref_ap) * 100.0
    weights = ap_bootstrap.bootstrap_weights(len(IMAGE_IDS), 200, seed=5)
    ref_matches = ap_bootstrap.match_images(gt, reference, IMAGE_IDS)
    var_matches = ap_bootstrap.match_images(gt, variant, IMAGE_IDS)
    deltas = (ap_bootstrap.weighted_map(var_matches, weights) - ap_bootstrap.weighted_map(ref_matches, weights)) * 100
    deltas = deltas[np.isfinite(deltas)]
    np.testing.assert_allclose([result.ci_low, result.ci_high], np.percentile(deltas, [5.0, 95.0]), rtol=0, atol=1e-9)
    assert result.std_error == pytest.approx(np.std(deltas, ddof=1), abs=1e-9)
    assert result.ci_low < result.ci_high and result.std_error > 0
    assert (result.n_images, result.n_boot, result.confidence, result.seed) == (8, 200, 0.9, 5)
    again = ap_bootstrap.paired_delta_ci(gt, reference, variant, IMAGE_IDS, n_boot=200, confidence=0.9, seed=5)
    assert again == result


def test_model_against_itself_has_zero_width(dataset):
    gt, _, reference, _ = dataset
    result = ap_bootstrap.paired_delta_ci(gt, reference, reference, IMAGE_IDS, n_boot=50)
    assert (result.delta_ap, result.ci_low, result.ci_high, result.std_error) == (0.0, 0.0, 0.0, 0.0)


def test_single_model_interval(dataset):
    gt, _, reference, _ = dataset
    result = ap_bootstrap.ap_ci(gt, reference, IMAGE_IDS, n_boot=100, seed=1)
    assert result.ap == evaluate_bbox(gt, reference, IMAGE_IDS)[0]["map50_95"] * 100.0
    assert result.ci_low < result.ap < result.ci_high and result.std_error > 0


def test_bad_inputs_name_what_to_fix(dataset):
    gt, _, reference, variant = dataset
    with pytest.raises(UserError) as info:
        ap_bootstrap.paired_delta_ci(gt, reference, variant, IMAGE_IDS, n_boot=1)
    assert info.value.flag == "n_boot"
    with pytest.raises(UserError) as info:
        ap_bootstrap.paired_delta_ci(gt, reference, variant, IMAGE_IDS, confidence=1.0)
    assert info.value.flag == "confidence"
    for no_ground_truth in ([], [7]):
        with pytest.raises(UserError) as info:
            ap_bootstrap.match_images(gt, reference, no_ground_truth)
        assert info.value.flag == "image_ids"
    ref = ap_bootstrap.match_images(gt, reference, IMAGE_IDS)
    var = ap_bootstrap.match_images(gt, variant, IMAGE_IDS[:-1])
    with pytest.raises(UserError) as info:
        ap_bootstrap.paired_delta_ci_from_matches(ref, var, n_boot=10)
    assert info.value.flag == "image_ids"


def test_bench_script_prints_ratio_and_exact_point(dataset, tmp_path, load_script, capsys):
    gt, _, reference, variant = dataset
    for name, records in (("ref", reference), ("var", variant)):
        folder = tmp_path / name
        folder.mkdir()
        metrics, _ = evaluate_bbox(gt, records, IMAGE_IDS)
        record = {"dataset": {"image_ids": IMAGE_IDS}, "metrics": metrics}
        (folder / "metrics.json").write_text(json.dumps(record))
        (folder / "detections.json").write_text(json.dumps(records))
    bench = load_script("scripts/cv-models/bench_ap_bootstrap.py")
    argv = ["--ann-file", str(tmp_path / "instances.json"), "--reference", str(tmp_path / "ref"), "--n-boot", "20"]
    assert bench.main([*argv, "--variant", str(tmp_path / "var")]) == 0
    out = capsys.readouterr().out
    assert "cost ratio" in out and "equal: True" in out
    assert bench.main([*argv, "--variant", str(tmp_path / "missing")]) == 2
    assert "--variant" in capsys.readouterr().err
