"""COCO evaluation on hand-made ground truth with known AP, the category mapping, and faster-coco-eval
held to pycocotools (the reference) on random detections."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lowbit import coco_eval
from lowbit.errors import UserError

# Non-COCO category set, deliberately not sorted and not contiguous: index 0 -> id 2, 1 -> 5, 2 -> 9.
CATEGORIES = [{"id": 5, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 9, "name": "bird"}]


@pytest.fixture()
def gt_file(tmp_path):
    images = [
        {"id": 30, "file_name": "c.jpg", "width": 200, "height": 100},
        {"id": 10, "file_name": "a.jpg", "width": 200, "height": 100},
        {"id": 20, "file_name": "b.jpg", "width": 200, "height": 100},
    ]
    annotations = []

    def add(image_id, cat_id, x, y, w, h):
        annotations.append(
            {
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": cat_id,
                "bbox": [x, y, w, h],
                "area": w * h,
                "iscrowd": 0,
            }
        )

    add(10, 2, 10, 10, 50, 40)  # dog
    add(10, 5, 100, 20, 60, 60)  # cat
    add(20, 2, 5, 5, 100, 80)  # dog
    add(20, 2, 120, 10, 40, 40)  # dog
    add(30, 5, 0, 0, 30, 30)  # cat (image 30 only evaluated in one test)
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    return path


def _perfect_records(coco, image_ids):
    cat_ids, _ = coco_eval.category_mapping(coco)
    records = []
    for image_id in image_ids:
        anns = coco.imgToAnns[image_id]
        boxes = np.array(
            [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns],
            np.float32,
        )
        classes = np.array([cat_ids.index(a["category_id"]) for a in anns])
        records += coco_eval.detections_to_records(image_id, boxes, np.full(len(anns), 0.9), classes, cat_ids)
    return records


def test_category_mapping_sorts_by_id(gt_file):
    coco = coco_eval.load_coco(gt_file)
    assert coco_eval.category_mapping(coco) == ([2, 5, 9], ["dog", "cat", "bird"])
    assert coco_eval.select_image_ids(coco, None) == [10, 20, 30]
    assert coco_eval.select_image_ids(coco, 2) == [10, 20]
    assert coco_eval.select_image_ids(coco, 99) == [10, 20, 30]


def test_records_are_xywh_with_mapped_category_ids():
    records = coco_eval.detections_to_records(
        7, np.array([[10.0, 20.0, 40.5, 30.25]]), np.array([0.123456789]), np.array([1]), [2, 5, 9]
    )
    assert records == [{"image_id": 7, "category_id": 5, "bbox": [10.0, 20.0, 30.5, 10.25], "score": 0.12346}]
    with pytest.raises(UserError) as info:
        coco_eval.detections_to_records(7, np.zeros((1, 4)), np.ones(1), np.array([3]), [2, 5, 9])
    assert info.value.flag == "--ann-file"


def test_perfect_detections_score_one(gt_file):
    coco = coco_eval.load_coco(gt_file)
    metrics, summary = coco_eval.evaluate_bbox(coco, _perfect_records(coco, [10, 20, 30]), [10, 20, 30])
    for key in ("map50_95", "map50", "map75", "ar100"):
        assert metrics[key] == pytest.approx(1.0)
    assert metrics["per_class_ap"] == {"dog": pytest.approx(1.0), "cat": pytest.approx(1.0), "bird": None}
    assert metrics["num_detections"] == 5
    assert "Average Precision" in summary
    assert set(coco_eval.STAT_KEYS) <= metrics.keys()


def test_evaluation_is_restricted_to_the_given_images(gt_file):
    coco = coco_eval.load_coco(gt_file)
    records = _perfect_records(coco, [10, 20])  # nothing for image 30
    metrics, _ = coco_eval.evaluate_bbox(coco, records, [10, 20])
    assert metrics["map50_95"] == pytest.approx(1.0)  # image 30's unmatched cat is not counted
    metrics_all, _ = coco_eval.evaluate_bbox(coco, records, [10, 20, 30])
    assert metrics_all["map50_95"] < 1.0
    # detections on images outside the evaluated set are ignored, not counted as false positives
    metrics_sub, _ = coco_eval.evaluate_bbox(coco, records, [10])
    assert metrics_sub["map50_95"] == pytest.approx(1.0) and metrics_sub["num_detections"] == 2


def test_known_partial_ap(gt_file):
    """Image 20 only, class dog, 2 ground-truth boxes.

    One exact hit (score 0.9) and one false positive (score 0.8): precision 1 up to recall 0.5, then
    nothing -> 101-point AP = 51/101 at every IoU threshold. With the false positive ranked first
    (score 0.95) the interpolated precision up to recall 0.5 is 0.5 -> AP = 0.5 * 51/101.
    """
    coco = coco_eval.load_coco(gt_file)
    cat_ids = [2, 5, 9]
    hit = np.array([[5, 5, 105, 85]], np.float32)
    miss = np.array([[150, 60, 190, 95]], np.float32)  # overlaps nothing
    for fp_score, expected in ((0.8, 51 / 101), (0.95, 0.5 * 51 / 101)):
        records = coco_eval.detections_to_records(20, hit, np.array([0.9]), np.array([0]), cat_ids)
        records += coco_eval.detections_to_records(20, miss, np.array([fp_score]), np.array([0]), cat_ids)
        metrics, _ = coco_eval.evaluate_bbox(coco, records, [20])
        assert metrics["map50_95"] == pytest.approx(expected, abs=1e-9)
        assert metrics["map50"] == pytest.approx(expected, abs=1e-9)
        assert metrics["per_class_ap"]["dog"] == pytest.approx(expected, abs=1e-9)
        assert metrics["ar100"] == pytest.approx(0.5)


def test_no_detections_scores_zero(gt_file):
    coco = coco_eval.load_coco(gt_file)
    metrics, _ = coco_eval.evaluate_bbox(coco, [], [10, 20])
    assert metrics["map50_95"] == 0.0 and metrics["num_detections"] == 0


def test_load_coco_errors_name_the_flag(tmp_path):
    with pytest.raises(UserError) as info:
        coco_eval.load_coco(tmp_path / "nope.json")
    assert info.value.flag == "--ann-file"
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError) as info:
        coco_eval.load_coco(bad, "--data-root")
    assert info.value.flag == "--data-root"
    for dataset in ({"images": [], "categories": []}, [], {"images": [{"id": 1, "file_name": "a.jpg"}]}):
        bad.write_text(json.dumps(dataset))
        with pytest.raises(UserError) as info:
            coco_eval.load_coco(bad)
        assert info.value.flag == "--ann-file"


def test_ground_truth_without_boxes_is_refused(gt_file):
    dataset = json.loads(gt_file.read_text())
    dataset["annotations"] = []
    gt_file.write_text(json.dumps(dataset))
    with pytest.raises(UserError) as info:
        coco_eval.load_coco(gt_file, "--data-root")
    assert info.value.flag == "--data-root"


def test_missing_area_is_the_box_area(gt_file):
    dataset = json.loads(gt_file.read_text())
    for ann in dataset["annotations"]:
        del ann["area"]
    gt_file.write_text(json.dumps(dataset))
    coco = coco_eval.load_coco(gt_file)
    assert coco.anns[1]["area"] == 50 * 40


def test_records_are_not_modified_by_scoring(gt_file):
    coco = coco_eval.load_coco(gt_file)
    records = _perfect_records(coco, [10, 20])
    before = json.loads(json.dumps(records))
    coco_eval.evaluate_bbox(coco, records, [10, 20])
    assert records == before and all(set(r) == {"image_id", "category_id", "bbox", "score"} for r in records)


def _random_case(seed: int, n_images: int = 40):
    """Ground truth with crowd boxes and every size bucket, and detections: jittered hits, wrong classes,
    duplicates, far-off boxes and low-score clutter (more than 100 per image, so maxDets matters)."""
    rng = np.random.default_rng(seed)
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 640, "height": 480} for i in range(1, n_images + 1)]
    annotations, records = [], []
    for image in images:
        for _ in range(rng.integers(0, 9)):
            w, h = rng.choice([rng.uniform(3, 30), rng.uniform(33, 95), rng.uniform(100, 300)], 2)
            box = [float(rng.uniform(0, 640 - w)), float(rng.uniform(0, 480 - h)), float(w), float(h)]
            cat = int(rng.choice([2, 5, 9]))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image["id"],
                    "category_id": cat,
                    "bbox": box,
                    "area": w * h,
                    "iscrowd": int(rng.random() < 0.05),
                }
            )
            for _ in range(rng.integers(0, 4)):
                jitter = rng.normal(0, rng.choice([1.0, 6.0, 30.0]), 4)
                x, y, bw, bh = np.asarray(box) + jitter
                label = cat if rng.random() < 0.85 else int(rng.choice([2, 5, 9]))
                records.append(
                    {
                        "image_id": image["id"],
                        "category_id": label,
                        "bbox": [
                            round(float(x), 3),
                            round(float(y), 3),
                            round(abs(float(bw)), 3),
                            round(abs(float(bh)), 3),
                        ],
                        "score": round(float(rng.uniform(0.05, 1.0)), 5),
                    }
                )
        for _ in range(rng.integers(0, 110)):
            records.append(
                {
                    "image_id": image["id"],
                    "category_id": int(rng.choice([2, 5, 9])),
                    "bbox": [
                        float(rng.uniform(0, 600)),
                        float(rng.uniform(0, 440)),
                        float(rng.uniform(2, 120)),
                        float(rng.uniform(2, 120)),
                    ],
                    "score": round(float(rng.uniform(0.001, 0.3)), 5),
                }
            )
    dataset = {"images": images, "annotations": annotations, "categories": CATEGORIES}
    return dataset, records


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_faster_coco_eval_equals_pycocotools(tmp_path, seed):
    dataset, records = _random_case(seed)
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(dataset))
    coco = coco_eval.load_coco(path)
    image_ids = [image["id"] for image in dataset["images"]][: 30 + seed]  # a slice, as --max-images makes
    metrics, _ = coco_eval.evaluate_bbox(coco, records, image_ids)
    reference = coco_eval.pycocotools_stats(coco, records, image_ids)
    np.testing.assert_allclose([metrics[k] for k in coco_eval.STAT_KEYS], reference, atol=1e-4, rtol=0)
    assert 0.05 < metrics["map50_95"] < 0.95


def test_no_ground_truth_in_a_bucket_gives_minus_one_as_pycocotools(gt_file):
    """Only small boxes in the evaluated image: medium/large AP and AR are -1 in both implementations."""
    coco = coco_eval.load_coco(gt_file)
    records = _perfect_records(coco, [30])  # image 30 holds one 30x30 cat (small)
    metrics, _ = coco_eval.evaluate_bbox(coco, records, [30])
    reference = coco_eval.pycocotools_stats(coco, records, [30])
    np.testing.assert_allclose([metrics[k] for k in coco_eval.STAT_KEYS], reference, atol=1e-4, rtol=0)
    assert metrics["map_medium"] == metrics["map_large"] == -1.0 and metrics["ar_large"] == -1.0
    assert metrics["per_class_ap"] == {"dog": None, "cat": pytest.approx(1.0), "bird": None}


def test_round_like_python_equals_round_on_halves_and_random_values():
    from lowbit.coco_eval import round_like_python

    rng = np.random.default_rng(0)
    halves = (np.arange(0, 700_000) + 0.5) / 1000  # x.xxx5: where a scaled rint alone can differ from round()
    values = np.concatenate([halves, rng.random(200_000) * 700 - 30, rng.random(50_000).astype(np.float32)])
    for ndigits in (3, 5):
        expected = [round(v, ndigits) for v in values.tolist()]
        assert round_like_python(values, ndigits).tolist() == expected


def test_records_keep_the_per_value_rounding_of_a_python_loop():
    from lowbit.coco_eval import detections_to_records

    rng = np.random.default_rng(1)
    boxes = np.round(rng.random((300, 4)) * 1280) / 2000  # many exact halves at the third decimal
    boxes[:, 2:] += boxes[:, :2]
    scores, classes = rng.random(300).astype(np.float32), rng.integers(0, 3, 300)
    expected = [
        {
            "image_id": 9,
            "category_id": [1, 5, 7][int(c)],
            "bbox": [
                round(float(x1), 3),
                round(float(y1), 3),
                round(float(x2) - float(x1), 3),
                round(float(y2) - float(y1), 3),
            ],
            "score": round(float(s), 5),
        }
        for (x1, y1, x2, y2), s, c in zip(boxes, scores, classes)
    ]
    assert detections_to_records(9, boxes, scores, classes, [1, 5, 7]) == expected
    assert detections_to_records(9, np.zeros((0, 4)), np.zeros(0), np.zeros(0), [1]) == []
