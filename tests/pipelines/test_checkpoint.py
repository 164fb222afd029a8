"""Atomic best-model saving, the resume checkpoint's contents, and abandoned MLflow runs marked KILLED."""

from __future__ import annotations

import random
import socket
import subprocess
import sys

import mlflow
import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events

from pipelines.io.atomic import atomic_torch_save
from pipelines.tracking import HOST_TAG, PID_TAG, mark_dead_runs
from pipelines.training.checkpoint import (
    AtomicCheckpointSaver,
    TrainingCheckpoint,
    load_checkpoint,
    resume_path,
    rng_state,
    set_rng_state,
)


def test_failed_save_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    atomic_torch_save({"w": torch.ones(2)}, path)

    def broken(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save({"w": torch.zeros(2)}, path)
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_best_model_is_replaced_never_deleted_first(tmp_path):
    net = torch.nn.Linear(2, 1)
    saver = AtomicCheckpointSaver(str(tmp_path), {"model": net}, save_key_metric=True, key_metric_name="m",
                                  key_metric_filename="model.pt")
    engine = Engine(lambda e, b: None)
    for score in (0.1, 0.5):
        engine.state.metrics["m"] = score
        net.bias.data.fill_(score)
        saver.metrics_completed(engine)  # ignite "removes" the old best first: that must not delete model.pt
        assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
        assert load_checkpoint(tmp_path / "model.pt")["bias"].item() == pytest.approx(score)


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    atomic_torch_save(rng_state(), tmp_path / "rng.pt")
    want = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(load_checkpoint(tmp_path / "rng.pt"))
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(want[0], got[0]) and np.array_equal(want[1], got[1]) and want[2] == got[2]


@pytest.mark.parametrize("value, expected", [(False, None), (None, None), ("false", None), (True, "default.pt"),
                                             ("True", "default.pt"), ("/x/other.pt", "/x/other.pt")])
def test_resume_value_names_the_checkpoint(value, expected):
    got = resume_path(value, "default.pt")
    assert (None if got is None else str(got)) == expected


def test_resume_from_a_missing_checkpoint_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        TrainingCheckpoint(tmp_path / "last.pt", {"network": torch.nn.Linear(1, 1)}, resume=True)


def test_training_checkpoint_restores_the_state_it_saved(tmp_path):
    net = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(3)
    sampler = torch.utils.data.RandomSampler(range(4), generator=gen)

    def step(engine, batch):
        opt.zero_grad()
        net(torch.randn(1, 2)).sum().backward()
        opt.step()

    engine = Engine(step)
    TrainingCheckpoint(tmp_path / "last.pt", {"network": net, "optimizer": opt, "sampler": sampler}).attach(engine)
    engine.add_event_handler(Events.EPOCH_COMPLETED(once=1), lambda e: e.terminate())
    engine.run(list(sampler), max_epochs=3)
    saved = load_checkpoint(tmp_path / "last.pt")
    assert saved["epoch"] == 1 and saved["trainer"]["iteration"] == 4 and saved["mlflow_run_id"] is None

    net2 = torch.nn.Linear(2, 1)
    opt2 = torch.optim.SGD(net2.parameters(), lr=0.1, momentum=0.9)
    sampler2 = torch.utils.data.RandomSampler(range(4), generator=torch.Generator().manual_seed(99))
    engine2 = Engine(lambda e, b: None)
    ckpt = TrainingCheckpoint(tmp_path / "last.pt", {"network": net2, "optimizer": opt2, "sampler": sampler2},
                              resume=True)
    ckpt.attach(engine2)
    epochs = []
    engine2.add_event_handler(Events.EPOCH_STARTED, lambda e: epochs.append(e.state.epoch))
    engine2.run([0, 1, 2, 3], max_epochs=3)
    assert epochs == [2, 3]
    assert torch.equal(sampler2.generator.get_state(), saved["state"]["sampler"]["generator"])
    assert all(torch.equal(a, b) for a, b in zip(net2.state_dict().values(), saved["state"]["network"].values()))
    assert opt2.state_dict()["state"][0]["momentum_buffer"].shape == (1, 2)


def test_running_run_of_a_gone_process_is_marked_killed(tmp_path, caplog):
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("e", artifact_location=(tmp_path / "a").as_uri())
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host = socket.gethostname()
    dead = client.create_run(exp, tags={PID_TAG: str(gone.pid), HOST_TAG: host}).info.run_id
    alive = client.create_run(exp, tags={PID_TAG: str(subprocess.os.getppid()), HOST_TAG: host}).info.run_id
    elsewhere = client.create_run(exp, tags={PID_TAG: str(gone.pid), HOST_TAG: host + "-other"}).info.run_id
    untagged = client.create_run(exp).info.run_id
    with caplog.at_level("WARNING", logger="pipelines.tracking"):
        assert mark_dead_runs(client, exp) == [dead]
    assert client.get_run(dead).info.status == "KILLED"
    assert {client.get_run(r).info.status for r in (alive, elsewhere, untagged)} == {"RUNNING"}
    assert f"MLflow run {dead}" in caplog.text and "marked KILLED" in caplog.text
