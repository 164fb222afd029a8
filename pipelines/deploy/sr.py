"""DICOM Comprehensive SR (TID 1500 Measurement Report) for a study-level classification, with highdicom.

Content tree (IHE AI Results style: a qualitative finding plus numeric scores)::

    CONTAINER Imaging Measurement Report (TID 1500)
      language; observer = device (name = model name, manufacturer, model name = model version)
      procedure reported: Imaging procedure
      CONTAINER Imaging Measurements
        CONTAINER Measurement Group (TID 1501)
          Tracking Identifier "study classification <bundle>" + Tracking Unique Identifier
          CODE Finding = <predicted class>
          Algorithm Name / Algorithm Version (the model's metadata.json name and version)
          IMAGE Source of Measurement: every instance of the classified series
          NUM "Probability of <class>" {probability}, for every class (study level, aggregated over slices)

Class and score codes use the private coding scheme ``99NMB`` (``CLASS-<k>``, ``PROB-<k>``, the meaning is the
class name), since no standard codes exist for these model outputs; ``99NMB`` with the algorithm name and version
identifies them.

Patient and study attributes are copied by highdicom from the first source instance (Patient, Patient Study,
General Study and Clinical Trial modules, only attributes present there), so the SR holds no patient data the
source did not hold; Type 2 attributes missing in the source are written empty. The source study and series are referenced in the Current Requested Procedure Evidence
Sequence (Study/Series/SOP Instance UIDs) and in the content tree. "Research use only" is in the SR's
SeriesDescription; CompletionFlag COMPLETE, VerificationFlag UNVERIFIED, PreliminaryFlag PRELIMINARY.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

__all__ = ["CODING_SCHEME", "SR_SERIES_DESCRIPTION", "read_classification_sr", "write_classification_sr"]

CODING_SCHEME = "99NMB"
SR_SERIES_DESCRIPTION = "AI classification - research use only"
SR_SERIES_NUMBER = 9901
_TYPE2_KEYWORDS = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                   "StudyDate", "StudyTime", "ReferringPhysicianName")


def _evidence(ds: Dataset) -> Dataset:
    """The source header with the Type 2 attributes highdicom reads as attributes present (empty if absent)."""
    out = Dataset({tag: ds.get_item(tag) for tag in ds.keys()
                   if ds[tag].keyword not in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")})
    for keyword in _TYPE2_KEYWORDS:
        if keyword not in out:
            setattr(out, keyword, None)
    return out


def write_classification_sr(
    result: Mapping[str, Any],
    source_datasets: Sequence[Dataset],
    output_dir: str | os.PathLike,
    manufacturer: str = "neuro-monai-bundles",
) -> Path:
    """Write the study classification as ``<output_dir>/<SOPInstanceUID>.dcm`` (Comprehensive SR).

    Args:
        result: a classification from :class:`pipelines.deploy.classifier.StudyClassifier` (``model``,
            ``class_names``, ``study`` with ``predicted_index`` and ``probabilities``).
        source_datasets: headers of the classified series' instances (pixel data not needed), all of one study.
        output_dir: folder for the file (created).
        manufacturer: Manufacturer of the SR (the software).

    Returns:
        The path of the written file.

    Raises:
        ValueError: no source instances, or instances of several studies.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    if not source_datasets:
        raise ValueError("write_classification_sr: no source instances to reference")
    studies = {str(ds.get("StudyInstanceUID", "")) for ds in source_datasets}
    if len(studies) != 1 or "" in studies:
        raise ValueError(f"write_classification_sr: source instances must belong to one study, got {sorted(studies)}")
    evidence = [_evidence(ds) for ds in source_datasets]
    model = result["model"]
    class_names = list(result["class_names"])
    study = result["study"]
    k = int(study["predicted_index"])
    name = str(model.get("name") or model.get("bundle"))
    version = str(model.get("version") or "unknown")

    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=generate_uid(), name=name[:64], manufacturer_name=manufacturer, model_name=version[:64]
    )
    observation_context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )

    def class_code(i: int) -> hd.sr.CodedConcept:
        return hd.sr.CodedConcept(value=f"CLASS-{i}", scheme_designator=CODING_SCHEME, meaning=class_names[i][:64])

    probability_unit = hd.sr.CodedConcept(value="{probability}", scheme_designator="UCUM", meaning="probability")
    measurements = [
        hd.sr.Measurement(
            name=hd.sr.CodedConcept(value=f"PROB-{i}", scheme_designator=CODING_SCHEME,
                                    meaning=f"Probability of {c}"[:64]),
            value=float(study["probabilities"][c]),
            unit=probability_unit,
        )
        for i, c in enumerate(class_names)
    ]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=generate_uid(), identifier=f"study classification {model.get('bundle', '')}"[:64]
        ),
        algorithm_id=hd.sr.AlgorithmIdentification(name=name[:64], version=version[:64]),
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(
                referenced_sop_class_uid=ds.SOPClassUID, referenced_sop_instance_uid=ds.SOPInstanceUID
            )
            for ds in evidence
        ],
        measurements=measurements,
        finding_type=class_code(k),
    )
    report = hd.sr.MeasurementReport(
        observation_context=observation_context,
        procedure_reported=codes.cid100.ImagingProcedure if hasattr(codes.cid100, "ImagingProcedure")
        else hd.sr.CodedConcept(value="363679005", scheme_designator="SCT", meaning="Imaging procedure"),
        imaging_measurements=[group],
    )
    sop_uid = generate_uid()
    sr = hd.sr.ComprehensiveSR(
        evidence=evidence,
        content=report,
        series_instance_uid=generate_uid(),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=SR_SERIES_DESCRIPTION,
    )
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{sop_uid}.dcm"
    sr.save_as(path, enforce_file_format=True)
    return path


