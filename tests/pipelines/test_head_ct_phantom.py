"""Tests for the synthetic head-CT DICOM series phantom (pipelines.phantoms.head_ct)."""

from __future__ import annotations

import filecmp

import numpy as np
import pandas as pd
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.pixels import apply_rescale
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian
from scipy import ndimage as ndi

from pipelines.phantoms.head_ct import (
    AIR,
    BONE,
    CSF,
    GREY,
    HAEMORRHAGE,
    WHITE,
    default_spacing,
    make_head_ct_dataset,
    make_head_ct_volume,
    write_dicom_series,
)

SMALL = (8, 64, 64)


@pytest.fixture(scope="module")
def volumes():
    """seed 3 as none / iph / sdh, default shape (24, 128, 128)."""
    return {kind: make_head_ct_volume(3, hemorrhage=kind) for kind in ("none", "iph", "sdh")}


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """A small written series: (hu, paths, folder)."""
    hu, _, _ = make_head_ct_volume(5, SMALL, "sdh")
    folder = tmp_path_factory.mktemp("series")
    paths = write_dicom_series(hu, folder, patient_id="PHANTOM-0042", seed=5)
    return hu, paths, folder


def _core(mask: np.ndarray) -> np.ndarray:
    """In-plane 3x3 erosion: voxels away from partial-volume edges."""
    return ndi.binary_erosion(mask, np.ones((1, 3, 3), bool))


# ---------------------------------------------------------------- volume


def test_volume_is_deterministic_for_a_seed():
    a = make_head_ct_volume(11, SMALL, "iph")
    b = make_head_ct_volume(11, SMALL, "iph")
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], make_head_ct_volume(12, SMALL, "iph")[0])


def test_volume_types_and_shapes(volumes):
    hu, labels, mask = volumes["iph"]
    assert hu.dtype == np.int16 and hu.shape == (24, 128, 128)
    assert labels.dtype == np.int64 and labels.shape == (24,)
    assert mask.dtype == np.uint8 and mask.shape == hu.shape


def test_haemorrhage_type_does_not_change_the_anatomy(volumes):
    base = volumes["none"][2]
    for kind in ("iph", "sdh"):
        mask = volumes[kind][2]
        outside = mask != HAEMORRHAGE
        np.testing.assert_array_equal(mask[outside], base[outside])


@pytest.mark.parametrize(
    ("tissue", "low", "high"),
    [(AIR, -1003, -997), (BONE, 850, 1250), (GREY, 35, 42), (WHITE, 29, 35), (CSF, 0, 10), (HAEMORRHAGE, 60, 90)],
)
def test_tissue_hu_medians_are_realistic(volumes, tissue, low, high):
    hu, _, mask = volumes["iph"]
    values = hu[_core(mask == tissue)]
    assert values.size > 20
    assert low <= np.median(values) <= high


def test_grey_matter_is_brighter_than_white_matter(volumes):
    hu, _, mask = volumes["none"]
    assert np.median(hu[_core(mask == GREY)]) > np.median(hu[_core(mask == WHITE)])


def test_noise_is_a_few_hu(volumes):
    hu, _, mask = volumes["none"]
    assert 2.5 <= hu[_core(mask == AIR)].std() <= 5.5
    assert 2.5 <= hu[_core(mask == WHITE)].std() <= 5.5


@pytest.mark.parametrize("kind", ["iph", "sdh"])
def test_haemorrhage_only_on_a_contiguous_run_of_labelled_slices(volumes, kind):
    hu, labels, mask = volumes[kind]
    per_slice = (mask == HAEMORRHAGE).reshape(len(labels), -1).sum(1)
    np.testing.assert_array_equal(labels, (per_slice > 0).astype(int))
    positive = np.flatnonzero(labels)
    assert positive.size >= 3
    assert positive[-1] - positive[0] + 1 == positive.size
    brain = _core(np.isin(mask, (GREY, WHITE)))
    for z in np.flatnonzero(labels == 0):
        assert (hu[z][brain[z]] >= 60).mean() < 0.001


def test_no_haemorrhage_when_none(volumes):
    _, labels, mask = volumes["none"]
    assert labels.sum() == 0 and not (mask == HAEMORRHAGE).any()


def test_subdural_lies_along_the_inner_table_and_intraparenchymal_does_not(volumes):
    spacing_mm = default_spacing((24, 128, 128))[1]
    for kind, near in (("sdh", True), ("iph", False)):
        mask = volumes[kind][2]
        dist_to_bone = np.stack([ndi.distance_transform_edt(m != BONE) for m in mask]) * spacing_mm
        d = dist_to_bone[mask == HAEMORRHAGE]
        if near:
            assert d.min() <= spacing_mm and d.max() <= 14.0
        else:
            assert d.min() > 1.5 * spacing_mm


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="hemorrhage"):
        make_head_ct_volume(0, SMALL, "edh")
    with pytest.raises(ValueError, match="shape"):
        make_head_ct_volume(0, (2, 64, 64))


