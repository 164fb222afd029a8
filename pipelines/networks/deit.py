"""DeiT student: a ViT with a class token and a distillation token, each with its own linear head.

Touvron et al., "Training data-efficient image transformers & distillation through attention", ICML 2021.
The [CLS] head is trained on the labels, the [DIST] head on the teacher's predictions
(:class:`pipelines.training.distill.DistillationLoss`); at inference the two heads' logits are averaged.
"""

from __future__ import annotations

from typing import Tuple, Union

import torch
import torch.nn as nn
from monai.networks.blocks import PatchEmbeddingBlock, TransformerBlock

from pipelines.networks.transformer import freeze_unused_cross_attention


class DeiTClassifier(nn.Module):
    """ViT with class and distillation tokens for 2D classification.

    In eval mode ``forward`` returns one logits tensor ``(N, num_classes)``, the mean of the two heads
    (traces/scripts for export). In train mode it returns ``(cls_logits, dist_logits)``, what the distillation
    loss needs; :meth:`forward_heads` returns that pair in either mode.

    Args:
        in_channels: input channels (1 for MRI slices).
        num_classes: number of classes (>= 2).
        img_size: input height = width in pixels, a multiple of ``patch_size``.
        patch_size: square patch side in pixels.
        hidden_size: token width (DeiT-Ti 192, DeiT-S 384).
        mlp_dim: width of the transformer MLP (DeiT uses ``4 * hidden_size``).
        num_layers: transformer blocks (DeiT-Ti/S: 12).
        num_heads: attention heads, dividing ``hidden_size`` (DeiT-Ti 3, DeiT-S 6).
        dropout: dropout in the embeddings and transformer, in [0, 1).
        save_attn: keep each block's attention matrix (``blocks[i].attn.att_mat``) for attention rollout.

    Attributes:
        blocks: the transformer blocks.
        feature_grid: patch grid ``(h, w)``; token 0 is [CLS], token 1 is [DIST], tokens ``2..`` the grid in
            row-major order.
        num_prefix_tokens: 2.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 4,
        img_size: int = 128,
        patch_size: int = 16,
        hidden_size: int = 192,
        mlp_dim: int = 768,
        num_layers: int = 12,
        num_heads: int = 3,
        dropout: float = 0.1,
        save_attn: bool = True,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if patch_size < 1 or img_size % patch_size:
            raise ValueError(f"img_size {img_size} must be a positive multiple of patch_size {patch_size}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.patch_embedding = PatchEmbeddingBlock(
            in_channels=in_channels,
            img_size=(img_size, img_size),
            patch_size=(patch_size, patch_size),
            hidden_size=hidden_size,
            num_heads=num_heads,
            proj_type="conv",
            pos_embed_type="learnable",
            dropout_rate=dropout,
            spatial_dims=2,
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.dist_token, std=0.02)
        self.blocks = nn.ModuleList(
            [
                TransformerBlock(hidden_size, mlp_dim, num_heads, dropout_rate=dropout, qkv_bias=True, save_attn=save_attn)
                for _ in range(num_layers)
            ]
        )
        self.norm = nn.LayerNorm(hidden_size)
        self.head = nn.Linear(hidden_size, num_classes)
        self.head_dist = nn.Linear(hidden_size, num_classes)
        self.feature_grid = (img_size // patch_size, img_size // patch_size)
        self.num_prefix_tokens = 2
        freeze_unused_cross_attention(self)  # or DDP stops: MONAI's blocks hold an unused LayerNorm

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised [CLS] and [DIST] embeddings, ``(N, 2, hidden_size)``."""
        tokens = self.patch_embedding(x)  # (N, h*w, D) with position embeddings
        n = tokens.shape[0]
        tokens = torch.cat((self.cls_token.expand(n, -1, -1), self.dist_token.expand(n, -1, -1), tokens), dim=1)
        for blk in self.blocks:
            tokens = blk(tokens)
        return self.norm(tokens[:, :2])

    def forward_heads(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(cls_logits, dist_logits)``, each ``(N, num_classes)``, in train and eval mode."""
        feats = self.forward_features(x)
        return self.head(feats[:, 0]), self.head_dist(feats[:, 1])

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        cls_logits, dist_logits = self.forward_heads(x)
        if self.training:
            return cls_logits, dist_logits
        return (cls_logits + dist_logits) / 2
