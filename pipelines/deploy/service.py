"""HTTP inference service (FastAPI + uvicorn; the ``serve`` extra): upload a study, get the classification JSON.

``POST /predict`` (multipart form: ``file``, optional ``overlay=true``) accepts

* a zip of one DICOM study (the app's series selection picks the series, as in the MONAI Deploy app),
* a NIfTI volume (``.nii`` / ``.nii.gz``),
* a 2D picture (PNG, JPEG, BMP, TIFF),

and answers the same JSON as the deploy apps' ``output.json`` (per-slice probabilities, study result, model name
and version, ``disclaimer``), plus with ``overlay=true`` a 3-panel PNG (image, heat map, overlay; attention
rollout for transformer networks, else Grad-CAM) of the slice that most supports the study's class, base64-encoded.
``GET /health`` and ``GET /model`` describe the service; the OpenAPI schema is at ``/openapi.json`` (``/docs``).

Bad input gets one 4xx answer ``{"detail": "..."}``: 400 unreadable or unsafe archive (corrupt zip, absolute
paths, ``..``, links, encryption), 413 too large (upload bytes, unpacked bytes, number of files, compression
ratio of any entry, a NIfTI/DICOM header declaring more voxels than ``$NEURO_MAX_VOXELS`` / ``$NEURO_MAX_BYTES``
or than its file holds), 415 not a supported file type, 422 readable but unusable (no DICOM series of the app's
modality, a blank volume...). Limits are checked before unpacking (declared sizes) and while unpacking (bytes
actually written); headers are checked before any volume is allocated (:mod:`pipelines.io.limits`); nothing is
written outside a per-request temporary folder, and file names from the client are never used as paths. At most
``max_concurrent`` requests are classified at once; more get 503 with ``Retry-After``. Uploads and results are
not stored.

Run (bound to 127.0.0.1 unless ``--host`` says otherwise)::

    python -m pipelines.deploy.service --bundle alz_hybrid -m bundles/alz_hybrid/models/model.ts --port 8000
"""

from __future__ import annotations

import argparse
import base64
import logging
import os
import re
import shutil
import stat
import tempfile
import threading
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from fastapi import FastAPI, File, Form, HTTPException, UploadFile
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from pipelines.deploy.classifier import DISCLAIMER, DeployError, StudyClassifier
from pipelines.deploy.specs import get_spec
from pipelines.io.limits import InputTooLargeError

__all__ = ["Limits", "UploadError", "build_parser", "create_app", "detect_kind", "main", "safe_extract_zip"]

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20
# below this size deflate's own overhead keeps ratios meaningless (a 1 KiB header of zeros)
_RATIO_MIN_BYTES = 4096
_IMAGE_MAGIC = {
    b"\x89PNG\r\n\x1a\n": ".png",
    b"\xff\xd8\xff": ".jpg",
    b"BM": ".bmp",
    b"II*\x00": ".tif",
    b"MM\x00*": ".tif",
}


class Limits(BaseModel):
    """Upload limits (bytes and counts)."""

    max_upload_bytes: int = Field(256 * 1024**2, gt=0, description="largest request body accepted (bytes)")
    max_unzipped_bytes: int = Field(1024**3, gt=0, description="largest total unpacked size of a zip (bytes)")
    max_files: int = Field(5000, gt=0, description="most files in a zip")
    max_ratio: float = Field(200.0, gt=1, description="largest uncompressed/compressed size of any zip entry "
                                                      "(entries under 4 KiB excepted) and of the whole archive")
    max_concurrent: int = Field(2, gt=0, description="requests classified at once; more are answered 503")


class UploadError(HTTPException):
    """Bad input: an HTTP 4xx answer with one message."""

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(status_code=status_code, detail=detail)


# --------------------------------------------------------------------------------------------------- uploads


def detect_kind(head: bytes, filename: str = "") -> str:
    """The kind of an upload from its first bytes (the file name only separates ``.nii`` from other data).

    Returns:
        ``"zip"``, ``"nifti_gz"``, ``"nifti"`` or an image suffix (``".png"``, ``".jpg"``, ``".bmp"``, ``".tif"``).

    Raises:
        UploadError: 415 for anything else (with a hint for single DICOM files).
    """
    name = filename.lower()
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if head[:2] == b"\x1f\x8b":
        if name.endswith(".nii.gz"):
            return "nifti_gz"
        raise UploadError(415, "gzip upload that is not a .nii.gz NIfTI volume; send a NIfTI volume as .nii.gz, "
                               "or a DICOM study as a zip")
    if len(head) >= 348 and (head[344:348] in (b"n+1\x00", b"ni1\x00") or head[4:8] == b"n+2\x00"):
        return "nifti"
    for magic, suffix in _IMAGE_MAGIC.items():
        if head.startswith(magic):
            return suffix
    if len(head) >= 132 and head[128:132] == b"DICM":
        raise UploadError(415, "a single DICOM file: upload the whole study (all files of the series) as a zip")
    raise UploadError(415, "unsupported file type: expected a zip of a DICOM study, a NIfTI volume (.nii/.nii.gz) "
                           "or a PNG/JPEG/BMP/TIFF image")


