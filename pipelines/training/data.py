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
    df = subject_split(df, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    if "augmented" in df.columns:
        from pipelines.restoration.augment import check_augmented_manifest

        check_augmented_manifest(df)  # augmented images may only ever be training images
    overlap = df.groupby("subject_id")["split"].nunique()
    if (overlap > 1).any():
        raise ManifestError(f"{source}: subject(s) {overlap[overlap > 1].index[:5].tolist()} appear in several splits")
    if max_per_split:
        parts = []
        for _split, g in df.groupby("split", sort=False):
            if len(g) <= max_per_split:
                parts.append(g)
                continue
            for _label, gl in g.groupby("label", sort=True):
                n = max(1, int(round(max_per_split * len(gl) / len(g))))
                parts.append(gl.sample(n=min(n, len(gl)), random_state=seed))
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
        write_split(df, Path(output_dir) / "data", overwrite=True, source=Path(str(manifest or dataset_dir)).name)
    counts = split_counts(df)
    for split, c in counts.items():
        logger.info("%s: %d images, %d subjects, %s", split or "(none)", c["images"], c["subjects"], c["images_per_label"])
    out = {s: _records(df[df["split"] == s], class_names) for s in ("train", "val", "test")}
    out.update({"digest": manifest_digest(df), "counts": counts, "manifest": df})
    return out


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
