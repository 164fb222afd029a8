"""The phantom cache: every embedded data set is generated once, atomically, into ``$NEURO_MONAI_CACHE/phantoms``."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

logger = logging.getLogger(__name__)


def cache_root() -> Path:
    """Cache folder for generated data: ``$NEURO_MONAI_CACHE``, else ``<repo>/.cache`` (git-ignored)."""
    env = os.environ.get("NEURO_MONAI_CACHE")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / ".cache"


def cached_dataset(
    name: str,
    seed: int,
    version: str,
    presets: Mapping[str, Mapping[str, Any]],
    kwargs: Mapping[str, Any],
    marker: str,
    generate: Callable[..., Any],
) -> str:
    """Folder of a generated data set, generating it on first use.

    The set is written into a temporary folder beside the target and renamed into place, so a concurrent
    or interrupted run never sees half a data set.

    Args:
        name: preset name (a key of ``presets``).
        seed: generator seed.
        version: generator version (part of the folder name: a new generator never reuses old data).
        presets: preset name -> generator keyword arguments.
        kwargs: extra generator arguments (they become part of the cache key).
        marker: a file the complete data set always holds (e.g. ``participants.tsv``).
        generate: ``generate(folder: Path, seed=seed, **params)``; ``folder`` does not exist yet.

    Raises:
        ValueError: unknown preset name.
    """
    if name not in presets:
        raise ValueError(f"unknown phantom {name!r}; choose one of {sorted(presets)}")
    params = {**presets[name], **kwargs}
    suffix = "-" + hashlib.sha1(repr(sorted(kwargs.items())).encode()).hexdigest()[:8] if kwargs else ""
    folder = cache_root() / "phantoms" / f"{name}-v{version}-seed{seed}{suffix}"
    if (folder / marker).exists():
        return str(folder)
    if folder.exists():
        raise FileExistsError(f"phantom cache folder {folder} exists but is incomplete (no {marker}); delete it")
    logger.info("generating the %s phantom into %s (first use)", name, folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        generate(tmp / "data", seed=seed, **params)
        try:
            os.replace(tmp / "data", folder)
        except OSError:
            if not (folder / marker).exists():  # another process finished first: its rename was atomic
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)


def into_new_folder(make: Callable[..., Any]) -> Callable[..., Any]:
    """Adapt a generator that writes into an existing folder to :func:`cached_dataset`'s contract."""

    def generate(folder: Path, **kwargs: Any) -> Any:
        folder.mkdir(parents=True)
        return make(folder, **kwargs)

    return generate
