"""Tests for transforms.noise (Gaussian noise for denoiser training and evaluation)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from transforms.noise import (
    DEFAULT_SIGMAS,
    AddGaussianNoise,
    AddGaussianNoised,
    RandAddGaussianNoise,
    RandAddGaussianNoised,
)


def _grey(value: float = 0.5, shape=(1, 64, 64)) -> np.ndarray:
    return np.full(shape, value, dtype=np.float32)


def test_default_sigmas_are_the_reference_levels():
    assert DEFAULT_SIGMAS == (0.1, 0.2, 0.3, 0.4, 0.5)


def test_add_noise_without_clip_has_the_requested_std_and_zero_mean():
    out = AddGaussianNoise(0.2, clip=False)(_grey(0.5, (1, 256, 256)))
    noise = out - 0.5
    assert abs(float(noise.std()) - 0.2) < 0.004
    assert abs(float(noise.mean())) < 0.004


def test_add_noise_is_reproducible_for_the_same_image():
    img = np.random.default_rng(1).random((1, 32, 32)).astype(np.float32)
    t = AddGaussianNoise(0.3, seed=7)
    np.testing.assert_array_equal(t(img), t(img))


def test_add_noise_differs_between_images_and_seeds():
    a, b = _grey(0.5), _grey(0.4)
    t = AddGaussianNoise(0.1, clip=False)
    assert not np.allclose(t(a) - a, t(b) - b)
    assert not np.allclose(t(a), AddGaussianNoise(0.1, seed=1, clip=False)(a))


def test_clip_keeps_output_in_unit_range():
    out = AddGaussianNoise(0.5)(_grey(0.95))
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert (out == 1.0).any()


def test_sigma_zero_returns_unchanged_float32_copy():
    img = np.array([[[0.0, 0.25, 1.0]]], dtype=np.float64)
    out = AddGaussianNoise(0.0)(img)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, img.astype(np.float32))


def test_metatensor_input_keeps_type_and_meta():
    img = MetaTensor(torch.full((1, 8, 8), 0.5), meta={"filename_or_obj": "slice.png"})
    out = AddGaussianNoise(0.1)(img)
    assert isinstance(out, MetaTensor) and out.dtype == torch.float32
    assert out.meta["filename_or_obj"] == "slice.png"


@pytest.mark.parametrize("sigma", [-0.1, float("nan"), "0.1", True])
def test_bad_sigma_raises(sigma):
    with pytest.raises(ValueError, match="sigma"):
        AddGaussianNoise(sigma)


def test_bad_seed_raises():
    with pytest.raises(ValueError, match="seed"):
        AddGaussianNoise(0.1, seed=-1)


def test_rand_noise_draws_sigma_from_the_set():
    t = RandAddGaussianNoise(sigmas=(0.1, 0.4), clip=False).set_random_state(0)
    drawn = set()
    for _ in range(20):
        out = t(_grey(0.5, (1, 128, 128)))
        drawn.add(t.sigma)
        assert abs(float((out - 0.5).std()) - t.sigma) < 0.01
    assert drawn == {0.1, 0.4}


def test_rand_noise_is_reproducible_with_its_seed_and_ignores_global_rng():
    img = _grey()
    np.random.seed(1)
    a = RandAddGaussianNoise().set_random_state(3)(img)
    np.random.seed(2)
    b = RandAddGaussianNoise().set_random_state(3)(img)
    np.testing.assert_array_equal(a, b)


def test_rand_noise_with_prob_zero_returns_the_input():
    t = RandAddGaussianNoise(prob=0.0)
    img = _grey(0.3)
    np.testing.assert_array_equal(t(img), img)
    assert t.sigma == 0.0


def test_rand_noise_rejects_empty_sigmas_and_bad_prob():
    with pytest.raises(ValueError, match="at least one"):
        RandAddGaussianNoise(sigmas=())
    with pytest.raises(ValueError, match="prob"):
        RandAddGaussianNoise(prob=1.5)


def test_dict_keeps_clean_image_under_clean_key_and_records_sigma():
    img = np.random.default_rng(0).random((1, 16, 16)).astype(np.float32)
    out = AddGaussianNoised("image", sigma=0.2, clean_keys="label")({"image": img})
    np.testing.assert_array_equal(out["label"], img)
    np.testing.assert_array_equal(out["image"], AddGaussianNoise(0.2)(img))
    assert out["noise_sigma"] == 0.2


def test_dict_default_clean_key_is_key_suffixed():
    out = AddGaussianNoised("image", sigma=0.1)({"image": _grey()})
    assert "image_clean" in out


def test_dict_reads_per_sample_sigma_from_sigma_key():
    img = _grey()
    t = AddGaussianNoised("image", sigma=None, clean_keys="label")
    out = t({"image": img, "noise_sigma": 0.4})
    np.testing.assert_array_equal(out["image"], AddGaussianNoise(0.4)(img))


def test_dict_without_sigma_or_sigma_key_raises():
    with pytest.raises(ValueError, match="sigma"):
        AddGaussianNoised("image", sigma=None, sigma_key=None)


def test_dict_clean_key_equal_to_image_key_raises():
    with pytest.raises(ValueError, match="overwrite"):
        AddGaussianNoised("image", sigma=0.1, clean_keys="image")


def test_rand_dict_matches_array_transform_with_the_same_seed():
    img = torch.full((1, 32, 32), 0.5)
    arr = RandAddGaussianNoise().set_random_state(5)
    expected = arr(img)
    out = RandAddGaussianNoised("image", clean_keys="label").set_random_state(5)({"image": img})
    torch.testing.assert_close(out["image"], expected)
    torch.testing.assert_close(out["label"], img)
    assert out["noise_sigma"] == arr.sigma


def test_rand_dict_with_prob_zero_copies_clean_and_records_zero_sigma():
    img = _grey(0.2)
    out = RandAddGaussianNoised("image", prob=0.0, clean_keys="label")({"image": img})
    np.testing.assert_array_equal(out["image"], img)
    np.testing.assert_array_equal(out["label"], img)
    assert out["noise_sigma"] == 0.0
