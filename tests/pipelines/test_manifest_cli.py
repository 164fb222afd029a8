"""``python -m pipelines manifest {build,split,audit}`` (pipelines.manifests.cli), run in-process."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipelines.cli import main
from pipelines.manifests.audit import subject_overlap
from pipelines.manifests.schema import read_manifest, resolve_paths
from tests.conftest import shared_dataset
from tests.pipelines.test_dicom_builder import ALICE, BOB, _write_series

pytestmark = pytest.mark.filterwarnings("ignore:.*skipped .* non-DICOM file:UserWarning")


def _smooth(seed: int, size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.asarray(Image.fromarray(rng.integers(0, 256, (6, 6), dtype=np.uint8)).resize((size, size),
                                                                                          Image.Resampling.BICUBIC))


@pytest.fixture
def class_tree(tmp_path: Path) -> Path:
    """train/{A,B}, test/{A,B}; 12 subjects x 2 slices; test/A/sub-099 is a re-save of train/A/sub-001 slice 1."""
    root = tmp_path / "kaggle"
    k = 0
    for split, subjects in (("train", range(1, 9)), ("test", range(9, 13))):
        for s in subjects:
            label = "A" if s % 2 else "B"
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for sl in (1, 2):
                k += 1
                Image.fromarray(_smooth(k)).save(folder / f"sub-{s:03d}_ses-01_slice-{sl:03d}.png")
    dup = np.asarray(Image.open(root / "train" / "A" / "sub-001_ses-01_slice-001.png"))
    Image.fromarray(dup).save(root / "test" / "A" / "sub-099_ses-01_slice-001.png")
    return root


@pytest.fixture
def nifti_tree(tmp_path: Path) -> Path:
    """BIDS-like volumes of 12 subjects + participants.tsv (diagnosis, age, sex, a fixed test split)."""
    root = tmp_path / "adni"
    rows = []
    for s in range(1, 13):
        sid = f"sub-{s:02d}"
        folder = root / "volumes" / sid / "ses-01" / "anat"
        folder.mkdir(parents=True)
        nib.save(nib.Nifti1Image(np.full((4, 4, 4), s, dtype=np.uint8), np.eye(4)), folder / f"{sid}_ses-01_T1w.nii.gz")
        rows.append({"participant_id": sid, "session": "ses-01", "DX": "AD" if s % 3 == 0 else "CN",
                     "AGE": 60 + s, "PTGENDER": "F" if s % 2 else "M", "split": "test" if s > 10 else ""})
    pd.DataFrame(rows).to_csv(root / "clinical.tsv", sep="\t", index=False)
    return root


def _run(*args: str) -> int:
    return main(["manifest", *args])


def test_build_class_folders_writes_relative_paths_that_resolve(class_tree, tmp_path, capsys):
    out = tmp_path / "manifests" / "kaggle" / "manifest.csv"
    assert _run("build", "--kind", "class-folders", "--root", str(class_tree), "--out", str(out),
                "--paths", "relative") == 0
    df = read_manifest(out)
    assert len(df) == 25 and df["subject_id"].nunique() == 13
    assert not any(os.path.isabs(p) for p in df["image"])
    assert all(Path(p).is_file() for p in resolve_paths(df)["image"])
    assert "25 rows, 13 subjects" in capsys.readouterr().out


def test_build_refuses_to_overwrite_an_existing_manifest(class_tree, tmp_path, capsys):
    out = tmp_path / "m.csv"
    out.write_text("keep me")
    assert _run("build", "--kind", "class-folders", "--root", str(class_tree), "--out", str(out)) == 1
    assert "exists" in capsys.readouterr().err
    assert out.read_text() == "keep me"


def test_build_nifti_with_clinical_columns_maps_labels_and_keeps_age_sex_split(nifti_tree, tmp_path):
    out = tmp_path / "adni.csv"
    assert _run("build", "--kind", "nifti", "--root", str(nifti_tree / "volumes"), "--participants",
                str(nifti_tree / "clinical.tsv"), "--label-column", "DX", "--label-map", "CN=NonDemented,AD=Demented",
                "--age-column", "AGE", "--sex-column", "PTGENDER", "--out", str(out)) == 0
    df = read_manifest(out).set_index("subject_id")
    assert df.loc["sub-03", "label"] == "Demented" and df.loc["sub-04", "label"] == "NonDemented"
    assert df.loc["sub-03", "age"] == 63 and df.loc["sub-03", "sex"] == "F"
    assert df.loc["sub-11", "split"] == "test" and pd.isna(df.loc["sub-01", "split"])


def test_build_nifti_on_real_ixi_volumes_reads_age_and_sex():
    root = shared_dataset("mri_t1_ixi_nifti_small")
    from pipelines.manifests.cli import build_manifest

    df = build_manifest("nifti", root, participants=root / "participants.csv", subject_column="MRID",
                        label_column="IsCN", label_map={"1": "CN"}).set_index("subject_id")
    assert sorted(df.index) == ["IXI012-HH-1211", "IXI015-HH-1258"]
    assert df.loc["IXI012-HH-1211", "age"] == "38.78" and df.loc["IXI015-HH-1258", "sex"] == "M"
    assert set(df["label"]) == {"CN"}
    assert df.loc["IXI012-HH-1211", "image"].endswith("IXI012-HH-1211_T1.nii.gz")


def test_build_dicom_from_labels_table(tmp_path):
    root = tmp_path / "dicom"
    _write_series(root / "p1" / "s1" / "t1", ALICE, ("1.2.3.1", "20200101"), "T1")
    _write_series(root / "p2" / "s1" / "t1", BOB, ("1.2.3.2", "20200101"), "T1")
    labels = tmp_path / "labels.csv"
    pd.DataFrame({"subject": ["p1", "p2"], "label": ["AD", "CN"]}).to_csv(labels, index=False)
    out = tmp_path / "dicom.csv"
    assert _run("build", "--kind", "dicom", "--root", str(root), "--labels", str(labels), "--out", str(out)) == 0
    df = read_manifest(out)
    assert sorted(zip(df["subject_id"], df["label"])) == [("p1", "AD"), ("p2", "CN")]
    assert "Doe" not in out.read_text()


def test_build_dicom_patient_id_hash_reads_the_salt_from_the_environment(tmp_path, monkeypatch, capsys):
    root = tmp_path / "dicom"
    _write_series(root / "p1" / "t1", ALICE, ("1.2.3.1", "20200101"), "T1")
    labels = tmp_path / "labels.csv"
    pd.DataFrame({"patient_id": [ALICE[1]], "label": ["AD"]}).to_csv(labels, index=False)
    args = ("build", "--kind", "dicom", "--root", str(root), "--labels", str(labels), "--out", str(tmp_path / "h.csv"),
            "--subject-from", "patient-id-hash")
    monkeypatch.delenv("NEURO_MONAI_SUBJECT_SALT", raising=False)
    assert _run(*args) == 1
    assert "NEURO_MONAI_SUBJECT_SALT" in capsys.readouterr().err
    monkeypatch.setenv("NEURO_MONAI_SUBJECT_SALT", "a-long-secret-salt")
    assert _run(*args) == 0
    subject = read_manifest(tmp_path / "h.csv")["subject_id"].iloc[0]
    assert subject.startswith("sub-") and len(subject) == 20 and ALICE[1] not in subject


def test_split_holdout_writes_split_json_and_never_overwrites(nifti_tree, tmp_path, capsys):
    manifest = tmp_path / "ds" / "manifest.csv"
    _run("build", "--kind", "nifti", "--root", str(nifti_tree / "volumes"), "--participants",
         str(nifti_tree / "clinical.tsv"), "--label-column", "DX", "--out", str(manifest))
    args = ("split", "--manifest", str(manifest), "--name", "holdout", "--val", "0.2", "--seed", "3",
            "--out-root", str(tmp_path / "dm"))
    assert _run(*args) == 0
    out = tmp_path / "dm" / "ds" / "splits" / "holdout"
    info = json.loads((out / "split.json").read_text())
    assert info["params"]["seed"] == 3 and info["params"]["source"] == "manifest.csv"
    df = read_manifest(out / "manifest.csv")
    assert subject_overlap(df) == {}
    assert set(df.loc[df["split"] == "test", "subject_id"]) == {"sub-11", "sub-12"}  # the table's fixed test set
    assert (df["split"] == "val").any()
    before = (out / "split.json").read_text()
    assert _run(*args) == 1
    assert "split already exists" in capsys.readouterr().err
    assert (out / "split.json").read_text() == before


def test_split_kfold_writes_fold_manifests_whose_relative_paths_resolve(class_tree, tmp_path):
    manifest = tmp_path / "kaggle" / "manifest.csv"
    _run("build", "--kind", "class-folders", "--root", str(class_tree), "--out", str(manifest), "--paths", "relative")
    assert _run("split", "--manifest", str(manifest), "--name", "cv2", "--kfold", "2",
                "--out-root", str(tmp_path / "dm")) == 0
    out = tmp_path / "dm" / "kaggle" / "splits" / "cv2"
    info = json.loads((out / "split.json").read_text())
    assert info["params"]["n_splits"] == 2 and set(info["folds"]) == {"fold-0", "fold-1"}
    fold = read_manifest(out / "fold-1" / "manifest.csv")
    assert set(fold["split"]) == {"train", "val", "test"}
    assert subject_overlap(fold) == {}
    assert all(Path(p).is_file() for p in resolve_paths(fold)["image"])


def test_audit_prints_markdown_writes_json_and_pseudo_subjects(class_tree, tmp_path, capsys):
    manifest = tmp_path / "kaggle" / "manifest.csv"
    _run("build", "--kind", "class-folders", "--root", str(class_tree), "--out", str(manifest), "--paths", "relative")
    capsys.readouterr()
    pseudo = tmp_path / "kaggle" / "manifest_pseudo.csv"
    assert _run("audit", "--manifest", str(manifest), "--pseudo-subjects", str(pseudo)) == 0
    out = capsys.readouterr().out
    assert "# Leakage audit" in out and "| exact-duplicate groups (all / across splits) | 1 / 1 |" in out
    report = json.loads((tmp_path / "kaggle" / "manifest_audit.json").read_text())
    assert report["n_exact_groups_cross_split"] == 1 and report["has_leakage"] is True
    df = read_manifest(pseudo)
    merged = df[df["orig_subject_id"].isin(["sub-001", "sub-099"])]
    assert merged["subject_id"].nunique() == 1  # the copy and its source are one subject now
    assert set(merged["split"].fillna("")) == {""} and set(merged["orig_split"]) == {"train", "test"}
    assert _run("audit", "--manifest", str(manifest), "--strict", "--json", str(tmp_path / "a.json")) == 2


def test_audit_of_the_real_alzheimer_set_finds_cross_split_near_duplicates(tmp_path, capsys):
    root = shared_dataset("alzheimer_mri_4class")
    manifest = tmp_path / "alz" / "manifest.csv"
    _run("build", "--kind", "class-folders", "--root", str(root), "--out", str(manifest))
    assert _run("audit", "--manifest", str(manifest), "--near", "--max-distance", "2") == 0
    report = json.loads((tmp_path / "alz" / "manifest_audit.json").read_text())
    assert report["n_images"] == 1490
    assert report["n_exact_groups"] == 0
    assert report["n_near_groups"] == 116 and report["n_near_groups_cross_split"] == 9
    assert report["n_images_in_cross_split_near"] == 21
