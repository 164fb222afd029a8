"""prepare_data: the bundle's data lists, with every check done before training starts."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipelines.io.images import ImageLoadError
from pipelines.manifests.schema import ManifestError
from pipelines.training.data import make_sampler, prepare_data

CLASSES = ["A", "B"]


def _tree(root, n=6):
    """Two classes, n subjects each, two slices per subject, BIDS-like names."""
    rng = np.random.default_rng(0)
    for c in CLASSES:
        for i in range(n):
            for k in range(2):
                path = root / "train" / c / f"sub-{c}{i:02d}_ses-01_slice-00{k}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(path)
    return root


def test_lists_hold_int_labels_and_ids_and_the_split_is_written(tmp_path):
    data = prepare_data(CLASSES, dataset_dir=_tree(tmp_path / "d"), output_dir=tmp_path / "o", seed=0)
    assert {r["label"] for r in data["train"]} == {0, 1}
    assert all(r["subject_id"].startswith("sub-") for r in data["train"])
    subjects = {s: {r["subject_id"] for r in data[s]} for s in ("train", "val", "test")}
    assert not (subjects["train"] & subjects["val"]) and not (subjects["train"] & subjects["test"])
    assert (tmp_path / "o" / "data" / "split.json").is_file()
    assert data["counts"]["train"]["images"] == len(data["train"])


def test_corrupt_image_fails_up_front_naming_it(tmp_path):
    root = _tree(tmp_path / "d")
    victim = sorted((root / "train" / "B").glob("*.png"))[5]
    victim.write_bytes(victim.read_bytes()[:40])
    with pytest.raises(ImageLoadError, match=victim.name):
        prepare_data(CLASSES, dataset_dir=root)


def test_no_source_and_missing_folder_are_errors(tmp_path):
    with pytest.raises(ManifestError, match="no data"):
        prepare_data(CLASSES)
    with pytest.raises(ManifestError, match="dataset_dir not found"):
        prepare_data(CLASSES, dataset_dir=tmp_path / "absent")


def test_manifest_with_relative_paths_is_resolved_next_to_it(tmp_path):
    root = _tree(tmp_path / "d")
    rows = ["subject_id,session_id,image,label,split"]
    for p in sorted(root.rglob("*.png")):
        rows.append(f"{p.name.split('_')[0]},ses-01,{p.relative_to(tmp_path)},{p.parent.name},")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    data = prepare_data(CLASSES, manifest=tmp_path / "m.csv", seed=1)
    assert sum(len(data[s]) for s in ("train", "val", "test")) == len(rows) - 1


def test_balanced_sampler_draws_classes_equally():
    records = [{"label": 0}] * 90 + [{"label": 1}] * 10
    sampler = make_sampler(records, balanced=True, seed=0, num_samples=4000)
    drawn = np.array([records[i]["label"] for i in sampler])
    assert abs(drawn.mean() - 0.5) < 0.05
    assert make_sampler(records, balanced=False) is None


def test_augmented_rows_outside_train_are_refused(tmp_path):
    from pipelines.restoration.augment import AugmentationLeakError

    root = _tree(tmp_path / "d")
    rows = ["subject_id,session_id,image,label,split,augmented"]
    for i, p in enumerate(sorted(root.rglob("*.png"))):
        split = "test" if i == 0 else ""
        rows.append(f"{p.name.split('_')[0]},ses-01,{p},{p.parent.name},{split},{'True' if i == 0 else 'False'}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(AugmentationLeakError, match="outside the train split"):
        prepare_data(CLASSES, manifest=tmp_path / "m.csv")
