"""The synthetic Alzheimer phantom: deterministic, brain-like, and with a graded atrophy signal."""

from __future__ import annotations

import hashlib

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from pipelines.io.images import load_grey_2d
from pipelines.phantoms import alzheimer as ph

TINY = dict(class_counts=(3, 2, 2, 2), shape=(48, 56, 40), slices_per_subject=3)


def _digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*.png")):
        h.update(p.name.encode())
        h.update(load_grey_2d(p).tobytes())
    for p in sorted(folder.rglob("*.nii.gz")):
        h.update(np.asarray(nib.load(p).dataobj).tobytes())
    return h.hexdigest()


def test_same_seed_gives_identical_pixels(tmp_path):
    a = ph.generate_dataset(tmp_path / "a", seed=3, **TINY)
    b = ph.generate_dataset(tmp_path / "b", seed=3, **TINY)
    c = ph.generate_dataset(tmp_path / "c", seed=4, **TINY)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_layout_counts_and_participants(tmp_path):
    out = ph.generate_dataset(tmp_path / "p", seed=0, **TINY)
    table = pd.read_csv(out / "participants.tsv", sep="\t")
    assert list(table.columns[:4]) == ["subject_id", "session_id", "diagnosis", "split"]
    assert table["diagnosis"].value_counts().to_dict() == dict(zip(ph.CLASS_NAMES, TINY["class_counts"]))
    # every class has at least one subject in test and in train (split by subject)
    for cls, g in table.groupby("diagnosis"):
        assert set(g["split"]) == {"train", "test"}, cls
    pngs = list((out / "slices").rglob("*.png"))
    assert len(pngs) == len(table) * TINY["slices_per_subject"]
    for p in pngs:
        split, cls = p.parent.parent.name, p.parent.name
        sid = p.name.split("_")[0]
        row = table.set_index("subject_id").loc[sid]
        assert (row["split"], row["diagnosis"]) == (split, cls)
    assert len(list((out / "volumes").rglob("*_T1w.nii.gz"))) == len(table)


def test_default_class_balance_is_close_to_the_real_set():
    counts = np.array(ph.DEFAULT_CLASS_COUNTS)
    frac = counts / counts.sum()
    assert np.allclose(frac, [0.50, 0.35, 0.11, 0.04], atol=0.03)
    assert counts[3] >= 3


@pytest.mark.parametrize("measure", ["ventricles", "hippocampus", "csf"])
def test_atrophy_signal_is_graded_by_class(measure):
    """Mean over subjects per class: ventricles and CSF grow, hippocampi shrink with severity."""
    rng = np.random.default_rng(0)
    means = []
    for label in range(4):
        vals = []
        for i in range(4):
            params = ph.draw_subject(rng, label)
            _, labels = ph.make_subject_volume(params, shape=(56, 68, 48), seed=i)
            intracranial = np.isin(labels, (ph.CSF, ph.GM, ph.WM, ph.VENTRICLE, ph.HIPPOCAMPUS)).sum()
            if measure == "ventricles":
                vals.append(ph.ventricle_fraction(labels))
            elif measure == "hippocampus":
                vals.append((labels == ph.HIPPOCAMPUS).sum() / intracranial)
            else:
                vals.append((labels == ph.CSF).sum() / intracranial)
        means.append(np.mean(vals))
    diffs = np.diff(means)
    if measure == "hippocampus":
        assert (diffs < 0).all(), means
    else:
        assert (diffs > 0).all(), means


def test_nuisance_variation_does_not_reveal_the_class():
    """Global brightness is not a shortcut: class means of image intensity overlap strongly."""
    rng = np.random.default_rng(1)
    brightness = {0: [], 3: []}
    for label in (0, 3):
        for i in range(6):
            img, _ = ph.make_subject_volume(ph.draw_subject(rng, label), shape=(40, 48, 36), seed=i)
            brightness[label].append(img[img > 0.3].mean())
    assert abs(np.mean(brightness[0]) - np.mean(brightness[3])) < 2 * np.std(brightness[0] + brightness[3])


def test_png_slices_match_the_volume_in_display_orientation(tmp_path):
    out = ph.generate_dataset(tmp_path / "o", seed=0, **TINY)
    png = sorted((out / "slices").rglob("*.png"))[0]
    sid, ses, sl = png.stem.split("_")
    z = int(sl.split("-")[1])
    vol = np.asarray(nib.load(out / "volumes" / sid / ses / "anat" / f"{sid}_{ses}_T1w.nii.gz").dataobj)
    # the PNG is the axial slice shown anterior-up: Y flipped, which is what inference does after slicing
    assert np.array_equal(load_grey_2d(png), vol[:, ::-1, z].astype(np.float32))


def test_default_dataset_is_generated_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NEURO_MONAI_CACHE", str(tmp_path))
    first = ph.default_dataset("alzheimer-tiny")
    mtime = (tmp_path / "phantoms").stat().st_mtime_ns
    assert ph.default_dataset("alzheimer-tiny") == first
    assert (tmp_path / "phantoms").stat().st_mtime_ns == mtime
    assert ph.example_volume("alzheimer-tiny").endswith("_T1w.nii.gz")
    with pytest.raises(ValueError, match="unknown phantom"):
        ph.default_dataset("nope")
