"""Manifest format, builders (class folders, NIfTI + participants) and the subject-level split."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipelines.manifests.builders import NoSubjectIdsWarning, from_class_folders, from_nifti_participants
from pipelines.manifests.schema import ManifestError, manifest_digest, read_manifest, validate_manifest, write_manifest
from pipelines.manifests.split import split_counts, subject_split, write_split
from pipelines.phantoms import alzheimer as ph

CLASSES = ph.CLASS_NAMES


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    return ph.generate_dataset(
        tmp_path_factory.mktemp("ph") / "data", seed=0, class_counts=(8, 6, 4, 3), shape=(40, 48, 36), slices_per_subject=3
    )


def _png(path, value=100):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(path)


def test_class_folder_builder_reads_subject_ids_and_splits(phantom):
    df = from_class_folders(phantom / "slices", class_names=CLASSES)
    assert set(df["split"]) == {"train", "test"}
    assert df["subject_id"].str.match(r"^sub-\d{4}$").all()
    assert (df.groupby("subject_id")["split"].nunique() == 1).all()
    assert df["slice_index"].notna().all()
    assert len(df) == 21 * 3


def test_images_without_subject_ids_become_pseudo_subjects_with_a_warning(tmp_path):
    for i in range(3):
        _png(tmp_path / "A" / f"img{i}.png")
        _png(tmp_path / "B" / f"img{i}.png")
    with pytest.warns(NoSubjectIdsWarning, match="no subject id"):
        df = from_class_folders(tmp_path)
    assert df["subject_id"].nunique() == 6
    assert set(df["label"]) == {"A", "B"}


def test_empty_class_folder_is_an_error_naming_it(tmp_path):
    _png(tmp_path / "A" / "x.png")
    (tmp_path / "B").mkdir()
    with pytest.raises(ManifestError, match=r"class folder .*B holds no images"):
        from_class_folders(tmp_path)


def test_missing_folder_and_unexpected_class_are_errors(tmp_path):
    with pytest.raises(ManifestError, match="not found"):
        from_class_folders(tmp_path / "absent")
    _png(tmp_path / "Zebra" / "x.png")
    with pytest.raises(ManifestError, match="unexpected class folder"):
        from_class_folders(tmp_path, class_names=CLASSES)


def test_validate_reports_missing_columns_files_and_labels(tmp_path):
    df = pd.DataFrame({"subject_id": ["s1"], "image": [str(tmp_path / "nope.png")], "label": ["A"], "split": [""]})
    with pytest.raises(ManifestError, match=r"missing required column\(s\) \['session_id'\]"):
        validate_manifest(df)
    df["session_id"] = "ses-01"
    with pytest.raises(ManifestError, match="do not exist"):
        validate_manifest(df)
    with pytest.raises(ManifestError, match="unknown label"):
        validate_manifest(df, class_names=["B"], check_files=False)


def test_subject_split_is_stratified_and_never_shares_a_subject(phantom):
    df = from_class_folders(phantom / "slices", class_names=CLASSES)
    out = subject_split(df, val_fraction=0.25, seed=0)
    assert (out.groupby("subject_id")["split"].nunique() == 1).all()
    # test subjects come from the test folder and are untouched
    assert (out.loc[df["split"] == "test", "split"] == "test").all()
    counts = split_counts(out)
    # every class with >= 2 training subjects gives at least one to val
    assert set(counts["val"]["subjects_per_label"]) == set(CLASSES)
    again = subject_split(df, val_fraction=0.25, seed=0)
    assert again["split"].tolist() == out["split"].tolist()
    other = subject_split(df, val_fraction=0.25, seed=1)
    assert other["split"].tolist() != out["split"].tolist()


def test_split_without_folders_assigns_test_and_val_by_subject():
    rows = [
        {"subject_id": f"s{i}", "session_id": "ses-01", "image": f"s{i}_{k}.png", "label": "AB"[i % 2], "split": ""}
        for i in range(20)
        for k in range(3)
    ]
    out = subject_split(pd.DataFrame(rows), val_fraction=0.2, test_fraction=0.2, seed=0)
    per_subject = out.groupby("subject_id")["split"].agg(set)
    assert all(len(s) == 1 for s in per_subject)
    n = out.groupby("split")["subject_id"].nunique()
    assert n["test"] == 4 and n["val"] == 4 and n["train"] == 12


def test_write_split_records_parameters_and_refuses_to_overwrite(phantom, tmp_path):
    df = subject_split(from_class_folders(phantom / "slices", class_names=CLASSES), seed=7)
    out = write_split(df, tmp_path / "splits" / "v1")
    info = json.loads((out / "split.json").read_text())
    assert info["params"]["seed"] == 7
    assert info["manifest_digest"] == manifest_digest(df)
    assert info["counts"]["test"]["subjects"] == df.loc[df["split"] == "test", "subject_id"].nunique()
    with pytest.raises(FileExistsError):
        write_split(df, tmp_path / "splits" / "v1")
    back = validate_manifest(read_manifest(out / "manifest.csv"), class_names=CLASSES)
    assert len(back) == len(df)


def test_write_manifest_refuses_to_overwrite(tmp_path):
    df = pd.DataFrame({"subject_id": ["s"], "session_id": ["x"], "image": ["a.png"], "label": ["A"], "split": ["train"]})
    write_manifest(df, tmp_path / "m.csv")
    with pytest.raises(FileExistsError):
        write_manifest(df, tmp_path / "m.csv")


def test_nifti_builder_joins_volumes_and_participants(phantom):
    table = pd.read_csv(phantom / "participants.tsv", sep="\t")
    df = from_nifti_participants(phantom / "volumes", phantom / "participants.tsv", class_names=CLASSES)
    assert len(df) == len(table)
    merged = df.merge(table, on="subject_id")
    assert (merged["label"] == merged["diagnosis"]).all()
    assert df["image"].str.endswith("_T1w.nii.gz").all()


def test_nifti_builder_maps_raw_diagnoses(phantom):
    table = pd.read_csv(phantom / "participants.tsv", sep="\t")
    table["dx"] = table["diagnosis"].map({"NonDemented": "CN"}).fillna("AD")
    df = from_nifti_participants(phantom / "volumes", table, label_column="dx", label_map={"CN": "NonDemented", "AD": "Demented"})
    assert set(df["label"]) == {"NonDemented", "Demented"}
