"""alz_hybrid network overlays (vit.json, teacher_resnet50.json, deit_distill.json + inference_deit.json).

The slow tests run the real ``python -m monai.bundle`` on the tiny phantom with tiny sizes set by config ids; the
fast ones check that each overlay merges with train/evaluate/inference and builds the intended network.
"""

from __future__ import annotations

import hashlib
import json
import os

import mlflow
import pytest
import torch

from pipelines.bundles import load_config
from pipelines.inference.predict import load_state_dict
from pipelines.networks.cnn import build_classifier
from pipelines.networks.deit import DeiTClassifier
from pipelines.networks.vit import ViTClassifier
from tests.bundles.bundle_utils import REPO_ROOT, bundle_env, overrides, run_monai_bundle

CFG = "bundles/alz_hybrid/configs"
TINY_DATA = ["--dataset_dir", "$pipelines.phantoms.alzheimer.default_dataset('alzheimer-tiny')"]
COMMON = overrides(image_size=32, batch_size=8, num_workers=0)
TINY_VIT = overrides(vit_patch_size=8, vit_hidden_size=32, vit_layers=1, vit_heads=2, vit_mlp_dim=64)
TINY_TEACHER = overrides(teacher_widen_factor=0.125)
TINY_VIT_KW = dict(img_size=32, patch_size=8, hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64)


def _files(*names: str) -> str:
    return "[" + ",".join(f"'{CFG}/{n}'" for n in names) + "]"


def _parser(*names: str, **ids):
    return load_config("alz_hybrid", *names, overrides=ids)


def _train_run(env, prefix: str):
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("alz_hybrid")
    runs = client.search_runs(exp.experiment_id, filter_string=f"attributes.run_name LIKE 'alz_hybrid-{prefix}-train-%'")
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


def _md5(path) -> str:
    return hashlib.md5(open(path, "rb").read()).hexdigest()


# -- fast: the overlays merge and build the right network --------------------------------------------------------
@pytest.mark.parametrize(
    ("names", "cls", "ckpt_dir"),
    [
        (("train.json", "vit.json", "evaluate.json"), ViTClassifier, "models/vit"),
        (("inference.json", "vit.json"), ViTClassifier, "models/vit"),
        (("train.json", "deit_distill.json", "evaluate.json"), DeiTClassifier, "models/deit"),
        (("inference.json", "inference_deit.json"), DeiTClassifier, "models/deit"),
    ],
)
def test_network_overlay_builds_its_network_in_train_evaluate_and_inference(names, cls, ckpt_dir):
    parser = _parser(*names, image_size=32, vit_patch_size=8, vit_hidden_size=32, vit_layers=1, vit_heads=2,
                     vit_mlp_dim=64)
    net = parser.get_parsed_content("network_def")
    assert type(net) is cls and net.feature_grid == (4, 4)
    assert parser.get_parsed_content("ckpt_path") == os.path.join(REPO_ROOT, "bundles", "alz_hybrid", ckpt_dir, "model.pt")


