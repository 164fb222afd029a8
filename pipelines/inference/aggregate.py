"""Study-level aggregation of per-slice (or per-image) class probabilities."""

from __future__ import annotations

import numpy as np


def aggregate_probs(
    probs: np.ndarray, method: str = "mean", k: int = 3, weights: np.ndarray | None = None, renormalize: bool = True
) -> np.ndarray:
    """Combine slice probabilities ``(N, C)`` into one study probability vector ``(C,)``.

    Args:
        probs: per-slice class probabilities, rows summing to 1.
        method: ``mean`` (average), ``max`` (class-wise maximum, renormalised), ``topk_mean`` (for each class,
            the mean of its ``k`` highest slice probabilities, renormalised; the usual choice for a finding
            visible on a few slices), or ``weighted`` (soft voting with per-slice ``weights``, e.g. the
            validation accuracy of each slice position as in ClinicaDL).
        k: slices averaged by ``topk_mean``.
        weights: per-slice non-negative weights for ``weighted``.
        renormalize: divide the result by its sum. False keeps each class's own statistic, e.g. the highest
            slice probability of a finding for ``max`` (detection tasks score a study by that number).

    Raises:
        ValueError: empty input, a bad method, or weights of the wrong length / all zero.
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] == 0:
        raise ValueError(f"expected slice probabilities of shape (N, C) with N >= 1, got {p.shape}")
    if method == "mean":
        out = p.mean(axis=0)
    elif method == "max":
        out = p.max(axis=0)
    elif method == "topk_mean":
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        kk = min(k, p.shape[0])
        out = np.sort(p, axis=0)[-kk:].mean(axis=0)
    elif method == "weighted":
        if weights is None or len(weights) != p.shape[0]:
            raise ValueError(f"weighted aggregation needs {p.shape[0]} weights, got {None if weights is None else len(weights)}")
        w = np.clip(np.asarray(weights, dtype=np.float64), 0, None)
        if w.sum() <= 0:
            raise ValueError("weighted aggregation: all weights are zero")
        out = (p * w[:, None]).sum(axis=0) / w.sum()
    else:
        raise ValueError(f"unknown aggregation {method!r}; use mean, max, topk_mean or weighted")
    if not renormalize:
        return out
    total = out.sum()
    return out / total if total > 0 else out
