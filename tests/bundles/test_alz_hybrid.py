"""alz_hybrid end to end through the real ``python -m monai.bundle`` on the tiny phantom.

One module-scoped training run (1 epoch, tiny network, 64 px) feeds the evaluate, inference and export tests.
"""

from __future__ import annotations

import json
import sqlite3

import mlflow
import pytest
import torch

from pipelines.bundles import load_config
from tests.bundles.bundle_utils import REPO_ROOT, bundle_env, overrides, run_monai_bundle
from tests.conftest import SHARED_SCHEMA

pytestmark = pytest.mark.slow
CFG = "bundles/alz_hybrid/configs"
TINY = overrides(
    image_size=64, network_width=0.25, cnn_block="basic", cnn_layers=[1, 1, 1], cnn_inplanes=[8, 16, 32], hidden_size=32,
    num_heads=4, mlp_dim=64, num_layers=1, num_workers=0, batch_size=16,
)
TINY_DATA = ["--dataset_dir", "$pipelines.phantoms.alzheimer.default_dataset('alzheimer-tiny')"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("alz")
    env = bundle_env(root)
    out = root / "train"
    run_monai_bundle(
        "run", "--config_file", f"{CFG}/train.json", *TINY_DATA, *TINY, "--epochs", "2",
        "--output_dir", str(out), "--ckpt_dir", str(root / "models"), env=env,
    )
    return {"root": root, "env": env, "out": out, "ckpt": root / "models" / "model.pt"}


def _client(env):
    return mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])


def test_training_logs_a_finished_mlflow_run(trained):
    client = _client(trained["env"])
    exp = client.get_experiment_by_name("alz_hybrid")
    runs = client.search_runs(exp.experiment_id, filter_string="attributes.run_name LIKE 'alz_hybrid-train-%'")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    for key in ("train_loss", "val_accuracy", "val_macro_f1", "val_macro_auc", "val_recall_ModerateDemented"):
        assert key in run.data.metrics
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_macro_f1")] == [1, 2]
    params = run.data.params
    assert params["image_size"] == "64" and params["epochs"] == "2"
    assert len(params["manifest_digest"]) == 16 and "git_commit" in params
    assert int(params["n_val_subjects"]) >= 1
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model.pt", "confusion_matrix.png", "classification_report.csv", "split.json", "config_executed.json"} <= arts
    executed = json.loads((trained["out"] / "config_executed.json").read_text())
    assert executed["epochs"] == 2 and executed["image_size"] == 64
    # nothing identifying: params carry no absolute paths
    assert not any("/" in v for v in params.values() if not v.startswith("["))


def test_split_is_by_subject(trained):
    import pandas as pd

    df = pd.read_csv(trained["out"] / "data" / "manifest.csv")
    assert (df.groupby("subject_id")["split"].nunique() == 1).all()
    assert set(df["split"]) == {"train", "val", "test"}


def test_evaluate_writes_metrics_with_confidence_intervals(trained):
    eval_dir = trained["root"] / "eval"
    run_monai_bundle(
        "run", "--config_file", f"['{CFG}/train.json','{CFG}/evaluate.json']", *TINY_DATA, *TINY,
        "--output_dir", str(trained["out"]), "--ckpt_dir", str(trained["root"] / "models"),
        "--eval_dir", str(eval_dir), "--n_bootstrap", "100", "--explain_per_class", "1",
        "--tta_policies", "['none','hflip']", env=trained["env"],
    )
    result = json.loads((eval_dir / "metrics.json").read_text())
    m, ci = result["metrics"], result["ci"]
    assert result["n_samples"] == sum(result["support"].values()) > 0
    for k in ("accuracy", "macro_f1"):
        assert ci[k][0] <= m[k] <= ci[k][1]
    for name in ("confusion_matrix.png", "calibration.json", "reliability_diagram.png", "tta.csv", "metrics_ci.csv"):
        assert (eval_dir / name).is_file(), name
    assert len(list((eval_dir / "explanations").glob("*.png"))) >= 2
    client = _client(trained["env"])
    exp = client.get_experiment_by_name("alz_hybrid")
    runs = client.search_runs(exp.experiment_id, filter_string="tags.stage = 'evaluation'")
    assert runs and runs[0].info.status == "FINISHED"
    assert runs[0].data.metrics["accuracy"] == pytest.approx(m["accuracy"])


