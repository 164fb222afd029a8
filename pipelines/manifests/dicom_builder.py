"""Manifest builder for DICOM study trees plus a labels table: one manifest row per series.

The tree is scanned with :func:`pipelines.io.dicom.find_series` (headers only, non-DICOM files skipped with a
warning); each series becomes one row whose ``image`` is the folder holding its files, which
:func:`pipelines.io.dicom.load_series` and the predictors read. Two series in one folder are an error: sort
the files into one folder per series first (the row could not tell them apart).

Labels table (CSV/TSV), one row per labelled unit, with a label column (``label`` by default) and at least
one key column; every key given in a row must match:

=============  ================================================================================================
column         matches a series when
=============  ================================================================================================
series_uid     it equals the SeriesInstanceUID, or the name of the series' folder (aliases: series,
               SeriesInstanceUID)
study_uid      it equals the StudyInstanceUID, or a folder name on the series' path (aliases: study,
               StudyInstanceUID)
patient_id     it equals the DICOM PatientID (alias: PatientID)
path           the series' folder is this folder (relative to the root) or below it
subject_id     used as a key only in rows without any other key: a folder name on the series' path
=============  ================================================================================================

The most specific matching row wins (series_uid > path (deeper first) > study_uid > patient_id > subject_id);
two equally specific rows that disagree are an error. Optional columns: ``subject_id`` (alias subject,
participant_id), ``session_id`` (alias session, visit), ``split``.

Identifiers: PatientName is never read. ``subject_id`` comes from the labels table; with
``subject_from="patient-id-hash"`` it is ``sub-`` + the first 16 hex digits of
``sha256(salt + ":" + PatientID)`` instead. The salt must be long, random and kept secret (outside the
repository): an unsalted hash of a short PatientID is reversed by trying every ID. PatientID itself is never
written. Without a ``session_id`` column the studies of a subject are numbered ``ses-01``, ``ses-02``, ... in
order of StudyDate/StudyTime (used for the order only, not written). Kept columns: ``series_uid`` (to load the
right series), ``modality``, ``series_description``, ``n_files``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd
import pydicom

from pipelines.io.dicom import find_series
from pipelines.manifests.schema import ManifestError, validate_manifest

__all__ = ["SUBJECT_SOURCES", "from_dicom_tree", "hashed_subject_id", "read_labels_table"]

logger = logging.getLogger(__name__)

SUBJECT_SOURCES = ("labels", "patient-id-hash")
KEY_COLUMNS = ("series_uid", "path", "study_uid", "patient_id", "subject_id")
_ALIASES = {
    "series_uid": ("series_uid", "series", "seriesinstanceuid", "series_instance_uid"),
    "study_uid": ("study_uid", "study", "studyinstanceuid", "study_instance_uid"),
    "patient_id": ("patient_id", "patientid"),
    "path": ("path", "folder", "series_folder"),
    "subject_id": ("subject_id", "subject", "participant_id"),
    "session_id": ("session_id", "session", "visit"),
}
_HEADER_TAGS = ["StudyInstanceUID", "SeriesInstanceUID", "PatientID", "Modality", "SeriesDescription",
                "StudyDate", "StudyTime"]
_MIN_SALT = 8
_MAX_LISTED = 5


def read_labels_table(path: str | os.PathLike, label_column: str = "label") -> pd.DataFrame:
    """Read a labels CSV/TSV and rename known column aliases (case-insensitive) to the canonical names.

    Raises:
        ManifestError: missing file, no label column, no key column, a row without label or without any key.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"labels table not found: {path}")
    sep = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    table = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    table.attrs["source"] = str(path)
    return _normalise_labels(table, label_column)


def _normalise_labels(table: pd.DataFrame, label_column: str) -> pd.DataFrame:
    src = table.attrs.get("source", "<labels table>")
    rename = {}
    for col in table.columns:
        low = str(col).strip().lower()
        for canonical, aliases in _ALIASES.items():
            if low in aliases and col != label_column:
                rename[col] = canonical
    table = table.rename(columns=rename).fillna("")
    if label_column not in table.columns:
        raise ManifestError(f"labels table {src} has no {label_column!r} column; has {list(table.columns)}")
    keys = [c for c in KEY_COLUMNS if c in table.columns]
    if not keys:
        raise ManifestError(f"labels table {src} has no key column; give one of {list(KEY_COLUMNS)}")
    table = table.astype(str).apply(lambda s: s.str.strip())
    no_label = table[label_column] == ""
    if no_label.any():
        raise ManifestError(f"labels table {src}: {int(no_label.sum())} row(s) without a label, e.g. row "
                            f"{int(no_label.idxmax()) + 2} (file line)")
    no_key = (table[keys] == "").all(axis=1)
    if no_key.any():
        raise ManifestError(f"labels table {src}: row {int(no_key.idxmax()) + 2} (file line) has no key value in "
                            f"{keys}")
    table.attrs["source"] = src
    return table


