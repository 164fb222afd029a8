"""The classification app of a bundle: MONAI Deploy App SDK pipeline, and the same logic without the SDK.

SDK pipeline (``BundleClassificationApp``)::

    DICOMDataLoaderOperator -> RequiredSeriesSelectorOperator (DICOMSeriesSelectorOperator, rules per modality)
        -> DICOMSeriesToVolumeOperator -> StudyClassifierOperator -> ClassificationSRWriterOperator (DICOM SR)
                                                                  -> JSONResultWriterOperator (output.json)

Command line (one module per app, e.g. ``pipelines.deploy.alz_hybrid``)::

    python -m pipelines.deploy.alz_hybrid -i <dicom folder> -o <output folder> -m <model.ts>

Without the SDK installed (``pip install -e '.[deploy]'``) the same command runs :func:`run_without_sdk`: the
series is found with :func:`pipelines.io.dicom.find_series`, selected with the same rules (string conditions),
loaded with :func:`pipelines.io.dicom.load_series`, and goes through the same classifier and writers.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pydicom

from pipelines.deploy.classifier import DeployError, StudyClassifier, write_output_json
from pipelines.deploy.specs import BundleAppSpec, get_spec
from pipelines.deploy.sr import write_classification_sr

__all__ = ["make_app", "main", "run_without_sdk", "sdk_available", "select_series_files"]

logger = logging.getLogger(__name__)


def sdk_available() -> bool:
    """Whether the MONAI Deploy App SDK (and Holoscan) can be imported."""
    try:
        import monai.deploy.core  # noqa: F401
        import monai.deploy.operators  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------------------------------- SDK app


def make_app(
    bundle: str | BundleAppSpec,
    argv: Sequence[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    config_file: str | None = None,
):
    """A MONAI Deploy ``Application`` for a bundle; ``app.run()`` runs it.

    Args:
        bundle: bundle name or spec.
        argv: ``[program, "-i", input, "-o", output, "-m", model]`` (the SDK's own arguments; default
            ``sys.argv``).
        overrides: config ids to override (see :class:`pipelines.deploy.classifier.StudyClassifier`).
        config_file: inference config to use instead of the bundle's.
    """
    from monai.deploy.conditions import CountCondition
    from monai.deploy.core import Application
    from monai.deploy.operators import DICOMDataLoaderOperator, DICOMSeriesToVolumeOperator

    from pipelines.deploy.operators import (
        ClassificationSRWriterOperator,
        JSONResultWriterOperator,
        RequiredSeriesSelectorOperator,
        StudyClassifierOperator,
    )

    spec = get_spec(bundle) if isinstance(bundle, str) else bundle

    class BundleClassificationApp(Application):
        """Study classification with the bundle's exported model; DICOM SR and output.json out."""

        def compose(self) -> None:
            ctx = Application.init_app_context(self.argv)
            input_path, output_path = Path(ctx.input_path), Path(ctx.output_path)
            if not input_path.exists():
                raise DeployError(f"input folder not found: {input_path}")
            classifier = StudyClassifier(spec, ctx.model_path, config_file=config_file, overrides=overrides)
            logger.info("%s: model %s %s (%s), config %s", spec.app_name, classifier.model_info["name"],
                        classifier.model_info["version"], classifier.model_path, classifier.config_source)
            loader = DICOMDataLoaderOperator(self, CountCondition(self, 1), input_folder=input_path,
                                             name="dicom_loader")
            selector = RequiredSeriesSelectorOperator(self, rules=spec.rules, all_matched=True,
                                                      sort_by_sop_instance_count=True, name="series_selector")
            to_volume = DICOMSeriesToVolumeOperator(self, name="series_to_volume")
            classify = StudyClassifierOperator(self, classifier=classifier, name="classifier")
            sr_writer = ClassificationSRWriterOperator(self, output_folder=output_path, name="sr_writer")
            json_writer = JSONResultWriterOperator(self, output_folder=output_path, name="json_writer")
            self.add_flow(loader, selector, {("dicom_study_list", "dicom_study_list")})
            self.add_flow(selector, to_volume, {("study_selected_series_list", "study_selected_series_list")})
            self.add_flow(to_volume, classify, {("image", "image")})
            self.add_flow(selector, classify, {("study_selected_series_list", "study_selected_series_list")})
            self.add_flow(classify, sr_writer, {("result", "result")})
            self.add_flow(selector, sr_writer, {("study_selected_series_list", "study_selected_series_list")})
            self.add_flow(classify, json_writer, {("result", "result")})

    BundleClassificationApp.__name__ = BundleClassificationApp.__qualname__ = f"{spec.app_name}_app"
    # Holoscan reads argv[1:] as the program's own arguments (argv[0] is the interpreter).
    return BundleClassificationApp(None if argv is None else [sys.executable, *argv])


