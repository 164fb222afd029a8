"""Pseudonyms for file and folder names written to outputs (folder names are often patient ids).

The rule, used by every inference output (``predictions.json``/``.csv``, ``failed.json``):

- a study, series, image or input name taken from the file system is replaced by ``<kind>-<h>``, where ``<h>`` is
  the first 10 hex digits of the SHA-256 of the absolute path: stable across runs on the same machine, so a result
  can be matched back to its input by whoever holds the data, and meaningless to anyone else;
- names that are already pseudonyms by convention stay: a BIDS-style name made only of ``key-value`` entities and
  a suffix (``sub-0001``, ``sub-0001_ses-01_T1w.nii.gz``);
- ``keep_names=True`` (the bundles' ``keep_study_names`` config id, default false) keeps every name as it is.

Training logs only the basename of the data-set root or manifest the user gave (:func:`pipelines.tracking.run_params`,
``split.json`` ``source``); the folders below it (studies, subjects) never reach MLflow or ``split.json``.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

__all__ = ["is_bids_name", "pseudonym", "public_name", "redact_paths"]

#: ``sub-<label>`` then optional ``_<key>-<value>`` entities, an optional ``_<suffix>`` and file extensions.
_BIDS_RE = re.compile(r"^sub-[A-Za-z0-9]+(?:_[A-Za-z]+-[A-Za-z0-9]+)*(?:_[A-Za-z0-9]+)?(?:\.[A-Za-z0-9]+){0,2}$")


def is_bids_name(name: str) -> bool:
    """True for a BIDS-style name (``sub-0001``, ``sub-0001_ses-1_T1w.nii.gz``), a pseudonym by convention."""
    return bool(_BIDS_RE.match(name))


def pseudonym(path: str | os.PathLike, kind: str = "study") -> str:
    """``<kind>-<first 10 hex digits of SHA-256 of the absolute path>``, e.g. ``study-3f2a9c01be``."""
    text = os.path.abspath(os.fspath(path))
    return f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def public_name(path: str | os.PathLike, kind: str = "study", keep_names: bool = False, name: str | None = None) -> str:
    """The name of ``path`` as written to outputs: ``name`` (default: the last path component) when
    ``keep_names`` or when it is BIDS-style, else :func:`pseudonym`."""
    name = Path(path).name if name is None else name
    if keep_names or is_bids_name(name):
        return name
    return pseudonym(path, kind)


def redact_paths(text: str, root: str | os.PathLike | None, keep_names: bool = False) -> str:
    """``text`` (an error message) with every path at or below ``root`` replaced by ``<input>`` or
    ``<input>/<pseudonym>``, so a message that names a file of a patient-named folder can be stored.

    Both the path as given and its absolute form are matched. Unchanged when ``keep_names`` or ``root`` is None.
    """
    if keep_names or root is None or not text:
        return text
    given = os.fspath(root).rstrip(os.sep) or os.sep
    forms = sorted({given, os.path.abspath(given)}, key=len, reverse=True)
    absroot = os.path.abspath(given)
    stop = r"""[^\s'"():,;]*"""

    def sub(m: re.Match) -> str:
        rest = m.group(1) or ""
        if not rest.strip(os.sep):
            return "<input>"
        return "<input>/" + pseudonym(os.path.join(absroot, rest.lstrip(os.sep)), "file")

    for form in forms:
        text = re.sub(re.escape(form) + f"({re.escape(os.sep)}{stop})?", sub, text)
    # a bare folder or file name of the input (``DOE_JOHN: no slices``) is replaced as well
    base = Path(absroot).name
    if base and not is_bids_name(base):
        text = re.sub(rf"(?<![\w-]){re.escape(base)}(?![\w-])", pseudonym(absroot, "input"), text)
    return text
