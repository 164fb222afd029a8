"""Exact resume after ``kill -9``: alz_hybrid trained 3 epochs straight vs killed after epoch 1 and resumed.

The killed run gets a test-only overlay that sleeps at the start of epoch 2, so the SIGKILL always lands after
``checkpoint_last.pt`` of epoch 1 is written and before anything of epoch 2 is logged. Both runs use one thread
(``OMP_NUM_THREADS=1``) and the same seed, so the CPU results are bitwise equal.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import mlflow
import pytest
import torch

from pipelines.training.checkpoint import load_checkpoint
from tests.bundles.bundle_utils import REPO_ROOT, bundle_env, run_monai_bundle
from tests.bundles.test_alz_hybrid import TINY, TINY_DATA

pytestmark = pytest.mark.slow
CFG = "bundles/alz_hybrid/configs"
EPOCHS = ["--epochs", "3"]


def _args(root, name):
    return [*TINY_DATA, *TINY, *EPOCHS, "--output_dir", str(root / name / "out"), "--ckpt_dir", str(root / name / "models")]


def _wait_for_epoch(path, epoch, proc, timeout=300.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"training exited ({proc.returncode}) before writing epoch {epoch}:\n"
                                 f"{proc.stdout.read()[-4000:]}")
        if path.is_file() and load_checkpoint(path)["epoch"] >= epoch:
            return
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint of epoch {epoch} within {timeout} s")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    env = {**bundle_env(root), "OMP_NUM_THREADS": "1"}
    run_monai_bundle("run", "--config_file", f"{CFG}/train.json", *_args(root, "straight"), env=env)

    pause = root / "pause_in_epoch_2.json"  # test only: hold the process in epoch 2 until it is killed
    pause.write_text(json.dumps({"run": [
        "$@train#trainer.add_event_handler(ignite.engine.Events.EPOCH_STARTED(once=2), lambda e: time.sleep(600))",
        "$@train#trainer.run()",
    ]}))
    killed = subprocess.Popen(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", f"['{CFG}/train.json','{pause}']",
         *_args(root, "resumed")],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    last = root / "resumed" / "models" / "checkpoint_last.pt"
    try:
        _wait_for_epoch(last, 1, killed)
        os.kill(killed.pid, signal.SIGKILL)
    finally:
        if killed.poll() is None:
            killed.kill()
        killed.communicate(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    killed_run = load_checkpoint(last)["mlflow_run_id"]
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    assert client.get_run(killed_run).info.status == "RUNNING"  # what kill -9 leaves behind

    proc = run_monai_bundle("run", "--config_file", f"{CFG}/train.json", *_args(root, "resumed"), "--resume", "True",
                            env=env)
    return {"root": root, "client": client, "killed_run": killed_run, "log": proc.stdout + proc.stderr}


def test_resumed_training_ends_with_the_same_weights_as_straight_training(runs):
    for name in ("checkpoint_last.pt", "model.pt"):
        a = load_checkpoint(runs["root"] / "straight" / "models" / name)
        b = load_checkpoint(runs["root"] / "resumed" / "models" / name)
        if name == "checkpoint_last.pt":
            assert a["epoch"] == b["epoch"] == 3
            assert a["validator"] == b["validator"]
            for key in ("network", "ema"):
                sa = a["state"][key].get("module", a["state"][key])
                sb = b["state"][key].get("module", b["state"][key])
                assert all(torch.equal(sa[k], sb[k]) for k in sa), key
            a = a["state"]["network"]
            b = b["state"]["network"]
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_resume_continues_the_killed_mlflow_run_with_every_epoch(runs):
    client = runs["client"]
    exp = client.get_experiment_by_name("alz_hybrid")
    all_runs = client.search_runs(exp.experiment_id)
    assert len(all_runs) == 2  # the straight run and the killed-then-resumed one: no third run
    resumed = client.get_run(runs["killed_run"])
    assert resumed.info.status == "FINISHED"
    straight = next(r for r in all_runs if r.info.run_id != runs["killed_run"])
    for key in ("val_macro_f1", "val_accuracy", "train_loss"):
        got = [(m.step, m.value) for m in client.get_metric_history(resumed.info.run_id, key)]
        want = [(m.step, m.value) for m in client.get_metric_history(straight.info.run_id, key)]
        assert sorted(got) == sorted(want) and [s for s, _ in sorted(got)] == [1, 2, 3], key
    assert "best_epoch" in resumed.data.tags and "model.pt" in {a.path for a in client.list_artifacts(runs["killed_run"])}
    # the abandoned RUNNING run was noticed (marked KILLED) before being continued
    assert f"MLflow run {runs['killed_run']}" in runs["log"] and "marked KILLED" in runs["log"]
    assert "resumed from" in runs["log"]


def test_resuming_a_finished_run_is_refused(runs):
    env = {**bundle_env(runs["root"]), "OMP_NUM_THREADS": "1"}
    with pytest.raises(AssertionError, match="that run is complete"):
        run_monai_bundle("run", "--config_file", f"{CFG}/train.json", *_args(runs["root"], "straight"),
                         "--resume", "True", env=env)
