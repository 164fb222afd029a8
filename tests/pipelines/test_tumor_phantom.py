"""The synthetic brain-tumour phantom: layout, determinism, subject ids, and the class-defining anatomy."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import binary_dilation, center_of_mass

from pipelines.phantoms import tumor

SMALL = {"train_per_class": 2, "test_per_class": 1, "slices_per_subject": 2, "size": 48}
NAME_RE = re.compile(r"^sub-\d{4}_ses-01_slice-\d{2}\.png$")


def _render(label: int, k: int, size: int = 128):
    params = tumor.draw_subject(np.random.default_rng(100 + k), label)
    return params, *tumor.render_slice(params, size, 0.0, seed=k)


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    return tumor.generate_dataset(tmp_path_factory.mktemp("ph") / "set", seed=3, **SMALL)


def test_layout_is_kaggle_training_testing_class_folders(small_set):
    for split, per_class in (("Training", 2), ("Testing", 1)):
        assert sorted(p.name for p in (small_set / split).iterdir()) == tumor.CLASS_NAMES
        for cls in tumor.CLASS_NAMES:
            files = sorted((small_set / split / cls).iterdir())
            assert len(files) == per_class * 2
            assert all(NAME_RE.match(f.name) for f in files)
    assert (small_set / "phantom.json").is_file() and (small_set / "participants.tsv").is_file()


def test_images_are_8bit_grey_of_the_requested_size(small_set):
    img = Image.open(next((small_set / "Training" / "glioma").iterdir()))
    assert img.mode == "L" and img.size == (48, 48)


def test_same_seed_gives_identical_pixels(small_set, tmp_path):
    again = tumor.generate_dataset(tmp_path / "again", seed=3, **SMALL)
    for path in sorted(small_set.rglob("*.png")):
        twin = again / path.relative_to(small_set)
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(twin)))


def test_other_seed_gives_other_pixels(small_set, tmp_path):
    other = tumor.generate_dataset(tmp_path / "other", seed=4, **SMALL)

    def pixels(root):
        return {np.asarray(Image.open(p)).tobytes() for p in root.rglob("*.png")}

    assert not pixels(small_set) & pixels(other)


def test_subjects_never_span_training_and_testing(small_set):
    ids = {split: {p.name[:8] for p in (small_set / split).rglob("*.png")} for split in ("Training", "Testing")}
    assert len(ids["Training"]) == 8 and len(ids["Testing"]) == 4
    assert not ids["Training"] & ids["Testing"]


def test_manifest_builder_reads_subject_ids_from_file_names(small_set):
    from pipelines.manifests.builders import from_class_folders

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no NoSubjectIdsWarning
        df = from_class_folders(small_set, class_names=tumor.CLASS_NAMES)
    assert set(df["split"]) == {"train", "test"}
    assert (df["subject_source"] == "filename").all()
    assert df.groupby("subject_id").size().eq(2).all()


@pytest.mark.parametrize("k", range(4))
def test_notumor_has_no_tumour_and_a_normal_gland(k):
    _, _, labels = _render(tumor.CLASS_NAMES.index("notumor"), k)
    assert not (labels == tumor.TUMOUR).any()
    assert (labels == tumor.GLAND).sum() > 0


@pytest.mark.parametrize("k", range(4))
def test_glioma_is_intra_axial_with_oedema(k):
    _, _, labels = _render(tumor.CLASS_NAMES.index("glioma"), k, size=256)
    mass = np.isin(labels, (tumor.TUMOUR, tumor.NECROSIS))
    assert mass.sum() > 0
    assert (labels == tumor.OEDEMA).sum() > mass.sum()  # the oedema is wider than the mass
    assert not (binary_dilation(mass, iterations=2) & (labels == tumor.SKULL)).any()  # never touches the skull


@pytest.mark.parametrize("k", range(4))
def test_meningioma_sits_on_the_skull_without_oedema(k):
    _, _, labels = _render(tumor.CLASS_NAMES.index("meningioma"), k, size=256)
    mass = labels == tumor.TUMOUR
    assert (binary_dilation(mass, iterations=2) & (labels == tumor.SKULL)).any()
    assert not (labels == tumor.OEDEMA).any()


@pytest.mark.parametrize("k", range(4))
def test_pituitary_mass_replaces_the_gland_in_the_midline(k):
    params, _, labels = _render(tumor.CLASS_NAMES.index("pituitary"), k)
    mass = labels == tumor.TUMOUR
    assert not (labels == tumor.GLAND).any()
    _, col = center_of_mass(mass)
    # the head is rotated and shifted by at most 0.2 rad / 0.03, so the sella stays within ~0.1 of the centre
    x = (col - (128 - 1) / 2.0) / 64.0
    assert abs(x) < 0.12
    assert mass.sum() > np.pi * (0.05 * 64) ** 2


def test_tumour_enhances_above_white_matter():
    params, image, labels = _render(tumor.CLASS_NAMES.index("meningioma"), 0)
    assert image[labels == tumor.TUMOUR].mean() > image[labels == tumor.WM].mean() + 0.1


def test_neighbouring_slices_differ_but_share_the_subject():
    params = tumor.draw_subject(np.random.default_rng(0), 0)
    a, _ = tumor.render_slice(params, 64, -0.12, seed=1)
    b, _ = tumor.render_slice(params, 64, 0.12, seed=2)
    assert not np.array_equal(a, b)
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.8


def test_default_dataset_is_generated_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NEURO_MONAI_CACHE", str(tmp_path))
    first = tumor.default_dataset("tumor-tiny")
    stamp = (tmp_path / "phantoms").joinpath(first.split("/")[-1], "phantom.json").stat().st_mtime_ns
    assert tumor.default_dataset("tumor-tiny") == first
    assert (tmp_path / "phantoms" / first.split("/")[-1] / "phantom.json").stat().st_mtime_ns == stamp
    assert len(list((tmp_path / "phantoms").iterdir())) == 1
    assert len(list((tmp_path / "phantoms" / first.split("/")[-1]).rglob("*.png"))) == 64


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda tmp: tumor.render_slice(tumor.draw_subject(np.random.default_rng(0), 0), 16), "size must be >= 32"),
        (lambda tmp: tumor.draw_subject(np.random.default_rng(0), 4), "label must lie in"),
        (lambda tmp: tumor.default_dataset("brain"), "unknown phantom 'brain'"),
        (lambda tmp: tumor.generate_dataset(tmp / "x", slices_per_subject=0), "slices_per_subject"),
    ],
)
def test_bad_arguments_raise_value_error(call, error, tmp_path):
    with pytest.raises(ValueError, match=error):
        call(tmp_path)


def test_existing_output_folder_is_refused(tmp_path):
    with pytest.raises(FileExistsError, match=str(tmp_path)):
        tumor.generate_dataset(tmp_path, **SMALL)
