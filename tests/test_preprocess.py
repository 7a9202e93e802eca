"""Letterbox / image loading: bit-exact against ultralytics' validation loader, plus error cases."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from lowbit.errors import UserError
from lowbit.preprocess import (
    ImageReadError,
    iter_prepared,
    letterbox,
    load_image_bgr,
    preprocess,
    scale_boxes_xyxy_to_original,
    to_nchw_float,
)


def _write(path: Path, img: np.ndarray) -> Path:
    assert cv2.imwrite(str(path), img)
    return path


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory) -> dict[str, Path]:
    """Images of awkward sizes and channel layouts, written losslessly (PNG) so decodes are exact."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("odd_images")
    images = {
        "landscape": rng.integers(0, 256, (61, 97, 3), dtype=np.uint8),
        "portrait": rng.integers(0, 256, (130, 45, 3), dtype=np.uint8),
        "tiny": rng.integers(0, 256, (2, 3, 3), dtype=np.uint8),
        "thin": rng.integers(0, 256, (1, 300, 3), dtype=np.uint8),
        "large": rng.integers(0, 256, (301, 703, 3), dtype=np.uint8),
        "square_exact": rng.integers(0, 256, (160, 160, 3), dtype=np.uint8),
        "gray": rng.integers(0, 256, (77, 51), dtype=np.uint8),
        "rgba": rng.integers(0, 256, (40, 90, 4), dtype=np.uint8),
    }
    paths = {name: _write(root / f"{name}.png", img) for name, img in images.items()}
    # a JPEG too: the decoder path COCO uses
    paths["jpeg"] = _write(root / "photo.jpg", rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))
    return paths


def _ultralytics_val_input(path: Path, imgsz: int):
    """What ultralytics 8.4's validation dataset produces for one image (rect=False, no augmentation).

    Calls the real ``BaseDataset.load_image`` (read + long-side resize) and ``LetterBox`` (padding),
    then returns the image and ``ratio_pad`` the validator uses to scale boxes back.
    """
    from ultralytics.data.augment import LetterBox
    from ultralytics.data.base import BaseDataset

    fake = SimpleNamespace(
        ims=[None],
        im_files=[str(path)],
        npy_files=[path.with_suffix(".npy")],
        cache=None,
        imgsz=imgsz,
        augment=False,
        cv2_flag=cv2.IMREAD_COLOR,
        channels=3,
        prefix="",
    )
    img, hw0, hw = BaseDataset.load_image(fake, 0)
    labels = {"img": img, "ratio_pad": (hw[0] / hw0[0], hw[1] / hw0[1])}
    out = LetterBox(new_shape=imgsz, scaleup=False)(labels)  # dict path also sets ratio_pad as in val
    return out["img"], out["ratio_pad"], hw0


@pytest.mark.parametrize("imgsz", [64, 160])
@pytest.mark.parametrize(
    "name", ["landscape", "portrait", "tiny", "thin", "large", "square_exact", "gray", "rgba", "jpeg"]
)
def test_letterbox_matches_ultralytics_val_loader(odd_images, name, imgsz):
    path = odd_images[name]
    expected_img, (gain_hw, pad_xy), hw0 = _ultralytics_val_input(path, imgsz)

    ours_img, info = letterbox(load_image_bgr(path), imgsz)

    assert ours_img.shape == (imgsz, imgsz, 3)
    assert ours_img.dtype == np.uint8
    np.testing.assert_array_equal(ours_img, expected_img)
    assert info.orig_hw == tuple(hw0)
    assert info.pad_xy == tuple(pad_xy)
    assert info.gain_xy == pytest.approx((gain_hw[1], gain_hw[0]), abs=0)


def test_nchw_float_matches_ultralytics_batch_conversion(odd_images):
    import torch

    img, _ = letterbox(load_image_bgr(odd_images["landscape"]), 64)
    ours = to_nchw_float(img)
    # ultralytics: Format(bgr=0) flips BGR->RGB and transposes to CHW; the validator then does .float() / 255
    theirs = (torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)[::-1])).float() / 255).numpy()
    assert ours.dtype == np.float32 and ours.flags.c_contiguous
    np.testing.assert_array_equal(ours, theirs)


def test_padding_is_centred_grey(odd_images):
    chw, info = preprocess(odd_images["landscape"], 64)  # 97x61 -> 64x41, 23 rows of padding
    assert info.resized_hw == (41, 64)
    assert info.pad_xy == (0, 11)  # top = round(11.5 - 0.1) = 11, bottom = round(11.5 + 0.1) = 12
    assert np.all(chw[:, :11, :] == np.float32(114 / 255))
    assert np.all(chw[:, -12:, :] == np.float32(114 / 255))


def test_grayscale_and_rgba_become_three_channel_bgr(odd_images):
    gray = load_image_bgr(odd_images["gray"])
    rgba = load_image_bgr(odd_images["rgba"])
    assert gray.shape == (77, 51, 3) and np.array_equal(gray[..., 0], gray[..., 2])
    assert rgba.shape == (40, 90, 3)
    # in-memory arrays go through the same conversion
    raw_gray = cv2.imread(str(odd_images["gray"]), cv2.IMREAD_UNCHANGED)
    chw_mem, _ = preprocess(raw_gray, 64)
    chw_file, _ = preprocess(odd_images["gray"], 64)
    np.testing.assert_array_equal(chw_mem, chw_file)


@pytest.mark.parametrize(
    "content, reason",
    [(b"", "empty"), (b"this is not an image at all", "not a decodable image"), (None, "does not exist")],
)
def test_unreadable_images_raise_image_read_error(tmp_path, content, reason):
    path = tmp_path / "bad.jpg"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ImageReadError) as excinfo:
        load_image_bgr(path)
    assert reason in excinfo.value.reason
    assert excinfo.value.path == path
    assert isinstance(excinfo.value, UserError)  # a script that does not catch it still exits 2 with the message


def test_scale_boxes_matches_ultralytics(odd_images):
    import torch
    from ultralytics.utils import ops

    for name in ("landscape", "portrait", "large", "thin"):
        _, (gain_hw, pad_xy), hw0 = _ultralytics_val_input(odd_images[name], 160)
        _, info = letterbox(load_image_bgr(odd_images[name]), 160)
        boxes = np.array([[10.3, 20.7, 90.1, 150.9], [-5, -5, 170, 170], [80, 80, 80.5, 80.5]], np.float32)
        theirs = ops.scale_boxes((160, 160), torch.from_numpy(boxes.copy()), hw0, ratio_pad=(gain_hw, pad_xy))
        ours = scale_boxes_xyxy_to_original(boxes, info)
        np.testing.assert_allclose(ours, theirs.numpy(), rtol=0, atol=1e-4)
        assert ours[1].tolist() == [0, 0, hw0[1], hw0[0]]  # clipped to the original image


def test_iter_prepared_keeps_order_and_reports_errors(odd_images, tmp_path):
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    items = [(i, p) for i, p in enumerate([odd_images["landscape"], bad, odd_images["gray"], odd_images["jpeg"]])]
    inline = list(iter_prepared(items, 64, workers=0))
    threaded = list(iter_prepared(items, 64, workers=2, window=2))
    assert [p.key for p in threaded] == [0, 1, 2, 3]
    assert inline[1].error is not None and threaded[1].error is not None and threaded[1].chw is None
    for a, b in zip(inline, threaded):
        if a.chw is not None:
            np.testing.assert_array_equal(a.chw, b.chw)
            assert a.info == b.info
