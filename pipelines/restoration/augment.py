"""``python -m pipelines restore-augment``: restoration augmentation of one class up to a target class ratio.

The generator takes training images of one class (default: the healthy class), adds Gaussian noise
(sigma drawn from {0.1, ..., 0.5} of the [0, 1] range), restores them with the trained U-Net denoiser
(``bundles/mri_denoiser``) and writes the restored images plus a manifest in which the new rows are tagged
``augmented=True``, until the class counts of the **train** split reach the target ratio (default
``8:1:1:1``: the augmented class first, then the other classes in sorted order; or named,
``notumor=8,glioma=1,meningioma=1,pituitary=1``)::

    python -m pipelines restore-augment --manifest m.csv \\
        --denoiser bundles/mri_denoiser/models/model.pt --class notumor --ratio 8:1:1:1 --out DIR

Leakage rules, enforced by :func:`check_augmented_manifest` before anything is written (and usable on any
manifest later): only ``split == "train"`` rows are sources; every new row keeps its source's
``subject_id``/``session_id`` and is ``train``; no augmented row may be outside train or share a subject with
val/test rows; and the output folder may not hold val/test images. Validation and test rows are copied
through unchanged.

Validity check (``--validate-with CLASSIFIER``, :func:`score_augmented`): a classifier trained on original
images scores the augmented images; the accuracy on the augmented class (with a bootstrap CI) is compared
with the accuracy on the source images.

Comparison (``--compare-bundle tumor_mri``, :func:`compare_augmentation`): trains and evaluates the bundle
once on the original manifest and once on the augmented one (same val/test rows) and writes the comparison
table (macro AUC etc. with CIs) via :mod:`pipelines.evaluation.compare`.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.bundles import parse_overrides
from pipelines.manifests.schema import ManifestError
from pipelines.tracking import keeps_tracking_store
from pipelines.tracking.progress import add_quiet_argument, progress_bar

__all__ = [
    "HEALTHY_CLASS_NAMES",
    "AugmentationLeakError",
    "AugmentResult",
    "check_augmented_manifest",
    "compare_augmentation",
    "parse_ratio",
    "register",
    "restore_augment",
    "score_augmented",
    "target_count",
]

logger = logging.getLogger(__name__)

#: Class names recognised as "healthy" when ``--class`` is not given (case-insensitive).
HEALTHY_CLASS_NAMES = ("notumor", "no_tumor", "no tumor", "healthy", "normal", "nondemented", "cn", "control")


class AugmentationLeakError(ManifestError):
    """Augmented images outside the train split, sharing a subject with val/test, or written among val/test files."""


@dataclass
class AugmentResult:
    """Result of :func:`restore_augment`.

    Attributes:
        manifest: the written manifest (original rows + augmented rows).
        n_new: number of images generated.
        target: target train count of the augmented class.
        counts_before, counts_after: train images per class.
        paths: ``{"manifest", "summary"}`` -> Path.
    """

    manifest: pd.DataFrame
    n_new: int
    target: int
    counts_before: dict[str, int]
    counts_after: dict[str, int]
    paths: dict[str, Path] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ ratio


def parse_ratio(text: str | Sequence[float] | Mapping[str, float], classes: Sequence[str], target_class: str) -> dict[str, float]:
    """Target ratio per class.

    Args:
        text: ``"8:1:1:1"`` (``target_class`` first, then the other ``classes`` in their given order),
            ``"notumor=8,glioma=1,..."`` (named; ``,`` or ``:`` separated), a sequence, or a mapping.
        classes: all classes of the train split.
        target_class: the class to augment.

    Returns:
        ``{class: weight}`` for every class (weights > 0).

    Raises:
        ValueError: wrong number of values, unknown or missing class names, non-positive weights.
    """
    others = [c for c in classes if c != target_class]
    if isinstance(text, Mapping):
        ratio = {str(k): float(v) for k, v in text.items()}
    elif isinstance(text, str) and "=" in text:
        ratio = {}
        for part in re.split(r"[,:]", text):
            name, sep, value = part.partition("=")
            if not sep:
                raise ValueError(f"ratio {text!r}: mix of named and positional values; use name=value throughout")
            ratio[name.strip()] = float(value)
    else:
        values = [float(v) for v in (text.split(":") if isinstance(text, str) else text)]
        if len(values) != len(classes):
            raise ValueError(
                f"ratio {text!r} has {len(values)} values for {len(classes)} classes; order: "
                f"{[target_class] + others} (the augmented class first)"
            )
        ratio = dict(zip([target_class] + others, values))
    unknown = sorted(set(ratio) - set(classes))
    missing = sorted(set(classes) - set(ratio))
    if unknown or missing:
        raise ValueError(f"ratio {text!r}: unknown class(es) {unknown}, missing class(es) {missing}; classes {list(classes)}")
    bad = {k: v for k, v in ratio.items() if not (math.isfinite(v) and v > 0)}
    if bad:
        raise ValueError(f"ratio weights must be > 0, got {bad}")
    return ratio


def target_count(counts: Mapping[str, int], ratio: Mapping[str, float], target_class: str) -> int:
    """Train images of ``target_class`` that reach ``ratio`` given the (fixed) counts of the other classes.

    One ratio unit is the mean of ``count / weight`` over the other classes (exact when they already follow
    the ratio, e.g. a balanced set for ``8:1:1:1``); the target is ``round(weight_target * unit)``.
    """
    others = [c for c in ratio if c != target_class]
    if not others:
        raise ValueError("the ratio needs at least one class besides the augmented one")
    unit = float(np.mean([counts.get(c, 0) / ratio[c] for c in others]))
    if unit <= 0:
        raise ValueError(f"the other classes {others} have no train images; cannot set a ratio")
    return int(round(ratio[target_class] * unit))


# ------------------------------------------------------------------------------------------------ checks


def _is_aug(df: pd.DataFrame) -> pd.Series:
    if "augmented" not in df.columns:
        return pd.Series(False, index=df.index)
    col = df["augmented"]
    if col.dtype == bool:
        return col.fillna(False)
    return col.astype(str).str.strip().str.lower().isin(("true", "1", "yes"))


def check_augmented_manifest(df: pd.DataFrame, out_dir: str | os.PathLike | None = None) -> None:
    """Refuse a manifest whose augmented rows could leak into validation or test.

    Checks: every ``augmented`` row is ``split == "train"``; no subject of an augmented row has val/test rows;
    every ``source_image`` of an augmented row is a train image of the manifest; and, with ``out_dir``, no
    val/test image lies inside ``out_dir`` (the folder the generator writes to).

    Raises:
        AugmentationLeakError: naming the offending rows / subjects / files.
    """
    src = df.attrs.get("source", "<in-memory manifest>")
    aug = _is_aug(df)
    split = df["split"].fillna("").astype(str)
    bad = df[aug & (split != "train")]
    if len(bad):
        raise AugmentationLeakError(
            f"manifest {src}: {len(bad)} augmented row(s) outside the train split "
            f"(splits {sorted(set(bad['split'].astype(str)))}, e.g. {bad['image'].iloc[0]}); augmented images "
            "may only be used for training"
        )
    held_out = set(df.loc[split.isin(("val", "test")), "subject_id"].astype(str))
    shared = sorted(set(df.loc[aug, "subject_id"].astype(str)) & held_out)
    if shared:
        raise AugmentationLeakError(
            f"manifest {src}: augmented images of subject(s) {shared[:5]} whose other images are in val/test"
        )
    if aug.any() and "source_image" in df.columns:
        train_images = {os.path.normpath(str(p)) for p in df.loc[(split == "train") & ~aug, "image"]}
        foreign = [s for s in df.loc[aug, "source_image"].astype(str) if os.path.normpath(s) not in train_images]
        if foreign:
            raise AugmentationLeakError(
                f"manifest {src}: {len(foreign)} augmented row(s) come from images that are not train rows, "
                f"e.g. {foreign[0]}"
            )
    if out_dir is not None:
        root = Path(out_dir).resolve()
        inside = [p for p in df.loc[split.isin(("val", "test")), "image"].astype(str)
                  if Path(p).resolve().is_relative_to(root)]
        if inside:
            raise AugmentationLeakError(
                f"output folder {root} holds {len(inside)} val/test image(s), e.g. {inside[0]}; choose a new folder"
            )


def _pick_target_class(labels: Sequence[str], target_class: str | None) -> str:
    labels = sorted(set(labels))
    if target_class is not None:
        if target_class not in labels:
            raise ValueError(f"class {target_class!r} has no train images; train classes: {labels}")
        return target_class
    healthy = [c for c in labels if c.lower() in HEALTHY_CLASS_NAMES]
    if len(healthy) != 1:
        raise ValueError(f"cannot tell the healthy class among {labels}: pass --class")
    return healthy[0]


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ generator


def restore_augment(
    manifest: str | os.PathLike | pd.DataFrame,
    denoiser: str | os.PathLike | Callable[[np.ndarray], np.ndarray],
    out_dir: str | os.PathLike,
    target_class: str | None = None,
    ratio: str | Sequence[float] | Mapping[str, float] = "8:1:1:1",
    sigmas: Sequence[float] | None = None,
    seed: int = 0,
    image_size: int | None = None,
    denoiser_config: str | os.PathLike | None = None,
    denoiser_overrides: Mapping[str, Any] | None = None,
    max_new: int | None = None,
    overwrite: bool = False,
    device: str = "cpu",
) -> AugmentResult:
    """Generate restored copies of ``target_class`` train images until the train split reaches ``ratio``.

    Each new image: a source train image (cycled in sorted order), loaded grey and min-max scaled to [0, 1]
    (the denoiser's normalisation; optionally resized to ``image_size``), plus Gaussian noise of a sigma drawn from
    ``sigmas`` (:class:`transforms.noise.AddGaussianNoise`, seeded per image), restored by the denoiser, mapped
    back to the source's grey levels (8-bit sources) and written as 8-bit PNG to
    ``out_dir/images/<class>/<stem>_aug<k>_s<sigma>.png``.

    Args:
        manifest: a manifest CSV (or DataFrame) with ``split`` filled in for every row.
        denoiser: TorchScript / state-dict checkpoint path (see
            :func:`pipelines.restoration.denoise.load_network`) or a callable on ``(1, H, W)`` [0, 1] arrays.
        out_dir: new folder for the images, ``manifest.csv`` and ``augment.json``.
        target_class: the class to augment (default: the one healthy-looking class name).
        ratio: target ratio (see :func:`parse_ratio`).
        sigmas: noise levels in [0, 1] units (default {0.1, ..., 0.5}).
        seed: seed of the sigma / noise draws.
        image_size: resize sources to ``image_size`` x ``image_size`` first (None: native size).
        denoiser_config, denoiser_overrides: bundle config and config-id overrides for state-dict checkpoints.
        max_new: generate at most this many images (a cap for smoke runs; the ratio is then not reached).
        overwrite: replace an existing ``out_dir/manifest.csv``.
        device: inference device.

    Returns:
        An :class:`AugmentResult`.

    Raises:
        ManifestError: missing columns/files or rows without a split.
        AugmentationLeakError: see :func:`check_augmented_manifest`.
        FileExistsError: ``out_dir/manifest.csv`` exists and ``overwrite`` is False.
        ValueError: bad class or ratio.
    """
    from monai.transforms import Resize

    from pipelines.manifests.schema import read_manifest, resolve_paths, validate_manifest, write_manifest
    from pipelines.manifests.split import split_counts
    from pipelines.io.images import load_grey_2d
    from pipelines.restoration.denoise import load_denoiser, save_unit_png, scale_unit
    from transforms.noise import DEFAULT_SIGMAS, AddGaussianNoise

    df = resolve_paths(read_manifest(manifest)) if not isinstance(manifest, pd.DataFrame) else manifest.copy()
    src = df.attrs.get("source", "<in-memory manifest>")
    df = validate_manifest(df, check_files=True, require_split=True)
    df.attrs["source"] = src
    out = Path(out_dir)
    if (out / "manifest.csv").exists() and not overwrite:
        raise FileExistsError(f"{out / 'manifest.csv'} exists; choose a new --out or pass --overwrite")
    aug = _is_aug(df)
    df["augmented"] = aug
    check_augmented_manifest(df, out)
    train = df[(df["split"] == "train")]
    classes = sorted(train["label"].unique())
    target_class = _pick_target_class(train["label"], target_class)
    weights = parse_ratio(ratio, classes, target_class)
    counts_before = {c: int((train["label"] == c).sum()) for c in classes}
    target = target_count(counts_before, weights, target_class)
    n_new = max(0, target - counts_before[target_class])
    if max_new is not None:
        n_new = min(n_new, int(max_new))
    if n_new == 0:
        logger.warning("class %s already has %d train images (target %d): nothing to generate",
                       target_class, counts_before[target_class], target)
    sources = train[(train["label"] == target_class) & ~train["augmented"]].sort_values("image")
    if n_new and sources.empty:
        raise ValueError(f"{src}: no original train images of class {target_class!r} to augment")
    sigmas = tuple(float(s) for s in (sigmas if sigmas is not None else DEFAULT_SIGMAS))
    if not callable(denoiser):
        denoiser_path = Path(denoiser)
        model = load_denoiser(denoiser_path, denoiser_config, denoiser_overrides, device=device)
        denoiser_info = {"path": str(denoiser_path), "md5": _md5(denoiser_path)}
    else:
        model, denoiser_info = denoiser, {"path": repr(denoiser)}
    resize = Resize((image_size, image_size), mode="area") if image_size else None
    rng = np.random.default_rng(seed)
    img_dir = out / "images" / re.sub(r"[^A-Za-z0-9_.-]", "_", target_class)
    new_rows = []
    t0 = time.time()
    src_rows = sources.to_dict(orient="records")
    for k in progress_bar(range(n_new), desc=f"restore {target_class}", unit="image"):
        row = src_rows[k % len(src_rows)]
        sigma = float(sigmas[int(rng.integers(len(sigmas)))])
        noise_seed = int(rng.integers(2**31 - 1))
        raw = load_grey_2d(row["image"])[None]
        lo, hi = float(raw.min()), float(raw.max())
        clean = scale_unit(raw)
        if resize is not None:
            clean = np.asarray(resize(clean), dtype=np.float32).clip(0, 1)
        noisy = AddGaussianNoise(sigma, seed=noise_seed)(clean)
        restored = np.asarray(model(noisy), dtype=np.float32)
        if hi <= 255.0 and hi > lo:
            # back to the source's 8-bit grey levels, so new images look like the originals (not stretched)
            restored = (restored * (hi - lo) + lo) / 255.0
        name = f"{Path(row['image']).stem}_aug{k:05d}_s{sigma:g}.png"
        path = save_unit_png(restored, img_dir / name)
        new_rows.append({**row, "image": str(path.resolve()), "split": "train", "augmented": True,
                         "source_image": row["image"], "noise_sigma": sigma})
        if (k + 1) % 100 == 0:
            logger.info("%d / %d restored images (%.1f s)", k + 1, n_new, time.time() - t0)
    result = pd.concat([df, pd.DataFrame(new_rows)], ignore_index=True) if new_rows else df.copy()
    result["augmented"] = _is_aug(result)
    result.attrs["source"] = str(out / "manifest.csv")
    check_augmented_manifest(result, out)
    path = write_manifest(result, out / "manifest.csv", overwrite=True)
    after = result[result["split"] == "train"]
    counts_after = {c: int((after["label"] == c).sum()) for c in classes}
    summary = {
        "source_manifest": str(src),
        "target_class": target_class,
        "ratio": weights,
        "target_count": target,
        "n_new": len(new_rows),
        "train_counts_before": counts_before,
        "train_counts_after": counts_after,
        "sigmas": list(sigmas),
        "seed": int(seed),
        "image_size": image_size,
        "denoiser": denoiser_info,
        "seconds": round(time.time() - t0, 2),
        "split_counts": split_counts(result),
    }
    from pipelines.evaluation.report import atomic_write_json

    summary_path = atomic_write_json(out / "augment.json", summary)
    logger.info("train counts %s -> %s (%d new %s images) in %s", counts_before, counts_after, len(new_rows),
                target_class, out)
    return AugmentResult(result, len(new_rows), target, counts_before, counts_after,
                         {"manifest": path, "summary": summary_path})


# ------------------------------------------------------------------------------------------------ validity


def load_classifier(
    path: str | os.PathLike,
    config_file: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    class_names: Sequence[str] | None = None,
    image_size: int | None = None,
    device: str = "cpu",
) -> tuple[Any, Callable[[dict], dict], list[str]]:
    """``(network, image_transform, class_names)`` of a trained classifier.

    ``path`` is a TorchScript export or a bundle state-dict checkpoint. The image transform
    (``{"image": path} -> {"image": (C, H, W)}``) and class names come from the bundle config (default
    ``<path>/../../configs/inference.json`` when it exists: ids ``preprocessing`` and ``class_names``);
    without a config: grey loading, 0.5/99.5 percentile scaling and a bilinear resize to ``image_size``,
    with ``class_names`` required.
    """
    from pipelines.bundles import read_config
    from pipelines.restoration.denoise import load_network

    path = Path(path)
    cfg = Path(config_file) if config_file else path.resolve().parent.parent / "configs" / "inference.json"
    if config_file and not cfg.is_file():
        raise FileNotFoundError(f"classifier config not found: {cfg}")
    transform = None
    if cfg.is_file():
        parser = read_config(cfg, overrides)
        if "preprocessing" in parser and image_size is None:
            transform = parser.get_parsed_content("preprocessing", instantiate=True)
        if class_names is None and "class_names" in parser:
            class_names = list(parser.get_parsed_content("class_names"))
        network = load_network(path, str(cfg), overrides, device=device)
    else:
        network = load_network(path, device=device)
    if class_names is None:
        raise ValueError(f"{path}: no bundle config found ({cfg}); pass the classifier's class names")
    if transform is None:
        from monai.transforms import Compose, EnsureTyped, Resized, ScaleIntensityRangePercentilesd

        from pipelines.io.images import LoadGrey2Dd

        if image_size is None:
            raise ValueError(f"{path}: no preprocessing in a bundle config; pass the classifier's image size")
        transform = Compose([
            LoadGrey2Dd("image"),
            ScaleIntensityRangePercentilesd("image", lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True),
            Resized("image", spatial_size=(image_size, image_size), mode="bilinear", anti_aliasing=True),
            EnsureTyped("image", track_meta=False),
        ])
    return network, transform, list(class_names)


def score_augmented(
    manifest: str | os.PathLike | pd.DataFrame,
    classifier: str | os.PathLike,
    classifier_config: str | os.PathLike | None = None,
    classifier_overrides: Mapping[str, Any] | None = None,
    class_names: Sequence[str] | None = None,
    image_size: int | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
    batch_size: int = 16,
    device: str = "cpu",
    out_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Validity check: a classifier trained on originals scores the augmented images (and their sources).

    Returns:
        ``{"augmented": {...}, "sources": {...}, "class", "classifier"}``, each part with ``n``, ``accuracy``
        (fraction predicted as the augmented class), ``accuracy_ci`` (percentile bootstrap), and
        ``mean_probability`` of that class. Written to ``out_dir/validity.json`` when given.

    Raises:
        ValueError: the manifest has no augmented rows, or their class is unknown to the classifier.
    """
    import torch

    from pipelines.manifests.schema import read_manifest, resolve_paths
    from pipelines.restoration.report import bootstrap_mean_ci

    df = resolve_paths(read_manifest(manifest)) if not isinstance(manifest, pd.DataFrame) else manifest
    aug = df[_is_aug(df)]
    if aug.empty:
        raise ValueError(f"{df.attrs.get('source', 'manifest')}: no augmented rows to score")
    labels = sorted(aug["label"].unique())
    network, transform, names = load_classifier(classifier, classifier_config, classifier_overrides,
                                                class_names, image_size, device)
    unknown = [c for c in labels if c not in names]
    if unknown:
        raise ValueError(f"augmented class(es) {unknown} unknown to the classifier (classes {names})")
    sources = sorted(set(aug["source_image"])) if "source_image" in aug.columns else []

    @torch.no_grad()
    def probs_of(paths: Sequence[str]) -> np.ndarray:
        out = []
        for i in progress_bar(range(0, len(paths), batch_size), desc="score", unit="batch"):
            x = torch.stack([torch.as_tensor(transform({"image": p})["image"]).float()
                             for p in paths[i : i + batch_size]]).to(device)
            out.append(torch.softmax(network(x).float(), dim=1).cpu().numpy())
        return np.concatenate(out)

    def summary(paths: Sequence[str], label: str) -> dict[str, Any]:
        if not paths:
            return {"n": 0}
        p = probs_of(list(paths))
        k = names.index(label)
        hit = (p.argmax(1) == k).astype(float)
        acc, lo, hi = bootstrap_mean_ci(hit, n_resamples, seed)
        return {"n": len(paths), "accuracy": acc, "accuracy_ci": [lo, hi], "mean_probability": float(p[:, k].mean()),
                "predicted": {names[j]: int((p.argmax(1) == j).sum()) for j in range(len(names))}}

    label = labels[0] if len(labels) == 1 else None
    if label is None:
        raise ValueError(f"augmented rows of several classes {labels}; score one class at a time")
    result = {
        "class": label,
        "classifier": str(classifier),
        "augmented": summary(list(aug["image"].astype(str)), label),
        "sources": summary([str(s) for s in sources], label),
        "n_resamples": int(n_resamples),
    }
    if out_dir is not None:
        from pipelines.evaluation.report import atomic_write_json

        atomic_write_json(Path(out_dir) / "validity.json", result)
    return result


# ------------------------------------------------------------------------------------------------ comparison


@keeps_tracking_store
def compare_augmentation(
    bundle: str,
    original_manifest: str | os.PathLike,
    augmented_manifest: str | os.PathLike,
    network: str = "resnet18",
    overrides: Mapping[str, str] | None = None,
    tracking_uri: str | None = None,
    out_dir: str | os.PathLike | None = None,
    runner: Callable[[list[str]], int] | None = None,
    equal_steps: bool = False,
) -> Any:
    """Train + evaluate ``bundle`` (network overlay ``network``) on the original and on the augmented manifest,
    then compare the two evaluation runs (macro AUC, accuracy, ... with CIs) with
    :func:`pipelines.evaluation.compare.compare_runs`.

    With ``equal_steps`` the augmented run's ``epochs`` is scaled by ``n_train_original / n_train_augmented``
    (at least 1), so both models get about the same number of optimisation steps; otherwise both train the
    same number of epochs (the augmented one then takes more steps).

    Both manifests must hold the same val/test rows (the generator guarantees it), so both models are
    evaluated on the same images. Checkpoints, training outputs and the evaluation report of each variant
    go to ``out_dir/<variant>/{models,train,eval}`` (config ids ``ckpt_dir``, ``output_dir``, ``eval_dir``).

    Returns:
        The :class:`pipelines.evaluation.compare.Comparison`.
    """
    from pipelines.bundles import bundle_commands, bundle_root, run_subprocess
    from pipelines.evaluation.compare import compare_runs, run_by_name
    from pipelines.manifests.schema import read_manifest
    from pipelines.tracking import mlflow_client

    orig, augm = read_manifest(original_manifest), read_manifest(augmented_manifest)
    check_augmented_manifest(resolve_for_check(augm))

    def held_out(df: pd.DataFrame) -> set[str]:
        d = df[df["split"].isin(("val", "test"))]
        return {f"{Path(str(p)).name}|{s}" for p, s in zip(d["image"], d["split"])}

    if held_out(orig) != held_out(augm):
        raise ValueError(f"{original_manifest} and {augmented_manifest} differ in their val/test rows; "
                         "the comparison needs the same held-out images")
    root = bundle_root(bundle)
    experiment = root.name
    if tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    out = Path(out_dir) if out_dir else root / "outputs" / "augmentation_comparison"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run = runner or run_subprocess
    client = mlflow_client(tracking_uri)
    eval_ids = []
    epochs_aug = None
    if equal_steps:
        if not (overrides or {}).get("epochs"):
            raise ValueError("equal_steps needs an explicit epochs override (e.g. epochs=20)")
        n_orig, n_aug = int((orig["split"] == "train").sum()), int((augm["split"] == "train").sum())
        epochs_aug = max(1, round(int((overrides or {})["epochs"]) * n_orig / n_aug))
        logger.info("equal steps: original %s epochs x %d images, augmented %d epochs x %d images",
                    overrides["epochs"], n_orig, epochs_aug, n_aug)
    variants = (("original", original_manifest), ("augmented", augmented_manifest))
    for variant, manifest in progress_bar(variants, desc=f"train {root.name}/{network}", unit="run"):
        ov = {**(overrides or {}), "manifest": str(Path(manifest).resolve()),
              "output_dir": str((out / variant / "train").resolve()), "ckpt_dir": str((out / variant / "models").resolve()),
              "eval_dir": str((out / variant / "eval").resolve())}
        if variant == "augmented" and epochs_aug is not None:
            ov["epochs"] = str(epochs_aug)
        plan = bundle_commands(root, network, f"{variant}-{stamp}", experiment, ov)
        code = run(plan["train"]) or run(plan["evaluate"])
        if code != 0:
            raise RuntimeError(f"{variant}: training or evaluation of {root.name}/{network} failed (exit {code})")
        eval_run = run_by_name(client, experiment, plan["eval_run_name"])
        if eval_run is None:
            raise RuntimeError(f"{variant}: no MLflow run {plan['eval_run_name']!r} in experiment {experiment}")
        rid = eval_run.info.run_id
        # a param differing between the runs becomes a column of the comparison table
        client.log_param(rid, "training_set", variant)
        client.set_tag(rid, "augmentation", "restoration" if variant == "augmented" else "none")
        train_run = run_by_name(client, experiment, plan["train_run_name"])
        if train_run is not None:
            client.set_tag(rid, "train_run_id", train_run.info.run_id)
        eval_ids.append(rid)
    return compare_runs(tracking_uri, experiment, run_ids=eval_ids, out_dir=out,
                            metrics=["macro_auc", "accuracy", "balanced_accuracy", "macro_f1"],
                            title=f"{root.name}/{network}: original vs restoration-augmented training set")


def resolve_for_check(df: pd.DataFrame) -> pd.DataFrame:
    """A copy with absolute ``image``/``source_image`` paths (relative to the manifest's folder)."""
    from pipelines.manifests.schema import resolve_paths

    out = resolve_paths(df)
    if "source_image" in out.columns:
        base = Path(df.attrs.get("source", ".")).parent
        out["source_image"] = [s if (isinstance(s, float) or os.path.isabs(str(s))) else str((base / str(s)).resolve())
                               for s in out["source_image"]]
    return out


# ------------------------------------------------------------------------------------------------ CLI


def _main(args: argparse.Namespace) -> int:
    try:
        if args.compare_bundle:
            if not args.augmented_manifest:
                raise ValueError("--compare-bundle needs --augmented-manifest (the generator's manifest.csv)")
            result = compare_augmentation(
                args.compare_bundle, args.manifest, args.augmented_manifest, args.network,
                {k: str(v) for k, v in parse_overrides(args.override).items()}, args.tracking_uri, args.out,
                equal_steps=args.equal_steps,
            )
            print(result.markdown)
            return 0
        manifest: Any = args.manifest
        if not args.check_only:
            if not args.denoiser:
                raise ValueError("--denoiser is required (bundles/mri_denoiser/models/model.pt or a TorchScript file)")
            res = restore_augment(
                args.manifest, args.denoiser, args.out, args.target_class, args.ratio, args.sigmas, args.seed,
                args.image_size, args.denoiser_config, parse_overrides(args.denoiser_override), args.max_new,
                args.overwrite, args.device,
            )
            print(f"train counts {res.counts_before} -> {res.counts_after}: {res.n_new} new image(s); "
                  f"manifest {res.paths['manifest']}")
            manifest = res.paths["manifest"]
        if args.validate_with:
            v = score_augmented(manifest, args.validate_with, args.classifier_config,
                                parse_overrides(args.classifier_override), args.classifier_classes,
                                args.classifier_image_size, seed=args.seed, device=args.device, out_dir=args.out)
            a, s = v["augmented"], v["sources"]
            print(f"validity: classifier accuracy on {a['n']} augmented {v['class']} images "
                  f"{a['accuracy']:.4f} [{a['accuracy_ci'][0]:.4f}, {a['accuracy_ci'][1]:.4f}]"
                  + (f"; on their {s['n']} sources {s['accuracy']:.4f}" if s.get("n") else ""))
    except (ManifestError, FileNotFoundError, FileExistsError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def register(subparsers: Any) -> None:
    """Add ``restore-augment`` to ``python -m pipelines``."""
    p = subparsers.add_parser(
        "restore-augment",
        help="noise + U-Net restoration of one class's train images up to a target class ratio (augmented=True rows)",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--manifest", required=True, type=Path,
                   help="manifest CSV with a split for every row (with --compare-bundle: the original manifest)")
    p.add_argument("--denoiser", type=Path, help="bundles/mri_denoiser/models/model.pt (state dict) or a TorchScript file")
    p.add_argument("--denoiser-config", type=Path,
                   help="bundle config defining network_def (default: <denoiser>/../../configs/inference.json)")
    p.add_argument("--denoiser-override", action="append", metavar="ID=VALUE",
                   help="config-id override for rebuilding the denoiser, e.g. features=[8,8,16,32,64,8]")
    p.add_argument("--class", dest="target_class", help="class to augment (default: the healthy class)")
    p.add_argument("--ratio", default="8:1:1:1",
                   help="target train ratio: augmented class first, then the others sorted (default 8:1:1:1), "
                        "or named: notumor=8,glioma=1,...")
    p.add_argument("--sigmas", type=float, nargs="+", help="noise levels in [0, 1] units (default 0.1 0.2 0.3 0.4 0.5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise draws and bootstrap")
    p.add_argument("--image-size", type=int, help="resize sources to this square size first (default: native)")
    p.add_argument("--max-new", type=int, help="cap on generated images (smoke runs)")
    p.add_argument("--out", type=Path, required=True, help="new output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DIR/manifest.csv")
    p.add_argument("--device", default="cpu")
    p.add_argument("--validate-with", type=Path, metavar="CLASSIFIER",
                   help="validity check: a classifier trained on originals (TorchScript or bundle model.pt) scores "
                        "the augmented images; writes DIR/validity.json")
    p.add_argument("--classifier-config", type=Path, help="bundle config of the classifier (default: next to it)")
    p.add_argument("--classifier-override", action="append", metavar="ID=VALUE", help="config-id override")
    p.add_argument("--classifier-classes", nargs="+", help="class names of a TorchScript classifier without config")
    p.add_argument("--classifier-image-size", type=int, help="input size of a classifier without config")
    p.add_argument("--check-only", action="store_true",
                   help="only run the validity check on --manifest (an augmented manifest)")
    p.add_argument("--compare-bundle", metavar="BUNDLE",
                   help="train+evaluate BUNDLE on --manifest and on --augmented-manifest and compare (macro AUC, CIs)")
    p.add_argument("--augmented-manifest", type=Path, help="the generator's manifest.csv, for --compare-bundle")
    p.add_argument("--network", default="resnet18", help="network overlay of --compare-bundle (default resnet18)")
    p.add_argument("--override", action="append", metavar="ID=VALUE",
                   help="config-id override for the --compare-bundle commands, e.g. epochs=30")
    p.add_argument("--equal-steps", action="store_true",
                   help="--compare-bundle: scale the augmented run's epochs so both runs take about the same number "
                        "of optimisation steps (needs --override epochs=N)")
    p.add_argument("--tracking-uri", help="MLflow store for --compare-bundle")
    add_quiet_argument(p)
    p.set_defaults(func=_main)
