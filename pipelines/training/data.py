"""Data lists for the bundles: resolve ``dataset_dir`` / ``manifest`` into checked train/val/test lists.

Everything that can be checked before training starts is checked here (called from the bundle's
``initialize`` stage), so a bad path or a bad manifest fails before any MLflow run is opened.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from pipelines.manifests.builders import from_class_folders
from pipelines.manifests.schema import ManifestError, manifest_digest, read_manifest, resolve_paths, validate_manifest
from pipelines.manifests.split import split_counts, subject_split, write_split

logger = logging.getLogger(__name__)
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def _find_class_tree(dataset_dir: Path) -> Path:
    """The phantom keeps its Kaggle-style tree under ``slices/``; a user's tree is the folder itself."""
    if (dataset_dir / "slices").is_dir() and (dataset_dir / "participants.tsv").is_file():
        return dataset_dir / "slices"
    return dataset_dir


def _records(df: pd.DataFrame, class_names: Sequence[str]) -> list[dict]:
    index = {c: i for i, c in enumerate(class_names)}
    recs = []
    for row in df.itertuples(index=False):
        rec = {
            "image": row.image,
            "label": index[row.label],
            "subject_id": row.subject_id,
            "session_id": row.session_id,
        }
        si = getattr(row, "slice_index", None)
        rec["slice_index"] = int(si) if si is not None and not pd.isna(si) else -1
        recs.append(rec)
    return recs


