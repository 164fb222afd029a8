"""mri_denoiser end to end through the real ``python -m monai.bundle`` on the tiny Alzheimer phantom.

One module-scoped short training (tiny residual U-Net, 64 px, 10 epochs of 10 batches) and one evaluation run
feed the tests; the export and inference tests run in-process on that checkpoint.
"""

from __future__ import annotations

import os

import mlflow
import pandas as pd
import pytest
import torch

from tests.bundles.bundle_utils import REPO_ROOT, bundle_env, overrides, run_monai_bundle
from tests.conftest import SHARED_SCHEMA

pytestmark = pytest.mark.slow
CFG = "bundles/mri_denoiser/configs"
FEATURES = [4, 4, 8, 16, 32, 4]
TINY = overrides(image_size=64, features=FEATURES, num_workers=0, batch_size=4, learning_rate=0.003)
TINY_DATA = ["--dataset_dir", "$pipelines.phantoms.alzheimer.default_dataset('alzheimer-tiny')"]


@pytest.fixture(autouse=True)
def _one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("denoiser")
    env = bundle_env(root)
    env["OMP_NUM_THREADS"] = "1"
    paths = ["--output_dir", str(root / "train"), "--ckpt_dir", str(root / "models")]
    run_monai_bundle("run", "--config_file", f"{CFG}/train.json", *TINY_DATA, *TINY, *paths,
                     "--epochs", "10", "--val_interval", "5", env=env)
    run_monai_bundle("run", "--config_file", f"['{CFG}/train.json','{CFG}/evaluate.json']", *TINY_DATA, *TINY,
                     *paths, "--eval_dir", str(root / "eval"), "--n_bootstrap", "200", env=env)
    return {"root": root, "env": env, "ckpt": root / "models" / "model.pt"}


def _table(trained) -> pd.DataFrame:
    return pd.read_csv(trained["root"] / "eval" / "denoising_metrics.csv").set_index("sigma")


def test_short_training_raises_psnr_on_held_out_noisy_phantoms(trained):
    t = _table(trained)
    assert list(t.index) == ["0.1", "0.2", "0.3", "0.4", "0.5", "all"]
    assert t["n_images"].loc["all"] == 5 * t["n_images"].loc["0.1"] > 0
    pooled = t.loc["all"]
    assert pooled["psnr_denoised"] > pooled["psnr_noisy"]
    # the whole 95 % CI of the paired gain is above zero, pooled and at the strongest noise
    assert pooled["psnr_gain_ci_low"] > 0
    assert t.loc["0.5", "psnr_gain_ci_low"] > 0
    assert t.loc["0.5", "ssim_denoised"] > t.loc["0.5", "ssim_noisy"]
    for col in ("psnr_noisy", "psnr_denoised", "ssim_denoised"):
        assert (t[f"{col}_ci_low"] <= t[col]).all() and (t[col] <= t[f"{col}_ci_high"]).all()


def test_noisy_baseline_psnr_falls_with_sigma(trained):
    psnr = _table(trained)["psnr_noisy"].drop("all").to_numpy()
    assert (psnr[:-1] > psnr[1:]).all()


def test_runs_are_finished_in_mlflow_with_psnr_metrics(trained):
    client = mlflow.MlflowClient(trained["env"]["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("mri_denoiser")
    train = client.search_runs(exp.experiment_id, filter_string="attributes.run_name LIKE 'mri_denoiser-train-%'")
    assert len(train) == 1 and train[0].info.status == "FINISHED"
    assert {"train_loss", "val_psnr", "val_mse"} <= set(train[0].data.metrics)
    assert train[0].data.params["features"] == str(FEATURES) and train[0].data.params["loss"] == "l1"
    ev = client.search_runs(exp.experiment_id, filter_string="tags.stage = 'evaluation'")
    assert len(ev) == 1 and ev[0].info.status == "FINISHED"
    m = ev[0].data.metrics
    assert m["psnr_denoised/all"] == pytest.approx(_table(trained).loc["all", "psnr_denoised"])
    assert "psnr_gain_ci_low/sigma_0.5" in m
    arts = {a.path for a in client.list_artifacts(ev[0].info.run_id, "evaluation")}
    assert {"evaluation/denoising_metrics.md", "evaluation/denoising_metrics.csv"} <= arts


def test_torchscript_export_equals_eager(trained):
    from monai.bundle import ckpt_export

    from pipelines.restoration.networks import DenoisingUNet

    ts = trained["root"] / "model.ts"
    ckpt_export(net_id="network_def", filepath=str(ts), ckpt_file=str(trained["ckpt"]),
                meta_file=f"{REPO_ROOT / CFG}/metadata.json", config_file=f"{REPO_ROOT / CFG}/inference.json",
                features=FEATURES)
    net = DenoisingUNet(features=FEATURES)
    net.load_state_dict(torch.load(trained["ckpt"], weights_only=True))
    net.eval()
    x = torch.rand(2, 1, 80, 64)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(ts))(x), net(x), atol=1e-5, rtol=1e-4)


def test_inference_denoises_a_folder_of_images(trained):
    from PIL import Image

    from pipelines.bundles import run_workflow
    from pipelines.phantoms.alzheimer import default_dataset

    os.environ["NEURO_MONAI_CACHE"] = trained["env"]["NEURO_MONAI_CACHE"]
    try:
        folder = os.path.join(default_dataset("alzheimer-tiny"), "slices", "test", "NonDemented")
    finally:
        os.environ.pop("NEURO_MONAI_CACHE")
    out = trained["root"] / "inference"
    run_workflow(REPO_ROOT / CFG / "inference.json", overrides={
        "features": FEATURES, "ckpt_path": str(trained["ckpt"]), "input_path": folder, "output_dir": str(out),
        "noise_sigma": 0.4})
    table = pd.read_csv(out / "denoised.csv")
    inputs = sorted(f for f in os.listdir(folder) if f.endswith(".png"))
    assert sorted(table["input"]) == inputs
    for row in table.itertuples():
        with Image.open(os.path.join(folder, row.input)) as a, Image.open(out / row.output) as b:
            assert a.size == b.size and b.mode == "L"
    assert (table["psnr_denoised"] > table["psnr_noisy"]).mean() >= 0.75


def test_metadata_verifies_against_the_schema():
    if not SHARED_SCHEMA.is_file():
        pytest.skip("bundle metadata schema not available")
    from monai.bundle import verify_metadata

    verify_metadata(meta_file=str(REPO_ROOT / CFG / "metadata.json"), filepath=str(SHARED_SCHEMA))  # raises if invalid