_DRIVE = re.compile(r"^[A-Za-z]:")


def _safe_member_path(name: str) -> PurePosixPath:
    """The relative path of a zip entry, or UploadError(400) for absolute paths, ``..``, drive letters, NUL."""
    if not name or "\x00" in name:
        raise UploadError(400, f"unsafe path in zip archive: {name!r} (empty or NUL)")
    unified = name.replace("\\", "/")
    if unified.startswith("/") or _DRIVE.match(unified):
        raise UploadError(400, f"unsafe path in zip archive: {name!r} is absolute")
    parts = [p for p in unified.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise UploadError(400, f"unsafe path in zip archive: {name!r} leaves the archive folder ('..')")
    if not parts:
        raise UploadError(400, f"unsafe path in zip archive: {name!r}")
    return PurePosixPath(*parts)


def safe_extract_zip(zip_path: str | os.PathLike, dest: str | os.PathLike, limits: Limits) -> list[Path]:
    """Unpack a zip archive into ``dest`` with zip-slip and zip-bomb protection.

    Checks, in order: a readable archive (400); every entry name relative without ``..`` (400); no symbolic
    links, no encryption (400); at most ``max_files`` files, declared total size at most ``max_unzipped_bytes``,
    no entry with a compression ratio above ``max_ratio`` (413); then, while writing, the bytes actually
    written (413) and the entries' CRC (400). Directories are created, never trusted from the archive.

    Returns:
        The written files.
    """
    dest = Path(dest).resolve()
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError) as e:
        raise UploadError(400, f"upload is not a readable zip archive ({e})") from e
    with zf:
        infos = [i for i in zf.infolist() if not i.is_dir()]
        if not infos:
            raise UploadError(422, "zip archive holds no files")
        if len(infos) > limits.max_files:
            raise UploadError(413, f"zip archive holds {len(infos)} files, more than the limit of {limits.max_files}")
        targets = []
        for info in infos:
            rel = _safe_member_path(info.filename)
            if stat.S_ISLNK(info.external_attr >> 16):
                raise UploadError(400, f"zip entry {info.filename!r} is a symbolic link")
            if info.flag_bits & 0x1:
                raise UploadError(400, f"zip entry {info.filename!r} is encrypted")
            if (info.file_size > limits.max_ratio * max(info.compress_size, 1)
                    and info.file_size > _RATIO_MIN_BYTES):
                ratio = info.file_size / max(info.compress_size, 1)
                raise UploadError(413, f"zip entry {info.filename!r} expands {ratio:.0f}-fold, more than the limit "
                                       f"of {limits.max_ratio:.0f} (zip bomb?)")
            target = (dest / rel).resolve()
            if not target.is_relative_to(dest):
                raise UploadError(400, f"unsafe path in zip archive: {info.filename!r}")
            targets.append((info, target))
        declared = sum(i.file_size for i in infos)
        if declared > limits.max_unzipped_bytes:
            raise UploadError(413, f"zip archive expands to {declared} bytes, more than the limit of "
                                   f"{limits.max_unzipped_bytes}")
        packed = sum(i.compress_size for i in infos)
        if declared > _RATIO_MIN_BYTES and declared > limits.max_ratio * max(packed, 1):
            raise UploadError(413, f"zip archive expands {declared / max(packed, 1):.0f}-fold, more than the limit "
                                   f"of {limits.max_ratio:.0f} (zip bomb?)")
        written = 0
        out = []
        for info, target in targets:
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with zf.open(info) as src, open(target, "xb") as dst:
                    while chunk := src.read(_CHUNK):
                        written += len(chunk)
                        if written > limits.max_unzipped_bytes:
                            raise UploadError(413, f"zip archive expands to more than the limit of "
                                                   f"{limits.max_unzipped_bytes} bytes")
                        dst.write(chunk)
            except FileExistsError as e:
                raise UploadError(400, f"zip archive holds {info.filename!r} twice") from e
            except OSError as e:  # e.g. an entry below a path that another entry made a file
                raise UploadError(400, f"cannot unpack zip entry {info.filename!r} ({e.strerror or e})") from e
            except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as e:
                raise UploadError(400, f"corrupt zip entry {info.filename!r} ({e})") from e
            out.append(target)
    return out


class _BodyTooLarge(UploadError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"upload larger than the limit of {limit} bytes")


