"""Data lists for the denoiser: every evaluation image at every noise level."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from transforms.noise import DEFAULT_SIGMAS

__all__ = ["with_sigmas"]


def with_sigmas(records: Sequence[dict], sigmas: Sequence[float] = DEFAULT_SIGMAS, sigma_key: str = "noise_sigma") -> list[dict]:
    """One copy of each record per noise level, with ``sigma_key`` set and ``image_name`` (the file name).

    Used with :class:`transforms.noise.AddGaussianNoised` (``sigma=None``) so one data list evaluates every
    image at every sigma, reproducibly.

    Args:
        records: data-list items with an ``image`` path (e.g. from :func:`pipelines.training.data.prepare_data`).
        sigmas: noise levels in [0, 1] units.
        sigma_key: key receiving the sigma.

    Raises:
        ValueError: no sigmas, or a negative one.
    """
    sigmas = [float(s) for s in sigmas]
    if not sigmas or min(sigmas) < 0:
        raise ValueError(f"sigmas must be a non-empty list of noise levels >= 0, got {sigmas}")
    return [
        {**rec, sigma_key: s, "image_name": Path(str(rec["image"])).name}
        for s in sigmas
        for rec in records
    ]
