"""Classification metrics with stratified-bootstrap confidence intervals.

All metrics are computed from one vectorised routine over a batch of confusion matrices and one-vs-rest AUCs,
so point estimates and every bootstrap resample go through exactly the same code. Bootstrap resamples are drawn
in one place (``_Resampler``) as per-sample counts: per image, stratified by class, or, when cluster ids
(``groups``, e.g. ``subject_id``) repeat, per whole cluster, stratified by the cluster's label. The same draws
serve :func:`bootstrap_ci` and the paired two-arm comparison :func:`paired_difference_ci`.

Conventions:
    * ``y_true``: int class indices, shape (N,), values in [0, C).
    * ``probs``: class scores, shape (N, C), normally softmax probabilities in [0, 1]. Only the argmax (for the
      confusion matrix) and the per-class ranking (for AUC) are used, so any monotone score works.
    * Precision, recall (sensitivity) and F1 follow scikit-learn with ``zero_division=0``: 0 when undefined.
      Specificity and AUC have no scikit-learn twin and are NaN when undefined (no negatives, or no positives
      for AUC). ``macro_auc`` averages the defined per-class AUCs; for C == 2 it is the AUC of class 1.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Hashable, Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import rankdata

__all__ = [
    "SUMMARY_METRICS",
    "PER_CLASS_METRICS",
    "labels_to_indices",
    "classification_metrics",
    "bootstrap_ci",
    "paired_difference_ci",
    "evaluate_predictions",
    "metrics_table",
    "wilson_interval",
    "proportion_cis",
]

SUMMARY_METRICS = ("accuracy", "balanced_accuracy", "macro_specificity", "macro_f1", "weighted_f1", "macro_auc")
PER_CLASS_METRICS = ("precision", "recall", "specificity", "f1", "auc", "support")

# Elements per bootstrap chunk (resamples x samples): bounds memory at a few tens of MB for large test sets.
_CHUNK_ELEMENTS = 2_000_000


def labels_to_indices(labels: Any, num_classes: int | None = None) -> np.ndarray:
    """Convert labels given as indices, (N, 1) columns or one-hot rows to int class indices.

    Args:
        labels: array-like of shape (N,), (N, 1) or one-hot (N, C) with C > 1.
        num_classes: when given, one-hot rows must have this many columns and indices must lie in [0, C).

    Returns:
        int64 array of shape (N,).

    Raises:
        ValueError: on any other shape, non-integer values, or indices out of range.
    """
    arr = to_numpy(labels)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    elif arr.ndim == 2:
        if num_classes is not None and arr.shape[1] != num_classes:
            raise ValueError(f"one-hot labels have {arr.shape[1]} columns, expected {num_classes}")
        arr = arr.argmax(axis=1)
    elif arr.ndim != 1:
        raise ValueError(f"labels must have shape (N,), (N, 1) or (N, C); got {arr.shape}")
    if arr.size and not np.all(np.isfinite(arr.astype(float))):
        raise ValueError("labels contain non-finite values")
    if arr.size and not np.all(np.equal(np.mod(arr.astype(float), 1), 0)):
        raise ValueError("labels must be integer class indices")
    out = arr.astype(np.int64)
    if num_classes is not None and out.size and (out.min() < 0 or out.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}); got min {out.min()}, max {out.max()}")
    return out


def classification_metrics(y_true: Any, probs: Any, class_names: Sequence[str]) -> dict[str, Any]:
    """Point estimates of the classification metrics.

    Args:
        y_true: int class indices, shape (N,) (or one-hot (N, C)).
        probs: class probabilities, shape (N, C).
        class_names: C unique names, index-aligned with the columns of ``probs``.

    Returns:
        Ordered dict: ``accuracy``, ``balanced_accuracy``, ``macro_specificity``, ``macro_f1``, ``weighted_f1``,
        ``macro_auc``, then per class ``precision/<name>``, ``recall/<name>``, ``specificity/<name>``,
        ``f1/<name>``, ``auc/<name>``, ``support/<name>`` (all floats, NaN where undefined), and
        ``confusion_matrix`` (list of C lists of ints, rows = true class, columns = predicted class).
    """
    y, p, names = _validate(y_true, probs, class_names)
    n_classes = len(names)
    cm = _confusion_batch(y[None, :], p.argmax(axis=1)[None, :], n_classes)
    auc = np.stack([_auc_batch(p[None, :, k], y == k) for k in range(n_classes)], axis=1)
    values = _metrics_from_counts(cm, auc, names)
    out: dict[str, Any] = {key: float(val[0]) for key, val in values.items()}
    out["confusion_matrix"] = cm[0].astype(int).tolist()
    return out


def bootstrap_ci(
    y_true: Any,
    probs: Any,
    class_names: Sequence[str],
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    groups: Sequence[Hashable] | None = None,
) -> dict[str, tuple[float, float]]:
    """Stratified percentile bootstrap confidence intervals for every scalar metric.

    Image level (``groups`` is None, or every group holds one sample): samples are resampled with replacement
    within each true class, so every resample keeps the class supports of the test set (the CI reflects
    classifier variability, not label-mix variability).

    Subject level (``groups`` given and at least one group holds several samples): images of one subject are not
    independent, and resampling them one by one gives intervals that are too narrow. Whole groups are resampled
    with replacement instead, stratified by each group's label (its most frequent true label, the lowest class
    index on a tie), and the metrics of a resample are computed on all samples of the drawn groups, counted once
    per draw. Resamples then differ in size, and per-class supports vary when groups differ in size or hold
    several labels.

    Args:
        y_true: int class indices, shape (N,).
        probs: class probabilities, shape (N, C).
        class_names: C unique names.
        n_resamples: number of bootstrap resamples, >= 1.
        seed: seed of ``numpy.random.default_rng``; the same seed gives the same intervals.
        alpha: two-sided level in (0, 1); 0.05 gives 95 % intervals.
        groups: optional N hashable cluster ids (e.g. ``subject_id``), index-aligned with ``y_true``.

    Returns:
        ``{metric: (low, high)}`` for every key of :func:`classification_metrics` except ``confusion_matrix``;
        ``(nan, nan)`` where the metric is undefined in every resample.

    Raises:
        ValueError: on bad ``n_resamples``/``alpha``, inputs rejected by :func:`classification_metrics`, or
            ``groups`` of another length than ``y_true``.
    """
    _check_bootstrap_args(n_resamples, alpha)
    y, p, names = _validate(y_true, probs, class_names)
    sampler = _Resampler(y, len(names), groups)
    pred = p.argmax(axis=1)
    collected: dict[str, list[np.ndarray]] = {}
    for counts in sampler.counts(n_resamples, seed):
        for key, val in _weighted_metrics(y, p, pred, counts, names).items():
            collected.setdefault(key, []).append(val)
    return {key: _percentile_ci(np.concatenate(chunks), alpha) for key, chunks in collected.items()}


def paired_difference_ci(
    y_true: Any,
    probs_a: Sequence[Any],
    probs_b: Sequence[Any],
    class_names: Sequence[str],
    metrics: Sequence[str] = ("macro_f1", "macro_auc", "accuracy", "balanced_accuracy"),
    n_resamples: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
    groups: Sequence[Hashable] | None = None,
) -> dict[str, Any]:
    """Paired bootstrap CI of the difference between two arms (e.g. two methods), each run with several seeds.

    Every run of both arms predicts the same N test samples in the same order. Each resample draws one set of
    indices (image or subject level, stratified exactly as in :func:`bootstrap_ci`, same ``seed`` -> same
    indices), shared by all runs; in it every metric is computed for every run, averaged over the runs of each
    arm, and the difference ``mean(a) - mean(b)`` is recorded. Pairing removes the test-set variability common to
    both arms, and averaging over runs folds in training-seed variability of the mean.

    Args:
        y_true: int class indices, shape (N,).
        probs_a: list of (N, C) probability arrays, one per run of arm a.
        probs_b: list of (N, C) probability arrays, one per run of arm b.
        class_names: C unique names.
        metrics: scalar metric keys of :func:`classification_metrics` (e.g. ``macro_f1``, ``recall/AD``).
        n_resamples: number of bootstrap resamples, >= 1.
        seed: seed of ``numpy.random.default_rng``.
        alpha: two-sided level in (0, 1); 0.05 gives 95 % intervals.
        groups: optional N cluster ids (e.g. ``subject_id``); see :func:`bootstrap_ci`.

    Returns:
        ``{metric: {"a": float, "b": float, "diff": float, "ci": [low, high], "p_le_0": float}, ...,
        "n_samples": N, "n_resamples": int, "bootstrap_unit": "image" | "subject"}``. ``a`` and ``b`` are the
        point estimates averaged over each arm's runs, ``diff = a - b``, ``ci`` the percentile interval of the
        resampled differences and ``p_le_0`` the fraction of resamples (with a defined difference) where
        ``diff <= 0``, a one-sided bootstrap p-value for "a is better than b". NaN where undefined.

    Raises:
        ValueError: on an empty arm, arrays of different N or C, an unknown metric, or bad bootstrap arguments.
    """
    _check_bootstrap_args(n_resamples, alpha)
    arms = {"probs_a": probs_a, "probs_b": probs_b}
    for arm, runs in arms.items():
        if isinstance(runs, np.ndarray) or hasattr(runs, "detach") or len(runs) == 0:
            raise ValueError(f"{arm} must be a non-empty list of (N, C) probability arrays, one per run")
    y = labels_to_indices(y_true, len(class_names))
    checked: dict[str, list[np.ndarray]] = {}
    for arm, runs in arms.items():
        checked[arm] = []
        for i, run in enumerate(runs):
            arr = to_numpy(run)
            if arr.ndim != 2 or arr.shape[0] != len(y):
                raise ValueError(
                    f"{arm}[{i}] must have shape (N, C) with N = {len(y)} samples of y_true; got {arr.shape}"
                )
            checked[arm].append(_validate(y, arr, class_names)[1])
    y, _, names = _validate(y, checked["probs_a"][0], class_names)
    keys = [str(m) for m in metrics]
    known = [k for k in classification_metrics(y, checked["probs_a"][0], names) if k != "confusion_matrix"]
    unknown = [k for k in keys if k not in known]
    if not keys or unknown:
        raise ValueError(f"metrics must be a non-empty subset of {known}; unknown: {unknown}")
    need_auc = any(k == "macro_auc" or k.startswith("auc/") for k in keys)
    point = {}
    for arm, runs in checked.items():
        per_run = [classification_metrics(y, p, names) for p in runs]
        point[arm] = {k: float(np.mean([m[k] for m in per_run])) for k in keys}
    sampler = _Resampler(y, len(names), groups)
    diffs: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    for counts in sampler.counts(n_resamples, seed):
        means = {}
        for arm, runs in checked.items():
            per_run = [_weighted_metrics(y, p, p.argmax(axis=1), counts, names, need_auc) for p in runs]
            means[arm] = {k: np.mean([m[k] for m in per_run], axis=0) for k in keys}
        for k in keys:
            diffs[k].append(means["probs_a"][k] - means["probs_b"][k])
    out: dict[str, Any] = {}
    for k in keys:
        d = np.concatenate(diffs[k])
        finite = d[np.isfinite(d)]
        a, b = point["probs_a"][k], point["probs_b"][k]
        out[k] = {
            "a": a,
            "b": b,
            "diff": a - b,
            "ci": list(_percentile_ci(d, alpha)),
            "p_le_0": float(np.mean(finite <= 0.0)) if finite.size else math.nan,
        }
    out.update({"n_samples": int(len(y)), "n_resamples": int(n_resamples), "bootstrap_unit": sampler.unit})
    return out


def evaluate_predictions(
    y_true: Any,
    probs: Any,
    class_names: Sequence[str],
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    groups: Sequence[Hashable] | None = None,
) -> dict[str, Any]:
    """Point estimates, bootstrap CIs, confusion matrix and supports in one JSON-ready dict.

    Args:
        y_true: int class indices, shape (N,).
        probs: class probabilities, shape (N, C).
        class_names: C unique names.
        n_resamples: bootstrap resamples; 0 skips the bootstrap (CIs are NaN).
        seed: bootstrap seed.
        alpha: two-sided CI level.
        groups: optional N cluster ids (e.g. ``subject_id``): when a group holds several samples the bootstrap
            resamples whole groups (see :func:`bootstrap_ci`).

    Returns:
        ``{"metrics": {name: float}, "ci": {name: [low, high]}, "confusion_matrix": [[int]],
        "support": {class: int}, "class_names": [...], "n_samples": N, "n_resamples", "seed", "alpha",
        "bootstrap_unit": "subject" | "image", "n_groups"}``; ``n_groups`` is the number of distinct ids in
        ``groups`` (N when ``groups`` is None: every image is its own unit). Point estimates and Wilson
        intervals are per image whatever the unit.
    """
    point = classification_metrics(y_true, probs, class_names)
    cm = point.pop("confusion_matrix")
    n_samples = int(sum(map(sum, cm)))
    sampler = _Resampler(labels_to_indices(y_true, len(class_names)), len(class_names), groups)
    if n_resamples:
        ci = bootstrap_ci(y_true, probs, class_names, n_resamples=n_resamples, seed=seed, alpha=alpha,
                          groups=groups)
    else:
        ci = {key: (math.nan, math.nan) for key in point}
    names = [str(c) for c in class_names]
    return {
        "metrics": point,
        "ci": {key: [float(lo), float(hi)] for key, (lo, hi) in ci.items()},
        "ci_wilson": proportion_cis(cm, names, alpha),
        "confusion_matrix": cm,
        "support": {name: int(sum(cm[k])) for k, name in enumerate(names)},
        "class_names": names,
        "n_samples": n_samples,
        "n_resamples": int(n_resamples),
        "seed": int(seed),
        "alpha": float(alpha),
        "bootstrap_unit": sampler.unit,
        "n_groups": sampler.n_groups,
    }


def wilson_interval(successes: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (NaN when ``n == 0``).

    Unlike a bootstrap percentile interval it does not collapse to a point when every trial succeeded:
    6 of 6 correct gives [0.61, 1.00] at 95 %, which is what 6 images can tell.
    """
    if n <= 0:
        return (math.nan, math.nan)
    from scipy.stats import norm

    z = float(norm.ppf(1.0 - alpha / 2.0))
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def proportion_cis(cm: Sequence[Sequence[int]], class_names: Sequence[str], alpha: float = 0.05) -> dict[str, list[float]]:
    """Wilson intervals of the metrics that are binomial proportions of the confusion matrix ``cm`` (rows = true):
    accuracy and, per class, precision, recall (sensitivity) and specificity."""
    m = np.asarray(cm, dtype=np.int64)
    total = int(m.sum())
    out = {"accuracy": list(wilson_interval(int(np.trace(m)), total, alpha))}
    for k, name in enumerate(class_names):
        tp = int(m[k, k])
        fn = int(m[k].sum()) - tp
        fp = int(m[:, k].sum()) - tp
        tn = total - tp - fn - fp
        out[f"precision/{name}"] = list(wilson_interval(tp, tp + fp, alpha))
        out[f"recall/{name}"] = list(wilson_interval(tp, tp + fn, alpha))
        out[f"specificity/{name}"] = list(wilson_interval(tn, tn + fp, alpha))
    return out


