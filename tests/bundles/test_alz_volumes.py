"""alz_hybrid trained from NIfTI volumes (train_volumes.json) and evaluated per study (evaluate_volumes.json).

Runs the real ``python -m monai.bundle run`` on the tiny phantom with a tiny network: one epoch of training,
then the evaluation overlay stack train + train_volumes + evaluate + evaluate_volumes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
import pytest
import torch

from pipelines.bundles import load_config, read_config
from tests.bundles.bundle_utils import REPO_ROOT, bundle_env, overrides, run_monai_bundle

CONFIGS = REPO_ROOT / "bundles" / "alz_hybrid" / "configs"
TRAIN = [str(CONFIGS / "train.json"), str(CONFIGS / "train_volumes.json")]
EVALUATE = TRAIN + [str(CONFIGS / "evaluate.json"), str(CONFIGS / "evaluate_volumes.json")]
TINY_VOXEL = 1.5 * 112 / 64  # mm, the tiny phantom's voxel size
TINY_NET = dict(image_size=32, batch_size=16, num_workers=0, cnn_block="basic", cnn_layers=[1, 1],
                cnn_inplanes=[8, 16], hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32, val_fraction=0.2,
                num_slices=4, volume_pixdim=[TINY_VOXEL] * 3)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    return bundle_env(tmp_path_factory.mktemp("alz_volumes"))


@pytest.fixture(scope="module")
def phantom(env) -> Path:
    from pipelines.phantoms.alzheimer import default_dataset

    with mock.patch.dict(os.environ, {"NEURO_MONAI_CACHE": env["NEURO_MONAI_CACHE"]}):
        return Path(default_dataset("alzheimer-tiny"))


def _config_list(files: list[str]) -> str:
    return repr(files)


def test_volume_slices_equal_the_png_slices_of_the_same_subject(phantom):
    """Orientationd RAS + ExtractSlicesd + Flipd(1) + the 2D normalisation reproduce the PNG pipeline."""
    parser = read_config(TRAIN, {"dataset_dir": str(phantom), "image_size": 32, "num_slices": None,
                                 "slice_range": [0, 100], "min_foreground": 0.0, "volume_pixdim": [TINY_VOXEL] * 3})
    volume_t = parser.get_parsed_content("volume_preprocessing")
    sid = "sub-0004"
    nii = phantom / "volumes" / sid / "ses-01" / "anat" / f"{sid}_ses-01_T1w.nii.gz"
    slices = {s["slice_index"]: s["image"] for s in volume_t({"image": str(nii), "label": 0})}
    assert len(slices) == 56  # every axial slice of the 64x80x56 volume
    png_parser = load_config("alz_hybrid", "train.json", overrides={"image_size": 32})
    png_t = png_parser.get_parsed_content("validate#preprocessing")
    for z in (16, 28):
        png = phantom / "slices" / "test" / "NonDemented" / f"{sid}_ses-01_slice-{z:03d}.png"
        expected = png_t({"image": str(png), "label": 0})["image"]
        assert tuple(slices[z].shape) == (1, 32, 32)
        torch.testing.assert_close(torch.as_tensor(slices[z]), torch.as_tensor(expected), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def trained(env, phantom, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("alz_volumes_run")
    dirs = {"output_dir": out / "train", "ckpt_dir": out / "models", "eval_dir": out / "eval"}
    common = overrides(dataset_dir=phantom, output_dir=dirs["output_dir"], ckpt_dir=dirs["ckpt_dir"], **TINY_NET)
    run_monai_bundle("run", "--config_file", _config_list(TRAIN), *common, "--epochs", "1", env=env)
    run_monai_bundle("run", "--config_file", _config_list(EVALUATE), *common, "--eval_dir", str(dirs["eval_dir"]),
                     "--n_bootstrap", "50", "--tta_policies", "['none']", "--explain_per_class", "0", env=env)
    return dirs


def _runs(env: dict[str, str]):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("alz_hybrid")
    return {r.info.run_name.split("-")[-3]: r for r in client.search_runs([exp.experiment_id])}


@pytest.mark.slow
def test_training_from_volumes_builds_the_nifti_manifest_and_trains_on_slices(trained, env, phantom):
    manifest = pd.read_csv(trained["output_dir"] / "volumes_manifest.csv")
    assert len(manifest) == 15 and manifest["image"].str.endswith("_T1w.nii.gz").all()
    participants = pd.read_csv(phantom / "participants.tsv", sep="\t")
    assert set(manifest.loc[manifest["split"] == "test", "subject_id"]) == set(
        participants.loc[participants["split"] == "test", "subject_id"])
    assert (trained["ckpt_dir"] / "model.pt").is_file()
    split = json.loads((trained["output_dir"] / "data" / "split.json").read_text())
    n_train = split["counts"]["train"]["subjects"]
    run = _runs(env)["train"]
    assert run.info.status == "FINISHED"
    assert run.data.params["input"] == "volumes"
    assert int(run.data.params["n_train_slices"]) == 4 * n_train  # num_slices per training volume


@pytest.mark.slow
def test_evaluation_reports_study_level_next_to_slice_level(trained, env, phantom):
    participants = pd.read_csv(phantom / "participants.tsv", sep="\t")
    test_subjects = set(participants.loc[participants["split"] == "test", "subject_id"])
    study = json.loads((trained["eval_dir"] / "study" / "study_metrics.json").read_text())
    assert study["n_studies"] == len(test_subjects) == 4
    assert study["n_slices"] == 4 * len(test_subjects)
    assert set(study["study"]) == {"mean", "weighted"}
    assert study["position_weights"]["position"] == "rank"
    assert [r["position"] for r in study["position_weights"]["table"]] == [0, 1, 2, 3]
    for result in [study["slice"], *study["study"].values()]:
        assert 0.0 <= result["metrics"]["accuracy"] <= 1.0 and len(result["ci"]["accuracy"]) == 2
    slice_report = json.loads((trained["eval_dir"] / "metrics.json").read_text())
    assert slice_report["n_samples"] == study["n_slices"]
    predictions = pd.read_csv(trained["eval_dir"] / "study" / "study_predictions.csv")
    assert set(predictions["subject_id"]) == test_subjects
    mean = predictions[predictions["aggregation"] == "mean"]
    probs = mean[[c for c in mean.columns if c.startswith("prob_")]].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    run = _runs(env)["evaluate"]
    assert run.info.status == "FINISHED"
    assert run.data.metrics["study/n_studies"] == 4
    assert "study_weighted/balanced_accuracy" in run.data.metrics and "accuracy" in run.data.metrics
