"""Every trainable parameter of the transformer networks gets a gradient from one training step.

``DistributedDataParallel`` refuses a network with parameters that take no part in the loss ("Expected to have
finished reduction in the prior iteration"): MONAI's ``TransformerBlock`` always holds a cross-attention LayerNorm
that is never called, so the hybrid, ViT and DeiT overlays stopped at the second iteration under
``multi_gpu_train.json`` until ``freeze_unused_cross_attention`` froze it.
"""

from __future__ import annotations

import pytest
import torch

from pipelines.networks import CNNViTHybrid, DeiTClassifier, ViTClassifier
from pipelines.networks.transformer import freeze_unused_cross_attention

VIT = dict(img_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64)


@pytest.mark.parametrize(
    "build",
    [
        lambda: CNNViTHybrid(in_channels=1, num_classes=4, img_size=32, hidden_size=32, num_layers=2, num_heads=2,
                             mlp_dim=64),
        lambda: ViTClassifier(num_classes=4, **VIT),
        lambda: DeiTClassifier(num_classes=4, **VIT),
    ],
    ids=["hybrid", "vit", "deit"],
)
def test_one_training_step_reaches_every_trainable_parameter(build):
    torch.manual_seed(0)
    net = build().train()
    out = net(torch.randn(2, 1, 32, 32))
    sum(o.sum() for o in (out if isinstance(out, tuple) else (out,))).backward()
    assert [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None] == []
    frozen = [n for n, p in net.named_parameters() if not p.requires_grad]
    assert frozen and all(".norm_cross_attn." in n for n in frozen)  # only MONAI's unused LayerNorms
    assert freeze_unused_cross_attention(net) == len(frozen)  # idempotent, counts the weight and bias of each
