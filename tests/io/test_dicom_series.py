"""Tests for pipelines.io.dicom: geometric sorting, spacing, per-instance rescale, bad inputs, real series."""

from __future__ import annotations

import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, RLELossless, generate_uid

from pipelines.io.dicom import DicomSeriesError, DicomVolume, find_series, load_series, read_dicom_slice
from tests.conftest import shared_dataset

# Sagittal orientation: row direction +y (anterior->posterior), column direction -z; normal = row x col = -x.
IOP = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
NORMAL = np.array([-1.0, 0.0, 0.0])
FIRST_POS = np.array([40.0, -20.0, 30.0])
STEP = 2.5
PIXEL_SPACING = (0.5, 0.7)  # (row spacing, column spacing) mm
ROWS, COLS = 16, 16
SLOPES = (1.0, 2.0, 0.5, 1.0, 4.0, 1.0, 2.0, 0.25)
INTERCEPTS = (-1024.0, 0.0, 10.0, -100.0, -2048.0, 0.0, 4.0, -8.0)


def _true_slice(k: int) -> np.ndarray:
    """Physical values of slice k (k-th along the normal): 100*k + a ramp; multiples of 4, exact in every rescale."""
    r, c = np.mgrid[0:ROWS, 0:COLS]
    return (100.0 * k + 8.0 * r + 4.0 * c).astype(np.float64)


def _write_slice(path: Path, *, stored: np.ndarray, position, series_uid: str, instance: int, slope: float = 1.0,
                 intercept: float = 0.0, iop=IOP, pixel_spacing=PIXEL_SPACING, thickness: float = 1.0,
                 description: str = "synthetic", slope_text: str | None = None) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesDescription = description
    ds.Modality = "CT"
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in iop]
    ds.PixelSpacing = [f"{v:.6f}" for v in pixel_spacing]
    ds.SliceThickness = f"{thickness:.6f}"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "NaN" is not a valid DS value; written on purpose in one test
        ds.RescaleSlope = slope_text if slope_text is not None else f"{slope:g}"
    ds.RescaleIntercept = f"{intercept:g}"
    ds.PixelData = stored.astype("<i2").tobytes()
    ds.save_as(path, enforce_file_format=True)


def _make_series(folder: Path, n: int = 8, *, seed: int = 0, series_uid: str | None = None,
                 skip: tuple[int, ...] = (), description: str = "synthetic") -> list[Path]:
    """n slices along NORMAL with per-slice slope/intercept; shuffled file names and InstanceNumbers.

    Returns the written files in true slice order (k = 0..n-1, skipped ones left out).
    """
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    rng = random.Random(seed)
    names = rng.sample(range(1000, 9999), n)
    instances = rng.sample(range(1, n + 1), n)
    files = []
    for k in range(n):
        if k in skip:
            continue
        slope, intercept = SLOPES[k % len(SLOPES)], INTERCEPTS[k % len(INTERCEPTS)]
        stored = np.round((_true_slice(k) - intercept) / slope).astype(np.int16)
        path = folder / f"IMG{names[k]}.dcm"
        _write_slice(path, stored=stored, position=FIRST_POS + k * STEP * NORMAL, series_uid=series_uid,
                     instance=instances[k], slope=slope, intercept=intercept, description=description)
        files.append(path)
    return files


@pytest.fixture
def series(tmp_path: Path) -> tuple[Path, list[Path]]:
    folder = tmp_path / "series"
    return folder, _make_series(folder)


def _testfile(name: str) -> str:
    """A file shipped in the pydicom wheel; skips (never downloads) when it is not bundled."""
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} not bundled")
    return path


def _sitk_read(files) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])
    return reader.Execute()


# ------------------------------------------------------------------------------------------ synthetic: geometry


def test_slices_sorted_along_normal_not_by_instance_number_or_name(series):
    folder, files = series
    vol = load_series(folder)
    assert vol.files == files
    np.testing.assert_array_equal(vol.array, np.stack([_true_slice(k) for k in range(8)]).astype(np.float32))


def test_spacing_from_positions_not_slice_thickness(series):
    vol = load_series(series[0])
    assert vol.spacing == pytest.approx((0.7, 0.5, STEP), abs=1e-9)  # (column, row, between positions)


