"""Denoising quality per noise level: PSNR and SSIM of the denoised output and of the noisy input (the
baseline), with percentile-bootstrap confidence intervals over images, written as CSV / Markdown / JSON and
logged to MLflow.

Conventions: images are float in [0, 1] (``data_range = 1``); PSNR in dB (capped at :data:`PSNR_CAP_DB` for
identical images, where it is infinite); SSIM with MONAI's defaults (Gaussian window 11, sigma 1.5,
k1 0.01, k2 0.03). CIs resample images (each image at one sigma is one sample); the gain (denoised minus
noisy) is bootstrapped paired, on the same resampled images.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

__all__ = [
    "PSNR_CAP_DB",
    "QUALITY_METRICS",
    "DenoisingReportHandler",
    "bootstrap_mean_ci",
    "denoising_markdown",
    "denoising_table",
    "image_quality",
    "mlflow_metrics",
    "write_denoising_report",
]

logger = logging.getLogger(__name__)

#: PSNR reported for a perfect reconstruction (MSE = 0), in dB.
PSNR_CAP_DB = 100.0
#: Per-image columns produced by :func:`image_quality` for each of ``noisy`` and ``denoised``.
QUALITY_METRICS = ("psnr", "ssim")


def image_quality(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> dict[str, np.ndarray]:
    """Per-image PSNR (dB) and SSIM of ``pred`` against ``target``.

    Args:
        pred: ``(N, C, H, W)`` images in [0, ``data_range``].
        target: reference images, same shape.
        data_range: intensity range (1 for [0, 1] images).

    Returns:
        ``{"psnr": (N,), "ssim": (N,)}`` float64 arrays (PSNR capped at :data:`PSNR_CAP_DB`).
    """
    from monai.metrics import PSNRMetric, SSIMMetric

    pred = torch.as_tensor(pred).float()
    target = torch.as_tensor(target).float()
    if pred.shape != target.shape or pred.ndim != 4:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must both be (N, C, H, W)")
    pred = pred.as_tensor() if hasattr(pred, "as_tensor") else pred
    target = target.as_tensor() if hasattr(target, "as_tensor") else target
    psnr = PSNRMetric(max_val=data_range, reduction="none")(pred, target).reshape(len(pred), -1).mean(1)
    ssim = SSIMMetric(spatial_dims=2, data_range=data_range, reduction="none")(pred, target)
    ssim = ssim.reshape(len(pred), -1).mean(1)
    psnr = np.minimum(psnr.double().cpu().numpy(), PSNR_CAP_DB)
    return {"psnr": psnr, "ssim": ssim.double().cpu().numpy()}


def bootstrap_mean_ci(
    values: Any, n_resamples: int = 1000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float, float]:
    """Mean and percentile-bootstrap CI of the mean.

    Args:
        values: 1D samples (NaN not allowed).
        n_resamples: bootstrap resamples (0: no CI, NaN bounds).
        seed: ``numpy.random.default_rng`` seed.
        alpha: two-sided level (0.05: 95 % CI).

    Returns:
        ``(mean, ci_low, ci_high)``.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("cannot bootstrap an empty sample")
    if not np.all(np.isfinite(v)):
        raise ValueError("values contain NaN or inf")
    mean = float(v.mean())
    if n_resamples <= 0 or v.size == 1:
        return mean, math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(int(n_resamples), v.size))].mean(axis=1)
    lo, hi = np.percentile(means, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return mean, float(lo), float(hi)


def denoising_table(per_image: pd.DataFrame, n_resamples: int = 1000, seed: int = 0, alpha: float = 0.05) -> pd.DataFrame:
    """Aggregate per-image quality into one row per sigma plus an ``all`` row.

    Args:
        per_image: columns ``sigma``, ``psnr_noisy``, ``psnr_denoised``, ``ssim_noisy``, ``ssim_denoised``.
        n_resamples, seed, alpha: bootstrap settings (see :func:`bootstrap_mean_ci`).

    Returns:
        Columns ``sigma`` (float, or ``"all"``), ``n_images``, then for each of ``psnr_noisy``,
        ``psnr_denoised``, ``psnr_gain``, ``ssim_noisy``, ``ssim_denoised``, ``ssim_gain``: the mean and
        ``<name>_ci_low`` / ``<name>_ci_high``.
    """
    need = [f"{m}_{k}" for m in QUALITY_METRICS for k in ("noisy", "denoised")] + ["sigma"]
    missing = [c for c in need if c not in per_image.columns]
    if missing:
        raise ValueError(f"per-image table lacks column(s) {missing}")
    if per_image.empty:
        raise ValueError("per-image table is empty: no images were evaluated")
    df = per_image.copy()
    for m in QUALITY_METRICS:
        df[f"{m}_gain"] = df[f"{m}_denoised"] - df[f"{m}_noisy"]
    groups = [(float(s), g) for s, g in df.groupby("sigma", sort=True)] + [("all", df)]
    rows = []
    for sigma, g in groups:
        row: dict[str, Any] = {"sigma": sigma, "n_images": int(len(g))}
        for m in QUALITY_METRICS:
            for kind in ("noisy", "denoised", "gain"):
                col = f"{m}_{kind}"
                # same seed for every column: the gain CI is paired with the noisy/denoised resamples
                mean, lo, hi = bootstrap_mean_ci(g[col].to_numpy(), n_resamples, seed, alpha)
                row[col], row[f"{col}_ci_low"], row[f"{col}_ci_high"] = mean, lo, hi
        rows.append(row)
    return pd.DataFrame(rows)


def _fmt_ci(v: float, lo: float, hi: float, digits: int) -> str:
    if not math.isfinite(lo):
        return f"{v:.{digits}f}"
    return f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def denoising_markdown(table: pd.DataFrame) -> str:
    """Markdown table: sigma, images, PSNR noisy / denoised / gain (dB), SSIM noisy / denoised, with 95 % CIs."""
    lines = [
        "| sigma | images | PSNR noisy (dB) | PSNR denoised (dB) | PSNR gain (dB) | SSIM noisy | SSIM denoised |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in table.to_dict(orient="records"):
        cells = [
            r["sigma"] if isinstance(r["sigma"], str) else f"{r['sigma']:g}",
            str(r["n_images"]),
            _fmt_ci(r["psnr_noisy"], r["psnr_noisy_ci_low"], r["psnr_noisy_ci_high"], 2),
            _fmt_ci(r["psnr_denoised"], r["psnr_denoised_ci_low"], r["psnr_denoised_ci_high"], 2),
            _fmt_ci(r["psnr_gain"], r["psnr_gain_ci_low"], r["psnr_gain_ci_high"], 2),
            _fmt_ci(r["ssim_noisy"], r["ssim_noisy_ci_low"], r["ssim_noisy_ci_high"], 3),
            _fmt_ci(r["ssim_denoised"], r["ssim_denoised_ci_low"], r["ssim_denoised_ci_high"], 3),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_denoising_report(
    per_image: pd.DataFrame, out_dir: str | Path, n_resamples: int = 1000, seed: int = 0, alpha: float = 0.05
) -> tuple[pd.DataFrame, dict[str, Path]]:
    """Write ``per_image.csv``, ``denoising_metrics.csv``, ``denoising_metrics.md`` and ``denoising_metrics.json``.

    Returns:
        ``(table, {"per_image_csv", "metrics_csv", "metrics_md", "metrics_json"} -> Path)``.
    """
    from pipelines.evaluation.report import atomic_write_csv, atomic_write_json, atomic_write_text

    out = Path(out_dir)
    table = denoising_table(per_image, n_resamples=n_resamples, seed=seed, alpha=alpha)
    paths = {
        "per_image_csv": atomic_write_csv(out / "per_image.csv", per_image),
        "metrics_csv": atomic_write_csv(out / "denoising_metrics.csv", table),
        "metrics_md": atomic_write_text(out / "denoising_metrics.md", denoising_markdown(table)),
        "metrics_json": atomic_write_json(
            out / "denoising_metrics.json",
            {"table": table.to_dict(orient="records"), "n_resamples": int(n_resamples), "seed": int(seed),
             "alpha": float(alpha), "data_range": 1.0, "psnr_cap_db": PSNR_CAP_DB},
        ),
    }
    return table, paths


def mlflow_metrics(table: pd.DataFrame) -> dict[str, float]:
    """Finite scalars of a :func:`denoising_table`, named ``<metric>/sigma_<s>`` (``/all`` for the pooled row)."""
    out: dict[str, float] = {}
    for r in table.to_dict(orient="records"):
        suffix = "all" if isinstance(r["sigma"], str) else f"sigma_{r['sigma']:g}"
        for key, value in r.items():
            if key in ("sigma", "n_images") or value is None or not math.isfinite(float(value)):
                continue
            out[f"{key}/{suffix}"] = float(value)
    return out


class DenoisingReportHandler:
    """Collect per-image PSNR / SSIM during a MONAI evaluator run; on completion write and log the report.

    The evaluator's decollated output must hold ``pred`` (denoised), ``label`` (clean) and ``image`` (noisy)
    per sample, and the batch the sample's ``noise_sigma`` (see :class:`transforms.noise.AddGaussianNoised`).
    ``pred`` is clamped to [0, 1] before scoring.

    Files in ``output_dir``: see :func:`write_denoising_report`. MLflow: the table's scalars (e.g.
    ``psnr_denoised/sigma_0.3``, ``psnr_gain_ci_low/all``), the settings as params and the files as
    artifacts, in the active run, else in a new run of ``mlflow_experiment`` (tag ``stage=evaluation``) when
    ``mlflow_tracking_uri`` is given. ``engine.state.metrics`` receives ``psnr_denoised``, ``psnr_noisy``,
    ``ssim_denoised``, ``ssim_noisy`` of the pooled row.

    Args:
        output_dir: report folder (created).
        n_resamples: bootstrap resamples for the CIs (0: none).
        seed: bootstrap seed.
        alpha: two-sided CI level.
        mlflow_tracking_uri, mlflow_experiment, mlflow_run_name, tags: MLflow destination (see above).
        log_to_mlflow: set False to write files only.
        sigma_key, image_key, label_key, pred_key: data keys.
    """

    def __init__(
        self,
        output_dir: str | Path,
        n_resamples: int = 1000,
        seed: int = 0,
        alpha: float = 0.05,
        mlflow_tracking_uri: str | None = None,
        mlflow_experiment: str | None = None,
        mlflow_run_name: str | None = None,
        tags: Mapping[str, Any] | None = None,
        log_to_mlflow: bool = True,
        sigma_key: str = "noise_sigma",
        image_key: str = "image",
        label_key: str = "label",
        pred_key: str = "pred",
    ) -> None:
        if int(n_resamples) < 0:
            raise ValueError(f"n_resamples must be >= 0, got {n_resamples}")
        if not 0.0 < float(alpha) < 1.0:
            raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
        self.output_dir = Path(output_dir)
        self.n_resamples, self.seed, self.alpha = int(n_resamples), int(seed), float(alpha)
        self.mlflow_tracking_uri = mlflow_tracking_uri
        self.mlflow_experiment = mlflow_experiment or "evaluation"
        self.mlflow_run_name = mlflow_run_name
        self.tags = {str(k): str(v) for k, v in (tags or {}).items()}
        self.log_to_mlflow = bool(log_to_mlflow)
        self.sigma_key, self.image_key, self.label_key, self.pred_key = sigma_key, image_key, label_key, pred_key
        self.rows: list[dict[str, Any]] = []
        self.table: pd.DataFrame | None = None
        self.paths: dict[str, Path] = {}
        self.mlflow_run_id: str | None = None

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.COMPLETED, self)

    def reset(self, engine: Any = None) -> None:
        self.rows = []

    def collect(self, engine: Any) -> None:
        outputs = engine.state.output
        batch = engine.state.batch
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        batch = batch if isinstance(batch, (list, tuple)) else [batch]
        if len(outputs) != len(batch):
            raise ValueError("DenoisingReportHandler needs a decollated evaluator (decollate=True)")
        for out, item in zip(outputs, batch):
            missing = [k for k in (self.pred_key, self.label_key, self.image_key) if k not in out]
            if missing or self.sigma_key not in item:
                raise ValueError(
                    f"evaluator output lacks {missing or [self.sigma_key]}: the denoising report needs "
                    f"{self.pred_key!r}, {self.label_key!r}, {self.image_key!r} and the batch key {self.sigma_key!r}"
                )
            pred = torch.as_tensor(out[self.pred_key]).detach().float().clamp(0, 1)[None]
            clean = torch.as_tensor(out[self.label_key]).detach().float()[None]
            noisy = torch.as_tensor(out[self.image_key]).detach().float()[None]
            q_den = image_quality(pred, clean)
            q_noisy = image_quality(noisy, clean)
            meta = getattr(out[self.image_key], "meta", None) or {}
            name = item.get("image_name") or meta.get("filename_or_obj") or f"sample_{len(self.rows)}"
            self.rows.append(
                {
                    "image": Path(str(name)).name,
                    "subject_id": item.get("subject_id", ""),
                    "sigma": round(float(np.asarray(item[self.sigma_key]).reshape(-1)[0]), 6),
                    "psnr_noisy": float(q_noisy["psnr"][0]),
                    "psnr_denoised": float(q_den["psnr"][0]),
                    "ssim_noisy": float(q_noisy["ssim"][0]),
                    "ssim_denoised": float(q_den["ssim"][0]),
                }
            )

    def __call__(self, engine: Any) -> None:
        """Events.COMPLETED: gather the ranks' rows (under ``torch.distributed``, back in dataset order), then
        write and log the report on rank 0."""
        from pipelines.training.distributed import gather_in_order, sample_indices

        rows, is_main = gather_in_order(self.rows, sample_indices(engine))
        if not is_main:
            return
        if not rows:
            logger.warning("DenoisingReportHandler: no samples evaluated; no report written")
            return
        per_image = pd.DataFrame(rows)
        run = self._start_mlflow()
        try:
            table, paths = write_denoising_report(per_image, self.output_dir, self.n_resamples, self.seed, self.alpha)
            self.table, self.paths = table, paths
            pooled = table[table["sigma"] == "all"].iloc[0]
            for key in ("psnr_denoised", "psnr_noisy", "ssim_denoised", "ssim_noisy", "psnr_gain"):
                engine.state.metrics[key] = float(pooled[key])
            logger.info("denoising report:\n%s", denoising_markdown(table))
            if run is not None:
                self._log(run[0], run[1], table, len(per_image))
        except BaseException:
            if run is not None and run[2]:
                run[0].set_terminated(run[1], status="FAILED")
            raise
        if run is not None and run[2]:
            run[0].set_terminated(run[1], status="FINISHED")

    def _start_mlflow(self) -> tuple[Any, str, bool] | None:
        """(client, run_id, started_here) for the active run or a new one; None when MLflow is not used."""
        if not self.log_to_mlflow:
            return None
        from pipelines.tracking import open_run

        return open_run(self.mlflow_tracking_uri, self.mlflow_experiment, self.mlflow_run_name, self.tags, "denoising report")

    def _log(self, client: Any, run_id: str, table: pd.DataFrame, n_samples: int) -> None:
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, 0) for k, v in mlflow_metrics(table).items()]
        params = [
            Param("eval.n_samples", str(n_samples)),
            Param("eval.sigmas", json.dumps(sorted({float(s) for s in table["sigma"] if not isinstance(s, str)}))),
            Param("eval.n_resamples", str(self.n_resamples)),
            Param("eval.bootstrap_seed", str(self.seed)),
            Param("eval.ci_alpha", str(self.alpha)),
        ]
        tags = [RunTag(k, v) for k, v in self.tags.items()]
        for start in range(0, max(len(metrics), 1), 500):
            client.log_batch(run_id, metrics=metrics[start : start + 500], params=params if start == 0 else [],
                             tags=tags if start == 0 else [])
        for path in self.paths.values():
            client.log_artifact(run_id, str(path), artifact_path="evaluation")
        self.mlflow_run_id = run_id
