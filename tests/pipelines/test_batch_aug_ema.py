"""Batch-level augmentation (pipelines.training.batch_aug) and the weight EMA (pipelines.training.ema)."""

import pytest
import torch
import torch.nn as nn

from pipelines.training.batch_aug import BatchAugment, augment_batch
from pipelines.training.ema import EMAHandler, ModelEMA


def _ramp(n=4, size=16):
    x = torch.linspace(0, 1, size)[None, None, :, None].expand(n, 1, size, size).contiguous()
    return x


def test_flip_only_mirrors_along_flip_dim():
    x = _ramp()
    g = torch.Generator().manual_seed(0)
    out = augment_batch(x, g, flip_prob=1.0, flip_dim=-2, affine_prob=0, intensity_prob=0, noise_prob=0)
    assert torch.equal(out, x.flip(-2))


def test_everything_off_is_identity():
    x = torch.rand(3, 1, 12, 10)
    out = augment_batch(x, torch.Generator().manual_seed(1), flip_prob=0, affine_prob=0, intensity_prob=0, noise_prob=0)
    assert torch.equal(out, x)


def test_same_seed_same_batch_and_draws_differ_per_sample():
    x = torch.rand(8, 1, 16, 16)
    a = augment_batch(x, torch.Generator().manual_seed(3))
    b = augment_batch(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    same = torch.rand(1, 1, 16, 16).expand(8, 1, 16, 16).contiguous()
    out = augment_batch(same, torch.Generator().manual_seed(4), flip_prob=0, affine_prob=1.0, intensity_prob=0,
                        noise_prob=0)
    assert (out[0] - out[1:]).abs().amax() > 1e-3  # each sample got its own affine parameters


def test_identity_affine_keeps_image():
    x = torch.rand(2, 1, 16, 16)
    out = augment_batch(x, torch.Generator().manual_seed(0), flip_prob=0, affine_prob=1.0, rotate=0, scale=0,
                        translate=0, intensity_prob=0, noise_prob=0)
    assert torch.allclose(out, x, atol=1e-5)


def test_gamma_keeps_unit_range_endpoints():
    x = torch.tensor([0.0, 1.0]).view(1, 1, 1, 2).expand(6, 1, 2, 2).contiguous()
    out = augment_batch(x, torch.Generator().manual_seed(0), flip_prob=0, affine_prob=0, intensity_prob=1.0,
                        contrast=0.0, noise_prob=0)
    assert torch.allclose(out[..., 0], torch.zeros(6, 1, 2)) and torch.allclose(out[..., 1], torch.ones(6, 1, 2))


def test_prepare_batch_returns_device_tensors_and_checks_arguments():
    aug = BatchAugment(seed=0, flip_prob=1.0, affine_prob=0, intensity_prob=0, noise_prob=0)
    batch = {"image": _ramp(2), "label": torch.tensor([0, 1])}
    image, label = aug(batch, torch.device("cpu"))
    assert torch.equal(image, batch["image"].flip(-2)) and torch.equal(label, batch["label"])
    off = BatchAugment(seed=0, enabled=False)
    assert torch.equal(off(batch, "cpu")[0], batch["image"])
    with pytest.raises(ValueError, match="flip_prob"):
        BatchAugment(flip_prob=1.5)
    with pytest.raises(ValueError, match="unknown augmentation"):
        BatchAugment(rotation=0.1)
    with pytest.raises(ValueError, match="gamma"):
        BatchAugment(gamma=0.5)


def test_prepare_batch_state_round_trip_replays_draws():
    aug = BatchAugment(seed=5)
    state = aug.state_dict()
    batch = {"image": torch.rand(4, 1, 16, 16), "label": torch.zeros(4, dtype=torch.long)}
    first = aug(batch, "cpu")[0]
    aug.load_state_dict(state)
    assert torch.equal(aug(batch, "cpu")[0], first)


def test_ema_follows_the_average_with_warmup():
    net = nn.Sequential(nn.Linear(2, 1, bias=False), nn.BatchNorm1d(1))
    ema = ModelEMA(net, decay=0.5)
    with torch.no_grad():
        net[0].weight.fill_(1.0)
    start = ema.module[0].weight.clone()
    ema.update(net)  # t = 1: decay_t = min(0.5, 2/11) = 2/11
    d = 2.0 / 11.0
    assert torch.allclose(ema.module[0].weight, d * start + (1 - d) * torch.ones_like(start))
    for _ in range(60):
        ema.update(net)
    assert torch.allclose(ema.module[0].weight, torch.ones_like(start), atol=1e-6)
    assert not any(p.requires_grad for p in ema.module.parameters())
    assert ema.module[1].num_batches_tracked == net[1].num_batches_tracked  # integer buffers are copied


def test_ema_zero_decay_copies_and_state_round_trip():
    net = nn.Linear(3, 2)
    ema = ModelEMA(net, decay=0.0)
    with torch.no_grad():
        net.weight.add_(1.0)
    EMAHandler(ema, net)(None)
    assert torch.equal(ema.module.weight, net.weight)
    other = ModelEMA(nn.Linear(3, 2), decay=0.0)
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.module.weight, net.weight) and other.updates == 1
    with pytest.raises(ValueError, match="decay"):
        ModelEMA(net, decay=1.0)
