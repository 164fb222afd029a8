"""PET intensity transforms: body-weight SUV scaling and SUV ratio (SUVR) to a reference region.

Tensor operations only; the SUV factor itself comes from the DICOM header (``pipelines.io.suv``), computed once
per series and carried in the sample dict (``suv_factor``).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends, convert_to_dst_type, convert_to_tensor
from scipy import ndimage

__all__ = ["SUVR", "SUVRd", "SUVScale", "SUVScaled", "otsu_threshold"]


def _as_factor(value, what: str) -> float:
    """A finite float > 0 from a number, 0-d/1-element array or tensor, or an object with ``.factor``."""
    value = getattr(value, "factor", value)
    if isinstance(value, torch.Tensor | np.ndarray):
        count = value.size if isinstance(value, np.ndarray) else value.numel()
        if count != 1:
            raise ValueError(f"{what} must be a single number, got shape {tuple(value.shape)}")
        value = value.reshape(-1)[0].item()
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{what} must be finite and > 0, got {number}")
    return number


def _float_tensor(img: NdarrayOrTensor) -> torch.Tensor:
    t = convert_to_tensor(img, track_meta=isinstance(img, MetaTensor))
    return t if torch.is_floating_point(t) else t.float()


class SUVScale(Transform):
    """Multiply rescaled PET values by the body-weight SUV factor of their series.

    ``SUV = (stored * RescaleSlope + RescaleIntercept) * factor``: the input is the rescaled volume (Bq/ml for
    DICOM ``Units`` BQML, per-instance slopes already applied by the loader), the factor is
    ``pipelines.io.suv.SUVFactor.factor`` (g/Bq for BQML, typically 1e-4 .. 1e-3). Output: SUVbw in g/ml
    (typically 0 .. 20 in brain amyloid PET), float.

    Args:
        factor: default factor (> 0, finite); may be None when every call passes one.

    Raises:
        ValueError: ``factor`` not finite or <= 0 (in ``__init__`` or per call), or no factor at all.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, factor: float | None = None) -> None:
        self.factor = None if factor is None else _as_factor(factor, "SUVScale factor")

    def __call__(self, img: NdarrayOrTensor, factor: float | None = None) -> NdarrayOrTensor:
        """Scale ``img`` by ``factor`` (overrides the constructor's) and return the same array type."""
        if factor is None and self.factor is None:
            raise ValueError("SUVScale: no SUV factor given (neither in the constructor nor in the call)")
        value = self.factor if factor is None else _as_factor(factor, "SUVScale factor")
        out = _float_tensor(img) * value
        return convert_to_dst_type(out, img, dtype=out.dtype)[0]