def hashed_subject_id(patient_id: str, salt: str) -> str:
    """``sub-`` + 16 hex digits of ``sha256(salt + ":" + patient_id)``: a stable pseudonym, reversible only with
    the salt.

    Raises:
        ValueError: empty PatientID, or a salt shorter than 8 characters.
    """
    if not salt or len(salt) < _MIN_SALT:
        raise ValueError(f"the PatientID hash needs a secret salt of at least {_MIN_SALT} characters")
    if not str(patient_id).strip():
        raise ValueError("empty PatientID cannot be hashed into a subject id")
    digest = hashlib.sha256(f"{salt}:{str(patient_id).strip()}".encode()).hexdigest()
    return f"sub-{digest[:16]}"


@dataclass
class _Series:
    uid: str
    folder: Path
    rel_parts: tuple[str, ...]
    study_uid: str
    patient_id: str
    modality: str
    description: str
    order: tuple[str, str, str]
    n_files: int


def _scan(root: Path) -> list[_Series]:
    series: list[_Series] = []
    by_folder: dict[Path, list[str]] = {}
    for uid, files in find_series(root).items():
        folder = Path(os.path.commonpath([str(f.parent) for f in files]))
        ds = pydicom.dcmread(files[0], stop_before_pixels=True, force=True, specific_tags=_HEADER_TAGS)
        rel = folder.relative_to(root).parts if folder != root else ()
        series.append(
            _Series(
                uid=uid,
                folder=folder,
                rel_parts=tuple(rel),
                study_uid=str(ds.get("StudyInstanceUID", "") or ""),
                patient_id=str(ds.get("PatientID", "") or "").strip(),
                modality=str(ds.get("Modality", "") or ""),
                description=str(ds.get("SeriesDescription", "") or ""),
                order=(str(ds.get("StudyDate", "") or ""), str(ds.get("StudyTime", "") or ""),
                       str(ds.get("StudyInstanceUID", "") or "")),
                n_files=len(files),
            )
        )
        by_folder.setdefault(folder, []).append(uid)
    shared = {f: uids for f, uids in by_folder.items() if len(uids) > 1}
    if shared:
        folder, uids = next(iter(shared.items()))
        raise ManifestError(
            f"{folder}: holds files of {len(uids)} series ({', '.join(uids[:_MAX_LISTED])}); a manifest row is "
            f"one series folder, so sort the files into one folder per series first ({len(shared)} such "
            "folder(s))"
        )
    return series


def _specificity(row: dict, s: _Series, root: Path) -> float | None:
    """How specifically ``row`` names series ``s`` (higher wins), or None when a given key does not match."""
    score = 0.0
    keyed = False
    value = row.get("series_uid", "")
    if value:
        keyed = True
        if value not in (s.uid, s.rel_parts[-1] if s.rel_parts else ""):
            return None
        score = max(score, 4.0)
    value = row.get("path", "")
    if value:
        keyed = True
        target = (root / value).resolve()
        folder = s.folder.resolve()
        if folder != target and target not in folder.parents:
            return None
        score = max(score, 3.0 - 1.0 / (2 + len(target.parts)))
    value = row.get("study_uid", "")
    if value:
        keyed = True
        if value != s.study_uid and value not in s.rel_parts:
            return None
        score = max(score, 2.0)
    value = row.get("patient_id", "")
    if value:
        keyed = True
        if value != s.patient_id:
            return None
        score = max(score, 1.0)
    if not keyed:
        value = row.get("subject_id", "")
        if not value or value not in s.rel_parts:
            return None
        score = 0.5
    return score


def _describe(s: _Series) -> str:
    return f"{'/'.join(s.rel_parts) or '.'} ({s.description or 'no description'})"


