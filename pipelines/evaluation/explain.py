"""Explanation maps: attention rollout for transformer classifiers, Grad-CAM for CNNs, and PNG overlays.

References:
    Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020 (attention rollout).
    Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based Localization",
    ICCV 2017.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from monai.visualize import GradCAM  # noqa: E402

from pipelines.evaluation.metrics import labels_to_indices, to_numpy  # noqa: E402
from pipelines.evaluation.report import atomic_save_figure  # noqa: E402
from pipelines.evaluation.tta import model_logits  # noqa: E402

__all__ = ["attention_rollout", "grad_cam", "last_conv_layer", "save_overlay", "explain_examples"]

EXPLAIN_METHODS = ("auto", "rollout", "gradcam")


@torch.no_grad()
def attention_rollout(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Attention rollout of the [CLS] token over the patch grid, upsampled to the image size.

    Per block the head-averaged attention A gets the residual path added (A + I) and rows renormalised; the
    blocks are multiplied from first to last, and the [CLS] row restricted to the grid tokens is the map.

    Args:
        model: a classifier with ``blocks`` (sequence of MONAI ``TransformerBlock`` built with ``save_attn=True``,
            whose ``attn.att_mat`` is (N, heads, T, T) after a forward), ``feature_grid`` = (h, w) token grid and
            optionally ``num_prefix_tokens`` (default 1: [CLS] first; grid tokens follow in row-major order).
        images: (N, C, H, W) batch on the model's device.

    Returns:
        (N, 1, H, W) float tensor, non-negative, each map summing to 1.
    """
    blocks = getattr(model, "blocks", None)
    grid = getattr(model, "feature_grid", None)
    if blocks is None or len(blocks) == 0 or grid is None:
        raise ValueError(f"{type(model).__name__} needs non-empty `blocks` and `feature_grid` for attention rollout")
    h, w = (int(v) for v in grid)
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    was_training = model.training
    model.eval()
    try:
        model_logits(model, images)
    finally:
        model.train(was_training)
    rollout = None
    for i, blk in enumerate(blocks):
        att = getattr(getattr(blk, "attn", None), "att_mat", None)
        if att is None or att.ndim != 4 or att.shape[0] != images.shape[0]:
            raise ValueError(
                f"block {i} of {type(model).__name__} stored no attention matrix for this batch; "
                "build its TransformerBlocks with save_attn=True (and without flash attention)"
            )
        a = att.float().mean(dim=1)
        a = a + torch.eye(a.shape[-1], device=a.device, dtype=a.dtype)
        a = a / a.sum(dim=-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    n_tokens = rollout.shape[-1]
    if n_tokens != prefix + h * w:
        raise ValueError(
            f"attention has {n_tokens} tokens but num_prefix_tokens={prefix} + feature_grid {h}x{w} = {prefix + h * w}"
        )
    cls_row = rollout[:, 0, prefix:].reshape(-1, 1, h, w)
    maps = F.interpolate(cls_row, size=tuple(images.shape[-2:]), mode="bilinear", align_corners=False)
    maps = maps.clamp_min(0)
    return maps / maps.sum(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(maps.dtype).tiny)


def last_conv_layer(model: torch.nn.Module) -> str:
    """Name (as in ``named_modules``) of the last ``Conv2d``/``Conv3d`` layer of ``model``."""
    names = [name for name, mod in model.named_modules() if isinstance(mod, (torch.nn.Conv2d, torch.nn.Conv3d))]
    if not names:
        raise ValueError(f"{type(model).__name__} has no Conv2d/Conv3d layer for Grad-CAM; pass target_layer")
    return names[-1]


def grad_cam(
    model: torch.nn.Module,
    images: torch.Tensor,
    target_layer: str,
    class_idx: int | Sequence[int] | None = None,
) -> torch.Tensor:
    """Grad-CAM maps with ``monai.visualize.GradCAM``.

    Runs on a deep copy of the model so the hooks GradCAM registers (and never removes) do not stay on the
    caller's network, and one image at a time because MONAI 1.6 scores a batch with per-sample classes
    incorrectly (``logits[:, class_idx]`` mixes samples).

    Args:
        model: classifier returning (N, C) logits.
        images: (N, C, H, W) batch on the model's device.
        target_layer: module name in ``model.named_modules()``, e.g. the last convolution.
        class_idx: class explained: None for each image's predicted class, an int for all, or one per image.

    Returns:
        (N, 1, H, W) maps min-max scaled to [0, 1] per image (1 = most important; MONAI's default normaliser would
        invert this).
    """
    if target_layer not in dict(model.named_modules()):
        convs = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]
        raise ValueError(f"target_layer {target_layer!r} not in {type(model).__name__}; convolution layers: {convs}")
    n = images.shape[0]
    if class_idx is None or isinstance(class_idx, (int, np.integer)):
        classes: list[int | None] = [None if class_idx is None else int(class_idx)] * n
    else:
        classes = [int(c) for c in class_idx]
        if len(classes) != n:
            raise ValueError(f"class_idx has {len(classes)} entries for {n} images")
    net = copy.deepcopy(model).eval()
    for mod in net.modules():
        # A full backward hook on the target layer breaks when a following activation edits its output in place.
        if getattr(mod, "inplace", False) is True:
            mod.inplace = False
    cam = GradCAM(nn_module=_LogitsOnly(net), target_layers=f"net.{target_layer}", postprocessing=_minmax)
    maps = []
    with torch.enable_grad():
        for i in range(n):
            # An input that requires grad keeps full backward hooks on the first layer well defined.
            x = images[i : i + 1].detach().float().requires_grad_(True)
            maps.append(cam(x, class_idx=classes[i]).detach())
    return torch.cat(maps, dim=0).float()


