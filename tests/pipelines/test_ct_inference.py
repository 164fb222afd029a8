"""Head-CT study inference (pipelines.inference.ct) and CT slice loading (pipelines.io.ct).

The network is a fixed-weight "hyperdense pixel" detector, not a trained model: it scores the fraction of pixels
whose brain-window value lies in [0.72, 0.99) (about 58..79 HU, the range of acute blood in the phantom), so
the tests can check the whole chain (DICOM -> HU -> windows -> slice order -> study result) against the phantom's
labels without any training.
"""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from pipelines.bundles import load_config
from pipelines.inference.aggregate import aggregate_probs
from pipelines.inference.ct import CTStudyPredictor, InputError, series_slices, study_scores
from pipelines.io.ct import LoadCTImage, hu_to_8bit, load_prewindowed_2d
from pipelines.io.dicom import load_series
from pipelines.phantoms.head_ct import make_head_ct_volume, write_dicom_series

SHAPE = (8, 64, 64)
PATIENT_ID = "PHANTOM-0042"
PATIENT_NAME = "SECRET^JANE"


class HyperdenseDetector(nn.Module):
    """Fixed weights: logit of 'hemorrhage' = gain * mean(relu(b - 0.72) - 28 relu(b - 0.99)) - bias, b = channel 0."""

    def __init__(self, gain: float = 400.0, bias: float = 0.0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1)
        self.mix = nn.Conv2d(2, 1, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[:, 0] = 1.0
            self.conv.bias.copy_(torch.tensor([-0.72, -0.99]))
            self.mix.weight.copy_(torch.tensor([1.0, -28.0]).view(1, 2, 1, 1))
        self.gain, self.bias = gain, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = self.mix(F.relu(self.conv(x))).mean(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(score), self.gain * score - self.bias], dim=1)


def _bundle_transforms(window_preset: str = "multi", image_size: int = 64):
    parser = load_config("ct_hemorrhage", "inference.json",
                         overrides={"window_preset": window_preset, "image_size": image_size})
    return parser.get_parsed_content("preprocessing"), parser.get_parsed_content("slice_preprocessing")


def make_predictor(window_preset: str = "multi", **kw) -> CTStudyPredictor:
    image_t, slice_t = _bundle_transforms(window_preset)
    kw.setdefault("batch_size", 4)
    return CTStudyPredictor(HyperdenseDetector(), ["normal", "hemorrhage"], image_t, slice_t,
                            window_preset=window_preset, **kw)


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """(hu, slice labels, folder, paths in slice order) of a haemorrhage study and of a normal one."""
    out = {}
    for kind, seed in (("iph", 3), ("none", 4)):
        hu, labels, _ = make_head_ct_volume(seed, SHAPE, kind)
        folder = tmp_path_factory.mktemp(f"{PATIENT_ID}_{kind}")
        paths = write_dicom_series(hu, folder, patient_id=PATIENT_ID, patient_name=PATIENT_NAME, seed=seed)
        out[kind] = (hu, labels, folder, paths)
    return out


@pytest.fixture(scope="module")
def predictor():
    return make_predictor()


# ------------------------------------------------------------------------------------------------ aggregation


def test_study_scores_are_max_and_top_k_mean_of_the_positive_class():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.7, 0.3]])
    assert study_scores(probs, 1, topk=2) == pytest.approx({"max": 0.8, "topk_mean": 0.7})
    assert study_scores(probs, 0, topk=3) == pytest.approx({"max": 0.9, "topk_mean": (0.9 + 0.7 + 0.4) / 3})


def test_study_top_k_larger_than_the_series_is_the_mean():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6]])
    assert study_scores(probs, 1, topk=10)["topk_mean"] == pytest.approx(0.5)


def test_aggregate_without_renormalising_keeps_each_class_statistic():
    probs = np.array([[0.9, 0.1], [0.2, 0.8]])
    np.testing.assert_allclose(aggregate_probs(probs, "max", renormalize=False), [0.9, 0.8])
    np.testing.assert_allclose(aggregate_probs(probs, "max"), [0.9 / 1.7, 0.8 / 1.7])


# ------------------------------------------------------------------------------------------------ HU path


def test_series_slices_equal_the_generated_hu(series):
    hu, _, folder, _ = series["iph"]
    slices = series_slices(load_series(folder))
    assert len(slices) == SHAPE[0]
    for z, img in enumerate(slices):
        assert img.shape == (1, SHAPE[2], SHAPE[1])  # (1, x, y)
        np.testing.assert_array_equal(img[0].numpy(), hu[z].T.astype(np.float32))


