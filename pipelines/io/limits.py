"""Size limits checked before an input volume is allocated: NIfTI headers and DICOM Rows x Columns x frames.

A header is a promise about how much memory reading the file will take; a hostile or broken one (a 480-byte
NIfTI declaring 1000^3 voxels, a DICOM with Rows = Columns = 65535) must fail here, naming the file, instead of
in a multi-gigabyte allocation.

Limits (both apply; the first one passed is reported):

* ``max_voxels``: voxels of one decoded volume. Default :data:`DEFAULT_MAX_VOXELS` (2^28 = 512 x 512 x 1024),
  overridden by the environment variable ``NEURO_MAX_VOXELS``.
* ``max_bytes``: bytes of one decoded volume in its stored data type (DICOM: float32 after rescale). Default
  :data:`DEFAULT_MAX_BYTES` (2 GiB), overridden by ``NEURO_MAX_BYTES``.

The readers (:func:`pipelines.io.nifti.check_nifti`, :func:`pipelines.io.dicom.load_series`) also check that the
data a header declares fits in the file. This module imports nothing heavy (no torch, no pydicom).
"""

from __future__ import annotations

import math
import os
from typing import Sequence

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_VOXELS",
    "MAX_BYTES_ENV",
    "MAX_VOXELS_ENV",
    "InputTooLargeError",
    "check_volume_size",
    "max_bytes",
    "max_voxels",
]

DEFAULT_MAX_VOXELS = 2**28
DEFAULT_MAX_BYTES = 2 * 1024**3
MAX_VOXELS_ENV = "NEURO_MAX_VOXELS"
MAX_BYTES_ENV = "NEURO_MAX_BYTES"


class InputTooLargeError(ValueError):
    """An input whose header declares more data than the limits allow (the service answers 413)."""


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(float(text))
    except ValueError:
        raise ValueError(f"${name} must be a positive integer, got {text!r}") from None
    if value <= 0:
        raise ValueError(f"${name} must be a positive integer, got {text!r}")
    return value


def max_voxels(value: int | None = None) -> int:
    """``value`` when given, else ``$NEURO_MAX_VOXELS``, else :data:`DEFAULT_MAX_VOXELS`."""
    return int(value) if value is not None else _env_int(MAX_VOXELS_ENV, DEFAULT_MAX_VOXELS)


def max_bytes(value: int | None = None) -> int:
    """``value`` when given, else ``$NEURO_MAX_BYTES``, else :data:`DEFAULT_MAX_BYTES`."""
    return int(value) if value is not None else _env_int(MAX_BYTES_ENV, DEFAULT_MAX_BYTES)


def check_volume_size(
    where: object,
    shape: Sequence[int],
    itemsize: float,
    *,
    limit_voxels: int | None = None,
    limit_bytes: int | None = None,
    error: type[ValueError] = InputTooLargeError,
) -> tuple[int, int]:
    """Check a declared shape against the limits before anything is allocated.

    Args:
        where: the file or folder, for the message.
        shape: declared sizes (any number of dimensions).
        itemsize: bytes per voxel of the decoded data.
        limit_voxels, limit_bytes: limits (default :func:`max_voxels`, :func:`max_bytes`).
        error: exception type raised (must accept one message).

    Returns:
        ``(voxels, bytes)``.

    Raises:
        error: a negative or zero size, or more voxels/bytes than the limits.
    """
    dims = [int(n) for n in shape]
    if not dims or any(n <= 0 for n in dims):
        raise error(f"{where}: header declares an empty or invalid shape {tuple(dims)}")
    voxels = math.prod(dims)
    nbytes = int(math.ceil(voxels * itemsize))
    lim_v, lim_b = max_voxels(limit_voxels), max_bytes(limit_bytes)
    if voxels > lim_v:
        raise error(f"{where}: header declares shape {tuple(dims)} = {voxels:,} voxels, more than the limit of "
                    f"{lim_v:,} (set ${MAX_VOXELS_ENV} to raise it)")
    if nbytes > lim_b:
        raise error(f"{where}: header declares {nbytes:,} bytes of image data (shape {tuple(dims)}), more than the "
                    f"limit of {lim_b:,} (set ${MAX_BYTES_ENV} to raise it)")
    return voxels, nbytes
