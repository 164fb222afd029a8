"""Tests for transforms.slicing (3D -> 2D / 2.5D slice extraction)."""

from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd, Spacingd

from transforms.slicing import ExtractSlices, ExtractSlicesd


def _box_volume(shape=(10, 12, 14), box=((2, 8), (3, 9), (4, 11)), channels=1) -> np.ndarray:
    vol = np.zeros((channels, *shape), dtype=np.float32)
    (x0, x1), (y0, y1), (z0, z1) = box
    vol[:, x0:x1, y0:y1, z0:z1] = 1.0
    return vol


def _index_volume(shape=(4, 5, 6), channels=2, axis=2) -> np.ndarray:
    """Voxel value = 100 * channel + index along ``axis`` (every voxel is foreground)."""
    idx = np.arange(shape[axis], dtype=np.float32) + 1.0
    view = [1, 1, 1]
    view[axis] = shape[axis]
    vol = np.broadcast_to(idx.reshape(view), shape)
    return np.stack([vol + 100.0 * c for c in range(channels)]).astype(np.float32)


@pytest.mark.parametrize(
    ("axis", "expected_shape"),
    [
        ("sagittal", (6, 1, 12, 14)),
        ("coronal", (6, 1, 10, 14)),
        ("axial", (7, 1, 10, 12)),
        (0, (6, 1, 12, 14)),
        (2, (7, 1, 10, 12)),
    ],
)
def test_slice_shapes_keep_other_axes_in_order(axis, expected_shape):
    slices, indices = ExtractSlices(axis=axis)(_box_volume())
    assert tuple(slices.shape) == expected_shape
    assert slices.dtype == torch.float32
    assert indices.dtype == torch.long
    assert len(indices) == expected_shape[0]


def test_axial_slice_content_matches_volume_plane():
    vol = np.random.default_rng(0).random((2, 5, 6, 7)).astype(np.float32)
    slices, indices = ExtractSlices(axis="axial", min_foreground=0.0)(vol)
    assert indices.tolist() == list(range(7))
    np.testing.assert_array_equal(slices[3].numpy(), vol[:, :, :, 3])


def test_indices_increasing_and_empty_slices_skipped():
    slices, indices = ExtractSlices(axis="axial")(torch.as_tensor(_box_volume()))
    assert indices.tolist() == [4, 5, 6, 7, 8, 9, 10]
    assert float(slices.sum()) == 7 * 6 * 6


def test_min_foreground_fraction_threshold_is_inclusive():
    vol = np.zeros((1, 10, 10, 3), dtype=np.float32)
    vol[0, :5, :2, 0] = 1.0  # 10 % of the slice
    vol[0, :5, :1, 1] = 1.0  # 5 % of the slice
    vol[0, :1, :1, 2] = 1.0  # 1 % of the slice
    assert ExtractSlices(min_foreground=0.05, foreground_threshold=0.5)(vol)[1].tolist() == [0, 1]
    assert ExtractSlices(min_foreground=0.1, foreground_threshold=0.5)(vol)[1].tolist() == [0]


def test_default_threshold_ignores_low_background_noise():
    rng = np.random.default_rng(1)
    vol = rng.uniform(0.0, 20.0, size=(1, 16, 16, 12)).astype(np.float32)  # background noise
    vol[0, 4:12, 4:12, 3:9] = 1000.0 + rng.uniform(0, 50, size=(8, 8, 6))  # "brain"
    _, indices = ExtractSlices(axis="axial")(vol)
    assert indices.tolist() == [3, 4, 5, 6, 7, 8]


def test_default_threshold_handles_negative_ct_background():
    vol = np.full((1, 16, 16, 10), -1024.0, dtype=np.float32)
    vol[0, 3:13, 3:13, 2:7] = 40.0  # soft tissue
    vol[0, 3:13, 3:4, 2:7] = 1500.0  # bone rim
    _, indices = ExtractSlices(axis="axial")(vol)
    assert indices.tolist() == [2, 3, 4, 5, 6]


