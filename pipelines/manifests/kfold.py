"""Subject-level stratified k-fold and hold-out splits balanced on label, age and sex.

Stratification is per subject: each subject gets one key, ``label`` combined with its age bin and sex when
the manifest has ``age`` / ``sex`` columns (``"AD|age2|F"``). A stratum with fewer subjects than
``min_stratum`` (for k-fold: ``n_splits``) cannot be spread over the folds, so its subjects fall back to
the label-only key; :func:`stratification_keys` reports how many did.

k-fold uses scikit-learn's ``StratifiedGroupKFold`` on the manifest rows with ``groups = subject_id``, so all
rows (slices, sessions) of a subject land in one fold and the folds are balanced on the keys row-wise.
Rows already in ``test`` (e.g. the test folder of a Kaggle tree) are held out of the folds; with
``test_fraction > 0`` and no test rows, a stratified test set is drawn first.

Written layout (:func:`write_kfold`), never silently overwritten::

    <out_dir>/manifest.csv          all rows, with a ``fold`` column (empty for test rows)
    <out_dir>/fold-<i>/manifest.csv split = val for fold i, train for the other folds, test kept
    <out_dir>/split.json            parameters, seed, counts per fold, manifest digest
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.manifests.audit import assert_no_subject_overlap
from pipelines.manifests.schema import ManifestError, manifest_digest, write_manifest
from pipelines.manifests.split import split_counts, subject_split

__all__ = [
    "stratification_keys",
    "subject_kfold",
    "fold_manifest",
    "stratified_subject_split",
    "write_kfold",
]

logger = logging.getLogger(__name__)

_SEX_CODES = {"m": "M", "male": "M", "man": "M", "1": "M", "f": "F", "female": "F", "woman": "F", "2": "F"}


def _subject_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per subject: label (most frequent; ties: first in sort order), age (median), sex (first)."""
    g = df.groupby("subject_id", sort=True)
    out = pd.DataFrame({"label": g["label"].agg(lambda s: s.astype(str).value_counts().sort_index().idxmax())})
    if "age" in df.columns:
        out["age"] = g["age"].agg(lambda s: pd.to_numeric(s, errors="coerce").median())
    if "sex" in df.columns:
        out["sex"] = g["sex"].agg(lambda s: next((str(v) for v in s if pd.notna(v) and str(v).strip()), ""))
    return out


def _sex_code(value: object) -> str:
    text = str(value).strip().lower()
    return _SEX_CODES.get(text, "sex?" if not text or text == "nan" else text.upper())


def stratification_keys(
    df: pd.DataFrame, min_stratum: int = 2, age_bins: int = 3, use_age: bool = True, use_sex: bool = True
) -> tuple[pd.Series, dict]:
    """Per-subject stratification keys.

    Args:
        df: manifest (``subject_id``, ``label``; optional ``age`` in years and ``sex``).
        min_stratum: a combined stratum with fewer subjects falls back to the label-only key.
        age_bins: number of quantile bins of the subjects' ages (ties merged); subjects without an age
            get ``age?``.
        use_age, use_sex: include the column when present.

    Returns:
        ``(keys, info)``: keys indexed by subject id, and ``{"stratified_on": [...], "age_bin_edges": [...],
        "n_strata": int, "n_subjects_fallback_to_label": int}``.
    """
    if int(age_bins) < 1:
        raise ValueError(f"age_bins must be >= 1, got {age_bins}")
    if int(min_stratum) < 1:
        raise ValueError(f"min_stratum must be >= 1, got {min_stratum}")
    subjects = _subject_table(df)
    parts = [subjects["label"].astype(str)]
    on = ["label"]
    info: dict = {"age_bin_edges": None}
    if use_age and "age" in subjects.columns and subjects["age"].notna().any():
        ages = subjects["age"]
        bins, edges = pd.qcut(ages, q=int(age_bins), labels=False, retbins=True, duplicates="drop")
        parts.append(bins.map(lambda b: "age?" if pd.isna(b) else f"age{int(b)}"))
        info["age_bin_edges"] = [round(float(e), 2) for e in edges]
        on.append("age")
    if use_sex and "sex" in subjects.columns and (subjects["sex"].astype(str).str.strip() != "").any():
        parts.append(subjects["sex"].map(_sex_code))
        on.append("sex")
    combined = parts[0]
    for p in parts[1:]:
        combined = combined + "|" + p
    sizes = combined.map(combined.value_counts())
    small = sizes < int(min_stratum)
    keys = combined.where(~small, subjects["label"].astype(str))
    info.update(
        {
            "stratified_on": on,
            "n_strata": int(keys.nunique()),
            "n_subjects_fallback_to_label": int(small.sum()) if len(on) > 1 else 0,
            "min_stratum": int(min_stratum),
        }
    )
    return keys.rename("stratum"), info


