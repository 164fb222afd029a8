"""Imbalance tools: class weights, cross-entropy / focal loss on known values, the class-balanced sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipelines.training.data import make_sampler
from pipelines.training.losses import CrossEntropy, FocalLoss, class_weights, make_loss

LOGITS = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.0], [-0.5, 0.2, 1.5], [1.0, 1.0, 1.0]], dtype=torch.float64)
TARGETS = torch.tensor([0, 2, 2, 1])


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


LOGP = _log_softmax(LOGITS.numpy())
NLL = -LOGP[np.arange(4), TARGETS.numpy()]  # per-sample cross-entropy


# -- class weights -----------------------------------------------------------------------------------------------
def test_no_class_weights_is_none():
    assert class_weights([0, 1, 1], 2, "none") is None


def test_inverse_weights_are_reciprocal_counts_normalised_to_mean_one():
    w = class_weights([0, 0, 0, 1], 2, "inverse")  # counts 3, 1 -> 1/3, 1 -> mean 2/3
    torch.testing.assert_close(w, torch.tensor([0.5, 1.5]))


def test_effective_number_weights_match_cui_et_al():
    w = class_weights([0, 0, 0, 1], 2, "effective", beta=0.9)
    raw = np.array([(1 - 0.9) / (1 - 0.9**3), (1 - 0.9) / (1 - 0.9**1)])  # 0.369..., 1.0
    torch.testing.assert_close(w, torch.as_tensor(raw / raw.mean(), dtype=torch.float32))


def test_effective_weights_approach_uniform_as_beta_goes_to_zero():
    torch.testing.assert_close(class_weights([0, 0, 0, 1], 2, "effective", beta=0.0), torch.ones(2))


def test_class_without_samples_raises_value_error():
    with pytest.raises(ValueError, match=r"\[2\]"):
        class_weights([0, 1, 1], 3, "inverse")


@pytest.mark.parametrize("kw", [{"method": "sqrt"}, {"method": "effective", "beta": 1.0}])
def test_bad_class_weight_settings_raise_value_error(kw):
    with pytest.raises(ValueError):
        class_weights([0, 1], 2, **kw)


# -- cross-entropy -----------------------------------------------------------------------------------------------
def test_ce_equals_mean_negative_log_likelihood_with_monai_shaped_labels():
    loss = make_loss("ce", num_classes=3)
    assert isinstance(loss, CrossEntropy)
    assert loss(LOGITS, TARGETS[:, None]).item() == pytest.approx(NLL.mean(), rel=1e-12)


def test_weighted_ce_is_the_weight_normalised_mean():
    labels = [0, 0, 0, 0, 1, 1, 2]  # counts 4, 2, 1 -> inverse weights
    loss = make_loss("ce", labels, 3, "inverse")
    w = 1.0 / np.array([4.0, 2.0, 1.0])
    w = w / w.mean()
    wi = w[TARGETS.numpy()]
    assert loss(LOGITS.float(), TARGETS).item() == pytest.approx((wi * NLL).sum() / wi.sum(), rel=1e-6)


def test_label_smoothing_mixes_nll_with_the_mean_log_probability():
    eps = 0.1
    loss = make_loss("ce", num_classes=3, label_smoothing=eps)
    want = ((1 - eps) * NLL - eps * LOGP.mean(axis=1)).mean()
    assert loss(LOGITS, TARGETS).item() == pytest.approx(want, rel=1e-12)


# -- focal loss --------------------------------------------------------------------------------------------------
def test_focal_loss_down_weights_by_one_minus_pt_to_the_gamma():
    loss = make_loss("focal", num_classes=3, gamma=2.0)
    assert isinstance(loss, FocalLoss)
    pt = np.exp(-NLL)
    assert loss(LOGITS, TARGETS).item() == pytest.approx(((1 - pt) ** 2 * NLL).mean(), rel=1e-12)


def test_focal_loss_with_gamma_zero_equals_cross_entropy():
    focal = make_loss("focal", num_classes=3, gamma=0.0)
    assert focal(LOGITS, TARGETS).item() == pytest.approx(F.cross_entropy(LOGITS, TARGETS).item(), rel=1e-12)


def test_weighted_focal_with_gamma_zero_equals_weighted_cross_entropy():
    labels = [0, 0, 0, 0, 1, 1, 2]
    focal = make_loss("focal", labels, 3, "effective", gamma=0.0)
    ce = make_loss("ce", labels, 3, "effective")
    assert focal(LOGITS.float(), TARGETS).item() == pytest.approx(ce(LOGITS.float(), TARGETS).item(), rel=1e-6)


def test_smoothed_focal_with_gamma_zero_equals_smoothed_cross_entropy():
    focal = make_loss("focal", num_classes=3, gamma=0.0, label_smoothing=0.2)
    want = F.cross_entropy(LOGITS, TARGETS, label_smoothing=0.2).item()
    assert focal(LOGITS, TARGETS).item() == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("kw", [{"kind": "hinge"}, {"label_smoothing": 1.0}, {"kind": "focal", "gamma": -1.0}])
def test_bad_loss_settings_raise_value_error(kw):
    with pytest.raises(ValueError):
        make_loss(num_classes=3, **kw)


# -- class-balanced sampler --------------------------------------------------------------------------------------
def _records(counts):
    return [{"label": c} for c, n in enumerate(counts) for _ in range(n)]


def test_balanced_sampler_draws_every_class_equally_often():
    records = _records([900, 80, 20])
    sampler = make_sampler(records, balanced=True, seed=0, num_samples=30000)
    drawn = np.bincount([records[i]["label"] for i in sampler], minlength=3) / 30000
    np.testing.assert_allclose(drawn, [1 / 3, 1 / 3, 1 / 3], atol=0.015)


def test_balanced_sampler_is_reproducible_for_a_seed_and_defaults_to_one_epoch():
    records = _records([50, 5])
    first = list(make_sampler(records, balanced=True, seed=3))
    assert len(first) == 55
    assert first == list(make_sampler(records, balanced=True, seed=3))


def test_unbalanced_sampler_is_none_so_the_loader_shuffles():
    assert make_sampler(_records([5, 1]), balanced=False) is None
