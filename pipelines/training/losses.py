"""Losses and class weights for imbalanced classification."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def class_weights(labels: Sequence[int], num_classes: int, method: str = "none", beta: float = 0.999) -> torch.Tensor | None:
    """Per-class loss weights, normalised to mean 1.

    Args:
        labels: training labels.
        num_classes: number of classes.
        method: ``"none"``, ``"inverse"`` (1 / frequency) or ``"effective"`` (class-balanced weights of
            Cui et al., CVPR 2019: ``(1 - beta) / (1 - beta ** n_c)``).
        beta: effective-number hyper-parameter in [0, 1).
    """
    if method == "none":
        return None
    counts = np.bincount(np.asarray(labels, dtype=int), minlength=num_classes).astype(np.float64)
    if (counts == 0).any():
        raise ValueError(f"class(es) {np.flatnonzero(counts == 0).tolist()} have no training samples")
    if method == "inverse":
        w = 1.0 / counts
    elif method == "effective":
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        w = (1.0 - beta) / (1.0 - np.power(beta, counts))
    else:
        raise ValueError(f"unknown class weight method {method!r}; use none, inverse or effective")
    w = w / w.mean()
    return torch.as_tensor(w, dtype=torch.float32)


class FocalLoss(nn.Module):
    """Multi-class focal loss (Lin et al., ICCV 2017) on logits, with optional class weights (alpha)."""

    def __init__(self, gamma: float = 2.0, weight: torch.Tensor | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.gamma = gamma
        self.label_smoothing = label_smoothing
        self.register_buffer("weight", weight if weight is not None else None)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.long().view(-1)
        logp = F.log_softmax(logits, dim=1)
        ce = F.nll_loss(logp, target, reduction="none")
        if self.label_smoothing > 0:
            ce = (1 - self.label_smoothing) * ce - self.label_smoothing * logp.mean(dim=1)
        pt = logp.gather(1, target[:, None]).squeeze(1).exp()
        loss = (1 - pt) ** self.gamma * ce
        if self.weight is not None:
            loss = loss * self.weight[target]
            return loss.sum() / self.weight[target].sum()
        return loss.mean()


class CrossEntropy(nn.CrossEntropyLoss):
    """Cross-entropy that accepts MONAI's ``(N, 1)`` or ``(N,)`` integer labels."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return super().forward(logits, target.long().view(-1))


def make_loss(
    kind: str = "ce",
    labels: Sequence[int] | None = None,
    num_classes: int = 2,
    weights: str = "none",
    beta: float = 0.999,
    label_smoothing: float = 0.0,
    gamma: float = 2.0,
) -> nn.Module:
    """Build the training loss from config ids (``loss``, ``class_weights``, ``label_smoothing``, ``focal_gamma``)."""
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    w = class_weights(labels or [], num_classes, weights, beta) if weights != "none" else None
    if kind == "ce":
        return CrossEntropy(weight=w, label_smoothing=label_smoothing)
    if kind == "focal":
        return FocalLoss(gamma=gamma, weight=w, label_smoothing=label_smoothing)
    raise ValueError(f"unknown loss {kind!r}; use ce or focal")