def test_origin_is_first_slice_along_normal_and_direction_columns_are_row_col_normal(series):
    vol = load_series(series[0])
    assert vol.origin == pytest.approx(tuple(FIRST_POS), abs=1e-9)
    np.testing.assert_allclose(vol.direction, np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], dtype=float), atol=1e-12)


def test_rescale_applied_per_instance(series):
    vol = load_series(series[0])
    # slice 4 has slope 4 / intercept -2048, slice 7 slope 0.25 / intercept -8: both land on the true values
    assert vol.array[4, 3, 5] == 400 + 24 + 20
    assert vol.array[7, 15, 15] == 700 + 120 + 60
    assert vol.array.dtype == np.float32


def test_synthetic_series_matches_simpleitk_geometry_and_voxels(series):
    folder, files = series
    vol = load_series(folder)
    ref = _sitk_read(files)
    np.testing.assert_array_equal(vol.array, sitk.GetArrayFromImage(ref).astype(np.float32))
    np.testing.assert_allclose(vol.spacing, ref.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(vol.origin, ref.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(vol.direction, np.reshape(ref.GetDirection(), (3, 3)), atol=1e-6)


def test_to_sitk_keeps_voxels_and_geometry(series):
    vol = load_series(series[0])
    img = vol.to_sitk()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), vol.array)
    assert img.GetSpacing() == pytest.approx(vol.spacing)
    assert img.GetOrigin() == pytest.approx(vol.origin)
    np.testing.assert_allclose(np.reshape(img.GetDirection(), (3, 3)), vol.direction, atol=1e-12)


def test_to_metatensor_is_xyz_with_ras_affine_like_itkreader(series):
    vol = load_series(series[0])
    mt = vol.to_metatensor()
    assert tuple(mt.shape) == (COLS, ROWS, 8)
    np.testing.assert_array_equal(mt.numpy(), vol.array.T)
    # ITKReader: affine = diag(-1, -1, 1, 1) @ [direction @ diag(spacing) | origin]
    expected = np.eye(4)
    expected[:3, :3] = vol.direction @ np.diag(vol.spacing)
    expected[:3, 3] = vol.origin
    expected = np.diag([-1.0, -1.0, 1.0, 1.0]) @ expected
    np.testing.assert_allclose(mt.affine.numpy(), expected, atol=1e-9)
    assert mt.affine.dtype == torch.float64
    assert str(mt.meta["space"]) == "RAS"
    # world position (RAS) of voxel (x=0, y=0, z=1) is the second slice's IPP with x, y negated
    second = FIRST_POS + STEP * NORMAL
    np.testing.assert_allclose((mt.affine.numpy() @ [0, 0, 1, 1])[:3], second * [-1, -1, 1], atol=1e-9)


def test_datasets_are_sorted_headers_without_pixel_data(series):
    vol = load_series(series[0])
    assert len(vol.datasets) == 8
    assert all("PixelData" not in ds for ds in vol.datasets)
    assert [float(ds.RescaleSlope) for ds in vol.datasets] == list(SLOPES)
    assert vol.modality == "CT"
    assert vol.series_uid == vol.datasets[0].SeriesInstanceUID


def test_list_of_files_loads_like_folder(series):
    folder, files = series
    np.testing.assert_array_equal(load_series(list(reversed(files))).array, load_series(folder).array)


def test_single_slice_uses_slice_thickness_for_z_spacing(tmp_path):
    path = tmp_path / "one.dcm"
    _write_slice(path, stored=np.zeros((4, 5), np.int16), position=(1, 2, 3), series_uid=generate_uid(), instance=1,
                 thickness=3.0)
    vol = load_series(path)
    assert vol.array.shape == (1, 4, 5)
    assert vol.spacing == pytest.approx((0.7, 0.5, 3.0))


def test_rle_compressed_series_loads_same_as_uncompressed(series, tmp_path):
    folder, files = series
    out = tmp_path / "rle"
    out.mkdir()
    for f in files:
        ds = pydicom.dcmread(f)
        ds.compress(RLELossless)
        ds.save_as(out / f.name, enforce_file_format=True)
    assert pydicom.dcmread(next(out.iterdir())).file_meta.TransferSyntaxUID == RLELossless
    np.testing.assert_array_equal(load_series(out).array, load_series(folder).array)


