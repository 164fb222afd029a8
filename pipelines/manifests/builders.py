"""Manifest builders: Kaggle-style class-folder trees, NIfTI volume trees with a participants table, head-CT slice
sets (the DICOM phantom with a per-slice ``labels.csv``, the pre-windowed PNG set) and PET series trees with one
SUV factor per series.

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

from pipelines.io.dicom import DicomSeriesError, find_series
from pipelines.io.suv import SUVError, series_suv_factor
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
#: Default classes of :func:`build_pet_manifest`: the amyloid reads of the ``amyloid_pet`` bundle.
PET_CLASS_NAMES = ("negative", "intermediate", "positive")
_PARTICIPANT_FILES = ("participants.csv", "participants.tsv")


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


# ------------------------------------------------------------------------------------------------ head-CT slices


def _read_ct_labels(path: Path) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, skipinitialspace=True)
    except Exception as err:  # pandas raises many kinds
        raise ManifestError(f"{path}: not a readable CSV ({err})") from err
    df.columns = [str(c).strip() for c in df.columns]
    return df


def detect_format(dataset_dir: str | os.PathLike) -> str:
    """``"phantom_dicom"`` or ``"png_labels"`` from the columns of ``dataset_dir/labels.csv``.

    Raises:
        ManifestError: missing folder or labels.csv, or columns of neither layout.
    """
    root = Path(dataset_dir)
    labels = root / "labels.csv"
    if not root.is_dir():
        raise ManifestError(f"dataset_dir not found or not a folder: {root}")
    if not labels.is_file():
        raise ManifestError(f"{root}: no labels.csv (expected the head-CT phantom or the head_ct PNG layout)")
    cols = set(_read_ct_labels(labels).columns)
    if {"subject_id", "file", "label", "study_label"} <= cols:
        return "phantom_dicom"
    if {"id", "hemorrhage"} <= cols:
        return "png_labels"
    raise ManifestError(f"{labels}: columns {sorted(cols)} match neither the phantom layout (subject_id, file, "
                        "label, study_label, ...) nor the PNG layout (id, hemorrhage)")


def _binary_class_names(class_names: Sequence[str]) -> list[str]:
    names = [str(c) for c in class_names]
    if len(names) != 2:
        raise ManifestError(f"head-CT labels are binary (0 = {names[:1]}, 1 = positive); got class_names {names}")
    return names


def dicom_slice_manifest(dataset_dir: str | os.PathLike, class_names: Sequence[str]) -> pd.DataFrame:
    """Per-slice manifest of a head-CT phantom folder.

    Returns:
        Columns ``subject_id, session_id, image`` (absolute path of the slice's DICOM file), ``label`` (class
        name of the slice label), ``split`` (empty), ``slice_index``, ``study_id``, ``study_label`` (class name).

    Raises:
        ManifestError: missing columns or labels other than 0/1.
    """
    names = _binary_class_names(class_names)
    root = Path(dataset_dir).resolve()
    table = _read_ct_labels(root / "labels.csv")
    need = {"subject_id", "session_id", "study_id", "file", "slice_index", "label", "study_label"}
    if not need <= set(table.columns):
        raise ManifestError(f"{root / 'labels.csv'}: missing column(s) {sorted(need - set(table.columns))}")
    for col in ("label", "study_label"):
        bad = ~table[col].isin((0, 1))
        if bad.any():
            raise ManifestError(f"{root / 'labels.csv'}: column {col!r} must be 0/1, row {int(bad.idxmax())} is "
                                f"{table[col][bad].iloc[0]!r}")
    return pd.DataFrame({
        "subject_id": table["subject_id"].astype(str),
        "session_id": table["session_id"].astype(str),
        "image": [str(root / f) for f in table["file"]],
        "label": [names[int(v)] for v in table["label"]],
        "split": "",
        "slice_index": table["slice_index"].astype(int),
        "study_id": table["study_id"].astype(str),
        "study_label": [names[int(v)] for v in table["study_label"]],
    })


def png_manifest(dataset_dir: str | os.PathLike, class_names: Sequence[str], group_size: int = 5) -> pd.DataFrame:
    """Manifest of the pre-windowed PNG set (``head_ct/NNN.png`` + ``labels.csv`` with ``id, hemorrhage``).

    No patient ids are given; ids ``group_size * g .. group_size * g + group_size - 1`` form pseudo-subject
    ``grp-g`` so runs of consecutive slices of one patient stay in one split (a patient may still straddle two
    groups: the split reduces leakage, it cannot rule it out).

    Returns:
        Columns ``subject_id`` (pseudo), ``session_id``, ``image`` (absolute path), ``label`` (class name),
        ``split`` (empty), ``slice_index`` (-1), ``study_id``, ``study_label``, ``source_id``.

    Raises:
        ManifestError: bad ``group_size``, labels other than 0/1, duplicate ids, or a labelled image missing.
    """
    names = _binary_class_names(class_names)
    if isinstance(group_size, bool) or int(group_size) != group_size or group_size < 1:
        raise ManifestError(f"group_size must be an integer >= 1, got {group_size!r}")
    root = Path(dataset_dir).resolve()
    table = _read_ct_labels(root / "labels.csv")
    if not {"id", "hemorrhage"} <= set(table.columns):
        raise ManifestError(f"{root / 'labels.csv'}: expected columns id, hemorrhage; got {list(table.columns)}")
    bad = ~table["hemorrhage"].isin((0, 1))
    if bad.any():
        raise ManifestError(f"{root / 'labels.csv'}: hemorrhage must be 0/1, row {int(bad.idxmax())} is "
                            f"{table['hemorrhage'][bad].iloc[0]!r}")
    ids = table["id"].astype(int)
    if ids.duplicated().any():
        raise ManifestError(f"{root / 'labels.csv'}: duplicate id(s) {sorted(set(ids[ids.duplicated()]))[:5]}")
    images = [root / "head_ct" / f"{i:03d}.png" for i in ids]
    missing = [p for p in images if not p.is_file()]
    if missing:
        raise ManifestError(f"{root / 'labels.csv'} lists {len(missing)} image(s) that do not exist, e.g. {missing[0]}")
    groups = [f"grp-{i // int(group_size):03d}" for i in ids]
    labels = [names[int(v)] for v in table["hemorrhage"]]
    return pd.DataFrame({
        "subject_id": groups,
        "session_id": "ses-01",
        "image": [str(p) for p in images],
        "label": labels,
        "split": "",
        "slice_index": -1,
        "study_id": groups,
        "study_label": labels,
        "source_id": ids.to_numpy(),
    })


# ------------------------------------------------------------------------------------------------ PET series


def _pet_participants(root: Path, participants: str | os.PathLike | None) -> tuple[pd.DataFrame, Path]:
    if participants is not None:
        path = Path(participants)
        path = path if path.is_absolute() else root / path
    else:
        found = [root / n for n in _PARTICIPANT_FILES if (root / n).is_file()]
        if not found:
            raise ManifestError(f"{root}: no participants table ({' or '.join(_PARTICIPANT_FILES)})")
        path = found[0]
    if not path.is_file():
        raise ManifestError(f"participants table not found: {path}")
    sep = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        table = pd.read_csv(path, sep=sep, dtype=str)
    except Exception as e:  # pandas raises many kinds
        raise ManifestError(f"participants table {path} is not readable: {e}") from e
    return table, path


def _class_name(value: str, class_names: Sequence[str], where: str) -> str:
    value = str(value).strip()
    if value in class_names:
        return value
    if value.isdigit() and int(value) < len(class_names):
        return class_names[int(value)]
    raise ManifestError(f"{where}: label {value!r} is not one of {list(class_names)} (or their indices)")


_MAX_PROBLEMS = 10


def build_pet_manifest(
    dataset_dir: str | os.PathLike,
    class_names: Sequence[str] = PET_CLASS_NAMES,
    participants: str | os.PathLike | None = None,
    label_column: str | None = None,
) -> pd.DataFrame:
    """One manifest row per PET series, with the series' body-weight SUV factor computed once from its headers.

    Args:
        dataset_dir: data set root (holds the participants table and the series folders).
        class_names: the bundle's classes; labels in the table are class names or their indices.
        participants: table path (absolute or relative to ``dataset_dir``); default ``participants.csv`` or
            ``participants.tsv`` in ``dataset_dir``.
        label_column: column with the class; default ``diagnosis`` when present, else ``label``.

    Returns:
        The manifest (project format, :mod:`pipelines.manifests.schema`): ``subject_id``, ``session_id``,
        ``image`` (absolute series folder), ``label`` (class name), ``split`` (empty), plus ``suv_factor``
        (g/Bq for BQML: ``SUV = rescaled pixel * suv_factor``), ``suv_units``, ``suv_method``,
        ``decay_correction``, ``weight_kg``, ``injected_dose_bq``, ``decay_time_s``, ``n_instances``.

    Raises:
        ManifestError: missing folder/table/columns, unknown labels, a series folder that is missing, holds no
            DICOM or more than one series, or whose SUV factor cannot be computed (the message names the folder
            and every missing/invalid tag). Every row is checked; one error lists all unusable series.
    """
    root = Path(dataset_dir)
    if not root.is_dir():
        raise ManifestError(f"dataset_dir not found or not a folder: {root}")
    table, table_path = _pet_participants(root, participants)
    label_column = label_column or ("diagnosis" if "diagnosis" in table.columns else "label")
    missing = [c for c in ("subject_id", label_column) if c not in table.columns]
    if missing:
        raise ManifestError(f"participants table {table_path} lacks column(s) {missing}; has {list(table.columns)}")
    if len(table) == 0:
        raise ManifestError(f"participants table {table_path} has no rows")
    rows = []
    problems: list[str] = []
    for i, rec in enumerate(table.to_dict("records")):
        where = f"{table_path} row {i + 2}"
        try:
            rows.append(_pet_row(root, rec, where, label_column, class_names))
        except ManifestError as e:
            problems.append(str(e))
    if problems:
        listed = "; ".join(problems[:_MAX_PROBLEMS])
        more = f"; and {len(problems) - _MAX_PROBLEMS} more" if len(problems) > _MAX_PROBLEMS else ""
        raise ManifestError(f"{len(problems)} of {len(table)} series cannot be used: {listed}{more}")
    df = pd.DataFrame(rows)
    df.attrs["source"] = str(table_path)
    return validate_manifest(df, class_names=class_names, check_files=True)


def _pet_row(root: Path, rec: dict, where: str, label_column: str, class_names: Sequence[str]) -> dict:
    """The manifest row of one participants-table record (ManifestError naming ``where`` when unusable)."""
    subject = str(rec["subject_id"]).strip()
    session = str(rec.get("session_id") or "ses-01").strip()
    series_dir = rec.get("series_dir")
    folder = root / (series_dir if isinstance(series_dir, str) and series_dir else f"{subject}/{session}/pet")
    if not folder.is_dir():
        raise ManifestError(f"{where}: series folder not found: {folder}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            groups = find_series(folder)
    except DicomSeriesError as e:
        raise ManifestError(f"{where}: {e}") from e
    if len(groups) != 1:
        raise ManifestError(
            f"{where}: {folder} holds {len(groups)} DICOM series; put one series in each folder"
        )
    files = next(iter(groups.values()))
    try:
        suv = series_suv_factor(files)
    except SUVError as e:
        raise ManifestError(f"{where}: {e}") from e
    return {
        "subject_id": subject,
        "session_id": session,
        "image": str(folder.resolve()),
        "label": _class_name(rec[label_column], class_names, where),
        "split": "",
        "suv_factor": suv.factor,
        "suv_units": suv.units,
        "suv_method": suv.method,
        "decay_correction": suv.decay_correction,
        "weight_kg": suv.weight_kg,
        "injected_dose_bq": suv.injected_dose_bq,
        "decay_time_s": suv.decay_time_s,
        "n_instances": len(files),
    }
