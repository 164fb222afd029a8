"""The distributed class-balanced sampler: disjoint per-rank shares of one weighted draw, new every epoch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.training.distributed import DistributedWeightedSampler, make_sampler


def test_ranks_split_one_weighted_draw_between_them():
    weights = [1.0, 1.0, 1.0, 3.0, 3.0, 9.0, 0.0]
    ranks = [DistributedWeightedSampler(weights, 7, seed=5, num_replicas=2, rank=r) for r in (0, 1)]
    whole = DistributedWeightedSampler(weights, 8, seed=5, num_replicas=1, rank=0)
    a, b = (list(s) for s in ranks)
    assert len(a) == len(b) == len(ranks[0]) == 4
    assert [x for pair in zip(a, b) for x in pair] == list(whole)
    assert 6 not in a + b  # zero weight is never drawn


def test_each_epoch_draws_anew_and_repeats_with_the_seed():
    s = DistributedWeightedSampler([1.0] * 50, seed=0, num_replicas=2, rank=1)
    s.set_epoch(1)
    first = list(s)
    s.set_epoch(2)
    assert list(s) != first
    s.set_epoch(1)
    assert list(s) == first


def test_balanced_sampler_draws_classes_equally_often():
    records = [{"label": 0}] * 90 + [{"label": 1}] * 10
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("pipelines.training.distributed.world_size", lambda: 2)
        mp.setattr("pipelines.training.distributed.rank", lambda: 0)
        sampler = make_sampler(records * 20, balanced=True, seed=0)
    labels = np.array([(records * 20)[i]["label"] for i in sampler])
    assert isinstance(sampler, torch.utils.data.distributed.DistributedSampler) and len(labels) == 1000
    assert abs(labels.mean() - 0.5) < 0.06


def test_bad_weights_or_rank_are_rejected():
    with pytest.raises(ValueError, match="weights"):
        DistributedWeightedSampler([0.0, 0.0], num_replicas=1, rank=0)
    with pytest.raises(ValueError, match="rank 2"):
        DistributedWeightedSampler([1.0], num_replicas=2, rank=2)
