"""Paired bootstrap differences between two arms of runs (pipelines.evaluation.metrics.paired_difference_ci)."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.evaluation.metrics import bootstrap_ci, paired_difference_ci

NAMES = ["CN", "AD"]
Y8 = np.array([0, 0, 0, 0, 1, 1, 1, 1])


def _probs_with_errors(y: np.ndarray, wrong: list[int], confidence: float = 0.8) -> np.ndarray:
    """Two-class probabilities that predict ``y`` except at the ``wrong`` indices; scores differ per sample."""
    pred = y.copy()
    pred[wrong] = 1 - pred[wrong]
    p_ad = np.where(pred == 1, confidence, 1.0 - confidence) + 0.001 * np.arange(len(y))
    return np.stack([1.0 - p_ad, p_ad], axis=1)


def _random_probs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    z = rng.normal(size=(n, 2))
    z[np.arange(n), y] += 1.0
    return y, np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)


def test_identical_arms_give_zero_difference_and_a_zero_interval():
    y, p = _random_probs(120, seed=0)
    q = _random_probs(120, seed=1)[1]
    out = paired_difference_ci(y, [p, q], [p, q], NAMES, n_resamples=300)
    for metric in ("macro_f1", "macro_auc", "accuracy", "balanced_accuracy"):
        assert out[metric]["diff"] == 0.0
        assert out[metric]["a"] == out[metric]["b"]
        assert out[metric]["ci"] == [0.0, 0.0]
        assert out[metric]["p_le_0"] == 1.0
    assert (out["n_samples"], out["n_resamples"], out["bootstrap_unit"]) == (120, 300, "image")


def test_a_strictly_better_arm_has_a_positive_interval():
    y = np.repeat([0, 1], 40)
    good = [_probs_with_errors(y, [0]), _probs_with_errors(y, [79])]
    bad = [_probs_with_errors(y, list(range(0, 80, 4))), _probs_with_errors(y, list(range(1, 80, 4)))]
    out = paired_difference_ci(y, good, bad, NAMES, n_resamples=1000, seed=2)
    for metric in ("accuracy", "balanced_accuracy", "macro_f1"):
        assert out[metric]["ci"][0] > 0.0
        assert out[metric]["p_le_0"] == 0.0
    assert out["accuracy"]["diff"] == pytest.approx((79 / 80) - (60 / 80))


def test_point_estimates_average_the_runs_of_each_arm():
    a = [_probs_with_errors(Y8, []), _probs_with_errors(Y8, [0, 5])]  # accuracy 1.0 and 0.75
    b = [_probs_with_errors(Y8, [0, 1, 4, 5]), _probs_with_errors(Y8, [2, 6])]  # accuracy 0.5 and 0.75
    out = paired_difference_ci(Y8, a, b, NAMES, metrics=("accuracy", "recall/AD"), n_resamples=50)
    assert out["accuracy"]["a"] == pytest.approx(0.875)
    assert out["accuracy"]["b"] == pytest.approx(0.625)
    assert out["accuracy"]["diff"] == pytest.approx(0.25)
    # recall of AD: a 4/4 and 3/4; b 2/4 and 3/4.
    assert (out["recall/AD"]["a"], out["recall/AD"]["b"]) == (pytest.approx(0.875), pytest.approx(0.625))
    assert set(out) == {"accuracy", "recall/AD", "n_samples", "n_resamples", "bootstrap_unit"}


def test_resamples_share_the_indices_of_bootstrap_ci_for_a_seed():
    y, p = _random_probs(200, seed=4)
    perfect = _probs_with_errors(y, [])  # accuracy 1 in every resample
    out = paired_difference_ci(y, [p], [perfect], NAMES, metrics=("accuracy",), n_resamples=400, seed=9)
    lo, hi = bootstrap_ci(y, p, NAMES, n_resamples=400, seed=9)["accuracy"]
    assert out["accuracy"]["ci"] == [pytest.approx(lo - 1.0), pytest.approx(hi - 1.0)]


def test_groups_resample_subjects_for_both_arms():
    y = np.repeat([0, 1], 50)
    groups = np.repeat(np.arange(10), 10)
    a = [_probs_with_errors(y, [])]
    b = [_probs_with_errors(y, list(range(10)))]  # every image of subject 0 wrong
    image = paired_difference_ci(y, a, b, NAMES, metrics=("accuracy",), n_resamples=500)
    subject = paired_difference_ci(y, a, b, NAMES, metrics=("accuracy",), n_resamples=500, groups=groups)
    assert subject["bootstrap_unit"] == "subject"
    assert subject["accuracy"]["diff"] == image["accuracy"]["diff"] == pytest.approx(0.1)
    # subject 0 is drawn 0 to several times: the difference spans [0, 0.3] or so, far wider than per image.
    assert subject["accuracy"]["ci"][0] == 0.0
    # diff <= 0 exactly when none of the 5 CN draws is subject 0: 0.8 ** 5 = 0.33.
    assert subject["accuracy"]["p_le_0"] == pytest.approx(0.8**5, abs=0.06)
    assert image["accuracy"]["p_le_0"] == 0.0
    assert subject["accuracy"]["ci"][1] - subject["accuracy"]["ci"][0] > 2 * np.diff(image["accuracy"]["ci"])[0]


def test_mismatched_or_empty_inputs_raise_value_error():
    y, p = _random_probs(50, seed=0)
    with pytest.raises(ValueError, match=r"probs_b\[1\] must have shape \(N, C\) with N = 50"):
        paired_difference_ci(y, [p], [p, p[:49]], NAMES, n_resamples=10)
    with pytest.raises(ValueError, match="probs_a must be a non-empty list"):
        paired_difference_ci(y, [], [p], NAMES, n_resamples=10)
    with pytest.raises(ValueError, match=r"shape \(N, 2\)"):
        paired_difference_ci(y, [p], [np.hstack([p, p])], NAMES, n_resamples=10)
    with pytest.raises(ValueError, match="unknown: \\['f2'\\]"):
        paired_difference_ci(y, [p], [p], NAMES, metrics=("f2",), n_resamples=10)
