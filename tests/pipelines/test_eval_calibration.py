"""Temperature scaling, ECE, NLL and the reliability diagram."""

from __future__ import annotations

import math

import matplotlib.image as mpimg
import numpy as np
import pytest

from pipelines.evaluation.calibration import (
    apply_temperature,
    calibration_summary,
    expected_calibration_error,
    fit_temperature,
    nll,
    reliability_diagram,
)


def _calibrated_logits(n: int, seed: int, n_classes: int = 3):
    """Logits z and labels drawn from softmax(z), so softmax(z) is calibrated by construction."""
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=1.5, size=(n, n_classes))
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    y = (rng.random((n, 1)) > p.cumsum(1)).sum(1)
    return z, y


def test_fit_temperature_recovers_the_overconfidence_factor():
    z, y = _calibrated_logits(4000, seed=0)
    t = fit_temperature(3.0 * z, y)
    assert t == pytest.approx(3.0, rel=0.15)


def test_temperature_scaling_lowers_nll_and_ece_of_overconfident_logits():
    z_val, y_val = _calibrated_logits(2000, seed=1)
    z_test, y_test = _calibrated_logits(2000, seed=2)
    summary = calibration_summary(4.0 * z_val, y_val, 4.0 * z_test, y_test)
    assert summary["temperature"] > 2.0
    assert summary["nll_after"] < summary["nll_before"] - 0.2
    assert summary["ece_after"] < 0.5 * summary["ece_before"]
    assert summary["nll_before"] == pytest.approx(nll(apply_temperature(4.0 * z_test, 1.0), y_test))


def test_apply_temperature_keeps_argmax_and_rows_sum_to_one():
    z, _ = _calibrated_logits(50, seed=3)
    p = apply_temperature(z, 2.5)
    np.testing.assert_allclose(p.sum(1), 1.0)
    np.testing.assert_array_equal(p.argmax(1), z.argmax(1))
    with pytest.raises(ValueError, match="temperature"):
        apply_temperature(z, 0.0)


def test_nll_of_uniform_predictions_is_log_of_class_count():
    p = np.full((8, 4), 0.25)
    assert nll(p, np.arange(8) % 4) == pytest.approx(math.log(4))


def test_ece_of_known_bins():
    # 10 predictions at confidence 0.8, half right: one bin with |0.5 - 0.8| = 0.3.
    p = np.tile([0.8, 0.2], (10, 1))
    y = np.array([0] * 5 + [1] * 5)
    assert expected_calibration_error(p, y, n_bins=10) == pytest.approx(0.3)
    # Confident and always right: zero error.
    assert expected_calibration_error(np.eye(3)[[0, 1, 2]], [0, 1, 2]) == pytest.approx(0.0)


def test_reliability_diagram_writes_a_png(tmp_path):
    z, y = _calibrated_logits(300, seed=4)
    path = reliability_diagram(apply_temperature(3 * z, 1.0), apply_temperature(3 * z, 3.0), y,
                               tmp_path / "reliability.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[1] > img.shape[0] > 100
    assert [p.name for p in tmp_path.iterdir()] == ["reliability.png"]