def test_mask_defines_foreground_instead_of_intensity():
    vol = np.ones((1, 8, 8, 10), dtype=np.float32)  # every voxel bright
    mask = np.zeros((8, 8, 10), dtype=np.uint8)
    mask[2:6, 2:6, 3:5] = 1
    _, indices = ExtractSlices(axis="axial")(vol, mask=mask)
    assert indices.tolist() == [3, 4]


def test_num_slices_contiguous_around_foreground_centre_of_mass():
    vol = np.zeros((1, 10, 10, 20), dtype=np.float32)
    vol[0, 2:8, 2:8, 2:16] = 1.0  # kept slices 2..15
    vol[0, 0:10, 0:10, 12:16] = 1.0  # heavier top: centre of mass moves above the middle (8.5)
    _, indices = ExtractSlices(axis="axial", num_slices=4)(vol)
    counts = np.array([36] * 10 + [100] * 4, dtype=float)
    centre = float((np.arange(2, 16) * counts).sum() / counts.sum())
    assert indices.tolist() == [9, 10, 11, 12]
    assert abs(np.mean(indices.tolist()) - centre) <= 0.5


def test_num_slices_more_than_available_returns_all_with_warning():
    with pytest.warns(UserWarning, match="fewer than num_slices=20"):
        _, indices = ExtractSlices(axis="axial", num_slices=20)(_box_volume())
    assert indices.tolist() == list(range(4, 11))


def test_percent_range_restricts_before_num_slices():
    vol = np.ones((1, 4, 4, 11), dtype=np.float32)  # positions 0, 10, ..., 100 %
    _, indices = ExtractSlices(axis="axial", slice_range=(20, 50), min_foreground=0.0)(vol)
    assert indices.tolist() == [2, 3, 4, 5]
    _, indices = ExtractSlices(axis="axial", slice_range=(20, 50), num_slices=2, min_foreground=0.0)(vol)
    assert indices.tolist() == [3, 4]


def test_index_range_is_inclusive():
    _, indices = ExtractSlices(axis="axial", slice_range=(5, 7), range_unit="index")(_box_volume())
    assert indices.tolist() == [5, 6, 7]


def test_mm_range_uses_affine_spacing():
    affine = torch.diag(torch.tensor([1.0, 1.0, 2.5, 1.0]))
    img = MetaTensor(torch.ones(1, 4, 4, 20), affine=affine)
    _, indices = ExtractSlices(axis="axial", slice_range=(10.0, 20.0), range_unit="mm", min_foreground=0.0)(img)
    assert indices.tolist() == [4, 5, 6, 7, 8]


