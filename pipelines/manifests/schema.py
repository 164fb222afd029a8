"""The one manifest format of the project.

A manifest is a CSV table, one row per image (or per slice of a volume):

=============  ===========================================================================
column         meaning
=============  ===========================================================================
subject_id     subject (patient) id; splits are made per subject. Required.
session_id     visit / session id (``ses-01`` when unknown). Required.
image          path of the image file or DICOM series folder; relative paths are relative
               to the manifest's folder. Required.
label          class name (a string from the bundle's ``class_names``). Required.
split          ``train`` / ``val`` / ``test`` or empty when not split yet. Required.
slice_index    index of a 2D slice in its volume (optional).
=============  ===========================================================================

Extra columns (age, sex, source, augmented, ...) are kept.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Sequence

import pandas as pd

REQUIRED_COLUMNS = ("subject_id", "session_id", "image", "label", "split")
OPTIONAL_COLUMNS = ("slice_index",)
SPLITS = ("train", "val", "test")


class ManifestError(ValueError):
    """A manifest that cannot be used: the message names the file and what is wrong."""


def read_manifest(path: str | os.PathLike) -> pd.DataFrame:
    """Read a manifest CSV (paths stay as written; see :func:`resolve_paths`)."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    try:
        df = pd.read_csv(path, dtype={"subject_id": str, "session_id": str, "label": str, "split": str})
    except Exception as e:  # pandas raises many kinds
        raise ManifestError(f"manifest {path} is not a readable CSV: {e}") from e
    df.attrs["source"] = str(path)
    return df


def resolve_paths(df: pd.DataFrame, base: str | os.PathLike | None = None) -> pd.DataFrame:
    """Return a copy whose ``image`` column holds absolute paths (relative ones joined to ``base``)."""
    base = Path(base) if base is not None else Path(df.attrs.get("source", ".")).parent
    out = df.copy()
    out["image"] = [str(p) if os.path.isabs(str(p)) else str((base / str(p)).resolve()) for p in out["image"]]
    out.attrs.update(df.attrs)
    return out


def validate_manifest(
    df: pd.DataFrame,
    class_names: Sequence[str] | None = None,
    check_files: bool = True,
    require_split: bool = False,
) -> pd.DataFrame:
    """Check a manifest and return it with normalised types.

    Raises:
        ManifestError: missing columns, empty table, empty ids, unknown labels, unknown split names, missing
            files (the first few are listed), or duplicate rows.
    """
    src = df.attrs.get("source", "<in-memory manifest>")
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError(f"manifest {src} is missing required column(s) {missing}; has {list(df.columns)}")
    if len(df) == 0:
        raise ManifestError(f"manifest {src} has no rows")
    df = df.copy()
    df.attrs["source"] = src
    for col in ("subject_id", "session_id", "label"):
        bad = df[col].isna() | (df[col].astype(str).str.strip() == "")
        if bad.any():
            raise ManifestError(f"manifest {src}: column {col!r} is empty in {int(bad.sum())} row(s), e.g. row {int(bad.idxmax())}")
        df[col] = df[col].astype(str)
    df["split"] = df["split"].fillna("").astype(str)
    bad_split = ~df["split"].isin(("",) + SPLITS)
    if bad_split.any():
        raise ManifestError(f"manifest {src}: unknown split value(s) {sorted(set(df.loc[bad_split, 'split']))}; use {SPLITS}")
    if require_split and (df["split"] == "").any():
        raise ManifestError(f"manifest {src}: {int((df['split'] == '').sum())} row(s) have no split")
    if class_names is not None:
        unknown = sorted(set(df["label"]) - set(class_names))
        if unknown:
            raise ManifestError(f"manifest {src}: unknown label(s) {unknown}; expected one of {list(class_names)}")
    if "slice_index" in df.columns:
        df["slice_index"] = pd.to_numeric(df["slice_index"], errors="coerce").astype("Int64")
    key = ["image"] + (["slice_index"] if "slice_index" in df.columns else [])
    dup = df.duplicated(subset=key)
    if dup.any():
        raise ManifestError(f"manifest {src}: {int(dup.sum())} duplicate row(s), e.g. {df.loc[dup, 'image'].iloc[0]}")
    if check_files:
        absent = [p for p in df["image"].unique() if not os.path.exists(p)]
        if absent:
            raise ManifestError(
                f"manifest {src}: {len(absent)} file(s) do not exist, e.g. {absent[:3]}"
            )
    return df


def write_manifest(df: pd.DataFrame, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a manifest atomically (temporary file, then rename). Refuses to overwrite unless asked."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"manifest {path} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    cols = list(REQUIRED_COLUMNS) + [c for c in df.columns if c not in REQUIRED_COLUMNS]
    df[cols].to_csv(tmp, index=False)
    os.replace(tmp, path)
    return path


def manifest_digest(df: pd.DataFrame) -> str:
    """A short content digest of a manifest (rows, labels, splits and file names, not absolute paths)."""
    cols = [c for c in ("subject_id", "session_id", "label", "split", "slice_index") if c in df.columns]
    h = hashlib.sha256()
    names = [Path(str(p)).name for p in df["image"]]
    h.update(pd.util.hash_pandas_object(df[cols].astype(str).assign(name=names), index=False).values.tobytes())
    return h.hexdigest()[:16]