class SUVScaled(MapTransform):
    """Dictionary twin of :class:`SUVScale`: the factor is read from ``data[factor_key]`` of each sample.

    The manifest carries one factor per series (``pipelines.io.suv.series_suv_factor(...).factor``), so slices
    or volumes of the same series are scaled identically.

    Args:
        keys: image keys to scale.
        factor_key: key holding the factor (number, 0-d array/tensor, or an object with ``.factor``).
        allow_missing_keys: skip missing image keys instead of raising.

    Raises:
        ValueError: the factor is missing, NaN, infinite or <= 0 (the message names the key and ``subject_id``).
    """

    backend = SUVScale.backend

    def __init__(self, keys: KeysCollection, factor_key: str = "suv_factor", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if not factor_key:
            raise ValueError("SUVScaled: factor_key must be a non-empty key")
        self.factor_key = factor_key
        self.scaler = SUVScale()

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        subject = d.get("subject_id", "<unknown subject>")
        if self.factor_key not in d or d[self.factor_key] is None:
            raise ValueError(f"SUVScaled: sample {subject} has no SUV factor under key {self.factor_key!r}")
        factor = _as_factor(d[self.factor_key], f"SUVScaled: {self.factor_key!r} of sample {subject}")
        for key in self.key_iterator(d):
            d[key] = self.scaler(d[key], factor=factor)
        return d


def otsu_threshold(values: NdarrayOrTensor, nbins: int = 256) -> float:
    """Otsu's threshold (max between-class variance) over the finite values; same algorithm as scikit-image.

    Args:
        values: any shape; non-finite values are ignored.
        nbins: histogram bins (>= 2).

    Returns:
        The threshold (a histogram bin centre); the single value when all values are equal.

    Raises:
        ValueError: no finite values, or ``nbins`` < 2.
    """
    if nbins < 2:
        raise ValueError(f"otsu_threshold: nbins must be >= 2, got {nbins}")
    flat = np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64)
    flat = flat[np.isfinite(flat)]
    if flat.size == 0:
        raise ValueError("otsu_threshold: no finite values")
    low, high = float(flat.min()), float(flat.max())
    if low == high:
        return low
    hist, edges = np.histogram(flat, bins=nbins, range=(low, high))
    centres = (edges[:-1] + edges[1:]) / 2
    hist = hist.astype(np.float64)
    weight1 = np.cumsum(hist)
    weight2 = np.cumsum(hist[::-1])[::-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        mean1 = np.cumsum(hist * centres) / weight1
        mean2 = (np.cumsum((hist * centres)[::-1]) / weight2[::-1])[::-1]
    variance12 = weight1[:-1] * weight2[1:] * (mean1[:-1] - mean2[1:]) ** 2
    return float(centres[np.nanargmax(variance12)])


class SUVR(Transform):
    """Standardised uptake value ratio: divide each channel by its mean inside a reference region.

    Two reference modes:

    * ``"mask"``: the reference region is given per call (``ref_mask``; voxels with value > 0.5), e.g. a
      cerebellar grey-matter or whole-cerebellum mask in the image's space.
    * ``"fallback"`` (atlas-free, approximate): a brain mask is made by Otsu thresholding each channel, keeping
      its largest connected component; the reference region is the part of that mask in the inferior
      ``inferior_fraction`` of its head-foot extent, which in a brain PET field of view is mostly cerebellum and
      pons (plus some skull base / inferior temporal tissue). Assumes channel-first ``(C, X, Y, Z)`` in RAS
      orientation (e.g. after ``Orientationd(axcodes="RAS")``), i.e. spatial axis 2 runs inferior -> superior;
      for a MetaTensor this is checked against its affine. It is a documented approximation, not a cerebellar
      segmentation: use a mask where one exists.

    Output is unitless (SUVR; the reference region mean becomes 1.0), float.

    Args:
        reference: ``"mask"`` or ``"fallback"``.
        inferior_fraction: fallback slab height as a fraction of the brain mask's head-foot extent, in (0, 1].
        nbins: Otsu histogram bins (>= 2).
        check_orientation: in fallback mode, raise when a MetaTensor's axis 2 does not point superior.

    Raises:
        ValueError: bad arguments (in ``__init__``); per call: missing/extra mask, empty reference region,
            non-finite or non-positive reference mean, wrong dimensionality or orientation.
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        reference: str = "mask",
        inferior_fraction: float = 0.2,
        nbins: int = 256,
        check_orientation: bool = True,
    ) -> None:
        if reference not in ("mask", "fallback"):
            raise ValueError(f"SUVR: reference must be 'mask' or 'fallback', got {reference!r}")
        if not 0.0 < float(inferior_fraction) <= 1.0:
            raise ValueError(f"SUVR: inferior_fraction must be in (0, 1], got {inferior_fraction}")
        if int(nbins) < 2:
            raise ValueError(f"SUVR: nbins must be >= 2, got {nbins}")
        self.reference = reference
        self.inferior_fraction = float(inferior_fraction)
        self.nbins = int(nbins)
        self.check_orientation = check_orientation

    def fallback_mask(self, img: NdarrayOrTensor) -> torch.Tensor:
        """Atlas-free reference mask, bool ``(C, X, Y, Z)``: inferior slab of the Otsu brain mask per channel."""
        if img.ndim != 4:
            raise ValueError(f"SUVR fallback needs a channel-first 3D image (C, X, Y, Z), got shape {tuple(img.shape)}")
        if self.check_orientation and isinstance(img, MetaTensor):
            axis2 = convert_to_tensor(img.affine, track_meta=False).detach().cpu().numpy()[:3, 2]
            if int(np.argmax(np.abs(axis2))) != 2 or axis2[2] <= 0:
                raise ValueError(
                    "SUVR fallback assumes RAS orientation (spatial axis 2 = inferior->superior); the image's "
                    f"affine axis 2 is {axis2.tolist()}: apply Orientationd(axcodes='RAS') first"
                )
        array = np.asarray(img.detach().cpu() if isinstance(img, torch.Tensor) else img, dtype=np.float64)
        masks = np.zeros(array.shape, dtype=bool)
        for c, channel in enumerate(array):
            threshold = otsu_threshold(channel, self.nbins)
            brain = channel > threshold
            labels, count = ndimage.label(brain)
            if count == 0:
                raise ValueError(f"SUVR fallback: channel {c} has no voxel above the Otsu threshold {threshold:g}")
            sizes = ndimage.sum_labels(brain, labels, index=np.arange(1, count + 1))
            brain = labels == (int(np.argmax(sizes)) + 1)
            slices = np.flatnonzero(brain.any(axis=(0, 1)))
            extent = int(slices[-1] - slices[0] + 1)
            height = max(1, int(round(self.inferior_fraction * extent)))
            brain[:, :, slices[0] + height :] = False
            masks[c] = brain
        return torch.as_tensor(masks)

    def reference_values(self, img: NdarrayOrTensor, ref_mask: NdarrayOrTensor | None = None) -> torch.Tensor:
        """Mean of each channel inside the reference region, float64 tensor ``(C,)``, all finite and > 0."""
        if self.reference == "mask":
            if ref_mask is None:
                raise ValueError("SUVR(reference='mask') needs a ref_mask")
            mask = convert_to_tensor(ref_mask, track_meta=False)
            mask = (mask.float() if not torch.is_floating_point(mask) else mask) > 0.5
        else:
            if ref_mask is not None:
                raise ValueError("SUVR(reference='fallback') takes no ref_mask; use reference='mask'")
            mask = self.fallback_mask(img)
        values = convert_to_tensor(img, track_meta=False).to(torch.float64)
        try:
            mask = torch.broadcast_to(mask.to(values.device), values.shape)
        except RuntimeError:
            raise ValueError(
                f"SUVR: reference mask shape {tuple(mask.shape)} does not broadcast to image shape "
                f"{tuple(values.shape)}"
            ) from None
        counts = mask.reshape(mask.shape[0], -1).sum(dim=1)
        if bool((counts == 0).any()):
            raise ValueError(f"SUVR: reference region is empty (voxels per channel: {counts.tolist()})")
        sums = torch.where(mask, values, torch.zeros_like(values)).reshape(values.shape[0], -1).sum(dim=1)
        means = sums / counts
        if not bool(torch.isfinite(means).all()) or bool((means <= 0).any()):
            raise ValueError(f"SUVR: reference region mean must be finite and > 0, got {means.tolist()}")
        return means

    def __call__(self, img: NdarrayOrTensor, ref_mask: NdarrayOrTensor | None = None) -> NdarrayOrTensor:
        """Divide ``img`` (channel-first) by its per-channel reference mean; same array type out."""
        return self.divide(img, self.reference_values(img, ref_mask))

    @staticmethod
    def divide(img: NdarrayOrTensor, means: torch.Tensor) -> NdarrayOrTensor:
        """``img / means`` per channel (``means`` shape ``(C,)``), same array type out, float."""
        out = _float_tensor(img)
        out = out / means.to(device=out.device, dtype=out.dtype).reshape((-1,) + (1,) * (out.ndim - 1))
        return convert_to_dst_type(out, img, dtype=out.dtype)[0]


class SUVRd(MapTransform):
    """Dictionary twin of :class:`SUVR`.

    Args:
        keys: image keys to convert to SUVR.
        ref_mask_key: key of the reference-region mask; None selects the atlas-free fallback.
        reference: ``"mask"``/``"fallback"``; None derives it from ``ref_mask_key``.
        inferior_fraction: see :class:`SUVR`.
        nbins: see :class:`SUVR`.
        check_orientation: see :class:`SUVR`.
        ref_value_postfix: when set, the per-channel reference means (float64 tensor ``(C,)``, in the input's
            units, e.g. SUV or Bq/ml) are stored under ``f"{key}_{ref_value_postfix}"`` for auditing.
        allow_missing_keys: skip missing image keys instead of raising.

    Raises:
        ValueError: inconsistent ``reference``/``ref_mask_key``; per call, a missing mask key or any
            :class:`SUVR` error.
    """

    backend = SUVR.backend

    def __init__(
        self,
        keys: KeysCollection,
        ref_mask_key: str | None = None,
        reference: str | None = None,
        inferior_fraction: float = 0.2,
        nbins: int = 256,
        check_orientation: bool = True,
        ref_value_postfix: str | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        reference = reference or ("mask" if ref_mask_key else "fallback")
        if reference == "mask" and not ref_mask_key:
            raise ValueError("SUVRd(reference='mask') needs ref_mask_key")
        if reference == "fallback" and ref_mask_key:
            raise ValueError("SUVRd(reference='fallback') takes no ref_mask_key")
        self.ref_mask_key = ref_mask_key
        self.ref_value_postfix = ref_value_postfix
        self.suvr = SUVR(reference, inferior_fraction, nbins, check_orientation)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        mask = None
        if self.ref_mask_key is not None:
            if self.ref_mask_key not in d:
                subject = d.get("subject_id", "<unknown subject>")
                raise ValueError(f"SUVRd: sample {subject} has no reference mask under key {self.ref_mask_key!r}")
            mask = d[self.ref_mask_key]
        for key in self.key_iterator(d):
            means = self.suvr.reference_values(d[key], mask)
            d[key] = self.suvr.divide(d[key], means)
            if self.ref_value_postfix:
                d[f"{key}_{self.ref_value_postfix}"] = means
        return d
