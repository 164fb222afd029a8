"""CT intensity transforms: rescale to Hounsfield units, windowing, multi-window channels, 2.5D slice context.

All transforms are tensor operations (no file I/O). They accept channel-first ``numpy.ndarray``,
``torch.Tensor`` or ``monai.data.MetaTensor`` inputs and return the same kind of object; a MetaTensor keeps
its ``meta`` unchanged (the affine is not touched: none of these transforms moves voxels in space).

Typical head-CT chain (HU volume from a DICOM series, then three classic windows as channels)::

    Compose([
        LoadImaged("image", image_only=True, ensure_channel_first=True),  # ITK/Pydicom readers already give HU
        MultiWindowCTd("image", windows=("brain", "subdural", "bone")),
    ])

MONAI's ITKReader and PydicomReader apply RescaleSlope/Intercept themselves, so :class:`ToHU` is for stored
values read another way (e.g. ``pydicom`` ``pixel_array`` put into the sample dict together with
``rescale_slope``/``rescale_intercept`` entries: ``ToHUd("image", slope_key="rescale_slope",
intercept_key="rescale_intercept")``).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Union

import numpy as np
import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.transforms.transform import MapTransform, Transform
from monai.transforms.utils_pytorch_numpy_unification import clip as _clip
from monai.transforms.utils_pytorch_numpy_unification import concatenate
from monai.utils import TransformBackends
from monai.utils.type_conversion import convert_data_type

__all__ = [
    "CT_WINDOW_PRESETS",
    "PREWINDOWED",
    "AdjacentSliceContext",
    "AdjacentSliceContextD",
    "AdjacentSliceContextDict",
    "AdjacentSliceContextd",
    "MultiWindowCT",
    "MultiWindowCTD",
    "MultiWindowCTDict",
    "MultiWindowCTd",
    "ToHU",
    "ToHUD",
    "ToHUDict",
    "ToHUd",
    "WindowCT",
    "WindowCTD",
    "WindowCTDict",
    "WindowCTd",
    "resolve_window",
    "slice_with_context",
]

#: Named CT windows as ``(level, width)`` in HU. A window maps ``[level - width/2, level + width/2]`` to [0, 1].
CT_WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0),
    "subdural": (80.0, 200.0),
    "bone": (600.0, 2800.0),
    "stroke": (40.0, 40.0),
    "soft_tissue": (40.0, 400.0),
}

#: Special window name: the input is already an 8-bit windowed image (e.g. the pre-windowed PNG head-CT set).
PREWINDOWED = "prewindowed"

WindowSpec = Union[str, Sequence[float]]


def _finite(value: Any, name: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a number, got {value!r}") from err
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return out


def _check_window(level: Any, width: Any, what: str = "window") -> tuple[float, float]:
    level_f = _finite(level, f"{what} level")
    width_f = _finite(width, f"{what} width")
    if width_f <= 0:
        raise ValueError(f"{what} width must be > 0 HU, got {width_f}")
    return level_f, width_f


def resolve_window(window: WindowSpec) -> tuple[float, float] | str:
    """Turns a window name or a ``(level, width)`` pair into ``(level, width)`` in HU.

    Args:
        window: a key of ``CT_WINDOW_PRESETS``, the special name ``"prewindowed"`` (returned as is), or a
            ``(level, width)`` pair of numbers in HU with width > 0.

    Returns:
        ``(level, width)`` as floats, or the string ``"prewindowed"``.

    Raises:
        ValueError: unknown name (the message lists the presets) or a malformed/invalid pair.
    """
    if isinstance(window, str):
        if window == PREWINDOWED:
            return PREWINDOWED
        if window not in CT_WINDOW_PRESETS:
            names = ", ".join([*CT_WINDOW_PRESETS, PREWINDOWED])
            raise ValueError(f"unknown CT window preset {window!r}; known presets: {names} (or a (level, width) pair)")
        return CT_WINDOW_PRESETS[window]
    if isinstance(window, (Sequence, np.ndarray, torch.Tensor)) and len(window) == 2:
        return _check_window(window[0], window[1], what=f"window {tuple(window)!r}")
    raise ValueError(f"a CT window must be a preset name or a (level, width) pair in HU, got {window!r}")


def _float_dtype(dtype: Any) -> Any:
    return np.float32 if dtype is None else dtype


class ToHU(Transform):
    """Rescales stored CT values to Hounsfield units: ``HU = raw * slope + intercept``.

    ``slope``/``intercept`` are the DICOM RescaleSlope (0028,1053) and RescaleIntercept (0028,1052). With
    slope 1 and intercept 0 the data is taken to be in HU already and the values pass through unchanged
    (only cast to ``dtype``; with ``dtype=None`` the input object itself is returned).

    Args:
        slope: RescaleSlope, finite and non-zero (HU per stored unit).
        intercept: RescaleIntercept in HU, finite.
        dtype: output dtype (default float32); ``None`` keeps the input dtype on the pass-through path and
            uses float32 otherwise.

    Raises:
        ValueError: non-finite or zero slope, non-finite intercept.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, slope: float = 1.0, intercept: float = 0.0, dtype: Any = np.float32) -> None:
        self.slope = self._check_slope(slope)
        self.intercept = _finite(intercept, "rescale intercept")
        self.dtype = dtype

    @staticmethod
    def _check_slope(slope: Any) -> float:
        out = _finite(slope, "rescale slope")
        if out == 0:
            raise ValueError("rescale slope must be non-zero")
        return out

    def __call__(
        self, img: NdarrayOrTensor, slope: float | None = None, intercept: float | None = None
    ) -> NdarrayOrTensor:
        """Applies the rescale.

        Args:
            img: stored values (any shape, integer or float).
            slope: per-call RescaleSlope overriding the constructor value.
            intercept: per-call RescaleIntercept (HU) overriding the constructor value.

        Returns:
            HU values, same shape and container type as ``img``.
        """
        m = self.slope if slope is None else self._check_slope(slope)
        b = self.intercept if intercept is None else _finite(intercept, "rescale intercept")
        if m == 1.0 and b == 0.0:
            if self.dtype is None:
                return img
            out, *_ = convert_data_type(img, dtype=self.dtype)
            return out
        out, *_ = convert_data_type(img, dtype=_float_dtype(self.dtype))
        return out * m + b


