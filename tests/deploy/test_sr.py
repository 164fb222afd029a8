"""The classification DICOM SR: reads back, references the source, carries no extra patient data."""

from __future__ import annotations

import copy

import pydicom
import pytest
from pydicom.uid import ComprehensiveSRStorage

from pipelines.deploy.sr import SR_SERIES_DESCRIPTION, read_classification_sr, write_classification_sr
from pipelines.io.dicom import load_series


@pytest.fixture(scope="module")
def series_and_result(mr_series, mr_result):
    return load_series(mr_series), mr_result


@pytest.fixture(scope="module")
def sr_path(series_and_result, tmp_path_factory):
    volume, result = series_and_result
    return write_classification_sr(result, volume.datasets, tmp_path_factory.mktemp("sr"))


def test_sr_reads_back_with_the_result(sr_path, series_and_result):
    _, result = series_and_result
    back = read_classification_sr(sr_path)
    assert back["finding"] == result["study"]["predicted_class"]
    assert back["probabilities"] == pytest.approx(result["study"]["probabilities"], abs=1e-9)
    assert back["algorithm"] == (result["model"]["name"], result["model"]["version"])


def test_sr_references_source_study_series_and_every_instance(sr_path, series_and_result):
    volume, _ = series_and_result
    ds = pydicom.dcmread(sr_path)
    assert ds.StudyInstanceUID == volume.datasets[0].StudyInstanceUID
    assert ds.SeriesInstanceUID != volume.series_uid
    back = read_classification_sr(sr_path)
    assert {k: sorted(v) for k, v in back["referenced_series"].items()} == {
        volume.series_uid: sorted(str(d.SOPInstanceUID) for d in volume.datasets)}


def test_sr_patient_data_is_what_the_source_had(sr_path, series_and_result):
    volume, _ = series_and_result
    source = volume.datasets[0]
    sr = pydicom.dcmread(sr_path)
    patient = [e for e in sr if e.tag.group == 0x0010]
    assert {e.keyword for e in patient} <= {e.keyword for e in source if e.tag.group == 0x0010}
    for elem in patient:
        assert elem.value in ("", None, source[elem.tag].value), elem.keyword
    assert sr.PatientName == source.PatientName and sr.PatientID == source.PatientID


def test_sr_leaves_absent_patient_attributes_empty(series_and_result, tmp_path):
    volume, result = series_and_result
    stripped = []
    for ds in volume.datasets:
        ds = copy.deepcopy(ds)
        del ds.PatientName, ds.PatientBirthDate
        stripped.append(ds)
    sr = pydicom.dcmread(write_classification_sr(result, stripped, tmp_path))
    assert str(sr.get("PatientName") or "") == ""
    assert str(sr.get("PatientBirthDate") or "") == ""
    assert sr.PatientID == volume.datasets[0].PatientID


def test_sr_is_an_unverified_comprehensive_sr_for_research(sr_path):
    ds = pydicom.dcmread(sr_path)
    assert ds.SOPClassUID == ComprehensiveSRStorage and ds.Modality == "SR"
    assert ds.SeriesDescription == SR_SERIES_DESCRIPTION and "research use only" in ds.SeriesDescription
    assert (ds.CompletionFlag, ds.VerificationFlag, ds.PreliminaryFlag) == ("COMPLETE", "UNVERIFIED", "PRELIMINARY")
    assert sr_path.name == f"{ds.SOPInstanceUID}.dcm"


def test_sr_of_several_studies_is_refused(series_and_result, tmp_path):
    volume, result = series_and_result
    other = copy.deepcopy(volume.datasets[1])
    other.StudyInstanceUID = "1.2.3.4"
    with pytest.raises(ValueError, match="must belong to one study"):
        write_classification_sr(result, [volume.datasets[0], other], tmp_path)
