"""Tests for pipelines.manifests.audit: subject overlap, exact/near duplicate images, pseudo subjects."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipelines.manifests.audit import (
    AuditReport,
    LeakageError,
    assert_no_subject_overlap,
    audit,
    duplicate_groups,
    hamming_groups,
    perceptual_hash,
    pseudo_subjects,
    subject_overlap,
)
from tests.conftest import shared_dataset


def _smooth_image(seed: int, size: int = 96) -> np.ndarray:
    """A grey 'anatomy-like' image: a random 6x6 field upsampled bicubically (distinct low frequencies per seed)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 6), dtype=np.uint8))
    return np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC))


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    """a.png; a_copy.png (byte copy); a.bmp (lossless re-encode); a_q70.jpg (lossy re-save); b.png; c.png; e.png."""
    a = _smooth_image(1)
    Image.fromarray(a).save(tmp_path / "a.png")
    shutil.copy(tmp_path / "a.png", tmp_path / "a_copy.png")
    Image.fromarray(a).save(tmp_path / "a.bmp")
    Image.fromarray(a).save(tmp_path / "a_q70.jpg", quality=70)
    for name, seed in (("b", 2), ("c", 3), ("e", 5)):
        Image.fromarray(_smooth_image(seed)).save(tmp_path / f"{name}.png")
    return tmp_path


@pytest.fixture
def manifest(image_dir: Path) -> pd.DataFrame:
    rows = [
        ("s1", "a.png", "train"),
        ("s1", "e.png", "train"),
        ("s2", "a_copy.png", "test"),  # exact copy of a train image
        ("s3", "b.png", "val"),
        ("s4", "a_q70.jpg", "val"),  # lossy re-save of a train image
        ("s5", "c.png", "test"),
    ]
    return pd.DataFrame({"subject_id": [r[0] for r in rows], "session_id": "ses-1", "image": [r[1] for r in rows],
                         "label": [0, 1, 0, 1, 0, 1], "split": [r[2] for r in rows]})


def _groups(image_dir: Path, names: list[str], **kwargs) -> pd.DataFrame:
    return duplicate_groups([image_dir / n for n in names], **kwargs).assign(name=names).set_index("name")


# ------------------------------------------------------------------------------------------ hashing


def test_exact_copy_shares_pixel_hash_and_exact_group(image_dir):
    g = _groups(image_dir, ["a.png", "a_copy.png", "b.png"])
    assert g.loc["a.png", "pixel_hash"] == g.loc["a_copy.png", "pixel_hash"]
    assert g.loc["a.png", "exact_group"] == g.loc["a_copy.png", "exact_group"] != g.loc["b.png", "exact_group"]
    assert g.loc["a.png", "exact_group_size"] == 2


def test_lossless_reencode_is_exact_duplicate(image_dir):
    assert (image_dir / "a.png").read_bytes() != (image_dir / "a.bmp").read_bytes()
    g = _groups(image_dir, ["a.png", "a.bmp"])
    assert g.loc["a.png", "pixel_hash"] == g.loc["a.bmp", "pixel_hash"]


def test_jpeg_resave_is_near_but_not_exact(image_dir):
    g = _groups(image_dir, ["a.png", "a_q70.jpg"])
    assert g.loc["a.png", "exact_group"] != g.loc["a_q70.jpg", "exact_group"]
    assert g.loc["a.png", "near_group"] == g.loc["a_q70.jpg", "near_group"]
    bits = [np.unpackbits(np.frombuffer(bytes.fromhex(h), np.uint8)) for h in g["phash"]]
    assert int((bits[0] != bits[1]).sum()) <= 4


def test_distinct_images_are_not_grouped(image_dir):
    g = _groups(image_dir, ["a.png", "b.png", "c.png", "e.png"])
    assert g["exact_group"].tolist() == [0, 1, 2, 3]
    assert g["near_group"].tolist() == [0, 1, 2, 3]
    assert (g["near_group_size"] == 1).all()


def test_near_false_leaves_phash_and_near_group_empty(image_dir):
    g = _groups(image_dir, ["a.png", "a_q70.jpg"], near=False)
    assert g["phash"].isna().all() and g["near_group"].isna().all()
    assert g["exact_group"].tolist() == [0, 1]


