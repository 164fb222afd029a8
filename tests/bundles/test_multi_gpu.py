"""alz_hybrid with ``multi_gpu_train.json`` through the real ``torchrun --nproc_per_node=2 -m monai.bundle run``
on the CPU (gloo): one MLflow run, one best model and one resume checkpoint, stats from rank 0 only."""

from __future__ import annotations

import subprocess
import sys

import mlflow
import pytest

from pipelines.training.checkpoint import load_checkpoint
from tests.bundles.bundle_utils import REPO_ROOT, bundle_env, overrides
from tests.bundles.test_alz_hybrid import TINY_DATA

pytestmark = pytest.mark.slow
CFG = "bundles/alz_hybrid/configs"
TINY = overrides(image_size=64, network_width=0.25, num_workers=0, batch_size=8, epochs=2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    env = {**bundle_env(root), "OMP_NUM_THREADS": "1"}
    paths = ["--output_dir", str(root / "out"), "--ckpt_dir", str(root / "models")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "monai.bundle",
           "run", "--config_file", f"['{CFG}/train.json','{CFG}/multi_gpu_train.json']", *TINY_DATA, *TINY, *paths]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return {"root": root, "env": env, "paths": paths, "log": proc.stdout + proc.stderr}


def test_two_processes_make_one_mlflow_run_and_one_checkpoint(trained):
    client = mlflow.MlflowClient(trained["env"]["MLFLOW_TRACKING_URI"])
    runs = client.search_runs(client.get_experiment_by_name("alz_hybrid").experiment_id)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "val_macro_f1")] == [1, 2]
    assert sorted(p.name for p in (trained["root"] / "models").iterdir()) == ["checkpoint_last.pt", "model.pt"]
    last = load_checkpoint(trained["root"] / "models" / "checkpoint_last.pt")
    assert last["epoch"] == 2 and last["mlflow_run_id"] == runs[0].info.run_id
    assert trained["log"].count("Epoch[2] Metrics -- val_accuracy") == 1  # stats from rank 0 only
