"""MONAI Deploy App SDK operators of the classification apps (needs the ``deploy`` extra).

* :class:`RequiredSeriesSelectorOperator`: ``DICOMSeriesSelectorOperator`` that fails with a clear message when
  no series matches (the SDK's own emits an empty list, and the next operator fails with an unrelated one).
* :class:`StudyClassifierOperator`: the selected series' volume (from ``DICOMSeriesToVolumeOperator``) and
  headers -> :class:`pipelines.deploy.classifier.StudyClassifier` -> the result dict. Used instead of
  ``MonaiBundleInferenceOperator``, which labels ``probabilities`` outputs wrongly for classification.
* :class:`ClassificationSRWriterOperator`: result + selected series -> Comprehensive SR
  (:func:`pipelines.deploy.sr.write_classification_sr`).
* :class:`JSONResultWriterOperator`: result -> ``output.json``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from monai.deploy.core import Fragment, Operator, OperatorSpec
from monai.deploy.operators import DICOMSeriesSelectorOperator

from pipelines.deploy.classifier import DeployError, StudyClassifier, header_copy, volume_from_sorted_slices
from pipelines.deploy.sr import write_classification_sr

__all__ = [
    "ClassificationSRWriterOperator",
    "JSONResultWriterOperator",
    "RequiredSeriesSelectorOperator",
    "StudyClassifierOperator",
    "selected_series",
]

logger = logging.getLogger(__name__)


def selected_series(study_selected_series_list):
    """The first selected ``DICOMSeries`` (the one ``DICOMSeriesToVolumeOperator`` converts)."""
    if not study_selected_series_list or not study_selected_series_list[0].selected_series:
        raise DeployError("no DICOM series was selected")
    return study_selected_series_list[0].selected_series[0].series


class RequiredSeriesSelectorOperator(DICOMSeriesSelectorOperator):
    """``DICOMSeriesSelectorOperator`` whose empty selection is an error naming the rules and what was seen."""

    def filter(self, selection_rules, dicom_study_list, all_matched=False, sort_by_sop_instance_count=False):
        selected = super().filter(selection_rules, dicom_study_list, all_matched, sort_by_sop_instance_count)
        if not selected:
            seen = sorted({f"{s.Modality or '?'}" for st in dicom_study_list or [] for s in st.get_all_series()})
            raise DeployError(
                f"no DICOM series matches the selection rules {self._rules_json_str}; the input holds "
                f"{sum(len(st.get_all_series()) for st in dicom_study_list or [])} series of modality {seen}"
            )
        return selected


class StudyClassifierOperator(Operator):
    """Classify the selected series with the exported model and the bundle's preprocessing.

    Named inputs:
        image: ``Image`` from ``DICOMSeriesToVolumeOperator`` (array ``(slices, rows, columns)``).
        study_selected_series_list: the selection (headers of the same series, sorted by the SDK).

    Named output:
        result: the classification dict (see :class:`pipelines.deploy.classifier.StudyClassifier`).
    """

    def __init__(self, fragment: Fragment, *args, classifier: StudyClassifier, **kwargs) -> None:
        self.classifier = classifier
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("image")
        spec.input("study_selected_series_list")
        spec.output("result")

    def compute(self, op_input, op_output, context) -> None:
        image = op_input.receive("image")
        series = selected_series(op_input.receive("study_selected_series_list"))
        where = f"series {series.SeriesInstanceUID}"
        datasets = [header_copy(inst.get_native_sop_instance()) for inst in series.get_sop_instances()]
        volume = volume_from_sorted_slices(image.asnumpy(), datasets, where=where)
        result = self.classifier.classify_series(volume)
        study = result["study"]
        logger.info("%s: %s (p=%.3f, %d slice(s), %s)", where, study["predicted_class"], study["probability"],
                    result["n_slices"], result["aggregation"])
        op_output.emit(result, "result")


class ClassificationSRWriterOperator(Operator):
    """Write the result as a Comprehensive SR referencing the classified series.

    Named inputs:
        result: the classification dict.
        study_selected_series_list: the selection (source headers for patient/study data and references).
    """

    def __init__(self, fragment: Fragment, *args, output_folder: str | Path, **kwargs) -> None:
        self.output_folder = Path(output_folder)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("result")
        spec.input("study_selected_series_list")

    def compute(self, op_input, op_output, context) -> None:
        result = op_input.receive("result")
        series = selected_series(op_input.receive("study_selected_series_list"))
        datasets = [inst.get_native_sop_instance() for inst in series.get_sop_instances()]
        path = write_classification_sr(result, datasets, self.output_folder)
        logger.info("DICOM SR written to %s", path)


class JSONResultWriterOperator(Operator):
    """Write the result as ``output.json`` in the output folder.

    Named input:
        result: the classification dict.
    """

    def __init__(self, fragment: Fragment, *args, output_folder: str | Path, **kwargs) -> None:
        self.output_folder = Path(output_folder)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("result")

    def compute(self, op_input, op_output, context) -> None:
        from pipelines.deploy.classifier import write_output_json

        path = write_output_json(op_input.receive("result"), self.output_folder)
        logger.info("results written to %s", path)
