"""Head-CT haemorrhage prediction for a DICOM series (a study), a single DICOM file, or a single picture.

A series is loaded with :func:`pipelines.io.dicom.load_series` (geometric sort, per-instance rescale to HU); every
slice goes through the bundle's slice preprocessing (the same transforms as validation in ``train.json``) and the
network; the study is scored by the highest slice probability of the finding (``max``) and by the mean of the
``topk`` highest (``topk_mean``), both from :func:`pipelines.inference.aggregate.aggregate_probs`. Outputs:
``predictions.json`` (one entry a study), ``predictions.csv`` (one row a slice), both written atomically, and a
3-panel Grad-CAM PNG (:func:`pipelines.evaluation.explain.save_overlay`) for each positive study or image.

Nothing identifying is written or logged: no DICOM header values other than geometry and InstanceNumber, no file
or folder names (folder names are often patient ids). Studies are named ``study-1``, ``study-2`` ...; ``ref`` is
a short SHA-256 of the SeriesInstanceUID (series) or of the absolute path (single file) to match results to
inputs. Error messages do name the offending file, which the caller supplied.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pipelines.inference.aggregate import aggregate_probs
from pipelines.inference.predict import ClassificationPredictor, InputError, no_stale_outputs
from pipelines.io.atomic import atomic_write
from pipelines.io.ct import hu_to_8bit, window_channels
from pipelines.io.dicom import is_dicom_file
from pipelines.manifests.builders import IMAGE_EXTENSIONS

logger = logging.getLogger(__name__)

__all__ = ["CTStudyPredictor", "InputError", "STUDY_AGGREGATIONS", "series_slices", "study_scores"]

#: Study scores computed for every series; ``aggregation`` picks the one that decides the class.
STUDY_AGGREGATIONS = ("max", "topk_mean")


def _ref(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _root_cause(err: BaseException) -> BaseException:
    """The error under MONAI's ``RuntimeError("applying transform ...")`` wrappers (kept: our own clear errors)."""
    while type(err) is RuntimeError and err.__cause__ is not None:
        err = err.__cause__
    return err


