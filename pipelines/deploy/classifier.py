"""Study classification with an exported TorchScript model and the bundle's own preprocessing.

:class:`StudyClassifier` is the logic of the deploy apps' classifier operator, without the MONAI Deploy SDK: it
loads ``model.ts`` (made by ``python -m monai.bundle ckpt_export``), reads the bundle's inference config with
``monai.bundle.ConfigParser`` and builds the bundle's own ``predictor`` from it, with the TorchScript module as
its ``network`` and no checkpoint (a :class:`pipelines.inference.predict.ClassificationPredictor` or subclass:
its ``volume_transform`` / ``slice_transform`` / ``image_transform``, class names, aggregation, threshold). So
slices are made and normalised exactly as the bundle's ``inference.json`` run makes them; nothing of the
preprocessing is repeated here.

Where the config comes from, in this order: an explicit ``config_file``; ``bundles/<bundle>/configs/<file>`` of
this repository (also present in a staged MAP, see :mod:`pipelines.deploy.package`); the copy of the config that
``ckpt_export --config_file`` stores inside ``model.ts``. Config ids can be overridden (a dict, or JSON in the
environment variable ``NEURO_DEPLOY_OVERRIDES``), e.g. ``{"image_size": 224}`` when the model was trained with
an override. The model name and version come from the ``metadata.json`` stored in ``model.ts`` (ckpt_export
copies the bundle's), else from ``bundles/<bundle>/configs/metadata.json``.

Outputs carry no patient data: the JSON holds the Study/Series Instance UIDs and the modality of the input series,
never names, ids, dates or file names.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydicom.dataset import Dataset

from pipelines.deploy.specs import BundleAppSpec, get_spec
from pipelines.inference.aggregate import aggregate_probs
from pipelines.io.dicom import DicomSeriesError, DicomVolume

logger = logging.getLogger(__name__)

__all__ = [
    "DISCLAIMER",
    "OVERRIDES_ENV",
    "DeployError",
    "StudyClassifier",
    "find_model_file",
    "header_copy",
    "volume_from_sorted_slices",
    "write_output_json",
]

DISCLAIMER = "Research use only. Not a medical device; not for clinical diagnosis or treatment decisions."
OVERRIDES_ENV = "NEURO_DEPLOY_OVERRIDES"
OUTPUT_JSON = "output.json"
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


class DeployError(ValueError):
    """A model, config or input the deploy apps cannot use; the message names the file and the problem."""


# --------------------------------------------------------------------------------------------------- model


def find_model_file(path: str | os.PathLike) -> Path:
    """The TorchScript file at ``path``: the file itself, or the single ``*.ts`` / ``*.pt`` under a folder.

    MONAI Deploy passes ``-m`` as given on the command line, and inside a MAP as the models folder
    (``/opt/holoscan/models``), which holds the model in a sub-folder.
    """
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_dir():
        raise DeployError(f"model not found: {p}")
    found = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix in (".ts", ".pt"))
    ts = [q for q in found if q.suffix == ".ts"] or found
    if len(ts) != 1:
        raise DeployError(f"{p}: expected exactly one TorchScript model (*.ts) in the folder, "
                          f"found {[str(q) for q in ts]}")
    return ts[0]


def _load_torchscript(
    path: Path, device: torch.device, config_name: str
) -> tuple[torch.jit.ScriptModule, dict, dict | None]:
    """TorchScript module, its embedded metadata (``{}`` if none) and embedded config (None if none)."""
    extra = {"metadata.json": "", config_name: ""}
    try:
        net = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError/ValueError/zip errors for non-TorchScript files
        raise DeployError(f"{path}: not a TorchScript model ({type(e).__name__}: {str(e).splitlines()[0]})") from e
    parsed = []
    for name in ("metadata.json", config_name):
        text = extra.get(name) or ""
        if isinstance(text, bytes):
            text = text.decode()
        try:
            parsed.append(json.loads(text) if text.strip() else None)
        except ValueError as e:
            raise DeployError(f"{path}: embedded {name} is not valid JSON ({e})") from e
    return net, parsed[0] or {}, parsed[1]


def _env_overrides() -> dict[str, Any]:
    text = os.environ.get(OVERRIDES_ENV, "").strip()
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as e:
        raise DeployError(f"${OVERRIDES_ENV} must be a JSON object of config ids, got {text!r} ({e})") from e
    if not isinstance(value, dict):
        raise DeployError(f"${OVERRIDES_ENV} must be a JSON object of config ids, got {text!r}")
    for key, item in value.items():
        _check_plain_override(str(key), item)
    return value


# MONAI ConfigParser evaluates "$..." strings, follows "@..." references, imports "%..." macros and instantiates
# "_target_" dicts; values from the environment must stay data.
_CONFIG_PREFIXES = ("$", "@", "%")


def _check_plain_override(key: str, value: Any, where: str = "") -> None:
    """Refuse an environment override that MONAI's ConfigParser would execute or resolve instead of using as a
    value: ``$``/``@``/``%`` strings, ``_target_``-style keys (``_name_``), anywhere in the value."""
    where = where or key
    if key.startswith(_CONFIG_PREFIXES) or any(
            part.startswith("_") and part.endswith("_") and len(part) > 1 for part in key.split("#")):
        raise DeployError(f"${OVERRIDES_ENV}: {where!r} sets {key!r}, a config directive; only plain values "
                          "(numbers, strings, booleans, null, lists) may come from the environment")
    if isinstance(value, str) and value.startswith(_CONFIG_PREFIXES):
        raise DeployError(f"${OVERRIDES_ENV}: {where!r} = {value!r} starts with {value[0]!r}, which the config "
                          "parser would evaluate or resolve; only plain values may come from the environment")
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_plain_override(key, item, f"{where}[{i}]")
    elif isinstance(value, dict):
        for k, item in value.items():
            _check_plain_override(str(k), item, f"{where}#{k}")


# --------------------------------------------------------------------------------------------------- DICOM


def header_copy(ds: Dataset) -> Dataset:
    """A copy of a DICOM dataset without pixel data (the elements are shared, not decoded)."""
    out = Dataset({tag: ds.get_item(tag) for tag in ds.keys() if ds[tag].keyword not in _PIXEL_KEYWORDS})
    if getattr(ds, "file_meta", None) is not None:
        out.file_meta = ds.file_meta
    return out


def volume_from_sorted_slices(array: np.ndarray, datasets: Sequence[Dataset], where: str = "series") -> DicomVolume:
    """A :class:`pipelines.io.dicom.DicomVolume` from a stacked series and its headers (e.g. MONAI Deploy's output).

    The geometry (slice order along the normal, spacing, origin, direction) is computed and validated by the same
    code as :func:`pipelines.io.dicom.load_series` (missing or duplicate slices, mixed orientation are errors), so
    a series converted by ``DICOMSeriesToVolumeOperator`` gives the same volume and the same predictions as the
    bundle's own ``load_series``.

    Args:
        array: ``(slices, rows, columns)`` rescaled voxels, slice ``k`` from ``datasets[k]``.
        datasets: the headers of the instances, in the order of ``array``.
        where: name for error messages.

    Raises:
        DeployError: shapes disagree, or the headers do not describe one regular volume.
    """
    from pipelines.io.dicom import series_geometry

    arr = np.asarray(array)
    if arr.ndim != 3 or arr.shape[0] != len(datasets):
        raise DeployError(f"{where}: expected a (slices, rows, columns) array for {len(datasets)} instances, "
                          f"got shape {arr.shape}")
    items = [(Path(f"{where} instance {ds.get('SOPInstanceUID', k)}"), ds) for k, ds in enumerate(datasets)]
    try:
        geom = series_geometry(items, where)
    except DicomSeriesError as e:
        raise DeployError(str(e)) from e
    if (geom.rows, geom.columns) != arr.shape[1:]:
        raise DeployError(f"{where}: pixel array {arr.shape[1:]} does not match Rows x Columns "
                          f"{geom.rows}x{geom.columns}")
    order = np.asarray(geom.order)
    first = datasets[int(order[0])]
    return DicomVolume(
        array=np.ascontiguousarray(arr[order], dtype=np.float32),
        spacing=geom.spacing,
        origin=geom.origin,
        direction=geom.direction,
        datasets=[datasets[int(i)] for i in order],
        series_uid=str(first.get("SeriesInstanceUID", "")),
        modality=str(first.get("Modality", "")),
    )


# --------------------------------------------------------------------------------------------------- classifier


class StudyClassifier:
    """Classify a DICOM series (or, for the HTTP service, a NIfTI volume or a 2D picture) with a bundle's model.

    Args:
        spec: the app (:class:`pipelines.deploy.specs.BundleAppSpec`) or its bundle name.
        model_path: ``model.ts`` from ``python -m monai.bundle ckpt_export``, or a folder holding one.
        config_file: inference config to read instead of the bundle's (see the module docstring).
        overrides: config ids to override, applied after ``$NEURO_DEPLOY_OVERRIDES``.
        device: torch device; default CUDA when available, else CPU.
        batch_size: slices per forward pass; default the config's.

    Raises:
        DeployError: unreadable model, no config found, or a predictor that cannot be built.
    """

    def __init__(
        self,
        spec: BundleAppSpec | str,
        model_path: str | os.PathLike,
        config_file: str | os.PathLike | None = None,
        overrides: Mapping[str, Any] | None = None,
        device: str | torch.device | None = None,
        batch_size: int | None = None,
    ) -> None:
        from pipelines.bundles import bundle_dir, read_config

        self.spec = get_spec(spec) if isinstance(spec, str) else spec
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model_path = find_model_file(model_path)
        config_name = Path(self.spec.config_file).name
        self.network, embedded_meta, embedded_config = _load_torchscript(self.model_path, self.device, config_name)
        self.network.eval()

        configs = Path(bundle_dir(self.spec.bundle_name)) / "configs"
        if config_file is not None:
            if not Path(config_file).is_file():
                raise DeployError(f"config file not found: {config_file}")
            source: Any = config_file
            self.config_source = str(config_file)
        elif (configs / self.spec.config_file).is_file():
            source = configs / self.spec.config_file
            self.config_source = str(configs / self.spec.config_file)
        elif embedded_config is not None:
            source = embedded_config
            self.config_source = f"{self.model_path}:{config_name}"
        else:
            raise DeployError(
                f"no inference config for bundle {self.spec.bundle_name}: not given, not at "
                f"{configs / self.spec.config_file}, and {self.model_path} has no embedded {config_name} "
                "(export with `ckpt_export --config_file configs/inference.json`)"
            )
        self.overrides = {**_env_overrides(), **dict(overrides or {})}
        self.parser = parser = read_config(source, self.overrides)

        meta = embedded_meta
        if not meta.get("version") and (configs / "metadata.json").is_file():
            meta = json.loads((configs / "metadata.json").read_text())
        self.metadata = meta
        self.model_info = {
            "bundle": self.spec.bundle_name,
            "name": str(meta.get("name", self.spec.bundle_name)),
            "version": str(meta.get("version", "")),
            "file": self.model_path.name,
        }

        # The bundle's own predictor, running the exported module: same transforms, classes and study rule.
        parser["network"] = self.network
        parser["ckpt_path"] = None
        parser["device"] = self.device
        if batch_size is not None:
            parser["batch_size"] = int(batch_size)
        self.predictor = self._get(self.spec.predictor_id)
        self.class_names = [str(c) for c in self.predictor.class_names]
        self.aggregation = str(self.predictor.aggregation)
        if self.spec.series_mode == "volume" and self.predictor.volume_transform is None:
            raise DeployError(f"{self.config_source}: predictor has no volume_transform for series_mode 'volume'")
        if self.spec.series_mode == "ct_slices" and getattr(self.predictor, "slice_transform", None) is None:
            raise DeployError(f"{self.config_source}: predictor has no slice_transform for series_mode 'ct_slices'")
        if self.spec.decision == "threshold":
            for attr in ("threshold", "positive_class", "topk"):
                if not hasattr(self.predictor, attr):
                    raise DeployError(f"{self.config_source}: predictor has no {attr!r} for decision 'threshold'")
        self._eager: torch.nn.Module | None = None
        self._lock = threading.Lock()

    def _get(self, config_id: str) -> Any:
        if config_id not in self.parser:
            raise DeployError(f"{self.config_source}: config id {config_id!r} not found")
        try:
            return self.parser.get_parsed_content(config_id)
        except Exception as e:  # noqa: BLE001 - ConfigParser raises many types for bad expressions
            raise DeployError(f"{self.config_source}: cannot build config id {config_id!r} ({_root_cause(e)})") from e

    # -- inputs ----------------------------------------------------------------------------------------------
    def classify_series(self, volume: DicomVolume, return_slices: bool = False):
        """Classify one DICOM series (a :class:`DicomVolume`, e.g. from ``load_series`` or
        :func:`volume_from_sorted_slices`); with ``return_slices`` also the preprocessed model inputs."""
        where = f"series {volume.series_uid}"
        first = volume.datasets[0] if volume.datasets else Dataset()
        info = {
            "kind": "dicom",
            "study_instance_uid": str(first.get("StudyInstanceUID", "")),
            "series_instance_uid": volume.series_uid,
            "modality": volume.modality,
            "n_instances": int(volume.array.shape[0]),
        }
        if self.spec.series_mode == "ct_slices":
            from pipelines.inference.ct import series_slices

            raw = series_slices(volume, self.predictor.prewindowed, self.predictor.dicom_window)
            images = [self._apply(self.predictor.slice_transform, {"image": img}, where)["image"] for img in raw]
            return self._finish(images, list(range(len(images))), info, return_slices)
        from monai.transforms import EnsureChannelFirst

        mt = EnsureChannelFirst(channel_dim="no_channel")(volume.to_metatensor())
        check = getattr(self.predictor, "check_volume", None)
        if check is not None:  # the bundle's modality / minimum-slices rules, as in its own inference
            try:
                check(mt, where, volume.modality)
            except ValueError as e:
                raise DeployError(str(e)) from e
        return self._classify_volume(mt, info, where, return_slices)

    def classify_nifti(self, path: str | os.PathLike, return_slices: bool = False):
        """Classify a 3D NIfTI volume (loaded as the bundle's inference does: MONAI ``LoadImage``)."""
        path = Path(path)
        if self.spec.series_mode != "volume":
            raise DeployError(f"{path.name}: bundle {self.spec.bundle_name} takes DICOM series or 2D images, not NIfTI")
        try:
            mt = self.predictor.load_volume(path)
        except ValueError as e:
            raise DeployError(str(e)) from e
        return self._classify_volume(mt, {"kind": "nifti", "n_instances": 1}, path.name, return_slices)

    def classify_image(self, path: str | os.PathLike, return_slices: bool = False):
        """Classify a single 2D picture (PNG/JPEG/BMP/TIFF) with the bundle's 2D ``image_transform``."""
        path = Path(path)
        image = self._apply(self.predictor.image_transform, {"image": str(path)}, path.name)["image"]
        return self._finish([image], [-1], {"kind": "image", "n_instances": 1}, return_slices)

    @staticmethod
    def _apply(transform, data: dict, where: str) -> dict:
        if transform is None:
            raise DeployError(f"{where}: this bundle has no preprocessing for this kind of input")
        try:
            return transform(data)
        except Exception as e:  # noqa: BLE001 - MONAI wraps transform errors; report the root cause
            raise DeployError(f"{where}: {_root_cause(e)}") from e

    def _classify_volume(self, mt, info: dict, where: str, return_slices: bool):
        if not torch.isfinite(torch.as_tensor(mt)).all():
            raise DeployError(f"{where}: volume holds NaN or infinite values")
        items = self._apply(self.predictor.volume_transform, {"image": mt}, where)
        if isinstance(items, dict):
            items = [items]
        if not items:
            raise DeployError(f"{where}: no usable slices (empty or blank volume)")
        images = [it["image"] for it in items]
        idx = [int(it.get("slice_index", i)) for i, it in enumerate(items)]
        return self._finish(images, idx, info, return_slices)

    def _finish(self, images: Sequence[Any], slice_index: Sequence[int], info: dict, return_slices: bool):
        images = [torch.as_tensor(x) for x in images]
        with self._lock:
            probs = self.predictor.predict_tensors(images)
        result = self._result(probs, slice_index, info)
        return (result, images) if return_slices else result

    # -- outputs ---------------------------------------------------------------------------------------------
    def _study(self, probs: np.ndarray) -> dict:
        """The study result by the bundle's rule (see :class:`pipelines.deploy.specs.BundleAppSpec`)."""
        if self.spec.decision == "threshold":
            from pipelines.inference.ct import study_scores

            pos = self.class_names.index(self.predictor.positive_class)
            scores = study_scores(probs, pos, int(self.predictor.topk))
            score = scores[self.aggregation]
            k = pos if score >= float(self.predictor.threshold) else 1 - pos
            study = np.empty(2)
            study[pos], study[1 - pos] = score, 1.0 - score
            extra = {"score": float(score), "scores": scores, "threshold": float(self.predictor.threshold)}
        else:
            study = aggregate_probs(probs, self.aggregation, k=int(getattr(self.predictor, "topk", 3)))
            k = int(np.argmax(study))
            extra = {}
        return {
            "predicted_class": self.class_names[k],
            "predicted_index": k,
            "probability": float(study[k]),
            "probabilities": {c: float(v) for c, v in zip(self.class_names, study)},
            **extra,
        }

    def _result(self, probs: np.ndarray, slice_index: Sequence[int], info: dict) -> dict:
        slices = [
            {
                "slice_index": int(i),
                "predicted_class": self.class_names[int(np.argmax(p))],
                "probabilities": {c: float(v) for c, v in zip(self.class_names, p)},
            }
            for i, p in zip(slice_index, probs)
        ]
        return {
            "disclaimer": DISCLAIMER,
            "model": dict(self.model_info),
            "class_names": list(self.class_names),
            "input": info,
            "aggregation": self.aggregation,
            "study": self._study(probs),
            "n_slices": len(slices),
            "slices": slices,
        }

    # -- explanation -----------------------------------------------------------------------------------------
    def eager_network(self) -> torch.nn.Module:
        """The bundle's ``network_def`` with the TorchScript weights (hooks for Grad-CAM/rollout need it)."""
        if self._eager is None:
            net = self._get("network_def")
            try:
                net.load_state_dict(self.network.state_dict())
            except RuntimeError as e:
                raise DeployError(f"{self.model_path}: weights do not fit the config's network_def "
                                  f"(overrides {self.overrides}): {str(e).splitlines()[0]}") from e
            self._eager = net.to(self.device).eval()
        return self._eager

    def overlay_png(self, result: dict, images: Sequence[torch.Tensor], method: str = "auto") -> tuple[bytes, dict]:
        """A 3-panel PNG (image, heat map, overlay) of the slice that most supports the study's class.

        Args:
            result: the classification (from ``classify_*``).
            images: the preprocessed slices returned with ``return_slices=True``.
            method: ``auto`` (attention rollout for networks with transformer ``blocks``, else Grad-CAM on the
                predictor's ``gradcam_layer`` or the last convolution), ``rollout`` or ``gradcam``.

        Returns:
            ``(png bytes, info)`` with info ``{"method", "slice_index", "class"}``.
        """
        from pipelines.evaluation.explain import attention_rollout, grad_cam, last_conv_layer, save_overlay

        k = int(result["study"]["predicted_index"])
        cls = self.class_names[k]
        j = int(np.argmax([s["probabilities"][cls] for s in result["slices"]]))
        net = self.eager_network()
        x = images[j][None].float().to(self.device)
        if method == "auto":
            method = "rollout" if getattr(net, "blocks", None) is not None else "gradcam"
        with self._lock:
            if method == "rollout":
                heat = attention_rollout(net, x)
            elif method == "gradcam":
                layer = getattr(self.predictor, "gradcam_layer", None) or last_conv_layer(net)
                heat = grad_cam(net, x, layer, class_idx=k)
            else:
                raise DeployError(f"unknown overlay method {method!r}; use auto, rollout or gradcam")
        with tempfile.TemporaryDirectory() as tmp:
            # tensors are (x, y); the figure shows rows = y, like a radiological image
            path = save_overlay(x[0, 0].cpu().T, heat[0, 0].cpu().T, Path(tmp) / "overlay.png",
                                title=f"{cls} (study p={result['study']['probability']:.2f}) | {method}")
            data = Path(path).read_bytes()
        return data, {"method": method, "slice_index": result["slices"][j]["slice_index"], "class": cls}


def _root_cause(err: BaseException) -> BaseException:
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def write_output_json(result: Mapping[str, Any], output_dir: str | os.PathLike) -> Path:
    """Write ``output.json`` atomically into ``output_dir`` (created) and return its path."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{OUTPUT_JSON}.", dir=out)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(result, fh, indent=2)
        os.replace(tmp, out / OUTPUT_JSON)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out / OUTPUT_JSON
