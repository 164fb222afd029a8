"""3D volume -> 2D (or 2.5D) slice extraction for slice-level classifiers.

The input is a channel-first volume ``(C, X, Y, Z)`` as produced by MONAI ``LoadImage`` +
``EnsureChannelFirst``. This module does **no** resampling and **no** reorientation: the anatomical
axis names ("sagittal", "coronal", "axial") only hold if the volume is in RAS orientation, so the
pipeline must run ``Orientationd(keys, axcodes="RAS")`` and (for mm ranges and consistent slice
thickness across subjects) ``Spacingd(keys, pixdim=...)`` before :class:`ExtractSlicesd`, e.g.::

    Compose([
        LoadImaged("image"), EnsureChannelFirstd("image"),
        Orientationd("image", axcodes="RAS"), Spacingd("image", pixdim=(1.0, 1.0, 1.0)),
        ScaleIntensityRangePercentilesd("image", 0.5, 99.5, 0.0, 1.0, clip=True),
        ExtractSlicesd("image", axis="axial", num_slices=16),   # -> list of 2D sample dicts
        Resized("image", spatial_size=(224, 224)),
    ])

Selection, in this order:

1. ``slice_range`` restricts the candidate indices (percent of the axis, mm from the first slice,
   or raw indices, all inclusive).
2. Near-empty slices are dropped: a slice is kept when its foreground fraction (foreground voxels /
   voxels in the slice) is ``>= min_foreground``. Foreground is ``mask > 0`` when a brain mask is
   given, otherwise any channel ``> foreground_threshold``.
3. ``num_slices`` keeps N *contiguous* kept slices (consecutive in the sorted list of kept indices,
   which is index-contiguous unless a near-empty slice sits inside the brain) whose mean index is
   closest to the centre of mass of the foreground along the axis. Contiguous rather than evenly
   spaced: neighbouring slices of the central brain carry the structures of interest (ventricles,
   hippocampi, basal ganglia) at a fixed anatomical level across subjects, whereas evenly spread
   slices would mix in cerebellum and vertex slices whose appearance is dominated by partial volume.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, MultiSampleTrait, Transform
from monai.utils import TransformBackends, convert_to_numpy

__all__ = ["AXIS_NAMES", "ExtractSlices", "ExtractSlicesd"]

AXIS_NAMES: dict[str, int] = {"sagittal": 0, "coronal": 1, "axial": 2}
_RANGE_UNITS = ("percent", "mm", "index")
# Fraction of the (min .. 99th percentile) intensity span used as the default foreground threshold.
_DEFAULT_THRESHOLD_FRACTION = 0.1
_DEFAULT_THRESHOLD_PERCENTILE = 99.0


def _source_name(img: Any) -> str:
    """Human-readable name of the volume for error messages (its file when the meta knows it)."""
    meta = getattr(img, "meta", None)
    if isinstance(meta, Mapping):
        name = meta.get("filename_or_obj")
        if name is not None and str(name) != "":
            return str(name)
    return "<in-memory volume>"


def _parse_axis(axis: int | str) -> int:
    if isinstance(axis, str):
        key = axis.strip().lower()
        if key not in AXIS_NAMES:
            raise ValueError(f"axis must be one of {sorted(AXIS_NAMES)} or an int 0..2, got {axis!r}")
        return AXIS_NAMES[key]
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or not 0 <= int(axis) <= 2:
        raise ValueError(f"axis must be one of {sorted(AXIS_NAMES)} or an int 0..2 (spatial axis), got {axis!r}")
    return int(axis)


class ExtractSlices(Transform):
    """3D volume ``(C, X, Y, Z)`` channel-first (MONAI layout after LoadImage + EnsureChannelFirst
    [+ Orientation RAS]) -> stack of 2D slices.

    Orientation and spacing are not touched here: run ``Orientationd(axcodes="RAS")`` and ``Spacingd``
    first (see the module docstring); the axis names assume RAS.

    Args:
        axis: slicing axis: ``"sagittal"`` (0, X), ``"coronal"`` (1, Y), ``"axial"`` (2, Z) in RAS data,
            or a spatial axis index 0..2 (the channel dimension is not counted).
        num_slices: keep at most this many *contiguous* kept slices centred on the centre of mass of the
            foreground along ``axis``; ``None`` keeps every kept slice. If fewer slices are kept, all of
            them are returned and a ``UserWarning`` is issued.
        slice_range: inclusive ``(low, high)`` restriction applied first, in ``range_unit``.
        range_unit: ``"percent"``: position ``100 * i / (L - 1)`` of slice ``i`` on an axis of length
            ``L`` (0 = first slice, 100 = last), bounds in [0, 100]; ``"mm"``: distance ``i * spacing``
            from the first slice, spacing taken from the MetaTensor affine (norm of the affine column of
            ``axis``; a MetaTensor built without an affine has MONAI's identity default, i.e. 1 mm) —
            plain arrays/tensors raise ValueError; ``"index"``: raw slice indices.
        min_foreground: minimal foreground fraction in [0, 1] for a slice to be kept (0 keeps all).
        foreground_threshold: intensity above which a voxel is foreground (any channel). ``None``: a
            robust per-volume threshold ``vmin + 0.1 * (p99 - vmin)`` (vmin = volume minimum, p99 = 99th
            percentile), which is 10% of the 99th percentile for volumes with a zero background (MRI,
            PET) and still separates air from tissue in CT (background -1024 HU). Ignored when a mask is
            given.
        context: 2.5D context ``k >= 0``: each output sample holds slices ``i-k .. i+k`` (clamped to the
            volume edges), channel order offset-major: ``[offset -k: C channels, ..., offset +k: C
            channels]``, so output channel ``(o + k) * C + c`` is input channel ``c`` of slice ``i + o``.

    Returns (from ``__call__``):
        ``(slices, slice_indices)``: float32 tensor ``(N, C * (2 * context + 1), H, W)`` where ``(H, W)``
        are the two other spatial axes in their original order (axial: ``(X, Y)``), and a long tensor
        ``(N,)`` of increasing slice indices along ``axis``.

    Raises:
        ValueError: the input is not ``(C, X, Y, Z)``, contains NaN/inf, a mm range is asked for a volume
            without spacing, the mask shape does not match, or no slice is left (the message names the
            file from ``meta["filename_or_obj"]`` when present and the reason).
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        axis: int | str = "axial",
        num_slices: int | None = None,
        slice_range: tuple[float, float] | None = None,
        range_unit: str = "percent",
        min_foreground: float = 0.05,
        foreground_threshold: float | None = None,
        context: int = 0,
    ) -> None:
        self.axis = _parse_axis(axis)
        if num_slices is not None and (isinstance(num_slices, bool) or int(num_slices) != num_slices or num_slices < 1):
            raise ValueError(f"num_slices must be a positive int or None, got {num_slices!r}")
        self.num_slices = None if num_slices is None else int(num_slices)
        if range_unit not in _RANGE_UNITS:
            raise ValueError(f"range_unit must be one of {_RANGE_UNITS}, got {range_unit!r}")
        self.range_unit = range_unit
        if slice_range is not None:
            if len(slice_range) != 2:
                raise ValueError(f"slice_range must be (low, high), got {slice_range!r}")
            low, high = float(slice_range[0]), float(slice_range[1])
            if not (np.isfinite(low) and np.isfinite(high)) or low > high:
                raise ValueError(f"slice_range must be finite with low <= high, got {slice_range!r}")
            if range_unit == "percent" and (low < 0.0 or high > 100.0):
                raise ValueError(f"percent slice_range must lie in [0, 100], got {slice_range!r}")
            if range_unit in ("mm", "index") and low < 0.0:
                raise ValueError(
                    f"{range_unit} slice_range is counted from the first slice and must be >= 0, got {slice_range!r}"
                )
            slice_range = (low, high)
        self.slice_range = slice_range
        if not 0.0 <= float(min_foreground) <= 1.0:
            raise ValueError(f"min_foreground must be a fraction in [0, 1], got {min_foreground!r}")
        self.min_foreground = float(min_foreground)
        if foreground_threshold is not None and not np.isfinite(foreground_threshold):
            raise ValueError(f"foreground_threshold must be finite or None, got {foreground_threshold!r}")
        self.foreground_threshold = None if foreground_threshold is None else float(foreground_threshold)
        if isinstance(context, bool) or int(context) != context or context < 0:
            raise ValueError(f"context must be an int >= 0, got {context!r}")
        self.context = int(context)

    # ------------------------------------------------------------------ helpers
    def _validate(self, img: Any) -> torch.Tensor:
        name = _source_name(img)
        shape = tuple(img.shape)
        if len(shape) != 4:
            hint = " (add EnsureChannelFirst for a volume without a channel dim)" if len(shape) == 3 else ""
            raise ValueError(f"{name}: expected a 3D volume (C, X, Y, Z), got shape {shape}{hint}")
        if min(shape) < 1:
            raise ValueError(f"{name}: expected a non-empty 3D volume (C, X, Y, Z), got shape {shape}")
        vol = img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(img)
        vol = vol.to(torch.float32)
        if not bool(torch.isfinite(vol).all()):
            n_nan = int(torch.isnan(vol).sum())
            n_inf = int(torch.isinf(vol).sum())
            raise ValueError(f"{name}: volume contains non-finite values ({n_nan} NaN, {n_inf} inf voxels)")
        return vol

    def _foreground(self, vol: torch.Tensor, mask: Any, name: str) -> np.ndarray:
        """Boolean foreground ``(X, Y, Z)``."""
        if mask is not None:
            m = convert_to_numpy(mask)
            if m.ndim == 3:
                m = m[None]
            if m.ndim != 4 or tuple(m.shape[1:]) != tuple(vol.shape[1:]):
                raise ValueError(
                    f"{name}: mask shape {tuple(m.shape)} does not match the volume's spatial shape "
                    f"{tuple(vol.shape[1:])}"
                )
            if np.isnan(m).any():
                raise ValueError(f"{name}: mask contains NaN")
            return (m > 0).any(axis=0)
        arr = vol.detach().cpu().numpy()
        if self.foreground_threshold is not None:
            thr = self.foreground_threshold
        else:
            vmin = float(arr.min())
            p99 = float(np.percentile(arr, _DEFAULT_THRESHOLD_PERCENTILE))
            thr = vmin + _DEFAULT_THRESHOLD_FRACTION * (p99 - vmin)
        return (arr > thr).any(axis=0)

    def _positions(self, img: Any, length: int, name: str) -> np.ndarray:
        """Position of each slice in ``range_unit``."""
        idx = np.arange(length, dtype=np.float64)
        if self.range_unit == "index":
            return idx
        if self.range_unit == "percent":
            return idx * (100.0 / (length - 1)) if length > 1 else idx
        if not isinstance(img, MetaTensor):
            raise ValueError(
                f"{name}: slice_range in mm needs the voxel spacing, but the input is a plain "
                f"{type(img).__name__} without an affine; pass a MetaTensor (LoadImage) or use "
                "range_unit='percent'/'index'"
            )
        affine = convert_to_numpy(img.affine, dtype=np.float64)
        spacing = float(np.linalg.norm(affine[: min(3, affine.shape[0] - 1), self.axis]))
        if not np.isfinite(spacing) or spacing <= 0:
            raise ValueError(
                f"{name}: cannot derive a positive spacing along axis {self.axis} from affine {affine.tolist()}"
            )
        return idx * spacing

    @staticmethod
    def _central_window(kept: np.ndarray, n: int, centre: float) -> np.ndarray:
        """The ``n`` consecutive entries of sorted ``kept`` whose mean is closest to ``centre`` (ties: lower)."""
        csum = np.concatenate([[0.0], np.cumsum(kept, dtype=np.float64)])
        means = (csum[n:] - csum[:-n]) / n
        start = int(np.argmin(np.abs(means - centre)))
        return kept[start : start + n]

    def select(self, img: Any, mask: Any = None) -> np.ndarray:
        """Sorted slice indices (int64) that ``__call__`` would extract; validates like ``__call__``."""
        vol = self._validate(img)
        return self._select(img, vol, mask)

    def _select(self, img: Any, vol: torch.Tensor, mask: Any) -> np.ndarray:
        name = _source_name(img)
        length = int(vol.shape[self.axis + 1])
        fg = self._foreground(vol, mask, name)
        other = tuple(a for a in range(3) if a != self.axis)
        fg_count = fg.sum(axis=other).astype(np.float64)  # (L,)
        frac = fg_count / float(np.prod([fg.shape[a] for a in other]))

        candidates = np.arange(length)
        if self.slice_range is not None:
            pos = self._positions(img, length, name)
            low, high = self.slice_range
            tol = 1e-6 * max(1.0, abs(high))
            candidates = candidates[(pos >= low - tol) & (pos <= high + tol)]
            if candidates.size == 0:
                raise ValueError(
                    f"{name}: slice_range {self.slice_range} ({self.range_unit}) selects no slice on axis "
                    f"{self.axis} of length {length}"
                )
        kept = candidates[frac[candidates] >= self.min_foreground]
        if kept.size == 0:
            if mask is not None and not fg.any():
                reason = "the mask is empty (no voxel > 0)"
            elif mask is None and float(vol.max()) == float(vol.min()):
                reason = f"the volume is constant (value {float(vol.min()):g}), so empty by intensity"
            elif not fg.any():
                reason = "no voxel is above the foreground threshold"
            else:
                best = int(candidates[np.argmax(frac[candidates])])
                reason = (
                    f"all {candidates.size} candidate slices are below min_foreground={self.min_foreground:g} "
                    f"(best: slice {best} with foreground fraction {frac[best]:.4f})"
                )
            raise ValueError(f"{name}: no slice kept along axis {self.axis}: {reason}")
        if self.num_slices is not None:
            if kept.size < self.num_slices:
                warnings.warn(
                    f"{name}: only {kept.size} slices kept along axis {self.axis}, "
                    f"fewer than num_slices={self.num_slices}; "
                    "returning all of them",
                    UserWarning,
                    stacklevel=3,
                )
            elif kept.size > self.num_slices:
                weights = fg_count[kept]
                centre = float((kept * weights).sum() / weights.sum()) if weights.sum() > 0 else float(kept.mean())
                kept = self._central_window(kept, self.num_slices, centre)
        return kept.astype(np.int64)

    def _extract(self, vol: torch.Tensor, indices: np.ndarray) -> torch.Tensor:
        length = vol.shape[self.axis + 1]
        offsets = np.arange(-self.context, self.context + 1)
        # (N, 2k+1) source indices, clamped at the volume edges
        src = np.clip(indices[:, None] + offsets[None, :], 0, length - 1)
        idx = torch.as_tensor(src.reshape(-1), dtype=torch.long, device=vol.device)
        picked = torch.index_select(vol, self.axis + 1, idx)  # (C, ..., N*(2k+1) along axis, ...)
        picked = torch.movedim(picked, self.axis + 1, 0)  # (N*(2k+1), C, H, W)
        n, c = len(indices), vol.shape[0]
        return picked.reshape(n, (2 * self.context + 1) * c, *picked.shape[2:]).contiguous()

    def __call__(self, img: Any, mask: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Extract the slices.

        Args:
            img: volume ``(C, X, Y, Z)``, numpy array, torch tensor or MetaTensor (any real dtype).
            mask: optional brain mask ``(X, Y, Z)`` or ``(1|C, X, Y, Z)``; foreground is ``mask > 0``.

        Returns:
            ``(slices, slice_indices)``: float32 ``(N, C * (2 * context + 1), H, W)`` plain tensor on the
            input's device, and long ``(N,)`` increasing indices along ``axis``.
        """
        vol = self._validate(img)
        indices = self._select(img, vol, mask)
        return self._extract(vol, indices), torch.as_tensor(indices, dtype=torch.long)


class ExtractSlicesd(MapTransform, MultiSampleTrait):
    """Dictionary twin of :class:`ExtractSlices`: one sample dict -> one dict per kept slice.

    The slice indices are chosen once per sample, from ``data[mask_key]`` when ``mask_key`` is given,
    otherwise from the first of ``keys``, and applied to every key in ``keys`` (all must share the
    spatial shape; put a segmentation in ``keys`` to slice it too — with ``context > 0`` it gets the
    same 2.5D channels).

    Each output dict holds, for every key in ``keys``, a MetaTensor ``(C * (2 * context + 1), H, W)``
    float32 whose meta carries ``slice_index`` (int), ``slice_axis`` (int, 0..2) and ``filename_or_obj``
    of the source volume when present; every other key is copied (tensors/arrays are shared by
    reference, not duplicated, as there may be hundreds of slices of a large volume; other values are
    deep-copied); and ``data[slice_index_key] = int`` index. A mask key not listed in ``keys`` is copied
    as the 3D volume — drop it afterwards (``DeleteItemsd``) before batching if not needed.

    Args:
        keys: image key(s) to slice.
        mask_key: optional key of a brain mask used to decide foreground (``mask > 0``).
        slice_index_key: key that receives the slice index of each output dict.
        allow_missing_keys: skip missing keys instead of raising KeyError.
        extract_kwargs: arguments of :class:`ExtractSlices`.
    """

    backend = ExtractSlices.backend

    def __init__(
        self,
        keys: KeysCollection = "image",
        mask_key: Hashable | None = None,
        slice_index_key: Hashable = "slice_index",
        allow_missing_keys: bool = False,
        **extract_kwargs: Any,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if not slice_index_key:
            raise ValueError("slice_index_key must be a non-empty key")
        self.mask_key = mask_key
        self.slice_index_key = slice_index_key
        self.extractor = ExtractSlices(**extract_kwargs)

    def __call__(self, data: Mapping[Hashable, Any]) -> list[dict[Hashable, Any]]:
        d = dict(data)
        present = list(self.key_iterator(d))
        if not present:
            return [d]
        ref_key = present[0]
        mask = None
        if self.mask_key is not None:
            if self.mask_key not in d:
                raise KeyError(f"mask_key {self.mask_key!r} not in data (keys: {list(d)})")
            mask = d[self.mask_key]
        vols = {key: self.extractor._validate(d[key]) for key in present}
        for key in present:
            if tuple(vols[key].shape[1:]) != tuple(vols[ref_key].shape[1:]):
                raise ValueError(
                    f"{_source_name(d[key])}: key {key!r} has spatial shape {tuple(vols[key].shape[1:])}, "
                    f"key {ref_key!r} has {tuple(vols[ref_key].shape[1:])}"
                )
        indices = self.extractor._select(d[ref_key], vols[ref_key], mask)
        sliced = {key: self.extractor._extract(vol, indices) for key, vol in vols.items()}

        others = {k: v for k, v in d.items() if k not in sliced}
        out: list[dict[Hashable, Any]] = []
        for n, index in enumerate(indices.tolist()):
            item: dict[Hashable, Any] = {}
            for k, v in others.items():
                item[k] = v if isinstance(v, (torch.Tensor, np.ndarray)) else copy.deepcopy(v)
            for key, stack in sliced.items():
                meta: dict[str, Any] = {"slice_index": int(index), "slice_axis": self.extractor.axis}
                src_meta = getattr(d[key], "meta", None)
                if isinstance(src_meta, Mapping) and "filename_or_obj" in src_meta:
                    meta["filename_or_obj"] = src_meta["filename_or_obj"]
                item[key] = MetaTensor(stack[n].clone(), meta=meta)
            item[self.slice_index_key] = int(index)
            out.append(item)
        return out
