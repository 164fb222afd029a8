"""Temperature scaling and calibration measures (Guo et al., "On Calibration of Modern Neural Networks",
ICML 2017)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy.optimize import minimize_scalar  # noqa: E402
from scipy.special import log_softmax, logsumexp  # noqa: E402

from pipelines.evaluation.metrics import labels_to_indices, to_numpy  # noqa: E402
from pipelines.evaluation.report import atomic_save_figure  # noqa: E402

__all__ = [
    "fit_temperature",
    "apply_temperature",
    "expected_calibration_error",
    "nll",
    "calibration_summary",
    "reliability_diagram",
]

# Search range of the inverse temperature 1/T: T in [0.01, 100] covers any realistic network.
_BETA_BOUNDS = (0.01, 100.0)


def fit_temperature(logits: Any, labels: Any) -> float:
    """Fit the temperature T > 0 that minimises the NLL of ``softmax(logits / T)``.

    The NLL is convex in the inverse temperature 1/T (log-sum-exp of a linear function minus a linear function),
    so a bounded 1-D search finds the global minimum deterministically.

    Args:
        logits: raw network outputs, shape (N, C), typically from the validation set.
        labels: int class indices (N,) or one-hot (N, C).

    Returns:
        T in [0.01, 100]; T > 1 softens over-confident predictions.
    """
    z = _logits(logits)
    y = labels_to_indices(labels, z.shape[1])
    if len(y) != len(z) or len(y) == 0:
        raise ValueError(f"need matching, non-empty logits and labels; got {len(z)} logits and {len(y)} labels")
    target = z[np.arange(len(y)), y]

    def objective(beta: float) -> float:
        return float(np.mean(logsumexp(beta * z, axis=1) - beta * target))

    res = minimize_scalar(objective, bounds=_BETA_BOUNDS, method="bounded", options={"xatol": 1e-6})
    return float(1.0 / res.x)


def apply_temperature(logits: Any, temperature: float) -> np.ndarray:
    """Calibrated probabilities ``softmax(logits / T)``, shape (N, C)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return np.exp(log_softmax(_logits(logits) / float(temperature), axis=1))


def nll(probs: Any, labels: Any, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood (nats) of the true class; probabilities are clipped at ``eps``."""
    p = _probs(probs)
    y = labels_to_indices(labels, p.shape[1])
    return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], eps, 1.0))))


def expected_calibration_error(probs: Any, labels: Any, n_bins: int = 15) -> float:
    """Top-label expected calibration error with ``n_bins`` equal-width confidence bins.

    ECE = sum_b (n_b / N) * |accuracy_b - mean confidence_b|, bins (i/n, (i+1)/n].

    Returns:
        ECE in [0, 1].
    """
    acc, conf, counts = _bin_stats(_probs(probs), labels, n_bins)
    return float(np.sum(counts * np.abs(acc - conf)) / max(counts.sum(), 1))


def calibration_summary(
    val_logits: Any, val_labels: Any, test_logits: Any, test_labels: Any, n_bins: int = 15
) -> dict[str, float]:
    """Fit T on validation logits and measure ECE/NLL before and after on the test set.

    Returns:
        ``{"temperature", "ece_before", "ece_after", "nll_before", "nll_after"}``.
    """
    t = fit_temperature(val_logits, val_labels)
    before = apply_temperature(test_logits, 1.0)
    after = apply_temperature(test_logits, t)
    return {
        "temperature": t,
        "ece_before": expected_calibration_error(before, test_labels, n_bins),
        "ece_after": expected_calibration_error(after, test_labels, n_bins),
        "nll_before": nll(before, test_labels),
        "nll_after": nll(after, test_labels),
    }


def reliability_diagram(
    probs_before: Any, probs_after: Any, labels: Any, path: str | os.PathLike, n_bins: int = 15
) -> Path:
    """Side-by-side reliability diagrams (accuracy vs confidence per bin) before and after calibration, as PNG.

    Returns:
        ``path``.
    """
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), sharey=True)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    centres = (edges[:-1] + edges[1:]) / 2.0
    for ax, probs, title in ((axes[0], probs_before, "before"), (axes[1], probs_after, "after temperature scaling")):
        p = _probs(probs)
        acc, conf, counts = _bin_stats(p, labels, n_bins)
        filled = counts > 0
        ax.bar(centres[filled], acc[filled], width=1.0 / n_bins, edgecolor="black", color="tab:blue",
               label="accuracy")
        ax.bar(centres[filled], (conf - acc)[filled], bottom=acc[filled], width=1.0 / n_bins, color="tab:red",
               alpha=0.35, edgecolor="tab:red", label="gap to confidence")
        ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
        ece = expected_calibration_error(p, labels, n_bins)
        ax.set_title(f"{title}\nECE {ece:.3f}, NLL {nll(p, labels):.3f}")
        ax.set_xlabel("confidence (top-class probability)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return atomic_save_figure(fig, path)


def _logits(logits: Any) -> np.ndarray:
    z = to_numpy(logits).astype(np.float64)
    if z.ndim != 2 or z.shape[1] < 2:
        raise ValueError(f"logits must have shape (N, C) with C >= 2; got {z.shape}")
    if not np.all(np.isfinite(z)):
        raise ValueError("logits contain NaN or infinite values")
    return z


def _probs(probs: Any) -> np.ndarray:
    p = to_numpy(probs).astype(np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"probs must have shape (N, C) with C >= 2; got {p.shape}")
    return p


def _bin_stats(p: np.ndarray, labels: Any, n_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if int(n_bins) < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    y = labels_to_indices(labels, p.shape[1])
    if len(y) != len(p):
        raise ValueError(f"{len(p)} probability rows but {len(y)} labels")
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    # Right-closed bins (i/n, (i+1)/n]; confidence 0 falls into the first bin.
    bins = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins).astype(np.float64)
    acc = np.divide(np.bincount(bins, correct, n_bins), counts, out=np.zeros(n_bins), where=counts > 0)
    mean_conf = np.divide(np.bincount(bins, conf, n_bins), counts, out=np.zeros(n_bins), where=counts > 0)
    return acc, mean_conf, counts