def _check(df: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in ("subject_id", "label") if c not in df.columns]
    if missing:
        raise ManifestError(f"manifest {df.attrs.get('source', '<in-memory>')} lacks column(s) {missing}")
    out = df.reset_index(drop=True)
    out.attrs.update(df.attrs)
    out["subject_id"] = out["subject_id"].astype(str)
    out["split"] = out["split"].fillna("").astype(str) if "split" in out.columns else ""
    return out


def stratified_subject_split(
    df: pd.DataFrame,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
    age_bins: int = 3,
) -> pd.DataFrame:
    """Train/val/test per subject, stratified on label (+ age bin + sex when present).

    :func:`pipelines.manifests.split.subject_split` run on the combined keys: rows that already have a split
    keep it, a subject never lands in two splits. A combined stratum needs about ``1 / test_fraction +
    (1 - test_fraction) / val_fraction`` subjects to give test and val one subject each in proportion; smaller
    strata fall back to the label key.
    """
    out = _check(df)
    # A stratum must yield about one subject to each split drawn from it; smaller ones would be rounded up to one
    # subject each (subject_split's "at least one when >= 2") and inflate val/test, so they use the label key.
    min_stratum = 1
    if test_fraction > 0:
        min_stratum += math.ceil(1.0 / test_fraction)
    if val_fraction > 0:
        min_stratum += math.ceil((1.0 - test_fraction) / val_fraction)
    keys, info = stratification_keys(out, min_stratum=min_stratum, age_bins=age_bins)
    labels = out["label"]
    split = subject_split(out.assign(label=out["subject_id"].map(keys)), val_fraction, test_fraction, seed)
    out["split"] = split["split"].to_numpy()
    out["label"] = labels
    out.attrs["split_params"] = {
        **split.attrs.get("split_params", {}),
        "method": f"subject-level hold-out, stratified on {'+'.join(info['stratified_on'])}",
        **info,
    }
    return out


