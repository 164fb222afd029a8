"""Subject-level stratified splits, written with their parameters and seed, never silently overwritten."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.io.atomic import atomic_write
from pipelines.manifests.schema import ManifestError, manifest_digest, write_manifest

logger = logging.getLogger(__name__)


def _subject_labels(df: pd.DataFrame) -> pd.Series:
    """One label per subject: the most frequent label of its rows (ties: first in sort order)."""
    return df.groupby("subject_id")["label"].agg(lambda s: s.value_counts().sort_index().idxmax())


def _stratified_pick(subjects: pd.Series, fraction: float, rng: np.random.Generator) -> set[str]:
    """Pick about ``fraction`` of the subjects of each label (at least one when a label has >= 2)."""
    picked: set[str] = set()
    for _label, group in subjects.groupby(subjects):
        ids = np.array(sorted(group.index))
        n = int(round(len(ids) * fraction))
        if fraction > 0 and n == 0 and len(ids) >= 2:
            n = 1
        n = min(n, len(ids) - 1) if len(ids) > 1 else 0
        picked.update(rng.permutation(ids)[:n].tolist())
    return picked


def subject_split(
    df: pd.DataFrame, val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0
) -> pd.DataFrame:
    """Assign ``split`` per subject, stratified by the subject's label.

    Rows that already have a split keep it (e.g. the test folder of a Kaggle tree); the remaining
    subjects are divided into test (``test_fraction`` of all subjects, only when no row is ``test`` yet)
    and val (``val_fraction``, only when no row is ``val`` yet), the rest train. A subject never lands in two
    splits, so a manifest split before (train/val/test) comes back unchanged.

    Raises:
        ManifestError: a subject already spans two splits, or fractions out of range.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ManifestError(f"bad split fractions val={val_fraction} test={test_fraction}")
    out = df.copy()
    out.attrs.update(df.attrs)
    out["split"] = out["split"].fillna("").astype(str)
    pre = out[out["split"] != ""].groupby("subject_id")["split"].nunique()
    if (pre > 1).any():
        bad = pre[pre > 1].index[:5].tolist()
        raise ManifestError(f"subject(s) {bad} already appear in more than one split")
    rng = np.random.default_rng(seed)
    free = out[out["split"] == ""]
    subjects = _subject_labels(free) if len(free) else pd.Series(dtype=str)
    assigned: dict[str, str] = {}
    if len(subjects) and test_fraction > 0 and not (out["split"] == "test").any():
        for s in _stratified_pick(subjects, test_fraction, rng):
            assigned[s] = "test"
        subjects = subjects.drop(list(assigned))
    # val is taken from subjects without a split plus those pre-assigned to train, unless a val split is given
    has_val = bool((out["split"] == "val").any())
    train_pre = out[out["split"] == "train"]
    pool = pd.concat([subjects, _subject_labels(train_pre)]) if len(train_pre) and not has_val else subjects
    pool = pool[~pool.index.duplicated()]
    n_total = out["subject_id"].nunique()
    frac = min(0.9, val_fraction * n_total / max(len(pool), 1)) if len(pool) else 0.0
    if val_fraction > 0 and len(pool) and not has_val:
        for s in _stratified_pick(pool, frac, rng):
            assigned[s] = "val"
    for s in pool.index:
        assigned.setdefault(s, "train")
    mask = out["subject_id"].isin(assigned) & ((out["split"] == "") | (out["split"] == "train"))
    out.loc[mask, "split"] = out.loc[mask, "subject_id"].map(assigned)
    out.attrs["split_params"] = {"val_fraction": val_fraction, "test_fraction": test_fraction, "seed": seed,
                                 "method": "subject-level, stratified by label"}
    return out


def split_counts(df: pd.DataFrame) -> dict:
    """Images and subjects per split and label."""
    counts = {}
    for split, g in df.groupby("split"):
        counts[split] = {
            "images": int(len(g)),
            "subjects": int(g["subject_id"].nunique()),
            "images_per_label": {k: int(v) for k, v in g["label"].value_counts().sort_index().items()},
            "subjects_per_label": {k: int(v) for k, v in _subject_labels(g).value_counts().sort_index().items()},
        }
    return counts


def write_split(df: pd.DataFrame, out_dir: str | os.PathLike, overwrite: bool = False, **extra) -> Path:
    """Write ``manifest.csv`` and ``split.json`` (parameters, seed, counts, digest) into ``out_dir``.

    Refuses to overwrite an existing split unless ``overwrite=True``.
    """
    out_dir = Path(out_dir)
    if (out_dir / "split.json").exists() and not overwrite:
        raise FileExistsError(f"split already exists: {out_dir / 'split.json'} (pass overwrite=True to replace it)")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_manifest(df, out_dir / "manifest.csv", overwrite=True)
    info = {
        "params": {**df.attrs.get("split_params", {}), **extra},
        "counts": split_counts(df),
        "manifest_digest": manifest_digest(df),
        "n_subjects": int(df["subject_id"].nunique()),
    }
    atomic_write(out_dir / "split.json", lambda tmp: tmp.write_text(json.dumps(info, indent=2)))
    return out_dir
