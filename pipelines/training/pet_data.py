"""PET data for the ``amyloid_pet`` bundle: subject-level k-fold splits and the checked data lists.

A PET data set here is a folder of DICOM series plus a participants table, the layout that
:func:`pipelines.phantoms.amyloid_pet.make_amyloid_dataset` writes::

    <root>/participants.csv                     subject_id, session_id, diagnosis (class name) [, series_dir]
    <root>/sub-001/ses-01/pet/IM0001.dcm ...    one series a row (``series_dir`` relative to <root>;
                                                default ``<subject_id>/<session_id>/pet``)

:func:`pipelines.manifests.builders.build_pet_manifest` reads every series header once and stores the body-weight
SUV factor of the series (:func:`pipelines.io.suv.series_suv_factor`, QIBA) in a ``suv_factor`` column, so the
transform chain only multiplies (``transforms.pet.SUVScaled`` reads ``suv_factor`` from the sample). Nothing in the
manifest is taken from a voxel: the factor comes from the header of the series alone.

:func:`kfold_split` assigns ``test`` to one fold of a subject-level ``StratifiedGroupKFold`` (a subject is never
in two folds) and carves ``val`` out of the remaining subjects; :func:`prepare_pet_data` is what the
``amyloid_pet`` bundle calls from its config.

``build_pet_manifest``, ``CLASS_NAMES`` (:mod:`pipelines.manifests.builders`) and the phantom defaults
``default_dataset``, ``example_series`` (:mod:`pipelines.phantoms.amyloid_pet`) are re-exported here because the
bundle configs and docs name them under this module.
"""

from __future__ import annotations

import argparse
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.io.dicom import DicomSeriesError, find_series
from pipelines.io.suv import SUVError, series_suv_factor
from pipelines.manifests.builders import PET_CLASS_NAMES as CLASS_NAMES
from pipelines.manifests.builders import build_pet_manifest
from pipelines.manifests.schema import ManifestError, manifest_digest, read_manifest, resolve_paths, validate_manifest
from pipelines.manifests.split import split_counts, write_split
from pipelines.phantoms.amyloid_pet import GENERATOR_VERSION as PHANTOM_VERSION
from pipelines.phantoms.amyloid_pet import default_dataset, example_series

__all__ = [
    "CLASS_NAMES",
    "PHANTOM_VERSION",
    "build_pet_manifest",
    "default_dataset",
    "example_series",
    "kfold_split",
    "prepare_pet_data",
    "reject_2d_image",
]

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ inference


def reject_2d_image(data: dict) -> dict:
    """``image_transform`` of the amyloid PET predictor: 2D images carry no SUV/SUVR scale, so they are refused.

    Raises:
        ValueError (``pipelines.inference.predict.InputError``): always, naming the file.
    """
    from pipelines.inference.predict import InputError

    raise InputError(
        f"{data.get('image')}: 2D images are not supported by the amyloid PET bundle (no quantitative scale); "
        "give a PET DICOM series folder or a NIfTI volume"
    )


# ---------------------------------------------------------------------------------------------------- splits


