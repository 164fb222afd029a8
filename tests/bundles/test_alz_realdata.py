"""Smoke test of alz_hybrid on the real Kaggle-style Alzheimer set (skipped when ../shared/data is absent)."""

from __future__ import annotations

import json
import warnings

import pandas as pd
import pytest

from tests.bundles.bundle_utils import bundle_env, overrides, run_monai_bundle
from tests.conftest import shared_dataset

pytestmark = [pytest.mark.slow, pytest.mark.realdata]
CFG = "bundles/alz_hybrid/configs"


def test_one_epoch_on_a_subset_of_the_real_set(tmp_path):
    data = shared_dataset("alzheimer_mri_4class")
    env = bundle_env(tmp_path)
    tiny = overrides(
        image_size=64, cnn_block="basic", cnn_layers=[1, 1, 1], cnn_inplanes=[8, 16, 32], hidden_size=32,
        num_heads=4, mlp_dim=64, num_layers=1, num_workers=0, batch_size=16, epochs=1, max_per_split=48,
    )
    common = ["--dataset_dir", str(data), *tiny, "--output_dir", str(tmp_path / "o"), "--ckpt_dir", str(tmp_path / "m")]
    proc = run_monai_bundle("run", "--config_file", f"{CFG}/train.json", *common, env=env)
    run_monai_bundle(
        "run", "--config_file", f"['{CFG}/train.json','{CFG}/evaluate.json']", *common,
        "--eval_dir", str(tmp_path / "e"), "--n_bootstrap", "50", "--explain_per_class", "0",
        "--tta_policies", "['none']", env=env,
    )
    log = proc.stdout + proc.stderr
    assert "carry no subject id" in log  # the Kaggle set has no subject ids: the split is by image, with a warning
    manifest = pd.read_csv(tmp_path / "o" / "data" / "manifest.csv")
    assert set(manifest["split"]) == {"train", "val", "test"}
    assert set(manifest["label"]) == {"MildDemented", "ModerateDemented", "NonDemented", "VeryMildDemented"}
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["n_samples"] == (manifest["split"] == "test").sum()
    assert 0.0 <= metrics["metrics"]["accuracy"] <= 1.0