class BodySizeLimitMiddleware:
    """ASGI middleware rejecting request bodies above ``limit`` bytes with 413.

    ``Content-Length`` is checked before anything is read; bodies without it (chunked) are counted as they
    arrive, and the request fails as soon as the count passes the limit.
    """

    def __init__(self, app, limit: int) -> None:
        self.app = app
        self.limit = int(limit)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.limit
            except ValueError:
                too_big = False
            if too_big:
                # read and drop a moderately oversized body first: answering while the client is still sending
                # makes the server close a socket with unread data, and the client then sees a reset, not the 413
                if int(length) <= max(4 * self.limit, 16 * 1024**2):
                    more = True
                    while more:
                        message = await receive()
                        more = message.get("type") == "http.request" and message.get("more_body", False)
                response = JSONResponse({"detail": f"upload of {int(length)} bytes is larger than the limit of "
                                                   f"{self.limit} bytes"}, status_code=413,
                                        headers={"Connection": "close"})
                await response(scope, receive, send)
                return
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _BodyTooLarge(self.limit)
            return message

        await self.app(scope, limited_receive, send)


# --------------------------------------------------------------------------------------------------- schema


class ModelInfo(BaseModel):
    bundle: str = Field(description="bundle name")
    name: str = Field(description="model name from the bundle's metadata.json")
    version: str = Field(description="model version from the bundle's metadata.json")
    file: str = Field(description="TorchScript file name")


class InputInfo(BaseModel):
    kind: str = Field(description="dicom, nifti or image")
    n_instances: int = Field(description="DICOM instances of the series (1 for NIfTI and images)")
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    modality: str | None = None


class StudyResult(BaseModel):
    predicted_class: str
    predicted_index: int
    probability: float = Field(ge=0, le=1, description="aggregated probability of the predicted class")
    probabilities: dict[str, float] = Field(description="aggregated probability of every class, in [0, 1]")
    score: float | None = Field(None, description="threshold rule only: the positive class's study score")
    scores: dict[str, float] | None = Field(None, description="threshold rule only: max and topk_mean scores")
    threshold: float | None = Field(None, description="threshold rule only: positive when score >= threshold")


class SliceResult(BaseModel):
    slice_index: int = Field(description="index along the bundle's slicing axis (RAS volume); -1 for a 2D image")
    predicted_class: str
    probabilities: dict[str, float]


class Overlay(BaseModel):
    png_base64: str = Field(description="3-panel PNG (image, heat map, overlay), base64")
    method: str = Field(description="rollout or gradcam")
    slice_index: int
    class_name: str = Field(alias="class")


class Prediction(BaseModel):
    disclaimer: str
    model: ModelInfo
    class_names: list[str]
    input: InputInfo
    aggregation: str = Field(description="how slice probabilities make the study result")
    study: StudyResult
    n_slices: int
    slices: list[SliceResult]
    overlay: Overlay | None = None


class ErrorBody(BaseModel):
    detail: str


_ERRORS = {code: {"model": ErrorBody, "description": text} for code, text in (
    (400, "unreadable or unsafe archive"), (413, "upload, unpacked archive or declared image size too large"),
    (503, "busy: max_concurrent requests already running"),
    (415, "unsupported file type"), (422, "readable input that cannot be classified"))}


# --------------------------------------------------------------------------------------------------- app