# ------------------------------------------------------------------------------------------ synthetic: errors


def test_truncated_file_raises_naming_it(series):
    folder, files = series
    data = files[3].read_bytes()
    files[3].write_bytes(data[:-100])
    with pytest.raises(DicomSeriesError, match=files[3].name) as err:
        load_series(folder)
    assert "truncated" in str(err.value)


def test_file_cut_inside_header_raises_naming_it(series):
    folder, files = series
    files[2].write_bytes(files[2].read_bytes()[:200])
    with pytest.raises(DicomSeriesError, match=files[2].name):
        load_series(folder)


def test_missing_slice_raises_naming_the_gap_position(tmp_path):
    folder = tmp_path / "gap"
    _make_series(folder, skip=(5,))
    # slice 4 sits at -40 mm along the normal (x = 40 - 4 * 2.5 = 30), slice 6 at -25
    with pytest.raises(DicomSeriesError, match=r"missing slice.*between positions -30\.0000 and -25\.0000"):
        load_series(folder)


def test_duplicate_position_raises_naming_both_files(tmp_path):
    folder = tmp_path / "dup"
    files = _make_series(folder)
    copy = folder / "copy.dcm"
    ds = pydicom.dcmread(files[2])
    ds.SOPInstanceUID = generate_uid()
    ds.save_as(copy, enforce_file_format=True)
    with pytest.raises(DicomSeriesError, match="duplicate slice position") as err:
        load_series(folder)
    assert "copy.dcm" in str(err.value) and files[2].name in str(err.value)


def test_two_series_without_uid_raise_listing_both(tmp_path):
    _make_series(tmp_path / "mix", series_uid="1.2.3.4.1", description="first")
    _make_series(tmp_path / "mix", n=3, series_uid="1.2.3.4.2", seed=1, description="second")
    with pytest.raises(DicomSeriesError, match="2 series") as err:
        load_series(tmp_path / "mix")
    msg = str(err.value)
    assert "1.2.3.4.1 (CT, 'first', 8 slices)" in msg and "1.2.3.4.2 (CT, 'second', 3 slices)" in msg
    assert "config id series_uid" in msg


def test_series_description_picks_one_of_several(tmp_path):
    _make_series(tmp_path / "mix", series_uid="1.2.3.4.1", description="T1 MPRAGE")
    _make_series(tmp_path / "mix", n=3, series_uid="1.2.3.4.2", seed=1, description="localizer")
    assert load_series(tmp_path / "mix", series_description="mprage").series_uid == "1.2.3.4.1"
    with pytest.raises(DicomSeriesError, match="matches 0 of 2 series") as err:
        load_series(tmp_path / "mix", series_description="flair")
    assert "localizer" in str(err.value)


def test_series_uid_selects_one_of_several(tmp_path):
    _make_series(tmp_path / "mix", series_uid="1.2.3.4.1")
    _make_series(tmp_path / "mix", n=3, series_uid="1.2.3.4.2", seed=1)
    vol = load_series(tmp_path / "mix", series_uid="1.2.3.4.2")
    assert vol.array.shape == (3, ROWS, COLS)
    assert vol.series_uid == "1.2.3.4.2"


def test_unknown_series_uid_raises(series):
    with pytest.raises(DicomSeriesError, match="series 9.9.9 not found"):
        load_series(series[0], series_uid="9.9.9")


