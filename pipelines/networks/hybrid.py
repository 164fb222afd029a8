"""CNN-ViT hybrid classifier: a MONAI ResNet stem and stages feed a transformer encoder.

The convolutional stages (``conv1_t_stride=2``, max-pool, ``layer1..layerK``) turn a 2D image into a feature
map; each position of that map becomes a token (1x1 projection to ``hidden_size``), a learnable [CLS] token
and learned position embeddings are added, MONAI ``TransformerBlock`` s encode the sequence, and a linear head
on the [CLS] token gives the logits. This is the hybrid of Dosovitskiy et al., "An Image is Worth 16x16
Words" (ICLR 2021), section 3.1, with a ResNet-50 backbone by default.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from monai.networks.blocks import TransformerBlock
from monai.networks.nets import ResNet

from pipelines.networks.transformer import freeze_unused_cross_attention


class CNNViTHybrid(nn.Module):
    """CNN-ViT hybrid for 2D classification; ``forward`` returns one logits tensor ``(N, num_classes)``.

    Args:
        in_channels: input channels (1 for MRI slices).
        num_classes: number of classes.
        img_size: input height = width in pixels; must be a multiple of the CNN stride (``4 * 2**(stages-1)``).
        cnn_block: ``"bottleneck"`` (ResNet-50 style) or ``"basic"`` (ResNet-18 style).
        cnn_layers: residual blocks per stage; its length (1..4) is the number of stages used. The default
            ``(3, 4, 6)`` is ResNet-50 up to ``layer3`` (stride 16: an 8x8 token grid at 128 px).
        cnn_inplanes: base width of each stage (ResNet default 64, 128, 256, 512).
        hidden_size: token width of the transformer.
        num_layers: transformer blocks.
        num_heads: attention heads (must divide ``hidden_size``).
        mlp_dim: width of the transformer MLP.
        dropout: dropout in the transformer and before the head, in [0, 1).
        save_attn: keep each block's attention matrix (``blocks[i].attn.att_mat``) for attention rollout.

    Attributes:
        blocks: the transformer blocks (``nn.ModuleList``).
        feature_grid: ``(h, w)`` token grid; token 0 is [CLS], tokens ``1..h*w`` the grid in row-major order.
        num_prefix_tokens: 1 ([CLS]).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 4,
        img_size: int = 128,
        cnn_block: str = "bottleneck",
        cnn_layers: Sequence[int] = (3, 4, 6),
        cnn_inplanes: Sequence[int] = (64, 128, 256),
        hidden_size: int = 256,
        num_layers: int = 4,
        num_heads: int = 8,
        mlp_dim: int = 512,
        dropout: float = 0.1,
        save_attn: bool = True,
    ) -> None:
        super().__init__()
        n_stages = len(cnn_layers)
        if not 1 <= n_stages <= 4:
            raise ValueError(f"cnn_layers must have 1 to 4 stages, got {list(cnn_layers)}")
        if len(cnn_inplanes) != n_stages:
            raise ValueError(f"cnn_inplanes needs {n_stages} entries to match cnn_layers, got {list(cnn_inplanes)}")
        if cnn_block not in ("basic", "bottleneck"):
            raise ValueError(f"cnn_block must be 'basic' or 'bottleneck', got {cnn_block!r}")
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        stride = 4 * 2 ** (n_stages - 1)
        if img_size % stride:
            raise ValueError(f"img_size {img_size} must be a multiple of the CNN stride {stride}")
        layers = list(cnn_layers) + [1] * (4 - n_stages)
        inplanes = list(cnn_inplanes) + [int(cnn_inplanes[-1]) * 2 ** (i + 1) for i in range(4 - n_stages)]
        resnet = ResNet(
            block=cnn_block,
            layers=layers,
            block_inplanes=inplanes,
            spatial_dims=2,
            n_input_channels=in_channels,
            conv1_t_size=7,
            conv1_t_stride=2,
            feed_forward=False,
        )
        stages = [resnet.conv1, resnet.bn1, resnet.act, resnet.maxpool]
        stages += [getattr(resnet, f"layer{i + 1}") for i in range(n_stages)]
        self.cnn = nn.Sequential(*stages)
        expansion = 4 if cnn_block == "bottleneck" else 1
        cnn_channels = int(cnn_inplanes[-1]) * expansion
        self.img_size = int(img_size)
        self.feature_grid = (img_size // stride, img_size // stride)
        self.num_prefix_tokens = 1
        n_tokens = self.feature_grid[0] * self.feature_grid[1]
        self.proj = nn.Conv2d(cnn_channels, hidden_size, kernel_size=1)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.pos_embed = nn.Parameter(torch.zeros(1, n_tokens + 1, hidden_size))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.pos_drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            [
                TransformerBlock(hidden_size, mlp_dim, num_heads, dropout_rate=dropout, qkv_bias=True, save_attn=save_attn)
                for _ in range(num_layers)
            ]
        )
        self.norm = nn.LayerNorm(hidden_size)
        self.head_drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size, num_classes)
        nn.init.zeros_(self.head.bias)
        freeze_unused_cross_attention(self)  # or DDP stops: MONAI's blocks hold an unused LayerNorm

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised [CLS] embedding ``(N, hidden_size)`` (the penultimate features)."""
        feats = self.proj(self.cnn(x))  # (N, D, h, w)
        tokens = feats.flatten(2).transpose(1, 2)  # (N, h*w, D), row-major grid
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = self.pos_drop(torch.cat((cls, tokens), dim=1) + self.pos_embed)
        for blk in self.blocks:
            tokens = blk(tokens)
        return self.norm(tokens[:, 0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_drop(self.forward_features(x)))