def test_inference_on_a_volume_and_on_a_folder_of_slices(trained):
    from pipelines.phantoms.alzheimer import default_dataset, example_volume
    import os

    os.environ["NEURO_MONAI_CACHE"] = trained["env"]["NEURO_MONAI_CACHE"]
    try:
        volume = example_volume("alzheimer-tiny")
        slices = os.path.join(default_dataset("alzheimer-tiny"), "slices", "test")
    finally:
        os.environ.pop("NEURO_MONAI_CACHE")
    for name, inp in (("vol", volume), ("png", slices)):
        out = trained["root"] / f"inf_{name}"
        run_monai_bundle(
            "run", "--config_file", f"{CFG}/inference.json", *TINY, "--ckpt_path", str(trained["ckpt"]),
            "--input_path", inp, "--output_dir", str(out), env=trained["env"],
        )
        pred = json.loads((out / "predictions.json").read_text())
        assert pred["model"]["name"] == "alz_hybrid/ResNet" and pred["model"]["version"]
        studies = pred["studies"]
        assert all(s["predicted_class"] in pred["class_names"] for s in studies)
        assert all(abs(sum(s["probabilities"].values()) - 1) < 1e-5 for s in studies)
        if name == "vol":
            assert len(studies) == 1 and studies[0]["n_slices"] > 5
        else:
            assert len(studies) == len({s["study"] for s in studies}) >= 4  # one study per test subject