def test_non_dicom_junk_warns_and_rest_loads(series):
    folder, _ = series
    (folder / "notes.txt").write_text("scanner notes, not DICOM\n" * 10)
    (folder / "thumb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    with pytest.warns(UserWarning, match="notes.txt") as rec:
        vol = load_series(folder)
    assert "thumb.png" in str(rec[0].message)
    assert vol.array.shape == (8, ROWS, COLS)


def test_nan_after_rescale_raises_naming_file(tmp_path):
    folder = tmp_path / "nan"
    files = _make_series(folder)
    ds = pydicom.dcmread(files[6])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.RescaleSlope = "NaN"
        ds.save_as(files[6], enforce_file_format=True)
    with pytest.raises(DicomSeriesError, match=f"{files[6].name}: non-finite"):
        load_series(folder)


def test_inf_after_rescale_raises(tmp_path):
    path = tmp_path / "inf.dcm"
    _write_slice(path, stored=np.full((4, 4), 30000, np.int16), position=(0, 0, 0), series_uid=generate_uid(),
                 instance=1, slope=1e36)  # 3e40 overflows float32
    with pytest.raises(DicomSeriesError, match="inf.dcm: non-finite"):
        read_dicom_slice(path)


def test_missing_image_position_raises_naming_file(series):
    folder, files = series
    ds = pydicom.dcmread(files[1])
    del ds.ImagePositionPatient
    ds.save_as(files[1], enforce_file_format=True)
    with pytest.raises(DicomSeriesError, match=f"{files[1].name}: missing required tag ImagePositionPatient"):
        load_series(folder)


def test_mixed_orientation_raises(series):
    folder, files = series
    ds = pydicom.dcmread(files[0])
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.save_as(files[0], enforce_file_format=True)
    with pytest.raises(DicomSeriesError, match="mixed ImageOrientationPatient"):
        load_series(folder)


def test_inconsistent_pixel_spacing_raises(series):
    folder, files = series
    ds = pydicom.dcmread(files[4])
    ds.PixelSpacing = [0.9, 0.9]
    ds.save_as(files[4], enforce_file_format=True)
    with pytest.raises(DicomSeriesError, match="inconsistent PixelSpacing"):
        load_series(folder)


def test_inconsistent_rows_columns_raises(series):
    folder, files = series
    _write_slice(files[4], stored=np.zeros((8, 16), np.int16), position=FIRST_POS + 4 * STEP * NORMAL,
                 series_uid=pydicom.dcmread(files[0]).SeriesInstanceUID, instance=99)
    with pytest.raises(DicomSeriesError, match="inconsistent Rows/Columns"):
        load_series(folder)


def test_find_series_groups_files_by_uid(tmp_path):
    a = _make_series(tmp_path / "a", series_uid="1.2.3.4.1")
    b = _make_series(tmp_path / "b" / "nested", n=3, series_uid="1.2.3.4.2", seed=1)
    found = find_series(tmp_path)
    assert set(found) == {"1.2.3.4.1", "1.2.3.4.2"}
    assert sorted(found["1.2.3.4.1"]) == sorted(a) and sorted(found["1.2.3.4.2"]) == sorted(b)


def test_find_series_empty_folder_raises(tmp_path):
    with pytest.raises(DicomSeriesError, match="no files"):
        find_series(tmp_path)


def test_find_series_folder_without_dicom_raises(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(DicomSeriesError, match="no DICOM files"), pytest.warns(UserWarning, match="a.txt"):
        find_series(tmp_path)


def test_read_dicom_slice_rejects_non_dicom(tmp_path):
    (tmp_path / "a.txt").write_text("hello\n" * 50)
    with pytest.raises(DicomSeriesError, match="a.txt: not a DICOM file"):
        read_dicom_slice(tmp_path / "a.txt")


# ------------------------------------------------------------------------------------------ pydicom test files


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
                                  "MR_small_bigendian.dcm", "MR_small_implicit.dcm"])
def test_compressed_and_other_syntaxes_decode_same_as_uncompressed_twin(name):
    ref, _ = read_dicom_slice(_testfile("MR_small.dcm"))
    arr, ds = read_dicom_slice(_testfile(name))
    assert ds.file_meta.TransferSyntaxUID != ExplicitVRLittleEndian
    np.testing.assert_array_equal(arr, ref)


def test_jpeg_lossless_rgb_decodes_same_as_rle_twin():
    ref, _ = read_dicom_slice(_testfile("SC_rgb_rle.dcm"))
    arr, _ = read_dicom_slice(_testfile("SC_rgb_jpeg_gdcm.dcm"))
    assert arr.shape == (100, 100, 3)
    np.testing.assert_array_equal(arr, ref)


def test_jpeg_baseline_decodes_close_to_lossless_twin():
    ref, _ = read_dicom_slice(_testfile("SC_rgb_rle.dcm"))
    arr, ds = read_dicom_slice(_testfile("SC_rgb_jpeg_dcmtk.dcm"))
    assert ds.file_meta.TransferSyntaxUID.name == "JPEG Baseline (Process 1)"
    assert 0 < np.abs(arr - ref).mean() < 2.0  # lossy, 8-bit


