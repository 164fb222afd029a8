"""Additive Gaussian noise on [0, 1] images, for training and evaluating denoisers.

Two flavours, as for every random transform here:

* :class:`RandAddGaussianNoise` draws the noise level from a set of sigmas and the noise field from
  ``self.R`` (training);
* :class:`AddGaussianNoise` is its deterministic twin (evaluation): a fixed sigma, and a noise field that is
  a pure function of ``(image content, sigma, seed)``, so the same image always receives the same noise
  while different images receive independent-looking noise.

Intensity convention: images are float in [0, 1] (any shape, channel first); sigma is the standard
deviation of the noise in the same [0, 1] units (sigma 0.1 = 10 % of the full range, i.e. 25.5 grey levels
of an 8-bit image). With ``clip=True`` (default) the noisy image is clipped back to [0, 1], as it is when a
noisy image is stored as 8-bit. Output dtype is float32 of the input's container type (numpy / tensor /
MetaTensor with its meta).
"""

from __future__ import annotations

import zlib
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform, Transform
from monai.utils import TransformBackends, convert_to_dst_type, convert_to_numpy, ensure_tuple, ensure_tuple_rep

__all__ = [
    "DEFAULT_SIGMAS",
    "AddGaussianNoise",
    "AddGaussianNoised",
    "RandAddGaussianNoise",
    "RandAddGaussianNoised",
]

#: Noise levels of the reference denoising study, in [0, 1] intensity units.
DEFAULT_SIGMAS = (0.1, 0.2, 0.3, 0.4, 0.5)


def _check_sigma(sigma: Any, name: str = "sigma") -> float:
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number >= 0 in [0, 1] intensity units, got {sigma!r}")
    sigma = float(sigma)
    if not np.isfinite(sigma) or sigma < 0:
        raise ValueError(f"{name} must be a finite number >= 0 in [0, 1] intensity units, got {sigma!r}")
    return sigma


def _add_noise(img: Any, noise: np.ndarray, clip: bool) -> Any:
    arr = convert_to_numpy(img).astype(np.float32) + noise.astype(np.float32)
    if clip:
        np.clip(arr, 0.0, 1.0, out=arr)
    dtype = torch.float32 if isinstance(img, torch.Tensor) else np.float32
    return convert_to_dst_type(arr, img, dtype=dtype)[0]


class AddGaussianNoise(Transform):
    """Add zero-mean Gaussian noise of a fixed standard deviation, reproducibly.

    The noise field is drawn from ``numpy.random.default_rng([seed, round(sigma * 1e6), crc32(image bytes)])``:
    the same image, sigma and seed always give the same output (so evaluation sets are fixed), and two
    different images get unrelated noise.

    Args:
        sigma: noise standard deviation in [0, 1] intensity units (>= 0; 0 returns a float32 copy).
        seed: seed mixed into every noise draw (>= 0).
        clip: clip the result to [0, 1].
    """

    backend = [TransformBackends.NUMPY]

    def __init__(self, sigma: float, seed: int = 0, clip: bool = True) -> None:
        self.sigma = _check_sigma(sigma)
        if isinstance(seed, bool) or int(seed) != seed or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        self.seed = int(seed)
        self.clip = bool(clip)

    def noise_for(self, img: Any, sigma: float | None = None) -> np.ndarray:
        """The float32 noise field that :meth:`__call__` adds to ``img`` (optionally at another sigma)."""
        sigma = self.sigma if sigma is None else _check_sigma(sigma)
        arr = np.ascontiguousarray(convert_to_numpy(img), dtype=np.float32)
        rng = np.random.default_rng([self.seed, int(round(sigma * 1e6)), zlib.crc32(arr.tobytes())])
        return (rng.standard_normal(arr.shape) * sigma).astype(np.float32)

    def __call__(self, img: Any, sigma: float | None = None) -> Any:
        """Noisy copy of ``img``; ``sigma`` overrides the constructor's sigma for this call."""
        return _add_noise(img, self.noise_for(img, sigma), self.clip)


