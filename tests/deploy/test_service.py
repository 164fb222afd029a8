"""The HTTP service on a loopback port, called with a real HTTP client (skipped without the ``serve`` extra)."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time

import numpy as np
import pytest

for _name in ("fastapi", "uvicorn", "httpx", "multipart"):
    pytest.importorskip(_name, reason="serve extra not installed (pip install -e '.[serve]')", exc_type=ImportError)

import httpx  # noqa: E402
import uvicorn  # noqa: E402

from pipelines.deploy.service import Limits, UploadError, build_parser, create_app, safe_extract_zip  # noqa: E402
from tests.deploy.helpers import PATIENT_ID, PATIENT_NAME, zip_bytes, zip_folder  # noqa: E402

LIMITS = Limits(max_upload_bytes=1_500_000, max_unzipped_bytes=1_000_000, max_files=50, max_ratio=50)


@pytest.fixture(scope="module")
def client(classifier):
    app = create_app("alz_hybrid", classifier=classifier, limits=LIMITS)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
        yield c
    server.should_exit = True
    thread.join(10)
    sock.close()


def _post(client, name, data, **form):
    return client.post("/predict", files={"file": (name, data, "application/octet-stream")}, data=form)


def test_openapi_schema_documents_predict_and_errors(client):
    schema = client.get("/openapi.json").json()
    predict = schema["paths"]["/predict"]["post"]
    assert "multipart/form-data" in predict["requestBody"]["content"]
    assert {"200", "400", "413", "415", "422"} <= set(predict["responses"])
    assert "disclaimer" in schema["components"]["schemas"]["Prediction"]["required"]


def test_health_names_model_and_disclaimer(client):
    body = client.get("/health").json()
    assert body["status"] == "ok" and body["model"]["bundle"] == "alz_hybrid"
    assert body["disclaimer"].startswith("Research use only")


def test_dicom_study_zip_gives_the_bundle_result(client, mr_series, bundle_predictor):
    r = _post(client, "study.zip", zip_folder(mr_series))
    assert r.status_code == 200, r.text
    body = r.json()
    ref = bundle_predictor.predict_volume(mr_series)
    assert body["input"]["kind"] == "dicom" and body["input"]["n_instances"] == 24
    assert body["study"]["predicted_class"] == ref["predicted_class"]
    np.testing.assert_allclose([body["study"]["probabilities"][c] for c in body["class_names"]],
                               [ref["probabilities"][c] for c in body["class_names"]], atol=1e-5)
    assert body["disclaimer"].startswith("Research use only") and body["overlay"] is None
    assert PATIENT_NAME not in r.text and PATIENT_ID not in r.text


def test_overlay_is_a_base64_png_of_a_classified_slice(client, mr_series):
    body = _post(client, "study.zip", zip_folder(mr_series), overlay="true").json()
    png = base64.b64decode(body["overlay"]["png_base64"])
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert body["overlay"]["method"] == "rollout"
    assert body["overlay"]["slice_index"] in [s["slice_index"] for s in body["slices"]]
    assert body["overlay"]["class"] == body["study"]["predicted_class"]


def test_nifti_upload_matches_the_classifier(client, classifier, mr_volume, tmp_path):
    import nibabel as nib

    path = tmp_path / "head.nii.gz"
    nib.save(nib.Nifti1Image(mr_volume.astype(np.float32), np.diag([3.0, 3.0, 3.0, 1.0])), path)
    r = _post(client, "head.nii.gz", path.read_bytes())
    assert r.status_code == 200, r.text
    assert r.json()["input"]["kind"] == "nifti"
    ref = classifier.classify_nifti(path)["study"]
    assert r.json()["study"]["predicted_class"] == ref["predicted_class"]
    assert r.json()["study"]["probabilities"] == pytest.approx(ref["probabilities"], abs=1e-9)


def test_png_upload_is_one_slice(client, mr_volume):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.uint8(255 * mr_volume[:, :, 12].T)).save(buf, format="PNG")
    body = _post(client, "slice.png", buf.getvalue()).json()
    assert body["input"]["kind"] == "image" and body["n_slices"] == 1 and body["slices"][0]["slice_index"] == -1


def test_corrupt_zip_is_400(client):
    r = _post(client, "study.zip", b"PK\x03\x04" + b"\x00garbage" * 20)
    assert r.status_code == 400 and "not a readable zip archive" in r.json()["detail"]


def test_path_traversal_zip_is_400(client, tmp_path):
    r = _post(client, "study.zip", zip_bytes([("study/IM0001.dcm", b"x"), ("../../evil.dcm", b"x")]))
    assert r.status_code == 400
    assert r.json()["detail"] == "unsafe path in zip archive: '../../evil.dcm' leaves the archive folder ('..')"


def test_absolute_path_zip_is_400(client):
    r = _post(client, "study.zip", zip_bytes([("/tmp/evil.dcm", b"x")]))
    assert r.status_code == 400 and "is absolute" in r.json()["detail"]


def test_oversized_upload_is_413(client):
    r = _post(client, "study.zip", b"\x00" * 1_600_000)
    assert r.status_code == 413 and "larger than the limit of 1500000 bytes" in r.json()["detail"]


def test_oversized_chunked_upload_is_413(client):
    boundary = "deploytestboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.zip\"\r\n"
            "Content-Type: application/zip\r\n\r\n").encode()

    def body():
        yield head
        for _ in range(40):
            yield b"\x00" * 50_000
        yield f"\r\n--{boundary}--\r\n".encode()

    r = client.post("/predict", content=body(), headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert r.request.headers.get("transfer-encoding") == "chunked" and "content-length" not in r.request.headers
    assert r.status_code == 413 and r.json()["detail"] == "upload larger than the limit of 1500000 bytes"


def test_zip_bomb_is_413(client):
    r = _post(client, "study.zip", zip_bytes([("study/IM0001.dcm", b"\x00" * 1_200_000)]))
    assert r.status_code == 413 and "zip bomb" in r.json()["detail"]


def test_non_dicom_file_is_415(client):
    r = _post(client, "notes.dcm", b"just some text, not DICOM")
    assert r.status_code == 415 and "unsupported file type" in r.json()["detail"]


def test_zip_without_dicom_is_422(client):
    r = _post(client, "study.zip", zip_bytes([("study/readme.txt", b"no images here")]))
    assert r.status_code == 422 and "no DICOM files" in r.json()["detail"]


def test_extraction_limits_file_count_and_links(tmp_path):
    many = tmp_path / "many.zip"
    many.write_bytes(zip_bytes([(f"f{i}.dcm", b"x") for i in range(LIMITS.max_files + 1)]))
    with pytest.raises(UploadError, match="51 files, more than the limit of 50") as err:
        safe_extract_zip(many, tmp_path / "a", LIMITS)
    assert err.value.status_code == 413
    import zipfile

    link = zipfile.ZipInfo("study/link")
    link.external_attr = (0o120777 << 16)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(link, "/etc/passwd")
    (tmp_path / "link.zip").write_bytes(buf.getvalue())
    with pytest.raises(UploadError, match="symbolic link"):
        safe_extract_zip(tmp_path / "link.zip", tmp_path / "b", LIMITS)
    assert not (tmp_path / "b").exists()


def test_service_binds_loopback_by_default():
    args = build_parser().parse_args(["-m", "model.ts"])
    assert args.host == "127.0.0.1" and args.bundle == "alz_hybrid"