def metrics_table(result: dict[str, Any]) -> pd.DataFrame:
    """One row per scalar metric of an :func:`evaluate_predictions` result.

    Returns:
        DataFrame with columns ``metric``, ``value``, ``ci_low``, ``ci_high`` in the result's metric order.
    """
    rows = []
    wilson = result.get("ci_wilson", {})
    for key, value in result["metrics"].items():
        lo, hi = result.get("ci", {}).get(key, (math.nan, math.nan))
        wlo, whi = wilson.get(key, (math.nan, math.nan))
        rows.append({"metric": key, "value": value, "ci_low": lo, "ci_high": hi, "wilson_low": wlo, "wilson_high": whi})
    return pd.DataFrame(rows, columns=["metric", "value", "ci_low", "ci_high", "wilson_low", "wilson_high"])


def to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if hasattr(x, "as_tensor"):  # MONAI MetaTensor
            x = x.as_tensor()
        x = x.numpy()
    return np.asarray(x)


def _validate(y_true: Any, probs: Any, class_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    names = [str(c) for c in class_names]
    if len(names) < 2:
        raise ValueError(f"class_names needs at least 2 classes, got {names}")
    if len(set(names)) != len(names):
        raise ValueError(f"class_names must be unique, got {names}")
    p = to_numpy(probs).astype(np.float64)
    if p.ndim != 2 or p.shape[1] != len(names):
        raise ValueError(f"probs must have shape (N, {len(names)}) for classes {names}; got {p.shape}")
    if not np.all(np.isfinite(p)):
        raise ValueError("probs contain NaN or infinite values")
    y = labels_to_indices(y_true, len(names))
    if len(y) != len(p):
        raise ValueError(f"y_true has {len(y)} samples but probs has {len(p)}")
    if len(y) == 0:
        raise ValueError("cannot compute metrics on an empty set of predictions")
    return y, p, names


def _confusion_batch(y: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Confusion matrices (B, C, C), rows = true class, from label and prediction arrays of shape (B, N)."""
    b = y.shape[0]
    flat = (np.arange(b)[:, None] * n_classes * n_classes + y * n_classes + pred).ravel()
    return np.bincount(flat, minlength=b * n_classes * n_classes).reshape(b, n_classes, n_classes)


def _auc_batch(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """One-vs-rest ROC AUC per row via the Mann-Whitney U statistic (average ranks handle ties).

    Args:
        scores: (B, N) scores of the positive class.
        positive: (N,) bool mask, shared by all rows.

    Returns:
        (B,) AUC in [0, 1]; NaN when the mask has no positives or no negatives.
    """
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return np.full(scores.shape[0], np.nan)
    ranks = rankdata(scores, axis=1)
    u = ranks[:, positive].sum(axis=1) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def _check_bootstrap_args(n_resamples: int, alpha: float) -> None:
    if int(n_resamples) < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")


def _percentile_ci(values: np.ndarray, alpha: float) -> tuple[float, float]:
    """Two-sided percentile interval of resampled values, ignoring NaN; (nan, nan) when all are NaN."""
    q = [100.0 * alpha / 2.0, 100.0 * (1.0 - alpha / 2.0)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN metric: (nan, nan) is the answer
        lo, hi = np.nanpercentile(values, q)
    return float(lo), float(hi)


def _group_codes(groups: Sequence[Hashable], n: int) -> np.ndarray:
    """Integer codes 0..G-1 (in order of first appearance) of N hashable cluster ids."""
    if hasattr(groups, "detach") or isinstance(groups, np.ndarray):
        groups = to_numpy(groups).tolist()  # numpy/torch scalars -> hashable Python values
    ids = list(groups)
    if len(ids) != n:
        raise ValueError(f"groups has {len(ids)} ids but y_true has {n} samples")
    index: dict[Hashable, int] = {}
    try:
        return np.fromiter((index.setdefault(g, len(index)) for g in ids), dtype=np.int64, count=n)
    except TypeError as err:
        raise ValueError(f"groups must hold hashable ids (e.g. subject_id strings): {err}") from err


class _Resampler:
    """Stratified bootstrap draws, as per-sample counts, at image or subject level.

    The one place where resampling indices are drawn, shared by :func:`bootstrap_ci` and
    :func:`paired_difference_ci`. A resample is a row of ``counts`` (B, N): how often each sample enters it.

    Image level (no groups, or all groups singletons): within each true class, draw as many samples as the class
    holds, with replacement. Subject level: within each group label (the group's most frequent true label), draw
    as many groups as hold that label, with replacement; each sample counts as often as its group was drawn.

    Args:
        y: int class indices, shape (N,).
        n_classes: C.
        groups: optional N hashable cluster ids.

    Attributes:
        unit: ``"image"`` or ``"subject"``.
        n_groups: distinct ids in ``groups`` (N when ``groups`` is None).
    """

    def __init__(self, y: np.ndarray, n_classes: int, groups: Sequence[Hashable] | None = None) -> None:
        self.n_samples = len(y)
        self.n_groups = self.n_samples
        self._codes: np.ndarray | None = None
        if groups is not None:
            codes = _group_codes(groups, self.n_samples)
            self.n_groups = int(codes.max()) + 1 if codes.size else 0
            if self.n_groups < self.n_samples:
                self._codes = codes
        self.unit = "image" if self._codes is None else "subject"
        if self._codes is None:
            unit_label, self._n_units = y, self.n_samples
        else:
            votes = np.bincount(self._codes * n_classes + y, minlength=self.n_groups * n_classes)
            unit_label, self._n_units = votes.reshape(self.n_groups, n_classes).argmax(axis=1), self.n_groups
        self._strata = [np.flatnonzero(unit_label == k) for k in range(n_classes)]

    def counts(self, n_resamples: int, seed: int) -> Iterator[np.ndarray]:
        """Yield int64 count arrays (B, N), B <= a chunk bounding memory, ``n_resamples`` rows in all."""
        rng = np.random.default_rng(seed)
        chunk = max(1, _CHUNK_ELEMENTS // max(self.n_samples, 1))
        remaining = int(n_resamples)
        while remaining > 0:
            b = min(chunk, remaining)
            remaining -= b
            drawn = np.concatenate(
                [ix[rng.integers(0, len(ix), size=(b, len(ix)))] for ix in self._strata if len(ix)], axis=1
            )
            flat = (np.arange(b)[:, None] * self._n_units + drawn).ravel()
            unit_counts = np.bincount(flat, minlength=b * self._n_units).reshape(b, self._n_units)
            yield unit_counts if self._codes is None else unit_counts[:, self._codes]


def _weighted_metrics(
    y: np.ndarray, p: np.ndarray, pred: np.ndarray, counts: np.ndarray, names: list[str], need_auc: bool = True
) -> dict[str, np.ndarray]:
    """All scalar metrics, each (B,), of B resamples given as per-sample counts (B, N).

    Counts are integers, so every sum below is exact in float64 and a resample gives bit for bit the metrics of
    the explicitly resampled arrays.
    """
    n_classes = len(names)
    w = counts.astype(np.float64)
    pairs = np.zeros((len(y), n_classes * n_classes))
    pairs[np.arange(len(y)), y * n_classes + pred] = 1.0
    cm = (w @ pairs).reshape(len(w), n_classes, n_classes)
    if need_auc:
        auc = np.stack([_weighted_auc(w, p[:, k], y == k) for k in range(n_classes)], axis=1)
    else:
        auc = np.full((len(w), n_classes), math.nan)
    return _metrics_from_counts(cm, auc, names)


def _weighted_auc(w: np.ndarray, scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """One-vs-rest ROC AUC per row of sample weights (B, N), via the Mann-Whitney U with ties counted half.

    Args:
        w: (B, N) non-negative sample counts.
        scores: (N,) scores of the positive class.
        positive: (N,) bool mask.

    Returns:
        (B,) AUC in [0, 1]; NaN in rows without positive or negative weight.
    """
    order = np.argsort(scores, kind="stable")
    s = scores[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # first sample of each run of tied scores
    ws = w[:, order]
    total = np.add.reduceat(ws, starts, axis=1)
    pos = np.add.reduceat(ws * positive[order], starts, axis=1)
    neg = total - pos
    neg_below = np.cumsum(neg, axis=1) - neg
    u = (pos * (neg_below + 0.5 * neg)).sum(axis=1)
    return _safe_div(u, pos.sum(axis=1) * neg.sum(axis=1), math.nan)


def _safe_div(num: np.ndarray, den: np.ndarray, undefined: float) -> np.ndarray:
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, undefined, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _metrics_from_counts(cm: np.ndarray, auc: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    """All scalar metrics, each of shape (B,), from confusion matrices (B, C, C) and AUCs (B, C)."""
    cm = cm.astype(np.float64)
    n = cm.sum(axis=(1, 2))
    tp = np.diagonal(cm, axis1=1, axis2=2)
    support = cm.sum(axis=2)
    predicted = cm.sum(axis=1)
    fp = predicted - tp
    fn = support - tp
    tn = n[:, None] - tp - fp - fn
    precision = _safe_div(tp, predicted, 0.0)
    recall = _safe_div(tp, support, 0.0)
    specificity = _safe_div(tn, tn + fp, math.nan)
    f1 = _safe_div(2 * tp, 2 * tp + fp + fn, 0.0)
    present = support > 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # mean of an empty/all-NaN slice is NaN by design
        balanced = np.where(present, recall, np.nan)
        balanced_accuracy = np.nanmean(balanced, axis=1)
        # Mean one-vs-rest specificity; the macro sensitivity is balanced_accuracy.
        macro_specificity = np.nanmean(specificity, axis=1)
        macro_auc = auc[:, 1] if len(names) == 2 else np.nanmean(auc, axis=1)
    out = {
        "accuracy": _safe_div(tp.sum(axis=1), n, math.nan),
        "balanced_accuracy": balanced_accuracy,
        "macro_specificity": macro_specificity,
        "macro_f1": f1.mean(axis=1),
        "weighted_f1": _safe_div((f1 * support).sum(axis=1), support.sum(axis=1), math.nan),
        "macro_auc": macro_auc,
    }
    per_class = {
        "precision": precision,
        "recall": recall,
        "specificity": specificity,
        "f1": f1,
        "auc": auc,
        "support": support,
    }
    for metric, arr in per_class.items():
        for k, name in enumerate(names):
            out[f"{metric}/{name}"] = arr[:, k]
    return out
