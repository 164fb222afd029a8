"""The data splits of a run as MLflow dataset inputs (``mlflow.data`` from a pandas table).

What reaches MLflow is the dataset's name, its source (a manifest path relative to the repository, or the
data set's folder name), a digest of the table, its schema (column names and types) and its row count. The
rows themselves are never stored by MLflow; the table is made of the manifest columns ``subject_id``,
``session_id``, ``slice_index``, ``label`` and the image path relative to the split's common folder, so the
digest changes when any file, label or subject changes, and no absolute path, no folder above the data set
and no DICOM tag value is involved.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path, PurePath
from typing import Any, Mapping, Sequence

import pandas as pd

from pipelines.tracking import REPO_ROOT

logger = logging.getLogger(__name__)

#: Split keys of the bundles' data dicts -> MLflow dataset context.
CONTEXTS = {"train": "train", "val": "validation", "test": "test"}
_COLUMNS = ("subject_id", "session_id", "slice_index", "label", "image")


def dataset_source(spec: Any) -> str:
    """Source of a data set as logged: a path inside the repository relative to it (``data_manifests/x.csv``),
    else the last path component (``alzheimer-tiny``), else the text itself; ``unknown`` when None."""
    if spec is None or spec == "":
        return "unknown"
    text = str(spec)
    path = Path(text)
    if path.is_absolute() or os.sep in text:
        try:
            return path.resolve().relative_to(REPO_ROOT).as_posix()
        except ValueError:
            return path.name or text
    return text


def dataset_name(spec: Any) -> str:
    """Short data-set name: the source without folders and suffix (``x`` for ``data_manifests/x.csv``)."""
    src = dataset_source(spec)
    return PurePath(src).stem or src


def split_frame(records: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """A table of one split: manifest columns plus the image path relative to the split's common folder."""
    rows = [{k: r.get(k) for k in _COLUMNS if k in r} for r in records]
    df = pd.DataFrame(rows)
    if "image" in df.columns and len(df):
        paths = [str(p) for p in df["image"]]
        try:
            root = os.path.commonpath([os.path.dirname(p) for p in paths])
            df["image"] = [Path(os.path.relpath(p, root)).as_posix() for p in paths]
        except ValueError:  # mixed drives or relative and absolute paths
            df["image"] = [Path(p).name for p in paths]
    for col in ("subject_id", "session_id"):
        if col in df.columns:
            df[col] = df[col].astype(str)
    return df


def split_dataset(records: Sequence[Mapping[str, Any]], name: str, source: str):
    """An ``mlflow.data`` PandasDataset of one split."""
    import warnings

    import mlflow.data

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MLflow warns that a relative source cannot be resolved to a file
        return mlflow.data.from_pandas(split_frame(records), source=source, name=name)


def dataset_input(dataset, context: str):
    """``DatasetInput`` entity of ``dataset`` with its context tag (``train``/``validation``/``test``)."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    return DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])


def log_splits(client, run_id: str, data: Mapping[str, Any], spec: Any, splits: Sequence[str] = ("train", "val", "test"),
               ) -> dict[str, Any]:
    """Log each non-empty split of a bundle data dict as a dataset input of ``run_id``.

    Args:
        client: an ``MlflowClient``.
        run_id: the run.
        data: ``{"train": [...], "val": [...], "test": [...], ...}`` as made by the bundles' data functions.
        spec: the data set as configured (manifest path or dataset folder) for the name and source.
        splits: keys of ``data`` to log.

    Returns:
        ``{split: PandasDataset}`` of the logged splits.
    """
    source, base = dataset_source(spec), dataset_name(spec)
    out, inputs = {}, []
    for split in splits:
        records = data.get(split) or []
        if not records:
            continue
        context = CONTEXTS.get(split, split)
        ds = split_dataset(records, f"{base}-{context}", source)
        out[split] = ds
        inputs.append(dataset_input(ds, context))
    if inputs:
        client.log_inputs(run_id, datasets=inputs)
    return out
