"""Head-CT data for the ``ct_hemorrhage`` bundle: subject-level splits and the checked data lists.

Two sources are understood (``dataset_dir``), besides a project manifest CSV (``manifest``):

* the **head-CT phantom** (:mod:`pipelines.phantoms.head_ct`): one DICOM series a study and a per-slice
  ``labels.csv`` (``subject_id, session_id, study_id, file, slice_index, label, study_label``); every slice is a
  sample whose pixels are read in Hounsfield units;
* the **pre-windowed PNG set** (Kaggle "Head CT - hemorrhage" layout): ``head_ct/NNN.png`` and ``labels.csv``
  (``id, hemorrhage``). It gives no patient ids, but consecutive ids are often slices of one patient, so
  consecutive ids are grouped into pseudo-subjects of ``group_size`` (default 5) and splits are made per group.

Splits are per subject (all slices of a study stay together), stratified by the study label (for the phantom
the study label, not the per-slice majority, which is "normal" for nearly every study). ``num_folds >= 2`` makes
fold ``fold`` of a stratified k-fold the test split (cross-validation); otherwise ``test_fraction`` of the
subjects is held out. Validation subjects are then drawn from the rest. The checked lists, ``manifest.csv`` and
``split.json`` come from :func:`pipelines.training.data.prepare_data`.

The layers below hold the rest, re-exported here because the bundle configs name them under this module: slice
loading (``LoadCTImage[d]``, ``hu_to_8bit``, ``window_channels``) in :mod:`pipelines.io.ct`, DICOM sniffing
(``is_dicom_file``) in :mod:`pipelines.io.dicom`, the manifests of both sources (``detect_format``,
``dicom_slice_manifest``, ``png_manifest``) in :mod:`pipelines.manifests.builders` and the phantom defaults
(``default_dataset``, ``example_series``) in :mod:`pipelines.phantoms.head_ct`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.io.ct import (
    WINDOW_PRESETS,
    CTInputError,
    LoadCTImage,
    LoadCTImaged,
    hu_to_8bit,
    load_prewindowed_2d,
    window_channels,
)
from pipelines.io.dicom import DICOM_SUFFIXES, is_dicom_file
from pipelines.manifests.builders import detect_format, dicom_slice_manifest, png_manifest
from pipelines.manifests.schema import ManifestError
from pipelines.phantoms.head_ct import default_dataset, example_series

logger = logging.getLogger(__name__)

__all__ = [
    "DICOM_SUFFIXES",
    "WINDOW_PRESETS",
    "CTInputError",
    "LoadCTImage",
    "LoadCTImaged",
    "assign_subject_splits",
    "default_dataset",
    "detect_format",
    "dicom_slice_manifest",
    "example_series",
    "hu_to_8bit",
    "is_dicom_file",
    "load_prewindowed_2d",
    "png_manifest",
    "prepare_ct_data",
    "window_channels",
]

# ------------------------------------------------------------------------------------------------ data lists


def assign_subject_splits(
    df: pd.DataFrame,
    positive: str,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
    num_folds: int = 0,
    fold: int = 0,
) -> pd.DataFrame:
    """Fill ``split`` per subject, stratified by the subject's study label (positive if any of its studies is).

    Within each label the subjects are shuffled with ``seed``; with ``num_folds`` = k >= 2 the subjects at
    positions ``fold, fold + k, ...`` form the test split (so the folds of one seed partition the subjects),
    otherwise the first ``round(n * test_fraction)`` (at least one when ``test_fraction > 0`` and the label has
    >= 3 subjects). ``round(n * val_fraction)`` of the rest (at least one when there are >= 2) go to val.

    Args:
        df: manifest rows with ``subject_id`` and ``study_label``.
        positive: the positive class name.
        val_fraction, test_fraction: fractions of each label's subjects.
        seed: shuffle seed.
        num_folds, fold: k-fold test split (0 = hold-out).

    Returns:
        A copy of ``df`` with ``split`` set on every row.

    Raises:
        ManifestError: fractions out of range or a bad fold.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ManifestError(f"bad split fractions val={val_fraction} test={test_fraction}")
    if num_folds and (int(num_folds) != num_folds or num_folds < 2 or not 0 <= fold < num_folds):
        raise ManifestError(
            f"num_folds must be 0 or an integer >= 2 with 0 <= fold < num_folds; got {num_folds}, {fold}"
        )
    # a subject with a positive study counts as positive: it holds the finding
    subjects = df.groupby("subject_id")["study_label"].agg(lambda s: positive if (s == positive).any() else s.iloc[0])
    subjects = subjects.sort_index()
    order_rng = np.random.default_rng(seed)
    val_rng = np.random.default_rng([seed, int(fold), 1])
    split: dict[str, str] = {}
    for _label, group in subjects.groupby(subjects):
        ids = order_rng.permutation(np.array(sorted(group.index)))
        n = len(ids)
        if num_folds:
            test = {s for i, s in enumerate(ids) if i % num_folds == fold}
        else:
            n_test = int(round(n * test_fraction))
            n_test = max(n_test, 1 if test_fraction > 0 and n >= 3 else 0)
            test = set(ids[:n_test])
        rest = [s for s in ids if s not in test]
        n_val = int(round(n * val_fraction))
        n_val = min(max(n_val, 1 if val_fraction > 0 and len(rest) >= 2 else 0), max(len(rest) - 1, 0))
        val = set(val_rng.permutation(np.array(rest, dtype=object))[:n_val]) if n_val else set()
        for s in ids:
            split[s] = "test" if s in test else "val" if s in val else "train"
    out = df.copy()
    out["split"] = out["subject_id"].map(split)
    return out