def save_overlay(image: Any, heatmap: Any, path: str | os.PathLike, title: str = "") -> Path:
    """Three-panel PNG: image, heat map, and heat map over the image.

    Args:
        image: (H, W) array or tensor, any intensity range (displayed with a 1-99 percentile window).
        heatmap: (H, W) map, any non-negative range (displayed min-max scaled).
        path: PNG path; written atomically.
        title: figure title. Keep it free of subject identifiers.

    Returns:
        ``path``.
    """
    img = np.squeeze(to_numpy(image).astype(np.float64))
    heat = np.squeeze(to_numpy(heatmap).astype(np.float64))
    if img.ndim != 2 or heat.shape != img.shape:
        raise ValueError(f"save_overlay needs (H, W) image and heatmap of equal shape; got {img.shape}, {heat.shape}")
    lo, hi = np.percentile(img, [1, 99])
    img = np.clip((img - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(img)
    span = heat.max() - heat.min()
    heat = (heat - heat.min()) / span if span > 0 else np.zeros_like(heat)
    fig, axes = plt.subplots(1, 3, figsize=(11, 4))
    axes[0].imshow(img, cmap="gray")
    axes[0].set_title("image")
    im = axes[1].imshow(heat, cmap="jet", vmin=0, vmax=1)
    axes[1].set_title("heat map")
    fig.colorbar(im, ax=axes[1], fraction=0.046, pad=0.04)
    axes[2].imshow(img, cmap="gray")
    # Opacity follows the heat so unimportant regions show the anatomy untinted.
    axes[2].imshow(heat, cmap="jet", alpha=0.6 * heat, vmin=0, vmax=1)
    axes[2].set_title("overlay")
    for ax in axes:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return atomic_save_figure(fig, path)


def explain_examples(
    model: torch.nn.Module,
    dataset_or_loader: Iterable[dict[str, Any]],
    class_names: Sequence[str],
    out_dir: str | os.PathLike,
    per_class: int = 2,
    method: str = "auto",
    target_layer: str | None = None,
    device: str | torch.device | None = None,
    image_key: str = "image",
    label_key: str = "label",
) -> list[Path]:
    """Write overlays for the first ``per_class`` images of every true class.

    Args:
        model: classifier returning (N, C) logits.
        dataset_or_loader: a map-style dataset of dicts (``image`` (C, H, W), ``label``) or an iterable of
            batches (``image`` (N, C, H, W)); read until every class has ``per_class`` images or it is exhausted.
        class_names: C class names.
        out_dir: folder for ``<class>_<k>.png`` files (names carry no subject identifiers).
        per_class: images per class, >= 1.
        method: ``rollout``, ``gradcam`` or ``auto`` (rollout if the model has ``blocks``, else Grad-CAM on the last
            convolution, or on ``target_layer`` when given).
        target_layer: Grad-CAM layer name.
        device: where to run; defaults to the model's device.

    Returns:
        Paths of the written PNGs, in class order.
    """
    if method not in EXPLAIN_METHODS:
        raise ValueError(f"unknown explanation method {method!r}; expected one of {EXPLAIN_METHODS}")
    if int(per_class) < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    names = [str(c) for c in class_names]
    if method == "auto":
        method = "rollout" if getattr(model, "blocks", None) is not None else "gradcam"
    if method == "gradcam" and target_layer is None:
        target_layer = last_conv_layer(model)
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    picked = _pick_examples(dataset_or_loader, len(names), int(per_class), image_key, label_key)
    if not picked:
        return []
    images = torch.stack([img for img, _ in picked]).to(device)
    labels = [lab for _, lab in picked]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            probs = torch.softmax(model_logits(model, images).float(), dim=1).cpu()
        if method == "rollout":
            maps = attention_rollout(model, images)
        else:
            maps = grad_cam(model, images, target_layer, class_idx=probs.argmax(dim=1).tolist())
    finally:
        model.train(was_training)
    out = Path(out_dir)
    paths, seen = [], dict.fromkeys(range(len(names)), 0)
    for i, lab in enumerate(labels):
        pred = int(probs[i].argmax())
        k = seen[lab]
        seen[lab] += 1
        title = f"true {names[lab]} | predicted {names[pred]} (p={probs[i, pred]:.2f}) | {method}"
        path = out / f"{_file_safe(names[lab])}_{k}.png"
        # tensors are (x, y) (MONAI's loaders put the image width first); rows must be y to display upright
        paths.append(save_overlay(images[i, 0].cpu().T, maps[i, 0].cpu().T, path, title))
    return paths


class _LogitsOnly(torch.nn.Module):
    """Wraps a network so GradCAM sees a single logits tensor."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return model_logits(self.net, x)


def _minmax(x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(x.shape[0], -1)
    lo = flat.min(dim=1).values.view(-1, *[1] * (x.ndim - 1))
    span = (flat.max(dim=1).values.view(-1, *[1] * (x.ndim - 1)) - lo).clamp_min(torch.finfo(torch.float32).eps)
    return (x - lo) / span


def _pick_examples(
    source: Any, n_classes: int, per_class: int, image_key: str, label_key: str
) -> list[tuple[torch.Tensor, int]]:
    counts = [0] * n_classes
    picked: list[tuple[torch.Tensor, int]] = []
    is_loader = isinstance(source, torch.utils.data.DataLoader)
    map_style = not is_loader and hasattr(source, "__getitem__") and hasattr(source, "__len__")
    batches = ({k: [v] for k, v in source[i].items()} for i in range(len(source))) if map_style else source
    for batch in batches:
        images = batch[image_key]
        images = torch.stack([torch.as_tensor(x) for x in images]) if isinstance(images, list) else images
        labels = batch[label_key]
        if isinstance(labels, list):
            labels = torch.stack([torch.as_tensor(x).reshape(-1) for x in labels])
        for img, lab in zip(images, labels_to_indices(labels, n_classes)):
            if counts[lab] < per_class:
                counts[lab] += 1
                img = img.as_tensor() if hasattr(img, "as_tensor") else torch.as_tensor(img)
                picked.append((img.detach().cpu().float(), int(lab)))
        if all(c >= per_class for c in counts):
            break
    picked.sort(key=lambda item: item[1])
    return picked


def _file_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "class"
