"""D1/D4/D5 on the HTTP service and R4: header bombs answer 413, many small zero entries are refused cheaply, a
full server answers 503, environment overrides cannot run code. Skipped without the ``serve`` extra."""

from __future__ import annotations

import gzip
import io
import socket
import threading
import time
import zipfile

import pytest
import torch

for _name in ("fastapi", "uvicorn", "httpx", "multipart"):
    pytest.importorskip(_name, reason="serve extra not installed (pip install -e '.[serve]')", exc_type=ImportError)

import httpx  # noqa: E402
import uvicorn  # noqa: E402

from pipelines.deploy.classifier import DeployError, StudyClassifier  # noqa: E402
from pipelines.deploy.service import Limits, UploadError, create_app, safe_extract_zip  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402
from tests.security.test_header_bombs import nifti_header_bytes, write_dicom  # noqa: E402
from tests.security.test_inference_guards import TinyNet  # noqa: E402


@pytest.fixture(scope="module")
def model_ts(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "model.ts"
    torch.jit.save(torch.jit.script(TinyNet(4)), str(path))
    return path


@pytest.fixture(scope="module")
def classifier(model_ts):
    return StudyClassifier("alz_hybrid", model_ts, overrides={"image_size": 32}, device="cpu")


def serve(app):
    """A uvicorn server on a free loopback port in a thread; returns (base_url, stop)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)

    def stop():
        server.should_exit = True
        thread.join(10)
        sock.close()

    return f"http://127.0.0.1:{sock.getsockname()[1]}", stop


@pytest.fixture(scope="module")
def client(classifier):
    url, stop = serve(create_app("alz_hybrid", classifier=classifier))
    with httpx.Client(base_url=url, timeout=60) as c:
        yield c
    stop()


def _post(client, name, data):
    return client.post("/predict", files={"file": (name, data, "application/octet-stream")})


def test_nifti_header_bomb_upload_is_413(client):
    r = _post(client, "bomb.nii", nifti_header_bytes((1000, 1000, 1000)))
    assert r.status_code == 413 and "more than the limit" in r.json()["detail"]
    r = _post(client, "bomb.nii.gz", gzip.compress(nifti_header_bytes((512, 512, 512), total=352)))
    assert r.status_code == 413 and "gzip file can hold" in r.json()["detail"]


def test_dicom_rows_65535_zip_is_413_naming_the_file(client, tmp_path):
    uid = generate_uid()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for k in range(4):
            write_dicom(tmp_path / f"IM{k}.dcm", 65535, 65535, float(k), uid)
            zf.write(tmp_path / f"IM{k}.dcm", f"study/IM{k}.dcm")
    r = _post(client, "study.zip", buf.getvalue())
    assert r.status_code == 413, r.text
    assert "study/IM" in r.json()["detail"] and "65535" in r.json()["detail"] and str(tmp_path) not in r.text


def test_many_small_zero_entries_are_refused_before_unpacking(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for i in range(60):
            zf.writestr(f"study/f{i:02d}", b"\x00" * (1 << 20))
    (tmp_path / "z.zip").write_bytes(buf.getvalue())
    assert len(buf.getvalue()) < 100_000
    start = time.monotonic()
    with pytest.raises(UploadError, match="expands .*-fold") as err:
        safe_extract_zip(tmp_path / "z.zip", tmp_path / "out", Limits())
    assert err.value.status_code == 413 and time.monotonic() - start < 2.0
    assert not (tmp_path / "out").exists()


def test_full_server_answers_503(classifier, tmp_path):
    gate, entered = threading.Event(), threading.Event()
    real = classifier.classify_image

    def slow(path, return_slices=False):
        entered.set()
        assert gate.wait(30)
        return real(path, return_slices=return_slices)

    from PIL import Image

    png = io.BytesIO()
    Image.fromarray((torch.rand(32, 32).numpy() * 255).astype("uint8")).save(png, format="PNG")
    url, stop = serve(create_app("alz_hybrid", classifier=classifier, limits=Limits(max_concurrent=1)))
    classifier.classify_image = slow
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            first = {}
            t = threading.Thread(target=lambda: first.update(r=_post(c, "a.png", png.getvalue())), daemon=True)
            t.start()
            assert entered.wait(30)
            with httpx.Client(base_url=url, timeout=60) as c2:
                r = _post(c2, "b.png", png.getvalue())
            assert r.status_code == 503 and "busy" in r.json()["detail"] and r.headers["retry-after"]
            gate.set()
            t.join(30)
            assert first["r"].status_code == 200
    finally:
        gate.set()
        del classifier.classify_image
        stop()


@pytest.mark.parametrize("value", [
    '{"image_size": "$__import__(\'pathlib\').Path(\'PWNED\').touch() or 32"}',
    '{"image_size": "@network_def"}',
    '{"class_names": ["a", "%configs/x.json#y"]}',
    '{"network_def#_target_": "os.system"}',
    '{"slice_preprocessing": {"_target_": "builtins.exec", "source": "1"}}',
])
def test_environment_overrides_are_plain_values_only(model_ts, monkeypatch, tmp_path, value):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NEURO_DEPLOY_OVERRIDES", value)
    with pytest.raises(DeployError, match="NEURO_DEPLOY_OVERRIDES"):
        StudyClassifier("alz_hybrid", model_ts, device="cpu")
    assert not (tmp_path / "PWNED").exists()


def test_plain_environment_overrides_still_work(model_ts, monkeypatch):
    monkeypatch.setenv("NEURO_DEPLOY_OVERRIDES", '{"image_size": 48, "aggregation": "max", "min_slices": 4}')
    clf = StudyClassifier("alz_hybrid", model_ts, device="cpu")
    assert clf.aggregation == "max" and clf.predictor.min_slices == 4
