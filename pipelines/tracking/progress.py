"""Progress bars: one switch for the bundles' ignite bars and the command line's tqdm bars.

Bars go to stderr and only when it is a terminal, so logs, CI and ``| tee`` stay clean. ``$NEURO_PROGRESS``
overrides that for the whole process tree: ``0`` turns every bar off (what ``--quiet`` sets for the commands it
starts), ``force`` shows them even when stderr is not a terminal.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Any, Iterable, Iterator

PROGRESS_ENV = "NEURO_PROGRESS"
_OFF = ("0", "false", "no", "off")
_FORCE = ("force", "always")


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() not in _OFF + ("",)
    return bool(value)


def progress_enabled(progress: bool | str | None = None, stream=None) -> bool:
    """Whether to show progress bars.

    Args:
        progress: wanted or not; None: the running bundle's ``progress`` config id (default true).
        stream: where the bar goes (default stderr).

    Returns:
        False when ``$NEURO_PROGRESS`` is ``0``/``false``/``no``/``off`` or ``progress`` is false; else True when
        ``stream`` is a terminal or ``$NEURO_PROGRESS`` is ``force``.
    """
    env = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if env in _OFF:
        return False
    if progress is None:
        from pipelines.tracking import config_id

        progress = config_id("progress", True)
    if not _as_bool(progress):
        return False
    if env in _FORCE:
        return True
    stream = sys.stderr if stream is None else stream
    return bool(getattr(stream, "isatty", lambda: False)())


def progress_bar(iterable: Iterable | None = None, desc: str | None = None, total: int | None = None,
                 progress: bool | str | None = None, stream=None, unit: str = "it", **kwargs: Any):
    """A tqdm bar over ``iterable`` (or a manual one of ``total`` steps), disabled unless
    :func:`progress_enabled`. A disabled bar still iterates (its ``update()`` does nothing) and prints nothing.

    Args:
        iterable: what to iterate (None: call ``update()`` yourself).
        desc: label, e.g. ``"studies"``.
        total: number of steps (default ``len(iterable)`` where it has one).
        progress: see :func:`progress_enabled`.
        stream: where the bar goes (default stderr).
        unit: unit name shown in the rate.
        kwargs: passed on to ``tqdm`` (``leave`` defaults to False: the bar is cleared when done).
    """
    from tqdm import tqdm

    stream = sys.stderr if stream is None else stream
    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, desc=desc, total=total, unit=unit, file=stream,
                disable=not progress_enabled(progress, stream), **kwargs)


def add_quiet_argument(parser: argparse.ArgumentParser) -> None:
    """``--quiet``: no progress bars (also in the bundle runs the command starts); see :func:`quiet_if`."""
    parser.add_argument("--quiet", action="store_true",
                        help=f"no progress bars (also in the runs it starts; same as {PROGRESS_ENV}=0)")


@contextlib.contextmanager
def quiet_if(quiet: bool) -> Iterator[None]:
    """Set ``$NEURO_PROGRESS=0`` while the block runs when ``quiet`` (inherited by subprocesses), then restore it."""
    if not quiet:
        yield
        return
    old = os.environ.get(PROGRESS_ENV)
    os.environ[PROGRESS_ENV] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(PROGRESS_ENV, None)
        else:
            os.environ[PROGRESS_ENV] = old
