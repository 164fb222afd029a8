"""SUV scaling and SUVR transforms (transforms.pet)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from skimage.filters import threshold_otsu

from transforms.pet import SUVR, SUVRd, SUVScale, SUVScaled, otsu_threshold
from tests.conftest import shared_dataset


def _slab_brain() -> torch.Tensor:
    """(1, 16, 16, 30): background 0, a 'brain' box at z 10..29 of 2.0 whose inferior 4 slices (z 10..13) are 1.0."""
    img = torch.zeros(1, 16, 16, 30)
    img[:, 3:13, 3:13, 10:30] = 2.0
    img[:, 3:13, 3:13, 10:14] = 1.0
    return img


def test_suvscale_multiplies_activity_by_factor_and_keeps_array_type():
    activity = np.array([[0.0, 5000.0], [10000.0, 2500.0]], dtype=np.float32)
    out = SUVScale(2.0e-4)(activity)
    assert isinstance(out, np.ndarray)
    np.testing.assert_allclose(out, [[0.0, 1.0], [2.0, 0.5]], rtol=1e-6)
    tensor_out = SUVScale()(torch.tensor([[5000]], dtype=torch.int16), factor=2.0e-4)
    assert tensor_out.dtype == torch.float32 and float(tensor_out) == pytest.approx(1.0)


@pytest.mark.parametrize("factor", [0.0, -1.0, float("nan"), float("inf")])
def test_suvscale_rejects_invalid_factor_in_init(factor):
    with pytest.raises(ValueError, match="finite and > 0"):
        SUVScale(factor)


def test_suvscale_without_any_factor_raises():
    with pytest.raises(ValueError, match="no SUV factor"):
        SUVScale()(np.ones(3))


def test_suvscaled_reads_factor_from_sample_and_keeps_metatensor():
    image = MetaTensor(torch.full((1, 2, 2, 2), 4000.0), affine=torch.eye(4))
    out = SUVScaled(keys="image")({"image": image, "suv_factor": np.float64(2.5e-4), "subject_id": "sub-001"})
    assert isinstance(out["image"], MetaTensor)
    assert torch.allclose(out["image"].as_tensor(), torch.ones(1, 2, 2, 2))


@pytest.mark.parametrize("sample", [{}, {"suv_factor": None}, {"suv_factor": 0.0}, {"suv_factor": float("nan")}])
def test_suvscaled_missing_or_invalid_factor_names_key_and_subject(sample):
    with pytest.raises(ValueError, match=r"suv_factor.*sub-007|sub-007.*suv_factor"):
        SUVScaled(keys="image")({"image": torch.ones(1, 2, 2, 2), "subject_id": "sub-007", **sample})


def test_otsu_threshold_matches_scikit_image():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(10, 2, 5000), rng.normal(50, 5, 3000)])
    assert otsu_threshold(values) == pytest.approx(float(threshold_otsu(values)), rel=1e-6)


def test_suvr_mask_reference_mean_becomes_one():
    img = torch.tensor([[[[2.0, 4.0], [6.0, 8.0]]]])  # (1, 1, 2, 2)
    mask = torch.tensor([[[[1, 1], [0, 0]]]])  # reference mean (2 + 4) / 2 = 3
    out = SUVR("mask")(img, mask)
    assert torch.allclose(out, img / 3.0)


def test_suvr_empty_mask_raises():
    with pytest.raises(ValueError, match="reference region is empty"):
        SUVR("mask")(torch.ones(1, 4, 4, 4), torch.zeros(1, 4, 4, 4))


def test_suvr_non_positive_reference_mean_raises():
    with pytest.raises(ValueError, match="finite and > 0"):
        SUVR("mask")(torch.zeros(1, 4, 4, 4), torch.ones(1, 4, 4, 4))


def test_suvr_mask_mode_without_mask_raises():
    with pytest.raises(ValueError, match="needs a ref_mask"):
        SUVR("mask")(torch.ones(1, 4, 4, 4))


@pytest.mark.parametrize("kwargs", [{"reference": "atlas"}, {"inferior_fraction": 0.0}, {"inferior_fraction": 1.5}])
def test_suvr_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        SUVR(**kwargs)


def test_suvr_fallback_uses_inferior_fifth_of_brain_extent():
    img = _slab_brain()
    suvr = SUVR("fallback")
    mask = suvr.fallback_mask(img)
    # Brain extent z 10..29 = 20 slices -> inferior 20 % = z 10..13, inside the brain box only.
    assert mask.sum() == 10 * 10 * 4
    assert mask[0, 3:13, 3:13, 10:14].all()
    out = suvr(img)
    assert torch.allclose(out[0, 5, 5, 10:14], torch.ones(4))
    assert torch.allclose(out[0, 5, 5, 20], torch.tensor(2.0))


def test_suvr_fallback_rejects_image_not_in_ras():
    flipped = MetaTensor(_slab_brain(), affine=torch.diag(torch.tensor([1.0, 1.0, -1.0, 1.0])))
    with pytest.raises(ValueError, match="RAS"):
        SUVR("fallback")(flipped)


def test_suvrd_with_mask_key_divides_and_stores_reference_mean():
    img = torch.arange(1.0, 9.0).reshape(1, 2, 2, 2)
    mask = torch.zeros(1, 2, 2, 2)
    mask[0, 0] = 1  # values 1, 2, 3, 4 -> mean 2.5
    out = SUVRd(keys="image", ref_mask_key="ref", ref_value_postfix="suvr_ref")({"image": img, "ref": mask})
    assert torch.allclose(out["image"], img / 2.5)
    assert out["image_suvr_ref"].tolist() == [2.5]


def test_suvrd_without_mask_key_uses_fallback():
    out = SUVRd(keys="image")({"image": _slab_brain()})
    assert torch.allclose(out["image"][0, 5, 5, 12], torch.tensor(1.0))


def test_suvrd_missing_mask_in_sample_raises():
    with pytest.raises(ValueError, match="no reference mask under key 'ref'"):
        SUVRd(keys="image", ref_mask_key="ref")({"image": torch.ones(1, 2, 2, 2), "subject_id": "sub-1"})


def test_suvrd_mask_reference_without_key_rejected_in_init():
    with pytest.raises(ValueError, match="needs ref_mask_key"):
        SUVRd(keys="image", reference="mask")


@pytest.mark.realdata
@pytest.mark.parametrize("name", ["subjA_florbetapir_pet.nii.gz", "subjB_amyloid_pet.nii.gz"])
def test_suvr_fallback_on_real_amyloid_pet_is_plausible(name):
    nifti = nib.as_closest_canonical(nib.load(shared_dataset("pet_amyloid_nifti_gaain_centiloid") / name))
    assert nib.aff2axcodes(nifti.affine) == ("R", "A", "S")
    img = MetaTensor(torch.as_tensor(np.asarray(nifti.dataobj, dtype=np.float32))[None],
                     affine=torch.as_tensor(nifti.affine))
    suvr = SUVR("fallback")
    reference = suvr.fallback_mask(img)
    out = suvr(img)
    assert float(out[reference].mean()) == pytest.approx(1.0, rel=1e-5)
    # Cortex proxy: the superior half of the Otsu head mask (mostly cerebral cortex and WM).
    head = img > otsu_threshold(img)
    slices = torch.nonzero(head[0].any(dim=0).any(dim=0)).flatten()
    superior = head.clone()
    superior[..., : int(slices[0] + (slices[-1] - slices[0] + 1) // 2)] = False
    ratio = float(out[superior].mean())
    print(f"{name}: reference voxels {int(reference.sum())}, reference mean {float(img[reference].mean()):.1f} Bq/ml, "
          f"superior/reference SUVR {ratio:.3f}")
    # Amyloid PET SUVR (cortex / cerebellum) lies in about 0.9 .. 2.5; the source repo reports 1.32 for subjA.
    assert 0.8 < ratio < 2.5
