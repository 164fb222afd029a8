"""Study prediction: dispatch on input type, per-slice rows, study aggregation, atomic outputs, bad input."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.bundles import load_config
from pipelines.inference.aggregate import aggregate_probs
from pipelines.inference.predict import ClassificationPredictor, InputError, load_state_dict
from pipelines.networks import CNNViTHybrid

CLASSES = ["NonDemented", "VeryMildDemented", "MildDemented", "ModerateDemented"]


@pytest.fixture(scope="module")
def predictor():
    parser = load_config("alz_hybrid", "inference.json", overrides={"image_size": 32})
    torch.manual_seed(0)
    net = CNNViTHybrid(num_classes=4, img_size=32, cnn_block="basic", cnn_layers=(1, 1), cnn_inplanes=(8, 8),
                       hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32)
    return ClassificationPredictor(
        net, CLASSES, parser.get_parsed_content("preprocessing"), parser.get_parsed_content("volume_preprocessing"),
        model_name="alz_hybrid", model_version="test",
    )


def _volume(path, shape=(24, 28, 20), blank_slices=4, value=None):
    rng = np.random.default_rng(0)
    vol = np.zeros(shape, np.float32)
    vol[4:-4, 4:-4, blank_slices:-blank_slices] = rng.uniform(50, 100, size=(shape[0] - 8, shape[1] - 8, shape[2] - 2 * blank_slices))
    if value is not None:
        vol[...] = value
    nib.save(nib.Nifti1Image(vol, np.diag([2.0, 2.0, 2.0, 1.0])), path)
    return path


def test_volume_gives_one_row_per_brain_slice_and_a_mean_study_result(predictor, tmp_path):
    path = _volume(tmp_path / "sub-01_T1w.nii.gz")
    summary = predictor.run(path, tmp_path / "out")
    study = summary["studies"][0]
    idx = [s["slice_index"] for s in study["slices"]]
    assert idx == list(range(4, 16))  # blank slices skipped, order kept
    probs = np.array([[s[f"prob_{c}"] for c in CLASSES] for s in study["slices"]])
    assert np.allclose(probs.sum(1), 1.0, atol=1e-5)
    assert np.allclose([study["probabilities"][c] for c in CLASSES], probs.mean(0), atol=1e-6)
    assert study["predicted_class"] == CLASSES[int(np.argmax(probs.mean(0)))]
    written = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert written["model"] == {"name": "alz_hybrid", "version": "test"}
    csv = (tmp_path / "out" / "predictions.csv").read_text().splitlines()
    assert len(csv) == 1 + len(idx)


def test_image_folder_is_grouped_by_subject(predictor, tmp_path):
    rng = np.random.default_rng(1)
    for sid in ("sub-0001", "sub-0002"):
        for k in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 36), dtype=np.uint8)).save(tmp_path / f"{sid}_slice-{k}.png")
    results = predictor.predict_path(tmp_path)
    assert [r["study"] for r in results] == ["sub-0001", "sub-0002"]
    assert [r["n_slices"] for r in results] == [3, 3]


def test_study_folder_shows_a_bar_over_studies_only_when_forced(predictor, tmp_path, monkeypatch, capsys):
    from pipelines.tracking.progress import PROGRESS_ENV

    rng = np.random.default_rng(2)
    for sid in ("sub-0001", "sub-0002"):
        Image.fromarray(rng.integers(0, 255, (40, 36), dtype=np.uint8)).save(tmp_path / f"{sid}_slice-0.png")
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    predictor.predict_path(tmp_path)
    assert "studies" not in capsys.readouterr().err  # stderr is not a terminal under pytest
    monkeypatch.setenv(PROGRESS_ENV, "force")
    predictor.predict_path(tmp_path)
    assert "studies" in capsys.readouterr().err


def test_same_slice_from_png_and_from_volume_gets_the_same_probabilities(predictor, tmp_path):
    """The PNG (anterior up) and the axial slice of the RAS volume are normalised identically."""
    rng = np.random.default_rng(2)
    vol = np.zeros((32, 40, 9), np.float32)
    vol[2:-2, 2:-2, 4] = rng.integers(10, 250, size=(28, 36))
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "v.nii.gz")
    Image.fromarray(vol[:, ::-1, 4].T.astype(np.uint8)).save(tmp_path / "s.png")
    from_vol = predictor.predict_path(tmp_path / "v.nii.gz")[0]["slices"][0]
    from_png = predictor.predict_path(tmp_path / "s.png")[0]["slices"][0]
    assert from_vol["slice_index"] == 4
    for c in CLASSES:
        assert from_vol[f"prob_{c}"] == pytest.approx(from_png[f"prob_{c}"], abs=1e-5)


@pytest.mark.parametrize("case", ["2d", "4d", "nan", "blank", "missing", "txt", "emptydir"])
def test_bad_inputs_raise_one_clear_error_naming_the_file(predictor, tmp_path, case):
    if case == "2d":
        path = tmp_path / "flat.nii.gz"
        nib.save(nib.Nifti1Image(np.ones((10, 10), np.float32), np.eye(4)), path)
        match = "flat.nii.gz.*3D"
    elif case == "4d":
        path = tmp_path / "four.nii.gz"
        nib.save(nib.Nifti1Image(np.ones((8, 8, 8, 3), np.float32), np.eye(4)), path)
        match = "four.nii.gz.*single-channel 3D"
    elif case == "nan":
        path = _volume(tmp_path / "nan.nii.gz", value=np.nan)
        match = "nan.nii.gz.*NaN"
    elif case == "blank":
        path = _volume(tmp_path / "blank.nii.gz", value=0.0)
        match = "blank.nii.gz"
    elif case == "missing":
        path, match = tmp_path / "nothing.nii.gz", "not found"
    elif case == "txt":
        path = tmp_path / "notes.txt"
        path.write_text("hello")
        match = "notes.txt: unsupported file type"
    else:
        path = tmp_path / "empty"
        path.mkdir()
        match = "no images, NIfTI volumes or DICOM"
    with pytest.raises(InputError, match=match):
        predictor.run(path, tmp_path / "out")
    assert not (tmp_path / "out" / "predictions.json").exists()


def test_failed_run_moves_earlier_outputs_aside_and_records_the_error(predictor, tmp_path):
    out = tmp_path / "out"
    good = _volume(tmp_path / "good.nii.gz")
    predictor.run(good, out)
    before = (out / "predictions.json").read_text()
    with pytest.raises(InputError):
        predictor.run(_volume(tmp_path / "bad.nii.gz", value=np.nan), out)
    # no stale result that reads as this input's: the old one is kept under another name, the error is recorded
    assert not (out / "predictions.json").exists() and not (out / "predictions.csv").exists()
    assert (out / "predictions.previous.json").read_text() == before
    failed = json.loads((out / "failed.json").read_text())
    assert failed["status"] == "failed" and "<input>" in failed["error"] and "NaN" in failed["error"]
    assert "bad.nii.gz" not in failed["error"]  # file names are pseudonymised (pipelines.io.pseudonym)
    predictor.run(good, out)
    assert (out / "predictions.json").exists() and not (out / "failed.json").exists()


def test_state_dict_loads_with_weights_only(tmp_path):
    net = torch.nn.Linear(2, 2)
    torch.save({"model": net.state_dict()}, tmp_path / "w.pt")
    sd = load_state_dict(tmp_path / "w.pt")
    assert torch.equal(sd["weight"], net.weight)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_state_dict(tmp_path / "none.pt")


def test_aggregation_methods_on_known_probabilities():
    p = np.array([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9]])
    assert np.allclose(aggregate_probs(p, "mean"), [0.6, 0.4])
    mx = np.array([0.9, 0.9])
    assert np.allclose(aggregate_probs(p, "max"), mx / mx.sum())
    top2 = np.array([0.85, 0.55])
    assert np.allclose(aggregate_probs(p, "topk_mean", k=2), top2 / top2.sum())
    assert np.allclose(aggregate_probs(p, "weighted", weights=[0, 0, 1]), [0.1, 0.9])
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate_probs(p, "median")
    with pytest.raises(ValueError, match="3 weights"):
        aggregate_probs(p, "weighted", weights=[1, 2])