def subject_kfold(
    df: pd.DataFrame,
    n_splits: int = 5,
    seed: int = 0,
    test_fraction: float = 0.0,
    age_bins: int = 3,
) -> pd.DataFrame:
    """Assign a ``fold`` (0 .. n_splits - 1) to every subject outside the test split.

    Args:
        df: manifest (``subject_id``, ``label``, ``split``; optional ``age``, ``sex``).
        n_splits: number of folds, >= 2.
        seed: seed of the fold shuffle (and of the test draw).
        test_fraction: fraction of subjects held out as test first, when no row is ``test`` yet.
        age_bins: quantile bins of age for the stratification.

    Returns:
        A copy with ``fold`` (nullable Int64; <NA> on test rows) and ``split`` = ``test`` or ``""``;
        ``attrs["split_params"]`` records the parameters (see :func:`write_kfold`).

    Raises:
        ManifestError: fewer subjects than folds outside test, a subject already in two splits.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    if isinstance(n_splits, bool) or int(n_splits) != n_splits or n_splits < 2:
        raise ValueError(f"n_splits must be an int >= 2, got {n_splits!r}")
    n_splits = int(n_splits)
    out = _check(df)
    pre = out[out["split"] != ""].groupby("subject_id")["split"].nunique()
    if (pre > 1).any():
        raise ManifestError(f"subject(s) {pre[pre > 1].index[:5].tolist()} already appear in more than one split")
    if test_fraction > 0 and not (out["split"] == "test").any():
        held = stratified_subject_split(out, val_fraction=0.0, test_fraction=test_fraction, seed=seed,
                                        age_bins=age_bins)
        out["split"] = np.where(held["split"] == "test", "test", "")
    # every non-test row goes into the folds (a pre-assigned train/val is replaced by the fold's role)
    out.loc[out["split"] != "test", "split"] = ""
    pool = out[out["split"] != "test"]
    n_subjects = pool["subject_id"].nunique()
    if n_subjects < n_splits:
        raise ManifestError(f"{n_subjects} subject(s) outside the test split cannot fill {n_splits} folds")
    keys, info = stratification_keys(pool, min_stratum=n_splits, age_bins=age_bins)
    per_label = keys.groupby(_subject_table(pool)["label"]).size()
    thin = per_label[per_label < n_splits]
    if len(thin):
        warnings.warn(f"label(s) {thin.to_dict()} have fewer subjects than folds ({n_splits}): some validation "
                      "folds will lack them", UserWarning, stacklevel=2)
    y = pool["subject_id"].map(keys).to_numpy()
    cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=int(seed))
    fold = np.full(len(pool), -1, dtype=np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # thin classes: reported above in subject terms
        for k, (_, val_idx) in enumerate(cv.split(np.zeros(len(pool)), y, groups=pool["subject_id"].to_numpy())):
            fold[val_idx] = k
    out["fold"] = pd.array([pd.NA] * len(out), dtype="Int64")
    out.loc[pool.index, "fold"] = fold
    per_subject = out.loc[pool.index].groupby("subject_id")["fold"].nunique()
    if (per_subject != 1).any():  # StratifiedGroupKFold guarantees this; a broken guarantee must not pass silently
        raise ManifestError(f"subject(s) {per_subject[per_subject != 1].index[:5].tolist()} span several folds")
    out.attrs["split_params"] = {
        "method": f"subject-level StratifiedGroupKFold on {'+'.join(info['stratified_on'])}",
        "n_splits": n_splits,
        "seed": int(seed),
        "test_fraction": float(test_fraction),
        "age_bins": int(age_bins),
        **info,
    }
    return out


def fold_manifest(df: pd.DataFrame, fold: int) -> pd.DataFrame:
    """The manifest of one fold: ``split = val`` for rows of ``fold``, ``train`` for the other folds, test kept."""
    if "fold" not in df.columns:
        raise ManifestError("manifest has no 'fold' column; run subject_kfold first")
    folds = sorted(int(f) for f in df["fold"].dropna().unique())
    if int(fold) not in folds:
        raise ValueError(f"fold {fold} not in {folds}")
    out = df.copy()
    out.attrs.update(df.attrs)
    in_folds = out["fold"].notna()
    out.loc[in_folds, "split"] = np.where(out.loc[in_folds, "fold"].astype(int) == int(fold), "val", "train")
    assert_no_subject_overlap(out)
    out.attrs["split_params"] = {**df.attrs.get("split_params", {}), "fold": int(fold)}
    return out


def _with_paths(df: pd.DataFrame, folder: Path, paths: str) -> pd.DataFrame:
    if paths == "keep":
        return df
    out = df.copy()
    base = folder.resolve()
    out["image"] = [os.path.relpath(str(p), base) if os.path.isabs(str(p)) else str(p) for p in out["image"]]
    return out


def write_kfold(
    df: pd.DataFrame, out_dir: str | os.PathLike, overwrite: bool = False, paths: str = "keep", **extra
) -> Path:
    """Write a k-fold split (layout in the module docstring); ``split.json`` is written last.

    Args:
        df: output of :func:`subject_kfold`.
        out_dir: ``data_manifests/<dataset>/splits/<name>``.
        overwrite: replace an existing split (otherwise FileExistsError).
        paths: ``keep`` the image paths as they are, or make absolute ones ``relative`` to the folder of each
            written manifest (so the fold manifests one level down still resolve).
        extra: recorded in ``split.json`` ``params`` (e.g. the source manifest name).

    Raises:
        FileExistsError: ``out_dir/split.json`` exists and ``overwrite`` is False.
    """
    out_dir = Path(out_dir)
    if paths not in ("keep", "relative"):
        raise ValueError(f"paths must be 'keep' or 'relative', got {paths!r}")
    if (out_dir / "split.json").exists() and not overwrite:
        raise FileExistsError(f"split already exists: {out_dir / 'split.json'} (pass overwrite=True to replace it)")
    if "fold" not in df.columns:
        raise ManifestError("manifest has no 'fold' column; run subject_kfold first")
    out_dir.mkdir(parents=True, exist_ok=True)
    folds = sorted(int(f) for f in df["fold"].dropna().unique())
    counts = {}
    for k in folds:
        fm = fold_manifest(df, k)
        folder = out_dir / f"fold-{k}"
        write_manifest(_with_paths(fm, folder, paths), folder / "manifest.csv", overwrite=True)
        counts[f"fold-{k}"] = split_counts(fm)
    write_manifest(_with_paths(df, out_dir, paths), out_dir / "manifest.csv", overwrite=True)
    per_fold = df[df["fold"].notna()].groupby("fold")
    info = {
        "params": {**df.attrs.get("split_params", {}), **extra},
        "folds": {
            f"fold-{int(k)}": {
                "subjects": int(g["subject_id"].nunique()),
                "images": int(len(g)),
                "subjects_per_label": {
                    str(lab): int(n) for lab, n in _subject_table(g)["label"].value_counts().sort_index().items()
                },
            }
            for k, g in per_fold
        },
        "test": {
            "subjects": int(df.loc[df["split"] == "test", "subject_id"].nunique()),
            "images": int((df["split"] == "test").sum()),
        },
        "counts": counts,
        "manifest_digest": manifest_digest(df),
        "n_subjects": int(df["subject_id"].nunique()),
    }
    tmp = out_dir / f".split.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(info, indent=2, default=str))
    os.replace(tmp, out_dir / "split.json")
    logger.info("k-fold split written to %s", out_dir)
    return out_dir
