"""Deterministic synthetic Alzheimer-severity brain MRI phantom (the embedded default data set).

Each synthetic subject is a T1-like 3D head: scalp, skull, extra-axial CSF, a cortical grey-matter ribbon
folded by sulci, white matter, two lateral ventricles, and two hippocampi in the medial temporal lobes.
The four classes differ only by *graded atrophy*:

* ventricles enlarge,
* sulci widen and the cortex thins (the brain shrinks inside the skull, extra-axial CSF grows),
* hippocampi shrink (and the temporal horns around them fill with CSF),

on top of subject-level nuisance variation that is independent of the class: head size, head rotation,
global intensity scale, a smooth multiplicative bias field, Rician noise and a "normal" (age-like)
variation of ventricle size. Adjacent classes overlap in atrophy, so a model has to learn anatomy, not a
trivial cue such as brightness or head size.

Outputs (see :func:`generate_dataset`):

* ``slices/{train,test}/<Class>/sub-XXXX_ses-01_slice-ZZZ.png`` — axial 8-bit slices in the Kaggle
  Alzheimer folder layout (file names carry the subject id so manifests can split by subject);
* ``volumes/sub-XXXX/ses-01/anat/sub-XXXX_ses-01_T1w.nii.gz`` — ADNI/BIDS-style volumes (RAS, 1.5 mm);
* ``participants.tsv`` — subject_id, session_id, diagnosis, split (and the hidden atrophy index).

Everything is a pure function of ``seed``: the same seed gives byte-identical pixel data.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.phantoms.cache import cache_root, cached_dataset  # noqa: F401 (cache_root is used by other modules)

logger = logging.getLogger(__name__)

CLASS_NAMES = ["NonDemented", "VeryMildDemented", "MildDemented", "ModerateDemented"]
#: Subjects per class in the default set (about 50/35/11/4 %, like the Kaggle set's 50/35/14/1 % but with
#: at least three ModerateDemented subjects so every split can hold one).
DEFAULT_CLASS_COUNTS = (40, 28, 9, 3)
#: Mean atrophy index per class (0 = none, 1 = severe); subjects scatter around it (sd ATROPHY_SD).
CLASS_ATROPHY = (0.05, 0.35, 0.62, 0.88)
ATROPHY_SD = 0.07
GENERATOR_VERSION = "1"

# Tissue labels of the returned label map.
BACKGROUND, SCALP, SKULL, CSF, GM, WM, VENTRICLE, HIPPOCAMPUS = range(8)
TISSUE_T1 = {BACKGROUND: 0.0, SCALP: 0.62, SKULL: 0.08, CSF: 0.14, GM: 0.52, WM: 0.80, VENTRICLE: 0.12,
             HIPPOCAMPUS: 0.56}


@dataclass(frozen=True)
class SubjectParams:
    """Per-subject parameters drawn from the seed."""

    atrophy: float  # 0..1, the class-driven quantity
    head_scale: float  # multiplies head radii
    yaw: float  # rotation in the axial plane, radians
    pitch: float  # rotation in the sagittal plane, radians
    ventricle_normal: float  # class-independent ventricle size factor
    intensity: float  # global intensity scale
    noise_sd: float  # Rician noise sd in [0, 1] units
    bias: tuple[float, float, float, float]  # coefficients of the smooth bias field
    sulcus_phase: tuple[float, float]  # phase of the gyral pattern


def draw_subject(rng: np.random.Generator, label: int) -> SubjectParams:
    """Draw one subject's parameters for class ``label`` (0..3)."""
    atrophy = float(np.clip(rng.normal(CLASS_ATROPHY[label], ATROPHY_SD), 0.0, 1.0))
    return SubjectParams(
        atrophy=atrophy,
        head_scale=float(rng.uniform(0.9, 1.08)),
        yaw=float(rng.uniform(-0.14, 0.14)),
        pitch=float(rng.uniform(-0.08, 0.08)),
        ventricle_normal=float(rng.uniform(0.85, 1.15)),
        intensity=float(rng.uniform(0.85, 1.15)),
        noise_sd=float(rng.uniform(0.015, 0.04)),
        bias=tuple(float(v) for v in rng.uniform(-0.12, 0.12, size=4)),
        sulcus_phase=tuple(float(v) for v in rng.uniform(0, 2 * np.pi, size=2)),
    )