def test_perceptual_hash_sets_half_the_bits_and_survives_rescaling():
    img = _smooth_image(7, size=128)
    h = perceptual_hash(img)
    assert h.shape == (8, 8) and int(h.sum()) == 32  # median threshold of 64 distinct coefficients
    bigger = np.asarray(Image.fromarray(img).resize((300, 260), Image.Resampling.BILINEAR))
    assert int((perceptual_hash(bigger) != h).sum()) <= 2
    assert int((perceptual_hash(_smooth_image(8, size=128)) != h).sum()) > 16


def test_hamming_groups_links_within_distance_on_2000_hashes_quickly():
    rng = np.random.default_rng(0)
    packed = rng.integers(0, 256, (2000, 8), dtype=np.uint8)
    bits = np.unpackbits(packed, axis=1)
    bits[1999] = bits[0]
    bits[1999, [3, 17, 40]] ^= 1  # distance 3 -> linked
    bits[1998] = bits[5]
    bits[1998, [1, 2, 3, 4, 5]] ^= 1  # distance 5 -> not linked
    bits[11] = bits[10]
    bits[11, [0, 1]] ^= 1
    bits[12] = bits[11]
    bits[12, [60, 61, 62]] ^= 1  # 12-11 distance 3, 12-10 distance 5: linked through 11 (chain)
    packed = np.packbits(bits, axis=1)
    start = time.perf_counter()
    labels = hamming_groups(packed, max_distance=4)
    elapsed = time.perf_counter() - start
    assert labels[1999] == labels[0] and labels[1998] != labels[5]
    assert labels[10] == labels[11] == labels[12]
    assert len(np.unique(labels)) == 2000 - 3
    assert elapsed < 2.0


def test_unreadable_image_raises_naming_it(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match="broken.png: not a readable image"):
        duplicate_groups([tmp_path / "broken.png"])
    with pytest.raises(FileNotFoundError, match="missing.png"):
        duplicate_groups([tmp_path / "missing.png"])


# ------------------------------------------------------------------------------------------ subjects


def test_subject_overlap_lists_shared_ids_per_split_pair():
    df = pd.DataFrame({"subject_id": ["p1", "p1", "p2", "p2", "p3", "p4"], "image": list("abcdef"),
                       "split": ["train", "test", "train", "val", "val", "test"]})
    assert subject_overlap(df) == {"train|val": ["p2"], "train|test": ["p1"]}


def test_subject_overlap_empty_for_disjoint_splits(manifest):
    df = manifest.assign(subject_id=["s1", "s1", "s2", "s3", "s4", "s5"])
    assert subject_overlap(df) == {}
    assert_no_subject_overlap(df)


def test_assert_no_subject_overlap_raises_with_ids_and_counts():
    df = pd.DataFrame({"subject_id": [f"p{i}" for i in range(12)] * 2 + ["p0"],
                       "image": [f"{i}.png" for i in range(25)], "split": ["train"] * 12 + ["test"] * 12 + ["train"]})
    with pytest.raises(LeakageError, match="12 subject") as err:
        assert_no_subject_overlap(df)
    msg = str(err.value)
    assert "p0 (train: 2, test: 1)" in msg and "train|test: 12" in msg and "and 2 more" in msg


def test_missing_required_column_raises(manifest):
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['split'\]"):
        audit(manifest.drop(columns="split"))


# ------------------------------------------------------------------------------------------ audit


def test_audit_counts_cross_split_exact_and_near_groups(manifest, image_dir):
    report = audit(manifest, near=True, root=image_dir)
    assert report.n_images == 6 and report.n_subjects == 5
    assert report.images_per_split == {"train": 2, "val": 2, "test": 2}
    assert report.subject_overlap == {}
    assert (report.n_exact_groups, report.n_exact_groups_cross_split, report.n_images_in_cross_split_exact) == (1, 1, 2)
    # near group = a.png, a_copy.png, a_q70.jpg (train, val, test)
    assert (report.n_near_groups, report.n_near_groups_cross_split, report.n_images_in_cross_split_near) == (1, 1, 3)
    assert report.examples[0] == {"kind": "exact", "group": 0, "splits": ["train", "test"],
                                  "subjects": ["s1", "s2"], "images": ["a.png", "a_copy.png"]}
    assert report.examples[1]["kind"] == "near"
    assert report.examples[1]["splits"] == ["train", "val", "test"]
    assert report.has_leakage


