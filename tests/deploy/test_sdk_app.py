"""The MONAI Deploy App SDK app run for real, in-process (skipped when the ``deploy`` extra is not installed)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("monai.deploy.core", reason="MONAI Deploy App SDK not installed (pip install -e '.[deploy]')",
                    exc_type=ImportError)
pytest.importorskip("monai.deploy.operators", exc_type=ImportError)

from pipelines.deploy.app import main, make_app  # noqa: E402
from pipelines.deploy.classifier import DeployError  # noqa: E402
from pipelines.deploy.sr import read_classification_sr  # noqa: E402
from pipelines.io.dicom import load_series  # noqa: E402
from tests.conftest import shared_dataset  # noqa: E402
from tests.deploy.helpers import ALZ_TINY, write_mr_series  # noqa: E402


def _run_app(input_dir, output_dir, model, bundle="alz_hybrid", overrides=ALZ_TINY):
    make_app(bundle, ["app", "-i", str(input_dir), "-o", str(output_dir), "-m", str(model)],
             overrides=overrides).run()
    return json.loads((output_dir / "output.json").read_text())


@pytest.fixture(scope="module")
def app_run(alz_case, tmp_path_factory):
    out = tmp_path_factory.mktemp("sdk_out")
    return out, _run_app(alz_case.series, out, alz_case.model_ts)


def _probs(result, names):
    return [result[c] if c in result else result["probabilities"][c] for c in names]


def test_each_app_study_result_equals_bundle_inference(bundle_case, tmp_path):
    result = _run_app(bundle_case.series, tmp_path, bundle_case.model_ts, bundle_case.bundle, bundle_case.overrides)
    ref = bundle_case.reference()
    names = result["class_names"]
    assert result["model"]["bundle"] == bundle_case.bundle
    assert result["study"]["predicted_class"] == ref["predicted_class"]
    np.testing.assert_allclose(_probs(result["study"]["probabilities"], names), ref["probabilities"], atol=1e-5)
    assert [s["slice_index"] for s in result["slices"]] == ref["slice_index"]
    np.testing.assert_allclose([_probs(s["probabilities"], names) for s in result["slices"]], ref["slice_probs"],
                               atol=1e-5)
    (sr,) = tmp_path.glob("*.dcm")
    back = read_classification_sr(sr)
    assert back["finding"] == result["study"]["predicted_class"]
    assert list(back["referenced_series"]) == [result["input"]["series_instance_uid"]]


def test_sdk_app_writes_sr_for_the_selected_series(app_run, mr_series):
    out, result = app_run
    (sr,) = out.glob("*.dcm")
    back = read_classification_sr(sr)
    volume = load_series(mr_series)
    assert back["finding"] == result["study"]["predicted_class"]
    assert back["study_instance_uid"] == result["input"]["study_instance_uid"]
    assert set(back["referenced_series"]) == {volume.series_uid} == {result["input"]["series_instance_uid"]}
    assert result["input"]["n_instances"] == len(back["referenced_series"][volume.series_uid]) == 24


def test_sdk_app_without_matching_series_fails_clearly(mr_volume, tiny_model, tmp_path):
    write_mr_series(mr_volume[:, :, :4], tmp_path / "ct", extra={"Modality": "CT"})
    with pytest.raises(DeployError, match=r"no DICOM series matches .*modality \['CT'\]"):
        _run_app(tmp_path / "ct", tmp_path / "out", tiny_model[0])
    assert not (tmp_path / "out" / "output.json").exists()


def test_cli_entry_runs_the_sdk_app(mr_series, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("NEURO_DEPLOY_OVERRIDES", json.dumps(ALZ_TINY))
    code = main("alz_hybrid", ["-i", str(mr_series), "-o", str(tmp_path), "-m", str(tiny_model[0].parent)])
    assert code == 0
    assert json.loads((tmp_path / "output.json").read_text())["model"]["file"] == "model.ts"
    assert len(list(tmp_path.glob("*.dcm"))) == 1


def test_cli_entry_reports_a_bad_model_with_exit_code_2(mr_series, tmp_path, capsys):
    bad = tmp_path / "model.ts"
    bad.write_text("not a model")
    assert main("alz_hybrid", ["-i", str(mr_series), "-o", str(tmp_path / "out"), "-m", str(bad)]) == 2
    assert "not a TorchScript model" in capsys.readouterr().err


@pytest.mark.realdata
def test_sdk_app_on_real_oblique_mr_series_equals_bundle_inference(tiny_model, bundle_predictor, tmp_path):
    folder = shared_dataset("dicom_series_mr_trio_b17") / "gre_field_mapping_2"
    result = _run_app(folder, tmp_path, tiny_model[0])
    ref = bundle_predictor.predict_volume(folder)
    names = result["class_names"]
    assert result["input"]["n_instances"] == 36
    assert result["study"]["predicted_class"] == ref["predicted_class"]
    np.testing.assert_allclose(_probs(result["study"]["probabilities"], names), _probs(ref["probabilities"], names),
                               atol=1e-5)