def kfold_split(
    df: pd.DataFrame, fold: int = 0, num_folds: int = 5, seed: int = 0, val_fraction: float = 0.15
) -> pd.DataFrame:
    """Assign ``split`` by subject: fold ``fold`` of ``num_folds`` is ``test``, ``val`` is drawn from the rest.

    The folds are :func:`pipelines.manifests.kfold.subject_kfold` (scikit-learn ``StratifiedGroupKFold`` with
    ``groups = subject_id``, ``shuffle=True, random_state=seed``; stratified on label, plus age bin and sex when
    the manifest has them), so every subject is in exactly one test fold across ``fold = 0 .. num_folds - 1``:
    the test predictions of the k runs together cover every subject once (out-of-fold evaluation, no subject
    used for both checkpoint selection and testing). ``val`` is ``val_fraction`` of the remaining subjects
    (:func:`pipelines.manifests.kfold.stratified_subject_split`, same ``seed``); the others are ``train``.
    Existing ``split`` values are replaced.

    Args:
        df: manifest (``subject_id``, ``label`` ...).
        fold: test fold, ``0 <= fold < num_folds``.
        num_folds: number of folds, ``2 <= num_folds <= number of subjects``.
        seed: fold and validation seed.
        val_fraction: fraction of the non-test subjects used for validation, in [0, 1).

    Returns:
        A copy (same row order and index) with ``split`` and ``fold`` set and ``attrs["split_params"]``
        recording method, fold, folds, seed and fraction.

    Raises:
        ManifestError: bad ``fold``/``num_folds``/``val_fraction``, fewer subjects than folds.
        LeakageError: a subject in two splits (cannot happen unless the fold assignment is broken).
    """
    from pipelines.manifests.audit import assert_no_subject_overlap
    from pipelines.manifests.kfold import stratified_subject_split, subject_kfold

    if isinstance(num_folds, bool) or int(num_folds) != num_folds or num_folds < 2:
        raise ManifestError(f"num_folds must be an integer >= 2, got {num_folds!r}")
    if isinstance(fold, bool) or int(fold) != fold or not 0 <= fold < num_folds:
        raise ManifestError(f"fold must be an integer in [0, {int(num_folds) - 1}], got {fold!r}")
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ManifestError(f"val_fraction must be in [0, 1), got {val_fraction}")
    folded = subject_kfold(df.assign(split=""), n_splits=int(num_folds), seed=int(seed), test_fraction=0.0)
    is_test = (folded["fold"] == int(fold)).to_numpy(dtype=bool)
    split = np.where(is_test, "test", "").astype(object)
    rest = stratified_subject_split(folded[~is_test].assign(split=""), val_fraction=float(val_fraction),
                                    test_fraction=0.0, seed=int(seed))
    split[~is_test] = rest["split"].to_numpy()
    out = df.copy()
    out.attrs.update(df.attrs)
    out["split"] = split
    out["fold"] = folded["fold"].to_numpy()
    assert_no_subject_overlap(out)
    out.attrs["split_params"] = {
        "method": "k-fold by subject: test = fold (pipelines.manifests.kfold.subject_kfold, StratifiedGroupKFold), "
                  "val = stratified subject split of the other folds",
        "fold": int(fold),
        "num_folds": int(num_folds),
        "seed": int(seed),
        "val_fraction": float(val_fraction),
        "stratified_on": folded.attrs.get("split_params", {}).get("stratified_on"),
    }
    return out


# ------------------------------------------------------------------------------------------------ data lists


def _records(df: pd.DataFrame, class_names: Sequence[str]) -> list[dict]:
    index = {c: i for i, c in enumerate(class_names)}
    return [
        {
            "image": row.image,
            "label": index[row.label],
            "subject_id": row.subject_id,
            "session_id": row.session_id,
            "suv_factor": float(row.suv_factor),
        }
        for row in df.itertuples(index=False)
    ]


