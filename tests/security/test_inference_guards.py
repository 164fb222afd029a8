"""D3, D7, R3: the alz_hybrid, alz_binary and amyloid_pet inference refuse series they were not trained for, pick
one of several series by config id, and never leave an earlier study's predictions.json after a failed run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipelines.inference.predict import InputError
from tests.deploy.helpers import phantom_volume, write_mr_series


class TinyNet(torch.nn.Module):
    """Mean intensity -> logits: enough to run the bundles' real preprocessing end to end in milliseconds."""

    def __init__(self, n_classes: int) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(1, n_classes)

    def forward(self, x):
        return self.fc(x.flatten(1).mean(dim=1, keepdim=True))


def bundle_predictor(bundle: str, **overrides):
    from pipelines.bundles import load_config

    parser = load_config(bundle, "inference.json",
                         overrides={"ckpt_path": None, "device": "$torch.device('cpu')", "image_size": 32, **overrides})
    parser["network"] = TinyNet(len(parser["class_names"]))
    return parser.get_parsed_content("predictor")


@pytest.fixture(scope="module")
def volume():
    return phantom_volume()  # (40, 48, 24) RAS


def test_mr_series_into_amyloid_pet_is_refused(tmp_path, volume):
    write_mr_series(volume, tmp_path / "fieldmap")
    with pytest.raises(InputError, match="Modality is 'MR'.*takes PT") as err:
        bundle_predictor("amyloid_pet").predict_volume(tmp_path / "fieldmap")
    assert str(tmp_path / "fieldmap") in str(err.value) and "allow_other_modality=true" in str(err.value)


@pytest.mark.parametrize("bundle", ["alz_hybrid", "alz_binary"])
def test_ct_series_into_an_mri_bundle_is_refused_unless_overridden(tmp_path, volume, bundle):
    write_mr_series(volume, tmp_path / "ct", extra={"Modality": "CT"})
    with pytest.raises(InputError, match="Modality is 'CT'.*takes MR"):
        bundle_predictor(bundle).predict_volume(tmp_path / "ct")
    with pytest.warns(UserWarning, match="classified anyway"):
        result = bundle_predictor(bundle, allow_other_modality=True).predict_volume(tmp_path / "ct")
    assert result["n_slices"] > 0


def test_one_slice_pet_is_refused(tmp_path, volume):
    write_mr_series(volume[:, :, 10:11], tmp_path / "pet1", extra={"Modality": "PT"})
    with pytest.raises(InputError, match="fewer than 8 voxels along an axis") as err:
        bundle_predictor("amyloid_pet").predict_volume(tmp_path / "pet1")
    assert "min_slices" in str(err.value)


@pytest.mark.parametrize("bundle", ["alz_hybrid", "alz_binary"])
def test_series_uid_config_id_picks_one_of_two_series(tmp_path, volume, bundle):
    write_mr_series(volume, tmp_path / "study" / "a", seed=1)
    write_mr_series(volume[:, :, :12], tmp_path / "study" / "b", seed=2, extra={"SeriesDescription": "localizer"})
    with pytest.raises(Exception, match="holds 2 series") as err:
        bundle_predictor(bundle).predict_volume(tmp_path / "study")
    msg = str(err.value)
    assert "config id series_uid" in msg and "localizer" in msg and "24 slices" in msg and "12 slices" in msg
    uid = msg.split(": ")[-1].split(" ")[0]
    assert bundle_predictor(bundle, series_uid=uid).predict_volume(tmp_path / "study")["n_slices"] > 0
    assert bundle_predictor(bundle, series_description="T1").predict_volume(tmp_path / "study")


def test_failed_inference_leaves_no_stale_predictions(tmp_path, volume):
    write_mr_series(volume, tmp_path / "good")
    (tmp_path / "empty").mkdir()
    predictor = bundle_predictor("alz_hybrid")
    out = tmp_path / "out"
    predictor.run(tmp_path / "good", out)
    with pytest.raises(Exception):
        predictor.run(tmp_path / "empty", out)
    assert not (out / "predictions.json").exists()
    assert json.loads((out / "failed.json").read_text())["status"] == "failed"
    assert (out / "predictions.previous.json").exists()
