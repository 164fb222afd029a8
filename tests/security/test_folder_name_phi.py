"""R2: a study folder named like a patient never reaches predictions, failed.json, MLflow params, split.json or
the executed config (:mod:`pipelines.io.pseudonym`)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipelines.bundles import read_config
from pipelines.inference.predict import ClassificationPredictor, InputError
from pipelines.io.pseudonym import is_bids_name, pseudonym, redact_paths
from pipelines.manifests.split import write_split
from pipelines.networks import CNNViTHybrid
from pipelines.tracking import run_params, save_executed_config
from tests.conftest import REPO_ROOT

PATIENT = "DOE_JOHN_19500101"
CLASSES = ["NonDemented", "VeryMildDemented", "MildDemented", "ModerateDemented"]
INFERENCE = REPO_ROOT / "bundles" / "alz_hybrid" / "configs" / "inference.json"


def _predictor(keep: bool = False) -> ClassificationPredictor:
    parser = read_config(INFERENCE, {"image_size": 32})
    torch.manual_seed(0)
    net = CNNViTHybrid(num_classes=4, img_size=32, cnn_block="basic", cnn_layers=(1, 1), cnn_inplanes=(8, 8),
                       hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32)
    return ClassificationPredictor(net, CLASSES, parser.get_parsed_content("preprocessing"),
                                   parser.get_parsed_content("volume_preprocessing"), keep_study_names=keep)


def _volume(path, value=None):
    vol = np.zeros((24, 28, 20), np.float32)
    vol[4:-4, 4:-4, 4:-4] = np.random.default_rng(0).uniform(50, 100, size=(16, 20, 12))
    if value is not None:
        vol[...] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(vol, np.diag([2.0, 2.0, 2.0, 1.0])), path)
    return path


def _texts(folder):
    return {p.name: p.read_text() for p in folder.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def predictor():
    return _predictor()


def test_patient_named_study_folder_is_pseudonymised_in_predictions(predictor, tmp_path):
    study = tmp_path / "studies" / PATIENT
    _volume(study / f"{PATIENT}_t1.nii.gz")
    for target in (study, tmp_path / "studies"):  # the study folder itself, and a root holding it
        out = tmp_path / "out" / target.name
        summary = predictor.run(target, out)
        for name, text in _texts(out).items():
            assert PATIENT not in text, name
        (result,) = summary["studies"]
        assert result["study"] == pseudonym(study / f"{PATIENT}_t1.nii.gz")
        assert summary["input"] == pseudonym(target, "input")


def test_patient_named_image_folder_is_one_pseudonymous_study(predictor, tmp_path):
    folder = tmp_path / PATIENT
    folder.mkdir()
    for k in range(2):
        Image.fromarray(np.full((40, 36), 60 * (k + 1), np.uint8)).save(folder / f"{PATIENT}_{k}.png")
    predictor.run(folder, tmp_path / "out")
    for name, text in _texts(tmp_path / "out").items():
        assert PATIENT not in text, name
    assert json.loads((tmp_path / "out" / "predictions.json").read_text())["studies"][0]["study"] == pseudonym(folder)


def test_failed_json_does_not_name_the_patient_folder(predictor, tmp_path):
    study = tmp_path / PATIENT
    _volume(study / "scan.nii.gz", value=np.nan)
    out = tmp_path / "out"
    with pytest.raises(InputError, match=PATIENT):  # the user sees the path they gave
        predictor.run(study, out)
    failed = json.loads((out / "failed.json").read_text())
    assert PATIENT not in json.dumps(failed) and "<input>" in failed["error"] and "NaN" in failed["error"]


def test_keep_study_names_keeps_folder_names(tmp_path):
    study = tmp_path / PATIENT
    _volume(study / "scan.nii.gz")
    summary = _predictor(keep=True).run(study, tmp_path / "out")
    assert summary["input"] == PATIENT and summary["studies"][0]["study"] == "scan.nii.gz"


def test_bids_names_stay_and_others_do_not():
    assert is_bids_name("sub-0001") and is_bids_name("sub-0001_ses-01_T1w.nii.gz")
    assert not is_bids_name(PATIENT) and not is_bids_name("sub-0001_DOE_JOHN.nii.gz")
    assert redact_paths(f"/data/x/{PATIENT}/a.dcm: truncated", f"/data/x/{PATIENT}").startswith("<input>/file-")
    assert PATIENT not in redact_paths(f"{PATIENT}: no slices", f"/data/x/{PATIENT}")


def test_training_records_only_the_data_set_root(tmp_path):
    root = tmp_path / "my_cohort"
    image = root / "NonDemented" / PATIENT / "sub-0001_slice-1.png"
    params = run_params({"dataset": str(root), "epochs": 1})
    assert params["dataset"] == "my_cohort"
    df = pd.DataFrame({"subject_id": ["sub-0001"], "session_id": [""], "image": [str(image)],
                       "label": ["NonDemented"], "split": ["train"]})
    write_split(df, tmp_path / "data", source=root.name)
    assert PATIENT not in (tmp_path / "data" / "split.json").read_text()
    argv = ["python", "-m", "monai.bundle", "run", "--config_file",
            str(REPO_ROOT / "bundles" / "alz_binary" / "configs" / "train.json"), "--dataset_dir", str(root)]
    saved = save_executed_config(tmp_path / "config_executed.json", argv)
    text = (tmp_path / "config_executed.json").read_text()
    assert saved and PATIENT not in text and json.loads(text)["dataset_dir"] == str(root)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # written through a temporary sibling
