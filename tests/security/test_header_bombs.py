"""D1/D4: headers that promise gigabytes are refused before anything is allocated, naming the file."""

from __future__ import annotations

import gzip
import os

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from pipelines.io.dicom import DicomSeriesError, DicomTooLargeError, find_series, load_series, read_dicom_slice
from pipelines.io.images import ImageLoadError
from pipelines.io.limits import DEFAULT_MAX_VOXELS, InputTooLargeError
from pipelines.io.nifti import VolumeTooLargeError, check_nifti
from tests.security.bounded import run_bounded


def nifti_header_bytes(shape, dtype=np.float32, total: int = 480) -> bytes:
    """A NIfTI-1 header (+ zero padding up to ``total`` bytes) declaring ``shape`` with no image data."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    hdr.set_data_offset(352)
    raw = hdr.binaryblock + b"\x00" * 4
    return raw + b"\x00" * max(0, total - len(raw))


def _predictor():
    import torch

    from pipelines.inference.predict import ClassificationPredictor

    return ClassificationPredictor(torch.nn.Identity(), ["a", "b"], image_transform=None)


@pytest.fixture
def bomb_480(tmp_path):
    path = tmp_path / "bomb.nii"
    path.write_bytes(nifti_header_bytes((1000, 1000, 1000)))
    assert path.stat().st_size == 480
    return path


def test_nifti_header_declaring_1000_cubed_fails_before_reading_data(bomb_480, monkeypatch):
    from monai.transforms import LoadImage

    def no_read(*args, **kwargs):
        raise AssertionError("the image reader was called for a header over the limit")

    monkeypatch.setattr(LoadImage, "__call__", no_read)
    with pytest.raises(VolumeTooLargeError, match="1,000,000,000 voxels, more than the limit") as err:
        _predictor().load_volume(bomb_480)
    assert str(bomb_480) in str(err.value) and "NEURO_MAX_VOXELS" in str(err.value)
    assert isinstance(err.value, ImageLoadError) and isinstance(err.value, InputTooLargeError)


def test_nifti_header_bomb_stays_within_512_mib(bomb_480):
    proc = run_bounded(
        "from pipelines.inference.predict import ClassificationPredictor\nimport torch, nibabel\n"
        "import monai.transforms, pipelines.io.nifti\nmonai.transforms.LoadImage()\n",
        f"""
        p = ClassificationPredictor(torch.nn.Identity(), ["a"], image_transform=None)
        try:
            p.load_volume(__import__("pathlib").Path({str(bomb_480)!r}))
        except ValueError as e:
            print("REFUSED", type(e).__name__, e)
        """,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "REFUSED VolumeTooLargeError" in proc.stdout and "more than the limit" in proc.stdout


def test_gzip_header_that_cannot_hold_its_data_is_refused_without_inflating(tmp_path):
    # 512^3 float32 = 512 MiB: within the limits, but a 100-byte gzip cannot inflate to it (deflate <= 1032:1)
    path = tmp_path / "bomb.nii.gz"
    path.write_bytes(gzip.compress(nifti_header_bytes((512, 512, 512), total=352)))
    proc = run_bounded(
        "from pipelines.inference.predict import ClassificationPredictor\nimport torch, pathlib, nibabel\n"
        "import monai.transforms, pipelines.io.nifti\nmonai.transforms.LoadImage()\n",
        f"""
        p = ClassificationPredictor(torch.nn.Identity(), ["a"], image_transform=None)
        try:
            p.load_volume(pathlib.Path({str(path)!r}))
        except ValueError as e:
            print("REFUSED", type(e).__name__, e)
        """,
        headroom_mb=384,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "REFUSED VolumeTooLargeError" in proc.stdout and "gzip file can hold" in proc.stdout
    assert str(path) in proc.stdout


def test_truncated_gzip_is_inflated_through_a_bounded_reader(tmp_path):
    path = tmp_path / "short.nii.gz"
    data = np.random.default_rng(0).integers(0, 255, 300_000, dtype=np.uint8).tobytes()
    path.write_bytes(gzip.compress(nifti_header_bytes((64, 64, 64), total=352) + data))
    with pytest.raises(ImageLoadError, match="truncated NIfTI file") as err:
        check_nifti(path)
    assert str(path) in str(err.value) and "inflated file holds" in str(err.value)


def test_uncompressed_nifti_shorter_than_its_header_says(tmp_path):
    path = tmp_path / "short.nii"
    path.write_bytes(nifti_header_bytes((64, 64, 64), total=352 + 1000))
    with pytest.raises(ImageLoadError, match="truncated NIfTI file"):
        check_nifti(path)


def test_limit_is_configurable_and_real_volumes_pass(tmp_path, monkeypatch):
    path = tmp_path / "ok.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((20, 20, 20), np.float32), np.eye(4)), path)
    assert check_nifti(path) == ((20, 20, 20), "float32")
    assert DEFAULT_MAX_VOXELS >= 512 * 512 * 512
    monkeypatch.setenv("NEURO_MAX_VOXELS", "1000")
    with pytest.raises(VolumeTooLargeError, match="8,000 voxels, more than the limit of 1,000"):
        check_nifti(path)


def test_not_a_nifti_header_names_the_file(tmp_path):
    path = tmp_path / "x.nii"
    path.write_bytes(b"\x00" * 600)
    with pytest.raises(ImageLoadError, match="not a NIfTI file") as err:
        check_nifti(path)
    assert str(path) in str(err.value)


# --------------------------------------------------------------------------------------------------- DICOM


def write_dicom(path, rows: int, cols: int, z: float, series_uid: str, pixel_bytes: int = 128, modality="MR"):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID = series_uid
    ds.StudyInstanceUID = "1.2.3"
    ds.Modality = modality
    ds.ImagePositionPatient = [0, 0, z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [1, 1]
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = b"\x00" * pixel_bytes
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture
def dicom_bomb(tmp_path):
    folder = tmp_path / "rows65535"
    folder.mkdir()
    uid = generate_uid()
    for k in range(8):
        write_dicom(folder / f"IM{k}.dcm", 65535, 65535, float(k), uid)
    return folder


def test_dicom_rows_columns_65535_is_refused_naming_the_file(dicom_bomb):
    with pytest.raises(DicomTooLargeError, match="65535") as err:
        load_series(dicom_bomb)
    assert str(dicom_bomb) in str(err.value) and ".dcm" in str(err.value)
    assert isinstance(err.value, DicomSeriesError)
    with pytest.raises(DicomTooLargeError):
        read_dicom_slice(dicom_bomb / "IM0.dcm")


def test_dicom_bomb_stays_within_512_mib(dicom_bomb):
    proc = run_bounded(
        "from pipelines.io.dicom import load_series\n",
        f"""
        try:
            load_series({str(dicom_bomb)!r})
        except ValueError as e:
            print("REFUSED", type(e).__name__, e)
        """,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "REFUSED DicomTooLargeError" in proc.stdout


def test_dicom_header_larger_than_its_file(tmp_path):
    path = tmp_path / "IM.dcm"
    write_dicom(path, 4096, 4096, 0.0, generate_uid())  # 32 MiB declared, ~1 KB file: within the limits
    with pytest.raises(DicomTooLargeError, match="more than the whole file") as err:
        read_dicom_slice(path)
    assert str(path) in str(err.value)


def test_files_that_cannot_be_dicom_are_skipped_without_parsing(tmp_path, monkeypatch):
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_dicom(folder / "IM0.dcm", 4, 4, 0.0, generate_uid(), pixel_bytes=32)
    for i in range(5):
        (folder / f"zeros{i}").write_bytes(b"\x00" * 65536)
    calls = []
    real = pydicom.dcmread
    monkeypatch.setattr(pydicom, "dcmread", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    with pytest.warns(UserWarning, match="skipped 5 non-DICOM"):
        groups = find_series(folder)
    assert len(groups) == 1 and [os.path.basename(str(c)) for c in calls] == ["IM0.dcm"]
