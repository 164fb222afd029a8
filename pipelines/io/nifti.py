"""NIfTI-1/2 size checks before a volume is read: the header's shape x data type against the limits of
:mod:`pipelines.io.limits` and against the file (a ``.nii.gz`` inflated through a bounded reader)."""

from __future__ import annotations

import gzip
import io
import os
import zlib
from pathlib import Path

from pipelines.io.images import ImageLoadError
from pipelines.io.limits import InputTooLargeError, check_volume_size

__all__ = ["VolumeTooLargeError", "check_nifti"]

# deflate cannot expand more than 1032:1; anything claiming more cannot be a real .nii.gz
_DEFLATE_MAX_RATIO = 1032
_CHUNK = 1 << 20


class VolumeTooLargeError(ImageLoadError, InputTooLargeError):
    """A NIfTI file over the size limits; the message names the file and the limit."""


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


def _read_header_bytes(path: Path, gz: bool) -> bytes:
    try:
        if gz:
            with gzip.open(path, "rb") as fh:
                return fh.read(540)
        with open(path, "rb") as fh:
            return fh.read(540)
    except (OSError, EOFError, zlib.error) as e:
        raise ImageLoadError(f"{path}: corrupt or truncated NIfTI file ({type(e).__name__}: {e})") from e


def _parse_header(path: Path, head: bytes):
    import nibabel as nib

    if len(head) < 348:
        raise ImageLoadError(f"{path}: truncated NIfTI file ({len(head)} header bytes, at least 348 needed)")
    sizeof_le, sizeof_be = int.from_bytes(head[:4], "little"), int.from_bytes(head[:4], "big")
    if 348 in (sizeof_le, sizeof_be):
        klass = nib.Nifti1Header
    elif 540 in (sizeof_le, sizeof_be):
        klass = nib.Nifti2Header
    else:
        raise ImageLoadError(f"{path}: not a NIfTI file (header size field {sizeof_le}, expected 348 or 540)")
    try:
        return klass.from_fileobj(io.BytesIO(head))
    except Exception as e:  # noqa: BLE001 - nibabel raises HeaderDataError, ValueError, struct.error...
        raise ImageLoadError(f"{path}: invalid NIfTI header ({type(e).__name__}: {e})") from e


def _inflated_at_least(path: Path, need: int) -> int:
    """Bytes a gzip stream inflates to, counted in 1 MiB chunks and never past ``need`` (no allocation beyond
    one chunk)."""
    got = 0
    try:
        with gzip.open(path, "rb") as fh:
            while got < need:
                chunk = fh.read(min(_CHUNK, need - got))
                if not chunk:
                    break
                got += len(chunk)
    except (OSError, EOFError, zlib.error) as e:
        raise ImageLoadError(f"{path}: corrupt or truncated NIfTI file ({type(e).__name__}: {e})") from e
    return got


def check_nifti(
    path: str | os.PathLike, *, limit_voxels: int | None = None, limit_bytes: int | None = None
) -> tuple[tuple[int, ...], str]:
    """Check a NIfTI-1/2 file (plain or gzip) against the size limits before it is read.

    Reads at most 540 header bytes, checks the declared shape x data type against ``limit_voxels`` /
    ``limit_bytes`` and that the file (inflated through a bounded reader for gzip) holds the declared data.

    Returns:
        ``(shape, dtype name)`` from the header.

    Raises:
        VolumeTooLargeError: shape x data type over the limits, or more data than a gzip file can hold.
        ImageLoadError: missing file, not a NIfTI header, corrupt gzip, or a file shorter than its header says.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageLoadError(f"volume not found: {path}")
    size = path.stat().st_size
    try:
        gz = _is_gzip(path)
    except OSError as e:
        raise ImageLoadError(f"{path}: cannot be read ({e})") from e
    hdr = _parse_header(path, _read_header_bytes(path, gz))
    try:
        shape = tuple(int(n) for n in hdr.get_data_shape())
        dtype = hdr.get_data_dtype()
        offset = int(hdr.get_data_offset())
    except Exception as e:  # noqa: BLE001 - bad dims / datatype codes
        raise ImageLoadError(f"{path}: invalid NIfTI header ({type(e).__name__}: {e})") from e
    _, nbytes = check_volume_size(path, shape, dtype.itemsize, limit_voxels=limit_voxels, limit_bytes=limit_bytes,
                                  error=VolumeTooLargeError)
    need = offset + nbytes
    if gz:
        if need > _DEFLATE_MAX_RATIO * size:
            raise VolumeTooLargeError(f"{path}: header declares {nbytes:,} bytes of image data (shape {shape}), more "
                                      f"than a {size:,}-byte gzip file can hold")
        got = _inflated_at_least(path, need)
    else:
        got = size
    if got < need:
        raise ImageLoadError(f"{path}: truncated NIfTI file: header declares {need:,} bytes (shape {shape}, "
                             f"{dtype.name}), the {'inflated ' if gz else ''}file holds {got:,}")
    return shape, dtype.name
