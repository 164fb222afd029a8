"""Optimizer parameter groups: weight decay on weights only, never on biases or normalisation parameters."""

from __future__ import annotations

import torch.nn as nn

__all__ = ["decay_groups"]


def decay_groups(network: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW parameter groups: matrices/kernels (``ndim > 1``) with ``weight_decay``, the rest without.

    Decaying BatchNorm/LayerNorm scales, biases, position embeddings' 1-D parts or the [CLS] token pulls them to
    0 for no regularising benefit (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019;
    the convention of timm and of most ViT/DeiT recipes). Frozen parameters are left out.

    Raises:
        ValueError: negative ``weight_decay``.
    """
    if float(weight_decay) < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    decay, no_decay = [], []
    for p in network.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": float(weight_decay)}, {"params": no_decay, "weight_decay": 0.0}]
