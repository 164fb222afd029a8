"""The CNN-ViT hybrid: shapes, validation of arguments, attention for rollout, TorchScript trace."""

from __future__ import annotations

import pytest
import torch

from pipelines.networks import CNNViTHybrid, ViTClassifier

TINY = dict(cnn_block="basic", cnn_layers=(1, 1), cnn_inplanes=(8, 16), hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64)


def test_forward_returns_logits_of_every_class():
    net = CNNViTHybrid(num_classes=4, img_size=64, **TINY)
    assert net(torch.rand(3, 1, 64, 64)).shape == (3, 4)
    # two stages: conv1 /2, maxpool /2, layer2 /2 -> stride 8 -> 8x8 tokens
    assert net.feature_grid == (8, 8)


def test_resnet50_stage_default_has_stride_16():
    net = CNNViTHybrid(img_size=128, cnn_inplanes=(16, 32, 64), hidden_size=32, num_heads=4, mlp_dim=64, num_layers=1)
    assert net.feature_grid == (8, 8)
    blocks = [m for m in net.cnn.modules() if type(m).__name__ == "ResNetBottleneck"]
    assert len(blocks) == 3 + 4 + 6


def test_attention_is_saved_for_rollout():
    net = CNNViTHybrid(num_classes=2, img_size=64, **TINY).eval()
    net(torch.rand(2, 1, 64, 64))
    att = net.blocks[-1].attn.att_mat
    assert att.shape == (2, 4, 65, 65)
    assert torch.allclose(att.sum(-1), torch.ones(2, 4, 65), atol=1e-5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(img_size=60), "multiple of the CNN stride"),
        (dict(hidden_size=30), "not divisible"),
        (dict(cnn_layers=(1, 1, 1, 1, 1), cnn_inplanes=(8,) * 5), "1 to 4 stages"),
        (dict(cnn_inplanes=(8,)), "cnn_inplanes needs 2"),
        (dict(cnn_block="wide"), "cnn_block"),
        (dict(dropout=1.0), "dropout"),
    ],
)
def test_bad_arguments_fail_early(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CNNViTHybrid(**{**TINY, "img_size": 64, **kwargs})


@pytest.mark.parametrize("cls,kw", [(CNNViTHybrid, TINY), (ViTClassifier, dict(patch_size=16, hidden_size=32, mlp_dim=64, num_layers=1, num_heads=4))])
def test_traced_module_equals_eager(cls, kw):
    torch.manual_seed(0)
    net = cls(num_classes=3, img_size=64, **kw).eval()
    x = torch.rand(2, 1, 64, 64)
    traced = torch.jit.trace(net, x)
    y = torch.rand(5, 1, 64, 64)  # another batch size than the trace example
    assert torch.allclose(traced(y), net(y), atol=1e-5)


def test_vit_wrapper_returns_unsquashed_logits():
    torch.manual_seed(0)
    net = ViTClassifier(num_classes=2, img_size=32, patch_size=8, hidden_size=32, mlp_dim=64, num_layers=1, num_heads=4)
    with torch.no_grad():
        net.vit.classification_head.weight.mul_(100)
    out = net(torch.rand(4, 1, 32, 32))
    assert out.shape == (4, 2)
    assert out.abs().max() > 1.0  # Tanh would bound logits to [-1, 1]
