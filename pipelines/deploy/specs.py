"""One deploy application per bundle with a DICOM use: what each app selects and which bundle config it runs.

A :class:`BundleAppSpec` is all that differs between the apps: the bundle name (its ``configs/inference.json``
``predictor`` gives the preprocessing, the class names and the study rule; its ``metadata.json`` the model name
and version), the DICOM series selection rules (MONAI Deploy ``DICOMSeriesSelectorOperator`` JSON), how a series
becomes slices and how slice probabilities become the study result. Everything else (the operators, the SR and
JSON writers, the HTTP service) is generic and looks a spec up by bundle name with :func:`get_spec`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

__all__ = ["APP_SPECS", "BundleAppSpec", "get_spec", "modality_rules"]


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


@dataclass(frozen=True)
class BundleAppSpec:
    """What one deploy app runs.

    Attributes:
        bundle_name: folder name under ``bundles/`` (and ``bundle_name`` in its configs).
        modality: DICOM Modality of the input series (``MR``, ``CT``, ``PT``).
        app_name: MAP / module name (a Python identifier); default ``bundle_name``.
        description: one line for the app and the service.
        config_file: config holding the inference ``predictor``, relative to ``bundles/<bundle>/configs``.
        predictor_id: config id of the bundle's predictor (built with the TorchScript network, no checkpoint).
        series_mode: how a DICOM series becomes model inputs: ``"volume"`` (the predictor's ``volume_transform``
            on the ``(1, X, Y, Z)`` RAS MetaTensor, as ``ClassificationPredictor.predict_volume``) or
            ``"ct_slices"`` (every sorted slice in HU through the predictor's ``slice_transform``, as
            ``CTStudyPredictor.predict_series``).
        decision: study rule: ``"argmax"`` (the predictor's ``aggregation`` of slice probabilities, then the most
            probable class) or ``"threshold"`` (the positive class's ``aggregation`` score, ``max`` or
            ``topk_mean``, not renormalised, positive when ``>= threshold``; the CT detector's rule).
        rules: ``DICOMSeriesSelectorOperator`` rules (JSON text); default :func:`modality_rules` of ``modality``.
    """

    bundle_name: str
    modality: str
    app_name: str = ""
    description: str = ""
    config_file: str = "inference.json"
    predictor_id: str = "predictor"
    series_mode: str = "volume"
    decision: str = "argmax"
    rules: str = field(default="")

    def __post_init__(self) -> None:
        if not self.bundle_name or not self.bundle_name.replace("_", "").isalnum():
            raise ValueError(f"bundle_name must be a bundle folder name (letters, digits, _), got {self.bundle_name!r}")
        if self.series_mode not in ("volume", "ct_slices"):
            raise ValueError(f"{self.bundle_name}: series_mode must be 'volume' or 'ct_slices', "
                             f"got {self.series_mode!r}")
        if self.decision not in ("argmax", "threshold"):
            raise ValueError(f"{self.bundle_name}: decision must be 'argmax' or 'threshold', got {self.decision!r}")
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


#: The deploy apps, by bundle name.
APP_SPECS: dict[str, BundleAppSpec] = {
    "alz_hybrid": BundleAppSpec(
        bundle_name="alz_hybrid",
        modality="MR",
        description="Alzheimer severity (4 stages) from a T1-weighted brain MR series",
    ),
    "ct_hemorrhage": BundleAppSpec(
        bundle_name="ct_hemorrhage",
        modality="CT",
        description="Intracranial haemorrhage (yes/no) from a non-contrast head CT series",
        series_mode="ct_slices",
        decision="threshold",
    ),
    "amyloid_pet": BundleAppSpec(
        bundle_name="amyloid_pet",
        modality="PT",
        description="Amyloid PET visual read (negative / intermediate / positive) from a brain PET series",
    ),
}


def get_spec(bundle_name: str) -> BundleAppSpec:
    """The :class:`BundleAppSpec` of a bundle; ValueError naming the known apps when there is none."""
    try:
        return APP_SPECS[bundle_name]
    except KeyError:
        raise ValueError(f"no deploy app for bundle {bundle_name!r}; known: {sorted(APP_SPECS)}") from None
