"""One factory for the 2D slice classifiers a bundle can select with its ``network_name`` config id."""

from __future__ import annotations

from typing import Any, Mapping

import torch.nn as nn

from pipelines.networks.cnn import CLASSIFIER_NAMES, build_classifier

__all__ = ["NETWORK_NAMES", "build_network"]

#: Names accepted by :func:`build_network`: the MONAI CNNs of :func:`build_classifier` and ``"hybrid"``.
NETWORK_NAMES = CLASSIFIER_NAMES + ("hybrid",)


def build_network(name: str, in_channels: int = 1, num_classes: int = 2, width: float = 1.0,
                  hybrid: Mapping[str, Any] | None = None) -> nn.Module:
    """Build a classifier by name.

    Args:
        name: one of :data:`NETWORK_NAMES`. ``"hybrid"`` is :class:`~pipelines.networks.hybrid.CNNViTHybrid`
            built from ``hybrid`` (its keyword arguments: ``img_size``, ``cnn_block``, ``cnn_layers``, ...);
            the other names go to :func:`~pipelines.networks.cnn.build_classifier` with ``width``.
        in_channels, num_classes: input channels and logits.
        width: channel multiplier of the ResNets (ignored by the hybrid, whose widths are ``cnn_inplanes``).
        hybrid: keyword arguments of the hybrid (ignored by the CNNs, so one config can hold both).

    Raises:
        ValueError: unknown name (listing the known ones), or invalid arguments of the chosen network.
    """
    if name == "hybrid":
        from pipelines.networks.hybrid import CNNViTHybrid

        return CNNViTHybrid(in_channels=in_channels, num_classes=num_classes, **dict(hybrid or {}))
    if name not in CLASSIFIER_NAMES:
        raise ValueError(f"unknown network {name!r}; choose one of {list(NETWORK_NAMES)}")
    return build_classifier(name, in_channels=in_channels, num_classes=num_classes, width=width)