def prepare_data(
    class_names: Sequence[str],
    dataset_dir: str | os.PathLike | None = None,
    manifest: str | os.PathLike | None = None,
    output_dir: str | os.PathLike | None = None,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
    check_images: bool = True,
    max_per_split: int | None = None,
    group_duplicates: str | None = None,
    duplicate_side: str = "train",
) -> dict:
    """Build the train/val/test data lists.

    Exactly one source is used: ``manifest`` (a CSV in the project format) if given, else ``dataset_dir``
    (a Kaggle-style class-folder tree, or the phantom folder). Subjects without a split are split per
    subject, stratified by label, with ``seed``. The resulting manifest and its ``split.json`` are written
    to ``output_dir/data`` so every run records exactly what it used.

    Args:
        class_names: the bundle's classes, in output-channel order.
        dataset_dir: class-folder tree.
        manifest: manifest CSV (takes precedence over ``dataset_dir``).
        output_dir: where the resolved manifest is written (skipped when None).
        val_fraction, test_fraction: subject fractions for splits that are not given.
        seed: split seed.
        check_images: decode every 2D image up front, so an unreadable file fails before training, named.
        max_per_split: keep at most this many rows per split (stratified, deterministic; for smoke tests).
        group_duplicates: ``"near"`` or ``"exact"``: keep duplicate images of one kind on one side of every
            split (see :func:`group_duplicate_images`); None: no duplicate check.
        duplicate_side: split given to duplicate groups that span pre-assigned splits (``train`` or ``test``).

    Returns:
        ``{"train": [...], "val": [...], "test": [...], "digest": str, "counts": dict, "manifest": DataFrame}``;
        each list item is ``{"image", "label" (int), "subject_id", "session_id", "slice_index"}``.

    Raises:
        ManifestError: missing folder/manifest, empty class folders, unknown labels, missing files, a split
            without any data, or a subject in two splits.
    """
    if manifest:
        df = resolve_paths(read_manifest(manifest))
        source = f"manifest {manifest}"
    elif dataset_dir:
        root = Path(dataset_dir)
        if not root.is_dir():
            raise ManifestError(f"dataset_dir not found or not a folder: {root}")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            df = from_class_folders(_find_class_tree(root), class_names=class_names)
        for w in caught:
            logger.warning("%s", w.message)
        source = f"dataset_dir {root}"
    else:
        raise ManifestError("no data: set dataset_dir (a class-folder tree) or manifest (a CSV)")
    df = validate_manifest(df, class_names=class_names, check_files=True)
    if group_duplicates:
        df = group_duplicate_images(df, kind=group_duplicates, side=duplicate_side)
    df = subject_split(df, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    overlap = df.groupby("subject_id")["split"].nunique()
    if (overlap > 1).any():
        raise ManifestError(f"{source}: subject(s) {overlap[overlap > 1].index[:5].tolist()} appear in several splits")
    if max_per_split:
        parts = []
        for _split, g in df.groupby("split", sort=False):
            if len(g) > max_per_split:
                g = g.groupby("label", group_keys=False).apply(
                    lambda x: x.sample(n=max(1, int(round(max_per_split * len(x) / len(g)))), random_state=seed)
                    if len(x) > 1 else x
                )
            parts.append(g)
        df = pd.concat(parts)
    for split in ("train", "val"):
        if not (df["split"] == split).any():
            raise ManifestError(f"{source}: the {split} split is empty (too few subjects for the fractions?)")
    if check_images:
        from pipelines.io.images import load_grey_2d

        # decode every 2D image now: a corrupt file fails here, naming it, before any run is opened
        for path in df.loc[df["image"].str.lower().str.endswith(_IMAGE_SUFFIXES), "image"].unique():
            load_grey_2d(path)
    if output_dir is not None:
        extra = {"group_duplicates": group_duplicates, "duplicate_side": duplicate_side} if group_duplicates else {}
        write_split(df, Path(output_dir) / "data", overwrite=True, source=Path(str(manifest or dataset_dir)).name,
                    **extra)
    counts = split_counts(df)
    for split, c in counts.items():
        logger.info("%s: %d images, %d subjects, %s", split or "(none)", c["images"], c["subjects"], c["images_per_label"])
    out = {s: _records(df[df["split"] == s], class_names) for s in ("train", "val", "test")}
    out.update({"digest": manifest_digest(df), "counts": counts, "manifest": df})
    return out


def group_duplicate_images(df: pd.DataFrame, kind: str = "near", side: str = "train",
                           max_distance: int = 4) -> pd.DataFrame:
    """Keep duplicate images on one side of the split: subjects linked by a duplicate image become one subject.

    Subjects sharing an exact (``kind="exact"``) or near (pHash, ``kind="near"``) duplicate image are merged
    with :func:`pipelines.manifests.audit.pseudo_subjects`, so the subject-level split keeps them together. A
    merged subject whose rows carry different pre-assigned splits (e.g. the Training and Testing folders of a
    Kaggle tree) is moved wholly to ``side``, which is logged.

    Args:
        df: manifest with ``subject_id``, ``image`` (absolute paths) and ``split``.
        kind: ``"near"`` or ``"exact"``.
        side: ``"train"`` (the group joins the train/val pool) or ``"test"``.
        max_distance: pHash Hamming distance (of 64 bits) for near duplicates.

    Returns:
        A copy with merged ``subject_id`` (originals in ``orig_subject_id``) and the moved rows' ``split``.

    Raises:
        ValueError: unknown ``kind`` or ``side``.
    """
    from pipelines.manifests.audit import pseudo_subjects

    if kind not in ("near", "exact"):
        raise ValueError(f"group_duplicates must be 'near', 'exact' or None, got {kind!r}")
    if side not in ("train", "test"):
        raise ValueError(f"duplicate_side must be 'train' or 'test', got {side!r}")
    column = f"{kind}_group"
    out = pseudo_subjects(df, groups_col=column, max_distance=max_distance)
    out.attrs.update(df.attrs)
    split = out["split"].fillna("").astype(str)
    spans = out[split != ""].assign(split=split[split != ""]).groupby("subject_id")["split"].nunique()
    crossing = spans.index[spans > 1]
    moved = out["subject_id"].isin(crossing) & (split != side)
    merged = int((out["subject_id"] != out["orig_subject_id"]).sum())
    logger.info("%s duplicates: %d images in %d merged subjects", kind, merged,
                out.loc[out["subject_id"] != out["orig_subject_id"], "subject_id"].nunique())
    if len(crossing):
        logger.warning("%d %s-duplicate group(s) spanned several splits: %d image(s) moved to %s", len(crossing),
                       kind, int(moved.sum()), side)
    out.loc[out["subject_id"].isin(crossing), "split"] = side
    return out.drop(columns=[column])


def make_sampler(records: Sequence[dict], balanced: bool, seed: int = 0, num_samples: int | None = None):
    """A class-balanced ``WeightedRandomSampler`` (each class drawn equally often), or None."""
    if not balanced:
        return None
    labels = np.array([r["label"] for r in records])
    counts = np.bincount(labels)
    weights = 1.0 / counts[labels]
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.WeightedRandomSampler(
        torch.as_tensor(weights, dtype=torch.double), num_samples or len(records), replacement=True, generator=g
    )