def prepare_ct_data(
    class_names: Sequence[str],
    dataset_dir: str | os.PathLike | None = None,
    manifest: str | os.PathLike | None = None,
    output_dir: str | os.PathLike | None = None,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
    num_folds: int = 0,
    fold: int = 0,
    group_size: int = 5,
    max_per_split: int | None = None,
) -> dict:
    """Train/val/test lists for the head-CT bundle (see the module docstring for the sources and splits).

    A ``manifest`` (project format; ``image`` may be a DICOM slice file or a picture) is passed to
    :func:`pipelines.training.data.prepare_data` unchanged. Otherwise the data set in ``dataset_dir`` is turned
    into a manifest, split here, written to ``output_dir/data/source_manifest.csv`` and handed to ``prepare_data``,
    which checks it and writes ``manifest.csv`` and ``split.json`` (whose ``params`` are then replaced by the ones
    used here).

    Args:
        class_names: ``[negative, positive]``.
        dataset_dir: the phantom folder or the PNG set folder.
        manifest: a manifest CSV (takes precedence).
        output_dir: where ``data/`` is written; a temporary folder is used when None.
        val_fraction: fraction of each label's subjects used for validation.
        test_fraction: fraction of each label's subjects held out for test (ignored with ``num_folds``).
        seed: split seed; folds of one seed partition the subjects.
        num_folds: 0 for a hold-out split, k >= 2 for fold ``fold`` of a stratified k-fold as test split.
        fold: test fold, 0 <= fold < num_folds.
        group_size: consecutive PNG ids per pseudo-subject.
        max_per_split: keep at most this many samples a split (stratified; for smoke tests).

    Returns:
        The dict of :func:`prepare_data` (``train``/``val``/``test`` record lists, ``digest``, ``counts``,
        ``manifest``) plus ``format``; records also carry ``subject_id``, ``session_id``, ``slice_index``.

    Raises:
        ManifestError: no source, bad layout, bad fractions/folds, missing files, an empty train or val split.
    """
    from pipelines.training.data import prepare_data

    common = {"class_names": class_names, "seed": seed, "max_per_split": max_per_split}
    if manifest:
        data = prepare_data(manifest=manifest, output_dir=output_dir, val_fraction=val_fraction,
                            test_fraction=test_fraction, **common)
        data["format"] = "manifest"
        return data
    if not dataset_dir:
        raise ManifestError("no data: set dataset_dir (the head-CT phantom or the PNG set) or manifest (a CSV)")
    fmt = detect_format(dataset_dir)
    df = dicom_slice_manifest(dataset_dir, class_names) if fmt == "phantom_dicom" else \
        png_manifest(dataset_dir, class_names, group_size)
    df = assign_subject_splits(df, str(class_names[1]), val_fraction, test_fraction, seed, int(num_folds or 0),
                               int(fold))
    params = {
        "method": "subject-level, stratified by study label" + (f", {num_folds}-fold" if num_folds else ", hold-out"),
        "format": fmt, "val_fraction": val_fraction, "test_fraction": None if num_folds else test_fraction,
        "num_folds": int(num_folds or 0), "fold": int(fold) if num_folds else None, "seed": seed,
        "group_size": int(group_size) if fmt == "png_labels" else None, "source": Path(dataset_dir).name,
    }
    tmp = None
    if output_dir is None:
        tmp = tempfile.mkdtemp(prefix="ct-data-")
        data_dir = Path(tmp)
    else:
        data_dir = Path(output_dir) / "data"
        data_dir.mkdir(parents=True, exist_ok=True)
    try:
        source = data_dir / "source_manifest.csv"
        df.to_csv(source, index=False)
        # every row carries its split already: prepare_data must not move subjects (zero fractions)
        data = prepare_data(manifest=source, output_dir=output_dir, val_fraction=0.0, test_fraction=0.0, **common)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if output_dir is not None:
        split_json = data_dir / "split.json"
        info = json.loads(split_json.read_text())
        info["params"] = params
        partial = data_dir / f".split.json.tmp-{os.getpid()}"
        partial.write_text(json.dumps(info, indent=2))
        os.replace(partial, split_json)
    data["format"] = fmt
    return data
