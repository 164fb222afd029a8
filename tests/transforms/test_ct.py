"""Tests for transforms.ct: HU rescale, CT windows, multi-window channels, 2.5D slice context."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import torch
from monai.data import MetaTensor
from pydicom.pixels import apply_rescale

from tests.conftest import shared_dataset
from transforms.ct import (
    CT_WINDOW_PRESETS,
    AdjacentSliceContext,
    AdjacentSliceContextd,
    MultiWindowCT,
    MultiWindowCTd,
    ToHU,
    ToHUd,
    WindowCT,
    WindowCTd,
    slice_with_context,
)

# ---------------------------------------------------------------- WindowCT


def test_brain_window_maps_air_to_zero_and_80_hu_to_one():
    out = WindowCT(40, 80)(np.array([-1000.0, 80.0]))
    np.testing.assert_array_equal(out, [0.0, 1.0])


def test_window_level_maps_to_half_and_lower_edge_to_zero():
    out = WindowCT(40, 80)(np.array([40.0, 0.0, 20.0]))
    np.testing.assert_allclose(out, [0.5, 0.0, 0.25])


def test_window_clips_values_outside_the_window():
    out = WindowCT(40, 80)(np.array([-1000.0, 1500.0]))
    np.testing.assert_array_equal(out, [0.0, 1.0])


def test_window_without_clip_stays_linear():
    out = WindowCT(40, 80, clip=False)(np.array([-1000.0, 120.0]))
    np.testing.assert_allclose(out, [-12.5, 1.5])


@pytest.mark.parametrize("width", [0.0, -80.0, float("nan")])
def test_window_rejects_non_positive_width(width):
    with pytest.raises(ValueError, match="width"):
        WindowCT(40, width)


def test_window_int16_input_gives_float32():
    out = WindowCT(40, 80)(np.array([[-1000, 40]], dtype=np.int16))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, [[0.0, 0.5]])


def test_window_keeps_metatensor_meta_and_matches_numpy():
    hu = np.array([[[-1000.0, 0.0], [40.0, 300.0]]], dtype=np.float32)
    img = MetaTensor(torch.from_numpy(hu), meta={"subject_id": "s1"})
    out = WindowCT(40, 80)(img)
    assert isinstance(out, MetaTensor)
    assert out.meta["subject_id"] == "s1"
    np.testing.assert_array_equal(out.numpy(), WindowCT(40, 80)(hu))


def test_window_dict_twin_windows_only_its_keys():
    data = {"image": np.array([40.0]), "label": 1, "subject_id": "s1"}
    out = WindowCTd("image", 40, 80)(data)
    np.testing.assert_array_equal(out["image"], [0.5])
    assert out["label"] == 1 and out["subject_id"] == "s1"


# ---------------------------------------------------------------- ToHU


def test_to_hu_applies_slope_and_intercept():
    raw = np.array([0, 1024, 2048], dtype=np.uint16)
    np.testing.assert_array_equal(ToHU(1.0, -1024.0)(raw), [-1024.0, 0.0, 1024.0])
    np.testing.assert_array_equal(ToHU(2.0, -1024.0)(raw), [-1024.0, 1024.0, 3072.0])


def test_to_hu_passes_through_data_already_in_hu():
    hu = torch.tensor([-1000, 40, 1000], dtype=torch.int16)
    assert ToHU(dtype=None)(hu) is hu
    out = ToHU()(hu)
    assert out.dtype == torch.float32
    assert out.tolist() == [-1000.0, 40.0, 1000.0]


def test_to_hu_rejects_zero_slope():
    with pytest.raises(ValueError, match="slope"):
        ToHU(slope=0.0)


def test_to_hu_keeps_metatensor_meta():
    img = MetaTensor(torch.tensor([[0, 1064]], dtype=torch.int16), meta={"filename_or_obj": "x.dcm"})
    out = ToHU(1.0, -1024.0)(img)
    assert isinstance(out, MetaTensor) and out.meta["filename_or_obj"] == "x.dcm"
    assert out.tolist() == [[-1024.0, 40.0]]


def test_to_hud_reads_per_sample_slope_and_intercept_from_dict():
    data = {
        "image": np.array([[0, 1064]], dtype=np.uint16),
        "rescale_slope": "1",  # DICOM DS strings are accepted
        "rescale_intercept": torch.tensor([-1024.0]),
        "label": 0,
    }
    out = ToHUd("image", slope_key="rescale_slope", intercept_key="rescale_intercept")(data)
    np.testing.assert_array_equal(out["image"], [[-1024.0, 40.0]])
    assert out["label"] == 0 and out["rescale_slope"] == "1"


def test_to_hud_reads_intercept_from_image_meta():
    img = MetaTensor(torch.tensor([[24, 1024]]), meta={"rescale_intercept": -24.0})
    out = ToHUd("image", intercept_key="rescale_intercept")({"image": img})
    assert out["image"].tolist() == [[0.0, 1000.0]]


def test_to_hud_missing_rescale_key_raises_naming_it():
    with pytest.raises(ValueError, match="rescale_intercept"):
        ToHUd("image", intercept_key="rescale_intercept")({"image": np.zeros((1, 2))})


def test_to_hu_real_ct_slice_matches_hand_computation():
    path = shared_dataset("dicom_samples_misc") / "CT_head_slice_barre.dcm"
    ds = pydicom.dcmread(path)
    raw = ds.pixel_array
    slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    hu = ToHU(slope, intercept)(raw[None])[0]
    for y, x in [(0, 0), (256, 256), (100, 300), (400, 120)]:
        assert hu[y, x] == pytest.approx(float(raw[y, x]) * slope + intercept)
    np.testing.assert_array_equal(hu, apply_rescale(raw, ds))
    assert hu.min() == pytest.approx(-1057.0)
    assert (hu < -900).mean() > 0.1  # air around the head
    assert (hu > 500).sum() > 1000  # skull
    brain = WindowCT(*CT_WINDOW_PRESETS["brain"])(hu)
    assert brain[hu < -900].max() == 0.0 and brain[hu > 500].min() == 1.0


def test_to_hud_on_real_series_slice_with_intercept_matches_pydicom():
    folder = shared_dataset("dicom_samples_misc") / "monai_ct_head_4slice_16px"
    ds = pydicom.dcmread(sorted(folder.iterdir())[0])
    data = {"image": ds.pixel_array[None], "slope": ds.RescaleSlope, "intercept": ds.RescaleIntercept}
    out = ToHUd("image", slope_key="slope", intercept_key="intercept")(data)
    assert float(ds.RescaleIntercept) == -1024.0
    np.testing.assert_array_equal(out["image"][0], apply_rescale(ds.pixel_array, ds))


# ---------------------------------------------------------------- MultiWindowCT

HU_PROBE = np.array([[[40.0, 80.0, 600.0, -1000.0]]], dtype=np.float32)  # (1, 1, 4)


def test_multiwindow_default_channel_order_is_brain_subdural_bone():
    out = MultiWindowCT()(HU_PROBE)
    assert out.shape == (3, 1, 4)
    np.testing.assert_allclose(out[0, 0], [0.5, 1.0, 1.0, 0.0])  # brain 40/80
    np.testing.assert_allclose(out[1, 0], [0.3, 0.5, 1.0, 0.0])  # subdural 80/200
    np.testing.assert_allclose(out[2, 0], [840 / 2800, 880 / 2800, 0.5, 0.0], rtol=1e-6)  # bone 600/2800


def test_multiwindow_follows_the_given_order_and_custom_pairs():
    out = MultiWindowCT(windows=("bone", (0.0, 100.0), "stroke"))(HU_PROBE)
    np.testing.assert_allclose(out[0], MultiWindowCT(("bone",))(HU_PROBE)[0])
    np.testing.assert_allclose(out[1, 0], [0.9, 1.0, 1.0, 0.0])  # (-50, 50) window
    np.testing.assert_allclose(out[2, 0], [0.5, 1.0, 1.0, 0.0])  # stroke 40/40


def test_multiwindow_volume_shape_and_torch_meta():
    img = MetaTensor(torch.zeros(1, 8, 6, 5), meta={"subject_id": "s2"})
    out = MultiWindowCT()(img)
    assert tuple(out.shape) == (3, 8, 6, 5)
    assert isinstance(out, MetaTensor) and out.meta["subject_id"] == "s2"
    np.testing.assert_allclose(out[:, 0, 0, 0].numpy(), [0.0, 0.1, 800 / 2800], rtol=1e-6)


def test_multiwindow_unknown_preset_lists_the_presets():
    with pytest.raises(ValueError, match="brain.*subdural.*bone.*stroke.*soft_tissue.*prewindowed"):
        MultiWindowCT(windows=("brain", "lung"))


def test_multiwindow_rejects_bad_custom_width():
    with pytest.raises(ValueError, match="width"):
        MultiWindowCT(windows=((40, 0),))


def test_multiwindow_rejects_multichannel_hu_input():
    with pytest.raises(ValueError, match="one-channel"):
        MultiWindowCT()(np.zeros((2, 4, 4)))


def test_prewindowed_scales_8bit_and_repeats_to_channel_count():
    rgb = np.zeros((3, 1, 3), dtype=np.uint8)
    rgb[:, 0] = [0, 255, 51]
    out = MultiWindowCT(windows=("prewindowed",) * 3)(rgb)
    assert out.shape == (3, 1, 3) and out.dtype == np.float32
    for c in range(3):
        np.testing.assert_allclose(out[c, 0], [0.0, 1.0, 0.2])
    grey = torch.tensor([[[0, 255, 51]]], dtype=torch.uint8)
    out1 = MultiWindowCT(windows=("prewindowed",) * 2)(grey)
    assert tuple(out1.shape) == (2, 1, 3)
    np.testing.assert_allclose(out1[1, 0].numpy(), [0.0, 1.0, 0.2])


def test_prewindowed_cannot_be_mixed_with_hu_windows():
    with pytest.raises(ValueError, match="prewindowed"):
        MultiWindowCT(windows=("prewindowed", "brain"))


def test_multiwindow_dict_twin_keeps_other_keys():
    data = {"image": HU_PROBE, "label": 1, "subject_id": "s3", "slice_index": 7}
    out = MultiWindowCTd("image")(data)
    assert out["image"].shape == (3, 1, 4)
    assert (out["label"], out["subject_id"], out["slice_index"]) == (1, "s3", 7)
    assert data["image"] is HU_PROBE  # the input dict is not modified


# ---------------------------------------------------------------- AdjacentSliceContext


def _coded_volume(channels: int = 2, depth: int = 5) -> np.ndarray:
    """(C, 3, 4, D) volume whose value is 10 * slice + channel."""
    z = np.arange(depth)[None, None, None, :]
    c = np.arange(channels)[:, None, None, None]
    return np.broadcast_to(10 * z + c, (channels, 3, 4, depth)).astype(np.float32).copy()


def test_context_output_shape_is_channels_times_window():
    vol = _coded_volume(2, 5)
    assert AdjacentSliceContext(1)(vol).shape == (6, 3, 4, 5)
    assert AdjacentSliceContext(2)(vol).shape == (10, 3, 4, 5)
    assert AdjacentSliceContext(0)(vol).shape == (2, 3, 4, 5)


def test_context_channel_order_is_offset_major_then_input_channel():
    out = AdjacentSliceContext(1)(_coded_volume(2, 5))
    np.testing.assert_array_equal(out[:, 0, 0, 3], [20, 21, 30, 31, 40, 41])


def test_context_edge_slices_repeat_the_border_slice():
    out = AdjacentSliceContext(2)(_coded_volume(1, 4))
    np.testing.assert_array_equal(out[:, 0, 0, 0], [0, 0, 0, 10, 20])
    np.testing.assert_array_equal(out[:, 0, 0, 3], [10, 20, 30, 30, 30])


def test_single_index_helper_matches_full_transform():
    vol = _coded_volume(2, 5)
    full = AdjacentSliceContext(1)(vol)
    for z in range(5):
        np.testing.assert_array_equal(slice_with_context(vol, z, 1), full[..., z])
    assert AdjacentSliceContext(1).slice_at(vol, 0).shape == (6, 3, 4)


def test_context_on_metatensor_keeps_meta_and_matches_numpy():
    vol = _coded_volume(1, 4)
    img = MetaTensor(torch.from_numpy(vol), meta={"subject_id": "s4"})
    out = AdjacentSliceContext(1)(img)
    assert isinstance(out, MetaTensor) and out.meta["subject_id"] == "s4"
    np.testing.assert_array_equal(out.numpy(), AdjacentSliceContext(1)(vol))
    one = slice_with_context(img, -1, 1)
    np.testing.assert_array_equal(one[:, 0, 0].numpy(), [20, 30, 30])


def test_context_along_another_spatial_axis():
    vol = np.arange(3)[None, :, None, None] * np.ones((1, 3, 2, 2))
    out = AdjacentSliceContext(1, axis=1)(vol)
    assert out.shape == (3, 3, 2, 2)
    np.testing.assert_array_equal(out[:, 0, 0, 0], [0, 0, 1])


def test_context_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_adjacent"):
        AdjacentSliceContext(-1)
    with pytest.raises(ValueError, match="channel axis"):
        AdjacentSliceContext(1, axis=0)
    with pytest.raises(ValueError, match="outside"):
        slice_with_context(_coded_volume(1, 4), 4, 1)


def test_context_dict_twin_keeps_other_keys():
    out = AdjacentSliceContextd("image", num_adjacent=1)({"image": _coded_volume(1, 4), "label": 1})
    assert out["image"].shape == (3, 3, 4, 4) and out["label"] == 1
