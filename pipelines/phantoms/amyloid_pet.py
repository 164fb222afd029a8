"""Synthetic brain amyloid PET phantom written as PET Image Storage DICOM (the amyloid_pet bundle's default data).

The phantom mimics the appearance that amyloid PET reads rely on (florbetapir/florbetaben/flutemetamol):

* amyloid-negative (class 0): high non-specific white-matter (WM) uptake, low cortical grey matter (GM):
  the cortex/WM contrast is "WM-dominant" (tissue cortex/WM 0.5 .. 0.7);
* intermediate (class 1): elevated uptake in only some cortical regions (precuneus/posterior cingulate,
  frontal, parietal, temporal, occipital), the rest negative-looking;
* positive (class 2): diffuse cortical uptake above WM (tissue cortex/WM 1.2 .. 1.45; the thin ribbon loses
  about 10 % to partial volume, so the measured mean over the cortex label is about 1.0 .. 1.3).

The cerebellar grey matter (inferior, posterior) is the reference region (level 1 in SUVR units). A subject
varies in head size and position, WM level, global activity scale (Bq/ml), resolution (Gaussian PSF of 5 .. 8 mm
FWHM) and noise level. Everything is deterministic in ``(seed, cls)``.

Array layout is ``(z, y, x)`` = (slice, row, column), as DICOM stores it: slice index 0 is the most inferior
slice, rows run anterior -> posterior and columns run patient right -> left (LPS, ImageOrientationPatient
``[1, 0, 0, 0, 1, 0]``), so a loader that reorients to RAS gets the cerebellum at low axis-2 indices.

The bundle's defaults are generated once into the phantom cache: :func:`default_dataset` (the cohort) and
:func:`example_series` (one subject's series folder).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds
from scipy import ndimage

from pipelines.phantoms.cache import cached_dataset, into_new_folder

__all__ = [
    "CLASS_NAMES",
    "F18_HALF_LIFE_S",
    "GENERATOR_VERSION",
    "LABELS",
    "PHANTOM_FOV_MM",
    "PRESETS",
    "default_dataset",
    "example_series",
    "make_amyloid_dataset",
    "make_amyloid_volume",
    "write_pet_series",
]

F18_HALF_LIFE_S = 6586.2
#: Part of the phantom cache key: bump when the generator's output changes.
GENERATOR_VERSION = "1"
PET_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.128"
PHILIPS_PRIVATE_CREATOR = "Philips PET Private Group"
CLASS_NAMES = ("negative", "intermediate", "positive")
# ADNI-like amyloid PET read counts negative/intermediate/positive (291/78/234): class proportions of the dataset.
CLASS_COUNTS_REFERENCE = (291, 78, 234)
# Field of view (z, y, x) in mm that the phantom's geometry is drawn in; voxel size = FOV / shape.
PHANTOM_FOV_MM = (128.0, 160.0, 160.0)
LABELS = {
    0: "background",
    1: "cortex",
    2: "white_matter",
    3: "cerebellum",
    4: "ventricles",
    5: "brainstem",
    6: "scalp",
}
_LOBES = ("precuneus", "frontal", "parietal", "temporal", "occipital")


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    if len(shape) != 3 or any(int(n) < 16 for n in shape):
        raise ValueError(f"shape must be three sizes >= 16 (z, y, x), got {tuple(shape)}")
    return tuple(int(n) for n in shape)


def make_amyloid_volume(
    seed: int,
    cls: int,
    shape: Sequence[int] = (32, 64, 64),
    *,
    return_labels: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """One synthetic amyloid PET volume, activity concentration in Bq/ml (decay-corrected to scan start).

    Args:
        seed: non-negative integer; the same ``(seed, cls, shape)`` always gives the same volume.
        cls: 0 negative (cortex < WM), 1 intermediate (some cortical regions elevated), 2 positive
            (diffuse cortex >= WM).
        shape: ``(z, y, x)`` voxels, each >= 16; the geometry spans :data:`PHANTOM_FOV_MM`.
        return_labels: also return the noise-free tissue label map (uint8, values of :data:`LABELS`).

    Returns:
        float32 ``(z, y, x)`` activity in Bq/ml, >= 0 (cerebellar GM about 4,000 .. 7,500 Bq/ml), and the label map
        when ``return_labels``.

    Raises:
        ValueError: negative seed, unknown class or bad shape.
    """
    if int(seed) < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if cls not in (0, 1, 2):
        raise ValueError(f"cls must be 0 (negative), 1 (intermediate) or 2 (positive), got {cls!r}")
    nz, ny, nx = _check_shape(shape)
    rng = np.random.default_rng([int(seed), int(cls), 20240725])

    size = rng.uniform(0.9, 1.06)
    dz, dy, dx = rng.uniform(-0.03, 0.03, size=3)
    z = ((np.arange(nz) + 0.5) / nz)[:, None, None]  # 0 inferior .. 1 superior
    y = (2 * (np.arange(ny) + 0.5) / ny - 1)[None, :, None]  # -1 anterior .. 1 posterior
    x = (2 * (np.arange(nx) + 0.5) / nx - 1)[None, None, :]  # -1 right .. 1 left

    zc, yc, xc = 0.6 + dz, -0.02 + dy, dx
    az, ay, ax = 0.36 * size, 0.8 * size, 0.72 * size
    uz, uy, ux = (z - zc) / az, (y - yc) / ay, (x - xc) / ax
    r = np.sqrt(uz**2 + uy**2 + ux**2)
    cerebrum = r <= 1.0
    # Gyral folding: the GM/WM boundary undulates instead of being a perfect shell.
    folding = 0.05 * np.sin(9 * np.arctan2(uy, ux)) * np.cos(7 * np.arctan2(uz, np.hypot(uy, ux)))
    cortex = cerebrum & (r > 0.8 + folding)
    medial = cerebrum & (np.abs(x - xc) < 0.07 * size) & (uz > -0.5)
    cortex |= medial
    ventricles = np.zeros_like(cerebrum)
    for side in (-1, 1):
        rv = np.sqrt(((z - zc - 0.02) / (0.22 * az)) ** 2 + ((y - yc + 0.05) / (0.35 * ay)) ** 2
                     + ((x - xc - side * 0.12 * ax) / (0.09 * ax)) ** 2)
        ventricles |= rv <= 1.0
    ventricles &= cerebrum & ~cortex
    white = cerebrum & ~cortex & ~ventricles

    rc = np.sqrt(((z - (0.2 + dz)) / (0.13 * size)) ** 2 + ((y - yc - 0.45 * size) / (0.32 * size)) ** 2
                 + ((x - xc) / (0.55 * size)) ** 2)
    cerebellum = (rc <= 1.0) & ~cerebrum
    cerebellar_wm = cerebellum & (rc < 0.45)
    brainstem = np.hypot((y - yc - 0.1 * size) / (0.12 * size), (x - xc) / (0.12 * size)) <= 1.0
    brainstem = brainstem & (z >= 0.04) & (z <= zc - 0.5 * az)
    brainstem &= ~cerebellum & ~cerebrum
    brain = cerebrum | cerebellum | brainstem
    scalp = ndimage.binary_dilation(brain, iterations=3) & ~ndimage.binary_dilation(brain, iterations=1)

    labels = np.zeros((nz, ny, nx), dtype=np.uint8)
    for value, region in ((6, scalp), (2, white), (1, cortex), (4, ventricles), (3, cerebellum), (5, brainstem)):
        labels[region] = value

    # Uptake in SUVR units (cerebellar GM = 1).
    wm = rng.uniform(1.6, 2.0)
    lobe_regions = {
        "frontal": uy < -0.3,
        "occipital": uy > 0.6,
        "parietal": (uz > 0.3) & (uy >= -0.3) & (uy <= 0.6),
        "temporal": (uz <= 0.3) & (np.abs(ux) > 0.5) & (uy >= -0.3) & (uy <= 0.6),
        "precuneus": (np.abs(ux) < 0.3) & (uy > 0.1) & (uz > -0.1),
    }
    lobes = {name: np.broadcast_to(region, labels.shape) for name, region in lobe_regions.items()}
    if cls == 0:
        cortical = np.full(labels.shape, wm * rng.uniform(0.5, 0.7))
    elif cls == 1:
        cortical = np.full(labels.shape, wm * rng.uniform(0.55, 0.72))
        chosen = ["precuneus"] if rng.random() < 0.7 else []
        others = [lobe for lobe in _LOBES if lobe not in chosen]
        chosen += list(rng.choice(others, size=int(rng.integers(1, 3)), replace=False))
        for lobe in chosen:
            cortical[lobes[lobe]] = wm * rng.uniform(0.95, 1.15)
    else:
        cortical = np.full(labels.shape, wm * rng.uniform(1.2, 1.45))
        for lobe in _LOBES:
            cortical[lobes[lobe]] *= rng.uniform(0.95, 1.05)
    suvr = np.zeros(labels.shape, dtype=np.float64)
    suvr[scalp] = rng.uniform(0.25, 0.4)
    suvr[white] = wm
    suvr[cortex] = cortical[cortex]
    suvr[ventricles] = 0.25
    suvr[cerebellum] = 1.0
    suvr[cerebellar_wm] = 0.85 * wm
    suvr[brainstem] = 0.9 * wm

    voxel_mm = np.array(PHANTOM_FOV_MM) / np.array((nz, ny, nx))
    fwhm_mm = rng.uniform(5.0, 8.0)
    blurred = ndimage.gaussian_filter(suvr, sigma=fwhm_mm / 2.3548 / voxel_mm, mode="constant")
    noise = ndimage.gaussian_filter(rng.standard_normal(labels.shape), sigma=0.8)
    noise /= noise.std()
    noisy = blurred + rng.uniform(0.04, 0.1) * np.sqrt(np.clip(blurred, 0, None)) * noise
    activity = (np.clip(noisy, 0, None) * rng.uniform(4000.0, 7500.0)).astype(np.float32)
    return (activity, labels) if return_labels else activity


def _tm(moment: datetime) -> str:
    return moment.strftime("%H%M%S.%f")


def _ds(value: float) -> str:
    return format_number_as_ds(float(value))


def write_pet_series(
    activity: np.ndarray,
    out_dir: str | Path,
    *,
    weight_kg: float,
    dose_bq: float,
    half_life_s: float = F18_HALF_LIFE_S,
    injection_datetime: datetime | None = None,
    scan_datetime: datetime | None = None,
    frame_duration_s: float = 1200.0,
    decay_correction: str = "START",
    units: str = "BQML",
    patient_id: str = "PHANTOM001",
    seed: int = 0,
    pixel_spacing_mm: tuple[float, float] | None = None,
    slice_thickness_mm: float | None = None,
    write_start_datetime: bool = True,
    series_description: str = "Synthetic amyloid PET",
) -> list[Path]:
    """Write a ``(z, y, x)`` activity volume as one PET Image Storage series (one int16 file per slice).

    ``activity`` is the activity concentration decay-corrected to the scan start (Bq/ml). What is stored
    depends on the header written, so that the QIBA SUVbw of every voxel is always
    ``activity * weight_g / (dose_bq * 2 ** (-(scan - injection) / half_life_s))``:

    * ``units="BQML"``, ``decay_correction="START"``: the activity itself;
    * ``decay_correction="ADMIN"``: the activity decay-corrected back to the injection time;
    * ``units="GML"``: the SUVbw itself;
    * ``units="CNTS"``: counts = activity / 2.5 with Philips private (7053,1009) = 2.5 (Bq/ml per count) and
      (7053,1000) = SUV scale factor.

    Each slice has its own ``RescaleSlope`` (slice maximum / 32767, as scanners do), intercept 0. UIDs come from
    ``(patient_id, seed)`` only, so files are byte-identical across runs.

    Args:
        activity: finite float array ``(z, y, x)``; slice 0 is written most inferior.
        out_dir: folder for the files (created); must not already hold ``.dcm`` files.
        weight_kg: PatientWeight, kg (> 0).
        dose_bq: RadionuclideTotalDose at injection, Bq (> 0).
        half_life_s: RadionuclideHalfLife, s (> 0); F-18 by default.
        injection_datetime: administration time; default 2020-01-06 09:00.
        scan_datetime: series / acquisition start; default injection + 50 min. Must not precede the injection.
        frame_duration_s: ActualFrameDuration, s (> 0).
        decay_correction: ``"START"`` or ``"ADMIN"``.
        units: ``"BQML"``, ``"CNTS"`` or ``"GML"``.
        patient_id: PatientID / PatientName.
        seed: UID seed.
        pixel_spacing_mm: (row, column) spacing; default from :data:`PHANTOM_FOV_MM`.
        slice_thickness_mm: slice spacing = thickness; default from :data:`PHANTOM_FOV_MM`.
        write_start_datetime: also write RadiopharmaceuticalStartDateTime (else only the StartTime, which
            readers combine with SeriesDate).
        series_description: SeriesDescription.

    Returns:
        The written paths, in slice order (inferior first).

    Raises:
        ValueError: bad arguments or non-finite activity.
        FileExistsError: ``out_dir`` already holds DICOM files.
    """
    activity = np.asarray(activity)
    if activity.ndim != 3 or not np.isfinite(activity).all():
        raise ValueError(f"activity must be a finite 3D (z, y, x) array, got shape {activity.shape}")
    for name, value in (("weight_kg", weight_kg), ("dose_bq", dose_bq), ("half_life_s", half_life_s),
                        ("frame_duration_s", frame_duration_s)):
        if not (math.isfinite(float(value)) and float(value) > 0):
            raise ValueError(f"{name} must be finite and > 0, got {value}")
    decay_correction = decay_correction.upper()
    units = units.upper()
    if decay_correction not in ("START", "ADMIN"):
        raise ValueError(f"decay_correction must be 'START' or 'ADMIN', got {decay_correction!r}")
    if units not in ("BQML", "CNTS", "GML"):
        raise ValueError(f"units must be 'BQML', 'CNTS' or 'GML', got {units!r}")
    injection = injection_datetime or datetime(2020, 1, 6, 9, 0, 0)
    scan = scan_datetime or injection + timedelta(minutes=50)
    if scan < injection:
        raise ValueError(f"scan_datetime {scan} precedes injection_datetime {injection}")
    out_dir = Path(out_dir)
    if out_dir.is_dir() and any(out_dir.glob("*.dcm")):
        raise FileExistsError(f"{out_dir} already holds DICOM files; refusing to mix series")
    out_dir.mkdir(parents=True, exist_ok=True)

    nz, ny, nx = activity.shape
    default_voxel = np.array(PHANTOM_FOV_MM) / np.array(activity.shape)
    row_mm, col_mm = pixel_spacing_mm or (float(default_voxel[1]), float(default_voxel[2]))
    slice_mm = float(slice_thickness_mm or default_voxel[0])

    # Header values are written as DS strings first and read back, so stored values and SUV use identical numbers.
    weight_ds, dose_ds, half_ds = _ds(weight_kg), _ds(dose_bq), _ds(half_life_s)
    decay_s = (scan - injection).total_seconds()
    lam = math.log(2) / float(half_ds)
    decayed_dose = float(dose_ds) * 2.0 ** (-decay_s / float(half_ds))
    to_admin = 2.0 ** (decay_s / float(half_ds)) if decay_correction == "ADMIN" else 1.0
    reference_dose = float(dose_ds) if decay_correction == "ADMIN" else decayed_dose
    bqml_factor = float(weight_ds) * 1000.0 / reference_dose
    counts_scale = 2.5
    values = activity.astype(np.float64) * to_admin
    if units == "GML":
        values = values * bqml_factor
    elif units == "CNTS":
        values = values / counts_scale
    in_frame = lam * frame_duration_s
    decay_factor = in_frame / (1.0 - math.exp(-in_frame)) * to_admin
    frame_reference_ms = 1000.0 * math.log(in_frame / (1.0 - math.exp(-in_frame))) / lam

    def uid(*parts: object) -> str:
        return generate_uid(entropy_srcs=["amyloid_pet_phantom", patient_id, str(seed), *map(str, parts)])

    study_uid, series_uid, frame_uid = uid("study"), uid("series"), uid("frame_of_reference")
    content = scan + timedelta(seconds=frame_duration_s + 300)
    x0 = -(nx - 1) / 2 * col_mm
    y0 = -(ny - 1) / 2 * row_mm
    z0 = -(nz - 1) / 2 * slice_mm
    paths = []
    for k in range(nz):
        sop_uid = uid("instance", k)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = PET_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.SOPClassUID = PET_IMAGE_STORAGE
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = scan.strftime("%Y%m%d")
        ds.SeriesDate = scan.strftime("%Y%m%d")
        ds.AcquisitionDate = scan.strftime("%Y%m%d")
        ds.ContentDate = content.strftime("%Y%m%d")
        ds.StudyTime = _tm(scan)
        ds.SeriesTime = _tm(scan)
        ds.AcquisitionTime = _tm(scan)
        ds.ContentTime = _tm(content)
        ds.AccessionNumber = ""
        ds.Modality = "PT"
        ds.Manufacturer = "neuro-monai-bundles synthetic phantom"
        ds.ManufacturerModelName = "amyloid_pet.make_amyloid_volume"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "Synthetic amyloid PET brain"
        ds.SeriesDescription = series_description
        ds.PatientName = patient_id
        ds.PatientID = patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = ""
        ds.PatientWeight = weight_ds
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 1
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = k + 1
        ds.PatientPosition = "HFS"
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = [_ds(x0), _ds(y0), _ds(z0 + k * slice_mm)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceLocation = _ds(z0 + k * slice_mm)
        ds.PixelSpacing = [_ds(row_mm), _ds(col_mm)]
        ds.SliceThickness = _ds(slice_mm)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ny
        ds.Columns = nx
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        peak = float(np.abs(values[k]).max())
        slope_ds = _ds(peak / 32767.0) if peak > 0 else "1"
        stored = np.clip(np.round(values[k] / float(slope_ds)), -32768, 32767).astype("<i2")
        ds.RescaleSlope = slope_ds
        ds.RescaleIntercept = "0"
        ds.LossyImageCompression = "00"
        # PET series / image modules
        ds.Units = units
        ds.CountsSource = "EMISSION"
        ds.SeriesType = ["STATIC", "IMAGE"]
        ds.NumberOfSlices = nz
        ds.CorrectedImage = ["NORM", "DTIM", "ATTN", "SCAT", "DECY", "RAN"]
        ds.RandomsCorrectionMethod = "DLYD"
        ds.AttenuationCorrectionMethod = "CTAC"
        ds.ScatterCorrectionMethod = "model-based"
        ds.DecayCorrection = decay_correction
        ds.ReconstructionMethod = "OSEM"
        ds.CollimatorType = "NONE"
        ds.FrameReferenceTime = _ds(frame_reference_ms)
        ds.ImageIndex = k + 1
        ds.ActualFrameDuration = int(round(frame_duration_s * 1000))
        ds.DecayFactor = _ds(decay_factor)
        item = Dataset()
        item.Radiopharmaceutical = "Florbetapir F^18^"
        item.RadiopharmaceuticalStartTime = _tm(injection)
        if write_start_datetime:
            item.RadiopharmaceuticalStartDateTime = injection.strftime("%Y%m%d%H%M%S.%f")
        item.RadionuclideTotalDose = dose_ds
        item.RadionuclideHalfLife = half_ds
        item.RadionuclidePositronFraction = "0.9673"
        code = Dataset()
        code.CodeValue = "C-111A1"
        code.CodingSchemeDesignator = "SRT"
        code.CodeMeaning = "^18^Fluorine"
        item.RadionuclideCodeSequence = DicomSequence([code])
        ds.RadiopharmaceuticalInformationSequence = DicomSequence([item])
        ds.PatientOrientationCodeSequence = DicomSequence([])
        ds.PatientGantryRelationshipCodeSequence = DicomSequence([])
        if units == "CNTS":
            block = ds.private_block(0x7053, PHILIPS_PRIVATE_CREATOR, create=True)
            block.add_new(0x00, "DS", _ds(counts_scale * bqml_factor))
            block.add_new(0x09, "DS", _ds(counts_scale))
        ds.PixelData = stored.tobytes()
        path = out_dir / f"IM{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _class_counts(n_subjects: int) -> list[int]:
    """Largest-remainder split of ``n_subjects`` in the reference proportions, at least 2 a class (n >= 6)."""
    total = sum(CLASS_COUNTS_REFERENCE)
    exact = [n_subjects * c / total for c in CLASS_COUNTS_REFERENCE]
    counts = [int(math.floor(e)) for e in exact]
    for i in sorted(range(3), key=lambda i: exact[i] - counts[i], reverse=True)[: n_subjects - sum(counts)]:
        counts[i] += 1
    floor = 2 if n_subjects >= 6 else 1
    for i in range(3):
        while counts[i] < floor:
            counts[int(np.argmax(counts))] -= 1
            counts[i] += 1
    return counts


def make_amyloid_dataset(
    out_dir: str | Path,
    n_subjects: int = 30,
    seed: int = 0,
    shape: Sequence[int] = (32, 64, 64),
) -> pd.DataFrame:
    """Write a synthetic amyloid PET DICOM cohort and its ``participants.csv``.

    Layout: ``out_dir/sub-XXX/ses-01/pet/IM0001.dcm ...`` (one series a subject) and ``out_dir/participants.csv``.
    Classes follow the reference negative/intermediate/positive proportions 291/78/234 (about 48/13/39 %),
    with at least 2 of each class from 6 subjects on (30 subjects: 14/4/12). Subjects get their own weight
    (45 .. 120 kg), F-18 dose (333 .. 407 MBq), uptake time (45 .. 55 min) and injection date-time.

    Args:
        out_dir: dataset root (created); must not already hold a ``participants.csv``.
        n_subjects: >= 3.
        seed: dataset seed (class order, subject parameters, volume seeds, UIDs).
        shape: ``(z, y, x)`` of each volume.

    Returns:
        The participants table: ``subject_id``, ``session_id``, ``diagnosis`` (negative/intermediate/positive),
        ``label`` (0/1/2), ``weight_kg``, ``injected_dose_bq``, ``uptake_min``, ``series_dir`` (relative to
        ``out_dir``, POSIX), ``n_instances``. The SUV factor is left to the manifest builder
        (``pipelines.io.suv.series_suv_factor`` on the written headers).

    Raises:
        ValueError: ``n_subjects`` < 3 or bad shape.
        FileExistsError: ``out_dir/participants.csv`` exists.
    """
    if int(n_subjects) < 3:
        raise ValueError(f"n_subjects must be >= 3 (one of each class), got {n_subjects}")
    shape = _check_shape(shape)
    out_dir = Path(out_dir)
    table_path = out_dir / "participants.csv"
    if table_path.exists():
        raise FileExistsError(f"{table_path} exists; refusing to overwrite a dataset")
    rng = np.random.default_rng([int(seed), 603])
    classes = np.repeat([0, 1, 2], _class_counts(int(n_subjects)))
    rng.shuffle(classes)
    rows = []
    for index, cls in enumerate(classes.tolist()):
        subject_id, session_id = f"sub-{index + 1:03d}", "ses-01"
        volume_seed = int(rng.integers(0, 2**31 - 1))
        weight = round(float(np.clip(rng.normal(75.0, 12.0), 45.0, 120.0)), 1)
        dose = round(float(rng.uniform(333e6, 407e6)), -4)
        uptake_s = float(rng.integers(45 * 60, 55 * 60 + 1))
        injection = datetime(2021, 1, 4, 8, 0, 0) + timedelta(days=index, minutes=int(rng.integers(0, 360)))
        activity = make_amyloid_volume(volume_seed, cls, shape)
        series_dir = Path(subject_id) / session_id / "pet"
        paths = write_pet_series(
            activity,
            out_dir / series_dir,
            weight_kg=weight,
            dose_bq=dose,
            injection_datetime=injection,
            scan_datetime=injection + timedelta(seconds=uptake_s),
            patient_id=subject_id,
            seed=int(seed),
        )
        rows.append({
            "subject_id": subject_id,
            "session_id": session_id,
            "diagnosis": CLASS_NAMES[cls],
            "label": cls,
            "weight_kg": weight,
            "injected_dose_bq": dose,
            "uptake_min": uptake_s / 60.0,
            "series_dir": series_dir.as_posix(),
            "n_instances": len(paths),
        })
    table = pd.DataFrame(rows)
    table.to_csv(table_path, index=False)
    return table


# ------------------------------------------------------------------------------------------------ bundle defaults

#: Named data sets of :func:`default_dataset` -> :func:`make_amyloid_dataset` arguments.
PRESETS = {
    # 60 subjects in the 291/78/234 proportions: 29 negative, 8 intermediate, 23 positive.
    "amyloid_pet": {"n_subjects": 60, "shape": (32, 64, 64)},
    # 12 subjects (5/2/5), small volumes: for tests.
    "amyloid_pet-tiny": {"n_subjects": 12, "shape": (20, 32, 32)},
}


def default_dataset(name: str = "amyloid_pet", seed: int = 0, **kwargs) -> str:
    """Path of the embedded amyloid PET phantom, generated into the cache on first use.

    Args:
        name: ``"amyloid_pet"`` (60 subjects, 32 x 64 x 64 voxels) or ``"amyloid_pet-tiny"`` (12 subjects,
            20 x 32 x 32; for tests).
        seed: phantom seed.
        kwargs: passed to :func:`make_amyloid_dataset` (part of the cache key).

    Returns:
        The data set folder (str): ``participants.csv`` and ``sub-XXX/ses-01/pet/*.dcm``. The cache is
        ``$NEURO_MONAI_CACHE/phantoms`` (default ``<repo>/.cache/phantoms``).

    Raises:
        ValueError: unknown ``name``.
    """
    return cached_dataset(name, seed, GENERATOR_VERSION, PRESETS, kwargs, "participants.csv",
                          into_new_folder(make_amyloid_dataset))


def example_series(name: str = "amyloid_pet", seed: int = 0, index: int = -1) -> str:
    """Series folder of one phantom subject (default: the last one), e.g. the inference example input."""
    root = Path(default_dataset(name, seed))
    table = pd.read_csv(root / "participants.csv", dtype=str)
    return str(root / table["series_dir"].iloc[index])
