"""PET manifests (one SUV factor per series), subject-level k-fold, and the bundle's SUV -> SUVR input chain."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import torch

from pipelines.io.suv import series_suv_factor
from pipelines.manifests.builders import build_pet_manifest
from pipelines.manifests.schema import ManifestError
from pipelines.phantoms.amyloid_pet import F18_HALF_LIFE_S, make_amyloid_dataset
from pipelines.training.pet_data import CLASS_NAMES, kfold_split, prepare_pet_data

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "amyloid_pet" / "configs"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pet") / "ds"
    make_amyloid_dataset(root, n_subjects=12, seed=3, shape=(20, 32, 32))
    return root


@pytest.fixture(scope="module")
def manifest(dataset) -> pd.DataFrame:
    return build_pet_manifest(dataset)


def _files(folder) -> list[Path]:
    return sorted(Path(folder).glob("*.dcm"))


def test_manifest_has_one_row_per_series_with_the_series_suv_factor(dataset, manifest):
    participants = pd.read_csv(dataset / "participants.csv")
    assert len(manifest) == len(participants) == 12
    assert manifest["subject_id"].tolist() == participants["subject_id"].tolist()
    assert manifest["label"].tolist() == participants["diagnosis"].tolist()
    assert (manifest["split"] == "").all()
    for row in manifest.itertuples():
        assert row.suv_factor == series_suv_factor(_files(row.image)).factor
        assert row.n_instances == 20 and row.suv_units == "BQML" and row.decay_correction == "START"


def test_manifest_factor_equals_weight_over_decayed_dose_from_the_participants_table(dataset, manifest):
    participants = pd.read_csv(dataset / "participants.csv").set_index("subject_id")
    for row in manifest.itertuples():
        p = participants.loc[row.subject_id]
        decayed = p.injected_dose_bq * 2.0 ** (-p.uptake_min * 60.0 / F18_HALF_LIFE_S)
        assert row.suv_factor == pytest.approx(p.weight_kg * 1000.0 / decayed, rel=1e-9)


def test_series_without_patient_weight_is_one_manifest_error_naming_the_folder(tmp_path):
    root = tmp_path / "ds"
    make_amyloid_dataset(root, n_subjects=3, seed=0, shape=(16, 16, 16))
    broken = root / "sub-002" / "ses-01" / "pet"
    for path in _files(broken):
        ds = pydicom.dcmread(path)
        del ds.PatientWeight
        ds.save_as(path)
    with pytest.raises(ManifestError, match=r"sub-002/ses-01/pet.*PatientWeight \(0010,1030\) missing"):
        build_pet_manifest(root)


def test_every_bad_series_is_listed_not_only_the_first(tmp_path):
    root = tmp_path / "ds"
    make_amyloid_dataset(root, n_subjects=3, seed=0, shape=(16, 16, 16))
    for sub in ("sub-001", "sub-003"):
        for path in _files(root / sub / "ses-01" / "pet"):
            ds = pydicom.dcmread(path)
            del ds.PatientWeight
            ds.save_as(path)
    with pytest.raises(ManifestError, match=r"^2 of 3 series cannot be used") as err:
        build_pet_manifest(root)
    assert "sub-001/ses-01/pet" in str(err.value) and "sub-003/ses-01/pet" in str(err.value)


def test_missing_series_folder_is_named(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    pd.DataFrame({"subject_id": ["sub-001"], "diagnosis": ["negative"]}).to_csv(root / "participants.csv",
                                                                               index=False)
    with pytest.raises(ManifestError, match=r"series folder not found: .*sub-001/ses-01/pet"):
        build_pet_manifest(root)


def test_kfold_test_folds_partition_the_subjects_without_overlap(manifest):
    subjects = set(manifest["subject_id"])
    seen: list[str] = []
    for fold in range(3):
        df = kfold_split(manifest, fold=fold, num_folds=3, seed=0, val_fraction=0.2)
        assert (df.groupby("subject_id")["split"].nunique() == 1).all()
        assert set(df["split"]) == {"train", "val", "test"}
        seen += df.loc[df["split"] == "test", "subject_id"].tolist()
        assert df.index.equals(manifest.index) and (df["suv_factor"] == manifest["suv_factor"]).all()
    assert sorted(seen) == sorted(subjects)  # every subject tested exactly once over the folds


def test_kfold_is_reproducible_and_depends_on_the_seed(manifest):
    a = kfold_split(manifest, fold=1, num_folds=3, seed=0)["split"].tolist()
    assert a == kfold_split(manifest, fold=1, num_folds=3, seed=0)["split"].tolist()
    assert any(kfold_split(manifest, fold=1, num_folds=3, seed=s)["split"].tolist() != a for s in (1, 2, 3))


@pytest.mark.parametrize("kwargs", [{"fold": 3, "num_folds": 3}, {"fold": 0, "num_folds": 1},
                                    {"fold": 0, "num_folds": 13}, {"fold": 0, "num_folds": 3, "val_fraction": 1.0}])
def test_kfold_rejects_bad_parameters(manifest, kwargs):
    with pytest.raises(ManifestError):
        kfold_split(manifest, **kwargs)


def test_prepare_pet_data_lists_carry_the_factor_and_the_split_is_written(dataset, manifest, tmp_path):
    data = prepare_pet_data(CLASS_NAMES, dataset_dir=dataset, output_dir=tmp_path, fold=2, num_folds=3, seed=0)
    factors = dict(zip(manifest["image"], manifest["suv_factor"]))
    records = data["train"] + data["val"] + data["test"]
    assert len(records) == 12
    assert all(r["suv_factor"] == factors[r["image"]] for r in records)
    assert {r["label"] for r in records} == {0, 1, 2}
    written = pd.read_csv(tmp_path / "data" / "manifest.csv")
    assert written["suv_factor"].tolist() == pytest.approx(data["manifest"]["suv_factor"].tolist(), rel=1e-12)
    # the written manifest is a valid input again (no SUV recomputation needed)
    again = prepare_pet_data(CLASS_NAMES, manifest=tmp_path / "data" / "manifest.csv", fold=2, num_folds=3, seed=0)
    assert [r["subject_id"] for r in again["test"]] == [r["subject_id"] for r in data["test"]]


def _parsed(config: str, overrides: dict, id_: str):
    from pipelines.bundles import read_config

    return read_config(BUNDLE / config, overrides).get_parsed_content(id_)


def test_itk_volume_times_manifest_factor_is_the_per_instance_suv(manifest):
    from monai.transforms import LoadImage

    from pipelines.io.suv import rescale_to_suv
    from transforms.pet import SUVScale

    row = manifest.iloc[0]
    volume = SUVScale(row.suv_factor)(LoadImage(reader="ITKReader", image_only=True)(row.image))
    files = sorted(_files(row.image), key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    for k in (0, 9, 19):
        ds = pydicom.dcmread(files[k])
        # ITK puts columns on axis 0 and rows on axis 1; every instance has its own RescaleSlope
        np.testing.assert_allclose(volume[:, :, k].numpy().T, rescale_to_suv(ds, row.suv_factor), rtol=1e-5,
                                   atol=1e-5)


def test_training_input_with_suv_factor_equals_inference_input_without_it(manifest):
    """SUVR divides the factor out: the training chain (ITK + SUVScaled) and the predictor's DICOM path agree."""
    from pipelines.inference.predict import ClassificationPredictor

    overrides = {"image_size": 32, "num_slices": 4}
    train_chain = _parsed("train.json", overrides, "validate#preprocessing")
    infer_chain = _parsed("inference.json", overrides, "preprocessing")
    row = manifest.iloc[0]
    record = {"image": row.image, "label": 0, "subject_id": row.subject_id, "suv_factor": row.suv_factor}
    trained = train_chain(record)
    predictor = ClassificationPredictor(torch.nn.Identity(), CLASS_NAMES, image_transform=None)
    inferred = infer_chain({"image": predictor.load_volume(Path(row.image))})
    assert len(trained) == len(inferred) == 4
    for a, b in zip(trained, inferred):
        assert a["slice_index"] == b["slice_index"]
        assert a["image"].shape == b["image"].shape == (1, 32, 32)
        np.testing.assert_allclose(a["image"].numpy(), b["image"].numpy(), rtol=1e-4, atol=1e-4)
    # SUVR scale: the phantom's white matter sits at 1.6 .. 2.0 x the reference
    assert 1.2 < float(max(a["image"].max() for a in trained)) < 4.0


def test_3d_chain_resizes_the_whole_volume(manifest):
    chain = _parsed("train.json", {"spatial_dims": 3, "volume_size": [24, 24, 16]}, "validate#preprocessing")
    row = manifest.iloc[1]
    out = chain({"image": row.image, "label": 1, "subject_id": row.subject_id, "suv_factor": row.suv_factor})
    assert tuple(out["image"].shape) == (1, 24, 24, 16)
    assert torch.isfinite(out["image"]).all()