# --------------------------------------------------------------------------------------------------- no SDK


def _matches(value: Any, pattern: Any) -> bool:
    """The SDK selector's test for string attributes: case-insensitive equality, else a regex search."""
    if not isinstance(pattern, str):
        raise DeployError(f"selection without the SDK supports string conditions only, got {pattern!r}")
    text = "" if value is None else str(value)
    return text.casefold() == pattern.casefold() or re.search(pattern, text, re.IGNORECASE) is not None


def select_series_files(folder: str | Path, spec: BundleAppSpec) -> list[Path]:
    """Files of the series the SDK app would select: matching the rules, the one with the most instances.

    Raises:
        DeployError: no DICOM series, or none matching the rules (the message lists the modalities seen).
    """
    import json

    from pipelines.io.dicom import DicomSeriesError, find_series

    try:
        groups = find_series(folder)
    except DicomSeriesError as e:
        raise DeployError(str(e)) from e
    rules = json.loads(spec.rules)["selections"]
    best: list[Path] = []
    seen = set()
    for files in groups.values():
        header = pydicom.dcmread(files[0], stop_before_pixels=True, force=True)
        seen.add(str(header.get("Modality", "?")))
        for selection in rules:
            conditions = selection.get("conditions") or {}
            if conditions and all(not p or _matches(header.get(k), p) for k, p in conditions.items()):
                if len(files) > len(best):
                    best = files
                break
    if not best:
        raise DeployError(f"{folder}: no DICOM series matches the selection rules {spec.rules}; the input holds "
                          f"{len(groups)} series of modality {sorted(seen)}")
    return best


def run_without_sdk(
    bundle: str | BundleAppSpec,
    input_dir: str | Path,
    output_dir: str | Path,
    model_path: str | Path,
    overrides: Mapping[str, Any] | None = None,
    config_file: str | None = None,
    classifier: StudyClassifier | None = None,
) -> dict:
    """The app's logic without the SDK: select, load, classify, write the SR and ``output.json``.

    Returns:
        The result dict (also in ``<output_dir>/output.json``), with ``outputs`` naming the files written.
    """
    from pipelines.io.dicom import DicomSeriesError, load_series

    spec = get_spec(bundle) if isinstance(bundle, str) else bundle
    clf = classifier or StudyClassifier(spec, model_path, config_file=config_file, overrides=overrides)
    files = select_series_files(input_dir, spec)
    try:
        volume = load_series(files)
    except DicomSeriesError as e:
        raise DeployError(str(e)) from e
    result = clf.classify_series(volume)
    sr_path = write_classification_sr(result, volume.datasets, output_dir)
    write_output_json(result, output_dir)
    logger.info("%s: %s (p=%.3f); SR %s", spec.app_name, result["study"]["predicted_class"],
                result["study"]["probability"], sr_path.name)
    return result


# --------------------------------------------------------------------------------------------------- CLI


def _parse_fallback_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="study classification (MONAI Deploy SDK not installed: "
                                                 "same logic without it)")
    parser.add_argument("-i", "--input", required=True, help="folder of DICOM files (one study)")
    parser.add_argument("-o", "--output", required=True, help="output folder (output.json and the SR)")
    parser.add_argument("-m", "--model", required=True, help="model.ts (or a folder holding one)")
    parser.add_argument("-l", "--log-level", default="INFO")
    return parser.parse_args(list(argv))


def main(bundle: str, argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m pipelines.deploy.<app> -i <dicom dir> -o <out> -m <model.ts>``.

    Runs the MONAI Deploy app when the SDK is installed, else :func:`run_without_sdk`. Exit code 0 on success,
    2 with one error line for unusable input/model/config.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if sdk_available():
            make_app(bundle, [f"pipelines.deploy.{bundle}", *args]).run()
        else:
            ns = _parse_fallback_args(args)
            logging.basicConfig(level=ns.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
            logger.warning("MONAI Deploy App SDK not installed (pip install -e '.[deploy]'): running without it")
            run_without_sdk(bundle, ns.input, ns.output, ns.model)
    except DeployError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
