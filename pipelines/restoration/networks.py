"""The denoising network of ``bundles/mri_denoiser``: a MONAI BasicUNet, optionally residual."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import BasicUNet
from torch import nn

__all__ = ["DenoisingUNet", "denoising_loss"]


class DenoisingUNet(nn.Module):
    """2D single-channel denoiser: MONAI ``BasicUNet`` (Falk et al., Nat Methods 16:67, 2019), residual by default.

    With ``residual=True`` the U-Net predicts the noise and the output is ``x - unet(x)`` (the residual
    learning of DnCNN, Zhang et al., IEEE TIP 26:3142, 2017): the network starts near the identity, so even a
    short training never makes an image worse than its noisy input by much, and it converges faster.
    The output is not clamped (clamp to [0, 1] in post-processing) so gradients are never cut.

    Input and output: ``(N, in_channels, H, W)`` float images in [0, 1]; any H, W (BasicUNet pads odd sizes).

    Args:
        features: six BasicUNet feature counts (encoder levels 0-4 and the last decoder level).
        in_channels: image channels (1 for grey MRI).
        residual: predict the noise and subtract it (needs ``in_channels == out_channels``).
        act, norm, dropout, upsample: passed to ``BasicUNet``.
    """

    def __init__(
        self,
        features: Sequence[int] = (32, 32, 64, 128, 256, 32),
        in_channels: int = 1,
        residual: bool = True,
        act: str | tuple = ("LeakyReLU", {"negative_slope": 0.1, "inplace": True}),
        norm: str | tuple = ("instance", {"affine": True}),
        dropout: float = 0.0,
        upsample: str = "deconv",
    ) -> None:
        super().__init__()
        features = tuple(int(f) for f in features)
        if len(features) != 6 or min(features) < 1:
            raise ValueError(f"features must be six positive ints (BasicUNet), got {features}")
        if int(in_channels) < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        self.residual = bool(residual)
        self.unet = BasicUNet(
            spatial_dims=2,
            in_channels=int(in_channels),
            out_channels=int(in_channels),
            features=features,
            act=act,
            norm=norm,
            dropout=float(dropout),
            upsample=upsample,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.unet(x)
        if self.residual:
            return x - y
        return y


def denoising_loss(name: str) -> nn.Module:
    """Training loss of the denoiser: ``"l1"`` (mean absolute error) or ``"mse"`` (mean squared error)."""
    losses = {"l1": nn.L1Loss, "mse": nn.MSELoss}
    if name not in losses:
        raise ValueError(f"loss must be one of {sorted(losses)}, got {name!r}")
    return losses[name]()