def from_dicom_tree(
    root: str | os.PathLike,
    labels: str | os.PathLike | pd.DataFrame,
    label_column: str = "label",
    class_names: Sequence[str] | None = None,
    subject_from: str = "labels",
    salt: str | None = None,
    series_description: str | None = None,
    modality: str | None = None,
    strict: bool = False,
) -> pd.DataFrame:
    """Build a manifest (one row per series) from a DICOM tree and a labels table (see the module docstring).

    Args:
        root: folder searched recursively for DICOM files.
        labels: labels table path (CSV/TSV) or DataFrame.
        label_column: column of the labels table holding the class name.
        class_names: expected class names (validated).
        subject_from: ``"labels"`` (the table's ``subject_id``) or ``"patient-id-hash"`` (salted PatientID hash).
        salt: secret salt for ``"patient-id-hash"`` (>= 8 characters).
        series_description: keep only series whose SeriesDescription matches this regular expression
            (``re.search``, case-insensitive), e.g. ``"mprage|t1"``.
        modality: keep only series of this Modality (e.g. ``"MR"``).
        strict: series without a labels row are an error (default: skipped with a warning).

    Returns:
        Manifest DataFrame with absolute ``image`` folders, columns ``subject_id, session_id, image, label, split,
        series_uid, modality, series_description, n_files, subject_source``.

    Raises:
        ManifestError: missing root, no DICOM series, two series in one folder, conflicting labels rows, a
            matched row without ``subject_id`` (``subject_from="labels"``), an empty PatientID to hash, unknown
            labels, no series left.
        ValueError: bad ``subject_from`` or salt.
    """
    if subject_from not in SUBJECT_SOURCES:
        raise ValueError(f"subject_from must be one of {SUBJECT_SOURCES}, got {subject_from!r}")
    if subject_from == "patient-id-hash" and (not salt or len(salt) < _MIN_SALT):
        raise ValueError(f"subject_from='patient-id-hash' needs a secret salt of at least {_MIN_SALT} characters")
    root = Path(root).resolve()
    if not root.is_dir():
        raise ManifestError(f"DICOM folder not found: {root}")
    if isinstance(labels, pd.DataFrame):
        table = _normalise_labels(labels.astype(str).copy(), label_column)
    else:
        table = read_labels_table(labels, label_column)
    src = table.attrs.get("source", "<labels table>")
    series = _scan(root)
    if series_description is not None:
        pattern = re.compile(series_description, re.IGNORECASE)
        series = [s for s in series if pattern.search(s.description)]
    if modality is not None:
        series = [s for s in series if s.modality.upper() == modality.upper()]
    if not series:
        raise ManifestError(f"no DICOM series under {root} match the filters (series_description="
                            f"{series_description!r}, modality={modality!r})")
    records = table.to_dict("records")
    used_rows: set[int] = set()
    matched: list[tuple[_Series, dict]] = []
    unlabelled: list[_Series] = []
    for s in series:
        scored = [(sc, i) for i, r in enumerate(records) if (sc := _specificity(r, s, root)) is not None]
        if not scored:
            unlabelled.append(s)
            continue
        best = max(sc for sc, _ in scored)
        rows = [i for sc, i in scored if sc == best]
        decided = {(records[i][label_column], records[i].get("subject_id", ""), records[i].get("session_id", ""))
                   for i in rows}
        if len(decided) > 1:
            raise ManifestError(f"labels table {src}: series {_describe(s)} is matched equally by rows "
                                f"{[i + 2 for i in rows]} (file lines) that disagree on label/subject/session")
        used_rows.update(rows)
        matched.append((s, records[rows[0]]))
    if unlabelled:
        listed = "; ".join(_describe(s) for s in unlabelled[:_MAX_LISTED])
        msg = f"{len(unlabelled)} series under {root} match no row of {src}: {listed}"
        if strict:
            raise ManifestError(msg)
        warnings.warn(msg + " (skipped)", UserWarning, stacklevel=2)
    unused = [i + 2 for i in range(len(records)) if i not in used_rows]
    if unused:
        warnings.warn(f"labels table {src}: row(s) {unused[:10]} (file lines) match no series under {root}",
                      UserWarning, stacklevel=2)
    if not matched:
        raise ManifestError(f"none of the {len(series)} series under {root} matched the labels table {src}")

    rows = []
    for s, rec in matched:
        if subject_from == "patient-id-hash":
            if not s.patient_id:
                raise ManifestError(f"{s.folder}: empty PatientID, cannot derive a hashed subject id")
            subject = hashed_subject_id(s.patient_id, salt or "")
        else:
            subject = rec.get("subject_id", "")
            if not subject:
                raise ManifestError(f"labels table {src}: the row matching series {_describe(s)} has no subject_id "
                                    "(add the column, or use subject_from='patient-id-hash' with a salt)")
        rows.append({
            "subject_id": subject,
            "session_id": rec.get("session_id", ""),
            "image": str(s.folder),
            "label": rec[label_column],
            "split": rec.get("split", ""),
            "series_uid": s.uid,
            "modality": s.modality,
            "series_description": s.description,
            "n_files": s.n_files,
            "subject_source": subject_from,
            "_order": s.order,
        })
    df = pd.DataFrame(rows)
    missing_ses = df["session_id"] == ""
    if missing_ses.any():
        numbered = {}
        for subject, g in df[missing_ses].groupby("subject_id"):
            for n, study in enumerate(sorted(set(g["_order"])), start=1):
                numbered[(subject, study)] = f"ses-{n:02d}"
        df.loc[missing_ses, "session_id"] = [numbered[(sub, o)] for sub, o in
                                             zip(df.loc[missing_ses, "subject_id"], df.loc[missing_ses, "_order"])]
    df = df.drop(columns="_order")
    df.attrs["source"] = str(root)
    return validate_manifest(df, class_names=class_names, check_files=False)
