"""Writes an evaluation result (see :func:`pipelines.evaluation.metrics.evaluate_predictions`) to disk.

Every file is written to a temporary sibling and moved into place with ``os.replace``, so a crash never leaves
a half-written report next to complete ones.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from pipelines.evaluation.metrics import PER_CLASS_METRICS, SUMMARY_METRICS, metrics_table  # noqa: E402
from pipelines.io.atomic import atomic_write  # noqa: E402  (re-exported: the reports' historical home)

__all__ = [
    "atomic_write",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_write_csv",
    "atomic_save_figure",
    "classification_report_table",
    "write_evaluation",
    "markdown_table",
]


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomically write UTF-8 text."""
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write strict JSON (NaN and infinities become ``null``)."""
    return atomic_write_text(path, json.dumps(_json_safe(obj), indent=2, allow_nan=False) + "\n")


def atomic_write_csv(path: str | os.PathLike, df: pd.DataFrame) -> Path:
    """Atomically write a DataFrame as CSV without its index."""
    return atomic_write(path, lambda p: df.to_csv(p, index=False))


def write_probabilities(path: str | os.PathLike, images: Sequence[str], labels: Any, probs: Any,
                        class_names: Sequence[str]) -> Path:
    """Atomically write per-image predictions as CSV: ``image``, ``label`` (class name), ``prob_<class>`` columns.

    This is the exchange format of the quality harness: two models scored on the same images can be paired by
    the ``image`` column (write absolute, resolved paths); labels and columns are named, so two models with
    different class orders still pair up. ``labels`` are class indices into ``class_names``.
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels).astype(int).ravel()
    if probs.ndim != 2 or probs.shape != (len(images), len(class_names)) or len(labels) != len(images):
        raise ValueError(f"{path}: expected {len(images)} images x {len(class_names)} classes of probabilities and "
                         f"{len(images)} labels, got probs {probs.shape} and {len(labels)} labels")
    df = pd.DataFrame({"image": [str(i) for i in images], "label": [str(class_names[k]) for k in labels]})
    for k, name in enumerate(class_names):
        df[f"prob_{name}"] = probs[:, k]
    return atomic_write_csv(path, df)


def read_probabilities(path: str | os.PathLike, class_names: Sequence[str]) -> pd.DataFrame:
    """Read a :func:`write_probabilities` CSV in ``class_names`` order; ``label`` becomes the class index.

    Rows are sorted by ``image``. Raises ValueError naming the file for missing columns, unknown labels or
    duplicated images.
    """
    df = pd.read_csv(path, dtype={"image": str, "label": str})
    cols = ["image", "label"] + [f"prob_{c}" for c in class_names]
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; expected {cols}")
    if df["image"].duplicated().any():
        raise ValueError(f"{path}: duplicated image rows, e.g. {df.loc[df['image'].duplicated(), 'image'].iloc[0]}")
    index = {str(c): k for k, c in enumerate(class_names)}
    unknown = sorted(set(df["label"]) - set(index))
    if unknown:
        raise ValueError(f"{path}: label(s) {unknown} are not among the classes {list(class_names)}")
    df = df.assign(label=df["label"].map(index).astype(int))
    return df[cols].sort_values("image", kind="stable").reset_index(drop=True)


