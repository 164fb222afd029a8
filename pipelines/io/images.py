"""Loading 2D images (PNG/JPG/BMP/TIFF, any mode or bit depth) as one-channel float arrays, with clear errors."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform


class ImageLoadError(ValueError):
    """An image that cannot be used; the message names the file and the reason."""


def load_grey_2d(path: str | os.PathLike) -> np.ndarray:
    """Read a 2D image file as a float32 grey array in its native value range.

    RGB(A) images are converted to luminance (ITU-R 601-2, alpha dropped, i.e. what PIL's ``convert("L")``
    computes, but without 8-bit rounding for 16-bit data); 16-bit and float TIFF/PNG keep their range;
    palette images are expanded. The array is indexed ``(x, y)`` (width first), the MONAI ``PILReader``
    convention, so a 2D slice of a RAS volume and a PNG written from it load the same way.

    Raises:
        ImageLoadError: missing file, not an image, a multi-frame image, empty, or NaN/inf values.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ImageLoadError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            if getattr(im, "n_frames", 1) > 1:
                raise ImageLoadError(f"{path}: multi-frame image ({im.n_frames} frames); expected one 2D image")
            im.load()
            mode = im.mode
            if mode in ("RGB", "RGBA", "LA", "P", "CMYK", "YCbCr", "HSV", "PA", "RGBX"):
                if mode == "P":
                    im = im.convert("RGBA")
                    mode = "RGBA"
                arr = np.asarray(im.convert("RGB") if mode not in ("LA",) else im, dtype=np.float32)
                if mode == "LA":
                    arr = arr[..., 0]
                else:
                    arr = arr[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
            else:  # L, I, I;16, F, 1
                arr = np.asarray(im, dtype=np.float32)
    except UnidentifiedImageError as e:
        raise ImageLoadError(f"{path}: not a readable image ({e})") from e
    except OSError as e:  # truncated / corrupt data
        raise ImageLoadError(f"{path}: corrupt or truncated image ({e})") from e
    if arr.ndim != 2:
        raise ImageLoadError(f"{path}: expected a 2D image, got an array of shape {arr.shape}")
    if arr.size == 0 or min(arr.shape) < 2:
        raise ImageLoadError(f"{path}: image is empty or degenerate (shape {arr.shape})")
    if not np.isfinite(arr).all():
        raise ImageLoadError(f"{path}: image holds NaN or infinite values")
    return np.ascontiguousarray(arr.T)


class LoadGrey2D(Transform):
    """Load a 2D image file as a channel-first ``(1, X, Y)`` float32 MetaTensor (see :func:`load_grey_2d`)."""

    def __call__(self, path: str | os.PathLike) -> MetaTensor:
        arr = load_grey_2d(path)
        return MetaTensor(torch.from_numpy(arr)[None], meta={"filename_or_obj": str(path), "spatial_shape": arr.shape})


class LoadGrey2Dd(MapTransform):
    """Dictionary version of :class:`LoadGrey2D`."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadGrey2D()

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.loader(d[key])
        return d
