"""Deterministic synthetic brain-tumour MRI phantom: 2D T1 post-contrast-like slices in four classes.

Each synthetic subject is one head rendered as a simplified axial slice (a composite level that shows the
lateral ventricles and the midline sellar region at once): scalp, skull, extra-axial CSF, a cortical
grey-matter ribbon folded by sulci, white matter, lateral ventricles, the falx, and a small normal pituitary
gland in the sella. The classes follow the radiological description of each tumour type:

* ``glioma``: an intra-axial mass inside one hemisphere with an irregular, lobulated (infiltrative) border,
  a heterogeneous enhancing rim around a darker necrotic core, and a wide surrounding oedema (T1-hypointense,
  fuzzy border) that pushes the ventricles away;
* ``meningioma``: a round, sharply marginated, homogeneously enhancing extra-axial mass sitting on the inner
  skull surface (dural based) with a thin enhancing dural tail and a CSF cleft separating it from the brain;
* ``pituitary``: a round or lobulated homogeneously enhancing mass in the midline sella that replaces the
  normal gland (a macroadenoma);
* ``notumor``: normal anatomy only.

Class-independent nuisance variation (head size and shape, rotation, slice level, global intensity, contrast,
a smooth multiplicative bias field, Rician noise) is drawn per subject, so brightness, head size or noise
are no cue to the class. Tumour size and contrast vary, and small tumours are included, so the task is not
trivial. Every subject contributes ``slices_per_subject`` neighbouring slices (small changes of slice level
and tumour cross-section), so a split by image would leak subjects: file names carry the subject id.

Outputs (see :func:`generate_dataset`), in the Kaggle "Brain Tumor MRI" folder layout:

* ``Training/<class>/sub-XXXX_ses-01_slice-ZZ.png`` and ``Testing/<class>/...`` (8-bit grey PNG);
* ``participants.tsv``: subject_id, session_id, diagnosis, split and the hidden tumour parameters;
* ``phantom.json``: generator name, version and parameters (written last: marks a complete folder).

Everything is a pure function of ``seed``: the same seed gives byte-identical pixel data.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


logger = logging.getLogger(__name__)

__all__ = [
    "CLASS_NAMES",
    "TumourParams",
    "SubjectParams",
    "draw_subject",
    "render_slice",
    "generate_dataset",
    "default_dataset",
]

#: Kaggle folder names, in label order.
CLASS_NAMES = ["glioma", "meningioma", "notumor", "pituitary"]
GENERATOR_VERSION = "1"
#: Split folders of the Kaggle layout.
SPLIT_FOLDERS = {"train": "Training", "test": "Testing"}

# Tissue labels of the returned label map.
BACKGROUND, SCALP, SKULL, CSF, GM, WM, VENTRICLE, FALX, GLAND, OEDEMA, TUMOUR, NECROSIS = range(12)
#: T1 post-contrast-like intensities in [0, 1] before nuisance scaling.
TISSUE_T1 = {BACKGROUND: 0.0, SCALP: 0.70, SKULL: 0.07, CSF: 0.13, GM: 0.44, WM: 0.60, VENTRICLE: 0.11,
             FALX: 0.62, GLAND: 0.66, OEDEMA: 0.34, TUMOUR: 0.86, NECROSIS: 0.22}
#: Position of the sella (normalised image coordinates: x right, y anterior), before head rotation.
SELLA = (0.0, 0.36)


@dataclass(frozen=True)
class TumourParams:
    """Geometry of one tumour in normalised head coordinates ([-1, 1], head radius about 0.9).

    Attributes:
        centre: (x, y) of the mass centre.
        radius: mean radius of the mass.
        harmonics: (amplitude, phase) of boundary harmonics k = 2, 3, ...; amplitude 0 gives a circle.
        contrast: enhancement scale (multiplies the tumour intensity above white matter).
        necrosis: radius of the dark necrotic core as a fraction of ``radius`` (0: none).
        oedema: radius of the oedema as a multiple of ``radius`` (0: none).
        tail: half-length (radians along the skull) of the enhancing dural tail (0: none).
        angle: direction (radians) of the skull contact point, for extra-axial masses.
    """

    centre: tuple[float, float]
    radius: float
    harmonics: tuple[tuple[float, float], ...] = ()
    contrast: float = 1.0
    necrosis: float = 0.0
    oedema: float = 0.0
    tail: float = 0.0
    angle: float = 0.0


@dataclass(frozen=True)
class SubjectParams:
    """Per-subject parameters drawn from the seed (see :func:`draw_subject`)."""

    label: int
    head_radii: tuple[float, float]  # (x, y) semi-axes of the head outline
    rotation: float  # in-plane rotation, radians
    offset: tuple[float, float]  # head centre shift
    level: float  # slice level in [0, 1]: ventricle size and shape
    ventricle_scale: float  # class-independent ventricle size factor
    gland_radius: float  # normal pituitary gland radius
    intensity: float  # global intensity scale
    gamma: float  # contrast (gamma applied to [0, 1] intensities)
    noise_sd: float  # Rician noise sd, [0, 1] units
    bias: tuple[float, float, float]  # smooth bias field coefficients (x, y, x*y)
    sulcus_phase: tuple[float, float]
    tumour: TumourParams | None


def _harmonics(rng: np.random.Generator, amplitude: float, kmax: int) -> tuple[tuple[float, float], ...]:
    return tuple((float(rng.uniform(0.3, 1.0) * amplitude / np.sqrt(k - 1)), float(rng.uniform(0, 2 * np.pi)))
                 for k in range(2, kmax + 1))


def _draw_tumour(rng: np.random.Generator, label: int, head_radii: tuple[float, float]) -> TumourParams | None:
    name = CLASS_NAMES[label]
    if name == "glioma":
        side = rng.choice([-1.0, 1.0])
        radius = float(rng.uniform(0.07, 0.18))
        return TumourParams(
            centre=(float(side * rng.uniform(0.17, 0.36)), float(rng.uniform(-0.35, 0.30))),
            radius=radius,
            harmonics=_harmonics(rng, float(rng.uniform(0.12, 0.28)), 7),
            contrast=float(rng.uniform(0.55, 1.0)),
            necrosis=float(rng.uniform(0.35, 0.65)) if radius > 0.11 else 0.0,
            oedema=float(rng.uniform(1.5, 2.3)),
        )
    if name == "meningioma":
        angle = float(rng.uniform(0, 2 * np.pi))
        radius = float(rng.uniform(0.08, 0.19))
        # on the inner skull surface: the centre lies one radius (minus a little indentation) inside it
        inner = 0.86 * float(np.hypot(head_radii[0] * np.cos(angle), head_radii[1] * np.sin(angle)))
        dist = inner - 0.85 * radius
        return TumourParams(
            centre=(float(dist * np.cos(angle)), float(dist * np.sin(angle))),
            radius=radius,
            harmonics=_harmonics(rng, 0.04, 3),
            contrast=float(rng.uniform(0.7, 1.05)),
            tail=float(rng.uniform(0.12, 0.30)),
            angle=angle,
        )
    if name == "pituitary":
        radius = float(rng.uniform(0.06, 0.13))
        return TumourParams(
            centre=(float(SELLA[0] + rng.normal(0, 0.01)), float(SELLA[1] - 0.5 * radius + rng.normal(0, 0.01))),
            radius=radius,
            harmonics=_harmonics(rng, float(rng.uniform(0.03, 0.12)), 3),
            contrast=float(rng.uniform(0.6, 1.0)),
        )
    return None


def draw_subject(rng: np.random.Generator, label: int) -> SubjectParams:
    """Draw one subject's parameters for class ``label`` (index into :data:`CLASS_NAMES`)."""
    if not 0 <= int(label) < len(CLASS_NAMES):
        raise ValueError(f"label must lie in [0, {len(CLASS_NAMES)}), got {label}")
    head_radii = (float(rng.uniform(0.74, 0.84)), float(rng.uniform(0.86, 0.94)))
    return SubjectParams(
        label=int(label),
        head_radii=head_radii,
        rotation=float(rng.uniform(-0.2, 0.2)),
        offset=(float(rng.uniform(-0.03, 0.03)), float(rng.uniform(-0.03, 0.03))),
        level=float(rng.uniform(0.0, 1.0)),
        ventricle_scale=float(rng.uniform(0.8, 1.25)),
        gland_radius=float(rng.uniform(0.025, 0.042)),
        intensity=float(rng.uniform(0.8, 1.15)),
        gamma=float(rng.uniform(0.8, 1.25)),
        noise_sd=float(rng.uniform(0.01, 0.035)),
        bias=tuple(float(v) for v in rng.uniform(-0.15, 0.15, size=3)),
        sulcus_phase=tuple(float(v) for v in rng.uniform(0, 2 * np.pi, size=2)),
        tumour=_draw_tumour(rng, int(label), head_radii),
    )