class RandAddGaussianNoise(RandomizableTransform):
    """Add zero-mean Gaussian noise whose sigma is drawn uniformly from a set of levels.

    With probability ``prob`` a sigma is chosen from ``sigmas`` and a noise field is drawn, both from
    ``self.R`` (seed it with ``set_random_state`` or MONAI's ``set_determinism``); otherwise the image is
    returned as float32 and :attr:`sigma` is 0.

    Args:
        sigmas: candidate noise standard deviations in [0, 1] intensity units (non-empty, each >= 0).
        prob: probability of adding noise, in [0, 1].
        clip: clip the result to [0, 1].
    """

    backend = [TransformBackends.NUMPY]

    def __init__(self, sigmas: Sequence[float] = DEFAULT_SIGMAS, prob: float = 1.0, clip: bool = True) -> None:
        if not 0.0 <= float(prob) <= 1.0:
            raise ValueError(f"prob must lie in [0, 1], got {prob!r}")
        RandomizableTransform.__init__(self, prob)
        sigmas = ensure_tuple(sigmas)
        if not sigmas:
            raise ValueError("sigmas must hold at least one noise level")
        self.sigmas = tuple(_check_sigma(s, "every sigma") for s in sigmas)
        self.clip = bool(clip)
        self.sigma = 0.0
        self._noise: np.ndarray | None = None

    def randomize(self, img: Any) -> None:  # type: ignore[override]
        super().randomize(None)
        self.sigma, self._noise = 0.0, None
        if not self._do_transform:
            return
        self.sigma = float(self.sigmas[self.R.randint(len(self.sigmas))])
        self._noise = (self.R.standard_normal(tuple(np.shape(img))) * self.sigma).astype(np.float32)

    def __call__(self, img: Any, randomize: bool = True) -> Any:
        if randomize:
            self.randomize(img)
        if self._noise is None:
            return _add_noise(img, np.zeros((), dtype=np.float32), clip=False)
        if tuple(self._noise.shape) != tuple(img.shape):
            raise ValueError(f"image shape {tuple(img.shape)} differs from the randomized noise {self._noise.shape}")
        return _add_noise(img, self._noise, self.clip)


