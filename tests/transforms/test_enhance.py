"""Tests for transforms.enhance (classic 2D enhancement)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy import ndimage as ndi
from skimage.exposure import equalize_adapthist

from transforms.enhance import (
    CLAHE,
    CLAHEd,
    EnhancementPipeline,
    EnhancementPipelined,
    Invert,
    Invertd,
    MorphologicalOpening,
    MorphologicalOpeningd,
    MultiplyMerge,
    MultiplyMerged,
    OverlapMerge,
    OverlapMerged,
    Smooth,
    Smoothd,
    ToGrayscale,
    structuring_element,
)


def _rand(shape=(1, 32, 32), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).random(shape).astype(np.float32)


def test_invert_of_zero_one_gives_one_zero():
    out = Invert()(np.array([[[0.0, 1.0]]], dtype=np.float32))
    np.testing.assert_array_equal(out, [[[1.0, 0.0]]])


def test_invert_reads_uint8_as_fraction_of_255():
    out = Invert()(np.array([[[0, 255, 51]]], dtype=np.uint8))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[[1.0, 0.0, 0.8]]], atol=1e-6)


def test_torch_metatensor_input_keeps_type_and_meta():
    img = MetaTensor(torch.zeros(1, 2, 2), meta={"filename_or_obj": "a.png"})
    out = Invert()(img)
    assert isinstance(out, MetaTensor) and out.dtype == torch.float32
    assert out.meta["filename_or_obj"] == "a.png"
    assert torch.equal(out.as_tensor(), torch.ones(1, 2, 2))


def test_float_outside_unit_range_raises_naming_file():
    img = MetaTensor(torch.full((1, 2, 2), 200.0), meta={"filename_or_obj": "slice_07.png"})
    with pytest.raises(ValueError, match=r"slice_07\.png: expected intensities in \[0, 1\]"):
        Invert()(img)


def test_non_2d_input_raises():
    with pytest.raises(ValueError, match=r"expected a 2D image \(C, H, W\), got shape \(4, 4\)"):
        Invert()(np.zeros((4, 4), dtype=np.float32))


def test_opening_removes_one_pixel_speck_keeps_7x7_square():
    img = np.zeros((1, 30, 30), dtype=np.float32)
    img[0, 3, 3] = 1.0  # speck
    img[0, 15:22, 15:22] = 0.8  # 7x7 square
    out = MorphologicalOpening(kernel_size=(5, 5), shape="rect")(img)
    expected = np.zeros_like(img)
    expected[0, 15:22, 15:22] = 0.8
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("shape", ["ellipse", "cross"])
def test_opening_with_non_rect_footprints_removes_speck_and_rounds_square_corners(shape):
    img = np.zeros((1, 30, 30), dtype=np.float32)
    img[0, 3, 3] = 1.0
    img[0, 15:22, 15:22] = 0.8
    out = MorphologicalOpening(kernel_size=5, shape=shape)(img)
    assert out[0, 3, 3] == 0.0
    assert out[0, 15, 15] == 0.0  # a corner no footprint placement inside the square covers
    np.testing.assert_array_equal(out[0, 15:22, 18], np.float32(0.8))  # central column survives
    np.testing.assert_array_equal(out[0, 18, 15:22], np.float32(0.8))  # central row survives
    ref = ndi.grey_opening(img[0], footprint=structuring_element(shape, (5, 5)))  # far from the border
    np.testing.assert_array_equal(out[0], ref)


def test_opening_keeps_bright_border_region_like_opencv():
    img = np.zeros((1, 12, 12), dtype=np.float32)
    img[0, :, :4] = 1.0  # 4-pixel band touching the left border, narrower than a 5x5 kernel inside the image
    out = MorphologicalOpening(kernel_size=3)(img)
    np.testing.assert_array_equal(out, img)


def test_structuring_element_ellipse_matches_opencv_5x5():
    expected = np.array(
        [[0, 0, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 1, 0, 0]], dtype=bool
    )
    np.testing.assert_array_equal(structuring_element("ellipse", (5, 5)), expected)


def test_opening_iterations_equal_repeated_erosion_then_dilation():
    img = _rand((1, 20, 20))
    out = MorphologicalOpening(kernel_size=3, iterations=2)(img)
    ref = img[0]
    fp = np.ones((3, 3), bool)
    for _ in range(2):
        ref = ndi.grey_erosion(ref, footprint=fp, mode="constant", cval=np.inf)
    for _ in range(2):
        ref = ndi.grey_dilation(ref, footprint=fp, mode="constant", cval=-np.inf)
    np.testing.assert_array_equal(out[0], ref)


def test_multiply_merge_equals_product():
    a, b = _rand(seed=1), _rand(seed=2)
    np.testing.assert_allclose(MultiplyMerge()(a, b), a * b, rtol=1e-6)


def test_overlap_merge_equals_addweighted_formula():
    a = np.array([[[0.5, 0.5, 0.2, 1.0]]], dtype=np.float32)
    b = np.array([[[0.4, 0.6, 0.2, 0.9]]], dtype=np.float32)
    out = OverlapMerge(weights=(4, -4))(a, b)
    np.testing.assert_allclose(out, [[[0.4, 0.0, 0.0, 0.4]]], atol=1e-6)  # clip(4a - 4b, 0, 1)
    out = OverlapMerge(weights=(2, -1), offset=0.5)(a, b)
    np.testing.assert_allclose(out, np.clip(2 * a - b + 0.5, 0, 1), atol=1e-6)


def test_merge_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shapes differ"):
        OverlapMerge()(np.zeros((1, 4, 4), np.float32), np.zeros((1, 4, 5), np.float32))


@pytest.mark.parametrize("method", Smooth.METHODS)
def test_smoothing_of_constant_image_is_the_same_constant(method):
    img = np.full((2, 20, 20), 0.37, dtype=np.float32)
    np.testing.assert_allclose(Smooth(method=method, kernel_size=11)(img), img, atol=1e-6)


def test_median_removes_salt_noise():
    img = np.full((1, 20, 20), 0.5, dtype=np.float32)
    img[0, [2, 7, 11, 15], [3, 12, 5, 17]] = 1.0
    np.testing.assert_array_equal(Smooth(method="median", kernel_size=3)(img), np.full_like(img, 0.5))


def test_average_equals_box_mean_inside_image():
    img = _rand((1, 15, 15))
    out = Smooth(method="average", kernel_size=3)(img)
    assert out[0, 7, 7] == pytest.approx(float(img[0, 6:9, 6:9].mean()), abs=1e-6)


def test_gaussian_uses_opencv_default_sigma():
    assert Smooth(method="gaussian", kernel_size=11).sigma == pytest.approx(2.0)
    img = np.zeros((1, 21, 21), dtype=np.float32)
    img[0, 10, 10] = 1.0
    out = Smooth(method="gaussian", kernel_size=11)(img)
    assert float(out.sum()) == pytest.approx(1.0, abs=1e-5)
    assert out[0, 10, 10] == out.max()
    assert out[0, 10, 4] == 0.0  # radius 5 = kernel_size // 2


def test_clahe_output_in_unit_range_and_raises_contrast_of_low_contrast_ramp():
    ramp = np.tile(np.linspace(0.45, 0.55, 64, dtype=np.float32), (64, 1))[None]
    out = CLAHE()(ramp)
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert float(out.std()) > 5 * float(ramp.std())


def test_clahe_opencv_clip_maps_to_skimage_clip_over_nbins():
    img = _rand((1, 64, 64), seed=3)
    out = CLAHE(clip_limit=2.0, tile_grid_size=(8, 8))(img)
    ref = equalize_adapthist(img[0], kernel_size=(8, 8), clip_limit=2.0 / 256, nbins=256)
    np.testing.assert_allclose(out[0], ref, atol=1e-6)
    same = CLAHE(clip_limit=2.0 / 256, clip_convention="skimage")(img)
    np.testing.assert_allclose(same, out, atol=1e-6)


def test_clahe_leaves_constant_channel_unchanged():
    img = np.full((1, 16, 16), 0.3, dtype=np.float32)
    np.testing.assert_array_equal(CLAHE()(img), img)


def test_grayscale_uses_bt601_weights():
    rgb = np.zeros((3, 1, 3), dtype=np.float32)
    rgb[0, 0, 0] = rgb[1, 0, 1] = rgb[2, 0, 2] = 1.0
    np.testing.assert_allclose(ToGrayscale()(rgb), [[[0.299, 0.587, 0.114]]], atol=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"merge": "overlap"},  # merge without smoothing
        {"smoothing": "bilateral"},
        {"merge": "add", "smoothing": "median"},
        {"opening": "yes"},
        {"merge_with": "original"},
    ],
)
def test_pipeline_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        EnhancementPipeline(**kwargs)


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (MorphologicalOpening, {"shape": "disk"}),
        (MorphologicalOpening, {"kernel_size": 0}),
        (MorphologicalOpening, {"iterations": 0}),
        (CLAHE, {"clip_limit": 0}),
        (CLAHE, {"clip_convention": "matlab"}),
        (CLAHE, {"clip_limit": 2.0, "clip_convention": "skimage"}),
        (Smooth, {"method": "bilateral"}),
        (Smooth, {"kernel_size": 4}),
        (OverlapMerge, {"weights": (1, 2, 3)}),
    ],
)
def test_bad_constructor_arguments_raise(cls, kwargs):
    with pytest.raises(ValueError):
        cls(**kwargs)


def test_pipeline_applies_steps_in_reference_order():
    rgb = np.repeat(_rand((1, 48, 48), seed=4), 3, axis=0)
    pipe = EnhancementPipeline(
        invert=True, opening=True, clahe=True, smoothing="median", merge="overlap", merge_weights=(2, -2)
    )
    x = ToGrayscale()(rgb)
    x = Invert()(x)
    x = MorphologicalOpening()(x)
    x = CLAHE()(x)
    expected = OverlapMerge((2, -2))(x, Smooth("median", 11)(x))
    np.testing.assert_allclose(pipe(rgb), expected, atol=1e-6)
    assert pipe.tag == "inv+open+clahe+median11+overlap2/-2"


def test_pipeline_merge_with_input_uses_grayscale_input():
    img = _rand((1, 24, 24), seed=5)
    pipe = EnhancementPipeline(invert=True, smoothing="average", merge="multiply", merge_with="input")
    expected = img * Smooth("average", 11)(1.0 - img)
    np.testing.assert_allclose(pipe(img), expected, atol=1e-6)


def test_pipeline_all_combinations_run_and_stay_in_unit_range():
    img = _rand((1, 32, 32), seed=6)
    tags = set()
    for inv, op, cl, (sm, mg) in itertools.product(
        [False, True],
        [False, True],
        [False, True],
        [(None, None), ("gaussian", None), ("average", "overlap"), ("median", "multiply")],
    ):
        pipe = EnhancementPipeline(invert=inv, opening=op, clahe=cl, smoothing=sm, merge=mg)
        out = pipe(img)
        assert out.shape == (1, 32, 32) and out.dtype == np.float32
        assert 0.0 <= out.min() and out.max() <= 1.0
        tags.add(pipe.tag)
    assert len(tags) == 32
    np.testing.assert_array_equal(EnhancementPipeline()(img), img)  # all off: identity on grayscale


def test_dict_twins_transform_keys_and_keep_other_keys():
    img = _rand((1, 16, 16), seed=7)
    data = {"image": img, "label": 2, "subject_id": "s1", "other": img.copy()}
    for t in (
        Invertd("image"),
        MorphologicalOpeningd("image", kernel_size=3),
        CLAHEd("image"),
        Smoothd("image", method="median", kernel_size=3),
        EnhancementPipelined("image", invert=True),
    ):
        out = t(data)
        assert (out["label"], out["subject_id"]) == (2, "s1")
        np.testing.assert_array_equal(out["other"], img)
        assert out["image"].shape == (1, 16, 16)
    np.testing.assert_allclose(Invertd("image")(data)["image"], 1.0 - img)


def test_merge_dict_twin_from_processed_key_or_smoothing():
    a, b = _rand(seed=8), _rand(seed=9)
    out = MultiplyMerged("image", processed_key="smoothed")({"image": a, "smoothed": b, "label": 1})
    np.testing.assert_allclose(out["image"], a * b, rtol=1e-6)
    np.testing.assert_array_equal(out["smoothed"], b)
    assert out["label"] == 1
    smooth = Smooth("gaussian", 5)
    out = OverlapMerged("image", smoothing=smooth, weights=(4, -4), offset=0.5)({"image": a})
    np.testing.assert_allclose(out["image"], np.clip(4 * a - 4 * smooth(a) + 0.5, 0, 1), atol=1e-6)


def test_merge_dict_twin_needs_exactly_one_source():
    with pytest.raises(ValueError, match="exactly one"):
        OverlapMerged("image")
    with pytest.raises(ValueError, match="exactly one"):
        MultiplyMerged("image", processed_key="p", smoothing=Smooth())
