"""MONAI ViT wrapped as a plain classifier (one logits tensor, no Tanh squashing)."""

from __future__ import annotations

import torch
import torch.nn as nn
from monai.networks.nets import ViT

from pipelines.networks.transformer import freeze_unused_cross_attention


class ViTClassifier(nn.Module):
    """Vision Transformer (Dosovitskiy et al., ICLR 2021) returning logits ``(N, num_classes)``.

    MONAI's ``ViT`` returns ``(logits, hidden_states)`` and squashes logits with Tanh by default; this
    wrapper sets ``post_activation=None`` and returns the logits only, so it scripts/traces for export.

    Attributes:
        blocks: the transformer blocks (attention saved for rollout).
        feature_grid: patch grid ``(h, w)``; token 0 is [CLS].
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 4,
        img_size: int = 128,
        patch_size: int = 16,
        hidden_size: int = 384,
        mlp_dim: int = 1536,
        num_layers: int = 12,
        num_heads: int = 6,
        dropout: float = 0.1,
        save_attn: bool = True,
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} must be a multiple of patch_size {patch_size}")
        self.vit = ViT(
            in_channels=in_channels,
            img_size=(img_size, img_size),
            patch_size=(patch_size, patch_size),
            hidden_size=hidden_size,
            mlp_dim=mlp_dim,
            num_layers=num_layers,
            num_heads=num_heads,
            classification=True,
            num_classes=num_classes,
            dropout_rate=dropout,
            spatial_dims=2,
            post_activation=None,
            qkv_bias=True,
            save_attn=save_attn,
        )
        self.blocks = self.vit.blocks
        self.feature_grid = (img_size // patch_size, img_size // patch_size)
        self.num_prefix_tokens = 1
        freeze_unused_cross_attention(self)  # or DDP stops: MONAI's blocks hold an unused LayerNorm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(x)[0]