# ---------------------------------------------------------------- DICOM series


def test_series_reads_back_with_simpleitk_spacing_and_hu(series):
    hu, _, folder = series
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    image = reader.Execute()
    dz, dy, dx = default_spacing(SMALL)
    np.testing.assert_allclose(image.GetSpacing(), (dx, dy, dz))
    np.testing.assert_allclose(image.GetDirection(), np.eye(3).ravel())
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), hu)


def test_series_file_names_are_not_in_slice_order_but_positions_sort(series):
    hu, paths, folder = series
    by_name = [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]
    assert [ds.InstanceNumber for ds in by_name] != list(range(1, len(hu) + 1))
    by_z = sorted(by_name, key=lambda ds: float(ds.ImagePositionPatient[2]))
    assert [ds.InstanceNumber for ds in by_z] == list(range(1, len(hu) + 1))
    np.testing.assert_allclose(np.diff([float(ds.ImagePositionPatient[2]) for ds in by_z]), 5.0)
    assert [pydicom.dcmread(p).InstanceNumber for p in paths] == list(range(1, len(hu) + 1))


def test_series_headers_are_valid_ct_image_storage(series):
    hu, paths, _ = series
    datasets = [pydicom.dcmread(p) for p in paths]
    for k, ds in enumerate(datasets):
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.SOPClassUID == CTImageStorage == ds.file_meta.MediaStorageSOPClassUID
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.Modality == "CT" and ds.RescaleType == "HU" and ds.PhotometricInterpretation == "MONOCHROME2"
        assert (ds.BitsAllocated, ds.SamplesPerPixel, ds.PixelRepresentation) == (16, 1, 0)
        assert ds.pixel_array.dtype == np.uint16
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert float(ds.SliceThickness) == 5.0 and float(ds.RescaleIntercept) == -1024.0
        assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (40.0, 80.0)
        assert ds.PatientID == "PHANTOM-0042" and str(ds.PatientName) == "PHANTOM^0042"
        np.testing.assert_array_equal(apply_rescale(ds.pixel_array, ds), hu[k])
    for attr in ("StudyInstanceUID", "SeriesInstanceUID"):
        assert len({getattr(ds, attr) for ds in datasets}) == 1
    sops = {ds.SOPInstanceUID for ds in datasets}
    assert len(sops) == len(datasets) and all(UID(u).is_valid for u in sops)


def test_signed_storage_when_intercept_is_zero(tmp_path):
    hu, _, _ = make_head_ct_volume(1, SMALL)
    paths = write_dicom_series(hu, tmp_path, rescale_intercept=0.0)
    ds = pydicom.dcmread(paths[0])
    assert ds.PixelRepresentation == 1 and ds.pixel_array.dtype == np.int16
    np.testing.assert_array_equal(ds.pixel_array, hu[0])


def test_write_refuses_to_mix_with_existing_files(series, tmp_path):
    hu, _, folder = series
    with pytest.raises(FileExistsError, match=str(folder)):
        write_dicom_series(hu, folder)
    assert len(write_dicom_series(hu, folder, overwrite=True)) == len(list(folder.glob("*.dcm")))


# ---------------------------------------------------------------- data set


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    table = make_head_ct_dataset(root, n_studies=6, seed=4, slices=8, size=48)
    return root, table


def test_dataset_is_byte_identical_for_the_same_seed(dataset, tmp_path):
    root, _ = dataset
    make_head_ct_dataset(tmp_path, n_studies=6, seed=4, slices=8, size=48)
    files = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    _, mismatch, errors = filecmp.cmpfiles(root, tmp_path, [str(f) for f in files], shallow=False)
    assert mismatch == [] and errors == []


def test_dataset_labels_table(dataset):
    root, table = dataset
    assert {"subject_id", "session_id", "series_dir", "slice_index", "label", "study_label"} <= set(table.columns)
    pd.testing.assert_frame_equal(pd.read_csv(root / "labels.csv"), table)
    assert len(table) == 6 * 8
    studies = table.groupby("study_id").agg(study_label=("study_label", "first"), any_slice=("label", "max"),
                                            kind=("hemorrhage_type", "first"), subject=("subject_id", "nunique"))
    assert (studies.study_label == studies.any_slice).all()
    assert studies.study_label.sum() == 3
    assert set(studies.kind) == {"none", "iph", "sdh"}
    assert (studies.subject == 1).all() and table.subject_id.nunique() == 6


def test_dataset_slice_labels_match_the_files(dataset):
    root, table = dataset
    row = table[table.label == 1].iloc[0]
    ds = pydicom.dcmread(root / row.file)
    assert ds.PatientID == row.subject_id and ds.SOPInstanceUID == row.sop_instance_uid
    assert ds.InstanceNumber == row.slice_index + 1


def test_dataset_refuses_to_overwrite_labels(dataset):
    root, _ = dataset
    with pytest.raises(FileExistsError, match="labels.csv"):
        make_head_ct_dataset(root, n_studies=2, slices=4, size=32)
