"""2D image loading: every mode becomes one float channel in (x, y) order; bad files give one clear error."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipelines.io.images import ImageLoadError, LoadGrey2Dd, load_grey_2d


def test_grey_png_is_loaded_width_first(tmp_path):
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)  # 3 rows (height), 4 columns (width)
    Image.fromarray(arr).save(tmp_path / "g.png")
    out = load_grey_2d(tmp_path / "g.png")
    assert out.shape == (4, 3)
    assert np.array_equal(out, arr.T.astype(np.float32))


def test_rgb_and_rgba_become_luminance(tmp_path):
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[..., 0] = 100
    rgb[..., 1] = 50
    Image.fromarray(rgb).save(tmp_path / "c.png")
    Image.fromarray(np.dstack([rgb, np.full((2, 2), 7, np.uint8)])).save(tmp_path / "a.png")
    expected = 0.299 * 100 + 0.587 * 50
    assert np.allclose(load_grey_2d(tmp_path / "c.png"), expected, atol=1e-4)
    assert np.allclose(load_grey_2d(tmp_path / "a.png"), expected, atol=1e-4)  # alpha dropped


def test_16_bit_png_keeps_its_range(tmp_path):
    arr = np.array([[0, 1000], [40000, 65535]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "d.png")
    assert np.array_equal(load_grey_2d(tmp_path / "d.png"), arr.T.astype(np.float32))


def test_corrupt_and_non_image_files_name_the_path(tmp_path):
    Image.fromarray(np.full((64, 64), 9, np.uint8)).save(tmp_path / "ok.jpg")
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 3])
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ImageLoadError, match="cut.jpg"):
        load_grey_2d(tmp_path / "cut.jpg")
    with pytest.raises(ImageLoadError, match=r"text.png: not a readable image"):
        load_grey_2d(tmp_path / "text.png")
    with pytest.raises(ImageLoadError, match="not found"):
        load_grey_2d(tmp_path / "missing.png")


def test_nan_tiff_is_rejected(tmp_path):
    arr = np.ones((4, 4), np.float32)
    arr[1, 1] = np.nan
    Image.fromarray(arr, mode="F").save(tmp_path / "n.tif")
    with pytest.raises(ImageLoadError, match="NaN"):
        load_grey_2d(tmp_path / "n.tif")


def test_dict_loader_returns_channel_first_metatensor(tmp_path):
    Image.fromarray(np.zeros((5, 7), np.uint8)).save(tmp_path / "z.png")
    out = LoadGrey2Dd("image")({"image": str(tmp_path / "z.png"), "label": 2})
    assert tuple(out["image"].shape) == (1, 7, 5)
    assert out["image"].meta["filename_or_obj"].endswith("z.png")
    assert out["label"] == 2
