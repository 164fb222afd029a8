"""Deterministic synthetic head-CT DICOM series with acute haemorrhage (the CT bundle's embedded default data).

Each synthetic study is an axial non-contrast head CT in real Hounsfield units:

* air -1000 HU outside the head, a scalp of soft tissue (+15..+30 HU);
* the skull, an elliptical shell about +1000 HU (dense outer/inner tables ~ +1250, diploe ~ +850) whose
  thickness varies around the head and is thicker at the skull base;
* brain parenchyma +30..+40 HU: a cortical grey-matter ribbon (+36..+40) folded by sulci, deep grey nuclei,
  white matter (+30..+33);
* CSF about +5 HU: a thin extra-axial rim, sulci, the interhemispheric fissure, lateral ventricles;
* optional acute haemorrhage +60..+90 HU on a contiguous range of slices: intraparenchymal blobs ("iph")
  or a subdural crescent along the inner table ("sdh").

Subjects vary in head size, in-plane rotation and position, skull thickness, ventricle size, tissue HU and
noise (Gaussian, 3-5 HU sd, after a slight in-plane blur that stands for partial volume). Everything is a
pure function of ``seed``: the same seed gives byte-identical pixel data and identical DICOM UIDs.

Outputs: :func:`make_head_ct_volume` (arrays), :func:`write_dicom_series` (one CT Image Storage series,
Explicit VR Little Endian), :func:`make_head_ct_dataset` (a folder of studies plus ``labels.csv``); the bundle's
defaults, generated once into the phantom cache: :func:`default_dataset` and :func:`example_series`.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds
from scipy.ndimage import gaussian_filter

from pipelines.phantoms.cache import cache_root, cached_dataset, into_new_folder

__all__ = [
    "AIR",
    "BONE",
    "CSF",
    "GENERATOR_VERSION",
    "GREY",
    "HAEMORRHAGE",
    "HEMORRHAGE_TYPES",
    "PRESETS",
    "SCALP",
    "TISSUE_NAMES",
    "WHITE",
    "default_dataset",
    "default_spacing",
    "example_series",
    "make_head_ct_dataset",
    "make_head_ct_volume",
    "write_dicom_series",
]

GENERATOR_VERSION = "1"
HEMORRHAGE_TYPES = ("none", "iph", "sdh")

#: Codes of the tissue label map returned by :func:`make_head_ct_volume`.
AIR, SCALP, BONE, GREY, WHITE, CSF, HAEMORRHAGE = range(7)
TISSUE_NAMES = {AIR: "air", SCALP: "scalp", BONE: "bone", GREY: "grey", WHITE: "white", CSF: "csf",
                HAEMORRHAGE: "haemorrhage"}

#: Reconstructed field of view (mm) used for the default in-plane pixel spacing: a typical adult head FOV.
DEFAULT_FOV_MM = 230.0
#: Default slice thickness = slice spacing (mm), a routine axial head-CT reconstruction.
DEFAULT_SLICE_MM = 5.0
#: Fewest haemorrhage voxels on a slice for it to count as a haemorrhage slice (smaller specks are removed).
MIN_LESION_VOXELS = 3

_HU_MIN, _HU_MAX = -1024, 3071
_UID_ROOT = "neuro_monai_bundles head_ct phantom v" + GENERATOR_VERSION


def default_spacing(shape: Sequence[int]) -> tuple[float, float, float]:
    """Voxel spacing (z, y, x) in mm for a ``(z, y, x)`` shape: 5 mm slices, a 230 mm field of view in-plane.

    E.g. ``(24, 128, 128)`` -> ``(5.0, 1.796875, 1.796875)``.
    """
    _, ny, nx = _check_shape(shape)
    return (DEFAULT_SLICE_MM, DEFAULT_FOV_MM / ny, DEFAULT_FOV_MM / nx)


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    if len(shape) != 3 or any(int(s) != s for s in shape):
        raise ValueError(f"shape must be three integers (z, y, x), got {shape!r}")
    nz, ny, nx = (int(s) for s in shape)
    if nz < 3 or ny < 32 or nx < 32:
        raise ValueError(f"shape (z, y, x) must be at least (3, 32, 32), got {tuple(shape)}")
    return nz, ny, nx


def _check_spacing(spacing: Sequence[float]) -> tuple[float, float, float]:
    if len(spacing) != 3 or not all(math.isfinite(float(s)) and float(s) > 0 for s in spacing):
        raise ValueError(f"spacing must be three positive numbers (z, y, x) in mm, got {spacing!r}")
    return tuple(float(s) for s in spacing)  # type: ignore[return-value]


@dataclass(frozen=True)
class _Head:
    """Per-subject anatomy and acquisition parameters drawn from the seed."""

    semi_x: float  # mm, left-right semi-axis of the outer skull surface at its widest slice
    semi_y: float  # mm, antero-posterior semi-axis
    yaw: float  # rad, in-plane rotation
    shift_x: float  # mm
    shift_y: float  # mm
    scalp_mm: float
    skull_mm: float  # mean skull thickness
    skull_phase: tuple[float, float]
    bone_density: float  # multiplies bone HU
    csf_rim_mm: float  # extra-axial CSF
    cortex_mm: float
    ventricle_scale: float
    hu_scalp: float
    hu_grey: float
    hu_white: float
    hu_csf: float
    noise_sd: float  # HU
    sulci: tuple[tuple[float, float], ...]  # (angle rad, depth mm below the cortex surface)


def _draw_head(rng: np.random.Generator) -> _Head:
    semi_x = float(rng.uniform(66.0, 76.0))
    n_sulci = int(rng.integers(26, 38))
    return _Head(
        semi_x=semi_x,
        semi_y=float(semi_x * rng.uniform(1.15, 1.27)),
        yaw=float(np.deg2rad(rng.uniform(-12.0, 12.0))),
        shift_x=float(rng.uniform(-6.0, 6.0)),
        shift_y=float(rng.uniform(-6.0, 6.0)),
        scalp_mm=float(rng.uniform(3.5, 6.0)),
        skull_mm=float(rng.uniform(5.5, 7.5)),
        skull_phase=(float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(0, 2 * np.pi))),
        bone_density=float(rng.uniform(0.93, 1.07)),
        csf_rim_mm=float(rng.uniform(1.2, 2.8)),
        cortex_mm=float(rng.uniform(3.0, 4.5)),
        ventricle_scale=float(rng.uniform(0.75, 1.5)),
        hu_scalp=float(rng.uniform(15.0, 30.0)),
        hu_grey=float(rng.uniform(36.0, 40.0)),
        hu_white=float(rng.uniform(30.0, 33.0)),
        hu_csf=float(rng.uniform(3.0, 8.0)),
        noise_sd=float(rng.uniform(3.0, 5.0)),
        sulci=tuple((float(a), float(d)) for a, d in zip(rng.uniform(-np.pi, np.pi, n_sulci),
                                                          rng.uniform(6.0, 16.0, n_sulci))),
    )


def _wrap(angle: np.ndarray) -> np.ndarray:
    return (angle + np.pi) % (2 * np.pi) - np.pi


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float, tilt: float) -> np.ndarray:
    c, s = math.cos(tilt), math.sin(tilt)
    xr, yr = c * (x - cx) + s * (y - cy), -s * (x - cx) + c * (y - cy)
    return (xr / a) ** 2 + (yr / b) ** 2 <= 1.0


def _largest_run(flags: np.ndarray) -> np.ndarray:
    """Keeps only the longest run of consecutive True values (first one on ties)."""
    best, best_len, start = None, 0, None
    for i, f in enumerate([*flags.tolist(), False]):
        if f and start is None:
            start = i
        elif not f and start is not None:
            if i - start > best_len:
                best, best_len = (start, i), i - start
            start = None
    out = np.zeros_like(flags, dtype=bool)
    if best is not None:
        out[best[0]:best[1]] = True
    return out


def make_head_ct_volume(
    seed: int,
    shape: Sequence[int] = (24, 128, 128),
    hemorrhage: str = "none",
    *,
    spacing: Sequence[float] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One synthetic axial head CT in HU.

    Slice 0 is the most inferior (near the skull base), the last slice near the vertex; rows run anterior to
    posterior and columns from the patient's right to left (DICOM LPS with an identity orientation). The
    anatomy depends only on ``seed``; ``hemorrhage`` adds a lesion without changing the anatomy.

    Args:
        seed: any non-negative integer; the same seed gives the same volume.
        shape: ``(z, y, x)`` voxels, at least ``(3, 32, 32)``.
        hemorrhage: ``"none"``, ``"iph"`` (intraparenchymal haematoma, 1-2 blobs) or ``"sdh"`` (subdural
            crescent along the inner table of one side).
        spacing: ``(z, y, x)`` voxel size in mm; default :func:`default_spacing` (5 mm, 230 mm FOV). The head
            is built in millimetres, so a smaller FOV crops it.

    Returns:
        ``(hu, slice_labels, mask)``: ``hu`` int16 ``(z, y, x)`` in HU (-1024..3071); ``slice_labels`` int64
        ``(z,)``, 1 where the slice contains haemorrhage (a contiguous run, or all 0); ``mask`` uint8
        ``(z, y, x)`` tissue labels (``AIR, SCALP, BONE, GREY, WHITE, CSF, HAEMORRHAGE`` = 0..6) before blur
        and noise.

    Raises:
        ValueError: bad shape, spacing or haemorrhage type.
    """
    nz, ny, nx = _check_shape(shape)
    if hemorrhage not in HEMORRHAGE_TYPES:
        raise ValueError(f"hemorrhage must be one of {HEMORRHAGE_TYPES}, got {hemorrhage!r}")
    dz, dy, dx = _check_spacing(default_spacing(shape) if spacing is None else spacing)
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    anat_ss, lesion_ss, noise_ss = np.random.SeedSequence(int(seed)).spawn(3)
    head = _draw_head(np.random.default_rng(anat_ss))

    # In-plane coordinates (mm) in the head's own frame; the head is centred, shifted and rotated.
    y = (np.arange(ny) - (ny - 1) / 2.0) * dy
    x = (np.arange(nx) - (nx - 1) / 2.0) * dx
    yy, xx = np.meshgrid(y, x, indexing="ij")
    xs, ys = xx - head.shift_x, yy - head.shift_y
    c, s = math.cos(head.yaw), math.sin(head.yaw)
    xr, yr = c * xs + s * ys, -s * xs + c * ys
    r = np.hypot(xr, yr)
    phi = np.arctan2(yr, xr)

    # Axial level u in (-0.47, 0.82) of a unit head ellipsoid: the stack spans skull base to near the vertex.
    u = -0.5 + 1.32 * (np.arange(nz) + 0.5) / nz
    zscale = np.sqrt(1.0 - u**2)
    radius2d = 1.0 / np.sqrt((np.cos(phi) / head.semi_x) ** 2 + (np.sin(phi) / head.semi_y) ** 2)
    depth = zscale[:, None, None] * radius2d[None] - r[None]  # mm inward from the outer skull surface

    base_thick = 1.0 + 0.6 * np.clip((-u - 0.25) / 0.25, 0.0, 1.0)  # thicker towards the skull base
    t_skull = (head.skull_mm * base_thick[:, None, None]
               * (1 + 0.22 * np.sin(2 * phi + head.skull_phase[0]) + 0.1 * np.sin(3 * phi + head.skull_phase[1]))[None])
    inner = depth - t_skull  # mm below the inner table (>= 0 inside the cranium)
    cortex_top = head.csf_rim_mm

    tissue = np.full((nz, ny, nx), AIR, dtype=np.uint8)
    tissue[depth >= -head.scalp_mm] = SCALP
    tissue[depth >= 0] = BONE
    tissue[inner >= 0] = CSF
    tissue[inner >= cortex_top] = GREY
    tissue[inner >= cortex_top + head.cortex_mm] = WHITE

    # Sulci: radial CSF clefts from the cortical surface, lined by grey matter.
    cleft = max(1.4, 0.8 * min(dx, dy))
    sulc_dist = np.full((ny, nx), np.inf)
    sulc_depth = np.zeros((ny, nx))
    for angle, sdepth in head.sulci:
        dphi = _wrap(phi - angle)
        dist = np.where(np.abs(dphi) < np.pi / 2, r * np.abs(np.sin(dphi)), np.inf)
        closer = dist < sulc_dist
        sulc_dist = np.where(closer, dist, sulc_dist)
        sulc_depth = np.where(closer, sdepth, sulc_depth)
    depth_mod = (0.75 + 0.25 * np.sin(2 * np.pi * u * 1.7 + head.skull_phase[0]))[:, None, None]
    within = (inner >= cortex_top) & (inner < cortex_top + sulc_depth[None] * depth_mod)
    tissue[within & (sulc_dist[None] < cleft / 2 + head.cortex_mm)] = GREY
    tissue[within & (sulc_dist[None] < cleft / 2)] = CSF
    tissue[(inner >= cortex_top) & (inner < cortex_top + head.cortex_mm)] = GREY

    supra = u > -0.3  # above the skull base
    # Interhemispheric fissure, with the falx region lined by grey matter, away from the ventricles.
    fissure_zone = (np.abs(yr) > 0.3 * head.semi_y)[None] & (inner >= 0) & supra[:, None, None]
    tissue[fissure_zone & (np.abs(xr) < cleft / 2 + head.cortex_mm)[None] & (tissue != CSF)] = GREY
    tissue[fissure_zone & (np.abs(xr) < cleft / 2)[None]] = CSF

    vs = head.ventricle_scale
    for k in range(nz):
        deep = max(0.0, 1.0 - ((u[k] + 0.1) / 0.22) ** 2)  # basal ganglia / thalami level
        if deep > 0:
            for side in (-1, 1):
                nuclei = _ellipse(xr, yr, side * 17.0, 2.0, 7.0 * math.sqrt(deep), 12.0 * math.sqrt(deep), side * 0.3)
                tissue[k][nuclei & (inner[k] >= cortex_top + head.cortex_mm)] = GREY
        vent = max(0.0, 1.0 - ((u[k] - 0.15) / 0.3) ** 2)  # lateral ventricles
        if vent > 0:
            prof = math.sqrt(vent)
            for side in (-1, 1):
                # Frontal horns close to the midline anteriorly (rows run anterior -> posterior), atria apart.
                body = _ellipse(xr, yr, side * (4.0 + 2.0 * vs), -4.0, max(1.0, 3.2 * vs * prof), 22.0 * prof,
                                -side * 0.22)
                tissue[k][body & (inner[k] >= cortex_top + head.cortex_mm)] = CSF
        third = max(0.0, 1.0 - ((u[k] + 0.12) / 0.12) ** 2)
        if third > 0:
            tissue[k][(np.abs(xr) < max(0.8, 1.2 * vs)) & (np.abs(yr - 4.0) < 10.0 * math.sqrt(third))] = CSF

    hu = np.empty((nz, ny, nx), dtype=np.float64)
    hu[tissue == AIR] = -1000.0
    hu[tissue == SCALP] = head.hu_scalp
    frac = np.clip(depth / np.maximum(t_skull, 1e-6), 0.0, 1.0)
    bone_hu = head.bone_density * (1250.0 - 400.0 * np.sin(np.pi * frac) ** 2)
    hu[tissue == BONE] = bone_hu[tissue == BONE]
    hu[tissue == GREY] = head.hu_grey
    hu[tissue == WHITE] = head.hu_white
    hu[tissue == CSF] = head.hu_csf

    if hemorrhage != "none":
        lesion, lesion_hu = _draw_lesion(np.random.default_rng(lesion_ss), hemorrhage, head, u, zscale, xr, yr, phi,
                                         inner, cortex_top, (dy, dx))
        lesion &= (inner >= 0)
        counts = lesion.reshape(nz, -1).sum(1)
        keep = _largest_run(counts >= MIN_LESION_VOXELS)
        lesion &= keep[:, None, None]
        tissue[lesion] = HAEMORRHAGE
        hu[lesion] = lesion_hu[lesion]

    noise_rng = np.random.default_rng(noise_ss)
    hu = gaussian_filter(hu, sigma=(0.0, 0.5, 0.5), mode="nearest")
    hu += noise_rng.normal(0.0, head.noise_sd, size=hu.shape)
    hu_int = np.clip(np.rint(hu), _HU_MIN, _HU_MAX).astype(np.int16)
    slice_labels = (tissue == HAEMORRHAGE).reshape(nz, -1).any(1).astype(np.int64)
    return hu_int, slice_labels, tissue


