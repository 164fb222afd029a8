"""QIBA body-weight SUV factor from PET DICOM headers (pipelines.io.suv)."""

from __future__ import annotations

import dataclasses
import math
from datetime import datetime

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from pipelines.io.suv import SUVError, SUVFactor, rescale_to_suv, series_suv_factor, suv_bw_factor
from tests.conftest import shared_dataset

# Reference header: 80 kg, 400 MBq F-18 injected at 09:00:00, series (scan) start 10:00:00 -> 3600 s of decay.
# decayed dose = 400e6 * 2 ** (-3600 / 6586.2) = 400e6 * 0.6846329 = 273.853 MBq
# factor       = 80 000 g / 273.853e6 Bq = 2.921273e-4 g/Bq
EXPECTED_FACTOR = 80_000 / (400e6 * 2 ** (-3600 / 6586.2))


def _pet_header(**overrides) -> Dataset:
    ds = Dataset()
    ds.Modality = "PT"
    ds.SeriesInstanceUID = "1.2.3.4"
    ds.Units = "BQML"
    ds.CorrectedImage = ["NORM", "ATTN", "SCAT", "DECY"]
    ds.DecayCorrection = "START"
    ds.SeriesDate = "20240101"
    ds.SeriesTime = "100000"
    ds.AcquisitionDate = "20240101"
    ds.AcquisitionTime = "100000"
    ds.PatientWeight = "80"
    ds.RescaleSlope = "1"
    ds.RescaleIntercept = "0"
    item = Dataset()
    item.RadiopharmaceuticalStartTime = "090000"
    item.RadionuclideTotalDose = "400000000"
    item.RadionuclideHalfLife = "6586.2"
    ds.RadiopharmaceuticalInformationSequence = Sequence([item])
    for key, value in overrides.items():
        if key.startswith("Radio"):
            if value is None:
                delattr(item, key)
            else:
                setattr(item, key, value)
        elif value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    return ds


def _with_pixels(ds: Dataset, stored: np.ndarray, slope: str, intercept: str = "0") -> Dataset:
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.PixelData = stored.astype("<i2").tobytes()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    return ds


def test_bqml_factor_equals_weight_over_decayed_dose():
    factor = suv_bw_factor(_pet_header())
    assert factor.factor == pytest.approx(EXPECTED_FACTOR, rel=1e-12)
    assert factor.factor == pytest.approx(2.921273e-4, rel=1e-6)
    assert factor.decay_time_s == 3600.0
    assert factor.decay_corrected_dose_bq == pytest.approx(400e6 * 0.6846329195720021, rel=1e-12)
    assert factor.scan_datetime == datetime(2024, 1, 1, 10, 0, 0)
    assert factor.injection_datetime == datetime(2024, 1, 1, 9, 0, 0)
    assert (factor.units, factor.activity_scale, factor.weight_kg) == ("BQML", 1.0, 80.0)


def test_missing_weight_dose_and_half_life_reported_in_one_error_naming_the_file():
    ds = _pet_header(PatientWeight=None, RadionuclideTotalDose=None, RadionuclideHalfLife=None)
    ds.filename = "/data/pet/IM0001.dcm"
    with pytest.raises(SUVError) as info:
        suv_bw_factor(ds)
    message = str(info.value)
    for part in ("/data/pet/IM0001.dcm", "PatientWeight", "RadionuclideTotalDose", "RadionuclideHalfLife"):
        assert part in message


@pytest.mark.parametrize(
    "overrides, tag",
    [
        ({"PatientWeight": "0"}, "PatientWeight"),
        ({"PatientWeight": "-70"}, "PatientWeight"),
        ({"RadionuclideTotalDose": "0"}, "RadionuclideTotalDose"),
        ({"RadionuclideHalfLife": "-1"}, "RadionuclideHalfLife"),
        ({"RadiopharmaceuticalStartTime": None}, "RadiopharmaceuticalStartTime"),
        ({"SeriesTime": None, "AcquisitionTime": None}, "SeriesDate/SeriesTime"),
        ({"Units": None}, "Units"),
    ],
)
def test_zero_negative_or_absent_tag_is_named_in_error(overrides, tag):
    with pytest.raises(SUVError, match=tag):
        suv_bw_factor(_pet_header(**overrides))


def test_missing_radiopharmaceutical_sequence_is_reported():
    ds = _pet_header()
    del ds.RadiopharmaceuticalInformationSequence
    with pytest.raises(SUVError, match="RadiopharmaceuticalInformationSequence") as info:
        suv_bw_factor(ds)
    assert "RadionuclideTotalDose" in str(info.value) and "RadionuclideHalfLife" in str(info.value)


