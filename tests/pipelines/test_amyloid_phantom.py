"""Synthetic amyloid PET phantom and its DICOM writer (pipelines.phantoms.amyloid_pet)."""

from __future__ import annotations

from datetime import datetime

import numpy as np
import pandas as pd
import pydicom
import pytest
import torch
from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Orientation

from pipelines.io.suv import rescale_to_suv, series_suv_factor
from pipelines.phantoms.amyloid_pet import (
    CLASS_NAMES,
    _class_counts,
    make_amyloid_dataset,
    make_amyloid_volume,
    write_pet_series,
)
from transforms.pet import SUVR

INJECTION = datetime(2021, 3, 1, 10, 0, 0)
SCAN = datetime(2021, 3, 1, 10, 50, 0)  # 3000 s uptake
WEIGHT_KG, DOSE_BQ = 72.5, 370e6
# SUV = activity [Bq/ml] * 72 500 g / (370e6 Bq * 2 ** (-3000 / 6586.2)) = activity * 2.686920e-4
SUV_PER_BQML = 72_500 / (370e6 * 2 ** (-3000 / 6586.2))


def _cortex_wm_ratio(seed: int, cls: int) -> float:
    activity, labels = make_amyloid_volume(seed, cls, return_labels=True)
    return float(activity[labels == 1].mean() / activity[labels == 2].mean())


def _write(tmp_path, activity, name="series", **kwargs):
    settings = {"weight_kg": WEIGHT_KG, "dose_bq": DOSE_BQ, "injection_datetime": INJECTION, "scan_datetime": SCAN,
                "patient_id": "sub-test", "seed": 3, **kwargs}
    return write_pet_series(activity, tmp_path / name, **settings)


def test_volume_is_deterministic_for_seed_and_class():
    first = make_amyloid_volume(11, 2)
    assert first.shape == (32, 64, 64) and first.dtype == np.float32 and float(first.min()) >= 0.0
    np.testing.assert_array_equal(first, make_amyloid_volume(11, 2))
    assert not np.array_equal(first, make_amyloid_volume(12, 2))


def test_cortex_to_white_matter_ratio_increases_with_class():
    ratios = np.array([[_cortex_wm_ratio(seed, cls) for cls in (0, 1, 2)] for seed in range(6)])
    negative, intermediate, positive = ratios.mean(axis=0)
    assert negative < intermediate < positive
    # Measured on the PET-resolution image: WM-dominant negatives, cortex >= WM positives, every subject.
    assert (ratios[:, 0] < 0.75).all() and (ratios[:, 2] >= 1.0).all()


def test_invalid_class_rejected():
    with pytest.raises(ValueError, match="cls must be"):
        make_amyloid_volume(0, 3)


def test_dicom_readback_suv_equals_activity_times_weight_over_decayed_dose(tmp_path):
    activity = make_amyloid_volume(5, 1)
    paths = _write(tmp_path, activity)
    datasets = [pydicom.dcmread(p) for p in paths]
    first = datasets[0]
    assert (first.Modality, first.SOPClassUID, first.Units, first.DecayCorrection) == (
        "PT", "1.2.840.10008.5.1.4.1.1.128", "BQML", "START")
    assert {"ATTN", "DECY"} <= set(first.CorrectedImage)
    item = first.RadiopharmaceuticalInformationSequence[0]
    assert (float(item.RadionuclideTotalDose), float(item.RadionuclideHalfLife)) == (370e6, 6586.2)
    assert item.RadiopharmaceuticalStartDateTime.startswith("20210301100000")
    factor = series_suv_factor(paths)
    assert factor.factor == pytest.approx(SUV_PER_BQML, rel=1e-12)
    assert factor.factor == pytest.approx(2.686920e-4, rel=1e-6)
    suv = np.stack([rescale_to_suv(ds, factor) for ds in datasets])
    # int16 quantisation: at most half a stored unit (slice max / 32767 / 2) per voxel, plus float32 rounding.
    tolerance = max(float(ds.RescaleSlope) for ds in datasets) * 0.5 * SUV_PER_BQML + 1e-6 * float(suv.max())
    np.testing.assert_allclose(suv, activity * SUV_PER_BQML, rtol=0, atol=tolerance)


