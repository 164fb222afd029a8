"""Multi-slice classification of whole studies: a folder of 2D images, a single image, a 3D NIfTI volume,
or a DICOM series folder. Per-slice probabilities plus a study-level result, written as CSV and JSON.

The preprocessing is passed in from the bundle's ``inference.json`` (the same transforms as validation in
``train.json``), so a slice is normalised exactly as in training.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import re
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from pipelines.inference.aggregate import aggregate_probs
from pipelines.io.atomic import atomic_write
from pipelines.io.pseudonym import public_name, redact_paths
from pipelines.manifests.builders import IMAGE_EXTENSIONS, NIFTI_EXTENSIONS

logger = logging.getLogger(__name__)

#: written to the output folder when an inference fails (the error, the time); removed by the next success
FAILED_JSON = "failed.json"
#: outputs a failed run moves aside (``predictions.json`` -> ``predictions.previous.json``)
PREDICTION_FILES = ("predictions.json", "predictions.csv")

_SUBJECT_RE = re.compile(r"(sub-[A-Za-z0-9]+)")


class InputError(ValueError):
    """An inference input that cannot be used; the message names the path and the problem."""


def load_state_dict(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict:
    """Load network weights safely (``weights_only=True``) from a MONAI/ignite checkpoint.

    Accepts a bare state dict or a dict holding it under ``model`` / ``network`` / ``state_dict``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (train the bundle first, or pass --ckpt_path)")
    ckpt = torch.load(path, map_location=device, weights_only=True)
    for key in ("model", "network", "state_dict"):
        if isinstance(ckpt, dict) and key in ckpt and isinstance(ckpt[key], dict):
            return ckpt[key]
    return ckpt


def _root_cause(err: BaseException) -> BaseException:
    while err.__cause__ is not None:
        err = err.__cause__
    return err


