"""Subject-level (grouped) bootstrap CIs of pipelines.evaluation.metrics on constructed clustered data."""

from __future__ import annotations

import time

import numpy as np
import pytest

from pipelines.evaluation.metrics import bootstrap_ci, evaluate_predictions

NAMES = ["CN", "AD"]


def _clustered(n_subjects: int = 10, images_per_subject: int = 20):
    """Half the subjects per class; one subject of each class is predicted wrong; a subject's images are identical."""
    subject_label = np.arange(n_subjects) * 2 // n_subjects  # 0,0,...,1,1
    wrong = np.zeros(n_subjects, dtype=bool)
    wrong[[0, n_subjects - 1]] = True
    p_ad = np.where(subject_label == 1, 0.8, 0.2)
    p_ad = np.where(wrong, 1.0 - p_ad, p_ad) + 0.01 * np.arange(n_subjects)  # distinct score per subject
    y = np.repeat(subject_label, images_per_subject)
    probs = np.repeat(np.stack([1.0 - p_ad, p_ad], axis=1), images_per_subject, axis=0)
    groups = np.repeat([f"sub-{s:02d}" for s in range(n_subjects)], images_per_subject)
    return y, probs, groups


def test_identical_images_of_a_subject_widen_the_accuracy_ci_markedly():
    y, probs, groups = _clustered()
    image = bootstrap_ci(y, probs, NAMES, n_resamples=1000, seed=0)
    subject = bootstrap_ci(y, probs, NAMES, n_resamples=1000, seed=0, groups=groups)
    image_width = image["accuracy"][1] - image["accuracy"][0]
    subject_width = subject["accuracy"][1] - subject["accuracy"][0]
    # 200 images but only 10 independent subjects: about sqrt(20) ~ 4.5 times wider.
    assert image_width == pytest.approx(0.10, abs=0.03)
    assert subject_width > 3.0 * image_width
    assert subject["accuracy"][0] <= 0.8 <= subject["accuracy"][1]


def test_subject_bootstrap_keeps_the_number_of_subjects_per_label():
    y, probs, groups = _clustered()
    ci = bootstrap_ci(y, probs, NAMES, n_resamples=200, seed=0, groups=groups)
    assert ci["support/CN"] == (100.0, 100.0)
    assert ci["support/AD"] == (100.0, 100.0)


def test_subject_bootstrap_draws_whole_subjects():
    # CN: subjects of 1 and 3 images; AD: one subject of 2 images. A resample holds 2 CN subjects: 2, 4 or 6 images.
    y = np.array([0, 0, 0, 0, 1, 1])
    groups = ["a", "b", "b", "b", "c", "c"]
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.6, 0.4], [0.6, 0.4], [0.3, 0.7], [0.3, 0.7]])
    ci = bootstrap_ci(y, probs, NAMES, n_resamples=2000, seed=1, groups=groups)
    assert ci["support/CN"] == (2.0, 6.0)
    assert ci["support/AD"] == (2.0, 2.0)


def test_all_singleton_groups_give_the_image_level_intervals():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 150)
    probs = rng.dirichlet([1, 1], 150)
    image = bootstrap_ci(y, probs, NAMES, n_resamples=300, seed=7)
    singletons = bootstrap_ci(y, probs, NAMES, n_resamples=300, seed=7, groups=[f"s{i}" for i in range(150)])
    assert singletons == image
    result = evaluate_predictions(y, probs, NAMES, n_resamples=300, seed=7, groups=np.arange(150))
    assert result["bootstrap_unit"] == "image"
    assert result["n_groups"] == 150
    assert result["ci"] == {k: list(v) for k, v in image.items()}


def test_evaluate_predictions_records_the_subject_unit_and_group_count():
    y, probs, groups = _clustered()
    result = evaluate_predictions(y, probs, NAMES, n_resamples=100, groups=groups)
    assert result["bootstrap_unit"] == "subject"
    assert result["n_groups"] == 10
    assert result["n_samples"] == 200
    assert result["metrics"]["accuracy"] == pytest.approx(0.8)
    plain = evaluate_predictions(y, probs, NAMES, n_resamples=0)
    assert (plain["bootstrap_unit"], plain["n_groups"]) == ("image", 200)


def test_groups_of_another_length_raise_value_error():
    y, probs, groups = _clustered()
    with pytest.raises(ValueError, match="groups has 199 ids"):
        bootstrap_ci(y, probs, NAMES, n_resamples=10, groups=groups[:-1])


def test_1000_subject_resamples_of_500_images_take_under_two_seconds():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(100), 5)
    y = np.repeat(rng.integers(0, 4, 100), 5)
    probs = rng.dirichlet([1, 1, 1, 1], 500)
    start = time.perf_counter()
    bootstrap_ci(y, probs, ["a", "b", "c", "d"], n_resamples=1000, seed=0, groups=groups)
    assert time.perf_counter() - start < 2.0
