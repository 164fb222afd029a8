"""Atomic file writes: write a temporary sibling, then ``os.replace`` it onto the target.

A crash (``kill -9``, power loss, a full disk) during a write therefore leaves either the complete old file or
the complete new one, never a truncated file: the best model ``models/model.pt``, the resume checkpoint
``models/checkpoint_last.pt`` and every report file go through :func:`atomic_write`.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["atomic_write", "atomic_torch_save"]


def atomic_write(path: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
    """Call ``writer(tmp_path)`` on a temporary file in the target folder, then move it onto ``path``.

    Args:
        path: final file path; its parent folder is created.
        writer: writes the complete file at the path it is given (a hidden sibling ending in ``.tmp``, so writers
            must not infer the format from the suffix).

    Returns:
        ``path`` as a Path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not mkstemp: its files are mode 0600, while outputs should get the usual umask-based permissions.
    tmp_path = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        writer(tmp_path)
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)`` through :func:`atomic_write` (flushed to disk before the rename)."""
    import torch

    def _write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())

    return atomic_write(path, _write)