@contextlib.contextmanager
def no_stale_outputs(output_dir: str | os.PathLike, names: Sequence[str] = PREDICTION_FILES,
                     input_path: str | os.PathLike | None = None, keep_names: bool = False):
    """Run an inference so that a failure never leaves an earlier run's results looking current.

    On an exception the existing ``names`` in ``output_dir`` are renamed to ``<stem>.previous<suffix>`` and
    :data:`FAILED_JSON` (``{"status": "failed", "error", "error_type", "time"}``) is written; the exception is
    re-raised. On success an old :data:`FAILED_JSON` is removed.

    The stored error has every path at or below ``input_path`` replaced by a pseudonym
    (:func:`pipelines.io.pseudonym.redact_paths`) unless ``keep_names``; the raised exception keeps the paths.
    """
    out = Path(output_dir)
    try:
        yield
    except BaseException as err:
        try:
            out.mkdir(parents=True, exist_ok=True)
            for name in names:
                old = out / name
                if old.exists():
                    os.replace(old, old.with_name(f"{old.stem}.previous{old.suffix}"))
            root = _root_cause(err)
            message = redact_paths(str(root) or type(root).__name__, input_path, keep_names)
            record = {"status": "failed", "error": message,
                      "error_type": type(root).__name__,
                      "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                      "moved_aside": [f"{Path(n).stem}.previous{Path(n).suffix}" for n in names]}
            atomic_write(out / FAILED_JSON, lambda p: p.write_text(json.dumps(record, indent=2)))
        except OSError as write_err:  # an unwritable folder must not hide the original error
            logger.warning("%s: cannot record the failure (%s)", out, write_err)
        raise
    (out / FAILED_JSON).unlink(missing_ok=True)


def is_nifti(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(NIFTI_EXTENSIONS)


def is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def _looks_like_dicom(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
        return len(head) == 132 and head[128:132] == b"DICM"
    except OSError:
        return False


class ClassificationPredictor:
    """Predict class probabilities for studies with a trained 2D slice classifier.

    Args:
        network: the classifier (returns logits ``(N, C)``); weights are loaded from ``ckpt_path``.
        class_names: class names in output order.
        image_transform: dict transform ``{"image": path} -> {"image": (1, H, W) tensor}`` for 2D files.
        volume_transform: dict transform ``{"image": (1, X, Y, Z) MetaTensor} -> list of slice dicts`` (each
            with ``image`` (1, H, W) and ``slice_index``), e.g. Orientationd + ExtractSlicesd + the 2D
            normalisation. The predictor loads NIfTI files (MONAI ``LoadImage``) and DICOM series folders
            (:func:`pipelines.io.dicom.load_series`) itself.
        ckpt_path: weights to load (None: use the network as it is).
        device: inference device.
        batch_size: slices per forward pass.
        aggregation: study aggregation (:func:`pipelines.inference.aggregate.aggregate_probs`).
        topk: k for ``topk_mean``.
        model_name, model_version: recorded in the JSON output.
        expected_modality: DICOM Modality (or list) the model was trained on, e.g. ``"MR"``; a DICOM series of
            another modality is refused (None: no check; NIfTI files carry no modality).
        allow_other_modality: warn instead of refusing a series of another modality.
        min_slices: fewest voxels a volume must have along every spatial axis (1 slice of a PET or a 2D image
            saved as a volume is refused); 1 disables the check.
        series_uid: SeriesInstanceUID to use when a DICOM folder holds several series.
        series_description: case-insensitive regular expression on SeriesDescription choosing the series when a
            folder holds several (used when ``series_uid`` is None).
        max_voxels: largest volume read (voxels); None: ``$NEURO_MAX_VOXELS`` or
            :data:`pipelines.io.limits.DEFAULT_MAX_VOXELS`.
        progress: progress bars over studies and slices on stderr; None: the bundle's ``progress`` config id
            (default true); never when stderr is not a terminal (see :mod:`pipelines.tracking.progress`).
        keep_study_names: write study, file and input names as they are; default False writes
            ``study-<hash>`` / ``image-<hash>`` / ``input-<hash>`` pseudonyms (BIDS ``sub-XXX`` names stay), since
            folder names are often patient ids (:mod:`pipelines.io.pseudonym`). ``failed.json`` follows it too.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        class_names: Sequence[str],
        image_transform: Callable,
        volume_transform: Callable | None = None,
        ckpt_path: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        aggregation: str = "mean",
        topk: int = 3,
        model_name: str = "model",
        model_version: str = "",
        expected_modality: str | Sequence[str] | None = None,
        allow_other_modality: bool = False,
        min_slices: int = 1,
        series_uid: str | None = None,
        series_description: str | None = None,
        max_voxels: int | None = None,
        progress: bool | None = None,
        keep_study_names: bool = False,
    ) -> None:
        if isinstance(min_slices, bool) or int(min_slices) != min_slices or min_slices < 1:
            raise ValueError(f"min_slices must be an integer >= 1, got {min_slices!r}")
        if isinstance(expected_modality, str):
            expected_modality = [expected_modality]
        self.expected_modality = [str(m).upper() for m in expected_modality] if expected_modality else []
        self.allow_other_modality = bool(allow_other_modality)
        self.min_slices = int(min_slices)
        self.series_uid = series_uid or None
        self.series_description = series_description or None
        self.max_voxels = max_voxels
        self.device = torch.device(device)
        self.network = network.to(self.device)
        if ckpt_path is not None:
            self.network.load_state_dict(load_state_dict(ckpt_path, self.device))
        self.network.eval()
        self.class_names = list(class_names)
        self.image_transform = image_transform
        self.volume_transform = volume_transform
        self.batch_size = batch_size
        self.aggregation = aggregation
        self.topk = topk
        self.model_name = model_name
        self.model_version = model_version
        self.progress = progress
        self.keep_study_names = bool(keep_study_names)

    def _name(self, path: str | os.PathLike, kind: str = "study", name: str | None = None) -> str:
        """``path``'s name as written to outputs (a pseudonym unless ``keep_study_names``)."""
        return public_name(path, kind, self.keep_study_names, name)

    # -- forward -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict_tensors(self, images: Sequence[torch.Tensor]) -> np.ndarray:
        """Softmax probabilities ``(N, C)`` for preprocessed slices ``(1, H, W)``."""
        out = []
        with self._bar(total=len(images), desc="slices", unit="slice") as bar:
            for i in range(0, len(images), self.batch_size):
                batch = torch.stack([torch.as_tensor(x).float() for x in images[i : i + self.batch_size]])
                out.append(torch.softmax(self.network(batch.to(self.device)), dim=1).float().cpu())
                bar.update(len(batch))
        return torch.cat(out).numpy() if out else np.zeros((0, len(self.class_names)))

    def _bar(self, iterable=None, **kwargs):
        """A tqdm bar, quiet unless ``progress`` and stderr is a terminal."""
        from pipelines.tracking.progress import progress_bar

        return progress_bar(iterable, progress=self.progress, **kwargs)

    # -- inputs ----------------------------------------------------------------------------------------------
    def load_volume(self, path: Path):
        """A channel-first ``(1, X, Y, Z)`` MetaTensor from a NIfTI file or a DICOM series folder."""
        modality = None
        if path.is_dir():
            from monai.transforms import EnsureChannelFirst

            from pipelines.io.dicom import load_series

            series = load_series(path, series_uid=self.series_uid, series_description=self.series_description,
                                 max_voxels=self.max_voxels)
            modality = series.modality
            # to_metatensor() has no channel dimension (like LoadImage without ensure_channel_first)
            vol = EnsureChannelFirst(channel_dim="no_channel")(series.to_metatensor())
        else:
            from monai.transforms import LoadImage

            from pipelines.io.nifti import check_nifti

            if is_nifti(path):
                check_nifti(path, limit_voxels=self.max_voxels)  # before any allocation
            try:
                vol = LoadImage(image_only=True, ensure_channel_first=True)(str(path))
            except Exception as e:
                root = _root_cause(e)
                raise InputError(f"{path}: cannot read the volume ({type(root).__name__}: {root})") from e
        if vol.ndim != 4 or vol.shape[0] != 1:
            raise InputError(
                f"{path}: expected a single-channel 3D volume, got array shape {tuple(vol.shape)} "
                "(channel first); 2D images go in as PNG/JPG, 4D series must be split first"
            )
        self.check_volume(vol, path, modality)
        if not torch.isfinite(torch.as_tensor(vol)).all():
            raise InputError(f"{path}: volume holds NaN or infinite values")
        return vol

    def check_volume(self, vol, where: object, modality: str | None = None) -> None:
        """Refuse a volume this model was not trained for: another DICOM Modality (see ``expected_modality``,
        ``allow_other_modality``) or fewer than ``min_slices`` voxels along a spatial axis.

        Args:
            vol: channel-first ``(1, X, Y, Z)`` volume.
            where: file or folder, for the message.
            modality: the series' DICOM Modality (None for NIfTI: not checked).

        Raises:
            InputError: one line naming ``where``, what was found and the config id that relaxes the check.
        """
        if modality is not None and self.expected_modality and modality.upper() not in self.expected_modality:
            msg = (f"{where}: DICOM Modality is {modality or 'missing'!r}, this model ({self.model_name}) takes "
                   f"{' or '.join(self.expected_modality)}")
            if not self.allow_other_modality:
                raise InputError(f"{msg}; set config id allow_other_modality=true to classify it anyway")
            warnings.warn(f"{msg}; classified anyway (allow_other_modality=true)", UserWarning, stacklevel=2)
        spatial = tuple(int(n) for n in vol.shape[1:])
        if self.min_slices > 1 and min(spatial) < self.min_slices:
            raise InputError(f"{where}: volume of shape {spatial} has fewer than {self.min_slices} voxels along an "
                             "axis; this model needs a 3D volume (not a single slice or a 2D image); lower config "
                             "id min_slices to accept it")

    def _slices_from_volume(self, path: Path) -> tuple[list[torch.Tensor], list[int]]:
        if self.volume_transform is None:
            raise InputError(f"{path}: this predictor has no volume transform (3D input not supported)")
        vol = self.load_volume(path)
        try:
            items = self.volume_transform({"image": vol})
        except Exception as e:
            # MONAI wraps transform errors; surface the root cause with the file name
            root = _root_cause(e)
            raise InputError(f"{path}: {root}") from e
        if isinstance(items, dict):
            items = [items]
        if not items:
            raise InputError(f"{path}: no usable slices (empty or blank volume)")
        return [it["image"] for it in items], [int(it.get("slice_index", i)) for i, it in enumerate(items)]

    def predict_volume(self, path: str | os.PathLike) -> dict:
        """Per-slice probabilities and the study result for a NIfTI file or a DICOM series folder."""
        path = Path(path)
        images, idx = self._slices_from_volume(path)
        probs = self.predict_tensors(images)
        study = self._name(path)
        rows = [{"source": study, "slice_index": i} for i in idx]
        return self._result(study, rows, probs, kind="volume")

    def predict_images(self, paths: Sequence[str | os.PathLike], study_name: str) -> dict:
        """Per-image probabilities and one aggregated result for a set of 2D images of one study (``study_name``
        is written as given; image names follow ``keep_study_names``)."""
        images = [self.image_transform({"image": str(p)})["image"] for p in paths]
        probs = self.predict_tensors(images)
        rows = [{"source": self._name(p, "image"), "slice_index": -1} for p in paths]
        return self._result(study_name, rows, probs, kind="images")

    def _result(self, study: str, rows: list[dict], probs: np.ndarray, kind: str) -> dict:
        study_probs = aggregate_probs(probs, self.aggregation, k=self.topk)
        k = int(np.argmax(study_probs))
        for row, p in zip(rows, probs):
            row["predicted"] = self.class_names[int(np.argmax(p))]
            row.update({f"prob_{c}": float(v) for c, v in zip(self.class_names, p)})
        return {
            "study": study,
            "input_kind": kind,
            "n_slices": len(rows),
            "aggregation": self.aggregation,
            "predicted_class": self.class_names[k],
            "predicted_index": k,
            "probability": float(study_probs[k]),
            "probabilities": {c: float(v) for c, v in zip(self.class_names, study_probs)},
            "slices": rows,
        }

    def predict_path(self, input_path: str | os.PathLike) -> list[dict]:
        """Dispatch on the input: NIfTI file, DICOM folder, single image, or a folder of images / volumes.

        A folder of 2D images is grouped into studies by the ``sub-XXX`` id in the file names when present,
        otherwise the whole folder is one study.
        """
        path = Path(input_path)
        if not path.exists():
            raise InputError(f"input not found: {path}")
        if is_nifti(path):
            return [self.predict_volume(path)]
        if path.is_file():
            if is_image(path):
                return [self.predict_images([path], self._name(path, name=path.stem))]
            if _looks_like_dicom(path):
                return [self.predict_volume(path.parent)]
            raise InputError(f"{path}: unsupported file type (expected NIfTI, PNG/JPG/BMP/TIFF or DICOM)")
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        volumes = [p for p in files if is_nifti(p)]
        images = [p for p in files if is_image(p)]
        if volumes:
            return [self.predict_volume(v) for v in self._bar(volumes, desc="studies", unit="study")]
        if images:
            groups: "OrderedDict[str, list[Path]]" = OrderedDict()
            for p in images:
                m = _SUBJECT_RE.search(p.name)
                groups.setdefault(m.group(1) if m else self._name(path), []).append(p)
            return [self.predict_images(g, name)
                    for name, g in self._bar(list(groups.items()), desc="studies", unit="study")]
        if any(_looks_like_dicom(p) for p in files[:50]):
            return [self.predict_volume(path)]
        raise InputError(f"{path}: folder holds no images, NIfTI volumes or DICOM files")

    def run(self, input_path: str | os.PathLike, output_dir: str | os.PathLike) -> dict:
        """Predict and write ``predictions.csv`` (one row per slice) and ``predictions.json`` to ``output_dir``.

        Files are written atomically. A failed run moves earlier outputs aside (``predictions.previous.json``)
        and writes ``failed.json`` with the error, so an old result is never read as this input's
        (:func:`no_stale_outputs`).
        """
        out = Path(output_dir)
        with no_stale_outputs(out, input_path=input_path, keep_names=self.keep_study_names):
            return self._run(input_path, out)

    def _run(self, input_path: str | os.PathLike, out: Path) -> dict:
        results = self.predict_path(input_path)
        rows = []
        for r in results:
            for s in r["slices"]:
                rows.append({"study": r["study"], **s})
        summary = {
            "model": {"name": self.model_name, "version": self.model_version},
            "class_names": self.class_names,
            "input": self._name(input_path, "input"),
            "studies": [{k: v for k, v in r.items()} for r in results],
        }
        atomic_write(out / "predictions.csv", lambda p: pd.DataFrame(rows).to_csv(p, index=False))
        atomic_write(out / "predictions.json", lambda p: p.write_text(json.dumps(summary, indent=2)))
        for r in results:
            logger.info(
                "%s: %s (p=%.3f, %d slice(s), %s of slice probabilities)",
                r["study"], r["predicted_class"], r["probability"], r["n_slices"], r["aggregation"],
            )
        logger.info("predictions written to %s", out)
        return summary