def test_ct_small_rescaled_to_hu():
    arr, ds = read_dicom_slice(_testfile("CT_small.dcm"))
    raw = pydicom.dcmread(_testfile("CT_small.dcm")).pixel_array
    assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1.0, -1024.0)
    np.testing.assert_array_equal(arr, raw.astype(np.float32) - 1024.0)


# ------------------------------------------------------------------------------------------ real data


def test_mprage_voxel_exact_with_simpleitk():
    folder = shared_dataset("dicom_series_mr_trio_b17") / "t1_MPRAGEcr_noGRAPPA_19"
    vol = load_series(folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    ref = reader.Execute()
    assert vol.array.shape == (176, 256, 256)
    np.testing.assert_array_equal(vol.array, sitk.GetArrayFromImage(ref).astype(np.float32))
    np.testing.assert_allclose(vol.spacing, ref.GetSpacing(), atol=1e-9)
    np.testing.assert_allclose(vol.origin, ref.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(vol.direction, np.reshape(ref.GetDirection(), (3, 3)), atol=1e-9)
    assert [f.name for f in vol.files[:2]] == ["00176.dcm", "00175.dcm"]  # sagittal: normal points to -x
    assert vol.array.max() == 1579.0 and vol.modality == "MR"


def test_field_map_phase_rescaled_like_simpleitk():
    folder = shared_dataset("dicom_series_mr_trio_b17") / "gre_field_mapping_3"
    vol = load_series(folder)
    ref = _sitk_read(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    assert vol.array.shape == (36, 64, 64)
    np.testing.assert_array_equal(vol.array, sitk.GetArrayFromImage(ref).astype(np.float32))
    assert vol.spacing == pytest.approx((3.0, 3.0, 3.6), abs=1e-6)
    assert vol.array.min() == -4096.0  # stored 0 * slope 2 - 4096


def test_find_series_on_trio_finds_three_series_and_skips_notes():
    root = shared_dataset("dicom_series_mr_trio_b17")
    with pytest.warns(UserWarning, match="MANIFEST.md"):
        found = find_series(root)
    assert sorted(len(v) for v in found.values()) == [36, 36, 176]


def test_real_ct_slice_hu_equals_raw_times_slope_plus_intercept():
    path = shared_dataset("dicom_samples_misc") / "CT_head_slice_barre.dcm"
    arr, ds = read_dicom_slice(path)
    raw = pydicom.dcmread(path).pixel_array
    slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    for r, c in [(256, 250), (256, 251), (100, 100), (0, 0)]:
        assert arr[r, c] == raw[r, c] * slope + intercept
    np.testing.assert_array_equal(arr[256, 250:256], [38, 41, 40, 39, 39, 39])  # brain parenchyma, HU
    assert arr.min() == -1057.0


def test_ct_fixture_gap_raises_naming_position():
    folder = shared_dataset("dicom_samples_misc") / "monai_ct_head_4slice_16px"
    with pytest.raises(DicomSeriesError, match=r"between positions -99\.4800 and 103\.0200"):
        load_series(folder)


def test_ct_fixture_contiguous_slices_load_in_hu(tmp_path):
    folder = shared_dataset("dicom_samples_misc") / "monai_ct_head_4slice_16px"
    files = [folder / name for name in ("7196", "7136", "7166")]
    vol = load_series(files)
    assert [f.name for f in vol.files] == ["7136", "7166", "7196"]
    assert vol.spacing == pytest.approx((0.488281, 0.488281, 1.25), abs=1e-6)
    raw = pydicom.dcmread(folder / "7166").pixel_array
    np.testing.assert_array_equal(vol.array[1], raw.astype(np.float32) - 1024.0)
    assert isinstance(vol, DicomVolume)


def test_copied_real_series_with_gap_is_rejected(tmp_path):
    src = shared_dataset("dicom_series_mr_trio_b17") / "gre_field_mapping_2"
    vol = load_series(src)
    for f in vol.files:
        if f != vol.files[10]:
            shutil.copy(f, tmp_path / f.name)
    with pytest.raises(DicomSeriesError, match="missing slice"):
        load_series(tmp_path)