class _NoiseMapd(MapTransform):
    """Shared key handling: copy each clean image to its ``clean_key`` before adding noise."""

    def __init__(
        self,
        keys: KeysCollection,
        clean_keys: KeysCollection | None,
        sigma_key: str | None,
        allow_missing_keys: bool,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if clean_keys is None:
            self.clean_keys: tuple[Hashable, ...] = tuple(f"{k}_clean" for k in self.keys)
        else:
            self.clean_keys = ensure_tuple_rep(clean_keys, len(self.keys))
        clash = set(self.clean_keys) & set(self.keys)
        if clash:
            raise ValueError(f"clean_keys {sorted(map(str, clash))} would overwrite the noisy keys {list(self.keys)}")
        self.sigma_key = sigma_key


class AddGaussianNoised(_NoiseMapd):
    """Dictionary twin of :class:`AddGaussianNoise`.

    The clean image of each key is kept under its ``clean_keys`` entry (default ``"<key>_clean"``), e.g.
    ``clean_keys="label"`` makes ``{"image": noisy, "label": clean}`` for a supervised denoising evaluator.

    Args:
        keys: image keys.
        sigma: fixed noise level in [0, 1] units; ``None`` reads it per sample from ``d[sigma_key]`` (so one
            data list can hold every image at every sigma).
        seed: see :class:`AddGaussianNoise`.
        clip: clip to [0, 1].
        clean_keys: where the clean copies go (one per key).
        sigma_key: key that receives (or, with ``sigma=None``, provides) the sigma used; ``None``: not stored.
        allow_missing_keys: skip absent keys.
    """

    backend = AddGaussianNoise.backend

    def __init__(
        self,
        keys: KeysCollection,
        sigma: float | None = None,
        seed: int = 0,
        clip: bool = True,
        clean_keys: KeysCollection | None = None,
        sigma_key: str | None = "noise_sigma",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, clean_keys, sigma_key, allow_missing_keys)
        if sigma is None and sigma_key is None:
            raise ValueError("give sigma, or a sigma_key that holds the sigma of each sample")
        self.transform = AddGaussianNoise(0.0 if sigma is None else sigma, seed=seed, clip=clip)
        self.fixed_sigma = sigma is not None

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.fixed_sigma:
            sigma = self.transform.sigma
        else:
            if self.sigma_key not in d:
                raise KeyError(f"sigma=None needs the per-sample sigma under {self.sigma_key!r}; keys: {list(d)}")
            sigma = _check_sigma(float(np.asarray(convert_to_numpy(d[self.sigma_key])).reshape(-1)[0]),
                                 f"d[{self.sigma_key!r}]")
        for key, clean_key in self.key_iterator(d, self.clean_keys):
            d[clean_key] = _add_noise(d[key], np.zeros((), dtype=np.float32), clip=False)
            d[key] = self.transform(d[key], sigma)
        if self.sigma_key is not None:
            d[self.sigma_key] = sigma
        return d


class RandAddGaussianNoised(RandomizableTransform, _NoiseMapd):
    """Dictionary twin of :class:`RandAddGaussianNoise`.

    One draw per sample (as MONAI's ``RandGaussianNoised``): with probability ``prob`` a sigma and a noise
    field are drawn once, from the held :class:`RandAddGaussianNoise` (seeded with :meth:`set_random_state`),
    and added to every key (so all keys must have the same shape).

    Args:
        keys: image keys.
        sigmas: candidate noise levels in [0, 1] units.
        prob: probability of adding noise.
        clip: clip to [0, 1].
        clean_keys: where the clean copies go (default ``"<key>_clean"``).
        sigma_key: key receiving the sigma drawn (0.0 when no noise was added); ``None``: not stored.
        allow_missing_keys: skip absent keys.
    """

    backend = RandAddGaussianNoise.backend

    def __init__(
        self,
        keys: KeysCollection,
        sigmas: Sequence[float] = DEFAULT_SIGMAS,
        prob: float = 1.0,
        clip: bool = True,
        clean_keys: KeysCollection | None = None,
        sigma_key: str | None = "noise_sigma",
        allow_missing_keys: bool = False,
    ) -> None:
        _NoiseMapd.__init__(self, keys, clean_keys, sigma_key, allow_missing_keys)
        if not 0.0 <= float(prob) <= 1.0:
            raise ValueError(f"prob must lie in [0, 1], got {prob!r}")
        RandomizableTransform.__init__(self, prob)
        self.rand_noise = RandAddGaussianNoise(sigmas=sigmas, prob=1.0, clip=clip)

    def set_random_state(
        self, seed: int | None = None, state: np.random.RandomState | None = None
    ) -> RandAddGaussianNoised:
        super().set_random_state(seed, state)
        self.rand_noise.set_random_state(seed, state)
        return self

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(None)
        first = self.first_key(d)
        if self._do_transform and first != ():
            self.rand_noise.randomize(d[first])
        sigma_used = self.rand_noise.sigma if self._do_transform and first != () else 0.0
        zero = np.zeros((), dtype=np.float32)
        for key, clean_key in self.key_iterator(d, self.clean_keys):
            d[clean_key] = _add_noise(d[key], zero, clip=False)
            if self._do_transform:
                d[key] = self.rand_noise(d[key], randomize=False)
            else:
                d[key] = _add_noise(d[key], zero, clip=False)
        if self.sigma_key is not None:
            d[self.sigma_key] = sigma_used
        return d