def read_classification_sr(path: str | os.PathLike) -> dict[str, Any]:
    """Read back an SR written by :func:`write_classification_sr` (with highdicom) as a plain dict.

    Returns:
        ``{"finding": class name, "probabilities": {class: p}, "algorithm": (name, version),
        "study_instance_uid", "referenced_series": {series uid: [sop instance uids]}}``.
    """
    import highdicom as hd

    sr = hd.sr.srread(path)
    report = sr.content
    measurement_groups = report.get_image_measurement_groups()
    if len(measurement_groups) != 1:
        raise ValueError(f"{path}: expected one measurement group, found {len(measurement_groups)}")
    group = measurement_groups[0]
    finding = group.finding_type
    algorithm = {code: _find_text(group[0], code) for code in ("111001", "111003")}
    referenced: dict[str, list[str]] = {}
    for study_item in sr.get("CurrentRequestedProcedureEvidenceSequence", []):
        for series_item in study_item.ReferencedSeriesSequence:
            referenced.setdefault(series_item.SeriesInstanceUID, []).extend(
                str(s.ReferencedSOPInstanceUID) for s in series_item.ReferencedSOPSequence
            )
    return {
        "finding": finding.meaning if finding is not None else None,
        "probabilities": {m.name.meaning.removeprefix("Probability of "): float(m.value)
                          for m in group.get_measurements()},
        "algorithm": (algorithm["111001"], algorithm["111003"]),
        "study_instance_uid": str(sr.StudyInstanceUID),
        "referenced_series": referenced,
    }


def _find_text(item: Dataset, code_value: str) -> str | None:
    """Value of the first TEXT content item below ``item`` whose concept name has ``code_value`` (DCM)."""
    for child in item.get("ContentSequence", []):
        names = child.get("ConceptNameCodeSequence", [])
        if child.get("ValueType") == "TEXT" and names and names[0].CodeValue == code_value:
            return str(child.TextValue)
        found = _find_text(child, code_value)
        if found is not None:
            return found
    return None
