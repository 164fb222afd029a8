"""Classic 2D image enhancement (inversion, grey opening, CLAHE, smoothing, merges) as MONAI transforms.

Reference chain (:class:`EnhancementPipeline`): grayscale -> invert -> morphological opening -> CLAHE ->
smoothing merged with the image that was smoothed. Every step is optional so a sweep can enumerate the
combinations.

Intensity convention for every transform here: the input is a 2D image ``(C, H, W)`` (numpy array,
torch tensor or MetaTensor) with float intensities in [0, 1]; ``uint8`` input is accepted and divided by
255. Float input outside [0, 1] (beyond a 1e-4 rounding tolerance) raises ValueError — scale first
(``ScaleIntensityd``). The output is float32 in [0, 1], of the input's container type (numpy -> numpy,
tensor -> tensor, MetaTensor keeps its meta).

OpenCV is not a dependency: the filters are the scipy/scikit-image equivalents of the OpenCV calls the
reference used, with OpenCV's border modes and kernel definitions reproduced where cheap (documented on
each class). Results match OpenCV up to float-vs-uint8 rounding, except CLAHE (see :class:`CLAHE`).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends, convert_to_dst_type, convert_to_numpy, ensure_tuple_rep
from scipy import ndimage as ndi

__all__ = [
    "CLAHE",
    "CLAHEd",
    "EnhancementPipeline",
    "EnhancementPipelined",
    "Invert",
    "Invertd",
    "MorphologicalOpening",
    "MorphologicalOpeningd",
    "MultiplyMerge",
    "MultiplyMerged",
    "OverlapMerge",
    "OverlapMerged",
    "Smooth",
    "Smoothd",
    "ToGrayscale",
    "ToGrayscaled",
    "structuring_element",
]

_RANGE_TOL = 1e-4
# ITU-R BT.601 luma, as OpenCV COLOR_RGB2GRAY and PIL "L".
_LUMA_RGB = (0.299, 0.587, 0.114)


# --------------------------------------------------------------------------- helpers
def _name(img: Any) -> str:
    meta = getattr(img, "meta", None)
    if isinstance(meta, Mapping) and meta.get("filename_or_obj"):
        return str(meta["filename_or_obj"])
    return "<in-memory image>"


def _to_unit(img: Any) -> np.ndarray:
    """Validated float32 ``(C, H, W)`` numpy copy in [0, 1]."""
    arr = convert_to_numpy(img)
    if arr.ndim != 3:
        raise ValueError(f"{_name(img)}: expected a 2D image (C, H, W), got shape {tuple(arr.shape)}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / np.float32(255.0)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{_name(img)}: expected float intensities in [0, 1] or uint8, got dtype {arr.dtype}")
    arr = arr.astype(np.float32)
    if arr.size:
        if not np.isfinite(arr).all():
            raise ValueError(f"{_name(img)}: image contains NaN or inf")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < -_RANGE_TOL or hi > 1.0 + _RANGE_TOL:
            raise ValueError(
                f"{_name(img)}: expected intensities in [0, 1] (or uint8), got range [{lo:g}, {hi:g}]; "
                "rescale first (e.g. ScaleIntensityd)"
            )
    return np.clip(arr, 0.0, 1.0)


def _like(out: np.ndarray, img: Any) -> Any:
    """``out`` (float32) in the container type/device of ``img`` (meta kept for MetaTensor)."""
    dtype = torch.float32 if isinstance(img, torch.Tensor) else np.float32
    return convert_to_dst_type(np.ascontiguousarray(out, dtype=np.float32), img, dtype=dtype)[0]


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    vals = (value, value) if np.isscalar(value) else tuple(value)
    if len(vals) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1 for v in vals):
        raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {value!r}")
    return int(vals[0]), int(vals[1])


def structuring_element(shape: str, size: tuple[int, int]) -> np.ndarray:
    """Boolean footprint identical to OpenCV ``getStructuringElement(MORPH_RECT|ELLIPSE|CROSS, (w, h))``.

    Args:
        shape: ``"rect"``, ``"ellipse"`` or ``"cross"``.
        size: ``(rows, cols)`` in pixels.
    """
    rows, cols = size
    if shape == "rect":
        return np.ones((rows, cols), dtype=bool)
    fp = np.zeros((rows, cols), dtype=bool)
    r, c = rows // 2, cols // 2
    if shape == "cross":
        fp[r, :] = True
        fp[:, c] = True
        return fp
    if shape != "ellipse":
        raise ValueError(f"shape must be 'rect', 'ellipse' or 'cross', got {shape!r}")
    inv_r2 = 1.0 / (r * r) if r else 0.0
    for i in range(rows):
        dy = i - r
        if abs(dy) <= r:
            # OpenCV: dx = saturate_cast<int>(c * sqrt((r*r - dy*dy) * inv_r2)), round half to even
            dx = int(np.rint(c * np.sqrt((r * r - dy * dy) * inv_r2)))
            fp[i, max(c - dx, 0) : min(c + dx + 1, cols)] = True
    return fp


# --------------------------------------------------------------------------- array transforms
class ToGrayscale(Transform):
    """``(C, H, W)`` -> ``(1, H, W)`` luminance.

    C = 1 passes through; C = 3 is read as RGB and mapped with ITU-R BT.601 weights
    (0.299 R + 0.587 G + 0.114 B, as OpenCV ``COLOR_RGB2GRAY``); C = 4 (RGBA) drops alpha first.
    Other channel counts raise ValueError. Input/output in [0, 1] (uint8 accepted).
    """

    backend = [TransformBackends.NUMPY]

    def __call__(self, img: Any) -> Any:
        arr = _to_unit(img)
        c = arr.shape[0]
        if c == 1:
            out = arr
        elif c in (3, 4):
            out = np.tensordot(np.asarray(_LUMA_RGB, dtype=np.float32), arr[:3], axes=1)[None]
        else:
            raise ValueError(f"{_name(img)}: cannot convert {c} channels to grayscale (expected 1, 3 or 4)")
        return _like(np.clip(out, 0.0, 1.0), img)


class Invert(Transform):
    """Intensity inversion ``1 - x`` for images in [0, 1] (uint8 accepted, read as x / 255)."""

    backend = [TransformBackends.NUMPY]

    def __call__(self, img: Any) -> Any:
        return _like(1.0 - _to_unit(img), img)


class MorphologicalOpening(Transform):
    """Grey-level opening (erosion then dilation), per channel, removing bright details smaller than the kernel.

    Equivalent to OpenCV ``morphologyEx(img, MORPH_OPEN, getStructuringElement(shape, ksize),
    iterations=n)``: ``n`` erosions followed by ``n`` dilations, footprint identical to OpenCV's (see
    :func:`structuring_element`, anchor at the centre), pixels outside the image ignored (scipy
    ``mode="constant"`` with +inf/-inf padding, like OpenCV's default morphology border).

    Args:
        kernel_size: footprint ``(rows, cols)`` in pixels, or one int for a square.
        shape: ``"rect"``, ``"ellipse"`` or ``"cross"``.
        iterations: number of erosions, then of dilations (>= 1).
    """

    backend = [TransformBackends.NUMPY]

    def __init__(self, kernel_size: int | Sequence[int] = (5, 5), shape: str = "rect", iterations: int = 1) -> None:
        self.kernel_size = _pair(kernel_size, "kernel_size")
        if shape not in ("rect", "ellipse", "cross"):
            raise ValueError(f"shape must be 'rect', 'ellipse' or 'cross', got {shape!r}")
        self.shape = shape
        if isinstance(iterations, bool) or int(iterations) != iterations or iterations < 1:
            raise ValueError(f"iterations must be an int >= 1, got {iterations!r}")
        self.iterations = int(iterations)
        self.footprint = structuring_element(shape, self.kernel_size)

    def __call__(self, img: Any) -> Any:
        arr = _to_unit(img)
        out = np.empty_like(arr)
        for c in range(arr.shape[0]):
            x = arr[c]
            for _ in range(self.iterations):
                x = ndi.grey_erosion(x, footprint=self.footprint, mode="constant", cval=np.inf)
            for _ in range(self.iterations):
                x = ndi.grey_dilation(x, footprint=self.footprint, mode="constant", cval=-np.inf)
            out[c] = x
        return _like(out, img)


class CLAHE(Transform):
    """Contrast Limited Adaptive Histogram Equalisation per channel (``skimage.exposure.equalize_adapthist``).

    Parameters follow OpenCV's ``createCLAHE(clipLimit, tileGridSize)`` by default and are converted:

    * tiles: OpenCV's ``tileGridSize`` counts tiles; skimage's ``kernel_size`` is the tile size in pixels,
      so ``kernel_size = (max(H // rows, 1), max(W // cols, 1))``.
    * clip limit: OpenCV clips each tile histogram at ``clipLimit * tile_pixels / 256`` counts (relative to
      the mean bin count of its 256-bin histogram); skimage clips at ``clip_limit * tile_pixels`` counts.
      With ``nbins=256`` the two coincide for ``clip_skimage = clip_opencv / 256`` (OpenCV 2.0 -> 0.0078).
      ``clip_convention="skimage"`` passes ``clip_limit`` through unchanged instead.

    What is *not* the same as OpenCV (so outputs are close, not identical): skimage min-max stretches each
    channel to its full range before equalising and again after (so a low-contrast image is first
    stretched, whereas OpenCV equalises the raw 8-bit values), pads tiles by reflection and interpolates
    between tile mappings slightly differently. A constant channel is returned unchanged (there is no
    contrast to equalise; skimage would map it to 1.0). For RGB input convert to grayscale first: channels
    are equalised independently here.

    Args:
        clip_limit: clip limit in ``clip_convention`` units (> 0; OpenCV default 2.0 in the reference).
        tile_grid_size: number of tiles ``(rows, cols)`` (or one int).
        clip_convention: ``"opencv"`` (relative to the mean bin count) or ``"skimage"`` (fraction in (0, 1]).
        nbins: histogram bins (OpenCV uses 256 for 8-bit images).
    """

    backend = [TransformBackends.NUMPY]

    def __init__(
        self,
        clip_limit: float = 2.0,
        tile_grid_size: int | Sequence[int] = (8, 8),
        clip_convention: str = "opencv",
        nbins: int = 256,
    ) -> None:
        if clip_convention not in ("opencv", "skimage"):
            raise ValueError(f"clip_convention must be 'opencv' or 'skimage', got {clip_convention!r}")
        if not np.isfinite(clip_limit) or clip_limit <= 0:
            raise ValueError(f"clip_limit must be > 0, got {clip_limit!r}")
        if isinstance(nbins, bool) or int(nbins) != nbins or nbins < 2:
            raise ValueError(f"nbins must be an int >= 2, got {nbins!r}")
        self.nbins = int(nbins)
        self.clip_limit = float(clip_limit)
        self.clip_convention = clip_convention
        self.clip_limit_skimage = self.clip_limit / self.nbins if clip_convention == "opencv" else self.clip_limit
        if self.clip_limit_skimage > 1.0:
            raise ValueError(f"clip_limit {clip_limit} ({clip_convention}) exceeds skimage's maximum of 1")
        self.tile_grid_size = _pair(tile_grid_size, "tile_grid_size")

    def __call__(self, img: Any) -> Any:
        from skimage.exposure import equalize_adapthist

        arr = _to_unit(img)
        h, w = arr.shape[1:]
        kernel = (max(h // self.tile_grid_size[0], 1), max(w // self.tile_grid_size[1], 1))
        out = np.empty_like(arr)
        for c in range(arr.shape[0]):
            if arr[c].min() == arr[c].max():
                out[c] = arr[c]
                continue
            out[c] = equalize_adapthist(
                arr[c], kernel_size=kernel, clip_limit=self.clip_limit_skimage, nbins=self.nbins
            )
        return _like(np.clip(out, 0.0, 1.0), img)


class Smooth(Transform):
    """Per-channel smoothing with OpenCV-equivalent kernels and borders.

    * ``"average"``: ``cv2.blur`` — box mean, border reflect-101 (scipy ``uniform_filter``, ``mode="mirror"``).
    * ``"median"``: ``cv2.medianBlur`` — border replicate (scipy ``median_filter``, ``mode="nearest"``).
    * ``"gaussian"``: ``cv2.GaussianBlur(img, (k, k), 0)`` — sigma ``0.3 * ((k - 1) * 0.5 - 1) + 0.8``
      pixels unless given, kernel radius ``k // 2``, border reflect-101.

    Args:
        method: ``"average"``, ``"median"`` or ``"gaussian"``.
        kernel_size: odd kernel width in pixels (>= 1; 11 in the reference).
        sigma: Gaussian standard deviation in pixels (``None``: OpenCV's default for ``kernel_size``).
    """

    backend = [TransformBackends.NUMPY]
    METHODS = ("average", "median", "gaussian")

    def __init__(self, method: str = "average", kernel_size: int = 11, sigma: float | None = None) -> None:
        if method not in self.METHODS:
            raise ValueError(f"method must be one of {self.METHODS}, got {method!r}")
        if isinstance(kernel_size, bool) or int(kernel_size) != kernel_size or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd int >= 1, got {kernel_size!r}")
        if sigma is not None and (method != "gaussian" or not np.isfinite(sigma) or sigma <= 0):
            raise ValueError(f"sigma must be > 0 and is only used by method='gaussian', got {sigma!r} for {method!r}")
        self.method = method
        self.kernel_size = int(kernel_size)
        self.sigma = float(sigma) if sigma is not None else 0.3 * ((self.kernel_size - 1) * 0.5 - 1) + 0.8

    def __call__(self, img: Any) -> Any:
        arr = _to_unit(img)
        k = self.kernel_size
        out = np.empty_like(arr)
        for c in range(arr.shape[0]):
            if self.method == "average":
                out[c] = ndi.uniform_filter(arr[c], size=k, mode="mirror")
            elif self.method == "median":
                out[c] = ndi.median_filter(arr[c], size=k, mode="nearest")
            else:
                out[c] = ndi.gaussian_filter(arr[c], sigma=self.sigma, mode="mirror", radius=k // 2)
        return _like(np.clip(out, 0.0, 1.0), img)


class OverlapMerge(Transform):
    """``clip(w1 * original + w2 * processed + offset, 0, 1)`` — OpenCV ``addWeighted(original, w1,
    processed, w2, gamma)`` on [0, 1] images, ``offset = gamma / 255``.

    With ``processed`` a smoothed copy of ``original`` and ``w2 = -w1`` (the reference's 4/-4 down to
    1/-1) this is ``w1 * (original - smoothed)``: a high-pass (detail) image amplified ``w1`` times, not an
    unsharp mask (unsharp masking keeps the original: ``w1 = 1 + a, w2 = -a``). With ``offset = 0`` the
    negative half of the detail is clipped to 0; ``offset = 0.5`` (gamma 128, as in Graham's retina
    preprocessing) keeps both signs around mid-grey.

    Args:
        weights: ``(w1, w2)``, weights of the original and of the processed image.
        offset: constant added before clipping, in [0, 1] intensity units.
    """

    backend = [TransformBackends.NUMPY]

    def __init__(self, weights: Sequence[float] = (4.0, -4.0), offset: float = 0.0) -> None:
        if len(weights) != 2 or not all(np.isfinite(float(w)) for w in weights):
            raise ValueError(f"weights must be two finite numbers (w_original, w_processed), got {weights!r}")
        if not np.isfinite(offset):
            raise ValueError(f"offset must be finite, got {offset!r}")
        self.weights = (float(weights[0]), float(weights[1]))
        self.offset = float(offset)

    def __call__(self, img: Any, processed: Any) -> Any:
        a, b = _to_unit(img), _to_unit(processed)
        if a.shape != b.shape:
            raise ValueError(f"{_name(img)}: original {a.shape} and processed {b.shape} shapes differ")
        out = self.weights[0] * a + self.weights[1] * b + self.offset
        return _like(np.clip(out, 0.0, 1.0), img)


class MultiplyMerge(Transform):
    """``clip(original * processed, 0, 1)`` (pixel-wise product, e.g. the image weighted by its smoothed copy)."""

    backend = [TransformBackends.NUMPY]

    def __call__(self, img: Any, processed: Any) -> Any:
        a, b = _to_unit(img), _to_unit(processed)
        if a.shape != b.shape:
            raise ValueError(f"{_name(img)}: original {a.shape} and processed {b.shape} shapes differ")
        return _like(np.clip(a * b, 0.0, 1.0), img)


class EnhancementPipeline(Transform):
    """The reference enhancement chain, each step optional, applied in the reference order:

    grayscale -> invert -> opening -> CLAHE -> smoothing -> merge.

    The merge combines the image *entering* the smoothing step (``merge_with="current"``, the default:
    after invert/opening/CLAHE) or the grayscale input of the pipeline (``merge_with="input"``) with the
    smoothed image. Smoothing without a merge replaces the image by its smoothed version. All defaults off:
    the pipeline is then grayscale conversion only, so a sweep can enumerate
    ``itertools.product`` of the flags; :attr:`tag` names a combination for run names.

    Args:
        invert: apply :class:`Invert`.
        opening: ``True`` for :class:`MorphologicalOpening` defaults (5x5 rect), or an instance.
        clahe: ``True`` for :class:`CLAHE` defaults (OpenCV clip 2.0, 8x8 tiles), or an instance.
        smoothing: ``None``, a method name (``"average"``, ``"median"``, ``"gaussian"``, kernel 11) or a
            :class:`Smooth` instance.
        merge: ``None``, ``"overlap"`` (:class:`OverlapMerge` with ``merge_weights``/``merge_offset``) or
            ``"multiply"`` (:class:`MultiplyMerge`); needs ``smoothing``.
        merge_weights: ``(w_original, w_smoothed)`` for ``"overlap"``.
        grayscale: convert to one channel first (:class:`ToGrayscale`: 3 channels are read as RGB);
            ``False`` processes channels independently — use it for 2.5D stacks from
            ``ExtractSlices(context=1)``, whose 3 channels are neighbouring slices, not colours.
        merge_offset: offset of the overlap merge in [0, 1] units (OpenCV gamma / 255).
        merge_with: ``"current"`` or ``"input"`` (see above).
    """

    backend = [TransformBackends.NUMPY]

    def __init__(
        self,
        invert: bool = False,
        opening: bool | MorphologicalOpening = False,
        clahe: bool | CLAHE = False,
        smoothing: str | Smooth | None = None,
        merge: str | None = None,
        merge_weights: Sequence[float] = (4.0, -4.0),
        grayscale: bool = True,
        merge_offset: float = 0.0,
        merge_with: str = "current",
    ) -> None:
        self.invert = Invert() if invert else None
        self.grayscale = ToGrayscale() if grayscale else None
        self.opening = self._step(opening, MorphologicalOpening, "opening")
        self.clahe = self._step(clahe, CLAHE, "clahe")
        if smoothing is None or isinstance(smoothing, Smooth):
            self.smoothing = smoothing
        elif isinstance(smoothing, str):
            self.smoothing = Smooth(method=smoothing)
        else:
            raise ValueError(f"smoothing must be None, a method name {Smooth.METHODS} or a Smooth, got {smoothing!r}")
        if merge is None:
            self.merge: OverlapMerge | MultiplyMerge | None = None
        elif merge == "overlap":
            self.merge = OverlapMerge(weights=merge_weights, offset=merge_offset)
        elif merge == "multiply":
            self.merge = MultiplyMerge()
        else:
            raise ValueError(f"merge must be None, 'overlap' or 'multiply', got {merge!r}")
        if self.merge is not None and self.smoothing is None:
            raise ValueError(f"merge={merge!r} needs a smoothing step to merge with")
        if merge_with not in ("current", "input"):
            raise ValueError(f"merge_with must be 'current' or 'input', got {merge_with!r}")
        self.merge_with = merge_with

    @staticmethod
    def _step(value: Any, cls: type, name: str) -> Any:
        if isinstance(value, cls):
            return value
        if isinstance(value, bool):
            return cls() if value else None
        raise ValueError(f"{name} must be a bool or a {cls.__name__}, got {value!r}")

    @property
    def tag(self) -> str:
        """Short name of the enabled steps, e.g. ``"inv+open+clahe+median11+overlap4/-4"`` (``"none"`` if none)."""
        parts = []
        if self.invert is not None:
            parts.append("inv")
        if self.opening is not None:
            parts.append("open")
        if self.clahe is not None:
            parts.append("clahe")
        if self.smoothing is not None:
            parts.append(f"{self.smoothing.method}{self.smoothing.kernel_size}")
        if isinstance(self.merge, OverlapMerge):
            w1, w2 = self.merge.weights
            parts.append(f"overlap{w1:g}/{w2:g}")
        elif isinstance(self.merge, MultiplyMerge):
            parts.append("multiply")
        return "+".join(parts) or "none"

    def __call__(self, img: Any) -> Any:
        x = _to_unit(img)
        if self.grayscale is not None:
            x = self.grayscale(x)
        source = x
        for step in (self.invert, self.opening, self.clahe):
            if step is not None:
                x = step(x)
        if self.smoothing is not None:
            smoothed = self.smoothing(x)
            if self.merge is None:
                x = smoothed
            else:
                x = self.merge(x if self.merge_with == "current" else source, smoothed)
        return _like(x, img)


# --------------------------------------------------------------------------- dictionary twins
class _Mapd(MapTransform):
    """Apply one array transform to each key."""

    transform: Callable[[Any], Any]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key])
        return d


class ToGrayscaled(_Mapd):
    """Dictionary twin of :class:`ToGrayscale`."""

    backend = ToGrayscale.backend

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = ToGrayscale()


class Invertd(_Mapd):
    """Dictionary twin of :class:`Invert`."""

    backend = Invert.backend

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = Invert()


class MorphologicalOpeningd(_Mapd):
    """Dictionary twin of :class:`MorphologicalOpening`."""

    backend = MorphologicalOpening.backend

    def __init__(
        self,
        keys: KeysCollection,
        kernel_size: int | Sequence[int] = (5, 5),
        shape: str = "rect",
        iterations: int = 1,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = MorphologicalOpening(kernel_size=kernel_size, shape=shape, iterations=iterations)


class CLAHEd(_Mapd):
    """Dictionary twin of :class:`CLAHE`."""

    backend = CLAHE.backend

    def __init__(
        self,
        keys: KeysCollection,
        clip_limit: float = 2.0,
        tile_grid_size: int | Sequence[int] = (8, 8),
        clip_convention: str = "opencv",
        nbins: int = 256,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = CLAHE(
            clip_limit=clip_limit, tile_grid_size=tile_grid_size, clip_convention=clip_convention, nbins=nbins
        )


class Smoothd(_Mapd):
    """Dictionary twin of :class:`Smooth`."""

    backend = Smooth.backend

    def __init__(
        self,
        keys: KeysCollection,
        method: str = "average",
        kernel_size: int = 11,
        sigma: float | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = Smooth(method=method, kernel_size=kernel_size, sigma=sigma)


class _MergeD(MapTransform):
    """Merge ``d[key]`` with a processed image: ``d[processed_key]`` or ``smoothing(d[key])`` (exactly one)."""

    merger: OverlapMerge | MultiplyMerge

    def __init__(
        self,
        keys: KeysCollection,
        processed_key: Hashable | Sequence[Hashable] | None,
        smoothing: Callable[[Any], Any] | None,
        allow_missing_keys: bool,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if (processed_key is None) == (smoothing is None):
            raise ValueError(
                "give exactly one of processed_key (an existing key) or smoothing (a transform, e.g. Smooth())"
            )
        if smoothing is not None and not callable(smoothing):
            raise ValueError(f"smoothing must be a callable array transform, got {smoothing!r}")
        self.smoothing = smoothing
        self.processed_keys = None if processed_key is None else ensure_tuple_rep(processed_key, len(self.keys))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key, pkey in self.key_iterator(d, self.processed_keys or (None,) * len(self.keys)):
            if pkey is None:
                processed = self.smoothing(d[key])  # type: ignore[misc]
            else:
                if pkey not in d:
                    raise KeyError(f"processed_key {pkey!r} not in data (keys: {list(d)})")
                processed = d[pkey]
            d[key] = self.merger(d[key], processed)
        return d


class OverlapMerged(_MergeD):
    """Dictionary twin of :class:`OverlapMerge`.

    The processed image is read from ``processed_key`` (one key, or one per key in ``keys``) or computed
    as ``smoothing(d[key])``; exactly one of the two must be given. The result replaces ``d[key]``.

    Example: ``OverlapMerged("image", smoothing=Smooth("gaussian", 11), weights=(4, -4))``.
    """

    backend = OverlapMerge.backend

    def __init__(
        self,
        keys: KeysCollection,
        processed_key: Hashable | Sequence[Hashable] | None = None,
        smoothing: Callable[[Any], Any] | None = None,
        weights: Sequence[float] = (4.0, -4.0),
        offset: float = 0.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, processed_key, smoothing, allow_missing_keys)
        self.merger = OverlapMerge(weights=weights, offset=offset)


class MultiplyMerged(_MergeD):
    """Dictionary twin of :class:`MultiplyMerge`; processed image from ``processed_key`` or ``smoothing``
    (exactly one), as in :class:`OverlapMerged`."""

    backend = MultiplyMerge.backend

    def __init__(
        self,
        keys: KeysCollection,
        processed_key: Hashable | Sequence[Hashable] | None = None,
        smoothing: Callable[[Any], Any] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, processed_key, smoothing, allow_missing_keys)
        self.merger = MultiplyMerge()


class EnhancementPipelined(_Mapd):
    """Dictionary twin of :class:`EnhancementPipeline`; ``pipeline_kwargs`` are its arguments."""

    backend = EnhancementPipeline.backend

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False, **pipeline_kwargs: Any) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = EnhancementPipeline(**pipeline_kwargs)

    @property
    def tag(self) -> str:
        return self.transform.tag