def test_each_slice_has_its_own_rescale_slope_and_geometry(tmp_path):
    activity = make_amyloid_volume(5, 0)
    datasets = [pydicom.dcmread(p) for p in _write(tmp_path, activity)]
    slopes = [float(ds.RescaleSlope) for ds in datasets]
    assert len(set(slopes)) > 20
    for k, ds in enumerate(datasets):
        assert int(ds.pixel_array.max()) == 32767 or activity[k].max() == 0
        assert float(ds.ImagePositionPatient[2]) == pytest.approx(-62.0 + 4.0 * k)
    assert [float(v) for v in datasets[0].PixelSpacing] == [2.5, 2.5]


def test_series_files_are_byte_identical_for_same_seed(tmp_path):
    activity = make_amyloid_volume(2, 2)
    first = _write(tmp_path, activity, name="a")
    second = _write(tmp_path, activity, name="b")
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]


@pytest.mark.parametrize("units, decay_correction", [("BQML", "ADMIN"), ("GML", "START"), ("CNTS", "START")])
def test_other_units_and_decay_correction_give_same_suv(tmp_path, units, decay_correction):
    activity = make_amyloid_volume(4, 2, shape=(16, 32, 32))
    paths = _write(tmp_path, activity, units=units, decay_correction=decay_correction)
    factor = series_suv_factor(paths)
    suv = np.stack([rescale_to_suv(pydicom.dcmread(p), factor) for p in paths])
    np.testing.assert_allclose(suv, activity * SUV_PER_BQML, rtol=2e-4, atol=2e-4 * float(suv.max()))


def test_start_time_only_with_injection_before_midnight(tmp_path):
    activity = make_amyloid_volume(4, 0, shape=(16, 32, 32))
    paths = _write(tmp_path, activity, injection_datetime=datetime(2021, 3, 1, 23, 40),
                   scan_datetime=datetime(2021, 3, 2, 0, 30), write_start_datetime=False)
    assert "RadiopharmaceuticalStartDateTime" not in pydicom.dcmread(paths[0]).RadiopharmaceuticalInformationSequence[0]
    factor = series_suv_factor(paths)
    assert factor.decay_time_s == 3000.0
    assert factor.factor == pytest.approx(SUV_PER_BQML, rel=1e-12)


def test_writer_refuses_to_mix_series(tmp_path):
    activity = make_amyloid_volume(4, 0, shape=(16, 32, 32))
    _write(tmp_path, activity)
    with pytest.raises(FileExistsError, match="series"):
        _write(tmp_path, activity)


def test_ras_loaded_series_puts_fallback_reference_in_cerebellum_and_brainstem(tmp_path):
    activity, labels = make_amyloid_volume(6, 2, return_labels=True)
    _write(tmp_path, activity)
    loader = Compose([LoadImage(image_only=True, reader="ITKReader"), EnsureChannelFirst(), Orientation(axcodes="RAS")])
    image = loader(str(tmp_path / "series"))
    assert tuple(image.shape) == (1, 64, 64, 32)
    # DICOM (z, y, x) in LPS -> RAS (x, y, z): columns run R->L and rows A->P, so both flip.
    labels_ras = torch.as_tensor(np.ascontiguousarray(labels.transpose(2, 1, 0)[::-1, ::-1, :]))
    reference = SUVR("fallback").fallback_mask(image)[0]
    share = float(torch.isin(labels_ras[reference], torch.tensor([3, 5])).float().mean())
    assert share > 0.9


def test_class_counts_follow_reference_proportions():
    assert _class_counts(30) == [14, 4, 12]
    assert _class_counts(100) == [48, 13, 39]
    assert _class_counts(6) == [2, 2, 2]


def test_dataset_writes_one_series_per_subject_and_participants_csv(tmp_path):
    table = make_amyloid_dataset(tmp_path, n_subjects=6, seed=1, shape=(16, 32, 32))
    on_disk = pd.read_csv(tmp_path / "participants.csv")
    assert list(on_disk.columns[:3]) == ["subject_id", "session_id", "diagnosis"]
    pd.testing.assert_frame_equal(table, on_disk)
    assert sorted(table.diagnosis.value_counts().to_dict().items()) == [
        ("intermediate", 2), ("negative", 2), ("positive", 2)]
    assert set(table.diagnosis) <= set(CLASS_NAMES)
    for row in table.itertuples():
        files = sorted((tmp_path / row.series_dir).glob("*.dcm"))
        assert len(files) == row.n_instances == 16
        factor = series_suv_factor(files)
        assert factor.weight_kg == pytest.approx(row.weight_kg)
        assert factor.decay_time_s == pytest.approx(row.uptake_min * 60.0)
    with pytest.raises(FileExistsError, match="participants.csv"):
        make_amyloid_dataset(tmp_path, n_subjects=6, seed=1)