def create_app(
    bundle: str = "alz_hybrid",
    model_path: str | os.PathLike | None = None,
    classifier: StudyClassifier | None = None,
    overrides: Mapping[str, Any] | None = None,
    limits: Limits | None = None,
) -> FastAPI:
    """The FastAPI app serving one bundle's model.

    Args:
        bundle: bundle name (its deploy spec gives the series selection rules).
        model_path: ``model.ts``; ignored when ``classifier`` is given.
        classifier: a ready :class:`StudyClassifier` (tests share one).
        overrides: config ids to override when building the classifier.
        limits: upload limits (default :class:`Limits`).
    """
    from pipelines.deploy.app import select_series_files  # the same series selection as the app

    spec = get_spec(bundle)
    if classifier is None:
        if model_path is None:
            raise ValueError("create_app needs model_path or classifier")
        classifier = StudyClassifier(spec, model_path, overrides=overrides)
    limits = limits or Limits()
    clf = classifier
    busy = threading.BoundedSemaphore(limits.max_concurrent)

    app = FastAPI(
        title=f"{spec.app_name} classification service",
        version=clf.model_info["version"] or "0",
        description=f"{spec.description}. {DISCLAIMER} Upload a zip of one DICOM study, a NIfTI volume or a 2D "
                    "image to /predict.",
    )
    app.add_middleware(BodySizeLimitMiddleware, limit=limits.max_upload_bytes)

    @app.get("/health")
    def health() -> dict:
        """Liveness: the model is loaded."""
        return {"status": "ok", "model": clf.model_info, "disclaimer": DISCLAIMER}

    @app.get("/model")
    def model() -> dict:
        """The model, its classes, the accepted inputs and the limits."""
        return {
            "model": clf.model_info,
            "class_names": clf.class_names,
            "modality": spec.modality,
            "aggregation": clf.aggregation,
            "inputs": ["zip of a DICOM study", "NIfTI (.nii, .nii.gz)", "PNG/JPEG/BMP/TIFF image"],
            "limits": limits.model_dump(),
            "disclaimer": DISCLAIMER,
        }

    @app.post("/predict", response_model=Prediction, response_model_by_alias=True, responses=_ERRORS)
    def predict(
        file: UploadFile = File(description="zip of a DICOM study, a NIfTI volume (.nii/.nii.gz) or a 2D image"),
        overlay: bool = Form(False, description="add a Grad-CAM / attention-rollout overlay PNG (base64)"),
    ) -> dict:
        """Classify one study; research use only."""
        if not busy.acquire(blocking=False):
            raise HTTPException(503, f"server busy: {limits.max_concurrent} request(s) already being classified; "
                                     "retry later", headers={"Retry-After": "5"})
        try:
            return _predict(file, overlay)
        finally:
            busy.release()

    def _predict(file: UploadFile, overlay: bool) -> dict:
        with tempfile.TemporaryDirectory(prefix="neuro-deploy-") as tmp:
            tmp_path = Path(tmp)
            raw = tmp_path / "upload.bin"
            size = 0
            with open(raw, "wb") as dst:
                while chunk := file.file.read(_CHUNK):
                    size += len(chunk)
                    if size > limits.max_upload_bytes:
                        raise UploadError(413, f"upload larger than the limit of {limits.max_upload_bytes} bytes")
                    dst.write(chunk)
            if size == 0:
                raise UploadError(422, "empty upload")
            with open(raw, "rb") as fh:
                head = fh.read(512)
            kind = detect_kind(head, file.filename or "")
            try:
                if kind == "zip":
                    from pipelines.io.dicom import DicomSeriesError, load_series

                    study = tmp_path / "study"
                    safe_extract_zip(raw, study, limits)
                    files = select_series_files(study, spec)
                    try:
                        volume = load_series(files)
                    except DicomSeriesError as e:
                        if isinstance(e, InputTooLargeError):
                            raise UploadError(413, str(e).replace(str(study) + os.sep, "")) from e
                        raise DeployError(str(e).replace(str(study) + os.sep, "")) from e
                    result, images = clf.classify_series(volume, return_slices=True)
                elif kind in ("nifti", "nifti_gz"):
                    path = tmp_path / ("upload.nii.gz" if kind == "nifti_gz" else "upload.nii")
                    shutil.move(raw, path)
                    result, images = clf.classify_nifti(path, return_slices=True)
                else:
                    path = tmp_path / f"upload{kind}"
                    shutil.move(raw, path)
                    result, images = clf.classify_image(path, return_slices=True)
                if overlay:
                    png, info = clf.overlay_png(result, images)
                    result["overlay"] = {"png_base64": base64.b64encode(png).decode("ascii"), "method": info["method"],
                                         "slice_index": info["slice_index"], "class": info["class"]}
            except DeployError as e:
                status = 413 if isinstance(e.__cause__, InputTooLargeError) else 422
                raise UploadError(status, str(e).replace(str(tmp_path) + os.sep, "")) from e
        return result

    return app


def build_parser() -> argparse.ArgumentParser:
    """Command line of ``python -m pipelines.deploy.service``."""
    parser = argparse.ArgumentParser(description="HTTP classification service (research use only)")
    parser.add_argument("--bundle", default="alz_hybrid", help="bundle name (default alz_hybrid)")
    parser.add_argument("-m", "--model", required=True, help="model.ts exported with monai.bundle ckpt_export")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-upload-mb", type=float, default=256.0, help="largest upload (MiB)")
    parser.add_argument("--max-unzipped-mb", type=float, default=1024.0, help="largest unpacked study (MiB)")
    parser.add_argument("--max-files", type=int, default=5000, help="most files in a zip")
    parser.add_argument("--max-concurrent", type=int, default=2,
                        help="requests classified at once; more are answered 503 (default 2)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``python -m pipelines.deploy.service --bundle alz_hybrid -m model.ts [--host 127.0.0.1] [--port 8000]``."""
    import uvicorn

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    limits = Limits(max_upload_bytes=int(args.max_upload_mb * 1024**2),
                    max_unzipped_bytes=int(args.max_unzipped_mb * 1024**2), max_files=args.max_files,
                    max_concurrent=args.max_concurrent)
    app = create_app(args.bundle, args.model, limits=limits)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