def test_units_other_than_bqml_cnts_gml_rejected():
    with pytest.raises(SUVError, match="Units 'PROPCNTS' not supported"):
        suv_bw_factor(_pet_header(Units="PROPCNTS"))


def test_corrected_image_without_decy_rejected():
    with pytest.raises(SUVError, match="lacks DECY"):
        suv_bw_factor(_pet_header(CorrectedImage=["ATTN", "SCAT"]))


def test_decay_correction_none_rejected():
    with pytest.raises(SUVError, match="DecayCorrection 'NONE' not supported"):
        suv_bw_factor(_pet_header(DecayCorrection="NONE"))


def test_injection_before_midnight_scan_after_uses_previous_day():
    # Injection 23:30 on Jan 1, scan 00:30 on Jan 2: StartTime alone + SeriesDate would be 23 h in the future.
    ds = _pet_header(SeriesDate="20240102", SeriesTime="003000", AcquisitionDate="20240102",
                     AcquisitionTime="003000", RadiopharmaceuticalStartTime="233000")
    factor = suv_bw_factor(ds)
    assert factor.injection_datetime == datetime(2024, 1, 1, 23, 30, 0)
    assert factor.decay_time_s == 3600.0
    assert factor.factor == pytest.approx(EXPECTED_FACTOR, rel=1e-12)
    assert any("previous day" in note for note in factor.notes)


def test_start_datetime_takes_precedence_over_start_time():
    ds = _pet_header(RadiopharmaceuticalStartDateTime="20240101083000", RadiopharmaceuticalStartTime="090000")
    factor = suv_bw_factor(ds)
    assert factor.decay_time_s == 5400.0
    assert factor.factor == pytest.approx(80_000 / (400e6 * 2 ** (-5400 / 6586.2)), rel=1e-12)


def test_start_datetime_after_scan_rejected():
    with pytest.raises(SUVError, match="after the scan time"):
        suv_bw_factor(_pet_header(RadiopharmaceuticalStartDateTime="20240101110000"))


def test_decay_correction_admin_uses_undecayed_dose():
    factor = suv_bw_factor(_pet_header(DecayCorrection="ADMIN"))
    # Images are decay-corrected to injection: 80 000 g / 400e6 Bq.
    assert factor.factor == pytest.approx(2.0e-4, rel=1e-12)
    assert factor.decay_time_s == 0.0
    assert factor.decay_corrected_dose_bq == 400e6


def test_cnts_uses_philips_suv_scale_factor():
    ds = _pet_header(Units="CNTS", PatientWeight=None)
    block = ds.private_block(0x7053, "Philips PET Private Group", create=True)
    block.add_new(0x00, "DS", "0.000321")
    block.add_new(0x09, "DS", "2.5")
    factor = suv_bw_factor(ds)
    assert factor.factor == pytest.approx(0.000321, rel=1e-12)
    assert factor.activity_scale == 2.5
    assert factor.method == "CNTS Philips (7053,1000)"


def test_cnts_with_only_activity_scale_factor_multiplies_bqml_factor():
    ds = _pet_header(Units="CNTS")
    ds.private_block(0x7053, "Philips PET Private Group", create=True).add_new(0x09, "DS", "2.5")
    assert suv_bw_factor(ds).factor == pytest.approx(2.5 * EXPECTED_FACTOR, rel=1e-12)


def test_cnts_without_philips_tags_rejected():
    with pytest.raises(SUVError, match=r"7053,1000"):
        suv_bw_factor(_pet_header(Units="CNTS"))


def test_gml_factor_is_one_without_dose_information():
    ds = _pet_header(Units="GML", RadionuclideTotalDose=None, RadionuclideHalfLife=None)
    factor = suv_bw_factor(ds)
    assert (factor.factor, factor.method) == (1.0, "GML identity")


def test_series_time_after_acquisition_uses_earliest_acquisition_time():
    # Post-processed series: SeriesTime 11:00 re-stamped, acquisitions started 10:00 and 10:05.
    first = _pet_header(SeriesTime="110000", AcquisitionTime="100500")
    second = _pet_header(SeriesTime="110000", AcquisitionTime="100000")
    factor = series_suv_factor([first, second])
    assert factor.scan_datetime == datetime(2024, 1, 1, 10, 0, 0)
    assert factor.factor == pytest.approx(EXPECTED_FACTOR, rel=1e-12)
    assert any("earliest acquisition" in note for note in factor.notes)


