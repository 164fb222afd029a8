"""Head-CT slice loading: a DICOM slice in Hounsfield units or an already windowed picture as ``(1, X, Y)`` float32.

:class:`LoadCTImage` returns HU for the multi-window models and the 8-bit grey value in [0, 255] for
``window_preset="prewindowed"`` (a DICOM slice is then rendered with one CT window, :func:`hu_to_8bit`). It follows
the ``(x, y)`` (width first) layout of :func:`pipelines.io.images.load_grey_2d`, so a DICOM slice, a slice of a
loaded series and a PNG of the same picture give the same array.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform

from pipelines.io.dicom import is_dicom_file, read_dicom_slice
from pipelines.io.images import ImageLoadError, load_grey_2d
from transforms.ct import PREWINDOWED, WindowCT, resolve_window

__all__ = [
    "WINDOW_PRESETS",
    "CTInputError",
    "LoadCTImage",
    "LoadCTImaged",
    "hu_to_8bit",
    "load_prewindowed_2d",
    "window_channels",
]

#: Input channel sets of the bundle (``window_preset`` config id) -> windows for ``transforms.ct.MultiWindowCT``.
WINDOW_PRESETS: dict[str, tuple[str, ...]] = {
    "multi": ("brain", "subdural", "bone"),
    "prewindowed": ("prewindowed", "prewindowed", "prewindowed"),
}
_EIGHT_BIT_MODES = ("1", "L", "P", "RGB", "RGBA", "LA", "PA", "CMYK", "YCbCr", "RGBX", "HSV")
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA")


class CTInputError(ValueError):
    """A CT input that cannot be used by this model; the message names the file and the problem."""


def window_channels(window_preset: str) -> tuple[str, ...]:
    """The three window names of a ``window_preset`` (``"multi"`` or ``"prewindowed"``).

    Raises:
        ValueError: unknown preset.
    """
    if window_preset not in WINDOW_PRESETS:
        raise ValueError(f"unknown window_preset {window_preset!r}; choose one of {sorted(WINDOW_PRESETS)}")
    return WINDOW_PRESETS[window_preset]


def hu_to_8bit(hu: np.ndarray, window: str | Sequence[float] = "brain") -> np.ndarray:
    """Render HU as an 8-bit display value in [0, 255] (float32, rounded) with one CT window.

    This is how a DICOM image is turned into the kind of picture the pre-windowed PNG set holds (whose window
    is not documented; brain 40/80 is the usual one).

    Args:
        hu: values in HU, any shape.
        window: a preset name of ``transforms.ct.CT_WINDOW_PRESETS`` or a ``(level, width)`` pair in HU.
    """
    level, width = resolve_window(window)
    return np.rint(WindowCT(level, width)(np.asarray(hu, dtype=np.float32)) * 255.0).astype(np.float32)


def _pil_info(path: Path) -> tuple[str, bool]:
    """(PIL mode, has transparency) from the header only."""
    from PIL import Image

    with Image.open(path) as im:
        return im.mode, im.mode in _ALPHA_MODES or (im.mode == "P" and "transparency" in im.info)


def load_prewindowed_2d(path: str | os.PathLike) -> np.ndarray:
    """Read an already windowed picture (PNG/JPG/BMP/TIFF) as an ``(x, y)`` float32 grey array in [0, 255].

    Grey, RGB (luminance), palette, 16-bit and float images are accepted: 16-bit values are scaled by 255/65535,
    float images must lie in [0, 1] (scaled by 255) or [0, 255]. Transparent pixels (RGBA, LA, palette with
    transparency) are composited over black, i.e. read as air, instead of showing whatever colour they hide.

    Raises:
        ImageLoadError: missing file, not an image, multi-frame, empty, NaN/inf (from ``load_grey_2d``), or values
            outside the range of their mode (e.g. a 32-bit integer image above 65535).
    """
    path = Path(path)
    arr = load_grey_2d(path)
    mode, has_alpha = _pil_info(path)
    if mode in _SIXTEEN_BIT_MODES or (mode == "I" and arr.max() > 255):
        if arr.min() < 0 or arr.max() > 65535:
            raise ImageLoadError(f"{path}: integer image values {arr.min():.0f}..{arr.max():.0f} do not fit 16 bits")
        arr = arr * np.float32(255.0 / 65535.0)
    elif mode == "F":
        lo, hi = float(arr.min()), float(arr.max())
        if lo >= 0 and hi <= 1:
            arr = arr * np.float32(255.0)
        elif lo < 0 or hi > 255:
            raise ImageLoadError(f"{path}: float image values {lo:g}..{hi:g} are neither in [0, 1] nor in [0, 255]")
    elif mode not in _EIGHT_BIT_MODES and mode != "I":
        raise ImageLoadError(f"{path}: unsupported image mode {mode!r} for a pre-windowed picture")
    if has_alpha:
        from PIL import Image

        with Image.open(path) as im:
            alpha = np.asarray(im.convert("RGBA").getchannel("A"), dtype=np.float32).T / 255.0
        arr = arr * alpha
    return np.ascontiguousarray(arr, dtype=np.float32)


def _read_dicom_hu(path: Path) -> np.ndarray:
    """One single-frame CT DICOM file as ``(x, y)`` float32 HU."""
    arr, ds = read_dicom_slice(path)
    modality = str(ds.get("Modality", "") or "")
    if modality and modality != "CT":
        raise CTInputError(f"{path}: Modality is {modality!r}, not CT; this model reads Hounsfield units")
    if arr.ndim != 2:
        raise CTInputError(f"{path}: expected one grey 2D slice, got pixel array shape {arr.shape} "
                           "(multi-frame or colour DICOM)")
    return np.ascontiguousarray(arr.T)


class LoadCTImage(Transform):
    """Load one CT slice from a DICOM file or an image file as a ``(1, X, Y)`` float32 MetaTensor.

    * ``prewindowed=False`` (HU models): a DICOM file gives HU (RescaleSlope/Intercept applied); an image file
      is refused with :class:`CTInputError` because a picture holds no HU.
    * ``prewindowed=True`` (models trained on pre-windowed pictures): an image gives its grey value in [0, 255]
      (:func:`load_prewindowed_2d`); a DICOM file is rendered with ``dicom_window`` to [0, 255]
      (:func:`hu_to_8bit`), an approximation since the picture set's own window is unknown.

    Args:
        prewindowed: see above.
        dicom_window: CT window used to render DICOM input for a pre-windowed model.

    Raises:
        ValueError: unknown ``dicom_window``.
    """

    def __init__(self, prewindowed: bool = False, dicom_window: str | Sequence[float] = "brain") -> None:
        if resolve_window(dicom_window) == PREWINDOWED:
            raise ValueError("dicom_window must be an HU window, not 'prewindowed'")
        self.prewindowed = bool(prewindowed)
        self.dicom_window = dicom_window

    def __call__(self, path: str | os.PathLike) -> MetaTensor:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"CT input not found: {path}")
        if is_dicom_file(path):
            arr = _read_dicom_hu(path)
            if self.prewindowed:
                arr = hu_to_8bit(arr, self.dicom_window)
        elif self.prewindowed:
            arr = load_prewindowed_2d(path)
        else:
            raise CTInputError(
                f"{path}: not a DICOM file; this model was trained on Hounsfield units (window_preset 'multi') and "
                "a picture holds no HU. Give a CT DICOM file or series, or use a model trained with "
                "window_preset 'prewindowed'"
            )
        return MetaTensor(torch.from_numpy(arr)[None], meta={"filename_or_obj": str(path), "spatial_shape": arr.shape})


class LoadCTImaged(MapTransform):
    """Dictionary twin of :class:`LoadCTImage`.

    Args:
        keys: keys holding file paths.
        window_preset: ``"multi"`` (HU) or ``"prewindowed"``.
        dicom_window: see :class:`LoadCTImage`.
        allow_missing_keys: do not raise when a key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection,
        window_preset: str = "multi",
        dicom_window: str | Sequence[float] = "brain",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        window_channels(window_preset)
        self.loader = LoadCTImage(prewindowed=window_preset == "prewindowed", dicom_window=dicom_window)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.loader(d[key])
        return d