@pytest.mark.parametrize("base", [("train.json",), ("inference.json",)])
def test_teacher_overlay_builds_a_monai_resnet50_with_a_stride_two_stem(base):
    parser = _parser(*base, "teacher_resnet50.json")
    net = parser.get_parsed_content("network_def")
    ref = build_classifier("resnet50", in_channels=1, num_classes=4)
    assert type(net).__name__ == "ResNet" and net.conv1.stride == (2, 2)
    assert [len(getattr(net, f"layer{i}")) for i in range(1, 5)] == [3, 4, 6, 3]
    assert {k: v.shape for k, v in net.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


def test_deit_inference_overlay_matches_the_distillation_overlay():
    train, infer = _parser("train.json", "deit_distill.json"), _parser("inference.json", "inference_deit.json")
    for key in ("network_def", "vit_patch_size", "vit_hidden_size", "vit_layers", "vit_heads", "vit_mlp_dim",
                "ckpt_dir", "ckpt_path", "dropout", "image_size", "class_names"):
        assert train.get(key) == infer.get(key), key


def test_distill_overlay_wires_trainer_loss_and_tracked_settings():
    parser = _parser("train.json", "deit_distill.json")
    assert parser.get("train#trainer#_target_") == "pipelines.training.distill.DistillationTrainer"
    assert parser.get("train#trainer#loss_function") == "@distill_loss"
    assert parser.get("distill_loss#base_loss") == "@loss_fn"  # the bundle's own loss (smoothing, weights) on [CLS]
    tracked = parser.get("tracked_params")
    assert tracked["network"] == "DeiTClassifier"
    assert {"distill_mode", "distill_alpha", "distill_tau", "teacher", "teacher_ckpt_sha256"} <= set(tracked)
    assert not any(k.startswith("cnn_") for k in tracked)


# -- slow: real bundle runs --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_vit_overlay_trains_one_epoch_and_evaluates(tmp_path):
    env = bundle_env(tmp_path)
    out, models, eval_dir = tmp_path / "train", tmp_path / "models", tmp_path / "eval"
    paths = ["--output_dir", str(out), "--ckpt_dir", str(models)]
    run_monai_bundle("run", "--config_file", _files("train.json", "vit.json"), *TINY_DATA, *COMMON, *TINY_VIT,
                     *paths, "--epochs", "1", env=env)
    run = _train_run(env, "vit")
    assert run.info.status == "FINISHED"
    assert run.data.params["network"] == "ViTClassifier" and run.data.params["vit_hidden_size"] == "32"
    assert {"train_loss", "val_macro_f1"} <= set(run.data.metrics)
    net = ViTClassifier(num_classes=4, **TINY_VIT_KW)
    net.load_state_dict(load_state_dict(models / "model.pt"))

    run_monai_bundle("run", "--config_file", _files("train.json", "vit.json", "evaluate.json"), *TINY_DATA, *COMMON,
                     *TINY_VIT, *paths, "--eval_dir", str(eval_dir), "--n_bootstrap", "50",
                     "--tta_policies", "['none','hflip']", "--explain_per_class", "1", env=env)
    result = json.loads((eval_dir / "metrics.json").read_text())
    assert result["n_samples"] == sum(result["support"].values()) > 0
    lo, hi = result["ci"]["accuracy"]
    assert lo <= result["metrics"]["accuracy"] <= hi
    assert (eval_dir / "tta.csv").is_file() and (eval_dir / "calibration.json").is_file()
    assert len(list((eval_dir / "explanations").glob("*.png"))) >= 2  # attention rollout maps


@pytest.mark.slow
def test_deit_distills_from_a_teacher_checkpoint_and_predicts(tmp_path):
    env = bundle_env(tmp_path)
    # A tiny teacher in the format CheckpointSaver writes (training it with teacher_resnet50.json differs from
    # the ViT run above only by network_def, built in test_teacher_overlay_builds_a_monai_resnet50...).
    torch.manual_seed(0)
    teacher_ckpt = tmp_path / "teacher" / "model.pt"
    teacher_ckpt.parent.mkdir()
    torch.save(build_classifier("resnet50", in_channels=1, num_classes=4, widen_factor=0.125).state_dict(), teacher_ckpt)
    teacher_md5 = _md5(teacher_ckpt)

    models = tmp_path / "deit"
    run_monai_bundle("run", "--config_file", _files("train.json", "deit_distill.json"), *TINY_DATA,
                     *COMMON, *TINY_VIT, *TINY_TEACHER, "--teacher_ckpt", str(teacher_ckpt), "--distill_mode", "soft",
                     "--distill_tau", "2.0", "--epochs", "1", "--output_dir", str(tmp_path / "deit_out"),
                     "--ckpt_dir", str(models), env=env)
    run = _train_run(env, "deit")
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["network"] == "DeiTClassifier" and params["teacher"] == "resnet50"
    assert (params["distill_mode"], params["distill_alpha"], params["distill_tau"]) == ("soft", "0.5", "2.0")
    assert torch.isfinite(torch.tensor(run.data.metrics["train_loss"]))
    assert params["teacher_ckpt_sha256"] == hashlib.sha256(teacher_ckpt.read_bytes()).hexdigest()[:16]
    assert _md5(teacher_ckpt) == teacher_md5  # the frozen teacher is never saved over
    student = DeiTClassifier(num_classes=4, **TINY_VIT_KW)
    student.load_state_dict(load_state_dict(models / "model.pt"))

    from pipelines.phantoms.alzheimer import example_volume

    os.environ["NEURO_MONAI_CACHE"] = env["NEURO_MONAI_CACHE"]
    try:
        volume = example_volume("alzheimer-tiny")
    finally:
        os.environ.pop("NEURO_MONAI_CACHE")
    out = tmp_path / "inference"
    run_monai_bundle("run", "--config_file", _files("inference.json", "inference_deit.json"), *COMMON, *TINY_VIT,
                     "--ckpt_path", str(models / "model.pt"), "--input_path", volume, "--output_dir", str(out), env=env)
    study = json.loads((out / "predictions.json").read_text())["studies"][0]
    assert study["n_slices"] > 5
    assert sum(study["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
