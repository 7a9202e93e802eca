"""Calibration list helper and calibration tensor builder."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from lowbit.preprocess import preprocess

BUILDER = "scripts/cv-models/make_yolov10m_calib_npy.py"
LISTER = "scripts/cv-models/make_calib_list.py"


@pytest.fixture
def images(tmp_path) -> list[Path]:
    """Odd sizes and channel counts: landscape colour, portrait grey, small RGBA (PNG)."""
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w, c) in enumerate([(120, 200, 3), (210, 90, 1), (40, 50, 4)]):
        img = rng.integers(0, 256, (h, w, c), dtype=np.uint8)
        path = tmp_path / "imgs" / f"img{i}.{'png' if c == 4 else 'jpg'}"
        path.parent.mkdir(exist_ok=True)
        cv2.imwrite(str(path), img if c != 1 else img[:, :, 0])
        paths.append(path)
    return paths


def _write_list(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "list.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_builds_tensor_with_the_evaluator_preprocessing(tmp_path, images, load_script):
    # relative entries resolve against the list's folder; comments and blank lines are skipped
    listing = _write_list(tmp_path, ["# calibration", "", f"imgs/{images[0].name}", str(images[1]), f"imgs/{images[2].name}  # rgba"])
    out = tmp_path / "calib" / "calib.npy"
    assert load_script(BUILDER).main(["--list", str(listing), "--out", str(out), "--imgsz", "64", "--workers", "2"]) == 0
    data = np.load(out)
    assert data.shape == (3, 3, 64, 64) and data.dtype == np.float32
    for row, path in zip(data, images):
        expected, _ = preprocess(path, 64)
        np.testing.assert_array_equal(row, expected)
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["num_images"] == 3 and info["shape"] == [3, 3, 64, 64]
    np.testing.assert_allclose(info["channel_mean"], data.mean(axis=(0, 2, 3)), atol=1e-5)
    np.testing.assert_allclose(info["channel_std"], data.std(axis=(0, 2, 3)), atol=1e-4)
    assert [Path(p).name for p in info["images"]] == [p.name for p in images]
    assert json.loads(out.with_suffix(".manifest.json").read_text())["status"] == "ok"


def test_max_images_and_overwrite(tmp_path, images, load_script, capsys):
    listing = _write_list(tmp_path, [str(p) for p in images])
    out = tmp_path / "c.npy"
    builder = load_script(BUILDER)
    assert builder.main(["--list", str(listing), "--out", str(out), "--imgsz", "32", "--max-images", "2"]) == 0
    assert np.load(out).shape[0] == 2
    assert builder.main(["--list", str(listing), "--out", str(out), "--imgsz", "32"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert builder.main(["--list", str(listing), "--out", str(out), "--imgsz", "32", "--overwrite"]) == 0
    assert np.load(out).shape[0] == 3


@pytest.mark.parametrize("case", ["missing_list", "empty_list", "missing_images", "corrupt_images"])
def test_bad_input_lists_every_problem_and_writes_nothing(case, tmp_path, images, load_script, capsys):
    lines = [str(p) for p in images]
    if case == "missing_images":
        lines += [str(tmp_path / "gone1.jpg"), str(tmp_path / "gone2.jpg")]
    if case == "corrupt_images":
        for name in ("bad1.jpg", "bad2.jpg"):
            (tmp_path / name).write_bytes(b"not a jpeg")
            lines.append(str(tmp_path / name))
    listing = tmp_path / "list.txt" if case != "missing_list" else tmp_path / "nope.txt"
    if case != "missing_list":
        listing.write_text("\n".join(lines if case != "empty_list" else ["# nothing", ""]) + "\n")
    out = tmp_path / "out" / "c.npy"
    rc = load_script(BUILDER).main(["--list", str(listing), "--out", str(out), "--imgsz", "32"])
    err = capsys.readouterr().err
    assert rc == 2 and "--list" in err
    if case in ("missing_images", "corrupt_images"):
        bad = ("gone1", "gone2") if case == "missing_images" else ("bad1", "bad2")
        assert all(name in err for name in bad), err  # all of them, in one error
    assert not out.exists() and not out.with_suffix(".json").exists()
    assert not list(out.parent.glob("*.npy")) if out.parent.exists() else True


def _coco_layout(root: Path, ids: list[int]) -> None:
    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    images = []
    for i in ids:
        name = f"{i:012d}.jpg"
        cv2.imwrite(str(root / "val2017" / name), np.full((8, 8, 3), i % 255, np.uint8))
        images.append({"id": i, "file_name": name, "width": 8, "height": 8})
    (root / "annotations" / "instances_val2017.json").write_text(
        json.dumps({"images": images, "annotations": [], "categories": [{"id": 1, "name": "x"}]})
    )


def test_calib_list_is_deterministic_and_disjoint_from_eval_slice(tmp_path, load_script):
    root = tmp_path / "data"
    ids = list(range(1, 61))[::-1]  # unsorted in the file: the slice is by ascending id
    _coco_layout(root, ids)
    lister = load_script(LISTER)
    out_a, out_b = tmp_path / "a.txt", tmp_path / "b.txt"
    for out in (out_a, out_b):
        assert lister.main(["--data-root", str(root), "--eval-max-images", "40", "--num", "10", "--out", str(out)]) == 0
    assert out_a.read_text() == out_b.read_text()
    listed = [line for line in out_a.read_text().splitlines() if not line.startswith("#")]
    listed_ids = [int(Path(p).stem) for p in listed]
    assert len(listed_ids) == 10 and listed_ids == sorted(listed_ids)
    assert min(listed_ids) > 40  # none of the evaluator's first 40 ids


def test_calib_list_refuses_when_too_few_images_remain(tmp_path, load_script, capsys):
    root = tmp_path / "data"
    _coco_layout(root, list(range(1, 11)))
    rc = load_script(LISTER).main(["--data-root", str(root), "--eval-max-images", "5", "--num", "6", "--out", str(tmp_path / "x.txt")])
    assert rc == 2 and "only 5 images remain" in capsys.readouterr().err
    assert not (tmp_path / "x.txt").exists()
