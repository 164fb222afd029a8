"""tumor_mri bundle: the network overlays, one real ``monai.bundle run`` (train + evaluate) on the tiny
phantom, inference from its checkpoint, the comparison of its MLflow runs, and the metadata schema.

The slow tests share one train + evaluate of the ResNet-18 overlay (tiny phantom, 32 px, 2 epochs).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow
import pytest
import torch

from pipelines.bundles import load_config
from tests.bundles.bundle_utils import REPO_ROOT, bundle_env, overrides, run_monai_bundle
from tests.conftest import SHARED_SCHEMA

CFG = REPO_ROOT / "bundles" / "tumor_mri" / "configs"
OVERLAYS = ["resnet18", "resnet50", "densenet121", "efficientnet_b0", "vit"]
CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]
TINY_DATA = "$pipelines.phantoms.tumor.default_dataset('tumor-tiny')"


def _files(*names: str) -> str:
    return repr([str(CFG / f"{n}.json") for n in names])


def _parser(*names: str, **ids):
    return load_config("tumor_mri", *(f"{n}.json" for n in names), overrides=ids)


# -- fast: every overlay builds its network ------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_network_returns_four_logits_and_traces(overlay):
    torch.manual_seed(0)
    net = _parser("train", overlay, image_size=32).get_parsed_content("network_def").eval()
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        eager = net(x)
        traced = torch.jit.trace(net, x, check_trace=False)(x)
    assert eager.shape == (2, 4)
    torch.testing.assert_close(traced, eager, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("overlay", "name", "cls"), [
    ("resnet18", "resnet18", "ResNet"), ("resnet50", "resnet50", "ResNet"),
    ("densenet121", "densenet121", "DenseNet121"),
    ("efficientnet_b0", "efficientnet-b0", "EfficientNetBN"), ("vit", "vit", "ViTClassifier"),
])
def test_overlay_selects_its_monai_network_in_train_and_inference(overlay, name, cls):
    for base in ("train", "inference"):
        parser = _parser(base, overlay, image_size=64)
        assert parser.get_parsed_content("network_name") == name
        assert type(parser.get_parsed_content("network_def")).__name__ == cls
    ckpt = _parser("train", overlay, "evaluate").get_parsed_content("ckpt_path")
    assert ckpt == os.path.join(REPO_ROOT, "bundles", "tumor_mri", "models", name, "model.pt")


@pytest.mark.parametrize("overlay", ["resnet18", "resnet50", "densenet121", "efficientnet_b0"])
def test_cnn_gradcam_layer_exists_in_the_network(overlay):
    parser = _parser("train", overlay, image_size=64)
    layer = parser.get_parsed_content("gradcam_layer")
    assert layer in dict(parser.get_parsed_content("network_def").named_modules())


def test_train_config_holds_the_cpu_recipe():
    parser = _parser("train", "resnet18", image_size=64)
    opt = parser.get_parsed_content("optimizer")
    sched = parser.get_parsed_content("lr_scheduler")
    assert type(opt).__name__ == "AdamW" and opt.defaults["lr"] == 1e-3
    # weight decay on kernels only, never on biases or batch-norm parameters
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert all(p.ndim > 1 for p in opt.param_groups[0]["params"]) and all(p.ndim <= 1 for p in opt.param_groups[1]["params"])
    assert type(sched).__name__ == "WarmupCosineSchedule"
    assert _parser("train").get("image_size") == 128 and parser.get("network_width") == 0.5
    net = parser.get_parsed_content("network_def")
    assert net.layer4[0].conv1.out_channels == 256  # half-width ResNet-18
    # random augmentation runs on whole batches in prepare_batch; the cached preprocessing is deterministic
    assert not [t for t in parser.get("train#preprocessing#transforms") if t["_target_"].startswith("Rand")]
    assert type(parser.get_parsed_content("train#prepare_batch")).__name__ == "BatchAugment"
    # validation, checkpoint and export use the EMA weights
    assert parser.get_parsed_content("eval_network") is parser.get_parsed_content("ema").module
    assert _parser("train", "densenet121").get("network_width") == 1.0


def test_metadata_passes_the_bundle_schema():
    if not SHARED_SCHEMA.is_file():
        pytest.skip(f"schema not found at {SHARED_SCHEMA}")
    from monai.bundle import verify_metadata

    verify_metadata(meta_file=str(CFG / "metadata.json"), filepath=str(SHARED_SCHEMA))
    meta = json.loads((CFG / "metadata.json").read_text())
    assert meta["compare_networks"] == [o for o in OVERLAYS if o != "resnet50"]  # resnet50: docs/adding_a_bundle.md
    assert list(meta["network_data_format"]["outputs"]["pred"]["channel_def"].values()) == CLASSES


# -- slow: one real run through monai.bundle -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tumor_mri")
    env = bundle_env(tmp)
    env["OMP_NUM_THREADS"] = "1"
    root = tmp / "bundle"
    common = ["--meta_file", str(CFG / "metadata.json"), "--logging_file", str(CFG / "logging.conf"),
              "--dataset_dir", TINY_DATA, "--bundle_root", str(root),
              *overrides(image_size=32, batch_size=8, num_workers=0, epochs=2)]
    run_monai_bundle("run", "--config_file", _files("train", "resnet18"), *common, env=env)
    run_monai_bundle("run", "--config_file", _files("train", "resnet18", "evaluate"), *common,
                     *overrides(n_bootstrap=50, explain_per_class=1), "--tta_policies", "['none']", env=env)
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("tumor_mri")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    return {"env": env, "root": root, "client": client, "runs": runs}


@pytest.mark.slow
def test_train_run_finishes_with_the_recipe_params(trained):
    train = trained["runs"][0]
    assert train.info.run_name.startswith("tumor_mri-resnet18-train-") and train.info.status == "FINISHED"
    p = train.data.params
    assert (p["network"], p["optimizer"], p["learning_rate"], p["weight_decay"]) == ("resnet18", "AdamW", "0.001",
                                                                                       "0.05")
    assert (p["lr_scheduler"], p["ema_decay"], p["network_width"]) == ("WarmupCosineSchedule", "0.99", "0.5")
    assert p["n_test_images"] == "16" and p["n_train_images"] == "40"
    history = trained["client"].get_metric_history(train.info.run_id, "val_accuracy")
    assert len(history) == 2  # one validation per epoch
    assert (trained["root"] / "models" / "resnet18" / "model.pt").is_file()


@pytest.mark.slow
def test_evaluation_run_logs_metrics_with_cis(trained):
    ev = trained["runs"][1]
    assert ev.info.status == "FINISHED"
    assert ev.data.tags["stage"] == "evaluation" and ev.data.tags["network"] == "resnet18"
    m = ev.data.metrics
    for name in ("accuracy", "macro_auc", "balanced_accuracy", "macro_specificity", "macro_f1"):
        assert m[f"{name}_ci_low"] <= m[name] <= m[f"{name}_ci_high"]
    report = json.loads((trained["root"] / "outputs" / "resnet18" / "eval" / "metrics.json").read_text())
    assert report["n_samples"] == 16 and report["support"] == dict.fromkeys(CLASSES, 4)
    assert report["metrics"]["accuracy"] == pytest.approx(m["accuracy"])
    assert sorted(p.name for p in (trained["root"] / "outputs" / "resnet18" / "eval" / "explanations").iterdir()) \
        == [f"{c}_0.png" for c in CLASSES]


@pytest.mark.slow
def test_comparison_of_the_store_lists_the_evaluation_run(trained, tmp_path):
    from pipelines.evaluation.compare import compare_runs

    result = compare_runs(trained["env"]["MLFLOW_TRACKING_URI"], "tumor_mri", out_dir=tmp_path)
    ev = trained["runs"][1]
    assert result.table["run_id"].tolist() == [ev.info.run_id]
    assert result.table["model"].tolist() == ["resnet18"]
    assert result.table["macro_auc"].iloc[0] == ev.data.metrics["macro_auc"]
    assert result.metrics == ["accuracy", "macro_auc", "balanced_accuracy", "macro_specificity", "macro_f1"]


@pytest.mark.slow
def test_inference_predicts_each_subject_from_the_trained_checkpoint(trained, tmp_path):
    env = trained["env"]
    parser = _parser("inference", "resnet18", bundle_root=str(trained["root"]), image_size=32,
                     input_path=str(Path(env["NEURO_MONAI_CACHE"]) / "phantoms" / "tumor-tiny-v1-seed0" / "Testing"
                                    / "pituitary"),
                     output_dir=str(tmp_path))
    parser.get_parsed_content("predictor").run(parser.get_parsed_content("input_path"), tmp_path)
    out = json.loads((tmp_path / "predictions.json").read_text())
    assert out["class_names"] == CLASSES and out["model"]["name"] == "tumor_mri/resnet18"
    assert [s["n_slices"] for s in out["studies"]] == [2, 2]
    for study in out["studies"]:
        assert study["study"].startswith("sub-")
        assert sum(study["probabilities"].values()) == pytest.approx(1.0)


# -- real data: the audited split of the Kaggle tumour subset -------------------------------------------------------
REAL_SPLIT = REPO_ROOT / "data_manifests" / "brain_tumor_mri_4class" / "splits" / "pseudo-near4-holdout" / "manifest.csv"


@pytest.mark.realdata
def test_real_split_keeps_near_duplicate_groups_on_one_side(tmp_path):
    from tests.conftest import shared_dataset

    shared_dataset("brain_tumor_mri_4class")
    if not REAL_SPLIT.is_file():
        pytest.skip(f"split manifest not found: {REAL_SPLIT}")
    parser = _parser("train", manifest=str(REAL_SPLIT), dataset_dir=None, output_dir=str(tmp_path))
    data = parser.get_parsed_content("data")
    df = data["manifest"]
    assert len(df) == 800
    assert {k: v["images"] for k, v in data["counts"].items()} == {"train": 501, "val": 120, "test": 179}
    # near-duplicate groups (pHash, D = 4) never span two splits, and no subject does
    assert df.groupby("near_group")["split"].nunique().max() == 1
    assert df.groupby("subject_id")["split"].nunique().max() == 1