def _ellipsoid(x, y, z, centre, radii) -> np.ndarray:
    return ((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + ((z - centre[2]) / radii[2]) ** 2


def make_subject_volume(
    params: SubjectParams, shape: tuple[int, int, int] = (112, 136, 96), seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Render one T1-like head.

    Args:
        params: subject parameters (see :func:`draw_subject`).
        shape: volume shape (X, Y, Z) in RAS voxel order (X: left->right, Y: posterior->anterior,
            Z: inferior->superior). The field of view scales with the shape (1.5 mm voxels at the default).
        seed: seed of the noise.

    Returns:
        ``(image, labels)``: image float32 in [0, 1] (before 8-bit quantisation) and the tissue label map
        (uint8, values ``BACKGROUND..HIPPOCAMPUS``).
    """
    nx, ny, nz = shape
    # normalised coordinates in [-1, 1] along each axis, with isotropic physical scale (Y is the long axis)
    scale = max(shape) / 2.0
    gx = (np.arange(nx) - (nx - 1) / 2.0) / scale
    gy = (np.arange(ny) - (ny - 1) / 2.0) / scale
    gz = (np.arange(nz) - (nz - 1) / 2.0) / scale
    X, Y, Z = np.meshgrid(gx, gy, gz, indexing="ij")
    # rotate the head: yaw about Z, then pitch about X
    cy, sy = np.cos(params.yaw), np.sin(params.yaw)
    x1, y1 = cy * X - sy * Y, sy * X + cy * Y
    cp, sp = np.cos(params.pitch), np.sin(params.pitch)
    y2, z2 = cp * y1 - sp * Z, sp * y1 + cp * Z
    x2 = x1
    s = params.head_scale
    a = params.atrophy
    head_r = np.array([0.66, 0.84, 0.70]) * s
    r_head = np.sqrt(_ellipsoid(x2, y2, z2, (0, 0, 0.02), head_r))
    labels = np.zeros(shape, dtype=np.uint8)
    labels[r_head <= 1.0] = SCALP
    labels[r_head <= 0.95] = SKULL
    labels[r_head <= 0.89] = CSF
    # the brain shrinks inside the skull with atrophy
    brain_extent = 0.86 - 0.05 * a
    inside = r_head <= brain_extent
    # gyral folding: sulci are thin CSF sheets running in from the surface; they widen with atrophy
    theta = np.arctan2(y2, x2)
    phi = np.arctan2(z2, np.sqrt(x2**2 + y2**2) + 1e-6)
    folds = np.sin(9 * theta + params.sulcus_phase[0] + 2.5 * np.sin(3 * phi)) * np.sin(
        7 * phi + params.sulcus_phase[1] + 1.5 * np.cos(2 * theta)
    )
    depth_from_surface = brain_extent - r_head  # in r units
    sulcus_width = 0.10 + 0.30 * a  # fraction of the fold period that is CSF
    sulcus_depth = 0.10 + 0.06 * a
    sulcus = (np.abs(folds) < sulcus_width) & (depth_from_surface < sulcus_depth)
    gm_thickness = 0.085 - 0.03 * a
    labels[inside] = WM
    labels[inside & (depth_from_surface < gm_thickness + 0.02 * (folds > 0))] = GM
    labels[inside & sulcus] = CSF
    # interhemispheric fissure in the superior half, wider with atrophy
    labels[inside & (np.abs(x2) < (0.008 + 0.012 * a) * s) & (z2 > -0.05 * s)] = CSF
    # deep grey matter (thalami) beside the third ventricle
    for side in (-1, 1):
        labels[inside & (_ellipsoid(x2, y2, z2, (side * 0.09 * s, -0.12 * s, -0.04 * s), (0.07 * s, 0.09 * s, 0.07 * s)) <= 1.0)] = GM
    # lateral ventricles: two ellipsoids left/right of the midline, enlarging with atrophy
    v = params.ventricle_normal * (1.0 + 1.1 * a)
    for side in (-1, 1):
        body = _ellipsoid(x2, y2, z2, (side * 0.08 * s, -0.02 * s, 0.02 * s), (0.05 * v * s, 0.30 * s, 0.13 * v * s))
        horn = _ellipsoid(x2, y2, z2, (side * 0.06 * s, 0.20 * s, 0.0), (0.05 * v * s, 0.10 * s, 0.10 * v * s))
        labels[inside & ((body <= 1.0) | (horn <= 1.0))] = VENTRICLE
    # hippocampi: medial temporal lobes, inferior; they shrink and the temporal horn CSF around them grows
    h = 1.0 - 0.5 * a
    for side in (-1, 1):
        centre = (side * 0.27 * s, -0.10 * s, -0.20 * s)
        horn = _ellipsoid(x2, y2, z2, centre, (0.075 * s, 0.20 * s, 0.065 * s))
        hip = _ellipsoid(x2, y2, z2, centre, (0.06 * h * s, 0.18 * h * s, 0.05 * h * s))
        labels[inside & (horn <= 1.0)] = VENTRICLE
        labels[inside & (hip <= 1.0)] = HIPPOCAMPUS
    lut = np.array([TISSUE_T1[i] for i in range(len(TISSUE_T1))], dtype=np.float32)
    image = lut[labels]
    # smooth multiplicative bias field and global intensity scale (nuisance, class independent)
    b = params.bias
    bias = 1.0 + b[0] * X + b[1] * Y + b[2] * Z + b[3] * (X**2 - Y**2)
    image = image * bias.astype(np.float32) * params.intensity
    # Rician noise
    rng = np.random.default_rng(seed)
    n1 = rng.normal(0.0, params.noise_sd, size=shape).astype(np.float32)
    n2 = rng.normal(0.0, params.noise_sd, size=shape).astype(np.float32)
    image = np.sqrt((image + n1) ** 2 + n2**2)
    return np.clip(image, 0.0, 1.0).astype(np.float32), labels


def ventricle_fraction(labels: np.ndarray) -> float:
    """Ventricular CSF volume as a fraction of the intracranial volume (a class-signal check)."""
    intracranial = np.isin(labels, (CSF, GM, WM, VENTRICLE, HIPPOCAMPUS)).sum()
    return float((labels == VENTRICLE).sum() / max(intracranial, 1))


def _subject_plan(class_counts, seed, test_fraction):
    """Subjects in a fixed order with labels, params and split (stratified by class, by subject)."""
    rng = np.random.default_rng(seed)
    plan = []
    sid = 0
    for label, count in enumerate(class_counts):
        n_test = max(1, int(round(count * test_fraction))) if count >= 2 else 0
        order = rng.permutation(count)
        for k in range(count):
            sid += 1
            params = draw_subject(rng, label)
            split = "test" if order[k] < n_test else "train"
            plan.append((f"sub-{sid:04d}", label, params, split))
    return plan


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)


def generate_dataset(
    out_dir: str | os.PathLike,
    seed: int = 0,
    class_counts: tuple[int, ...] = DEFAULT_CLASS_COUNTS,
    shape: tuple[int, int, int] = (112, 136, 96),
    slices_per_subject: int = 8,
    slice_band: tuple[float, float] = (0.30, 0.62),
    test_fraction: float = 0.25,
    write_volumes: bool = True,
) -> Path:
    """Write the phantom data set to ``out_dir`` (atomically: built in a temporary folder, then renamed).

    Args:
        out_dir: destination folder; must not exist yet (use :func:`default_dataset` for the cache).
        seed: master seed; the same seed gives the same pixels.
        class_counts: subjects per class, in :data:`CLASS_NAMES` order.
        shape: volume shape (X, Y, Z); voxel size 1.5 mm * 112 / X.
        slices_per_subject: axial slices written per subject, evenly spaced within ``slice_band``.
        slice_band: range of Z (fractions of the volume height) the slices are taken from.
        test_fraction: fraction of each class's subjects in the test split.
        write_volumes: also write the 3D NIfTI volumes.

    Returns:
        ``out_dir`` as a Path.
    """
    import nibabel as nib
    from PIL import Image

    out_dir = Path(out_dir)
    if len(class_counts) != len(CLASS_NAMES):
        raise ValueError(f"class_counts needs {len(CLASS_NAMES)} entries, got {class_counts}")
    if out_dir.exists():
        raise FileExistsError(f"phantom output folder already exists: {out_dir}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".phantom-", dir=out_dir.parent))
    try:
        voxel = 1.5 * 112 / shape[0]
        affine = np.diag([voxel, voxel, voxel, 1.0])
        affine[:3, 3] = -(np.array(shape) - 1) / 2.0 * voxel
        rows = []
        z_idx = np.unique(
            np.round(np.linspace(slice_band[0], slice_band[1], slices_per_subject) * (shape[2] - 1)).astype(int)
        )
        for i, (sid, label, params, split) in enumerate(_subject_plan(class_counts, seed, test_fraction)):
            image, labels = make_subject_volume(params, shape, seed=seed * 100003 + i)
            cls = CLASS_NAMES[label]
            ses = "ses-01"
            slice_dir = tmp / "slices" / split / cls
            slice_dir.mkdir(parents=True, exist_ok=True)
            for z in z_idx:
                # PNG rows are Y (top = anterior), columns are X, so PIL/MONAI load it back as (X, Y)
                arr = _to_uint8(image[:, ::-1, z].T)
                Image.fromarray(arr).save(slice_dir / f"{sid}_{ses}_slice-{z:03d}.png", optimize=False)
            if write_volumes:
                vol_dir = tmp / "volumes" / sid / ses / "anat"
                vol_dir.mkdir(parents=True, exist_ok=True)
                nii = nib.Nifti1Image(_to_uint8(image), affine)
                nii.header.set_xyzt_units("mm")
                nii.set_qform(affine, code=1)
                nii.set_sform(affine, code=1)
                nib.save(nii, vol_dir / f"{sid}_{ses}_T1w.nii.gz")
            rows.append(
                {
                    "subject_id": sid,
                    "session_id": ses,
                    "diagnosis": cls,
                    "split": split,
                    "atrophy": round(params.atrophy, 4),
                    "ventricle_fraction": round(ventricle_fraction(labels), 5),
                }
            )
        import pandas as pd

        pd.DataFrame(rows).to_csv(tmp / "participants.tsv", sep="\t", index=False)
        (tmp / "phantom.json").write_text(
            json.dumps(
                {
                    "generator": "pipelines.phantoms.alzheimer",
                    "version": GENERATOR_VERSION,
                    "seed": seed,
                    "class_counts": dict(zip(CLASS_NAMES, class_counts)),
                    "shape": list(shape),
                    "slices_per_subject": int(len(z_idx)),
                    "slice_indices": [int(z) for z in z_idx],
                    "test_fraction": test_fraction,
                },
                indent=2,
            )
        )
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def default_dataset(name: str = "alzheimer", seed: int = 0, **kwargs) -> str:
    """Path of the embedded default data set, generating it on first use.

    Args:
        name: ``"alzheimer"`` (the default 80-subject set) or ``"alzheimer-tiny"`` (12 subjects, small
            volumes: for tests).
        seed: generator seed.
        kwargs: passed to :func:`generate_dataset` (they become part of the cache key).

    Returns:
        The data set folder (str), which holds ``slices/``, ``volumes/`` and ``participants.tsv``.
    """
    presets = {
        "alzheimer": {},
        "alzheimer-tiny": {"class_counts": (5, 4, 3, 3), "shape": (64, 80, 56), "slices_per_subject": 4},
    }
    return cached_dataset(name, seed, GENERATOR_VERSION, presets, kwargs, "participants.tsv", generate_dataset)


def example_volume(name: str = "alzheimer", seed: int = 0) -> str:
    """Path of the first test-split subject's NIfTI volume in the default phantom (generated on first use)."""
    import pandas as pd

    root = Path(default_dataset(name, seed))
    table = pd.read_csv(root / "participants.tsv", sep="\t")
    sid = table.loc[table["split"] == "test", "subject_id"].iloc[0]
    return str(root / "volumes" / sid / "ses-01" / "anat" / f"{sid}_ses-01_T1w.nii.gz")
