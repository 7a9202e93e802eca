"""Calibration inputs (lowbit.calib), the calibration tensor builder and the calibration list maker."""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from lowbit.calib import load_calib_tensor, parse_image_list, read_image_list
from lowbit.errors import UserError
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
    listing = _write_list(
        tmp_path, ["# calibration", "", f"imgs/{images[0].name}", str(images[1]), f"imgs/{images[2].name}  # rgba"]
    )
    out = tmp_path / "calib" / "calib.npy"
    assert (
        load_script(BUILDER).main(["--list", str(listing), "--out", str(out), "--imgsz", "64", "--workers", "2"]) == 0
    )
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
    assert "Traceback" not in err
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
    rc = load_script(LISTER).main(
        ["--data-root", str(root), "--eval-max-images", "5", "--num", "6", "--out", str(tmp_path / "x.txt")]
    )
    assert rc == 2 and "--num" in capsys.readouterr().err
    assert not (tmp_path / "x.txt").exists()


# --- image lists ---------------------------------------------------------------------------------


def _expect_list_error(listing: Path) -> UserError:
    with pytest.raises(UserError) as info:
        read_image_list(listing, "--list")
    assert info.value.flag == "--list"
    return info.value


def test_duplicate_entries_are_named_with_their_lines(tmp_path, images):
    listing = _write_list(
        tmp_path, [str(images[0]), str(images[1]), "", str(images[0]), f"imgs/../imgs/{images[1].name}"]
    )
    error = str(_expect_list_error(listing))
    assert str(listing) in error
    assert re.search(r"\b1\b.*\b4\b", error) and re.search(r"\b2\b.*\b5\b", error)  # both repeats, by line number


def test_binary_list_is_refused(tmp_path):
    listing = tmp_path / "list.txt"
    np.save(listing, np.zeros(4, np.float32))  # an .npy given as --list
    listing.write_bytes(Path(f"{listing}.npy").read_bytes())
    _expect_list_error(listing)
    listing.write_bytes(b"\xff\xfe\x00i\x00m\x00g")  # UTF-16 text
    _expect_list_error(listing)


def test_folder_entry_is_reported_as_a_folder(tmp_path, images):
    listing = _write_list(tmp_path, [str(images[0]), str(images[0].parent)])
    entries = parse_image_list(listing)
    assert entries[1].path.is_dir()
    error = str(_expect_list_error(listing))
    assert "line 2" in error and "folder" in error and "not found" not in error


def test_relative_entry_error_names_every_place_looked(tmp_path):
    from lowbit.runs import REPO_ROOT

    listing = _write_list(tmp_path, ["missing/dir/img.jpg"])
    error = str(_expect_list_error(listing))
    assert str(REPO_ROOT / "missing/dir/img.jpg") in error and str(tmp_path / "missing/dir/img.jpg") in error


def test_hash_in_a_file_name_is_not_a_comment(tmp_path, images):
    named = images[0].with_name("img#1.jpg")
    named.write_bytes(images[0].read_bytes())
    listing = _write_list(
        tmp_path,
        ["# header", "  # indented comment", str(named), f"{images[1]}  # trailing note", f"{images[2]}\t# tab"],
    )
    entries = read_image_list(listing, "--list")
    assert [e.path for e in entries] == [named, images[1], images[2]]
    assert [e.line_no for e in entries] == [3, 4, 5]


def test_max_images_checks_only_the_images_used(tmp_path, images):
    listing = _write_list(tmp_path, [str(images[0]), str(tmp_path / "gone.jpg")])
    assert [e.path for e in read_image_list(listing, "--list", max_images=1)] == [images[0]]
    _expect_list_error(listing)


# --- calibration tensors ---------------------------------------------------------------------------


def _save(path: Path, array: np.ndarray) -> Path:
    np.save(path, array)
    return path