def test_mm_range_uses_column_norm_of_oblique_affine():
    rot = np.array([[0.0, -1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]) * np.array([1.0, 1.0, 3.0])  # z column 3 mm
    affine = np.eye(4)
    affine[:3, :3] = rot
    img = MetaTensor(torch.ones(1, 4, 4, 10), affine=torch.as_tensor(affine))
    _, indices = ExtractSlices(axis=2, slice_range=(0.0, 6.0), range_unit="mm", min_foreground=0.0)(img)
    assert indices.tolist() == [0, 1, 2]


def test_mm_range_without_spacing_raises():
    with pytest.raises(ValueError, match="mm needs the voxel spacing"):
        ExtractSlices(slice_range=(0, 10), range_unit="mm")(np.ones((1, 4, 4, 6), dtype=np.float32))


def test_context_channel_order_is_offset_major_then_input_channel():
    vol = _index_volume(shape=(4, 5, 6), channels=2, axis=2)  # value = 100 * c + z + 1
    slices, indices = ExtractSlices(axis="axial", context=1, min_foreground=0.0)(vol)
    assert tuple(slices.shape) == (6, 6, 4, 5)
    z = 3
    expected = [z - 1 + 1, 100 + z - 1 + 1, z + 1, 100 + z + 1, z + 1 + 1, 100 + z + 1 + 1]
    assert slices[z, :, 0, 0].tolist() == expected


def test_context_clamps_at_volume_edges():
    vol = _index_volume(shape=(3, 3, 5), channels=1, axis=2)  # value = z + 1
    slices, _ = ExtractSlices(axis="axial", context=2, min_foreground=0.0)(vol)
    assert slices[0, :, 0, 0].tolist() == [1, 1, 1, 2, 3]
    assert slices[4, :, 0, 0].tolist() == [3, 4, 5, 5, 5]


def test_context_neighbours_may_be_dropped_slices():
    vol = _box_volume(box=((0, 10), (0, 12), (5, 6)))  # only slice 5 is kept
    slices, indices = ExtractSlices(axis="axial", context=1)(vol)
    assert indices.tolist() == [5]
    assert [float(slices[0, c].sum()) for c in range(3)] == [0.0, 120.0, 0.0]


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 4, 4, 4, 2), (8, 8)])
def test_non_3d_input_raises_with_shape_and_filename(shape):
    img = MetaTensor(torch.zeros(shape), meta={"filename_or_obj": "/data/sub-01_T1w.nii.gz"})
    with pytest.raises(ValueError, match=r"sub-01_T1w\.nii\.gz: expected a 3D volume \(C, X, Y, Z\), got shape"):
        ExtractSlices()(img)


def test_nan_volume_raises_naming_file():
    vol = torch.ones(1, 4, 4, 4)
    vol[0, 1, 1, 1] = float("nan")
    img = MetaTensor(vol, meta={"filename_or_obj": "scan_nan.nii.gz"})
    with pytest.raises(ValueError, match=r"scan_nan\.nii\.gz: volume contains non-finite values \(1 NaN"):
        ExtractSlices()(img)


def test_empty_volume_raises_naming_file_and_reason():
    img = MetaTensor(torch.zeros(1, 4, 4, 4), meta={"filename_or_obj": "empty.nii"})
    with pytest.raises(ValueError, match=r"empty\.nii: no slice kept along axis 2: the volume is constant"):
        ExtractSlices()(img)


def test_all_slices_below_min_foreground_reports_best_slice():
    vol = np.zeros((1, 10, 10, 4), dtype=np.float32)
    vol[0, 0, 0, 2] = 1.0  # 1 % foreground in slice 2
    expected = r"below min_foreground=0\.05 \(best: slice 2 with foreground fraction 0\.0100\)"
    with pytest.raises(ValueError, match=expected):
        ExtractSlices(foreground_threshold=0.5)(vol)


def test_empty_mask_raises():
    with pytest.raises(ValueError, match="the mask is empty"):
        ExtractSlices()(np.ones((1, 4, 4, 4), dtype=np.float32), mask=np.zeros((4, 4, 4)))


def test_mask_shape_mismatch_raises():
    with pytest.raises(ValueError, match="mask shape"):
        ExtractSlices()(np.ones((1, 4, 4, 4), dtype=np.float32), mask=np.ones((4, 4, 5)))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"axis": "transverse"},
        {"axis": 3},
        {"num_slices": 0},
        {"slice_range": (50, 10)},
        {"slice_range": (-5, 10)},
        {"slice_range": (0, 120)},
        {"range_unit": "cm"},
        {"min_foreground": 1.5},
        {"context": -1},
    ],
)
def test_bad_constructor_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        ExtractSlices(**kwargs)


