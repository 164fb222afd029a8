"""DICOM study tree + labels table -> manifest (pipelines.manifests.dicom_builder)."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from pipelines.io.dicom import load_series
from pipelines.manifests.dicom_builder import from_dicom_tree, hashed_subject_id, read_labels_table
from pipelines.manifests.schema import ManifestError, write_manifest
from tests.conftest import shared_dataset

SALT = "correct-horse-battery-staple"

# find_series warns about the non-DICOM files it skips; one test checks that warning explicitly
pytestmark = pytest.mark.filterwarnings("ignore:.*skipped .* non-DICOM file:UserWarning")


def _write_series(folder: Path, patient: tuple[str, str], study: tuple[str, str], description: str,
                  n_slices: int = 3, series_uid: str | None = None) -> str:
    """A tiny axial MR series (8x8 uint16) with geometry; returns its SeriesInstanceUID."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    for k in range(n_slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID = patient
        ds.StudyInstanceUID, ds.StudyDate = study
        ds.StudyTime = "101010"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesDescription = description
        ds.Modality = "MR"
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [0.0, 0.0, float(2 * k)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [1.0, 1.0]
        ds.Rows = ds.Columns = 8
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = (np.full((8, 8), 100 + k, dtype=np.uint16)).tobytes()
        ds.save_as(folder / f"IM{k:04d}.dcm", enforce_file_format=True)
    return series_uid


ALICE = ("Doe^Alice", "PID-ALICE-123")
BOB = ("Roe^Bob", "PID-BOB-456")


@pytest.fixture
def tree(tmp_path: Path) -> dict:
    """alice/{2020: t1, flair; 2021: t1}, bob/2020: t1, plus a non-DICOM notes.txt."""
    root = tmp_path / "dicom"
    a1, a2, b1 = generate_uid(), generate_uid(), generate_uid()
    uids = {
        "alice_2020_t1": _write_series(root / "alice" / "2020" / "t1", ALICE, (a1, "20200101"), "T1 MPRAGE"),
        "alice_2020_flair": _write_series(root / "alice" / "2020" / "flair", ALICE, (a1, "20200101"), "FLAIR"),
        "alice_2021_t1": _write_series(root / "alice" / "2021" / "t1", ALICE, (a2, "20210101"), "T1 MPRAGE"),
        "bob_2020_t1": _write_series(root / "bob" / "2020" / "t1", BOB, (b1, "20200101"), "T1 MPRAGE"),
    }
    (root / "notes.txt").write_text("not a DICOM file")
    return {"root": root, "uids": uids, "studies": {"alice_2020": a1, "alice_2021": a2, "bob_2020": b1}}


def _build(tree: dict, labels: pd.DataFrame, **kwargs) -> pd.DataFrame:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # notes.txt is skipped with a warning (tested on its own)
        return from_dicom_tree(tree["root"], labels, **kwargs).set_index("image")


def test_one_row_per_series_with_its_folder_as_image(tree):
    labels = pd.DataFrame({"subject_id": ["sub-A", "sub-B"], "patient_id": [ALICE[1], BOB[1]], "label": ["AD", "CN"]})
    df = _build(tree, labels)
    root = tree["root"].resolve()
    assert sorted(df.index) == sorted(str(root / p) for p in ("alice/2020/t1", "alice/2020/flair", "alice/2021/t1",
                                                             "bob/2020/t1"))
    assert df.loc[str(root / "bob/2020/t1"), "label"] == "CN"
    assert df.loc[str(root / "alice/2020/flair"), "series_uid"] == tree["uids"]["alice_2020_flair"]
    assert (df["n_files"] == 3).all()


def test_manifest_never_holds_patient_name_or_patient_id(tree, tmp_path):
    labels = pd.DataFrame({"subject_id": ["sub-A", "sub-B"], "patient_id": [ALICE[1], BOB[1]], "label": ["AD", "CN"]})
    df = from_dicom_tree(tree["root"], labels)
    out = write_manifest(df, tmp_path / "m.csv")
    text = out.read_text()
    for secret in ("Doe", "Alice", "Roe", "PID-ALICE-123", "PID-BOB-456"):
        assert secret not in text


def test_sessions_are_numbered_by_study_date_per_subject(tree):
    labels = pd.DataFrame({"subject_id": ["sub-A", "sub-B"], "patient_id": [ALICE[1], BOB[1]], "label": ["AD", "CN"]})
    df = _build(tree, labels)
    root = tree["root"].resolve()
    assert df.loc[str(root / "alice/2020/t1"), "session_id"] == "ses-01"
    assert df.loc[str(root / "alice/2020/flair"), "session_id"] == "ses-01"
    assert df.loc[str(root / "alice/2021/t1"), "session_id"] == "ses-02"
    assert df.loc[str(root / "bob/2020/t1"), "session_id"] == "ses-01"


def test_series_row_overrides_study_row_and_study_row_covers_its_series(tree):
    labels = pd.DataFrame({
        "subject_id": ["sub-A", "sub-A", "sub-A"],
        "study": [tree["studies"]["alice_2020"], "", tree["studies"]["alice_2021"]],
        "series": ["", tree["uids"]["alice_2020_flair"], ""],
        "label": ["MCI", "excluded", "AD"],
    })
    df = _build(tree, labels)
    root = tree["root"].resolve()
    assert df.loc[str(root / "alice/2020/t1"), "label"] == "MCI"
    assert df.loc[str(root / "alice/2020/flair"), "label"] == "excluded"
    assert df.loc[str(root / "alice/2021/t1"), "label"] == "AD"


def test_subject_only_rows_match_a_folder_name_on_the_path(tree):
    labels = pd.DataFrame({"subject": ["alice", "bob"], "diagnosis": ["AD", "CN"]})
    df = _build(tree, labels, label_column="diagnosis")
    assert sorted(df["subject_id"].unique()) == ["alice", "bob"]
    assert (df.loc[df["subject_id"] == "alice", "label"] == "AD").all()


def test_path_rows_and_series_description_filter(tree):
    labels = pd.DataFrame({"path": ["alice", "bob"], "subject_id": ["sub-A", "sub-B"], "label": ["AD", "CN"]})
    df = _build(tree, labels, series_description="mprage")
    assert len(df) == 3
    assert set(df["series_description"]) == {"T1 MPRAGE"}


def test_hashed_subject_ids_are_salted_sha256_of_patient_id(tree):
    labels = pd.DataFrame({"patient_id": [ALICE[1], BOB[1]], "label": ["AD", "CN"]})
    df = _build(tree, labels, subject_from="patient-id-hash", salt=SALT)
    expected = "sub-" + hashlib.sha256(f"{SALT}:{ALICE[1]}".encode()).hexdigest()[:16]
    assert set(df.loc[df["label"] == "AD", "subject_id"]) == {expected}
    assert hashed_subject_id(ALICE[1], SALT) == expected
    assert hashed_subject_id(ALICE[1], SALT + "x") != expected
    assert (df["subject_source"] == "patient-id-hash").all()


def test_patient_id_hash_without_a_salt_is_rejected(tree):
    labels = pd.DataFrame({"patient_id": [ALICE[1]], "label": ["AD"]})
    with pytest.raises(ValueError, match="salt"):
        from_dicom_tree(tree["root"], labels, subject_from="patient-id-hash", salt=None)
    with pytest.raises(ValueError, match="salt"):
        hashed_subject_id(ALICE[1], "short")


def test_unlabelled_series_warn_and_are_skipped_or_raise_when_strict(tree):
    labels = pd.DataFrame({"subject_id": ["sub-B"], "patient_id": [BOB[1]], "label": ["CN"]})
    with pytest.warns(UserWarning, match="3 series under .* match no row"):
        df = from_dicom_tree(tree["root"], labels)
    assert len(df) == 1
    with pytest.raises(ManifestError, match="3 series under .* match no row"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from_dicom_tree(tree["root"], labels, strict=True)


def test_non_dicom_files_are_skipped_with_a_warning_naming_them(tree):
    labels = pd.DataFrame({"subject_id": ["sub-A", "sub-B"], "patient_id": [ALICE[1], BOB[1]], "label": ["AD", "CN"]})
    with pytest.warns(UserWarning, match="notes.txt"):
        from_dicom_tree(tree["root"], labels)


def test_equally_specific_rows_that_disagree_are_an_error(tree):
    labels = pd.DataFrame({"subject_id": ["sub-B", "sub-B"], "patient_id": [BOB[1], BOB[1]], "label": ["CN", "AD"]})
    with pytest.raises(ManifestError, match="disagree"):
        _build(tree, labels)


def test_a_matched_row_without_subject_id_is_an_error(tree):
    labels = pd.DataFrame({"patient_id": [BOB[1]], "label": ["CN"]})
    with pytest.raises(ManifestError, match="no subject_id"):
        _build(tree, labels)


def test_two_series_in_one_folder_is_an_error(tmp_path):
    root = tmp_path / "flat"
    study = (generate_uid(), "20200101")
    _write_series(root, BOB, study, "T1")
    uid2 = generate_uid()
    for f in sorted(root.iterdir()):  # a second series written under other file names in the same folder
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = uid2
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(root / f"B_{f.name}", enforce_file_format=True)
    labels = pd.DataFrame({"subject_id": ["sub-B"], "patient_id": [BOB[1]], "label": ["CN"]})
    with pytest.raises(ManifestError, match="holds files of 2 series"):
        from_dicom_tree(root, labels)


def test_labels_table_without_label_or_key_column_is_an_error(tmp_path):
    bad = tmp_path / "labels.csv"
    bad.write_text("subject_id,dx\nsub-1,AD\n")
    with pytest.raises(ManifestError, match="no 'label' column"):
        read_labels_table(bad)
    bad.write_text("age,label\n70,AD\n")
    with pytest.raises(ManifestError, match="no key column"):
        read_labels_table(bad)


def test_unknown_labels_are_rejected_by_class_names(tree):
    labels = pd.DataFrame({"subject_id": ["sub-B"], "patient_id": [BOB[1]], "label": ["CN"]})
    with pytest.raises(ManifestError, match="unknown label"):
        _build(tree, labels, class_names=["AD", "MCI"])


def test_real_trio_b17_tree_gives_one_row_per_series_that_loads():
    root = shared_dataset("dicom_series_mr_trio_b17")
    labels = pd.DataFrame({"path": ["."], "subject_id": ["sub-rorden"], "label": ["CN"]})
    df = from_dicom_tree(root, labels)
    assert sorted(Path(p).name for p in df["image"]) == ["gre_field_mapping_2", "gre_field_mapping_3",
                                                        "t1_MPRAGEcr_noGRAPPA_19"]
    assert df.set_index(df["image"].map(lambda p: Path(p).name)).loc["t1_MPRAGEcr_noGRAPPA_19", "n_files"] == 176
    assert set(df["session_id"]) == {"ses-01"}  # one study
    assert "Rorden" not in df.to_csv(index=False)  # the PatientName of this sample
    fmap = df[df["image"].str.endswith("gre_field_mapping_2")].iloc[0]
    vol = load_series(fmap["image"], series_uid=fmap["series_uid"])
    assert vol.array.shape == (36, 64, 64)


def test_real_trio_b17_series_description_filter_keeps_the_mprage():
    root = shared_dataset("dicom_series_mr_trio_b17")
    labels = pd.DataFrame({"series": ["t1_MPRAGEcr_noGRAPPA_19"], "subject_id": ["sub-rorden"], "label": ["CN"]})
    df = from_dicom_tree(root, labels, series_description="mprage", strict=True)
    assert len(df) == 1
    assert df["series_description"].iloc[0] == "t1_MPRAGEcr_noGRAPPA"