def _scalar_from(value: Any, key: Hashable) -> float:
    """Reads one number from a dict entry: float, str (DICOM DS), 0-d/1-element array or tensor, list of one."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, bytes):
        value = value.decode()
    try:
        arr = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as err:
        raise ValueError(f"entry {key!r} must hold a number, got {value!r}") from err
    if arr.size == 0 or not np.all(arr == arr[0]):
        raise ValueError(f"entry {key!r} must hold a single number, got {value!r}")
    return float(arr[0])


class ToHUd(MapTransform):
    """Dictionary twin of :class:`ToHU`, optionally reading slope/intercept per sample.

    When ``slope_key``/``intercept_key`` are given, the value is looked up in the sample dict first and then in
    the image's ``meta`` (MetaTensor); it may be a number, a DICOM DS string, or a one-element array/tensor.
    Without a key, the constructor default is used.

    Args:
        keys: keys of the images to rescale.
        slope_key: dict (or meta) key holding the RescaleSlope, e.g. ``"rescale_slope"``.
        intercept_key: dict (or meta) key holding the RescaleIntercept in HU, e.g. ``"rescale_intercept"``.
        slope: default RescaleSlope when ``slope_key`` is None.
        intercept: default RescaleIntercept (HU) when ``intercept_key`` is None.
        dtype: output dtype, see :class:`ToHU`.
        allow_missing_keys: do not raise when an image key is missing.

    Raises:
        ValueError: invalid defaults; at call time, a slope/intercept key that is missing or not a number.
    """

    backend = ToHU.backend

    def __init__(
        self,
        keys: KeysCollection,
        slope_key: Hashable | None = None,
        intercept_key: Hashable | None = None,
        slope: float = 1.0,
        intercept: float = 0.0,
        dtype: Any = np.float32,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.slope_key = slope_key
        self.intercept_key = intercept_key
        self.converter = ToHU(slope=slope, intercept=intercept, dtype=dtype)

    @staticmethod
    def _lookup(d: Mapping, img: Any, key: Hashable, image_key: Hashable) -> float:
        if key in d:
            return _scalar_from(d[key], key)
        meta = getattr(img, "meta", None)
        if isinstance(meta, Mapping) and key in meta:
            return _scalar_from(meta[key], key)
        raise ValueError(f"rescale key {key!r} for image {image_key!r} is neither in the sample dict nor in its meta")

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            slope = None if self.slope_key is None else self._lookup(d, img, self.slope_key, key)
            intercept = None if self.intercept_key is None else self._lookup(d, img, self.intercept_key, key)
            d[key] = self.converter(img, slope=slope, intercept=intercept)
        return d


class WindowCT(Transform):
    """Linear CT window: maps ``[level - width/2, level + width/2]`` HU to [0, 1].

    Example, brain window (level 40, width 80): -1000 HU -> 0.0, 0 HU -> 0.0, 40 HU -> 0.5, 80 HU -> 1.0.

    Args:
        level: window centre in HU.
        width: window width in HU, > 0.
        clip: clip the output to [0, 1] (values outside the window saturate); if False the map stays linear.
        dtype: output floating dtype (default float32).

    Raises:
        ValueError: width <= 0 or non-finite level/width.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, level: float, width: float, clip: bool = True, dtype: Any = np.float32) -> None:
        self.level, self.width = _check_window(level, width)
        self.clip = clip
        self.dtype = _float_dtype(dtype)

    @property
    def lower(self) -> float:
        """Lowest HU of the window (maps to 0)."""
        return self.level - self.width / 2.0

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        """Windows an HU image of any shape; returns values in [0, 1] (when ``clip``), same shape and type."""
        img_f, *_ = convert_data_type(img, dtype=self.dtype)
        out = (img_f - self.lower) / self.width
        if self.clip:
            out = _clip(out, 0.0, 1.0)
        return out