def test_single_dicom_file_loads_the_same_hu_as_its_series_slice(series):
    hu, _, _, paths = series["iph"]
    for z in (0, 5):
        np.testing.assert_array_equal(LoadCTImage()(paths[z])[0].numpy(), hu[z].T.astype(np.float32))


def test_prewindowed_rendering_of_dicom_is_the_rounded_brain_window(series):
    hu, _, folder, paths = series["iph"]
    img = series_slices(load_series(folder), prewindowed=True)[2][0].numpy()
    expected = np.rint(np.clip(hu[2].T.astype(np.float64) / 80.0, 0, 1) * 255.0)
    np.testing.assert_array_equal(img, expected)
    np.testing.assert_array_equal(LoadCTImage(prewindowed=True)(paths[2])[0].numpy(), img)
    assert hu_to_8bit(np.array([-1000.0, 40.0, 80.0])).tolist() == [0.0, 128.0, 255.0]


# ------------------------------------------------------------------------------------------------ series prediction


def test_series_result_fields_slice_order_and_most_suspicious_slice(series, predictor, tmp_path):
    _, labels, folder, _ = series["iph"]
    summary = predictor.run(folder, tmp_path)
    assert json.loads((tmp_path / "predictions.json").read_text()) == json.loads(json.dumps(summary))
    assert summary["positive_class"] == "hemorrhage" and summary["window_preset"] == "multi"
    (study,) = summary["studies"]
    assert study["study"] == "study-1" and study["input_kind"] == "dicom_series" and study["n_slices"] == SHAPE[0]
    rows = study["slices"]
    assert [r["slice_index"] for r in rows] == list(range(SHAPE[0]))
    assert [r["instance_number"] for r in rows] == list(range(1, SHAPE[0] + 1))
    np.testing.assert_allclose(np.diff([r["position_mm"] for r in rows]), 5.0)
    p = np.array([r["prob_hemorrhage"] for r in rows])
    np.testing.assert_allclose(p + np.array([r["prob_normal"] for r in rows]), 1.0, atol=1e-6)
    assert study["most_suspicious_slice"] == int(np.argmax(p))
    assert labels[study["most_suspicious_slice"]] == 1
    assert study["scores"]["max"] == pytest.approx(p.max())
    assert study["scores"]["topk_mean"] == pytest.approx(np.sort(p)[-3:].mean())
    assert study["score"] == study["scores"]["max"] and sum(study["probabilities"].values()) == pytest.approx(1.0)
    table = pd.read_csv(tmp_path / "predictions.csv")
    assert len(table) == SHAPE[0] and set(table["study"]) == {"study-1"}
    np.testing.assert_allclose(table["prob_hemorrhage"].to_numpy(), p)


def test_haemorrhage_study_scores_higher_and_only_it_gets_a_gradcam_overlay(series, tmp_path):
    predictor = make_predictor()
    scores = {k: predictor.predict_series(series[k][2])[0]["scores"]["max"] for k in ("iph", "none")}
    assert scores["iph"] > scores["none"]
    predictor.threshold = (scores["iph"] + scores["none"]) / 2
    (negative,) = predictor.run(series["none"][2], tmp_path / "none")["studies"]
    assert negative["predicted_class"] == "normal" and negative["gradcam"] == []
    assert not list((tmp_path / "none").glob("*.png"))
    (positive,) = predictor.run(series["iph"][2], tmp_path / "iph")["studies"]
    name = f"gradcam_study-1_slice{positive['most_suspicious_slice']:03d}.png"
    assert positive["predicted_class"] == "hemorrhage" and positive["gradcam"] == [name]
    assert [p.name for p in (tmp_path / "iph").glob("*.png")] == [name]
    with Image.open(tmp_path / "iph" / name) as im:
        assert im.width > 2 * im.height  # three panels side by side


def test_single_dicom_file_is_normalised_like_its_series_slice(series, predictor):
    _, _, folder, paths = series["iph"]
    series_rows = predictor.predict_series(folder)[0]["slices"]
    for z in (1, 4):
        (row,) = predictor.predict_file(paths[z])["slices"]
        assert row["prob_hemorrhage"] == pytest.approx(series_rows[z]["prob_hemorrhage"], abs=1e-6)


def test_outputs_and_logs_hold_no_patient_identifiers(series, predictor, tmp_path, caplog):
    folder = series["iph"][2]
    with caplog.at_level(logging.INFO):
        predictor.run(folder, tmp_path)
    texts = [caplog.text, (tmp_path / "predictions.json").read_text(), (tmp_path / "predictions.csv").read_text()]
    for text in texts:
        assert PATIENT_ID not in text and "SECRET" not in text and folder.name not in text


# ------------------------------------------------------------------------------------------------ bad input