def test_audit_reports_subject_overlap_and_same_file_in_two_splits(manifest, image_dir):
    df = pd.concat([manifest, pd.DataFrame([{"subject_id": "s5", "image": "b.png", "split": "train"}])])
    report = audit(df, root=image_dir, check_images=False)
    assert report.subject_overlap == {"train|test": ["s5"]}
    assert report.images_in_several_splits == ["b.png"]
    assert report.n_exact_groups is None


def test_audit_report_serialises_to_json_and_markdown(manifest, image_dir):
    report = audit(manifest, root=image_dir)
    data = json.loads(report.to_json())
    assert data["n_exact_groups_cross_split"] == 1 and data["has_leakage"] is True
    assert "groups" not in data
    assert data["examples"][0]["images"] == ["a.png", "a_copy.png"]
    md = report.to_markdown()
    assert "| exact-duplicate groups (all / across splits) | 1 / 1 |" in md
    assert "LEAKAGE FOUND" in md and "`a_copy.png`" in md


def test_audit_of_clean_manifest_finds_no_leakage(manifest, image_dir):
    report = audit(manifest[manifest["image"].isin(["a.png", "b.png", "c.png"])], root=image_dir)
    assert not report.has_leakage
    assert (report.n_exact_groups, report.n_near_groups) == (0, 0)
    assert isinstance(report, AuditReport)


def test_audit_reads_csv_manifest(manifest, image_dir, tmp_path):
    csv = tmp_path / "manifest.csv"
    manifest.to_csv(csv, index=False)
    assert audit(csv, root=image_dir).n_exact_groups_cross_split == 1


def test_pseudo_subjects_merges_subjects_linked_by_duplicates(manifest, image_dir):
    out = pseudo_subjects(manifest, groups_col="near_group", root=image_dir)
    by_image = out.set_index("image")["subject_id"]
    # s1 (a.png, e.png), s2 (a_copy) and s4 (a_q70) are one pseudo subject; s3, s5 keep their ids
    assert by_image["a.png"] == by_image["e.png"] == by_image["a_copy.png"] == by_image["a_q70.jpg"] == "dup-0"
    assert by_image["b.png"] == "s3" and by_image["c.png"] == "s5"
    assert out["orig_subject_id"].tolist() == manifest["subject_id"].tolist()
    assert (out.groupby("near_group")["subject_id"].nunique() == 1).all()


def test_pseudo_subjects_on_exact_groups_leaves_lossy_copy_alone(manifest, image_dir):
    report = audit(manifest, root=image_dir, near=False)
    out = pseudo_subjects(report.groups, groups_col="exact_group")
    by_image = out.set_index("image")["subject_id"]
    assert by_image["a.png"] == by_image["a_copy.png"] == by_image["e.png"] == "dup-0"
    assert by_image["a_q70.jpg"] == "s4"


# ------------------------------------------------------------------------------------------ real data


def test_brain_tumor_subset_has_no_exact_duplicates_and_a_known_cross_split_near_pair(tmp_path):
    root = shared_dataset("brain_tumor_mri_4class")
    files = pd.read_csv(root / "files.csv")
    known = ["Training/notumor/Tr-no_0699.jpg", "Testing/notumor/Te-no_0204.jpg"]  # same scan, re-encoded
    # A real exact cross-split duplicate: a Training image re-encoded losslessly (PNG) under a Testing folder.
    source = "Training/glioma/Tr-glTr_0000.jpg"
    copy = tmp_path / "Testing" / "glioma" / "Te-copy.png"
    copy.parent.mkdir(parents=True)
    Image.open(root / source).save(copy)
    df = pd.DataFrame({"subject_id": files["path"], "image": [str(root / p) for p in files["path"]],
                       "split": files["split"]})
    df = pd.concat([df, pd.DataFrame([{"subject_id": "copy", "image": str(copy), "split": "Testing"}])])
    start = time.perf_counter()
    report = audit(df, near=True)
    assert time.perf_counter() - start < 20
    # MANIFEST: the 800 chosen images are pixel-distinct, so the planted copy is the only exact group
    assert (report.n_exact_groups, report.n_exact_groups_cross_split) == (1, 1)
    exact = [ex for ex in report.examples if ex["kind"] == "exact"]
    assert exact[0]["images"] == sorted([str(root / source), str(copy)])
    g = report.groups.set_index("image")
    a, b = (str(root / p) for p in known)
    assert g.loc[a, "near_group"] == g.loc[b, "near_group"] and g.loc[a, "exact_group"] != g.loc[b, "exact_group"]
    assert report.n_near_groups_cross_split >= 2  # the planted copy and the known pair at least
