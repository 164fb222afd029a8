"""ct_hemorrhage: data lists, networks, configs, and the bundle end to end through the real ``python -m monai.bundle``.

The end-to-end tests (marked slow) share one training run: 1 epoch of a tiny DenseNet at 64 px on the tiny
head-CT DICOM phantom (6 studies x 8 slices), then evaluate, inference on a DICOM series, and TorchScript export.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipelines.bundles import load_config
from pipelines.manifests.schema import ManifestError
from pipelines.networks.cnn import CLASSIFIER_NAMES, build_classifier, gradcam_layer
from pipelines.training import ct_data
from tests.bundles.bundle_utils import REPO_ROOT, bundle_env, overrides, run_monai_bundle
from tests.conftest import SHARED_SCHEMA, shared_dataset

CFG = "bundles/ct_hemorrhage/configs"
CLASSES = ["normal", "hemorrhage"]
TINY_NET = {"init_features": 8, "growth_rate": 8, "block_config": [2, 2]}  # a tiny DenseNet-121
TINY_R18 = {"width": 0.25}  # the default network (ResNet-18), at quarter width
TINY = overrides(image_size=64, num_workers=0, batch_size=16) + ["--network_kwargs", repr(TINY_R18)]
TINY_DATA = ["--dataset_dir", "$pipelines.training.ct_data.default_dataset('head_ct-tiny')"]


@pytest.fixture(scope="module")
def tiny_phantom(tmp_path_factory):
    cache = tmp_path_factory.mktemp("ct_cache")
    old = os.environ.get("NEURO_MONAI_CACHE")
    os.environ["NEURO_MONAI_CACHE"] = str(cache)
    try:
        yield Path(ct_data.default_dataset("head_ct-tiny"))
    finally:
        if old is None:
            os.environ.pop("NEURO_MONAI_CACHE")
        else:
            os.environ["NEURO_MONAI_CACHE"] = old


def _parse(config: str, **updates):
    return load_config("ct_hemorrhage", config, overrides=updates)


# ------------------------------------------------------------------------------------------------ data lists


def test_phantom_split_is_by_subject_and_stratified_by_study_label(tiny_phantom, tmp_path):
    data = ct_data.prepare_ct_data(CLASSES, tiny_phantom, output_dir=tmp_path, seed=0)
    df = pd.read_csv(tmp_path / "data" / "manifest.csv")
    assert len(df) == 6 * 8 and (df.groupby("subject_id")["split"].nunique() == 1).all()
    # every split holds one haemorrhage study and one normal study (3 + 3 studies)
    studies = df.groupby("subject_id").agg(split=("split", "first"), label=("study_label", "first"))
    by_split = studies.groupby("split")["label"].apply(sorted).to_dict()
    assert by_split == {s: sorted(CLASSES) for s in ("test", "train", "val")}
    assert {r["slice_index"] for r in data["train"]} == set(range(8))
    params = json.loads((tmp_path / "data" / "split.json").read_text())["params"]
    assert params["method"] == "subject-level, stratified by study label, hold-out" and params["seed"] == 0


def test_png_groups_of_consecutive_ids_stay_together_and_folds_partition_the_set(tmp_path):
    root = shared_dataset("head_ct_hemorrhage_png")
    data = ct_data.prepare_ct_data(CLASSES, root, output_dir=tmp_path, num_folds=5, fold=0, val_fraction=0.1)
    df = pd.read_csv(tmp_path / "data" / "manifest.csv")
    assert (df.groupby("subject_id")["split"].nunique() == 1).all()
    assert df.groupby("subject_id")["source_id"].agg(lambda s: len({int(i) // 5 for i in s})).eq(1).all()
    assert len(data["test"]) == 20 and len(data["val"]) == 10 and len(data["train"]) == 70
    assert json.loads((tmp_path / "data" / "split.json").read_text())["params"]["num_folds"] == 5
    base = ct_data.png_manifest(root, CLASSES)
    tests = []
    for fold in range(5):
        split = ct_data.assign_subject_splits(base, "hemorrhage", val_fraction=0.1, num_folds=5, fold=fold)
        test = split[split["split"] == "test"]
        assert test["label"].value_counts().to_dict() == {"hemorrhage": 10, "normal": 10}
        tests.append(set(test["source_id"]))
    assert set().union(*tests) == set(range(50)) | set(range(100, 150)) and sum(map(len, tests)) == 100
    assert tests[0] == {int(r["image"][-7:-4]) for r in data["test"]}


def test_png_images_are_loaded_as_grey_in_the_8_bit_range():
    root = shared_dataset("head_ct_hemorrhage_png")
    loader = ct_data.LoadCTImaged("image", window_preset="prewindowed")
    img = loader({"image": str(root / "head_ct" / "000.png")})["image"]
    assert tuple(img.shape) == (1, 821, 957) and float(img.max()) <= 255.0 and float(img.min()) >= 0.0


def test_unknown_dataset_layout_is_a_clear_error(tmp_path):
    (tmp_path / "labels.csv").write_text("name,value\na,1\n")
    with pytest.raises(ManifestError, match="labels.csv: columns .* match neither"):
        ct_data.prepare_ct_data(CLASSES, tmp_path)
    with pytest.raises(ManifestError, match="dataset_dir not found"):
        ct_data.prepare_ct_data(CLASSES, tmp_path / "absent")
    with pytest.raises(ValueError, match="unknown window_preset 'bone'"):
        ct_data.window_channels("bone")


# ------------------------------------------------------------------------------------------------ networks


@pytest.mark.parametrize("name", CLASSIFIER_NAMES)
def test_every_network_returns_two_logits_and_has_its_gradcam_layer(name):
    kw = TINY_NET if name == "densenet121" else {"widen_factor": 0.25} if name.startswith("resnet") else {}
    net = build_classifier(name, 3, 2, **kw).eval()
    with torch.no_grad():
        assert tuple(net(torch.rand(2, 3, 32, 32)).shape) == (2, 2)
    assert gradcam_layer(name) in dict(net.named_modules())


@pytest.mark.parametrize("name", ["densenet121", "efficientnet-b0"])
def test_bundle_networks_script_to_the_same_output(name):
    net = build_classifier(name, 3, 2, **(TINY_NET if name == "densenet121" else {})).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(net)(x), net(x), atol=1e-5, rtol=1e-5)


def test_network_factory_refuses_unknown_names_and_pretrained_weights():
    with pytest.raises(ValueError, match="unknown network 'vgg16'"):
        build_classifier("vgg16")
    with pytest.raises(ValueError, match="pretrained weights are not supported"):
        build_classifier("densenet121", pretrained=True)
    with pytest.raises(ValueError, match="in_channels must be an integer >= 1"):
        build_classifier("resnet18", 0)


# ------------------------------------------------------------------------------------------------ configs


def test_metadata_verifies_against_the_schema():
    if not SHARED_SCHEMA.is_file():
        pytest.skip("bundle metadata schema not available")
    from monai.bundle import verify_metadata

    verify_metadata(meta_file=str(REPO_ROOT / CFG / "metadata.json"), filepath=str(SHARED_SCHEMA))
    meta = json.loads((REPO_ROOT / CFG / "metadata.json").read_text())
    image = meta["network_data_format"]["inputs"]["image"]
    assert image["format"] == "hounsfield" and image["modality"] == "CT" and image["num_channels"] == 3
    assert list(meta["network_data_format"]["outputs"]["pred"]["channel_def"].values()) == CLASSES
    assert meta["version"] in meta["changelog"]


def test_inference_config_matches_training(tiny_phantom, tmp_path):
    """Same classes and network; and every input is normalised exactly as in validation."""
    train, infer = _parse("train.json"), _parse("inference.json")
    for key in ("class_names", "window_preset", "image_size", "network_name", "network_kwargs", "dicom_window"):
        assert train[key] == infer[key], key
    assert train["slice_preprocessing"] == infer["slice_preprocessing"]
    dcm = sorted(tiny_phantom.glob("*/*.dcm"))[3]
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 90)).astype(np.uint8)).save(tmp_path / "p.png")
    for preset, path in (("multi", dcm), ("prewindowed", dcm), ("prewindowed", tmp_path / "p.png")):
        val_t = _parse("train.json", window_preset=preset).get_parsed_content("validate#preprocessing")
        inf_t = _parse("inference.json", window_preset=preset).get_parsed_content("preprocessing")
        a = val_t({"image": str(path), "label": 0})["image"]
        b = inf_t({"image": str(path)})["image"]
        assert tuple(a.shape) == (3, 128, 128)
        torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b), atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("ct")
    env = bundle_env(root)
    out = root / "train"
    run_monai_bundle(
        "run", "--config_file", f"{CFG}/train.json", *TINY_DATA, *TINY, "--epochs", "1",
        "--output_dir", str(out), "--ckpt_dir", str(root / "models"), env=env,
    )
    return {"root": root, "env": env, "out": out, "ckpt": root / "models" / "model.pt"}


def _client(env):
    return mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])


@pytest.mark.slow
def test_training_logs_a_finished_mlflow_run_and_splits_by_subject(trained):
    client = _client(trained["env"])
    exp = client.get_experiment_by_name("ct_hemorrhage")
    (run,) = client.search_runs(exp.experiment_id, filter_string="attributes.run_name LIKE 'ct_hemorrhage-train-%'")
    assert run.info.status == "FINISHED"
    for key in ("train_loss", "val_accuracy", "val_macro_f1", "val_macro_auc", "val_recall_hemorrhage"):
        assert key in run.data.metrics
    params = run.data.params
    assert params["network"] == "resnet18" and params["window_preset"] == "multi"
    assert params["data_format"] == "phantom_dicom" and params["class_weights"] == "inverse"
    assert not any("/" in v for v in params.values() if not v.startswith(("[", "{")))
    assert trained["ckpt"].is_file()
    df = pd.read_csv(trained["out"] / "data" / "manifest.csv")
    assert (df.groupby("subject_id")["split"].nunique() == 1).all() and set(df["split"]) == {"train", "val", "test"}


@pytest.mark.slow
def test_evaluate_writes_metrics_with_cis_and_gradcam_explanations(trained):
    eval_dir = trained["root"] / "eval"
    run_monai_bundle(
        "run", "--config_file", f"['{CFG}/train.json','{CFG}/evaluate.json']", *TINY_DATA, *TINY,
        "--output_dir", str(trained["out"]), "--ckpt_dir", str(trained["root"] / "models"),
        "--eval_dir", str(eval_dir), "--n_bootstrap", "100", "--explain_per_class", "1",
        "--tta_policies", "['none','hflip']", env=trained["env"],
    )
    result = json.loads((eval_dir / "metrics.json").read_text())
    assert result["n_samples"] == 16 and result["support"]["hemorrhage"] >= 1  # 2 test studies x 8 slices
    m, ci = result["metrics"], result["ci"]
    assert ci["macro_auc"][0] <= m["macro_auc"] <= ci["macro_auc"][1]
    assert sorted(p.name for p in (eval_dir / "explanations").glob("*.png")) == ["hemorrhage_0.png", "normal_0.png"]
    (run,) = _client(trained["env"]).search_runs(
        [_client(trained["env"]).get_experiment_by_name("ct_hemorrhage").experiment_id],
        filter_string="tags.stage = 'evaluation'")
    assert run.info.status == "FINISHED" and run.data.metrics["accuracy"] == pytest.approx(m["accuracy"])


@pytest.mark.slow
def test_inference_on_a_dicom_series_writes_study_json_and_csv(trained):
    phantom = Path(trained["env"]["NEURO_MONAI_CACHE"]) / "phantoms" / "head_ct-tiny-v1-seed0"
    labels = pd.read_csv(phantom / "labels.csv")
    study = labels.loc[labels["study_label"] == 1, "study_id"].iloc[0]
    out = trained["root"] / "inference"
    run_monai_bundle(
        "run", "--config_file", f"{CFG}/inference.json", *TINY, "--ckpt_path", str(trained["ckpt"]),
        "--input_path", str(phantom / study), "--output_dir", str(out), "--threshold", "0.01", env=trained["env"],
    )
    pred = json.loads((out / "predictions.json").read_text())
    assert pred["model"] == {"name": "ct_hemorrhage", "version": "0.2.1"} and pred["aggregation"] == "max"
    (result,) = pred["studies"]
    assert result["input_kind"] == "dicom_series" and result["n_slices"] == 8
    p = [s["prob_hemorrhage"] for s in result["slices"]]
    assert result["most_suspicious_slice"] == int(np.argmax(p)) and result["score"] == pytest.approx(max(p))
    assert result["predicted_class"] == "hemorrhage" and (out / result["gradcam"][0]).is_file()
    assert len(pd.read_csv(out / "predictions.csv")) == 8
    for text in ((out / "predictions.json").read_text(), (out / "predictions.csv").read_text()):
        assert study.split("_")[0] not in text  # the folder name is the PatientID


@pytest.mark.slow
def test_torchscript_export_equals_eager(trained):
    ts = trained["root"] / "model.ts"
    run_monai_bundle(
        "ckpt_export", "network_def", "--filepath", str(ts), "--ckpt_file", str(trained["ckpt"]),
        "--meta_file", f"{CFG}/metadata.json", "--config_file", f"{CFG}/inference.json", *TINY, env=trained["env"],
    )
    scripted = torch.jit.load(str(ts))
    net = _parse("inference.json", network_kwargs=TINY_R18).get_parsed_content("network_def")
    net.load_state_dict(torch.load(trained["ckpt"], weights_only=True))
    net.eval()
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), net(x), atol=1e-5, rtol=1e-5)
