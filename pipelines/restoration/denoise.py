"""Load a trained denoiser and denoise image files.

A denoiser is given either as a TorchScript file (``ckpt_export`` output, self-contained) or as the
bundle's state-dict checkpoint ``models/model.pt`` plus the bundle config that defines ``network_def``
(by default ``<bundle>/configs/inference.json`` next to ``models/``; config-id overrides such as
``{"features": [8, 8, 16, 32, 64, 8]}`` rebuild a network trained with other sizes).

Images are handled in [0, 1]: files are loaded grey (:func:`pipelines.io.images.load_grey_2d`) and min-max
scaled to [0, 1] (the bundle's training normalisation); outputs are clamped to [0, 1] and written as 8-bit PNG.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

__all__ = [
    "DenoisePredictor",
    "Denoiser",
    "list_images",
    "load_denoiser",
    "load_unit_image",
    "save_unit_png",
    "scale_unit",
]

logger = logging.getLogger(__name__)


def _is_torchscript(path: Path) -> bool:
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def load_network(
    path: str | os.PathLike,
    config_file: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    overrides: Mapping[str, Any] | None = None,
    network_id: str = "network_def",
    device: str | torch.device = "cpu",
) -> torch.nn.Module:
    """A network in eval mode from a TorchScript file, or from a state dict + the bundle config that defines it.

    Args:
        path: ``*.ts`` TorchScript or a state-dict checkpoint (``models/model.pt``).
        config_file: bundle config(s) defining ``network_id`` (state dicts only); default
            ``<path>/../../configs/inference.json``.
        overrides: config-id overrides applied before building the network (e.g. ``{"features": [...]}``).
        network_id: config id of the network definition.
        device: where to load it.

    Raises:
        FileNotFoundError: missing checkpoint or config.
        ValueError: the config does not define ``network_id`` or the weights do not fit the network.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"network checkpoint not found: {path}")
    if _is_torchscript(path):
        net = torch.jit.load(str(path), map_location=device)
        return net.eval()
    from pipelines.bundles import read_config
    from pipelines.inference.predict import load_state_dict

    if config_file is None:
        config_file = path.resolve().parent.parent / "configs" / "inference.json"
    files = [config_file] if isinstance(config_file, (str, os.PathLike)) else list(config_file)
    for f in files:
        if not Path(f).is_file():
            raise FileNotFoundError(f"bundle config not found: {f} (needed to rebuild the network of {path})")
    parser = read_config(files, overrides)
    if network_id not in parser:
        raise ValueError(f"{files}: no {network_id!r} in the config; cannot rebuild the network of {path}")
    net = parser.get_parsed_content(network_id, instantiate=True)
    try:
        net.load_state_dict(load_state_dict(path, device))
    except RuntimeError as e:
        raise ValueError(
            f"{path}: weights do not fit the network of {files} (trained with other sizes? pass overrides): {e}"
        ) from e
    return net.to(device).eval()


def load_denoiser(
    path: str | os.PathLike,
    config_file: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    device: str | torch.device = "cpu",
) -> Denoiser:
    """A :class:`Denoiser` from ``bundles/mri_denoiser/models/model.pt`` (+ config) or a TorchScript export."""
    return Denoiser(load_network(path, config_file, overrides, device=device), device=device)


class Denoiser:
    """Callable wrapper: ``(C, H, W)`` or ``(N, C, H, W)`` images in [0, 1] -> denoised, clamped to [0, 1].

    Input container type is kept (numpy in, numpy out; tensor in, tensor out).

    Args:
        network: the trained network (eval mode is set).
        device: inference device.
        batch_size: images per forward pass for 4D input.
    """

    #: Smallest side the 4-level U-Net accepts (its bottleneck needs more than one pixel for instance norm).
    MIN_SIZE = 32

    def __init__(self, network: torch.nn.Module, device: str | torch.device = "cpu", batch_size: int = 8) -> None:
        self.device = torch.device(device)
        self.network = network.to(self.device).eval()
        self.batch_size = int(batch_size)

    @torch.no_grad()
    def __call__(self, img: Any) -> Any:
        x = torch.as_tensor(np.asarray(img) if not isinstance(img, torch.Tensor) else img).float()
        x = x.as_tensor() if hasattr(x, "as_tensor") else x
        single = x.ndim == 3
        if single:
            x = x[None]
        if x.ndim != 4:
            raise ValueError(f"expected (C, H, W) or (N, C, H, W) images, got shape {tuple(x.shape)}")
        if min(x.shape[-2:]) < self.MIN_SIZE:
            raise ValueError(f"image of spatial size {tuple(x.shape[-2:])} is too small for the U-Net's four "
                             f"downsamplings: both sides must be >= {self.MIN_SIZE} px")
        outs = [
            self.network(x[i : i + self.batch_size].to(self.device)).float().clamp(0, 1).cpu()
            for i in range(0, len(x), self.batch_size)
        ]
        y = torch.cat(outs)
        y = y[0] if single else y
        return y if isinstance(img, torch.Tensor) else y.numpy()


def scale_unit(arr: np.ndarray) -> np.ndarray:
    """Min-max scale an image to [0, 1] (float32), the denoiser bundle's normalisation (``ScaleIntensityd``).

    Unlike percentile scaling nothing is clipped, so the noise model (Gaussian noise on [0, 1] intensities)
    holds exactly and bright tissue keeps its contrast; for 8-bit images with a black background this is
    close to ``x / 255``. A constant image maps to zeros.
    """
    a = np.asarray(arr, dtype=np.float32)
    lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        return np.zeros_like(a)
    return ((a - lo) / (hi - lo)).astype(np.float32)