def study_scores(probs: np.ndarray, positive_index: int, topk: int = 3) -> dict[str, float]:
    """Study-level scores of the positive class from per-slice class probabilities ``(N, C)``.

    Returns:
        ``{"max": highest slice probability, "topk_mean": mean of the min(topk, N) highest}``; neither is
        renormalised across classes, so a study with one clearly positive slice scores that slice's probability.

    Raises:
        ValueError: empty ``probs``, ``positive_index`` out of range, ``topk`` < 1.
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or not 0 <= positive_index < p.shape[1]:
        raise ValueError(f"positive_index {positive_index} out of range for probabilities of shape {p.shape}")
    return {
        method: float(aggregate_probs(p, method, k=topk, renormalize=False)[positive_index])
        for method in STUDY_AGGREGATIONS
    }


def series_slices(volume: Any, prewindowed: bool = False, dicom_window: str | Sequence[float] = "brain"):
    """The slices of a :class:`pipelines.io.dicom.DicomVolume` as ``(1, X, Y)`` float32 tensors, in sorted order.

    The layout equals :class:`pipelines.io.ct.LoadCTImage` on the slice's own file: HU, or for a
    pre-windowed model the 8-bit rendering with ``dicom_window``.
    """
    out = []
    for z in range(volume.array.shape[0]):
        arr = np.ascontiguousarray(volume.array[z].T)
        if prewindowed:
            arr = hu_to_8bit(arr, dicom_window)
        out.append(torch.from_numpy(arr)[None])
    return out


class CTStudyPredictor(ClassificationPredictor):
    """Predict haemorrhage for head-CT studies and single slices with a trained 2D slice classifier.

    Args:
        network: the classifier (``(N, 3, H, W)`` -> ``(N, C)`` logits); weights from ``ckpt_path``.
        class_names: class names in output order, e.g. ``["normal", "hemorrhage"]``.
        image_transform: dict transform ``{"image": path} -> {"image": (3, H, W)}`` for single files (the bundle's
            ``preprocessing``: ``LoadCTImaged`` + ``slice_preprocessing``).
        slice_transform: dict transform ``{"image": (1, X, Y) HU or 8-bit} -> {"image": (3, H, W)}`` for the
            slices of a series (the bundle's ``slice_preprocessing``).
        window_preset: ``"multi"`` (HU input) or ``"prewindowed"``; must match the training config.
        dicom_window: CT window that renders DICOM input for a pre-windowed model.
        ckpt_path: weights to load (None: the network as it is).
        device: inference device.
        batch_size: slices per forward pass.
        aggregation: study score that decides the class: ``"max"`` or ``"topk_mean"``.
        topk: k of ``topk_mean``, >= 1.
        threshold: a study (or image) is positive when its score >= threshold, in (0, 1).
        positive_class: the finding's class name.
        gradcam: write Grad-CAM overlays for positive predictions.
        gradcam_layer: Grad-CAM layer name (None: the last convolution).
        gradcam_slices: overlays per positive study (its highest-scoring slices that reach the threshold).
        model_name, model_version: recorded in the JSON output.
        progress: progress bars over series and slices; see
            :class:`~pipelines.inference.predict.ClassificationPredictor`.
        keep_study_names: keep file and folder names in the error stored in ``failed.json``; default False
            replaces them by pseudonyms (outputs name studies ``study-<n>`` either way).

    Raises:
        ValueError: unknown aggregation/window preset/positive class, bad ``topk``, ``threshold`` or
            ``gradcam_slices``.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        class_names: Sequence[str],
        image_transform: Callable,
        slice_transform: Callable,
        window_preset: str = "multi",
        dicom_window: str | Sequence[float] = "brain",
        ckpt_path: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        aggregation: str = "max",
        topk: int = 3,
        threshold: float = 0.5,
        positive_class: str = "hemorrhage",
        gradcam: bool = True,
        gradcam_layer: str | None = None,
        gradcam_slices: int = 1,
        model_name: str = "ct_hemorrhage",
        model_version: str = "",
        progress: bool | None = None,
        keep_study_names: bool = False,
    ) -> None:
        if aggregation not in STUDY_AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {STUDY_AGGREGATIONS}, got {aggregation!r}")
        if isinstance(topk, bool) or int(topk) != topk or topk < 1:
            raise ValueError(f"topk must be an integer >= 1, got {topk!r}")
        if not 0.0 < float(threshold) < 1.0:
            raise ValueError(f"threshold must lie in (0, 1), got {threshold!r}")
        if positive_class not in list(class_names):
            raise ValueError(f"positive_class {positive_class!r} is not one of class_names {list(class_names)}")
        if len(class_names) != 2:
            raise ValueError(f"a haemorrhage detector has two classes, got {list(class_names)}")
        if int(gradcam_slices) < 1:
            raise ValueError(f"gradcam_slices must be >= 1, got {gradcam_slices!r}")
        window_channels(window_preset)
        super().__init__(network, class_names, image_transform, volume_transform=None, ckpt_path=ckpt_path,
                         device=device, batch_size=batch_size, aggregation=aggregation, topk=int(topk),
                         model_name=model_name, model_version=model_version, progress=progress,
                         keep_study_names=keep_study_names)
        self.slice_transform = slice_transform
        self.window_preset = window_preset
        self.prewindowed = window_preset == "prewindowed"
        self.dicom_window = dicom_window
        self.threshold = float(threshold)
        self.positive_class = positive_class
        self.positive_index = list(class_names).index(positive_class)
        self.negative_class = [c for c in class_names if c != positive_class][0]
        self.gradcam = bool(gradcam)
        self.gradcam_layer = gradcam_layer
        self.gradcam_slices = int(gradcam_slices)

    # -- inputs ----------------------------------------------------------------------------------------------
    def ct_series(self, folder: str | os.PathLike) -> list[tuple[str, list[Path]]]:
        """``[(SeriesInstanceUID, files)]`` of the CT series under ``folder`` (headers only).

        Raises:
            InputError: no DICOM files, or DICOM files but no series with Modality CT (the message lists what
                was found by modality and file count).
        """
        import pydicom

        from pipelines.io.dicom import DicomSeriesError, find_series

        folder = Path(folder)
        try:
            groups = find_series(folder)
        except DicomSeriesError as err:
            raise InputError(f"{folder}: no CT series found ({err})") from err
        found, others = [], []
        for uid, files in groups.items():
            modality = str(pydicom.dcmread(files[0], stop_before_pixels=True, force=True).get("Modality", "") or "")
            (found if modality == "CT" else others).append((uid, files, modality))
        if not found:
            what = ", ".join(f"{m or 'no Modality'} series of {len(f)} file(s)" for _, f, m in others)
            raise InputError(f"{folder}: no CT series found (holds {what})")
        return [(uid, files) for uid, files, _ in found]

    def _forward(self, images: list[torch.Tensor]) -> np.ndarray:
        return self.predict_tensors(images)

    def _transform_slices(self, raw: list[torch.Tensor], where: Path) -> list[torch.Tensor]:
        out = []
        for img in raw:
            try:
                out.append(self.slice_transform({"image": img})["image"])
            except Exception as err:
                root = _root_cause(err)
                raise InputError(f"{where}: slice preprocessing failed ({type(root).__name__}: {root})") from err
        return out

    def _study(self, name: str, kind: str, ref: str, probs: np.ndarray, slice_rows: list[dict]) -> dict:
        scores = study_scores(probs, self.positive_index, self.topk)
        score = scores[self.aggregation]
        positive = score >= self.threshold
        predicted = self.positive_class if positive else self.negative_class
        study_probs = {self.negative_class: 1.0 - score, self.positive_class: score}
        study_probs = {c: float(study_probs[c]) for c in self.class_names}
        top = int(np.argmax(probs[:, self.positive_index]))
        for row, p in zip(slice_rows, probs):
            row["predicted"] = self.class_names[int(np.argmax(p))]
            row.update({f"prob_{c}": float(v) for c, v in zip(self.class_names, p)})
        return {
            "study": name,
            "input_kind": kind,
            "ref": ref,
            "n_slices": len(slice_rows),
            "scores": scores,
            "aggregation": self.aggregation,
            "topk": self.topk,
            "threshold": self.threshold,
            "score": float(score),
            "predicted_class": predicted,
            "predicted_index": self.class_names.index(predicted),
            "probability": study_probs[predicted],
            "probabilities": study_probs,
            "most_suspicious_slice": int(slice_rows[top]["slice_index"]),
            "most_suspicious_probability": float(probs[top, self.positive_index]),
            "gradcam": [],
            "slices": slice_rows,
        }

    def predict_series(self, folder: str | os.PathLike) -> list[dict]:
        """One result per CT series under ``folder``; see :meth:`run` for the fields."""
        return [r for r, _ in self._predict_series(Path(folder), start=1)]

    def _predict_series(self, folder: Path, start: int) -> list[tuple[dict, list[torch.Tensor]]]:
        from pipelines.io.dicom import DicomSeriesError, load_series

        out = []
        series = self.ct_series(folder)
        for n, (uid, files) in enumerate(self._bar(series, desc="series", unit="series"), start=start):
            try:
                vol = load_series(files, series_uid=uid)
            except DicomSeriesError as err:
                raise InputError(str(err)) from err
            images = self._transform_slices(series_slices(vol, self.prewindowed, self.dicom_window), folder)
            probs = self._forward(images)
            normal = vol.direction[:, 2]
            rows = []
            for z, ds in enumerate(vol.datasets):
                ipp = np.asarray([float(v) for v in ds.ImagePositionPatient])
                number = ds.get("InstanceNumber")
                rows.append({"slice_index": z, "instance_number": None if number in (None, "") else int(number),
                             "position_mm": round(float(ipp @ normal), 4)})
            out.append((self._study(f"study-{n}", "dicom_series", _ref(uid), probs, rows), images))
        return out

    def predict_file(self, path: str | os.PathLike) -> dict:
        """Result for one DICOM file or one picture (a one-slice study); see :meth:`run` for the fields."""
        return self._predict_file(Path(path), 1)[0]

    def _predict_file(self, path: Path, n: int) -> tuple[dict, list[torch.Tensor]]:
        if not (is_dicom_file(path) or path.suffix.lower() in IMAGE_EXTENSIONS):
            raise InputError(f"{path}: unsupported file type (expected a DICOM file or a PNG/JPG/BMP/TIFF picture)")
        try:
            image = self.image_transform({"image": str(path)})["image"]
        except Exception as err:
            root = _root_cause(err)
            if isinstance(root, (ValueError, OSError)):
                raise InputError(str(root) if str(path) in str(root) else f"{path}: {root}") from err
            raise
        kind = "dicom_file" if is_dicom_file(path) else "image"
        probs = self._forward([image])
        rows = [{"slice_index": 0, "instance_number": None, "position_mm": None}]
        return self._study(f"study-{n}", kind, _ref(str(path.resolve())), probs, rows), [image]

    def predict_path(self, input_path: str | os.PathLike) -> list[dict]:
        """Results for a DICOM folder (each CT series in it), a DICOM file or a picture."""
        return [r for r, _ in self._predict_any(Path(input_path))]

    def _predict_any(self, path: Path) -> list[tuple[dict, list[torch.Tensor]]]:
        if not path.exists():
            raise InputError(f"input not found: {path}")
        if path.is_dir():
            return self._predict_series(path, start=1)
        return [self._predict_file(path, 1)]

    # -- explanations ----------------------------------------------------------------------------------------
    def _overlays(self, result: dict, images: list[torch.Tensor], out_dir: Path) -> list[str]:
        from pipelines.evaluation.explain import grad_cam, last_conv_layer, save_overlay

        if result["predicted_class"] != self.positive_class:
            return []
        p = np.array([s[f"prob_{self.positive_class}"] for s in result["slices"]])
        order = [int(i) for i in np.argsort(-p, kind="stable")[: self.gradcam_slices]]
        order = [i for i in order if p[i] >= self.threshold] or order[:1]
        layer = self.gradcam_layer or last_conv_layer(self.network)
        batch = torch.stack([torch.as_tensor(images[i]).float() for i in order]).to(self.device)
        maps = grad_cam(self.network, batch, layer, class_idx=self.positive_index).cpu()
        names = []
        for i, img, heat in zip(order, batch.cpu(), maps):
            idx = result["slices"][i]["slice_index"]
            name = f"gradcam_{result['study']}" + (f"_slice{idx:03d}" if result["n_slices"] > 1 else "") + ".png"
            # tensors are (x, y); the figure shows rows = y, like a radiological image
            title = f"{self.positive_class} p={p[i]:.2f}" + (f", slice {idx}" if result["n_slices"] > 1 else "")
            save_overlay(img[0].T, heat[0].T, out_dir / name, title=title)
            names.append(name)
        return names

    # -- outputs ---------------------------------------------------------------------------------------------
    def run(self, input_path: str | os.PathLike, output_dir: str | os.PathLike) -> dict:
        """Predict and write ``predictions.json``, ``predictions.csv`` and Grad-CAM PNGs to ``output_dir``.

        JSON: ``model`` (name, version), ``class_names``, ``positive_class``, ``window_preset``, ``aggregation``,
        ``topk``, ``threshold``, and ``studies``; each study has ``study``, ``input_kind`` (``dicom_series``,
        ``dicom_file`` or ``image``), ``ref``, ``n_slices``, ``scores`` (``max``, ``topk_mean``), ``score`` (the
        one named by ``aggregation``), ``predicted_class`` (positive when score >= threshold),
        ``predicted_index``, ``probability``, ``probabilities``, ``most_suspicious_slice`` (sorted slice index,
        0 = first along the slice normal, i.e. most inferior for axial head CT), ``most_suspicious_probability``,
        ``gradcam`` (PNG names) and ``slices`` (``slice_index``, ``instance_number``, ``position_mm`` along the
        slice normal, ``predicted``, ``prob_<class>``). CSV: one row per slice with the study name.

        The JSON and CSV are written atomically, the JSON last; a failed run moves earlier ones aside and writes
        ``failed.json`` (:func:`pipelines.inference.predict.no_stale_outputs`).

        Raises:
            InputError: the input cannot be used (the message names the file or folder and the problem).
        """
        out = Path(output_dir)
        with no_stale_outputs(out, input_path=input_path, keep_names=self.keep_study_names):
            return self._run_ct(Path(input_path), out)

    def _run_ct(self, input_path: Path, out: Path) -> dict:
        pairs = self._predict_any(input_path)
        for result, images in pairs:
            if self.gradcam:
                result["gradcam"] = self._overlays(result, images, out)
        results = [r for r, _ in pairs]
        rows = [{"study": r["study"], **s} for r in results for s in r["slices"]]
        summary = {
            "model": {"name": self.model_name, "version": self.model_version},
            "class_names": self.class_names,
            "positive_class": self.positive_class,
            "window_preset": self.window_preset,
            "aggregation": self.aggregation,
            "topk": self.topk,
            "threshold": self.threshold,
            "studies": results,
        }
        atomic_write(out / "predictions.csv", lambda p: pd.DataFrame(rows).to_csv(p, index=False))
        atomic_write(out / "predictions.json", lambda p: p.write_text(json.dumps(summary, indent=2)))
        for r in results:
            logger.info("%s: %s (%s score %.3f; most suspicious slice %d of %d, p=%.3f)", r["study"],
                        r["predicted_class"], r["aggregation"], r["score"], r["most_suspicious_slice"],
                        r["n_slices"], r["most_suspicious_probability"])
        logger.info("predictions written to %s", out)
        return summary