class WindowCTd(MapTransform):
    """Dictionary twin of :class:`WindowCT`.

    Args:
        keys: keys of the HU images to window.
        level: window centre in HU.
        width: window width in HU, > 0.
        clip: clip the output to [0, 1].
        dtype: output floating dtype.
        allow_missing_keys: do not raise when a key is missing.
    """

    backend = WindowCT.backend

    def __init__(
        self,
        keys: KeysCollection,
        level: float,
        width: float,
        clip: bool = True,
        dtype: Any = np.float32,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.window = WindowCT(level=level, width=width, clip=clip, dtype=dtype)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.window(d[key])
        return d


def _prewindowed_gray(img: NdarrayOrTensor, dtype: Any) -> NdarrayOrTensor:
    """(C, ...) 8-bit image -> (1, ...) grey in [0, 255]: C=1 as is, C=3 mean of RGB, C=4 RGBA drops alpha."""
    channels = img.shape[0]
    if channels not in (1, 3, 4):
        raise ValueError(
            f"a prewindowed image must have 1 (grey), 3 (RGB) or 4 (RGBA) channels first, got shape {tuple(img.shape)}"
        )
    img_f, *_ = convert_data_type(img, dtype=dtype)
    if channels == 1:
        return img_f
    return img_f[:3].mean(0, keepdims=True) if isinstance(img_f, np.ndarray) else img_f[:3].mean(0, keepdim=True)


class MultiWindowCT(Transform):
    """Stacks several CT windows of a one-channel HU image as channels, in the given order.

    ``(1, H, W)`` or ``(1, H, W, D)`` HU in -> ``(len(windows), H, W[, D])`` in [0, 1] out. The default
    ("brain", "subdural", "bone") is the usual 3-channel input of haemorrhage classifiers.

    The special name ``"prewindowed"`` serves data that is already an 8-bit windowed picture with no HU left
    (the pre-windowed PNG head-CT dataset): the image is scaled from [0, 255] to [0, 1] and repeated to
    ``len(windows)`` channels, so a network built for three windows can be fed ``windows=("prewindowed",) * 3``.
    Its input may be grey ``(1, ...)``, RGB-stored grey ``(3, ...)`` (channels averaged) or RGBA ``(4, ...)``
    (alpha dropped). It cannot be mixed with HU windows.

    Args:
        windows: preset names from ``CT_WINDOW_PRESETS``, ``(level, width)`` pairs in HU, or all
            ``"prewindowed"``; a single string is taken as a one-window list.
        clip: clip each channel to [0, 1].
        dtype: output floating dtype.

    Raises:
        ValueError: empty list, unknown preset (the message lists the presets), width <= 0, or "prewindowed"
            mixed with HU windows; at call time, a HU input with more than one channel.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        windows: WindowSpec | Sequence[WindowSpec] = ("brain", "subdural", "bone"),
        clip: bool = True,
        dtype: Any = np.float32,
    ) -> None:
        if isinstance(windows, str):
            windows = (windows,)
        resolved = [resolve_window(w) for w in windows]
        if not resolved:
            raise ValueError("MultiWindowCT needs at least one window")
        n_pre = sum(w == PREWINDOWED for w in resolved)
        if 0 < n_pre < len(resolved):
            raise ValueError(f"{PREWINDOWED!r} cannot be mixed with HU windows, got {list(windows)!r}")
        self.prewindowed = n_pre > 0
        self.windows: tuple = tuple(resolved)
        self.clip = clip
        self.dtype = _float_dtype(dtype)
        self._ops = [] if self.prewindowed else [WindowCT(lv, wd, clip=clip, dtype=self.dtype) for lv, wd in resolved]

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        """Returns ``(len(windows), *spatial)`` values in [0, 1]."""
        if img.ndim < 2:
            raise ValueError(
                f"MultiWindowCT expects a channel-first image (C, H, W[, D]), got shape {tuple(img.shape)}"
            )
        if self.prewindowed:
            out = _prewindowed_gray(img, self.dtype) / 255.0
            if self.clip:
                out = _clip(out, 0.0, 1.0)
            reps = (len(self.windows),) + (1,) * (out.ndim - 1)
            return np.tile(out, reps) if isinstance(out, np.ndarray) else out.repeat(*reps)
        if img.shape[0] != 1:
            raise ValueError(
                f"MultiWindowCT expects a one-channel HU image (1, H, W[, D]), got shape {tuple(img.shape)}"
            )
        return concatenate([op(img) for op in self._ops], axis=0)


class MultiWindowCTd(MapTransform):
    """Dictionary twin of :class:`MultiWindowCT`.

    Args:
        keys: keys of the images to window.
        windows: see :class:`MultiWindowCT`.
        clip: clip each channel to [0, 1].
        dtype: output floating dtype.
        allow_missing_keys: do not raise when a key is missing.
    """

    backend = MultiWindowCT.backend

    def __init__(
        self,
        keys: KeysCollection,
        windows: WindowSpec | Sequence[WindowSpec] = ("brain", "subdural", "bone"),
        clip: bool = True,
        dtype: Any = np.float32,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.windower = MultiWindowCT(windows=windows, clip=clip, dtype=dtype)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.windower(d[key])
        return d


def _resolve_slice_axis(ndim: int, axis: int, shape: Sequence[int]) -> int:
    if ndim < 3:
        raise ValueError(f"2.5D context needs a channel-first volume (C, H, W, D), got shape {tuple(shape)}")
    ax = axis + ndim if axis < 0 else axis
    if not 1 <= ax < ndim:
        raise ValueError(
            f"slice axis {axis} must be a spatial axis (1..{ndim - 1} or negative) of shape {tuple(shape)}"
        )
    return ax


def _take(img: NdarrayOrTensor, indices: np.ndarray, axis: int) -> NdarrayOrTensor:
    if isinstance(img, np.ndarray):
        return np.take(img, indices, axis=axis)
    return torch.index_select(img, axis, torch.as_tensor(indices, dtype=torch.long, device=img.device))


def slice_with_context(img: NdarrayOrTensor, index: int, num_adjacent: int = 1, axis: int = -1) -> NdarrayOrTensor:
    """2.5D sample for one slice: slices ``index - k .. index + k`` of a volume stacked as channels.

    Edge slices repeat the border slice (slice -1 reads slice 0). Channel order: for each offset
    ``-k, ..., 0, ..., +k`` (outer loop), all input channels (inner loop); output channel
    ``(o + k) * C + c`` is input channel ``c`` of slice ``index + o``.

    Args:
        img: channel-first volume, e.g. ``(C, H, W, D)``.
        index: slice index along ``axis``; Python-style negatives allowed.
        num_adjacent: k, slices on each side (>= 0).
        axis: the slice axis (a spatial axis, default the last).

    Returns:
        ``(C * (2k + 1), ...)`` with ``axis`` removed, e.g. ``(C * (2k + 1), H, W)``.

    Raises:
        ValueError: bad ``num_adjacent``/``axis`` or ``index`` outside the volume.
    """
    k = _check_num_adjacent(num_adjacent)
    ax = _resolve_slice_axis(img.ndim, axis, img.shape)
    n = int(img.shape[ax])
    if not -n <= index < n:
        raise ValueError(f"slice index {index} outside [0, {n}) along axis {axis} of shape {tuple(img.shape)}")
    index = index % n
    parts = [_take(img, np.array([min(max(index + o, 0), n - 1)]), ax) for o in range(-k, k + 1)]
    stacked = concatenate(parts, axis=0)
    return stacked.squeeze(ax) if isinstance(stacked, torch.Tensor) else np.squeeze(stacked, axis=ax)


def _check_num_adjacent(num_adjacent: Any) -> int:
    if isinstance(num_adjacent, bool) or int(num_adjacent) != num_adjacent or num_adjacent < 0:
        raise ValueError(f"num_adjacent must be an integer >= 0, got {num_adjacent!r}")
    return int(num_adjacent)


class AdjacentSliceContext(Transform):
    """2.5D context: each slice of a volume gets its neighbours' channels.

    ``(C, H, W, D)`` in -> ``(C * (2k + 1), H, W, D)`` out, where for every slice ``z`` the output holds the
    channels of slices ``z - k .. z + k``; slices beyond the volume repeat the border slice. Channel order:
    offsets ``-k .. +k`` outer, input channels inner, i.e. output channel ``(o + k) * C + c`` at slice ``z`` is
    input channel ``c`` at slice ``clamp(z + o, 0, D - 1)``; channels ``k * C .. k * C + C - 1`` are the
    centre slice itself.

    Args:
        num_adjacent: k, number of neighbours on each side (>= 0; 0 returns a copy).
        axis: the slice axis (a spatial axis; default the last, D).

    Raises:
        ValueError: ``num_adjacent`` not an integer >= 0, or ``axis`` not a spatial axis (at call time).
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, num_adjacent: int = 1, axis: int = -1) -> None:
        self.num_adjacent = _check_num_adjacent(num_adjacent)
        if axis == 0:
            raise ValueError("axis 0 is the channel axis; the slice axis must be spatial")
        self.axis = int(axis)

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        """Returns ``(C * (2k + 1), *spatial)`` with the same spatial shape as ``img``."""
        ax = _resolve_slice_axis(img.ndim, self.axis, img.shape)
        n = int(img.shape[ax])
        k = self.num_adjacent
        parts = [_take(img, np.clip(np.arange(n) + o, 0, n - 1), ax) for o in range(-k, k + 1)]
        return concatenate(parts, axis=0)

    def slice_at(self, img: NdarrayOrTensor, index: int) -> NdarrayOrTensor:
        """The 2.5D sample of one slice, ``(C * (2k + 1), H, W)``; see :func:`slice_with_context`."""
        return slice_with_context(img, index, num_adjacent=self.num_adjacent, axis=self.axis)


class AdjacentSliceContextd(MapTransform):
    """Dictionary twin of :class:`AdjacentSliceContext`.

    Args:
        keys: keys of the volumes.
        num_adjacent: k, neighbours on each side.
        axis: the slice axis.
        allow_missing_keys: do not raise when a key is missing.
    """

    backend = AdjacentSliceContext.backend

    def __init__(
        self, keys: KeysCollection, num_adjacent: int = 1, axis: int = -1, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.context = AdjacentSliceContext(num_adjacent=num_adjacent, axis=axis)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.context(d[key])
        return d


ToHUD = ToHUDict = ToHUd
WindowCTD = WindowCTDict = WindowCTd
MultiWindowCTD = MultiWindowCTDict = MultiWindowCTd
AdjacentSliceContextD = AdjacentSliceContextDict = AdjacentSliceContextd