def prepare_pet_data(
    class_names: Sequence[str] = CLASS_NAMES,
    dataset_dir: str | os.PathLike | None = None,
    manifest: str | os.PathLike | None = None,
    output_dir: str | os.PathLike | None = None,
    fold: int = 0,
    num_folds: int = 5,
    val_fraction: float = 0.15,
    seed: int = 0,
) -> dict:
    """Train/val/test data lists of PET series for one k-fold split, checked before training starts.

    Exactly one source is used: ``manifest`` (a CSV made by :func:`build_pet_manifest`, or by hand with at least
    the project columns; a missing ``suv_factor`` column is computed from the series headers) if given, else
    ``dataset_dir`` (a PET series tree with a participants table). The split is :func:`kfold_split`; the
    manifest with its splits and ``split.json`` go to ``output_dir/data`` so every run records what it used.

    Args:
        class_names: the bundle's classes, in output-channel order.
        dataset_dir: PET series tree (see the module docstring).
        manifest: manifest CSV (takes precedence over ``dataset_dir``).
        output_dir: where the resolved manifest is written (skipped when None).
        fold, num_folds, val_fraction, seed: see :func:`kfold_split`.

    Returns:
        ``{"train", "val", "test": [...], "digest": str, "counts": dict, "manifest": DataFrame}``; list items are
        ``{"image": series folder, "label": int, "subject_id", "session_id", "suv_factor": float}``.

    Raises:
        ManifestError: no source, unreadable table, missing series, an SUV factor that cannot be computed,
            bad split parameters, or an empty train or val split.
    """
    if manifest:
        df = resolve_paths(read_manifest(manifest))
        if "suv_factor" not in df.columns or df["suv_factor"].isna().any():
            factors = []
            for folder, given in zip(df["image"], df.get("suv_factor", pd.Series([np.nan] * len(df)))):
                if pd.notna(given):
                    factors.append(float(given))
                    continue
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        factors.append(series_suv_factor(next(iter(find_series(folder).values()))).factor)
                except (DicomSeriesError, SUVError) as e:
                    raise ManifestError(f"manifest {manifest}: {e}") from e
            df["suv_factor"] = factors
        df = validate_manifest(df, class_names=class_names, check_files=True)
        source = f"manifest {manifest}"
    elif dataset_dir:
        df = build_pet_manifest(dataset_dir, class_names)
        source = f"dataset_dir {dataset_dir}"
    else:
        raise ManifestError("no data: set dataset_dir (a PET DICOM series tree) or manifest (a CSV)")
    bad = ~np.isfinite(df["suv_factor"].astype(float)) | (df["suv_factor"].astype(float) <= 0)
    if bad.any():
        raise ManifestError(f"{source}: suv_factor must be finite and > 0; bad in {df.loc[bad, 'image'].iloc[0]}")
    df = kfold_split(df, fold=fold, num_folds=num_folds, seed=seed, val_fraction=val_fraction)
    for split in ("train", "val"):
        if not (df["split"] == split).any():
            raise ManifestError(f"{source}: the {split} split of fold {fold} is empty (too few subjects?)")
    if output_dir is not None:
        name = Path(str(manifest or dataset_dir)).name
        write_split(df, Path(output_dir) / "data", overwrite=True, source=name)
    counts = split_counts(df)
    for split, c in counts.items():
        logger.info("%s: %d series, %d subjects, %s", split, c["images"], c["subjects"], c["images_per_label"])
    out = {s: _records(df[df["split"] == s], class_names) for s in ("train", "val", "test")}
    out.update({"digest": manifest_digest(df), "counts": counts, "manifest": df})
    return out


# ----------------------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipelines.training.pet_data DATASET_DIR OUT.csv [--fold F --num_folds K --seed S]``."""
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.training.pet_data",
        description="Build a PET manifest (one row per DICOM series, with its QIBA SUVbw factor).",
    )
    parser.add_argument("dataset_dir", help="series tree with participants.csv (use 'phantom' for the default)")
    parser.add_argument("out_csv", help="manifest CSV to write (refuses to overwrite)")
    parser.add_argument("--classes", nargs="+", default=list(CLASS_NAMES))
    parser.add_argument("--num_folds", type=int, default=0, help="also assign a k-fold split (0: leave split empty)")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--val_fraction", type=float, default=0.15)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    root = default_dataset() if args.dataset_dir == "phantom" else args.dataset_dir
    df = build_pet_manifest(root, args.classes)
    if args.num_folds:
        df = kfold_split(df, fold=args.fold, num_folds=args.num_folds, seed=args.seed, val_fraction=args.val_fraction)
    from pipelines.manifests.schema import write_manifest

    path = write_manifest(df, args.out_csv)
    print(f"{path}: {len(df)} series, {df['subject_id'].nunique()} subjects, "
          f"suv_factor {df['suv_factor'].min():.4g} .. {df['suv_factor'].max():.4g} g/Bq")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
