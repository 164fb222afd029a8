"""Ignite metrics over a whole validation epoch (macro-F1, accuracy, macro AUC, per-class recall).

MONAI evaluators hand metrics a ``(preds, labels)`` pair of per-sample lists (``from_engine(["pred",
"label"])``); these metrics stack them, keep logits and labels for the epoch, and compute the score once.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from ignite.metrics import Metric
from monai.handlers import from_engine
from sklearn.metrics import f1_score, recall_score, roc_auc_score


def _as_labels(labels) -> torch.Tensor:
    t = torch.stack([torch.as_tensor(x) for x in labels]) if isinstance(labels, (list, tuple)) else torch.as_tensor(labels)
    if t.ndim > 1 and t.shape[-1] > 1:  # one-hot
        return t.argmax(-1)
    return t.view(-1).long()


def macro_auc(y: np.ndarray, probs: np.ndarray) -> float:
    """Mean one-vs-rest ROC AUC over the classes that have both positives and negatives (NaN if none)."""
    aucs = []
    for c in range(probs.shape[1]):
        pos = y == c
        if pos.any() and (~pos).any():
            aucs.append(roc_auc_score(pos, probs[:, c]))
    return float(np.mean(aucs)) if aucs else float("nan")


class EpochClassificationMetric(Metric):
    """One scalar computed from all logits and labels of an epoch.

    Args:
        name: ``accuracy``, ``macro_f1``, ``macro_auc`` or ``recall/<class index>``.
        num_classes: number of classes.
    """

    def __init__(self, name: str, num_classes: int, output_transform: Callable = from_engine(["pred", "label"])):
        if not (name in ("accuracy", "macro_f1", "macro_auc") or name.startswith("recall/")):
            raise ValueError(f"unknown metric {name!r}")
        self.metric_name = name
        self.num_classes = num_classes
        super().__init__(output_transform=output_transform)

    def reset(self) -> None:
        self._logits: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []

    def update(self, output) -> None:
        preds, labels = output
        p = torch.stack([torch.as_tensor(x) for x in preds]) if isinstance(preds, (list, tuple)) else torch.as_tensor(preds)
        self._logits.append(p.detach().float().cpu().reshape(p.shape[0], -1))
        self._labels.append(_as_labels(labels).detach().cpu())

    def compute(self) -> float:
        from pipelines.training.distributed import gather_rows, is_distributed

        if not self._logits and not is_distributed():
            raise RuntimeError(f"metric {self.metric_name} has no data")
        local = torch.cat(self._logits) if self._logits else torch.zeros(0, self.num_classes)
        local_y = torch.cat(self._labels) if self._labels else torch.zeros(0, dtype=torch.long)
        logits, y = gather_rows(local), gather_rows(local_y).numpy()  # every rank: all ranks' rows
        if len(y) == 0:
            raise RuntimeError(f"metric {self.metric_name} has no data")
        probs = torch.softmax(logits, dim=1).numpy()
        pred = probs.argmax(1)
        labels = list(range(self.num_classes))
        if self.metric_name == "accuracy":
            return float((pred == y).mean())
        if self.metric_name == "macro_f1":
            return float(f1_score(y, pred, labels=labels, average="macro", zero_division=0))
        if self.metric_name == "macro_auc":
            return macro_auc(y, probs)
        c = int(self.metric_name.split("/")[1])
        return float(recall_score(y, pred, labels=[c], average="macro", zero_division=0))


def validation_metrics(class_names: Sequence[str], prefix: str = "val_") -> dict[str, Metric]:
    """Additional validation metrics: accuracy, macro AUC and recall of every class (names MLflow-safe)."""
    n = len(class_names)
    metrics: dict[str, Metric] = {
        f"{prefix}accuracy": EpochClassificationMetric("accuracy", n),
        f"{prefix}macro_auc": EpochClassificationMetric("macro_auc", n),
    }
    for i, name in enumerate(class_names):
        safe = "".join(ch if ch.isalnum() or ch in "_-." else "_" for ch in str(name))
        metrics[f"{prefix}recall_{safe}"] = EpochClassificationMetric(f"recall/{i}", n)
    return metrics