def test_series_factor_excludes_per_instance_rescale_slope():
    stored = np.array([[0, 100], [1000, 32767]])
    low = _with_pixels(_pet_header(), stored, slope="0.5")
    high = _with_pixels(_pet_header(), stored, slope="3.25")
    factor = series_suv_factor([low, high])
    assert factor.factor == pytest.approx(EXPECTED_FACTOR, rel=1e-12)
    # SUV = (stored * slope_i + intercept_i) * series factor, slope taken per instance.
    np.testing.assert_allclose(rescale_to_suv(low, factor), stored * 0.5 * EXPECTED_FACTOR, rtol=1e-6)
    np.testing.assert_allclose(rescale_to_suv(high, factor), stored * 3.25 * EXPECTED_FACTOR, rtol=1e-6)


def test_rescale_to_suv_applies_slope_and_intercept_before_factor():
    ds = _with_pixels(_pet_header(), np.array([[0, 10], [-4, 200]]), slope="2", intercept="10")
    out = rescale_to_suv(ds)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, np.array([[10, 30], [2, 410]]) * EXPECTED_FACTOR, rtol=1e-6)


def test_series_instances_disagreeing_on_weight_rejected():
    with pytest.raises(SUVError, match="PatientWeight 80.0 .* vs 81.0"):
        series_suv_factor([_pet_header(), _pet_header(PatientWeight="81")])


def test_series_of_nothing_rejected():
    with pytest.raises(SUVError, match="no datasets"):
        series_suv_factor([])


def test_factor_serialises_for_manifest():
    record = suv_bw_factor(_pet_header()).to_dict()
    assert record["scan_datetime"] == "2024-01-01T10:00:00"
    assert record["factor"] == pytest.approx(EXPECTED_FACTOR)
    assert record["notes"] == ""
    assert set(record) == {field.name for field in dataclasses.fields(SUVFactor)}


# Real ACRIN-FLT-Breast slices (see the dataset's MANIFEST.md). Hand calculation with the header values:
#   static : weight 69.7344 kg, dose 178340011.59668 Bq, injection 14:17:00.000, SeriesTime 15:23:16.921
#            (= AcquisitionTime) -> dt = 1 h 06 min 16.921 s = 3976.921 s;
#            decayed dose = 178340011.59668 * 2 ** (-3976.921 / 6586.2) = 178340011.59668 * 0.658006466 = 117348880.8 Bq
#            factor = 69734.4 g / 117348880.8 Bq = 5.942485e-4 g/Bq
#   dynamic: weight 82.174 kg, dose 173529998.7793 Bq, injection 11:19:59.000, SeriesTime 11:19:59.109,
#            AcquisitionTime 11:35:59.109 (later than the series start: the series time is the START reference)
#            -> dt = 0.109 s; factor = 82174 / (173529998.7793 * 2 ** (-0.109 / 6586.2)) = 4.735489e-4 g/Bq
REAL_CASES = {
    "PT_static_wholebody_slice.dcm": (69_734.4 / (178_340_011.59668 * 2 ** (-3976.921 / 6586.2)), 3976.921),
    "PT_dynamic_slice.dcm": (82_174.0 / (173_529_998.7793 * 2 ** (-0.109 / 6586.2)), 0.109),
}


@pytest.mark.realdata
@pytest.mark.parametrize("name", sorted(REAL_CASES))
def test_real_acrin_flt_slice_factor_matches_hand_calculation(name):
    path = shared_dataset("pet_dicom_acrin_flt_breast") / name
    ds = pydicom.dcmread(path)
    item = ds.RadiopharmaceuticalInformationSequence[0]
    print(
        f"{name}: weight {ds.PatientWeight} kg, dose {item.RadionuclideTotalDose} Bq, half-life "
        f"{item.RadionuclideHalfLife} s, start {item.RadiopharmaceuticalStartTime}, series {ds.SeriesDate} "
        f"{ds.SeriesTime}, acquisition {ds.AcquisitionTime}, units {ds.Units}, decay {ds.DecayCorrection}, "
        f"slope {ds.RescaleSlope}"
    )
    expected, decay_s = REAL_CASES[name]
    factor = suv_bw_factor(ds)
    assert factor.decay_time_s == pytest.approx(decay_s, abs=1e-6)
    assert factor.factor == pytest.approx(expected, rel=1e-9)
    assert factor.factor == pytest.approx({"PT_static_wholebody_slice.dcm": 5.942485e-4,
                                           "PT_dynamic_slice.dcm": 4.735489e-4}[name], rel=1e-6)
    suv = rescale_to_suv(ds, factor)
    assert float(suv.max()) == pytest.approx(float(ds.pixel_array.max()) * float(ds.RescaleSlope) * expected, rel=1e-6)
    assert 0.5 < float(suv.max()) < 50.0
    assert math.isclose(float(suv.min()), 0.0, abs_tol=1e-6)
