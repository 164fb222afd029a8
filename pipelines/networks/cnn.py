"""Named 2D CNN classifiers from MONAI, built by one factory so bundles select the network with a config id.

Every network returns one ``(N, num_classes)`` logits tensor, is built without pretrained weights (nothing is
downloaded), and scripts with ``torch.jit.script`` for ``monai.bundle ckpt_export``.

References:
    Huang et al., "Densely Connected Convolutional Networks", CVPR 2017 (DenseNet-121).
    Tan & Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks", ICML 2019.
    He et al., "Deep Residual Learning for Image Recognition", CVPR 2016 (ResNet-18/50).
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn
from monai.networks.nets import DenseNet121, EfficientNetBN, resnet18, resnet50

__all__ = ["CLASSIFIER_NAMES", "build_classifier", "gradcam_layer"]

#: Names accepted by :func:`build_classifier`.
CLASSIFIER_NAMES = ("densenet121", "efficientnet-b0", "resnet18", "resnet50")

# Grad-CAM target per network: the last feature map before global pooling (all channels of it). For DenseNet the
# last Conv2d only emits growth_rate channels of the final concatenation, so the post-norm ReLU is used instead.
_GRADCAM_LAYERS = {
    "densenet121": "class_layers.relu",
    "efficientnet-b0": "_conv_head",
    "resnet18": "layer4",
    "resnet50": "layer4",
}


def _check_positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or int(value) != value or int(value) < 1:
        raise ValueError(f"{what} must be an integer >= 1, got {value!r}")
    return int(value)


def build_classifier(name: str, in_channels: int = 3, num_classes: int = 2, width: float = 1.0, **kw: Any) -> nn.Module:
    """Build a 2D (or, with ``spatial_dims=3``, 3D) classifier by name.

    Args:
        name: ``"densenet121"`` (MONAI ``DenseNet121``), ``"efficientnet-b0"`` (MONAI ``EfficientNetBN``, plain
            Swish so it scripts), ``"resnet18"`` or ``"resnet50"`` (MONAI ``ResNet`` with a stride-2 first
            convolution, i.e. the ImageNet stem).
        in_channels: input channels, e.g. 3 for (brain, subdural, bone) CT windows.
        num_classes: output logits.
        width: channel multiplier of the ResNets (MONAI ``widen_factor``): 0.5 gives a half-width ResNet-18
            (32-64-128-256 channels, about 4x fewer multiply-adds), the right size for ~1k training images on a
            CPU budget. Other networks only accept 1.0.
        kw: passed to the MONAI constructor, e.g. ``init_features``/``growth_rate``/``block_config``/
            ``dropout_prob`` for DenseNet, ``widen_factor`` for ResNet. ``pretrained=True`` is refused: weights
            cannot be downloaded here and a silent download would make runs irreproducible.

    Returns:
        The network (``forward(x: (N, in_channels, H, W)) -> (N, num_classes)`` logits).

    Raises:
        ValueError: unknown name, non-positive channel/class counts, ``pretrained=True``, or
            ``spatial_dims`` other than 2 or 3.
    """
    in_channels = _check_positive_int(in_channels, "in_channels")
    num_classes = _check_positive_int(num_classes, "num_classes")
    if name not in CLASSIFIER_NAMES:
        raise ValueError(f"unknown network {name!r}; choose one of {list(CLASSIFIER_NAMES)}")
    kw = dict(kw)
    if kw.pop("pretrained", False):
        raise ValueError(f"{name}: pretrained weights are not supported (they would be downloaded); train from scratch")
    if not float(width) > 0:
        raise ValueError(f"{name}: width must be > 0, got {width!r}")
    if float(width) != 1.0 and not name.startswith("resnet"):
        raise ValueError(f"{name}: width {width} is only supported for the ResNets; leave it at 1.0")
    spatial_dims = kw.pop("spatial_dims", 2)
    if spatial_dims not in (2, 3):
        raise ValueError(f"{name}: spatial_dims must be 2 or 3, got {spatial_dims!r}")
    if name == "densenet121":
        return DenseNet121(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=num_classes,
                           pretrained=False, **kw)
    if name == "efficientnet-b0":
        net = EfficientNetBN("efficientnet-b0", pretrained=False, progress=False, spatial_dims=spatial_dims,
                             in_channels=in_channels, num_classes=num_classes, **kw)
        # The memory-efficient Swish is a custom autograd Function that TorchScript cannot compile.
        net.set_swish(memory_efficient=False)
        return net
    factory = resnet18 if name == "resnet18" else resnet50
    kw.setdefault("conv1_t_stride", 2)
    if float(width) != 1.0:
        kw["widen_factor"] = float(width) * float(kw.get("widen_factor", 1.0))
    return factory(pretrained=False, spatial_dims=spatial_dims, n_input_channels=in_channels, num_classes=num_classes,
                   **kw)


def gradcam_layer(name: str) -> str:
    """Module name (``named_modules``) of the Grad-CAM target layer of a :func:`build_classifier` network.

    Raises:
        ValueError: unknown network name.
    """
    if name not in _GRADCAM_LAYERS:
        raise ValueError(f"unknown network {name!r}; choose one of {list(CLASSIFIER_NAMES)}")
    return _GRADCAM_LAYERS[name]