def test_folder_without_a_ct_series_is_one_clear_error(tmp_path):
    from pydicom.data import get_testdata_file

    shutil.copy(get_testdata_file("MR_small.dcm"), tmp_path / "mr.dcm")
    with pytest.raises(InputError, match=r"no CT series found \(holds MR series of 1 file"):
        make_predictor().predict_path(tmp_path)
    empty = tmp_path / "notes"
    empty.mkdir()
    (empty / "readme.txt").write_text("not dicom")
    with pytest.raises(InputError, match="notes: no CT series found"):
        make_predictor().predict_path(empty)


def test_series_with_a_missing_slice_is_one_clear_error(series, tmp_path):
    folder = tmp_path / "gap"
    shutil.copytree(series["iph"][2], folder)
    (folder / series["iph"][3][4].name).unlink()
    with pytest.raises(InputError, match="missing slice"):
        make_predictor().predict_path(folder)


def test_not_an_image_is_an_error_naming_the_file(tmp_path):
    fake = tmp_path / "fake.png"
    fake.write_text("this is text")
    with pytest.raises(InputError, match="fake.png: not a readable image"):
        make_predictor("prewindowed").predict_path(fake)
    other = tmp_path / "table.csv"
    other.write_text("a,b\n")
    with pytest.raises(InputError, match="table.csv: unsupported file type"):
        make_predictor("prewindowed").predict_path(other)


def test_picture_given_to_an_hu_model_is_an_error(tmp_path):
    Image.fromarray(np.zeros((40, 50), np.uint8)).save(tmp_path / "slice.png")
    with pytest.raises(InputError, match="slice.png: not a DICOM file; this model was trained on Hounsfield units"):
        make_predictor("multi").predict_path(tmp_path / "slice.png")


def _picture(seed: int = 0) -> np.ndarray:
    """A grey 8-bit picture with a bright (blood-like, 200) blob, 90 x 120."""
    rng = np.random.default_rng(seed)
    img = rng.integers(60, 140, size=(90, 120)).astype(np.uint8)
    img[30:50, 40:70] = 200
    return img


def test_rgba_png_is_composited_over_black(tmp_path):
    grey = _picture()
    rgb = np.repeat(grey[..., None], 3, axis=2)
    alpha = np.full(grey.shape, 255, np.uint8)
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(tmp_path / "opaque.png")
    Image.fromarray(grey).save(tmp_path / "grey.png")
    alpha[:, :60] = 0
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(tmp_path / "half.png")
    np.testing.assert_allclose(load_prewindowed_2d(tmp_path / "opaque.png"), grey.T.astype(np.float32), atol=0.5)
    half = load_prewindowed_2d(tmp_path / "half.png")
    assert half.shape == (120, 90) and half[:60].max() == 0.0
    np.testing.assert_allclose(half[60:], grey.T[60:], atol=0.5)
    predictor = make_predictor("prewindowed")
    p_grey = predictor.predict_file(tmp_path / "grey.png")["score"]
    assert predictor.predict_file(tmp_path / "opaque.png")["score"] == pytest.approx(p_grey, abs=1e-4)


def test_16_bit_png_is_scaled_to_the_8_bit_range(tmp_path):
    grey = _picture()
    Image.fromarray(grey).save(tmp_path / "g8.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I")
    np.testing.assert_allclose(load_prewindowed_2d(tmp_path / "g16.png"), grey.T.astype(np.float32), atol=1e-3)
    predictor = make_predictor("prewindowed")
    p8 = predictor.predict_file(tmp_path / "g8.png")["score"]
    assert predictor.predict_file(tmp_path / "g16.png")["score"] == pytest.approx(p8, abs=1e-5)


def test_any_picture_size_gives_the_network_a_square_input(tmp_path):
    image_t, _ = _bundle_transforms("prewindowed", image_size=64)
    for shape in ((90, 120), (300, 41)):
        Image.fromarray(np.full(shape, 100, np.uint8)).save(tmp_path / "p.png")
        img = image_t({"image": str(tmp_path / "p.png")})["image"]
        assert tuple(img.shape) == (3, 64, 64)
        assert float(img.max()) == pytest.approx(100 / 255, abs=1e-6) and float(img.min()) == 0.0  # padded with 0


def test_predictor_rejects_bad_settings():
    for kw, msg in (({"aggregation": "mean"}, "aggregation"), ({"threshold": 1.0}, "threshold"),
                    ({"topk": 0}, "topk"), ({"positive_class": "bleed"}, "positive_class"),
                    ({"window_preset": "bone"}, "window_preset")):
        with pytest.raises(ValueError, match=msg):
            CTStudyPredictor(HyperdenseDetector(), ["normal", "hemorrhage"], None, None, **kw)
