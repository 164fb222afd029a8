"""The deploy apps' classifier logic without the MONAI Deploy SDK: same result as the bundle, JSON, selection."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from pipelines.deploy.app import run_without_sdk, select_series_files
from pipelines.deploy.classifier import DISCLAIMER, DeployError, StudyClassifier, volume_from_sorted_slices
from pipelines.deploy.specs import BundleAppSpec, get_spec, modality_rules
from pipelines.io.dicom import load_series
from tests.deploy.helpers import ALZ_TINY, PATIENT_ID, PATIENT_NAME, REPO_ROOT, write_mr_series


def test_model_name_and_version_come_from_metadata(classifier):
    meta = json.loads((REPO_ROOT / "bundles" / "alz_hybrid" / "configs" / "metadata.json").read_text())
    assert classifier.model_info == {"bundle": "alz_hybrid", "name": meta["name"], "version": meta["version"],
                                     "file": "model.ts"}


def test_unsorted_slices_are_sorted_like_load_series(mr_series):
    ref = load_series(mr_series)
    perm = np.random.default_rng(1).permutation(len(ref.datasets))
    vol = volume_from_sorted_slices(ref.array[perm], [ref.datasets[i] for i in perm])
    np.testing.assert_array_equal(vol.array, ref.array)
    assert vol.origin == ref.origin and vol.spacing == ref.spacing
    np.testing.assert_allclose(vol.direction, ref.direction)


def test_missing_slice_is_rejected(mr_series):
    ref = load_series(mr_series)
    keep = [i for i in range(len(ref.datasets)) if i != 10]
    with pytest.raises(DeployError, match="missing slice"):
        volume_from_sorted_slices(ref.array[keep], [ref.datasets[i] for i in keep])


def test_fallback_writes_output_json_without_patient_data(classifier, mr_series, tmp_path):
    result = run_without_sdk("alz_hybrid", mr_series, tmp_path, classifier.model_path, classifier=classifier)
    text = (tmp_path / "output.json").read_text()
    saved = json.loads(text)
    assert saved == result
    assert PATIENT_NAME not in text and PATIENT_ID not in text and "PHANTOM" not in text
    assert saved["disclaimer"] == DISCLAIMER
    assert saved["input"]["study_instance_uid"] == str(load_series(mr_series).datasets[0].StudyInstanceUID)
    sums = [sum(s["probabilities"].values()) for s in saved["slices"]]
    np.testing.assert_allclose(sums, 1.0, atol=1e-5)
    assert len(list(tmp_path.glob("*.dcm"))) == 1


def test_selection_picks_the_app_modality_over_other_series(mr_series, mr_volume, tmp_path):
    study = tmp_path / "study"
    shutil.copytree(mr_series, study / "mr")
    write_mr_series(mr_volume[:, :, :30], study / "ct", seed=5, extra={"Modality": "CT"})
    files = select_series_files(study, get_spec("alz_hybrid"))
    assert sorted(p.name for p in files) == sorted(p.name for p in mr_series.iterdir())
    assert all(p.parent.name == "mr" for p in files)


def test_selection_without_matching_series_names_modalities(mr_volume, tmp_path):
    write_mr_series(mr_volume[:, :, :4], tmp_path, extra={"Modality": "CT"})
    with pytest.raises(DeployError, match=r"no DICOM series matches .* modality \['CT'\]"):
        select_series_files(tmp_path, get_spec("alz_hybrid"))


def test_config_embedded_in_model_is_used_without_bundle_folder(classifier, mr_series, mr_result):
    spec = BundleAppSpec(bundle_name="not_a_bundle_here", modality="MR")
    clf = StudyClassifier(spec, classifier.model_path, overrides=ALZ_TINY, device="cpu")
    assert clf.config_source.endswith("model.ts:inference.json")
    assert clf.model_info["version"] == classifier.model_info["version"]
    assert clf.classify_series(load_series(mr_series))["study"] == mr_result["study"]


def test_overrides_from_environment_apply(classifier, monkeypatch):
    monkeypatch.setenv("NEURO_DEPLOY_OVERRIDES", json.dumps({**ALZ_TINY, "aggregation": "max"}))
    clf = StudyClassifier("alz_hybrid", classifier.model_path, device="cpu")
    assert clf.aggregation == "max"


def test_non_torchscript_model_is_rejected(tmp_path):
    bad = tmp_path / "model.ts"
    bad.write_text("not a model")
    with pytest.raises(DeployError, match=r"model.ts: not a TorchScript model"):
        StudyClassifier("alz_hybrid", bad, device="cpu")


def test_modality_rules_are_anchored_regex():
    rules = json.loads(modality_rules("MR"))
    assert rules["selections"][0]["conditions"] == {"Modality": "(?i)^MR$"}
    with pytest.raises(ValueError, match="DICOM Modality code"):
        modality_rules("M R")


def test_each_bundle_without_sdk_equals_bundle_inference(bundle_case, tmp_path):
    result = run_without_sdk(bundle_case.bundle, bundle_case.series, tmp_path, bundle_case.model_ts,
                             overrides=bundle_case.overrides)
    ref = bundle_case.reference()
    names = result["class_names"]
    assert result["study"]["predicted_class"] == ref["predicted_class"]
    np.testing.assert_allclose([result["study"]["probabilities"][c] for c in names], ref["probabilities"], atol=1e-5)
    assert [s["slice_index"] for s in result["slices"]] == ref["slice_index"]
    np.testing.assert_allclose([[s["probabilities"][c] for c in names] for s in result["slices"]], ref["slice_probs"],
                               atol=1e-5)
    assert json.loads((tmp_path / "output.json").read_text()) == result


def test_cli_without_sdk_runs_the_same_logic(alz_case, tmp_path, monkeypatch, mr_result):
    import pipelines.deploy.app as app

    monkeypatch.setattr(app, "sdk_available", lambda: False)
    monkeypatch.setenv("NEURO_DEPLOY_OVERRIDES", json.dumps(ALZ_TINY))
    code = app.main("alz_hybrid", ["-i", str(alz_case.series), "-o", str(tmp_path), "-m", str(alz_case.model_ts)])
    assert code == 0
    assert json.loads((tmp_path / "output.json").read_text())["study"] == mr_result["study"]
    assert len(list(tmp_path.glob("*.dcm"))) == 1