def _draw_lesion(
    rng: np.random.Generator,
    kind: str,
    head: _Head,
    u: np.ndarray,
    zscale: np.ndarray,
    xr: np.ndarray,
    yr: np.ndarray,
    phi: np.ndarray,
    inner: np.ndarray,
    cortex_top: float,
    pixel: tuple[float, float],
) -> tuple[np.ndarray, np.ndarray]:
    """Lesion mask and its HU (60..90) on a contiguous slice range of the supratentorial brain."""
    nz = u.size
    eligible = np.flatnonzero((zscale >= 0.8) & (u > -0.3))
    if eligible.size == 0:
        eligible = np.array([int(np.argmax(zscale))])
    n_el = eligible.size
    lo = min(3, n_el)
    hi = max(lo, min(n_el, max(3, nz // 3)))
    length = int(rng.integers(lo, hi + 1))
    z0 = int(eligible[int(rng.integers(0, n_el - length + 1))])
    ks = np.arange(nz)
    zc, half = z0 + (length - 1) / 2.0, length / 2.0
    zeta = (ks - zc) / half
    in_range = (ks >= z0) & (ks < z0 + length)
    taper = np.where(in_range, np.sqrt(np.clip(1.0 - 0.75 * zeta**2, 0.0, 1.0)), 0.0)[:, None, None]
    min_mm = 1.6 * max(pixel)
    base = float(rng.uniform(64.0, 82.0))
    texture = rng.normal(0.0, 1.0, size=xr.shape)
    texture = gaussian_filter(texture, 2.0)
    texture = 4.0 * texture / max(float(texture.std()), 1e-6)

    if kind == "iph":
        n_blobs = 1 if rng.random() < 0.7 else 2
        smin = float(zscale[in_range].min())
        ix, iy = (head.semi_x - head.skull_mm) * smin, (head.semi_y - head.skull_mm) * smin
        side = 1.0 if rng.random() < 0.5 else -1.0
        cx, cy = side * rng.uniform(0.25, 0.5) * ix, rng.uniform(-0.45, 0.45) * iy
        q = np.full(inner.shape, np.inf)
        for b in range(n_blobs):
            if b:
                cx, cy = cx + rng.uniform(-14.0, 14.0), cy + rng.uniform(-14.0, 14.0)
            a_mm = max(min_mm, float(rng.uniform(7.0, 16.0)))
            b_mm = max(min_mm, float(rng.uniform(7.0, 16.0)))
            tilt, wob = float(rng.uniform(0, np.pi)), float(rng.uniform(0, 2 * np.pi))
            cs, sn = math.cos(tilt), math.sin(tilt)
            lx, ly = cs * (xr - cx) + sn * (yr - cy), -sn * (xr - cx) + cs * (yr - cy)
            edge = 1.0 + 0.12 * np.sin(3 * np.arctan2(ly, lx) + wob)
            qb = np.sqrt((lx / a_mm) ** 2 + (ly / b_mm) ** 2) / edge
            q = np.minimum(q, qb[None] / np.maximum(taper, 1e-6))
        mask = (q <= 1.0) & (inner >= cortex_top)
        lesion_hu = base + 6.0 * (1.0 - np.clip(q, 0, 1) ** 2) - 3.0 + texture[None]
    else:
        centre = (0.0 if rng.random() < 0.5 else np.pi) + float(rng.uniform(-0.5, 0.5))
        half_width = float(rng.uniform(0.9, 1.3))
        t_max = max(min_mm, float(rng.uniform(5.0, 12.0)))
        dphi = np.abs(_wrap(phi - centre))
        profile = np.cos(np.pi / 2 * np.clip(dphi / half_width, 0.0, 1.0)) ** 0.8
        thickness = t_max * profile[None] * taper
        mask = (inner >= 0) & (inner < thickness)
        lesion_hu = base + texture[None] + np.zeros(inner.shape)
    return mask, np.clip(lesion_hu, 60.0, 90.0)


def _ds(value: float) -> str:
    """A DICOM DS string (at most 16 characters)."""
    value = float(value)
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return format_number_as_ds(value)


def _uid(*parts: object) -> str:
    return generate_uid(entropy_srcs=[_UID_ROOT, *map(str, parts)])


def write_dicom_series(
    hu: np.ndarray,
    out_dir: str | Path,
    *,
    spacing: Sequence[float] | None = None,
    rescale_slope: float = 1.0,
    rescale_intercept: float = -1024.0,
    patient_id: str = "PHANTOM-0001",
    patient_name: str | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    seed: int = 0,
    shuffle_files: bool = True,
    window: tuple[float, float] = (40.0, 80.0),
    overwrite: bool = False,
) -> list[Path]:
    """Writes a ``(z, y, x)`` HU volume as one axial CT Image Storage series (Explicit VR Little Endian).

    Stored values are ``round((hu - intercept) / slope)``: uint16 with PixelRepresentation 0 when all are
    >= 0 (the default intercept -1024 makes every HU >= -1024 non-negative), else int16 with
    PixelRepresentation 1. HU read back as ``stored * slope + intercept`` equal ``hu`` exactly when the
    slope is 1 and the intercept an integer. Slice ``k`` lies at z = ``(k - (nz - 1) / 2) * dz`` mm
    (ImagePositionPatient, increasing superiorly), InstanceNumber ``k + 1``; the image centre is at x = y = 0.
    All UIDs come from ``pydicom.uid.generate_uid`` with entropy from (patient_id, seed), so they are
    deterministic; dates are fixed, so the same inputs give byte-identical files.

    Args:
        hu: integer-valued HU volume ``(z, y, x)``, e.g. from :func:`make_head_ct_volume`.
        out_dir: folder to write into (created).
        spacing: ``(z, y, x)`` in mm (slice spacing = SliceThickness, row spacing, column spacing); default
            :func:`default_spacing`.
        rescale_slope: RescaleSlope, > 0.
        rescale_intercept: RescaleIntercept in HU.
        patient_id: PatientID (synthetic).
        patient_name: PatientName; default ``"PHANTOM^<id suffix>"``.
        study_uid: StudyInstanceUID; default derived from (patient_id, seed).
        series_uid: SeriesInstanceUID; default derived from (patient_id, seed).
        seed: entropy for UIDs and the file-name shuffle.
        shuffle_files: name files in a deterministic shuffled order (never slice order for >= 2 slices), so
            readers must sort by ImagePositionPatient; otherwise ``CT0000.dcm`` is slice 0.
        window: default display (WindowCenter, WindowWidth) in HU.
        overwrite: replace ``*.dcm`` files already in ``out_dir``; without it such files are an error.

    Returns:
        The written paths, in slice order (index ``k`` holds slice ``k``).

    Raises:
        ValueError: ``hu`` not a 3D integer-valued array, bad spacing/slope, or values that do not fit 16 bits.
        FileExistsError: ``out_dir`` already holds ``.dcm`` files and ``overwrite`` is False.
    """
    vol = np.asarray(hu)
    if vol.ndim != 3:
        raise ValueError(f"hu must be a 3D (z, y, x) array, got shape {vol.shape}")
    if not np.all(np.isfinite(vol)) or not np.array_equal(vol, np.rint(vol)):
        raise ValueError("hu must hold finite integer HU values")
    nz, ny, nx = vol.shape
    dz, dy, dx = _check_spacing(default_spacing(vol.shape) if spacing is None else spacing)
    if not (math.isfinite(rescale_slope) and rescale_slope > 0) or not math.isfinite(rescale_intercept):
        raise ValueError(f"rescale slope must be > 0 and intercept finite, got {rescale_slope}, {rescale_intercept}")
    stored = np.rint((vol.astype(np.float64) - rescale_intercept) / rescale_slope)
    if stored.min() >= 0 and stored.max() <= np.iinfo(np.uint16).max:
        stored, pixel_rep = stored.astype("<u2"), 0
    elif stored.min() >= np.iinfo(np.int16).min and stored.max() <= np.iinfo(np.int16).max:
        stored, pixel_rep = stored.astype("<i2"), 1
    else:
        raise ValueError(
            f"stored values {stored.min():.0f}..{stored.max():.0f} (slope {rescale_slope}, intercept "
            f"{rescale_intercept}) do not fit 16 bits"
        )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    existing = sorted(out.glob("*.dcm"))
    if existing:
        if not overwrite:
            raise FileExistsError(
                f"{out} already holds {len(existing)} .dcm files; pass overwrite=True to replace them"
            )
        for path in existing:
            path.unlink()

    study_uid = study_uid or _uid("study", patient_id, seed)
    series_uid = series_uid or _uid("series", patient_id, seed)
    frame_uid = _uid("frame-of-reference", patient_id, seed)
    if patient_name is None:
        suffix = patient_id[len("PHANTOM-"):] if patient_id.startswith("PHANTOM-") else patient_id
        patient_name = f"PHANTOM^{suffix}"
    order = np.arange(nz)
    if shuffle_files and nz > 1:
        order = np.random.default_rng(np.random.SeedSequence([int(seed), 7])).permutation(nz)
        if np.array_equal(order, np.arange(nz)):
            order = order[::-1].copy()

    x0, y0 = -(nx - 1) / 2.0 * dx, -(ny - 1) / 2.0 * dy
    paths = []
    for k in range(nz):
        sop_uid = _uid("sop", series_uid, k)
        z = (k - (nz - 1) / 2.0) * dz
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = "NMB_PHANTOM_" + GENERATOR_VERSION

        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = "20240101"
        ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = "120000"
        ds.AccessionNumber = ""
        ds.Modality = "CT"
        ds.Manufacturer = "neuro_monai_bundles"
        ds.ManufacturerModelName = "synthetic head CT phantom"
        ds.SoftwareVersions = "head_ct_phantom " + GENERATOR_VERSION
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "CT HEAD WO CONTRAST (synthetic phantom)"
        ds.SeriesDescription = f"Axial {_ds(dz)} mm brain (synthetic)"
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.PatientIdentityRemoved = "YES"
        ds.BodyPartExamined = "HEAD"
        ds.SliceThickness = _ds(dz)
        ds.SpacingBetweenSlices = _ds(dz)
        ds.KVP = "120"
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 2
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [_ds(x0), _ds(y0), _ds(z)]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = _ds(z)
        ds.ImageComments = "Synthetic phantom, not patient data"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = ny, nx
        ds.PixelSpacing = [_ds(dy), _ds(dx)]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = pixel_rep
        ds.WindowCenter = _ds(window[0])
        ds.WindowWidth = _ds(window[1])
        ds.RescaleIntercept = _ds(rescale_intercept)
        ds.RescaleSlope = _ds(rescale_slope)
        ds.RescaleType = "HU"
        ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
        path = out / f"CT{int(order[k]):04d}.dcm"
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths


def make_head_ct_dataset(
    out_dir: str | Path,
    n_studies: int = 12,
    seed: int = 0,
    slices: int = 24,
    size: int = 128,
    *,
    overwrite: bool = False,
) -> pd.DataFrame:
    """Writes ``n_studies`` synthetic head-CT series and a per-slice ``labels.csv``.

    Layout: ``out_dir/<study_id>/CTxxxx.dcm`` (one series per study, file names shuffled) and
    ``out_dir/labels.csv``. One study per subject: ``subject_id`` = PatientID = ``PHANTOM-0001``...,
    ``session_id`` = ``ses-01``, ``study_id`` = ``<subject_id>_ses-01``. About half the studies are positive
    (``(n_studies + 1) // 2``), alternating intraparenchymal and subdural haemorrhage, so both types appear
    from three studies on; the order of types over studies is shuffled by ``seed``.

    ``labels.csv`` has one row per slice: ``subject_id, session_id, study_id, series_dir`` (relative to
    ``out_dir``), ``slice_index`` (0 = most inferior, i.e. sorted by ImagePositionPatient z), ``file``
    (relative path of that slice), ``sop_instance_uid``, ``label`` (1 if the slice contains haemorrhage),
    ``study_label`` (1 if any slice does), ``hemorrhage_type`` (none/iph/sdh).

    Args:
        out_dir: output folder (created).
        n_studies: number of studies, >= 1.
        seed: master seed; the same seed gives byte-identical files.
        slices: slices per series (>= 3), 5 mm each.
        size: in-plane matrix (>= 32), 230 mm field of view.
        overwrite: replace an existing ``labels.csv`` and the ``.dcm`` files of the study folders written.

    Returns:
        The per-slice table written to ``labels.csv``.

    Raises:
        ValueError: bad counts or sizes.
        FileExistsError: ``out_dir/labels.csv`` exists and ``overwrite`` is False.
    """
    if int(n_studies) != n_studies or n_studies < 1:
        raise ValueError(f"n_studies must be an integer >= 1, got {n_studies!r}")
    shape = (int(slices), int(size), int(size))
    _check_shape(shape)
    out = Path(out_dir)
    labels_path = out / "labels.csv"
    if labels_path.exists() and not overwrite:
        raise FileExistsError(f"{labels_path} already exists; pass overwrite=True to regenerate the data set")
    out.mkdir(parents=True, exist_ok=True)

    n_pos = (n_studies + 1) // 2
    kinds = [("iph", "sdh")[i % 2] for i in range(n_pos)] + ["none"] * (n_studies - n_pos)
    master = np.random.SeedSequence(int(seed))
    type_ss, *study_ss = master.spawn(n_studies + 1)
    kinds = [kinds[i] for i in np.random.default_rng(type_ss).permutation(n_studies)]

    rows = []
    for i, (kind, ss) in enumerate(zip(kinds, study_ss)):
        study_seed = int(ss.generate_state(1, dtype=np.uint32)[0])
        subject_id = f"PHANTOM-{i + 1:04d}"
        study_id = f"{subject_id}_ses-01"
        hu, slice_labels, _ = make_head_ct_volume(study_seed, shape, kind)
        paths = write_dicom_series(hu, out / study_id, patient_id=subject_id, seed=study_seed, overwrite=overwrite)
        study_label = int(slice_labels.max())
        for k, path in enumerate(paths):
            rows.append({
                "subject_id": subject_id,
                "session_id": "ses-01",
                "study_id": study_id,
                "series_dir": study_id,
                "slice_index": k,
                "file": f"{study_id}/{path.name}",
                "sop_instance_uid": _uid("sop", _uid("series", subject_id, study_seed), k),
                "label": int(slice_labels[k]),
                "study_label": study_label,
                "hemorrhage_type": kind,
            })
    table = pd.DataFrame(rows)
    table.to_csv(labels_path, index=False)
    return table


# ------------------------------------------------------------------------------------------------ bundle defaults

#: Named data sets of :func:`default_dataset` -> :func:`make_head_ct_dataset` arguments.
PRESETS = {
    "head_ct": {"n_studies": 24, "slices": 24, "size": 128},
    "head_ct-tiny": {"n_studies": 6, "slices": 8, "size": 64},
}


def default_dataset(name: str = "head_ct", seed: int = 0, **kwargs: Any) -> str:
    """Path of the head-CT phantom data set, generated on first use into the cache (``$NEURO_MONAI_CACHE``).

    Args:
        name: ``"head_ct"`` (24 studies x 24 slices of 128x128, about 10 s to generate) or ``"head_ct-tiny"``
            (6 studies x 8 slices of 64x64: for tests).
        seed: generator seed.
        kwargs: passed to :func:`make_head_ct_dataset` (part of the cache key).

    Returns:
        The folder (str) holding one DICOM series folder per study and ``labels.csv``.

    Raises:
        ValueError: unknown name.
    """
    return cached_dataset(name, seed, GENERATOR_VERSION, PRESETS, kwargs, "labels.csv",
                          into_new_folder(make_head_ct_dataset))


def example_series(kind: str = "iph", seed: int = 0, slices: int = 24, size: int = 128) -> str:
    """A held-out phantom study (one DICOM series folder), generated on first use; never part of a data set.

    Args:
        kind: ``"iph"``, ``"sdh"`` or ``"none"``.
        seed: volume seed (the data sets draw theirs from other streams).
        slices, size: series shape.

    Returns:
        The series folder (str).
    """
    folder = cache_root() / "phantoms" / f"head_ct-example-v{GENERATOR_VERSION}-{kind}-seed{seed}-{slices}x{size}"
    if folder.is_dir() and any(folder.glob("*.dcm")):
        return str(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".head_ct-example-", dir=folder.parent))
    try:
        hu, _, _ = make_head_ct_volume(10_000 + seed, (slices, size, size), kind)
        write_dicom_series(hu, tmp, patient_id="PHANTOM-9001", seed=10_000 + seed)
        try:
            os.replace(tmp, folder)
        except OSError:
            if not any(folder.glob("*.dcm")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)