def test_load_calib_tensor_returns_the_images(tmp_path):
    data = np.random.default_rng(0).random((5, 3, 32, 32), dtype=np.float32)
    path = _save(tmp_path / "c.npy", data)
    np.testing.assert_array_equal(load_calib_tensor(path, "--calib-path"), data)
    loaded = load_calib_tensor(path, "--calib-path", imgsz=32, max_images=2)
    assert loaded.flags["C_CONTIGUOUS"] and not isinstance(loaded, np.memmap)
    np.testing.assert_array_equal(loaded, data[:2])
    assert load_calib_tensor(path, "X", max_images=50).shape[0] == 5  # fewer present than asked: all of them


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "folder",
        "npz",
        "empty",
        "not_npy",
        "truncated",
        "pickled",
        "float64",
        "rank3",
        "channels",
        "imgsz",
        "no_images",
        "nan",
        "inf",
    ],
)
def test_load_calib_tensor_rejects(case, tmp_path):
    good = np.random.default_rng(0).random((20, 3, 32, 32), dtype=np.float32)
    path = tmp_path / "c.npy"
    if case == "folder":
        path.mkdir()
    elif case == "npz":
        with open(path, "wb") as f:
            np.savez(f, calib=good)
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "not_npy":
        path.write_text("0.1 0.2 0.3\n")
    elif case == "truncated":
        _save(path, good)
        path.write_bytes(path.read_bytes()[:5000])
    elif case == "pickled":
        np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    elif case == "float64":
        _save(path, good.astype(np.float64))
    elif case == "rank3":
        _save(path, good[0])
    elif case == "channels":
        _save(path, good[:, :1])
    elif case == "imgsz":
        _save(path, good)
    elif case == "no_images":
        _save(path, good[:0])
    elif case in ("nan", "inf"):
        good[17, 1, 5, 5] = np.nan if case == "nan" else -np.inf  # past the first finite-check slice
        _save(path, good)
    with pytest.raises(UserError) as info:
        load_calib_tensor(path, "CALIB_PATH", imgsz=64 if case == "imgsz" else None)
    assert info.value.flag == "CALIB_PATH"
    if case in ("nan", "inf"):
        assert "17" in str(info.value)  # the bad image's index


def test_non_finite_beyond_max_images_is_not_used(tmp_path):
    data = np.random.default_rng(0).random((3, 3, 32, 32), dtype=np.float32)
    data[2, 0, 0, 0] = np.nan
    path = _save(tmp_path / "c.npy", data)
    assert load_calib_tensor(path, "--calib-path", max_images=2).shape[0] == 2


# --- builder and lister command lines --------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--imgsz", "100"], "--imgsz"),
        (["--imgsz", "0"], "--imgsz"),
        (["--max-images", "0"], "--max-images"),
        (["--workers", "0"], "--workers"),
        (["--out", "{tmp}/c.npz"], "--out"),
        (["--out", "{tmp}"], "--out"),
        (["--out", "{tmp}/list.txt/c.npy"], "--out"),
        (["--list", "{tmp}"], "--list"),
    ],
)
def test_builder_rejects_bad_arguments(argv, flag, tmp_path, images, load_script, capsys):
    listing = _write_list(tmp_path, [str(p) for p in images])
    base = {"--list": str(listing), "--out": str(tmp_path / "out" / "c.npy")}
    base.update({argv[0]: argv[1].format(tmp=tmp_path)})
    rc = load_script(BUILDER).main([x for kv in base.items() for x in kv])
    err = capsys.readouterr().err
    assert rc == 2 and flag in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("*.npy")) and not list(tmp_path.glob("*.npz"))


def test_builder_rejects_duplicates_and_writes_nothing(tmp_path, images, load_script, capsys):
    listing = _write_list(tmp_path, [str(images[0]), str(images[0])])
    out = tmp_path / "out" / "c.npy"
    assert load_script(BUILDER).main(["--list", str(listing), "--out", str(out), "--imgsz", "32"]) == 2
    assert "--list" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["not_json", "no_images_key", "entry_without_file_name", "binary"])
def test_calib_list_rejects_malformed_annotations(case, tmp_path, load_script, capsys):
    root = tmp_path / "data"
    _coco_layout(root, list(range(1, 11)))
    ann = root / "annotations" / "instances_val2017.json"
    if case == "not_json":
        ann.write_text("{not json")
    elif case == "no_images_key":
        ann.write_text(json.dumps({"annotations": []}))
    elif case == "entry_without_file_name":
        ann.write_text(json.dumps({"images": [{"id": 1}]}))
    else:
        ann.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    out = tmp_path / "x.txt"
    rc = load_script(LISTER).main(["--data-root", str(root), "--eval-max-images", "2", "--num", "3", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "--ann-file" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize(
    "argv, flag",
    [(["--num", "0"], "--num"), (["--eval-max-images", "-1"], "--eval-max-images"), (["--seed", "-3"], "--seed")],
)
def test_calib_list_rejects_bad_counts(argv, flag, tmp_path, load_script, capsys):
    root = tmp_path / "data"
    _coco_layout(root, list(range(1, 11)))
    base = {"--data-root": str(root), "--eval-max-images": "2", "--num": "3", "--out": str(tmp_path / "x.txt")}
    base[argv[0]] = argv[1]
    assert load_script(LISTER).main([x for kv in base.items() for x in kv]) == 2
    assert flag in capsys.readouterr().err
    assert not (tmp_path / "x.txt").exists()