def atomic_save_figure(fig: Any, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Atomically save a matplotlib figure as PNG and close it."""
    try:
        return atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=dpi, bbox_inches="tight"))
    finally:
        plt.close(fig)


def classification_report_table(result: dict[str, Any]) -> pd.DataFrame:
    """Per-class table: ``class``, ``support``, then ``<metric>``, ``<metric>_ci_low``, ``<metric>_ci_high`` for
    precision, recall, specificity, f1 and auc."""
    metrics, ci = result["metrics"], result.get("ci", {})
    rows = []
    for name in result["class_names"]:
        row: dict[str, Any] = {"class": name, "support": int(result["support"][name])}
        for metric in PER_CLASS_METRICS:
            if metric == "support":
                continue
            key = f"{metric}/{name}"
            lo, hi = ci.get(key, (math.nan, math.nan))
            row[metric] = metrics[key]
            row[f"{metric}_ci_low"] = lo
            row[f"{metric}_ci_high"] = hi
            if key in result.get("ci_wilson", {}):
                row[f"{metric}_wilson_low"], row[f"{metric}_wilson_high"] = result["ci_wilson"][key]
        rows.append(row)
    return pd.DataFrame(rows)


def write_evaluation(
    result: dict[str, Any], out_dir: str | os.PathLike, class_names: Sequence[str] | None = None
) -> dict[str, Path]:
    """Write the standard evaluation report.

    Args:
        result: output of :func:`~pipelines.evaluation.metrics.evaluate_predictions` (extra JSON-serialisable
            keys, e.g. ``calibration``, are kept in metrics.json).
        out_dir: folder, created if needed.
        class_names: class order for the confusion-matrix axes; defaults to ``result["class_names"]`` and must
            match it when given.

    Returns:
        ``{"metrics_json", "metrics_ci_csv", "classification_report_csv", "confusion_matrix_png"}`` -> Path.
    """
    names = list(result["class_names"]) if class_names is None else [str(c) for c in class_names]
    if names != list(result["class_names"]):
        raise ValueError(f"class_names {names} differ from the result's {result['class_names']}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return {
        "metrics_json": atomic_write_json(out / "metrics.json", result),
        "metrics_ci_csv": atomic_write_csv(out / "metrics_ci.csv", metrics_table(result)),
        "classification_report_csv": atomic_write_csv(
            out / "classification_report.csv", classification_report_table(result)
        ),
        "confusion_matrix_png": atomic_save_figure(
            _confusion_figure(np.asarray(result["confusion_matrix"]), names), out / "confusion_matrix.png"
        ),
    }


def markdown_table(result: dict[str, Any], per_class: bool = True, digits: int = 3) -> str:
    """Markdown tables (summary metrics, then per class) with ``value [low, high]`` cells, for docs/README.md."""
    level = 100.0 * (1.0 - float(result.get("alpha", 0.05)))
    metrics, ci = result["metrics"], result.get("ci", {})

    wilson = result.get("ci_wilson", {})

    def cell(key: str) -> str:
        lo, hi = ci.get(key, (math.nan, math.nan))
        text = f"{_fmt(metrics[key], digits)} [{_fmt(lo, digits)}, {_fmt(hi, digits)}]"
        if key in wilson:  # proportions: the Wilson interval does not collapse on small, all-correct classes
            text += f" W[{_fmt(wilson[key][0], digits)}, {_fmt(wilson[key][1], digits)}]"
        return text

    unit = result.get("bootstrap_unit")
    by = f", {unit}s resampled" if unit else ""
    lines = [
        f"| metric | value [{level:g}% bootstrap CI{by}] W[Wilson CI, proportions only] |",
        "|---|---|",
        *(f"| {key} | {cell(key)} |" for key in SUMMARY_METRICS if key in metrics),
    ]
    if per_class:
        cols = [m for m in PER_CLASS_METRICS if m != "support"]
        lines += ["", "| class | support | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
        for name in result["class_names"]:
            cells = " | ".join(cell(f"{m}/{name}") for m in cols)
            lines.append(f"| {name} | {int(result['support'][name])} | {cells} |")
    return "\n".join(lines) + "\n"


def _fmt(value: float, digits: int) -> str:
    return "n/a" if value is None or not math.isfinite(float(value)) else f"{float(value):.{digits}f}"


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, np.ndarray):
        return _json_safe(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _confusion_figure(cm: np.ndarray, names: list[str]) -> Any:
    rows = cm.sum(axis=1, keepdims=True)
    normed = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    size = max(4.0, 0.6 * len(names) + 2.5)
    fig, axes = plt.subplots(1, 2, figsize=(2 * size + 1, size))
    panels = ((axes[0], cm, "counts", "d"), (axes[1], normed, "row-normalised (recall)", ".2f"))
    for ax, mat, title, fmt in panels:
        im = ax.imshow(mat, cmap="Blues", vmin=0, vmax=(1.0 if fmt == ".2f" else max(1, mat.max())))
        ax.set_title(f"Confusion matrix: {title}")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        threshold = (mat.max() if mat.size else 0) / 2.0
        for i in range(mat.shape[0]):
            for j in range(mat.shape[1]):
                ax.text(j, i, format(mat[i, j], fmt), ha="center", va="center",
                        color="white" if mat[i, j] > threshold else "black", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig
