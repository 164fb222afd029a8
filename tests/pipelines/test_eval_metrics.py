"""Metrics and bootstrap CIs of pipelines.evaluation.metrics against scikit-learn and known values."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from sklearn import metrics as skm

from pipelines.evaluation.metrics import (
    bootstrap_ci,
    classification_metrics,
    evaluate_predictions,
    labels_to_indices,
    metrics_table,
)

NAMES4 = ["CN", "MCI", "AD", "other"]


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _fake_predictions(n: int, n_classes: int = 4, signal: float = 1.5, seed: int = 1):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    z = rng.normal(size=(n, n_classes))
    z[np.arange(n), y] += signal
    return y, _softmax(z)


def test_point_metrics_equal_sklearn_on_multiclass_predictions():
    y, p = _fake_predictions(300)
    pred = p.argmax(1)
    m = classification_metrics(y, p, NAMES4)
    prec, rec, f1, sup = skm.precision_recall_fscore_support(y, pred, labels=range(4), zero_division=0)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert m["weighted_f1"] == pytest.approx(skm.f1_score(y, pred, average="weighted"))
    assert m["macro_auc"] == pytest.approx(skm.roc_auc_score(y, p, multi_class="ovr", average="macro"))
    for k, name in enumerate(NAMES4):
        assert m[f"precision/{name}"] == pytest.approx(prec[k])
        assert m[f"recall/{name}"] == pytest.approx(rec[k])
        assert m[f"f1/{name}"] == pytest.approx(f1[k])
        assert m[f"support/{name}"] == sup[k]
        assert m[f"auc/{name}"] == pytest.approx(skm.roc_auc_score(y == k, p[:, k]))
        assert m[f"specificity/{name}"] == pytest.approx(skm.recall_score(y != k, pred != k))
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred, labels=range(4)).tolist()


def test_known_binary_case_gives_hand_computed_values():
    y = np.array([0, 0, 0, 1, 1])
    p1 = np.array([0.1, 0.4, 0.7, 0.6, 0.9])
    m = classification_metrics(y, np.stack([1 - p1, p1], 1), ["neg", "pos"])
    # predictions 0,0,1,1,1: TP=2, FP=1, TN=2, FN=0; AUC: 5 of 6 pairs ordered correctly.
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["precision/pos"] == pytest.approx(2 / 3)
    assert m["recall/pos"] == pytest.approx(1.0)
    assert m["specificity/pos"] == pytest.approx(2 / 3)
    assert m["auc/pos"] == pytest.approx(5 / 6)
    assert m["macro_auc"] == pytest.approx(5 / 6)
    assert m["confusion_matrix"] == [[2, 1], [0, 2]]


def test_binary_macro_auc_is_auc_of_positive_class():
    y, p = _fake_predictions(200, n_classes=2, signal=1.0, seed=3)
    m = classification_metrics(y, p, ["healthy", "disease"])
    assert m["macro_auc"] == pytest.approx(skm.roc_auc_score(y, p[:, 1]))
    assert m["macro_auc"] == m["auc/disease"]


def test_auc_with_tied_scores_equals_sklearn():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 3, 120)
    p = _softmax(np.round(rng.normal(size=(120, 3)), 0) + np.eye(3)[y])
    m = classification_metrics(y, p, ["a", "b", "c"])
    for k, name in enumerate("abc"):
        assert m[f"auc/{name}"] == pytest.approx(skm.roc_auc_score(y == k, p[:, k]))


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_macro_auc_skips_class_absent_from_labels():
    y, p = _fake_predictions(150, seed=7)
    y = np.where(y == 3, 0, y)
    m = classification_metrics(y, p, NAMES4)
    expected = np.mean([skm.roc_auc_score(y == k, p[:, k]) for k in range(3)])
    assert math.isnan(m["auc/other"])
    assert m["macro_auc"] == pytest.approx(expected)
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, p.argmax(1)))


def test_labels_to_indices_accepts_one_hot_and_column_labels():
    one_hot = np.eye(3)[[2, 0, 1]]
    assert labels_to_indices(one_hot, 3).tolist() == [2, 0, 1]
    assert labels_to_indices(np.array([[2], [0]]), 3).tolist() == [2, 0]


def test_mismatched_shapes_raise_value_error():
    y, p = _fake_predictions(10)
    with pytest.raises(ValueError, match="shape"):
        classification_metrics(y, p[:, :3], NAMES4)
    with pytest.raises(ValueError, match="samples"):
        classification_metrics(y[:5], p, NAMES4)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        classification_metrics(np.full(10, 4), p, NAMES4)


def test_bootstrap_ci_contains_point_estimate():
    y, p = _fake_predictions(400)
    point = classification_metrics(y, p, NAMES4)
    ci = bootstrap_ci(y, p, NAMES4, n_resamples=500, seed=0)
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc", "recall/AD", "auc/CN"):
        lo, hi = ci[key]
        assert lo <= point[key] <= hi, key
        assert hi - lo > 0


def test_bootstrap_ci_narrows_as_sample_size_grows():
    small = _fake_predictions(100, seed=11)
    large = _fake_predictions(2000, seed=11)
    ci_small = bootstrap_ci(*small, NAMES4, n_resamples=300, seed=0)
    ci_large = bootstrap_ci(*large, NAMES4, n_resamples=300, seed=0)
    for key in ("accuracy", "macro_auc", "macro_f1"):
        width_small = ci_small[key][1] - ci_small[key][0]
        width_large = ci_large[key][1] - ci_large[key][0]
        assert width_large < 0.5 * width_small, key


def test_stratified_bootstrap_keeps_class_supports():
    y, p = _fake_predictions(90, seed=2)
    ci = bootstrap_ci(y, p, NAMES4, n_resamples=50)
    for k, name in enumerate(NAMES4):
        n_k = float((y == k).sum())
        assert ci[f"support/{name}"] == (n_k, n_k)


def test_bootstrap_is_reproducible_for_a_seed_and_changes_with_it():
    y, p = _fake_predictions(120, seed=4)
    a = bootstrap_ci(y, p, NAMES4, n_resamples=100, seed=3)
    b = bootstrap_ci(y, p, NAMES4, n_resamples=100, seed=3)
    c = bootstrap_ci(y, p, NAMES4, n_resamples=100, seed=4)
    assert a == b
    assert a["macro_auc"] != c["macro_auc"]


def test_1000_resamples_of_400_samples_take_under_five_seconds():
    y, p = _fake_predictions(400)
    start = time.perf_counter()
    bootstrap_ci(y, p, NAMES4, n_resamples=1000, seed=0)
    assert time.perf_counter() - start < 5.0


def test_evaluate_predictions_and_metrics_table_agree():
    y, p = _fake_predictions(200, seed=9)
    result = evaluate_predictions(y, p, NAMES4, n_resamples=100, seed=0)
    table = metrics_table(result)
    assert list(table.columns) == ["metric", "value", "ci_low", "ci_high", "wilson_low", "wilson_high"]
    assert list(table["metric"]) == list(result["metrics"])
    row = table.set_index("metric").loc["macro_auc"]
    assert row["value"] == pytest.approx(skm.roc_auc_score(y, p, multi_class="ovr"))
    assert [row["ci_low"], row["ci_high"]] == result["ci"]["macro_auc"]
    assert result["support"] == {name: int((y == k).sum()) for k, name in enumerate(NAMES4)}
    assert result["n_samples"] == 200


def test_wilson_interval_matches_known_values_and_does_not_collapse():
    from pipelines.evaluation.metrics import wilson_interval

    lo, hi = wilson_interval(6, 6)
    assert lo == pytest.approx(0.6097, abs=1e-3) and hi == 1.0
    lo, hi = wilson_interval(5, 10)
    assert (lo, hi) == (pytest.approx(0.2366, abs=1e-3), pytest.approx(0.7634, abs=1e-3))


def test_small_all_correct_class_gets_an_honest_interval():
    """6 rare-class images all right: the stratified bootstrap collapses to [1, 1], Wilson does not."""
    from pipelines.evaluation.metrics import evaluate_predictions

    y = np.array([0] * 50 + [1] * 6)
    probs = np.zeros((56, 2))
    probs[np.arange(56), y] = 0.9
    probs[np.arange(56), 1 - y] = 0.1
    probs[:5] = [0.2, 0.8]  # five majority-class errors
    res = evaluate_predictions(y, probs, ["common", "rare"], n_resamples=200)
    assert res["ci"]["recall/rare"] == [1.0, 1.0]
    assert res["ci_wilson"]["recall/rare"][0] < 0.65
    assert res["ci_wilson"]["accuracy"][0] < res["metrics"]["accuracy"] < res["ci_wilson"]["accuracy"][1]
