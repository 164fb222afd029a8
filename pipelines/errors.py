"""Input errors as one line at the command-line boundary: ``error: <file>: <what is wrong>``, exit code 2.

The project's input errors (``ImageLoadError``, ``DicomSeriesError``, ``InputError``, ``DeployError``,
``ManifestError``, ``SUVError``... every ``ValueError`` subclass defined in ``pipelines`` or ``transforms``, and
``FileNotFoundError``) already name the file and the problem. When they escape ``python -m monai.bundle run`` they
arrive wrapped in MONAI's ``RuntimeError("Failed to evaluate ...")`` chains, 60-100 lines of tracebacks; the
user needs the one line at their root.

* ``python -m monai.bundle ...``: importing :mod:`pipelines` (every bundle config does, in ``imports``) installs
  :func:`excepthook` as ``sys.excepthook`` when, and only when, the running program is ``monai.bundle``. Other
  programs (tests, notebooks, services) are not affected. MONAI itself is not changed.
* ``python -m pipelines ...``: :func:`pipelines.cli.main` catches the same errors.

Any other exception (a bug) keeps its full traceback. Set ``NEURO_DEBUG=1`` to get the full traceback for input
errors too.
"""

from __future__ import annotations

import atexit
import os
import sys
from types import TracebackType

__all__ = ["DEBUG_ENV", "debug_enabled", "excepthook", "find_input_error", "install_for_bundle_run",
           "one_line"]

DEBUG_ENV = "NEURO_DEBUG"
EXIT_INPUT_ERROR = 2
_PROJECT_PACKAGES = ("pipelines", "transforms")
_installed = False


def debug_enabled() -> bool:
    """``$NEURO_DEBUG`` set to something other than ``""``, ``0``, ``false``, ``no``."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _is_input_error(err: BaseException) -> bool:
    if isinstance(err, FileNotFoundError):
        return True
    module = type(err).__module__.split(".")[0]
    return isinstance(err, ValueError) and module in _PROJECT_PACKAGES


def find_input_error(err: BaseException | None) -> BaseException | None:
    """The outermost project input error in ``err``'s chain (``__cause__``, else ``__context__``), or None."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if _is_input_error(err):
            return err
        err = err.__cause__ if err.__cause__ is not None else err.__context__
    return None


def one_line(err: BaseException) -> str:
    """``error: <message>`` on one line (newlines in the message folded)."""
    text = " ".join(str(err).split()) or type(err).__name__
    return f"error: {text}"


def excepthook(exc_type: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
    """Print a project input error as one line and exit with code 2; hand anything else to the default hook."""
    err = None if debug_enabled() else find_input_error(value)
    if err is None:
        sys.__excepthook__(exc_type, value, tb)
        return
    print(one_line(err), file=sys.stderr)
    # exit code 2 (bad input) instead of the interpreter's 1: run the exit handlers (logging, MLflow) first
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(EXIT_INPUT_ERROR)


def install_for_bundle_run() -> bool:
    """Install :func:`excepthook` when the running program is ``python -m monai.bundle``; True if installed."""
    global _installed
    if _installed:
        return True
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is None or spec.name not in ("monai.bundle.__main__", "monai.bundle"):
        return False
    sys.excepthook = excepthook
    _installed = True
    return True