def _blob(x: np.ndarray, y: np.ndarray, centre, radius: float, harmonics, scale: float = 1.0) -> np.ndarray:
    """Normalised radial distance to a star-shaped blob: < 1 inside, 1 on the border."""
    dx, dy = x - centre[0], y - centre[1]
    theta = np.arctan2(dy, dx)
    r = np.full_like(x, radius * scale)
    for k, (amp, phase) in enumerate(harmonics, start=2):
        r = r * (1.0 + amp * np.cos(k * theta + phase))
    return np.hypot(dx, dy) / np.maximum(r, 1e-6)


def render_slice(params: SubjectParams, size: int = 256, slice_offset: float = 0.0,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Render one 2D slice of a subject.

    Args:
        params: subject parameters (see :func:`draw_subject`).
        size: image side in pixels (>= 32).
        slice_offset: change of slice level in [-0.5, 0.5]; tumours shrink towards the edge of their extent
            (cross-section of a sphere), ventricles change with the level.
        seed: seed of the noise.

    Returns:
        ``(image, labels)``: image float32 ``(size, size)`` in [0, 1] (rows run anterior -> posterior, columns
        left -> right of the image) and the uint8 tissue label map (values ``BACKGROUND..NECROSIS``).
    """
    if int(size) < 32:
        raise ValueError(f"size must be >= 32 pixels, got {size}")
    if not -0.5 <= float(slice_offset) <= 0.5:
        raise ValueError(f"slice_offset must lie in [-0.5, 0.5], got {slice_offset}")
    g = (np.arange(size) - (size - 1) / 2.0) / (size / 2.0)
    X0, Y0 = np.meshgrid(g, -g, indexing="xy")  # y grows upwards (anterior at the top)
    c, s = np.cos(params.rotation), np.sin(params.rotation)
    xs, ys = X0 - params.offset[0], Y0 - params.offset[1]
    x, y = c * xs + s * ys, -s * xs + c * ys  # head coordinates
    ax, ay = params.head_radii
    r_head = np.hypot(x / ax, y / ay)
    labels = np.zeros((size, size), dtype=np.uint8)
    labels[r_head <= 1.0] = SCALP
    labels[r_head <= 0.94] = SKULL
    labels[r_head <= 0.86] = CSF
    brain = r_head <= 0.83
    depth = 0.83 - r_head
    theta = np.arctan2(y, x)
    # gyri: sulci curve as they run inwards and reach different depths
    p0, p1 = params.sulcus_phase
    folds = np.sin(15 * theta + p0 + 1.8 * np.sin(4 * theta + p1) + 25.0 * depth * np.sin(3 * theta + p1))
    sulcus_depth = 0.07 + 0.05 * (0.5 + 0.5 * np.sin(7 * theta + p0 + p1))
    labels[brain] = WM
    labels[brain & (depth < 0.065 + 0.03 * (folds > 0.3))] = GM
    labels[brain & (np.abs(folds) < 0.2) & (depth < sulcus_depth)] = CSF
    level = float(np.clip(params.level + slice_offset, 0.0, 1.0))
    # mass effect: a glioma with oedema pushes the midline structures away from its side
    shift = 0.0
    t = params.tumour
    if t is not None and t.oedema > 0:
        shift = -np.sign(t.centre[0]) * min(0.06, 0.35 * t.radius)
    # falx: thin midline sheet in the anterior and posterior interhemispheric fissure
    fissure = brain & (np.abs(x - shift * np.exp(-(y / 0.35) ** 2)) < 0.012) & (np.abs(y) > 0.32)
    labels[fissure] = FALX
    # lateral ventricles: frontal horns and bodies, larger and longer at higher levels
    vs = params.ventricle_scale * (0.75 + 0.5 * level)
    for side in (-1.0, 1.0):
        xm = x - shift
        body = ((xm - side * 0.07 * vs) / (0.04 * vs)) ** 2 + ((y + 0.10) / (0.14 + 0.06 * level)) ** 2
        # frontal horns diverge anteriorly; occipital horns posteriorly
        u = (xm - side * 0.085 * vs) * np.cos(0.5) - side * (y - 0.07) * np.sin(0.5)
        v = (xm - side * 0.085 * vs) * side * np.sin(0.5) + (y - 0.07) * np.cos(0.5)
        horn = (u / (0.045 * vs)) ** 2 + (v / 0.08) ** 2
        occ = ((xm - side * 0.12 * vs) / (0.03 * vs)) ** 2 + ((y + 0.30) / (0.05 + 0.04 * level)) ** 2
        labels[brain & ((body <= 1.0) | (horn <= 1.0) | (occ <= 1.0))] = VENTRICLE
    # normal pituitary gland in the sella (replaced by a pituitary macroadenoma)
    if t is None or CLASS_NAMES[params.label] != "pituitary":
        gland = np.hypot(x - SELLA[0], y - SELLA[1]) <= params.gland_radius
        labels[gland] = GLAND
    enhancement = np.zeros_like(x, dtype=np.float32)
    if t is not None:
        # spherical tumour: the cross-section shrinks away from the level of its largest diameter
        scale = float(np.sqrt(max(0.0, 1.0 - (slice_offset / 0.6) ** 2)))
        name = CLASS_NAMES[params.label]
        rho = _blob(x, y, t.centre, t.radius, t.harmonics, scale)
        if name == "glioma":
            rng_tex = np.random.default_rng(seed + 7)
            edema = _blob(x, y, t.centre, t.radius * t.oedema, t.harmonics[::-1], scale)
            labels[brain & (edema <= 1.0) & np.isin(labels, (WM, GM))] = OEDEMA
            labels[brain & (rho <= 1.0)] = TUMOUR
            if t.necrosis > 0:
                labels[brain & (rho <= t.necrosis)] = NECROSIS
            # heterogeneous (patchy) enhancement of the solid part
            patch = rng_tex.normal(0.0, 1.0, size=(max(4, size // 16),) * 2)
            from scipy.ndimage import zoom

            patch = zoom(patch, size / patch.shape[0], order=1)[:size, :size]
            enhancement = np.where(labels == TUMOUR, 0.12 * patch, 0.0).astype(np.float32)
        elif name == "meningioma":
            mass = rho <= 1.0
            # CSF cleft: the extra-axial mass displaces the brain, a thin CSF rim separates them
            cleft = (rho <= 1.12) & np.isin(labels, (GM, WM, VENTRICLE))
            labels[cleft] = CSF
            labels[mass & (r_head <= 0.9)] = TUMOUR
            # dural tail: thin enhancing dura along the inner skull surface on both sides of the mass
            dtheta = np.angle(np.exp(1j * (np.arctan2(y, x) - t.angle)))
            tail = (np.abs(dtheta) < t.tail * scale + 0.02) & (np.abs(r_head - 0.86) < 0.012)
            labels[tail] = TUMOUR
        else:  # pituitary
            labels[rho <= 1.0] = TUMOUR
    lut = np.array([TISSUE_T1[i] for i in range(len(TISSUE_T1))], dtype=np.float32)
    image = lut[labels]
    if t is not None:
        tumour_mask = labels == TUMOUR
        image[tumour_mask] = TISSUE_T1[WM] + t.contrast * (TISSUE_T1[TUMOUR] - TISSUE_T1[WM])
        image = image + enhancement
        # oedema fades into the surrounding white matter (infiltrative border)
        if np.any(labels == OEDEMA):
            from scipy.ndimage import gaussian_filter

            soft = gaussian_filter((labels == OEDEMA).astype(np.float32), sigma=size / 90.0)
            keep = np.isin(labels, (WM, GM, OEDEMA))
            base = lut[np.where(labels == OEDEMA, WM, labels)]
            image = np.where(keep, base + soft * (TISSUE_T1[OEDEMA] - TISSUE_T1[WM]), image)
    # smooth multiplicative bias field, contrast and global intensity (nuisance, class independent)
    b = params.bias
    image = image * (1.0 + b[0] * X0 + b[1] * Y0 + b[2] * X0 * Y0).astype(np.float32)
    image = np.clip(image, 0.0, 1.0) ** params.gamma * params.intensity
    rng = np.random.default_rng(seed)
    n1 = rng.normal(0.0, params.noise_sd, size=image.shape)
    n2 = rng.normal(0.0, params.noise_sd, size=image.shape)
    image = np.sqrt((image + n1) ** 2 + n2**2)
    return np.clip(image, 0.0, 1.0).astype(np.float32), labels


def _subject_plan(train_per_class: int, test_per_class: int, seed: int) -> list[tuple[str, int, SubjectParams, str]]:
    """Subjects in a fixed order: (subject_id, label, params, split)."""
    rng = np.random.default_rng(seed)
    plan = []
    sid = 0
    for label in range(len(CLASS_NAMES)):
        n = train_per_class + test_per_class
        test = set(rng.permutation(n)[:test_per_class].tolist())
        for k in range(n):
            sid += 1
            plan.append((f"sub-{sid:04d}", label, draw_subject(rng, label), "test" if k in test else "train"))
    return plan


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)


def generate_dataset(
    out_dir: str | os.PathLike,
    seed: int = 0,
    train_per_class: int = 36,
    test_per_class: int = 10,
    slices_per_subject: int = 2,
    size: int = 256,
) -> Path:
    """Write the phantom to ``out_dir`` (built in a temporary sibling folder, then renamed atomically).

    Args:
        out_dir: destination folder; must not exist yet (use :func:`default_dataset` for the cache).
        seed: master seed; the same seed gives the same pixels.
        train_per_class: subjects per class in ``Training``.
        test_per_class: subjects per class in ``Testing``.
        slices_per_subject: neighbouring slices written per subject (1..5).
        size: image side in pixels (>= 32).

    Returns:
        ``out_dir`` as a Path.

    Raises:
        ValueError: bad counts or sizes.
        FileExistsError: ``out_dir`` exists.
    """
    from PIL import Image

    if train_per_class < 1 or test_per_class < 1:
        raise ValueError(f"need >= 1 subject per class in each split, got train={train_per_class}, "
                         f"test={test_per_class}")
    if not 1 <= slices_per_subject <= 5:
        raise ValueError(f"slices_per_subject must lie in [1, 5], got {slices_per_subject}")
    if size < 32:
        raise ValueError(f"size must be >= 32 pixels, got {size}")
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"phantom output folder already exists: {out_dir}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".phantom-", dir=out_dir.parent))
    try:
        offsets = np.linspace(-0.12, 0.12, slices_per_subject) if slices_per_subject > 1 else np.zeros(1)
        rows = []
        for i, (sid, label, params, split) in enumerate(_subject_plan(train_per_class, test_per_class, seed)):
            cls = CLASS_NAMES[label]
            folder = tmp / SPLIT_FOLDERS[split] / cls
            folder.mkdir(parents=True, exist_ok=True)
            for j, off in enumerate(offsets):
                image, _ = render_slice(params, size, float(off), seed=(seed * 100003 + i) * 8 + j)
                Image.fromarray(_to_uint8(image)).save(folder / f"{sid}_ses-01_slice-{j:02d}.png", optimize=False)
            t = params.tumour
            rows.append({
                "subject_id": sid,
                "session_id": "ses-01",
                "diagnosis": cls,
                "split": split,
                "tumour_radius": round(t.radius, 4) if t else 0.0,
                "tumour_x": round(t.centre[0], 4) if t else np.nan,
                "tumour_y": round(t.centre[1], 4) if t else np.nan,
            })
        import pandas as pd

        pd.DataFrame(rows).to_csv(tmp / "participants.tsv", sep="\t", index=False)
        (tmp / "phantom.json").write_text(json.dumps({
            "generator": "pipelines.phantoms.tumor",
            "version": GENERATOR_VERSION,
            "seed": seed,
            "class_names": CLASS_NAMES,
            "train_per_class": train_per_class,
            "test_per_class": test_per_class,
            "slices_per_subject": slices_per_subject,
            "size": size,
        }, indent=2) + "\n")
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


#: Named presets of :func:`default_dataset`.
PRESETS = {
    "tumor": {},
    "tumor-tiny": {"train_per_class": 6, "test_per_class": 2, "slices_per_subject": 2, "size": 64},
}


def default_dataset(name: str = "tumor", seed: int = 0, **kwargs) -> str:
    """Path of the embedded default data set, generating it into the cache on first use.

    The cache is ``$NEURO_MONAI_CACHE`` or ``<repo>/.cache`` (see
    :func:`pipelines.phantoms.cache.cache_root`).

    Args:
        name: ``"tumor"`` (46 subjects per class, 2 slices each, 256 px: 288 training and 80 test images) or
            ``"tumor-tiny"`` (8 subjects per class, 64 px: for tests).
        seed: generator seed.
        kwargs: passed to :func:`generate_dataset` (they become part of the cache key).

    Returns:
        The data set folder (str) holding ``Training/``, ``Testing/``, ``participants.tsv`` and ``phantom.json``.
    """
    from pipelines.phantoms.cache import cached_dataset

    return cached_dataset(name, seed, GENERATOR_VERSION, PRESETS, kwargs, "phantom.json", generate_dataset)


def subject_params_dict(params: SubjectParams) -> dict:
    """JSON-ready dict of a subject's parameters (for debugging and documentation)."""
    return asdict(params)