def test_dict_twin_one_dict_per_slice_with_meta_and_copied_keys():
    img = MetaTensor(torch.as_tensor(_box_volume()), meta={"filename_or_obj": "sub-02.nii.gz"})
    data = {"image": img, "label": 3, "subject_id": "sub-02", "extra": {"site": "A"}}
    out = ExtractSlicesd(keys="image", axis="axial", num_slices=3)(data)
    assert [d["slice_index"] for d in out] == [6, 7, 8]
    for d in out:
        assert isinstance(d["image"], MetaTensor)
        assert tuple(d["image"].shape) == (1, 10, 12)
        assert d["image"].meta["slice_index"] == d["slice_index"]
        assert d["image"].meta["slice_axis"] == 2
        assert d["image"].meta["filename_or_obj"] == "sub-02.nii.gz"
        assert (d["label"], d["subject_id"], d["extra"]) == (3, "sub-02", {"site": "A"})
    assert out[0]["extra"] is not out[1]["extra"]  # deep-copied, not shared


def test_dict_twin_uses_mask_key_and_slices_all_keys_alike():
    vol = torch.ones(1, 6, 6, 8)
    seg = _index_volume(shape=(6, 6, 8), channels=1, axis=2)
    mask = torch.zeros(1, 6, 6, 8)
    mask[:, :, :, 2:4] = 1
    out = ExtractSlicesd(keys=["image", "seg"], mask_key="brain", slice_index_key="z")(
        {"image": vol, "seg": seg, "brain": mask}
    )
    assert [d["z"] for d in out] == [2, 3]
    assert [float(d["seg"][0, 0, 0]) for d in out] == [3.0, 4.0]
    assert tuple(out[0]["brain"].shape) == (1, 6, 6, 8)


def test_dict_twin_missing_key_behaviour():
    with pytest.raises(KeyError):
        ExtractSlicesd(keys="image")({"label": 1})
    assert ExtractSlicesd(keys="image", allow_missing_keys=True)({"label": 1}) == [{"label": 1}]


def test_nifti_non_ras_pipeline_gives_axial_slices_inferior_to_superior(tmp_path):
    # Stored axes: i -> superior-to-inferior (2 mm), j -> right-to-left (1 mm), k -> posterior-to-anterior (1.5 mm)
    affine = np.array(
        [[0.0, -1.0, 0.0, 10.0], [0.0, 0.0, 1.5, -5.0], [-2.0, 0.0, 0.0, 20.0], [0.0, 0.0, 0.0, 1.0]]
    )
    n_i, n_j, n_k = 5, 7, 9
    data = np.zeros((n_i, n_j, n_k), dtype=np.float32)
    for i in range(n_i):
        data[i] = 10.0 * (n_i - i)  # brighter towards superior: value rises with world z
    data[0, 2:5, 3:6] = 500.0  # marker in the most superior stored slice (i = 0, world z = 20 mm)
    path = tmp_path / "sub-03_T1w.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(path))

    pipeline = Compose(
        [
            LoadImaged("image", reader="NibabelReader"),
            EnsureChannelFirstd("image"),
            Orientationd("image", axcodes="RAS"),
            Spacingd("image", pixdim=(1.0, 1.0, 2.0), mode="nearest"),
            ExtractSlicesd("image", axis="axial", min_foreground=0.0),
        ]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = pipeline({"image": str(path), "subject_id": "sub-03"})

    assert [d["slice_index"] for d in out] == [0, 1, 2, 3, 4]
    x_len, y_len = out[0]["image"].shape[1:]
    assert (x_len, y_len) == (n_j, 13)  # RAS x from j (7 x 1 mm); y from k resampled 1.5 -> 1 mm: 8 * 1.5 + 1
    base = [float(d["image"][0].min()) for d in out]
    assert base == [10.0, 20.0, 30.0, 40.0, 50.0]  # inferior (index 0) to superior
    marker_slices = [d["slice_index"] for d in out if float(d["image"].max()) == 500.0]
    assert marker_slices == [4]
    assert out[4]["image"].meta["filename_or_obj"].endswith("sub-03_T1w.nii.gz")
    assert all(d["subject_id"] == "sub-03" for d in out)
