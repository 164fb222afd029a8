"""Helpers for networks built from MONAI's ``TransformerBlock``."""

from __future__ import annotations

from monai.networks.blocks import TransformerBlock
from torch import nn

__all__ = ["freeze_unused_cross_attention"]


def freeze_unused_cross_attention(module: nn.Module) -> int:
    """Mark the ``norm_cross_attn`` parameters of every MONAI ``TransformerBlock`` without cross-attention as not
    trainable; returns how many tensors were frozen.

    MONAI creates that LayerNorm in every block, also when ``with_cross_attention=False`` and it is never called,
    so its weight and bias never get a gradient. ``DistributedDataParallel`` then stops the second training
    iteration ("Expected to have finished reduction in the prior iteration ... parameters that were not used in
    producing loss"). Frozen parameters are left out of DDP's gradient reduction; the state dict is unchanged, so
    checkpoints load either way.
    """
    n = 0
    for block in module.modules():
        if isinstance(block, TransformerBlock) and not block.with_cross_attention:
            for p in block.norm_cross_attn.parameters():
                p.requires_grad_(False)
                n += 1
    return n