def test_torchscript_export_equals_eager(trained):
    ts = trained["root"] / "model.ts"
    run_monai_bundle(
        "ckpt_export", "network_def", "--filepath", str(ts), "--ckpt_file", str(trained["ckpt"]),
        "--meta_file", f"{CFG}/metadata.json", "--config_file", f"{CFG}/inference.json", *TINY,
        "--use_trace", "True", "--input_shape", "[1, 1, 64, 64]", env=trained["env"],
    )
    scripted = torch.jit.load(str(ts))
    parser = load_config("alz_hybrid", "inference.json", overrides={
        k.lstrip("-"): eval(v) if v.startswith("[") or v.isdigit() else v for k, v in zip(TINY[::2], TINY[1::2])})
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(trained["ckpt"], weights_only=True))
    net.eval()
    x = torch.rand(3, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(scripted(x), net(x), atol=1e-5)


def test_a_crash_during_training_ends_the_run_failed(trained):
    env = trained["env"]
    with pytest.raises(AssertionError, match="boom"):
        run_monai_bundle(
            "run", "--config_file", f"{CFG}/train.json", *TINY_DATA, *TINY, "--epochs", "1",
            "--output_dir", str(trained["root"] / "crash"), "--ckpt_dir", str(trained["root"] / "crash_models"),
            "--run_name", "crash-run",
            "--loss_fn", "$lambda pred, label: (_ for _ in ()).throw(RuntimeError('boom'))", env=env,
        )
    client = _client(env)
    exp_id = client.get_experiment_by_name("alz_hybrid").experiment_id
    run = client.search_runs([exp_id], filter_string="attributes.run_name = 'crash-run'")[0]
    assert run.info.status == "FAILED"
    # the same run name again: a new run is opened, the failed one is left alone
    run_monai_bundle(
        "run", "--config_file", f"{CFG}/train.json", *TINY_DATA, *TINY, "--epochs", "1", "--run_name", "crash-run",
        "--output_dir", str(trained["root"] / "crash"), "--ckpt_dir", str(trained["root"] / "crash_models"), env=env,
    )
    runs = client.search_runs([exp_id], filter_string="attributes.run_name = 'crash-run'")
    assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED"]
    finished = next(r for r in runs if r.info.status == "FINISHED")
    assert "val_macro_f1" in finished.data.metrics and "val_macro_f1" not in client.get_run(run.info.run_id).data.metrics


@pytest.mark.parametrize("case", ["missing_dir", "bad_manifest", "missing_files"])
def test_bad_data_fails_before_any_mlflow_run(trained, tmp_path, case):
    env = bundle_env(tmp_path)
    if case == "missing_dir":
        args, match = ["--dataset_dir", str(tmp_path / "no_such_folder")], "dataset_dir not found.*no_such_folder"
    elif case == "bad_manifest":
        (tmp_path / "m.csv").write_text("subject_id,image,label\ns1,a.png,NonDemented\n")
        args, match = ["--manifest", str(tmp_path / "m.csv")], r"m.csv is missing required column"
    else:
        (tmp_path / "m.csv").write_text(
            "subject_id,session_id,image,label,split\ns1,ses-01,gone.png,NonDemented,train\n"
        )
        args, match = ["--manifest", str(tmp_path / "m.csv")], "do not exist.*gone.png"
    with pytest.raises(AssertionError, match=match):
        run_monai_bundle("run", "--config_file", f"{CFG}/train.json", *TINY, *args,
                         "--output_dir", str(tmp_path / "o"), env=env)
    db = tmp_path / "mlruns" / "mlflow.db"
    if db.exists():
        with sqlite3.connect(db) as con:
            try:
                n = con.execute("select count(*) from runs").fetchone()[0]
            except sqlite3.OperationalError:
                n = 0
        assert n == 0


def test_metadata_verifies_against_the_schema():
    if not SHARED_SCHEMA.is_file():
        pytest.skip("bundle metadata schema not available")
    proc = run_monai_bundle(
        "verify_metadata", "--meta_file", f"{CFG}/metadata.json", "--filepath", str(SHARED_SCHEMA),
        env=bundle_env_tmp(),
    )
    assert "verified with no error" in proc.stdout + proc.stderr


def bundle_env_tmp():
    import tempfile
    from pathlib import Path

    return bundle_env(Path(tempfile.mkdtemp()))


def test_training_and_inference_share_network_and_preprocessing():
    train, infer = load_config("alz_hybrid", "train.json"), load_config("alz_hybrid", "inference.json")
    assert train.get("network_def") == infer.get("network_def")
    val_tf = train.get("validate#preprocessing#transforms")
    assert val_tf[0] == infer.get("preprocessing#transforms")[0]  # the loader
    assert val_tf[1:3] == infer.get("slice_preprocessing#transforms")[:2]  # intensity scaling and resize
    for key in ("class_names", "image_size", "network_name", "network_width", "cnn_block", "cnn_layers", "cnn_inplanes", "hidden_size", "num_layers",
                "num_heads", "mlp_dim", "dropout"):
        assert train.get(key) == infer.get(key), key


def test_tracking_flag_logs_into_the_same_single_run(tmp_path):
    env = bundle_env(tmp_path)
    run_monai_bundle(
        "run", "--config_file", f"{CFG}/train.json", *TINY_DATA, *TINY, "--epochs", "1", "--tracking", "mlflow",
        "--output_dir", str(tmp_path / "o"), "--ckpt_dir", str(tmp_path / "m"), env=env,
    )
    client = _client(env)
    runs = client.search_runs([client.get_experiment_by_name("alz_hybrid").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    history = client.get_metric_history(runs[0].info.run_id, "val_macro_f1")
    assert len(history) == 1  # logged once, not once per handler


def test_a_killed_training_ends_the_run_failed(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    env = bundle_env(tmp_path)
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", f"{CFG}/train.json", *TINY_DATA, *TINY,
           "--epochs", "200", "--run_name", "killed-run", "--output_dir", str(tmp_path / "o"),
           "--ckpt_dir", str(tmp_path / "m")]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = _client(env)
    deadline = time.time() + 300
    try:
        run = None
        while time.time() < deadline and run is None:
            time.sleep(1)
            exp = client.get_experiment_by_name("alz_hybrid") if (tmp_path / "mlruns" / "mlflow.db").exists() else None
            runs = client.search_runs([exp.experiment_id]) if exp else []
            run = runs[0] if runs else None
        assert run is not None, "training never opened its MLflow run"
        time.sleep(2)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert client.get_run(run.info.run_id).info.status == "FAILED"


def test_network_input_output_verifies_against_the_metadata(tmp_path):
    proc = run_monai_bundle(
        "verify_net_in_out", "network_def", "--meta_file", f"{CFG}/metadata.json",
        "--config_file", f"{CFG}/inference.json", env=bundle_env(tmp_path),
    )
    assert "verified with no error" in proc.stdout + proc.stderr


def test_train_config_holds_the_cpu_recipe():
    parser = load_config("alz_hybrid", "train.json", overrides={"dataset_dir": "unused", "data": {"train": []}})
    net = parser.get_parsed_content("network_def")
    # the default network is the half-width ResNet-18 (it beat the hybrid on validation; docs/models.md)
    assert (parser.get("network_name"), parser.get("network_width")) == ("resnet18", 0.5)
    assert type(net).__name__ == "ResNet" and net.layer4[0].conv1.out_channels == 256
    opt = parser.get_parsed_content("optimizer")
    assert type(opt).__name__ == "AdamW" and [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert not [t for t in parser.get("train#preprocessing#transforms") if t["_target_"].startswith("Rand")]
    aug = parser.get_parsed_content("train#prepare_batch")
    assert type(aug).__name__ == "BatchAugment" and aug.policy["flip_dim"] == -2  # left-right in (x, y) arrays
    assert parser.get_parsed_content("eval_network") is parser.get_parsed_content("ema").module
    assert parser.get("validate#handlers")[2]["save_dict"] == {"model": "@eval_network"}
    evaluate = load_config("alz_hybrid", "train.json", "evaluate.json")
    assert evaluate.get("eval_network") == "@network"  # evaluation loads the checkpoint into the network it runs


def test_hybrid_overlay_builds_the_right_sized_hybrid():
    parser = load_config("alz_hybrid", "train.json", "hybrid.json")
    net = parser.get_parsed_content("network_def")
    # half-width ResNet-18 stages (basic blocks, 3 stages: an 8x8 token grid at 128 px) under two transformer layers
    assert type(net).__name__ == "CNNViTHybrid" and net.feature_grid == (8, 8) and len(net.blocks) == 2
    assert sum(p.numel() for p in net.parameters()) < 1_500_000
    assert parser.get_parsed_content("ckpt_path").endswith("models/hybrid/model.pt")
    infer = load_config("alz_hybrid", "inference.json", "hybrid.json")
    assert type(infer.get_parsed_content("network_def")).__name__ == "CNNViTHybrid"
    assert infer.get_parsed_content("ckpt_path") == parser.get_parsed_content("ckpt_path")
