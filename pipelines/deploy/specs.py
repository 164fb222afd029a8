"""One deploy application per bundle with a DICOM use: what each app selects and which bundle config it runs.

A :class:`BundleAppSpec` is all that differs between the apps: the bundle name (its ``configs/inference.json``
gives the preprocessing and the class names, its ``metadata.json`` the model name and version), the DICOM series
selection rules (MONAI Deploy ``DICOMSeriesSelectorOperator`` JSON), and the config ids to read. Everything else
(the operators, the SR and JSON writers, the HTTP service) is generic and looks a spec up by bundle name with
:func:`get_spec`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset

__all__ = ["APP_SPECS", "BundleAppSpec", "get_spec", "modality_rules", "pet_suv_keys"]


def modality_rules(modality: str, name: str | None = None) -> str:
    """``DICOMSeriesSelectorOperator`` rules (JSON text) selecting series of one DICOM ``Modality``.

    The condition is a case-insensitive regular expression anchored on both ends (``MR`` must not match
    ``MRSPECT``...). Used with ``all_matched=True, sort_by_sop_instance_count=True`` the first selected series
    is the matching series with the most instances; the non-SDK path picks the same one.
    """
    if not modality or not modality.isalnum():
        raise ValueError(f"modality must be a DICOM Modality code such as MR, CT or PT, got {modality!r}")
    rules = {"selections": [{"name": name or f"{modality} series", "conditions": {"Modality": f"(?i)^{modality}$"}}]}
    return json.dumps(rules)


def pet_suv_keys(datasets: Sequence[Dataset]) -> dict[str, Any]:
    """Extra sample keys for PET bundles: the series' body-weight SUV factor (``suv_factor``), from the headers.

    ``transforms.pet.SUVScaled`` in the bundle's preprocessing multiplies the rescaled volume (Bq/ml) by it.
    """
    from pipelines.io.suv import series_suv_factor

    return {"suv_factor": float(series_suv_factor(list(datasets)).factor)}


@dataclass(frozen=True)
class BundleAppSpec:
    """What one deploy app runs.

    Attributes:
        bundle_name: folder name under ``bundles/`` (and ``bundle_name`` in its configs).
        modality: DICOM Modality of the input series (``MR``, ``CT``, ``PT``).
        app_name: MAP / module name (a Python identifier); default ``bundle_name``.
        description: one line for the app and the SR series description.
        config_file: config holding the inference preprocessing, relative to ``bundles/<bundle>/configs``.
        class_names_id: config id of the class names (in output order of the network).
        volume_transform_id: config id of the dict transform ``{"image": (1, X, Y, Z) MetaTensor, ...extra}`` ->
            list of slice dicts (``image`` ``(C, H, W)``, ``slice_index``); the bundle's own 3D inference chain.
        image_transform_id: config id of the dict transform ``{"image": path}`` -> ``{"image": (C, H, W)}`` for a
            single 2D picture (HTTP service only).
        aggregation_id: config id of the study aggregation method
            (:func:`pipelines.inference.aggregate.aggregate_probs`); absent -> ``mean``.
        topk_id: config id of k for ``topk_mean``; absent -> 3.
        sample_keys: headers of the series (sorted) -> extra keys for the volume transform's input dict, e.g. the
            SUV factor of a PET series.
        rules: ``DICOMSeriesSelectorOperator`` rules (JSON text); default :func:`modality_rules` of ``modality``.
    """

    bundle_name: str
    modality: str
    app_name: str = ""
    description: str = ""
    config_file: str = "inference.json"
    class_names_id: str = "class_names"
    volume_transform_id: str = "volume_preprocessing"
    image_transform_id: str = "preprocessing"
    aggregation_id: str = "aggregation"
    topk_id: str = "topk"
    sample_keys: Callable[[Sequence[Dataset]], Mapping[str, Any]] | None = None
    rules: str = field(default="")

    def __post_init__(self) -> None:
        if not self.bundle_name or not self.bundle_name.replace("_", "").isalnum():
            raise ValueError(f"bundle_name must be a bundle folder name (letters, digits, _), got {self.bundle_name!r}")
        if not self.app_name:
            object.__setattr__(self, "app_name", self.bundle_name)
        if not self.rules:
            object.__setattr__(self, "rules", modality_rules(self.modality))
        try:
            parsed = json.loads(self.rules)
        except ValueError as e:
            raise ValueError(f"{self.bundle_name}: selection rules are not valid JSON ({e})") from e
        if not parsed.get("selections"):
            raise ValueError(f"{self.bundle_name}: selection rules need a non-empty 'selections' list")


#: The deploy apps, by bundle name. ct_hemorrhage and amyloid_pet are added here once their bundles exist.
APP_SPECS: dict[str, BundleAppSpec] = {
    "alz_hybrid": BundleAppSpec(
        bundle_name="alz_hybrid",
        modality="MR",
        description="Alzheimer severity (4 stages) from a T1-weighted brain MR series",
    ),
}


def get_spec(bundle_name: str) -> BundleAppSpec:
    """The :class:`BundleAppSpec` of a bundle; ValueError naming the known apps when there is none."""
    try:
        return APP_SPECS[bundle_name]
    except KeyError:
        raise ValueError(f"no deploy app for bundle {bundle_name!r}; known: {sorted(APP_SPECS)}") from None
