"""``python -m pipelines manifest {build,split,audit}``: build, split and audit manifests from the shell.

Examples::

    # Kaggle class-folder tree -> manifest with paths relative to the manifest file
    python -m pipelines manifest build --kind class-folders --root ../shared/data/alzheimer_mri_4class \\
        --out data_manifests/alzheimer_mri_4class/manifest.csv --paths relative
    # ADNI/OASIS/BIDS NIfTI tree + clinical table (subject, session, diagnosis, age, sex)
    python -m pipelines manifest build --kind nifti --root adni/volumes --participants adni/clinical.csv \\
        --subject-column PTID --label-column DX --age-column AGE --sex-column PTGENDER --out adni.csv
    # DICOM study tree + labels table (subject/study/series -> label)
    python -m pipelines manifest build --kind dicom --root dicom/ --labels labels.csv --out dicom.csv
    # subject-level splits, written to data_manifests/<dataset>/splits/<name>/ (never overwritten silently)
    python -m pipelines manifest split --manifest adni.csv --name holdout --val 0.15 --test 0.15 --seed 0
    python -m pipelines manifest split --manifest adni.csv --name cv5 --kfold 5 --test 0.15 --seed 0
    # leakage audit: Markdown report on stdout, JSON next to the manifest (or --json)
    python -m pipelines manifest audit --manifest data_manifests/alzheimer_mri_4class/manifest.csv --near \\
        --max-distance 2 --pseudo-subjects data_manifests/alzheimer_mri_4class/manifest_pseudo.csv

For ``--subject-from patient-id-hash`` the salt is read from the environment variable named by
``--salt-env`` (default ``NEURO_MONAI_SUBJECT_SALT``), never from the command line, so it stays out of
shell histories and logs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd

from pipelines.manifests.schema import ManifestError, read_manifest, resolve_paths, write_manifest
from pipelines.tracking.progress import add_quiet_argument, progress_bar

__all__ = ["build_manifest", "build_manifest_file", "register", "relative_paths"]

logger = logging.getLogger(__name__)

KINDS = ("class-folders", "nifti", "dicom")
DEFAULT_SALT_ENV = "NEURO_MONAI_SUBJECT_SALT"
_HASH_COLUMNS = ("pixel_hash", "phash", "exact_group_size", "near_group_size")


# --------------------------------------------------------------------------------------------------- library


def relative_paths(df: pd.DataFrame, base: str | os.PathLike) -> pd.DataFrame:
    """A copy whose absolute ``image`` paths are made relative to ``base`` (a manifest's folder)."""
    base = Path(base).resolve()
    out = df.copy()
    out.attrs.update(df.attrs)
    out["image"] = [os.path.relpath(str(p), base) if os.path.isabs(str(p)) else str(p) for p in out["image"]]
    return out


def _participants_table(
    participants: str | os.PathLike | pd.DataFrame, columns: Mapping[str, str | None]
) -> pd.DataFrame:
    """Read a clinical table and rename the user's column names to the manifest's (subject_id, age, ...).

    Without an explicit subject/session column the aliases of
    :func:`pipelines.manifests.builders.read_participants` apply (participant_id, subject, PTID, RID, visit...).
    """
    from pipelines.manifests.builders import read_participants

    rename = {src: dst for dst, src in columns.items() if src}
    if isinstance(participants, pd.DataFrame):
        table, where = participants.copy(), "<participants DataFrame>"
    else:
        path = Path(participants)
        where = str(path)
        if columns.get("subject_id") or columns.get("session_id"):
            if not path.is_file():
                raise ManifestError(f"participants table not found: {path}")
            sep = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
            table = pd.read_csv(path, sep=sep, dtype=str)
        else:
            table = read_participants(path)
    missing = [src for src in rename if src not in table.columns]
    if missing:
        raise ManifestError(f"participants table {where} has no column(s) {missing}; has {list(table.columns)}")
    table = table.rename(columns=rename)
    if "subject_id" not in table.columns:
        raise ManifestError(f"participants table {where} has no subject column; pass --subject-column")
    return table


def build_manifest(
    kind: str,
    root: str | os.PathLike,
    *,
    participants: str | os.PathLike | pd.DataFrame | None = None,
    labels: str | os.PathLike | pd.DataFrame | None = None,
    label_column: str | None = None,
    label_map: Mapping[str, str] | None = None,
    class_names: Sequence[str] | None = None,
    subject_column: str | None = None,
    session_column: str | None = None,
    age_column: str | None = None,
    sex_column: str | None = None,
    keep_split: bool = True,
    subject_from: str = "labels",
    salt: str | None = None,
    series_description: str | None = None,
    modality: str | None = None,
) -> pd.DataFrame:
    """Build a manifest of one of the three kinds (absolute ``image`` paths).

    Args:
        kind: ``class-folders`` (:func:`pipelines.manifests.builders.from_class_folders`), ``nifti``
            (:func:`~pipelines.manifests.builders.from_nifti_participants`) or ``dicom``
            (:func:`pipelines.manifests.dicom_builder.from_dicom_tree`).
        root: data folder.
        participants: clinical table for ``nifti`` (subject, optional session, diagnosis, age, sex).
        labels: labels table for ``dicom``.
        label_column: diagnosis/label column (default ``diagnosis`` for nifti, ``label`` for dicom).
        label_map: raw label -> class name (nifti and dicom).
        class_names: expected class names (validated).
        subject_column, session_column, age_column, sex_column: the clinical table's names for these
            columns when they differ from subject_id / session_id / age / sex (nifti).
        keep_split: nifti: copy a ``split`` column of the clinical table (e.g. a fixed test set).
        subject_from, salt, series_description, modality: see ``from_dicom_tree``.

    Raises:
        ManifestError: as the builders; a missing table for nifti/dicom.
    """
    if kind == "class-folders":
        from pipelines.manifests.builders import from_class_folders

        return from_class_folders(root, class_names=class_names)
    if kind == "nifti":
        from pipelines.manifests.builders import from_nifti_participants

        if participants is None:
            raise ManifestError("--kind nifti needs a participants/clinical table (--participants)")
        columns = {"subject_id": subject_column, "session_id": session_column, "age": age_column,
                   "sex": sex_column}
        table = _participants_table(participants, columns)
        label_column = label_column or "diagnosis"
        df = from_nifti_participants(root, table, label_column=label_column, label_map=label_map,
                                     class_names=class_names)
        if keep_split and "split" in table.columns:
            has_session = "session_id" in table.columns
            key_cols = ["subject_id", "session_id"] if has_session else ["subject_id"]
            splits = table[key_cols + ["split"]].astype(str).drop_duplicates(subset=key_cols)
            splits["split"] = splits["split"].replace({"nan": ""})
            merged = df[key_cols].astype(str).merge(splits, on=key_cols, how="left")
            df["split"] = merged["split"].fillna("").to_numpy()
        return df
    if kind == "dicom":
        from pipelines.manifests.dicom_builder import from_dicom_tree

        if labels is None:
            raise ManifestError("--kind dicom needs a labels table (--labels)")
        df = from_dicom_tree(root, labels, label_column=label_column or "label", class_names=None,
                             subject_from=subject_from, salt=salt, series_description=series_description,
                             modality=modality)
        if label_map:
            df["label"] = df["label"].map(lambda v: label_map.get(v, v))
        if class_names is not None:
            unknown = sorted(set(df["label"]) - set(class_names))
            if unknown:
                raise ManifestError(f"labels {unknown} are not in class_names {list(class_names)}")
        return df
    raise ValueError(f"unknown manifest kind {kind!r}; use one of {KINDS}")


def build_manifest_file(
    out: str | os.PathLike, kind: str, root: str | os.PathLike, paths: str = "absolute", overwrite: bool = False,
    **kwargs,
) -> str:
    """:func:`build_manifest`, written to ``out``; returns ``out`` as a string (usable as a bundle ``manifest``).

    Args:
        paths: ``absolute`` or ``relative`` (to the manifest's folder; portable with the data).
        overwrite: replace an existing file (otherwise FileExistsError).
    """
    if paths not in ("absolute", "relative"):
        raise ValueError(f"paths must be 'absolute' or 'relative', got {paths!r}")
    df = build_manifest(kind, root, **kwargs)
    out = Path(out)
    if paths == "relative":
        df = relative_paths(df, out.parent)
    write_manifest(df, out, overwrite=overwrite)
    return str(out)


# --------------------------------------------------------------------------------------------------- commands


def atomic_write_text(path: Path, text: str) -> Path:
    """Write text to a temporary sibling, then move it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def _label_map(items: Sequence[str] | None) -> dict[str, str] | None:
    if not items:
        return None
    out = {}
    for item in items:
        for part in item.split(","):
            raw, sep, name = part.partition("=")
            if not sep or not raw.strip() or not name.strip():
                raise ManifestError(f"--label-map expects RAW=CLASS, got {part!r}")
            out[raw.strip()] = name.strip()
    return out


def _class_names(text: str | None) -> list[str] | None:
    return [c.strip() for c in text.split(",") if c.strip()] if text else None


def _cmd_build(args: argparse.Namespace) -> int:
    salt = None
    if args.subject_from == "patient-id-hash":
        salt = os.environ.get(args.salt_env)
        if not salt:
            raise ManifestError(f"--subject-from patient-id-hash reads the salt from ${args.salt_env}, "
                                "which is not set")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = build_manifest_file(
            args.out, args.kind, args.root, paths=args.paths, overwrite=args.overwrite,
            participants=args.participants, labels=args.labels, label_column=args.label_column,
            label_map=_label_map(args.label_map), class_names=_class_names(args.class_names),
            subject_column=args.subject_column, session_column=args.session_column, age_column=args.age_column,
            sex_column=args.sex_column, keep_split=not args.no_split, subject_from=args.subject_from, salt=salt,
            series_description=args.series_description, modality=args.modality,
        )
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    df = read_manifest(out)
    counts = df.groupby("label")["subject_id"].agg(["size", "nunique"])
    print(f"wrote {out}: {len(df)} rows, {df['subject_id'].nunique()} subjects")
    for label, row in counts.iterrows():
        print(f"  {label}: {int(row['size'])} rows, {int(row['nunique'])} subjects")
    return 0


def _load_for_split(path: Path) -> tuple[pd.DataFrame, bool]:
    """The manifest with absolute paths, and whether it was written with relative ones."""
    df = read_manifest(path)
    relative = not any(os.path.isabs(str(p)) for p in df["image"])
    return resolve_paths(df), relative


def _cmd_split(args: argparse.Namespace) -> int:
    from pipelines.manifests.audit import assert_no_subject_overlap
    from pipelines.manifests.kfold import stratified_subject_split, subject_kfold, write_kfold
    from pipelines.manifests.schema import validate_manifest
    from pipelines.manifests.split import split_counts, write_split

    manifest = Path(args.manifest)
    df, relative = _load_for_split(manifest)
    df = validate_manifest(df, check_files=not args.no_check_files)
    dataset = args.dataset or manifest.resolve().parent.name
    out_dir = Path(args.out_root) / dataset / "splits" / args.name
    if (out_dir / "split.json").exists() and not args.overwrite:
        raise FileExistsError(f"split already exists: {out_dir / 'split.json'} (use --overwrite to replace it)")
    extra = {"source": manifest.name, "dataset": dataset, "name": args.name}
    if args.kfold:
        result = subject_kfold(df, n_splits=args.kfold, seed=args.seed, test_fraction=args.test,
                               age_bins=args.age_bins)
        # write_kfold builds each fold with fold_manifest, which raises LeakageError on a shared subject
        write_kfold(result, out_dir, overwrite=args.overwrite, paths="relative" if relative else "keep", **extra)
        print(f"wrote {args.kfold}-fold split to {out_dir} ({result.attrs['split_params']['method']})")
        per_fold = result[result["fold"].notna()].groupby("fold")["subject_id"].nunique()
        print("  subjects per fold: " + ", ".join(f"fold-{int(k)}: {n}" for k, n in per_fold.items())
              + f"; test: {result.loc[result['split'] == 'test', 'subject_id'].nunique()}")
        return 0
    result = stratified_subject_split(df, val_fraction=args.val, test_fraction=args.test, seed=args.seed,
                                      age_bins=args.age_bins)
    assert_no_subject_overlap(result)
    if relative:
        result = relative_paths(result, out_dir)
    write_split(result, out_dir, overwrite=args.overwrite, **extra)
    print(f"wrote split to {out_dir} ({result.attrs['split_params']['method']})")
    for split, c in split_counts(result).items():
        print(f"  {split or '(none)'}: {c['images']} rows, {c['subjects']} subjects, {c['subjects_per_label']}")
    return 0


def _pseudo_subject_manifest(report, near: bool) -> tuple[pd.DataFrame, int]:
    """Manifest rows with duplicate-linked subjects merged; merged subjects that span splits lose their split."""
    from pipelines.manifests.audit import pseudo_subjects

    column = "near_group" if near else "exact_group"
    table = report.groups.drop(columns=[c for c in _HASH_COLUMNS if c in report.groups.columns])
    table = table.drop(columns=[c for c in ("exact_group", "near_group") if c != column and c in table.columns])
    out = pseudo_subjects(table, groups_col=column)
    spans = out.groupby("subject_id")["split"].nunique()
    conflicted = out["subject_id"].isin(spans[spans > 1].index)
    out["orig_split"] = out["split"]
    out.loc[conflicted, "split"] = ""
    return out, int(out.loc[conflicted, "subject_id"].nunique())


def _cmd_audit(args: argparse.Namespace) -> int:
    from pipelines.manifests.audit import audit

    manifest = Path(args.manifest)
    df = read_manifest(manifest)
    # group columns of an earlier audit (e.g. in a pseudo-subject manifest) would collide with the new ones
    df = df.drop(columns=[c for c in (*_HASH_COLUMNS, "exact_group", "near_group") if c in df.columns])
    report = audit(df, near=args.near, root=manifest.resolve().parent, hash_size=args.hash_size,
                   max_distance=args.max_distance, max_examples=args.max_examples)
    print(report.to_markdown())
    json_path = Path(args.json) if args.json else manifest.with_name(f"{manifest.stem}_audit.json")
    atomic_write_text(json_path, report.to_json() + "\n")
    print(f"JSON report written to {json_path}")
    if args.markdown:
        atomic_write_text(Path(args.markdown), report.to_markdown())
    if args.pseudo_subjects:
        out, n_conflicted = _pseudo_subject_manifest(report, args.near)
        target = Path(args.pseudo_subjects)
        if not any(os.path.isabs(str(p)) for p in df["image"]) and target.resolve().parent != manifest.resolve().parent:
            out = relative_paths(resolve_paths(out, manifest.resolve().parent), target.parent)
        write_manifest(out, target, overwrite=args.overwrite)
        n_merged = int((out["subject_id"] != out["orig_subject_id"]).sum())
        print(f"pseudo-subject manifest written to {target}: {out['subject_id'].nunique()} subjects "
              f"(was {df['subject_id'].nunique()}), {n_merged} rows re-assigned to merged subjects; "
              f"{n_conflicted} merged subject(s) spanned several splits and lost their split (see orig_split)")
    if args.strict and report.has_leakage:
        return 2
    return 0


def _reported(func):
    """Run a command; input errors become one ``error: ...`` line on stderr and exit status 1."""

    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except (ManifestError, FileExistsError, FileNotFoundError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1

    run.__name__ = func.__name__
    return run


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``manifest {build,split,audit}`` to the project's command line."""
    parser = subparsers.add_parser("manifest", help="build, split and audit manifests",
                                   description=__doc__.splitlines()[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="manifest_command", required=True)

    b = sub.add_parser("build", help="build a manifest from a data tree")
    b.add_argument("--kind", choices=KINDS, required=True)
    b.add_argument("--root", required=True, help="data folder (class tree, NIfTI tree or DICOM tree)")
    b.add_argument("--out", required=True, help="manifest CSV to write")
    b.add_argument("--participants", help="nifti: clinical table (CSV/TSV)")
    b.add_argument("--labels", help="dicom: labels table (CSV/TSV)")
    b.add_argument("--label-column", help="label column (default: diagnosis for nifti, label for dicom)")
    b.add_argument("--label-map", action="append", metavar="RAW=CLASS", help="map raw labels (repeatable)")
    b.add_argument("--class-names", help="comma-separated expected class names")
    b.add_argument("--subject-column", help="nifti: the table's subject column (default: auto)")
    b.add_argument("--session-column", help="nifti: the table's session/visit column")
    b.add_argument("--age-column", help="nifti: the table's age column (years)")
    b.add_argument("--sex-column", help="nifti: the table's sex column")
    b.add_argument("--no-split", action="store_true", help="nifti: ignore a split column of the table")
    b.add_argument("--subject-from", choices=("labels", "patient-id-hash"), default="labels",
                   help="dicom: subject ids from the labels table, or a salted hash of PatientID")
    b.add_argument("--salt-env", default=DEFAULT_SALT_ENV, help="environment variable holding the salt")
    b.add_argument("--series-description", help="dicom: keep series whose description matches this regex")
    b.add_argument("--modality", help="dicom: keep series of this modality (e.g. MR)")
    b.add_argument("--paths", choices=("absolute", "relative"), default="absolute",
                   help="image paths as written (relative: to the manifest's folder)")
    b.add_argument("--overwrite", action="store_true")
    b.set_defaults(func=_reported(_cmd_build))

    s = sub.add_parser("split", help="subject-level stratified hold-out or k-fold split")
    s.add_argument("--manifest", required=True)
    s.add_argument("--name", required=True, help="split name: data_manifests/<dataset>/splits/<name>/")
    s.add_argument("--kfold", type=int, default=0, help="number of folds (0: train/val/test hold-out)")
    s.add_argument("--val", type=float, default=0.15, help="hold-out: fraction of subjects in val")
    s.add_argument("--test", type=float, default=0.15,
                   help="fraction of subjects in test, when the manifest has no test rows (k-fold: 0 = none)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--age-bins", type=int, default=3, help="quantile bins of age for the stratification")
    s.add_argument("--dataset", help="dataset folder name (default: the manifest's folder name)")
    s.add_argument("--out-root", default="data_manifests", help="root of the split folders")
    s.add_argument("--no-check-files", action="store_true", help="do not check that image files exist")
    s.add_argument("--overwrite", action="store_true", help="replace an existing split of that name")
    s.set_defaults(func=_reported(_cmd_split))

    a = sub.add_parser("audit", help="leakage audit: subjects and duplicate images across splits")
    a.add_argument("--manifest", required=True)
    a.add_argument("--near", action="store_true", help="also find near duplicates (perceptual hash)")
    a.add_argument("--max-distance", type=int, default=4, help="near: Hamming distance (bits of 64) linking images")
    a.add_argument("--hash-size", type=int, default=8)
    a.add_argument("--max-examples", type=int, default=10)
    a.add_argument("--json", help="JSON report path (default: <manifest>_audit.json beside the manifest)")
    a.add_argument("--markdown", help="also write the Markdown report here")
    a.add_argument("--pseudo-subjects", help="write a manifest whose subjects merge duplicate-linked images")
    a.add_argument("--overwrite", action="store_true", help="replace an existing --pseudo-subjects file")
    a.add_argument("--strict", action="store_true", help="exit with status 2 when leakage is found")
    add_quiet_argument(a)
    a.set_defaults(func=_reported(_cmd_audit))
