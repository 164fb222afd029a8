"""Item 7 of issue 15: a tiny training + evaluation against a real ``mlflow server`` over HTTP, checked through
the REST API. The server binds 127.0.0.1 on a free port and is stopped by the test."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.tracking.test_mlflow_review import EXP, train_and_evaluate

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(base: str, path: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(f"{base}/api/2.0/mlflow/{path}", method="POST" if body is not None else "GET",
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture
def server(tmp_path):
    port = _free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
           "--artifacts-destination", str(tmp_path / "artifacts")]
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(f"mlflow server exited: {(tmp_path / 'server.log').read_text()[-3000:]}")
                time.sleep(0.5)
        else:
            raise RuntimeError("mlflow server did not answer in 60 s")
        yield base
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
        log.close()


def test_training_and_evaluation_over_http(server, tmp_path):
    out = train_and_evaluate(tmp_path / "work", server)
    exp = _api(server, f"experiments/get-by-name?experiment_name={EXP}")["experiment"]
    assert {t["key"]: t["value"] for t in exp["tags"]}["mlflow.experimentKind"] == "custom_model_development"
    train = _api(server, f"runs/get?run_id={out['train'].info.run_id}")["run"]
    ev = _api(server, f"runs/get?run_id={out['eval'].info.run_id}")["run"]
    contexts = sorted(t["value"] for d in train["inputs"]["dataset_inputs"] for t in d["tags"])
    assert contexts == ["test", "train", "validation"]
    tags = {t["key"]: t["value"] for t in train["data"]["tags"]}
    model = _api(server, f"logged-models/{tags['model_id']}")["model"]
    assert model["info"]["source_run_id"] == train["info"]["run_id"]
    assert _signature_inputs(server, tags["model_id"]) == [-1, 1, 32, 32]
    ev_tags = {t["key"]: t["value"] for t in ev["data"]["tags"]}
    assert ev_tags["source_run_id"] == train["info"]["run_id"] and ev_tags["source_model_id"] == tags["model_id"]
    hist = _api(server, f"metrics/get-history?run_id={train['info']['run_id']}&metric_key=val_accuracy")["metrics"]
    assert [m["step"] for m in hist] == [1, 2]


def _signature_inputs(base: str, model_id: str) -> list[int]:
    """Input shape of the model's signature, read from its MLmodel file served by the server."""
    import mlflow

    from pipelines.tracking.model import _global_tracking_uri

    with _global_tracking_uri(base):
        return list(mlflow.models.get_model_info(f"models:/{model_id}").signature.inputs.inputs[0].shape)
