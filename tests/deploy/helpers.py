"""Test helpers for the deploy apps: a phantom MR DICOM series and a tiny random model exported to TorchScript."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pydicom
import torch
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, PYDICOM_IMPLEMENTATION_UID, generate_uid

REPO_ROOT = Path(__file__).resolve().parents[2]

#: Config-id overrides giving alz_hybrid a network that runs in milliseconds on 32x32 slices (the hybrid, so the
#: attention-rollout overlay path is covered; the default CNN's Grad-CAM path is covered by the tumour/CT tests).
ALZ_TINY = {
    "network_name": "hybrid",
    "image_size": 32,
    "cnn_block": "basic",
    "cnn_layers": [1, 1],
    "cnn_inplanes": [8, 16],
    "hidden_size": 16,
    "num_layers": 1,
    "num_heads": 2,
    "mlp_dim": 32,
    "dropout": 0.0,
    "batch_size": 8,
}
#: Tiny DenseNet for the amyloid_pet bundle, quarter-width ResNet-18 (its default network) for ct_hemorrhage
#: (pipelines.networks.cnn.build_classifier kwargs).
TINY_DENSENET = {"init_features": 8, "growth_rate": 8, "block_config": [2, 2]}
CT_TINY = {"image_size": 32, "batch_size": 8, "network_kwargs": {"width": 0.25}}
PET_TINY = {"image_size": 32, "num_slices": 4, "batch_size": 8, "network_kwargs": TINY_DENSENET}
PATIENT_NAME = "PHANTOM^ALZ"
PATIENT_ID = "PHANTOM-ALZ-0001"


def phantom_volume(shape: tuple[int, int, int] = (40, 48, 24), label: int = 2, seed: int = 3) -> np.ndarray:
    """A small Alzheimer phantom head ``(X, Y, Z)`` RAS in [0, 1]."""
    from pipelines.phantoms.alzheimer import draw_subject, make_subject_volume

    image, _ = make_subject_volume(draw_subject(np.random.default_rng(seed), label), shape=shape, seed=seed)
    return image


def write_mr_series(
    volume_ras: np.ndarray,
    out_dir: Path,
    spacing: float = 3.0,
    seed: int = 0,
    extra: Mapping[str, object] | None = None,
) -> list[Path]:
    """Write a RAS volume ``(X, Y, Z)`` as an axial MR Image Storage series (uint16, value = round(1000 * v)).

    Rows run anterior -> posterior and columns right -> left (ImageOrientationPatient 1,0,0,0,1,0 in LPS), so
    the series read back and reoriented to RAS is ``volume_ras``. Files are named in a shuffled order, so
    readers have to sort by ImagePositionPatient.
    """
    nx, ny, nz = volume_ras.shape
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    study_uid, series_uid, frame_uid = (generate_uid(entropy_srcs=[str(seed), s]) for s in ("study", "series", "for"))
    names = rng.permutation(nz)
    stored = np.clip(np.rint(volume_ras * 1000.0), 0, 65535).astype("<u2")
    paths = []
    for k in range(nz):
        sop_uid = generate_uid(entropy_srcs=[str(seed), "sop", str(k)])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = "20240102"
        ds.StudyTime = ds.SeriesTime = "101500"
        ds.AccessionNumber = "ACC-PHANTOM"
        ds.Modality = "MR"
        ds.Manufacturer = "neuro_monai_bundles tests"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "MR BRAIN (synthetic phantom)"
        ds.SeriesDescription = "T1 axial (synthetic)"
        ds.PatientName = PATIENT_NAME
        ds.PatientID = PATIENT_ID
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 3
        ds.InstanceNumber = k + 1
        ds.FrameOfReferenceUID = frame_uid
        ds.PatientPosition = "HFS"
        ds.SliceThickness = str(spacing)
        ds.ImagePositionPatient = [-(nx - 1) / 2 * spacing, -(ny - 1) / 2 * spacing, (k - (nz - 1) / 2) * spacing]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [spacing, spacing]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = ny, nx
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        for key, value in (extra or {}).items():
            setattr(ds, key, value)
        # row r = posterior-ward (LPS +y = RAS -y), column c = left-ward (LPS +x = RAS -x)
        ds.PixelData = np.ascontiguousarray(stored[::-1, ::-1, k].T).tobytes()
        path = out_dir / f"IM{int(names[k]):04d}.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths


def write_ct_series(out_dir: Path, seed: int = 4, hemorrhage: str = "iph", shape=(8, 64, 64)) -> list[Path]:
    """A head-CT phantom series (int HU, axial, shuffled file names) from :mod:`pipelines.phantoms.head_ct`."""
    from pipelines.phantoms.head_ct import make_head_ct_volume, write_dicom_series

    hu, _, _ = make_head_ct_volume(seed, shape=shape, hemorrhage=hemorrhage)
    return write_dicom_series(hu, out_dir, seed=seed)


def write_pet_dir(out_dir: Path, seed: int = 2, cls: int = 2, shape=(20, 32, 32)) -> list[Path]:
    """An amyloid PET phantom series (Bq/ml, per-slice rescale) from :mod:`pipelines.phantoms.amyloid_pet`."""
    from pipelines.phantoms.amyloid_pet import make_amyloid_volume, write_pet_series

    return write_pet_series(make_amyloid_volume(seed, cls, shape=shape), out_dir, weight_kg=70.0, dose_bq=370e6,
                            seed=seed)


def export_tiny_model(out_dir: Path, bundle: str = "alz_hybrid", overrides: Mapping[str, object] = ALZ_TINY,
                      seed: int = 0) -> tuple[Path, Path]:
    """Randomly initialise the bundle's ``network_def`` at tiny sizes and export it with ``ckpt_export``.

    Returns:
        ``(model.ts, model.pt)``.
    """
    from monai.bundle import ckpt_export

    from pipelines.bundles import load_config

    configs = REPO_ROOT / "bundles" / bundle / "configs"
    out_dir.mkdir(parents=True, exist_ok=True)
    parser = load_config(bundle, "inference.json", overrides=overrides)
    torch.manual_seed(seed)
    net = parser.get_parsed_content("network_def")
    ckpt = out_dir / "model.pt"
    torch.save(net.state_dict(), ckpt)
    ts = out_dir / "model.ts"
    ckpt_export(
        net_id="network_def",
        filepath=str(ts),
        ckpt_file=str(ckpt),
        meta_file=str(configs / "metadata.json"),
        config_file=str(configs / "inference.json"),
        **{k: v for k, v in overrides.items()},
    )
    return ts, ckpt


def zip_bytes(files: Sequence[tuple[str, bytes]]) -> bytes:
    """A zip archive (deflated) holding ``(name, data)`` entries, names taken as given (even ``../x``)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files:
            zf.writestr(zipfile.ZipInfo(name), data, compress_type=zipfile.ZIP_DEFLATED)
    return buf.getvalue()


def zip_folder(folder: Path, prefix: str = "study/") -> bytes:
    """The files of ``folder`` as a zip archive under ``prefix``."""
    return zip_bytes([(prefix + p.name, p.read_bytes()) for p in sorted(folder.iterdir()) if p.is_file()])
