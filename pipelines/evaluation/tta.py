"""Test-time augmentation (TTA): average softmax probabilities over flipped and cropped views of 2-D images."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from pipelines.evaluation.metrics import classification_metrics, labels_to_indices

__all__ = ["TTA_POLICIES", "tta_views", "tta_predict", "run_tta_table", "model_logits"]

TTA_POLICIES = ("none", "hflip", "5crop", "hflip+5crop")


def model_logits(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Run a classifier and return its (N, C) logits."""
    out = model(images)
    # MONAI's ViT returns (logits, hidden_states); project networks return the logits tensor alone.
    if isinstance(out, (tuple, list)):
        out = out[0]
    if hasattr(out, "as_tensor"):
        out = out.as_tensor()
    return out


def tta_views(
    images: torch.Tensor, policy: str, crop_fraction: float = 0.875, flip_dim: int = -1
) -> list[torch.Tensor]:
    """The augmented views of a batch, each with the batch's shape.

    Args:
        images: (N, C, H, W) batch.
        policy: one of ``none`` (1 view), ``hflip`` (original + mirror, 2), ``5crop`` (four corner crops and the
            centre crop, each ``crop_fraction`` of H and W and resized back to (H, W) bilinearly, 5),
            ``hflip+5crop`` (the five crops and their mirrors, 10).
        crop_fraction: side of each crop as a fraction of the image side, in (0, 1].
        flip_dim: tensor axis mirrored by ``hflip``: -1 (width) for row-major (H, W) arrays; images read by MONAI's
            ``LoadImage`` put the first spatial axis along x (left-right for RAS NIfTI, width for PIL), so use -2
            there to mirror left-right.

    Returns:
        List of views.
    """
    if policy not in TTA_POLICIES:
        raise ValueError(f"unknown TTA policy {policy!r}; expected one of {TTA_POLICIES}")
    if not 0.0 < float(crop_fraction) <= 1.0:
        raise ValueError(f"crop_fraction must lie in (0, 1], got {crop_fraction}")
    if images.ndim != 4:
        raise ValueError(f"TTA expects a (N, C, H, W) batch, got shape {tuple(images.shape)}")
    if flip_dim not in (-1, -2, 2, 3):
        raise ValueError(f"flip_dim must be a spatial axis (-1, -2, 2 or 3), got {flip_dim}")
    if policy == "none":
        return [images]
    if policy == "hflip":
        return [images, torch.flip(images, dims=(flip_dim,))]
    crops = _five_crops(images, crop_fraction)
    if policy == "5crop":
        return crops
    return crops + [torch.flip(c, dims=(flip_dim,)) for c in crops]


@torch.no_grad()
def tta_predict(
    model: torch.nn.Module,
    images: torch.Tensor,
    policy: str = "none",
    crop_fraction: float = 0.875,
    flip_dim: int = -1,
) -> torch.Tensor:
    """Softmax probabilities averaged over the TTA views of ``policy`` (see :func:`tta_views`).

    The model is run in eval mode (its training flag is restored afterwards).

    Returns:
        (N, C) probabilities, each row summing to 1, on the images' device.
    """
    views = tta_views(images, policy, crop_fraction, flip_dim)
    was_training = model.training
    model.eval()
    try:
        total = None
        for view in views:
            probs = torch.softmax(model_logits(model, view).float(), dim=1)
            total = probs if total is None else total + probs
    finally:
        model.train(was_training)
    return total / len(views)


def run_tta_table(
    model: torch.nn.Module,
    dataloader: Iterable[dict[str, Any]],
    class_names: Sequence[str],
    policies: Sequence[str] = TTA_POLICIES,
    device: str | torch.device = "cpu",
    crop_fraction: float = 0.875,
    flip_dim: int = -1,
    image_key: str = "image",
    label_key: str = "label",
) -> pd.DataFrame:
    """Accuracy, macro F1, macro AUC and inference time of every TTA policy on one data set.

    Args:
        model: classifier returning (N, C) logits.
        dataloader: yields dicts with ``image`` (N, C, H, W) and ``label`` (indices or one-hot); iterated once per
            policy, so it must be re-iterable and deterministic (no random transforms).
        class_names: C class names.
        policies: subset of :data:`TTA_POLICIES`.
        device: where the model and images run.
        crop_fraction: crop side fraction for the crop policies.
        flip_dim: mirrored axis, see :func:`tta_views`.

    Returns:
        DataFrame with columns ``policy``, ``n_views``, ``accuracy``, ``macro_f1``, ``macro_auc``,
        ``ms_per_image`` (wall time of the forward passes per image, in milliseconds).
    """
    for policy in policies:
        if policy not in TTA_POLICIES:
            raise ValueError(f"unknown TTA policy {policy!r}; expected one of {TTA_POLICIES}")
    device = torch.device(device)
    model = model.to(device)
    rows = []
    for policy in policies:
        probs, labels, elapsed = [], [], 0.0
        for batch in dataloader:
            images = torch.as_tensor(batch[image_key]).to(device)
            if hasattr(images, "as_tensor"):
                images = images.as_tensor()
            _sync(device)
            start = time.perf_counter()
            p = tta_predict(model, images, policy, crop_fraction, flip_dim)
            _sync(device)
            elapsed += time.perf_counter() - start
            probs.append(p.cpu().numpy())
            labels.append(labels_to_indices(batch[label_key], len(class_names)))
        if not probs:
            raise ValueError("the TTA dataloader yielded no batches")
        p_all, y_all = np.concatenate(probs), np.concatenate(labels)
        m = classification_metrics(y_all, p_all, class_names)
        rows.append({
            "policy": policy,
            "n_views": len(tta_views(torch.zeros(1, 1, 2, 2), policy)),
            "accuracy": m["accuracy"],
            "macro_f1": m["macro_f1"],
            "macro_auc": m["macro_auc"],
            "ms_per_image": 1000.0 * elapsed / len(y_all),
        })
    return pd.DataFrame(rows, columns=["policy", "n_views", "accuracy", "macro_f1", "macro_auc", "ms_per_image"])


def _five_crops(images: torch.Tensor, crop_fraction: float) -> list[torch.Tensor]:
    h, w = images.shape[-2:]
    ch, cw = max(1, round(h * crop_fraction)), max(1, round(w * crop_fraction))
    top, left = (h - ch) // 2, (w - cw) // 2
    origins = ((0, 0), (0, w - cw), (h - ch, 0), (h - ch, w - cw), (top, left))
    crops = []
    for y0, x0 in origins:
        crop = images[..., y0 : y0 + ch, x0 : x0 + cw]
        if (ch, cw) != (h, w):
            crop = F.interpolate(crop.float(), size=(h, w), mode="bilinear", align_corners=False)
        crops.append(crop)
    return crops


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
