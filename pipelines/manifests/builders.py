"""Manifest builders: Kaggle-style class-folder trees and NIfTI volume trees with a participants table.

Every builder returns a DataFrame in the format of :mod:`pipelines.manifests.schema` with absolute
``image`` paths; :func:`pipelines.manifests.schema.write_manifest` writes it.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd

from pipelines.manifests.schema import ManifestError, validate_manifest

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NIFTI_EXTENSIONS = (".nii", ".nii.gz")
# folder names recognised as a split level above the class folders
SPLIT_FOLDERS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "test": "test", "testing": "test"}
_SUBJECT_RE = re.compile(r"(sub-[A-Za-z0-9]+)")
_SESSION_RE = re.compile(r"(ses-[A-Za-z0-9]+)")
_SLICE_RE = re.compile(r"slice-(\d+)")


class NoSubjectIdsWarning(UserWarning):
    """Images carry no subject ids: each image becomes its own pseudo-subject (slices may leak)."""


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def from_class_folders(
    root: str | os.PathLike, class_names: Sequence[str] | None = None, allow_empty_classes: bool = False
) -> pd.DataFrame:
    """Build a manifest from a Kaggle-style tree ``root/[train|test/]<Class>/*.png``.

    Subject and session ids are parsed from BIDS-like file names (``sub-0001_ses-01_slice-042.png``);
    images without them become their own pseudo-subject (with a :class:`NoSubjectIdsWarning`), which is
    all a subject-free data set allows: slices of one patient may then land on both sides of a split.
    Use :mod:`pipelines.manifests.audit` to find duplicates and group them before splitting.

    Args:
        root: the tree's root folder.
        class_names: expected classes (folder names); by default every sub-folder is a class.
        allow_empty_classes: accept a class folder with no images (otherwise an error).

    Raises:
        ManifestError: missing root, no class folders, an empty class folder, or an unexpected folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(f"dataset folder not found: {root}")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    split_dirs = [p for p in subdirs if p.name.lower() in SPLIT_FOLDERS]
    groups = [(SPLIT_FOLDERS[p.name.lower()], p) for p in split_dirs] if split_dirs else [("", root)]
    rows = []
    no_ids = 0
    for split, folder in groups:
        class_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not class_dirs:
            raise ManifestError(f"no class folders in {folder} (expected {folder}/<Class>/*.png)")
        names = [p.name for p in class_dirs]
        if class_names is not None:
            unknown = sorted(set(names) - set(class_names))
            if unknown:
                raise ManifestError(f"unexpected class folder(s) {unknown} in {folder}; expected {list(class_names)}")
        for cdir in class_dirs:
            images = _list_images(cdir)
            if not images and not allow_empty_classes:
                raise ManifestError(f"class folder {cdir} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
            for img in images:
                sub = _SUBJECT_RE.search(img.name)
                ses = _SESSION_RE.search(img.name)
                sl = _SLICE_RE.search(img.name)
                if sub is None:
                    no_ids += 1
                    subject = f"img-{split or 'all'}-{cdir.name}-{img.stem}"
                else:
                    subject = sub.group(1)
                rows.append(
                    {
                        "subject_id": subject,
                        "session_id": ses.group(1) if ses else "ses-01",
                        "image": str(img.resolve()),
                        "label": cdir.name,
                        "split": split,
                        "slice_index": int(sl.group(1)) if sl else pd.NA,
                        "subject_source": "filename" if sub else "image",
                    }
                )
    if not rows:
        raise ManifestError(f"no images found under {root}")
    if class_names is not None:
        present = {r["label"] for r in rows}
        missing = [c for c in class_names if c not in present]
        if missing:
            warnings.warn(f"classes {missing} have no images under {root}", stacklevel=2)
    if no_ids:
        warnings.warn(
            f"{no_ids} image(s) under {root} carry no subject id (no 'sub-XXX' in the file name): each is its "
            "own pseudo-subject, so the split is by image and slices of one patient may leak across splits. "
            "Run the leakage audit to group duplicates.",
            NoSubjectIdsWarning,
            stacklevel=2,
        )
    df = pd.DataFrame(rows)
    df.attrs["source"] = str(root)
    return validate_manifest(df, class_names=class_names, check_files=False)


def read_participants(path: str | os.PathLike) -> pd.DataFrame:
    """Read a participants/clinical table (CSV or TSV) with at least ``subject_id``."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"participants table not found: {path}")
    sep = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    df = pd.read_csv(path, sep=sep, dtype=str)
    rename = {c: "subject_id" for c in df.columns if c.lower() in ("participant_id", "subject", "ptid", "rid")}
    rename.update({c: "session_id" for c in df.columns if c.lower() in ("session", "visit", "viscode")})
    df = df.rename(columns=rename)
    if "subject_id" not in df.columns:
        raise ManifestError(f"participants table {path} has no subject_id column; has {list(df.columns)}")
    return df


def from_nifti_participants(
    root: str | os.PathLike,
    participants: str | os.PathLike | pd.DataFrame,
    label_column: str = "diagnosis",
    label_map: Mapping[str, str] | None = None,
    class_names: Sequence[str] | None = None,
    pattern: str = "*.nii*",
) -> pd.DataFrame:
    """Build a volume manifest from an ADNI/OASIS/BIDS-style NIfTI tree plus a participants table.

    Each NIfTI file is matched to its subject (and session, if the table has one) by the ``sub-XXX`` /
    ``ses-YYY`` entities in its path, or by the subject id appearing as a path component.

    Args:
        root: folder searched recursively for ``pattern``.
        participants: table path or DataFrame with subject_id, optional session_id, and ``label_column``.
        label_column: column holding the diagnosis.
        label_map: optional mapping of raw diagnoses to class names (e.g. ``{"CN": "NonDemented"}``).
        class_names: expected class names (validated).

    Raises:
        ManifestError: no volumes, subjects without a volume or volumes without a subject row (listed).
    """
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(f"volume folder not found: {root}")
    table = participants if isinstance(participants, pd.DataFrame) else read_participants(participants)
    if label_column not in table.columns:
        raise ManifestError(f"participants table has no {label_column!r} column; has {list(table.columns)}")
    files = sorted(p for p in root.rglob(pattern) if p.name.endswith(NIFTI_EXTENSIONS))
    if not files:
        raise ManifestError(f"no NIfTI volumes ({pattern}) under {root}")
    has_session = "session_id" in table.columns
    index = {}
    for rec in table.to_dict("records"):
        key = (str(rec["subject_id"]), str(rec["session_id"]) if has_session else None)
        index[key] = rec
    subjects = {str(s) for s in table["subject_id"]}
    rows, orphans = [], []
    for f in files:
        rel = f.relative_to(root)
        sub = _SUBJECT_RE.search(str(rel))
        subject = sub.group(1) if sub else next((part for part in rel.parts if part in subjects), None)
        if subject is None:  # IXI-style "<subject>_T1.nii.gz": the longest subject id prefixing the file name
            prefixed = [s for s in subjects if f.name.startswith(s) and f.name[len(s):len(s) + 1] in ("_", "-", ".")]
            subject = max(prefixed, key=len) if prefixed else None
        ses = _SESSION_RE.search(str(rel))
        session = ses.group(1) if ses else "ses-01"
        rec = index.get((subject, session if has_session else None))
        if rec is None:
            orphans.append(str(rel))
            continue
        raw = str(rec[label_column])
        label = label_map.get(raw, raw) if label_map else raw
        row = {"subject_id": subject, "session_id": session, "image": str(f.resolve()), "label": label, "split": ""}
        for extra in ("age", "sex"):
            column = next((c for c in table.columns if str(c).lower() == extra), None)  # "Age", "SEX" too
            if column is not None:
                row[extra] = rec[column]
        rows.append(row)
    if orphans:
        warnings.warn(f"{len(orphans)} volume(s) under {root} match no participants row, e.g. {orphans[:3]}", stacklevel=2)
    if not rows:
        raise ManifestError(f"none of the {len(files)} volume(s) under {root} matched the participants table")
    df = pd.DataFrame(rows)
    df.attrs["source"] = str(root)
    return validate_manifest(df, class_names=class_names, check_files=False)
