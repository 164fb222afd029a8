"""amyloid_pet end to end through the real ``python -m monai.bundle`` on the tiny PET DICOM phantom.

One module-scoped training run (fold 0 of 3, 1 epoch, tiny DenseNet, 32 px slices) feeds the evaluate, inference
and export tests.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch

from pipelines.bundles import load_config
from tests.bundles.bundle_utils import REPO_ROOT, bundle_env, overrides, run_monai_bundle
from tests.conftest import SHARED_SCHEMA

pytestmark = pytest.mark.slow
CFG = "bundles/amyloid_pet/configs"
NET_KW = {"init_features": 8, "growth_rate": 8, "block_config": [2, 2, 2, 2]}
TINY = overrides(image_size=32, num_slices=4, num_workers=0, batch_size=4, network_kwargs=NET_KW)
TINY_DATA = ["--dataset_dir", "$pipelines.training.pet_data.default_dataset('amyloid_pet-tiny')", "--num_folds", "3"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("amyloid")
    env = bundle_env(root)
    out = root / "train"
    run_monai_bundle(
        "run", "--config_file", f"{CFG}/train.json", *TINY_DATA, *TINY, "--epochs", "1",
        "--output_dir", str(out), "--ckpt_dir", str(root / "models"), env=env,
    )
    return {"root": root, "env": env, "out": out, "ckpt": root / "models" / "model.pt"}


def _client(env):
    return mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])


def _runs(env, stage_filter):
    client = _client(env)
    exp = client.get_experiment_by_name("amyloid_pet")
    return client, client.search_runs(exp.experiment_id, filter_string=stage_filter)


def test_training_logs_a_finished_mlflow_run_with_fold_and_network(trained):
    client, runs = _runs(trained["env"], "attributes.run_name LIKE 'amyloid_pet-fold0-train-%'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    for key in ("train_loss", "val_macro_f1", "val_macro_auc", "val_recall_intermediate"):
        assert key in run.data.metrics
    params = run.data.params
    assert (params["fold"], params["num_folds"], params["network"]) == ("0", "3", "densenet121")
    assert params["spatial_dims"] == "2"
    assert params["balanced_sampler"] == "True" and params["augment"] == "True"
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model.pt", "split.json", "config_executed.json"} <= arts
    assert trained["ckpt"].is_file()


def test_split_is_kfold_by_subject_and_the_manifest_holds_the_series_suv_factor(trained):
    from pipelines.io.suv import series_suv_factor

    df = pd.read_csv(trained["out"] / "data" / "manifest.csv")
    assert len(df) == 12 and set(df["split"]) == {"train", "val", "test"}
    assert (df.groupby("subject_id")["split"].nunique() == 1).all()
    assert set(df.loc[df["split"] == "test", "fold"]) == {0}
    row = df.iloc[0]
    assert row["suv_factor"] == pytest.approx(series_suv_factor(sorted(Path(row["image"]).glob("*.dcm"))).factor,
                                              rel=1e-12)
    params = json.loads((trained["out"] / "data" / "split.json").read_text())["params"]
    assert (params["fold"], params["num_folds"], params["seed"]) == (0, 3, 0)


def test_evaluate_writes_metrics_with_cis_and_clustered_embeddings_to_mlflow(trained):
    eval_dir = trained["root"] / "eval"
    run_monai_bundle(
        "run", "--config_file", f"['{CFG}/train.json','{CFG}/evaluate.json']", *TINY_DATA, *TINY,
        "--output_dir", str(trained["out"]), "--ckpt_dir", str(trained["root"] / "models"),
        "--eval_dir", str(eval_dir), "--n_bootstrap", "50", "--explain_per_class", "1", env=trained["env"],
    )
    manifest = pd.read_csv(trained["out"] / "data" / "manifest.csv")
    n_test = int((manifest["split"] == "test").sum())
    result = json.loads((eval_dir / "metrics.json").read_text())
    assert result["n_samples"] == 4 * n_test  # 4 axial slices per test series
    for k in ("accuracy", "macro_f1"):
        assert result["ci"][k][0] <= result["metrics"][k] <= result["ci"][k][1]
    subject = json.loads((eval_dir / "subject_level" / "metrics.json").read_text())
    assert subject["n_samples"] == n_test
    embeddings = pd.read_csv(eval_dir / "embeddings" / "embeddings.csv")
    summary = json.loads((eval_dir / "embeddings" / "embeddings.json").read_text())
    assert len(embeddings) == 4 * n_test and summary["layer"] == "class_layers.flatten"
    assert set(embeddings["cluster"]) <= {0, 1, 2} and -0.5 <= summary["ari"] <= 1.0
    assert (eval_dir / "embeddings" / "embeddings_pca.png").is_file()
    for name in ("confusion_matrix.png", "calibration.json", "tta.csv"):
        assert (eval_dir / name).is_file(), name
    client, runs = _runs(trained["env"], "tags.stage = 'evaluation'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    metrics = runs[0].data.metrics
    assert metrics["embedding_ari"] == pytest.approx(summary["ari"])
    assert metrics["subject_macro_f1"] == pytest.approx(subject["metrics"]["macro_f1"])
    arts = {a.path for a in client.list_artifacts(runs[0].info.run_id, "embeddings")}
    assert {"embeddings/embeddings.csv", "embeddings/embeddings_pca.png", "embeddings/embeddings.json"} <= arts


def test_inference_on_a_dicom_series(trained):
    from pipelines.training.pet_data import example_series

    os.environ["NEURO_MONAI_CACHE"] = trained["env"]["NEURO_MONAI_CACHE"]
    try:
        series = example_series("amyloid_pet-tiny")
    finally:
        os.environ.pop("NEURO_MONAI_CACHE")
    out = trained["root"] / "inference"
    run_monai_bundle(
        "run", "--config_file", f"{CFG}/inference.json", *TINY, "--ckpt_path", str(trained["ckpt"]),
        "--input_path", series, "--output_dir", str(out), env=trained["env"],
    )
    pred = json.loads((out / "predictions.json").read_text())
    assert pred["model"] == {"name": "amyloid_pet", "version": "0.1.3"}
    (study,) = pred["studies"]
    assert study["input_kind"] == "volume" and study["n_slices"] == 4
    assert study["predicted_class"] in ("negative", "intermediate", "positive")
    assert sum(study["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert len(pd.read_csv(out / "predictions.csv")) == 4


def test_torchscript_export_equals_eager(trained):
    ts = trained["root"] / "model.ts"
    run_monai_bundle(
        "ckpt_export", "network_def", "--filepath", str(ts), "--ckpt_file", str(trained["ckpt"]),
        "--meta_file", f"{CFG}/metadata.json", "--config_file", f"{CFG}/inference.json", *TINY,
        env=trained["env"],
    )
    scripted = torch.jit.load(str(ts))
    parser = load_config("amyloid_pet", "inference.json", overrides={"image_size": 32, "network_kwargs": NET_KW})
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(trained["ckpt"], weights_only=True))
    net.eval()
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(scripted(x), net(x), atol=1e-5)


def test_metadata_verifies_against_the_schema():
    from monai.bundle import verify_metadata

    if not SHARED_SCHEMA.is_file():
        pytest.skip(f"schema not found at {SHARED_SCHEMA}")
    # same check as `python -m monai.bundle verify_metadata`, in-process; raises ValidationError on failure
    verify_metadata(meta_file=str(REPO_ROOT / CFG / "metadata.json"), filepath=str(SHARED_SCHEMA))
    meta = json.loads((REPO_ROOT / CFG / "metadata.json").read_text())
    image = meta["network_data_format"]["inputs"]["image"]
    assert image["format"] == "SUVR" and image["modality"] == "PT"
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {
        "0": "negative", "1": "intermediate", "2": "positive"}