def load_unit_image(path: str | os.PathLike) -> np.ndarray:
    """A 2D image file as a ``(1, X, Y)`` float32 array in [0, 1] (grey, min-max scaled: :func:`scale_unit`)."""
    from pipelines.io.images import load_grey_2d

    return scale_unit(load_grey_2d(path))[None]


def save_unit_png(arr: Any, path: str | os.PathLike) -> Path:
    """Write a ``(1, X, Y)`` (or ``(X, Y)``) [0, 1] image as 8-bit grey PNG, atomically.

    The ``(x, y)`` axis order of :func:`pipelines.io.images.load_grey_2d` is transposed back to PIL's rows,
    so saving and re-loading returns the same orientation.
    """
    from PIL import Image

    from pipelines.evaluation.report import atomic_write

    a = np.asarray(arr.detach().cpu() if isinstance(arr, torch.Tensor) else arr, dtype=np.float32)
    a = a[0] if a.ndim == 3 else a
    if a.ndim != 2:
        raise ValueError(f"{path}: expected a (1, X, Y) or (X, Y) image, got shape {a.shape}")
    u8 = np.clip(np.round(a.T * 255.0), 0, 255).astype(np.uint8)
    return atomic_write(path, lambda p: Image.fromarray(u8).save(p, format="PNG"))


def list_images(path: str | os.PathLike) -> list[Path]:
    """The image files (PNG/JPG/BMP/TIFF) of a file or folder (recursive, sorted, hidden files skipped)."""
    from pipelines.manifests.builders import IMAGE_EXTENSIONS

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"input not found: {p}")
    if p.is_file():
        if p.suffix.lower() not in IMAGE_EXTENSIONS:
            raise ValueError(f"{p}: not an image file ({', '.join(IMAGE_EXTENSIONS)})")
        return [p]
    files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")
                   and f.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"{p}: folder holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


class DenoisePredictor:
    """Denoise every image of a file or folder and write ``<output_dir>/<relative path>_denoised.png``.

    Used by ``bundles/mri_denoiser/configs/inference.json``. Images are processed at their native size
    (the network is fully convolutional). With ``noise_sigma`` set, Gaussian noise of that level is added
    first (a demonstration of restoration: the noisy input is written too, and PSNR/SSIM against the
    clean input are reported).

    Args:
        network: the denoising network (weights loaded from ``ckpt_path`` when given).
        preprocessing: dict transform ``{"image": path} -> {"image": (1, X, Y) in [0, 1]}``; default
            :func:`load_unit_image`.
        ckpt_path: state-dict checkpoint to load into ``network``.
        device: inference device.
        noise_sigma: optional noise level in [0, 1] units added before denoising (``None``: denoise as is).
        seed: seed of that noise (:class:`transforms.noise.AddGaussianNoise`).
    """

    def __init__(
        self,
        network: torch.nn.Module,
        preprocessing: Callable[[dict], dict] | None = None,
        ckpt_path: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        noise_sigma: float | None = None,
        seed: int = 0,
    ) -> None:
        from pipelines.inference.predict import load_state_dict
        from transforms.noise import AddGaussianNoise

        if ckpt_path is not None:
            network.load_state_dict(load_state_dict(ckpt_path, device))
        self.denoiser = Denoiser(network, device=device)
        self.preprocessing = preprocessing
        self.noise = None if noise_sigma is None else AddGaussianNoise(noise_sigma, seed=seed)

    def _load(self, path: Path) -> np.ndarray:
        if self.preprocessing is None:
            return load_unit_image(path)
        img = self.preprocessing({"image": str(path)})["image"]
        return np.asarray(img.detach().cpu() if isinstance(img, torch.Tensor) else img, dtype=np.float32)

    def run(self, input_path: str | os.PathLike, output_dir: str | os.PathLike) -> pd.DataFrame:
        """Denoise and write PNGs plus ``denoised.csv`` (input, output, noise added, and PSNR/SSIM when noise
        was added). Returns that table."""
        from pipelines.evaluation.report import atomic_write_csv
        from pipelines.restoration.report import image_quality

        root = Path(input_path)
        out = Path(output_dir)
        rows = []
        for f in list_images(root):
            rel = f.relative_to(root) if root.is_dir() else Path(f.name)
            clean = self._load(f)
            if clean.min() < -1e-4 or clean.max() > 1 + 1e-4:
                raise ValueError(f"{f}: preprocessing must give intensities in [0, 1], got "
                                 f"[{clean.min():g}, {clean.max():g}]")
            noisy = clean if self.noise is None else self.noise(clean)
            den = self.denoiser(noisy)
            target = out / rel.parent / f"{rel.stem}_denoised.png"
            save_unit_png(den, target)
            row: dict[str, Any] = {"input": str(rel), "output": str(target.relative_to(out)),
                                   "noise_sigma": self.noise.sigma if self.noise else 0.0}
            if self.noise is not None:
                save_unit_png(noisy, out / rel.parent / f"{rel.stem}_noisy.png")
                c = torch.as_tensor(clean)[None]
                q_n = image_quality(torch.as_tensor(noisy)[None], c)
                q_d = image_quality(torch.as_tensor(den)[None], c)
                row.update({"psnr_noisy": q_n["psnr"][0], "psnr_denoised": q_d["psnr"][0],
                            "ssim_noisy": q_n["ssim"][0], "ssim_denoised": q_d["ssim"][0]})
            rows.append(row)
        table = pd.DataFrame(rows)
        atomic_write_csv(out / "denoised.csv", table)
        logger.info("denoised %d image(s) into %s", len(table), out)
        return table
