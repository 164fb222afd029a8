"""Penultimate-layer embeddings of a classifier: extraction, KMeans clustering, 2D maps, CSV, MLflow.

What the network "sees" before its classifier says more about a small, imbalanced data set than the confusion
matrix alone: does the middle class sit between the others, or inside one of them? This module

1. extracts features with a forward hook on the layer before the classifier (:func:`embedding_layer`: by
   default the last leaf module before the last ``nn.Linear``, e.g. ``class_layers.flatten`` of MONAI's
   DenseNet121 (1024-d) or ``avgpool`` of MONAI's ResNet-50 (2048-d); outputs are flattened per sample);
2. clusters them with KMeans (k = number of classes) and compares clusters with labels: adjusted Rand index
   (ARI: 1 = identical partitions, about 0 = chance) and purity (fraction of samples in their cluster's
   majority class, in [1/k, 1]);
3. draws PCA (always) and t-SNE (from ``tsne_min_samples`` samples on) maps coloured by label and by cluster;
4. writes ``embeddings.csv`` (one row per sample, identified by row index only: no subject ids),
   ``embeddings.json`` (summary) and the PNGs, and logs them to MLflow (:class:`EmbeddingHandler`).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from pipelines.evaluation.metrics import labels_to_indices, to_numpy
from pipelines.evaluation.report import atomic_save_figure, atomic_write_csv, atomic_write_text

__all__ = [
    "EmbeddingHandler",
    "FeatureHook",
    "cluster_embeddings",
    "embedding_layer",
    "extract_embeddings",
    "project_2d",
    "write_embedding_report",
]

logger = logging.getLogger(__name__)

EMBEDDING_LEVELS = ("sample", "subject")


def embedding_layer(network: nn.Module, name: str | None = None) -> str:
    """Name (``named_modules``) of the layer whose output is the embedding.

    Args:
        network: the classifier.
        name: an explicit module name; None: the last leaf module registered before the network's last
            ``nn.Linear`` (the classifier), i.e. the global pooling / flatten / dropout that feeds it.

    Raises:
        ValueError: ``name`` is not a module of the network, or (``name`` None) the network has no
            ``nn.Linear`` with a module before it.
    """
    modules = dict(network.named_modules())
    if name is not None:
        if name not in modules or name == "":
            leaves = [n for n, m in modules.items() if n and not list(m.children())]
            raise ValueError(f"embedding layer {name!r} is not a module of {type(network).__name__}; "
                             f"the last leaf modules are {leaves[-6:]}")
        return name
    names = list(modules)
    linears = [i for i, n in enumerate(names) if isinstance(modules[n], nn.Linear)]
    if not linears:
        raise ValueError(f"{type(network).__name__} has no nn.Linear classifier; pass the embedding layer name")
    for n in reversed(names[: linears[-1]]):
        if n and not list(modules[n].children()):
            return n
    raise ValueError(f"{type(network).__name__}: no layer before the classifier {names[linears[-1]]!r}")


class FeatureHook:
    """Context manager: a forward hook that stores the (detached, flattened, float32, CPU) output of one layer.

    Usage::

        with FeatureHook(net, "avgpool") as hook:
            net(x)
        feats = hook.pop()  # (N, D)
    """

    def __init__(self, network: nn.Module, layer: str | None = None) -> None:
        self.layer = embedding_layer(network, layer)
        self.module = dict(network.named_modules())[self.layer]
        self._batches: list[torch.Tensor] = []
        self._handle = None

    def _hook(self, _module: nn.Module, _inputs: Any, output: Any) -> None:
        out = output[0] if isinstance(output, (tuple, list)) else output
        out = out.as_tensor() if hasattr(out, "as_tensor") else out
        self._batches.append(out.detach().float().reshape(out.shape[0], -1).cpu())

    def __enter__(self) -> FeatureHook:
        self.register()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def register(self) -> None:
        if self._handle is None:
            self._handle = self.module.register_forward_hook(self._hook)

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def clear(self) -> None:
        """Drop stored features."""
        self._batches = []

    def pop(self) -> torch.Tensor:
        """The features stored since the last ``pop`` (concatenated), and clear them."""
        if not self._batches:
            raise RuntimeError(f"layer {self.layer!r} produced no output (was the network run?)")
        out = torch.cat(self._batches)
        self._batches = []
        return out


@torch.no_grad()
def extract_embeddings(
    network: nn.Module,
    loader: Iterable[Mapping[str, Any]],
    layer: str | None = None,
    device: str | torch.device = "cpu",
    image_key: str = "image",
    label_key: str = "label",
    num_classes: int | None = None,
) -> dict[str, Any]:
    """Embeddings, logits and labels of every sample of a loader (network in eval mode, restored after).

    Returns:
        ``{"features": (N, D) float32, "logits": (N, C) float32, "labels": (N,) int, "layer": str}``.
    """
    device = torch.device(device)
    net = network.to(device)
    was_training = net.training
    net.eval()
    feats, logits, labels = [], [], []
    try:
        with FeatureHook(net, layer) as hook:
            for batch in loader:
                x = torch.as_tensor(batch[image_key]).to(device)
                x = x.as_tensor() if hasattr(x, "as_tensor") else x
                out = net(x)
                out = out[0] if isinstance(out, (tuple, list)) else out
                feats.append(hook.pop())
                logits.append(out.detach().float().cpu())
                labels.append(labels_to_indices(batch[label_key], num_classes))
            name = hook.layer
    finally:
        net.train(was_training)
    if not feats:
        raise ValueError("the loader yielded no batches; no embeddings extracted")
    return {
        "features": torch.cat(feats).numpy(),
        "logits": torch.cat(logits).numpy(),
        "labels": np.concatenate(labels).astype(int),
        "layer": name,
    }


def cluster_embeddings(features: Any, labels: Any, n_clusters: int, seed: int = 0) -> dict[str, Any]:
    """KMeans on the embeddings and agreement of the clusters with the labels.

    Args:
        features: (N, D) embeddings.
        labels: (N,) integer labels.
        n_clusters: k (usually the number of classes); reduced to N when N < k.
        seed: KMeans seed (``n_init=10``).

    Returns:
        ``{"clusters": (N,) int, "n_clusters": k, "ari": adjusted Rand index in [-0.5, 1],
        "nmi": normalised mutual information in [0, 1], "purity": in [1/k, 1]}``.

    Raises:
        ValueError: shapes disagree, fewer than 2 samples, or non-finite features.
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels).astype(int).reshape(-1)
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"features must be (N, D) with one label each; got {x.shape} and {y.shape}")
    if len(x) < 2:
        raise ValueError(f"at least 2 samples are needed for clustering, got {len(x)}")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or infinite values")
    k = int(min(int(n_clusters), len(x)))
    if k < 1:
        raise ValueError(f"n_clusters must be >= 1, got {n_clusters}")
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):  # see project_2d: two OpenMP runtimes (torch, scikit-learn) in one process
        clusters = KMeans(n_clusters=k, n_init=10, random_state=int(seed)).fit_predict(x)
    majority = sum(np.bincount(y[clusters == c]).max() for c in np.unique(clusters))
    return {
        "clusters": clusters.astype(int),
        "n_clusters": k,
        "ari": float(adjusted_rand_score(y, clusters)),
        "nmi": float(normalized_mutual_info_score(y, clusters)),
        "purity": float(majority / len(y)),
    }


def project_2d(features: Any, method: str = "pca", seed: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
    """2D map of the embeddings: ``"pca"`` (centred, unscaled) or ``"tsne"`` (PCA init, perplexity
    ``min(30, (N - 1) / 3)``).

    Returns:
        ``(coords (N, 2), info)``; info holds ``explained_variance_ratio`` (PCA) or ``perplexity`` (t-SNE).
        With a single feature dimension (or sample) the missing coordinate is 0.
    """
    x = np.asarray(features, dtype=np.float64)
    n, d = x.shape
    if method == "pca":
        from sklearn.decomposition import PCA

        m = max(1, min(2, n, d))
        pca = PCA(n_components=m, random_state=int(seed))
        coords = pca.fit_transform(x) if n > 1 else np.zeros((n, m))
        info = {"explained_variance_ratio": [float(v) for v in getattr(pca, "explained_variance_ratio_", [])]}
    elif method == "tsne":
        from sklearn.manifold import TSNE

        from threadpoolctl import threadpool_limits

        perplexity = float(max(2.0, min(30.0, (n - 1) / 3.0)))
        # torch and scikit-learn each load their own libgomp; with both threaded, t-SNE spin-waits for minutes.
        with threadpool_limits(1):
            coords = TSNE(n_components=2, perplexity=perplexity, init="pca",
                          random_state=int(seed)).fit_transform(x)
        info = {"perplexity": perplexity}
    else:
        raise ValueError(f"unknown projection {method!r}; use pca or tsne")
    if coords.shape[1] < 2:
        coords = np.concatenate([coords, np.zeros((n, 2 - coords.shape[1]))], axis=1)
    return coords.astype(np.float64), info


def _plot(coords: np.ndarray, labels: np.ndarray, clusters: np.ndarray, class_names: Sequence[str], title: str,
          path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    cmap = plt.get_cmap("tab10")
    for i, name in enumerate(class_names):
        sel = labels == i
        if sel.any():
            axes[0].scatter(coords[sel, 0], coords[sel, 1], s=18, color=cmap(i % 10),
                            label=f"{name} ({int(sel.sum())})", alpha=0.8, edgecolors="none")
    axes[0].set_title("coloured by label")
    axes[0].legend(fontsize=8, loc="best")
    for c in np.unique(clusters):
        sel = clusters == c
        axes[1].scatter(coords[sel, 0], coords[sel, 1], s=18, color=cmap((c + 3) % 10), marker="os^Dv<>p*h"[c % 10],
                        label=f"cluster {c} ({int(sel.sum())})", alpha=0.8, edgecolors="none")
    axes[1].set_title("coloured by KMeans cluster")
    axes[1].legend(fontsize=8, loc="best")
    for ax in axes:
        ax.set_xlabel("component 1")
        ax.set_ylabel("component 2")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    try:
        return atomic_save_figure(fig, path)
    finally:
        plt.close(fig)


def write_embedding_report(
    features: Any,
    labels: Any,
    class_names: Sequence[str],
    output_dir: str | Path,
    logits: Any = None,
    seed: int = 0,
    layer: str = "",
    level: str = "sample",
    tsne_min_samples: int = 30,
) -> tuple[dict[str, Any], dict[str, Path]]:
    """Cluster the embeddings and write the CSV, the summary JSON and the PCA (and t-SNE) maps.

    Files in ``output_dir``: ``embeddings.csv`` (``row``, ``label``, ``class``, [``predicted``], ``cluster``,
    ``pca_1``, ``pca_2``, [``tsne_1``, ``tsne_2``], ``f0000`` ...), ``embeddings.json``, ``embeddings_pca.png``,
    ``embeddings_tsne.png`` (only when N >= ``tsne_min_samples``).

    Args:
        features: (N, D) embeddings; labels: (N,) class indices; logits: optional (N, C) for a ``predicted``
            column.
        class_names: class names in label order (k = their number).
        output_dir: destination folder (created).
        seed: KMeans / PCA / t-SNE seed.
        layer, level: recorded in the summary (``level``: ``sample`` or ``subject``).
        tsne_min_samples: t-SNE from this many samples on (t-SNE on a handful of points is noise).

    Returns:
        ``(summary, paths)``.
    """
    x = np.asarray(features, dtype=np.float64)
    y = labels_to_indices(labels, len(class_names))
    clustering = cluster_embeddings(x, y, len(class_names), seed)
    clusters = clustering["clusters"]
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    table = pd.DataFrame({"row": np.arange(len(y)), "label": y, "class": [class_names[i] for i in y]})
    if logits is not None:
        table["predicted"] = [class_names[i] for i in np.asarray(logits).argmax(axis=1)]
    table["cluster"] = clusters
    pca, pca_info = project_2d(x, "pca", seed)
    table["pca_1"], table["pca_2"] = pca[:, 0], pca[:, 1]
    title = f"{level}-level embeddings ({layer or 'penultimate layer'}, D={x.shape[1]}, N={len(y)}): " \
            f"ARI {clustering['ari']:.3f}, purity {clustering['purity']:.3f}"
    paths["embeddings_pca"] = _plot(pca, y, clusters, class_names, "PCA - " + title, out / "embeddings_pca.png")
    tsne_info = None
    if len(y) >= int(tsne_min_samples):
        tsne, tsne_info = project_2d(x, "tsne", seed)
        table["tsne_1"], table["tsne_2"] = tsne[:, 0], tsne[:, 1]
        paths["embeddings_tsne"] = _plot(tsne, y, clusters, class_names, "t-SNE - " + title,
                                         out / "embeddings_tsne.png")
    width = max(4, len(str(x.shape[1] - 1)))
    feats = pd.DataFrame(x.astype(np.float32), columns=[f"f{j:0{width}d}" for j in range(x.shape[1])])
    paths["embeddings_csv"] = atomic_write_csv(out / "embeddings.csv", pd.concat([table, feats], axis=1))
    summary = {
        "level": level,
        "layer": layer,
        "n_samples": int(len(y)),
        "dim": int(x.shape[1]),
        "n_clusters": clustering["n_clusters"],
        "ari": clustering["ari"],
        "nmi": clustering["nmi"],
        "purity": clustering["purity"],
        "samples_per_class": {c: int((y == i).sum()) for i, c in enumerate(class_names)},
        "pca": pca_info,
        "tsne": tsne_info,
        "seed": int(seed),
    }
    paths["embeddings_json"] = atomic_write_text(out / "embeddings.json", json.dumps(summary, indent=2) + "\n")
    return summary, paths


class EmbeddingHandler:
    """Collects penultimate-layer embeddings during a MONAI evaluator run, then clusters, writes and logs them.

    The features come from the evaluator's own forward passes (a hook registered at ``EPOCH_STARTED`` and
    removed at ``EPOCH_COMPLETED``, so the extra passes of other handlers at ``COMPLETED``, e.g. TTA or
    calibration, are not recorded). At ``COMPLETED`` it writes :func:`write_embedding_report` to ``output_dir``
    and logs the files (under ``embeddings/``) and ``embedding_ari``, ``embedding_nmi``, ``embedding_purity``
    to the MLflow run of ``report_handler`` (the project's ``EvaluationReportHandler``, which exposes
    ``mlflow_run_id`` once it has completed: put this handler after it) or to ``mlflow_run_id``.

    Args:
        output_dir: destination folder.
        class_names: class names in label order.
        network: the evaluated network (the evaluator's).
        layer: embedding layer name (None: :func:`embedding_layer` default).
        level: ``"sample"`` (one point per evaluated sample: slice or volume) or ``"subject"`` (features and
            probabilities averaged over the samples of a subject, read from ``subject_key`` in the engine output).
        seed: KMeans / projection seed.
        tsne_min_samples: see :func:`write_embedding_report`.
        report_handler: object with an ``mlflow_run_id`` attribute (read at ``COMPLETED``).
        mlflow_run_id: fixed run id (used when ``report_handler`` gives none).
        mlflow_tracking_uri: store of that run (default: MLflow's current tracking URI).
        subject_report_dir: when set, also write the subject-level classification report there (softmax
            probabilities averaged over each subject's samples, bootstrap CIs over subjects:
            :func:`pipelines.evaluation.metrics.evaluate_predictions` + ``write_evaluation``) and log its metrics
            as ``subject_<metric>`` (and ``_ci_low``/``_ci_high``). Slices of one subject are not independent, so
            slice-level CIs are too narrow; the subject-level ones are the honest figures for a 2D model.
        n_resamples: bootstrap resamples of the subject-level CIs.
        pred_key, label_key, subject_key: engine-output keys.

    After completion ``self.summary`` and ``self.paths`` hold the result.
    """

    def __init__(
        self,
        output_dir: str | Path,
        class_names: Sequence[str],
        network: nn.Module,
        layer: str | None = None,
        level: str = "sample",
        seed: int = 0,
        tsne_min_samples: int = 30,
        report_handler: Any = None,
        mlflow_run_id: str | None = None,
        mlflow_tracking_uri: str | None = None,
        subject_report_dir: str | Path | None = None,
        n_resamples: int = 1000,
        pred_key: str = "pred",
        label_key: str = "label",
        subject_key: str = "subject_id",
    ) -> None:
        if level not in EMBEDDING_LEVELS:
            raise ValueError(f"level must be one of {EMBEDDING_LEVELS}, got {level!r}")
        if int(tsne_min_samples) < 4:
            raise ValueError(f"tsne_min_samples must be >= 4, got {tsne_min_samples}")
        self.class_names = [str(c) for c in class_names]
        if len(self.class_names) < 2:
            raise ValueError(f"class_names must hold at least 2 names, got {self.class_names}")
        self.output_dir = Path(output_dir)
        self.network = network
        self.hook = FeatureHook(network, layer)  # resolves and checks the layer name now
        self.level = level
        self.seed = int(seed)
        self.tsne_min_samples = int(tsne_min_samples)
        self.report_handler = report_handler
        self.mlflow_run_id = mlflow_run_id
        self.mlflow_tracking_uri = mlflow_tracking_uri
        self.subject_report_dir = Path(subject_report_dir) if subject_report_dir else None
        self.n_resamples = int(n_resamples)
        self.subject_result: dict[str, Any] | None = None
        self.pred_key, self.label_key, self.subject_key = pred_key, label_key, subject_key
        self.summary: dict[str, Any] | None = None
        self.paths: dict[str, Path] = {}
        self._reset()

    def _reset(self) -> None:
        self._feats: list[np.ndarray] = []
        self._preds: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._subjects: list[str | None] = []

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.EPOCH_STARTED, self.start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.stop)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self.stop_on_error)
        engine.add_event_handler(Events.COMPLETED, self)

    def start(self, engine: Any = None) -> None:
        self._reset()
        self.hook.clear()
        self.hook.register()

    def stop(self, engine: Any = None) -> None:
        self.hook.remove()

    def stop_on_error(self, engine: Any, e: BaseException) -> None:
        self.hook.remove()
        raise e

    def collect(self, engine: Any) -> None:
        output = engine.state.output
        items = output if isinstance(output, (list, tuple)) else [output]
        feats = self.hook.pop().numpy()
        preds, labels = [], []
        for item in items:
            pred = to_numpy(item[self.pred_key]).astype(np.float64)
            label = to_numpy(item[self.label_key])
            if pred.ndim == 1:
                pred, label = pred[None], label.reshape(1, -1)
            preds.append(pred.reshape(pred.shape[0], -1))
            labels.append(labels_to_indices(label, len(self.class_names)))
        preds_arr = np.concatenate(preds)
        subjects = _subject_ids(getattr(engine.state, "batch", None), self.subject_key, len(preds_arr))
        if subjects is None:  # no ids: every sample is its own subject, named once the ranks' rows are gathered
            subjects = [None] * len(preds_arr)
        if len(feats) != len(preds_arr):
            raise ValueError(f"embedding layer {self.hook.layer!r} gave {len(feats)} feature rows for "
                             f"{len(preds_arr)} predictions in one iteration")
        self._feats.append(feats)
        self._preds.append(preds_arr)
        self._labels.append(np.concatenate(labels))
        self._subjects.extend(subjects)

    def __call__(self, engine: Any = None) -> None:
        """Events.COMPLETED: gather the ranks' rows (under ``torch.distributed``), then cluster, write and log on
        rank 0."""
        from pipelines.training.distributed import gather_in_order, sample_indices

        local = (np.concatenate(self._feats), np.concatenate(self._preds), np.concatenate(self._labels)) \
            if self._feats else ([], [], [])
        rows, is_main = gather_in_order(list(zip(*local, self._subjects)), sample_indices(engine))
        if not is_main:
            return
        if not rows:
            logger.warning("EmbeddingHandler: no embeddings were collected; nothing written")
            return
        self.paths = {}
        feats = np.stack([r[0] for r in rows])
        preds = np.stack([r[1] for r in rows])
        labels = np.asarray([r[2] for r in rows])
        self._subjects = [f"sample-{k}" if r[3] is None else r[3] for k, r in enumerate(rows)]
        if self.subject_report_dir is not None:
            self._subject_report(*_per_subject(feats, preds, labels, self._subjects)[1:])
        if self.level == "subject":
            feats, preds, labels = _per_subject(feats, preds, labels, self._subjects)
        self.summary, paths = write_embedding_report(
            feats, labels, self.class_names, self.output_dir, logits=preds, seed=self.seed,
            layer=self.hook.layer, level=self.level, tsne_min_samples=self.tsne_min_samples,
        )
        self.paths.update(paths)
        logger.info("embeddings (%s level, %d x %d): ARI %.3f, purity %.3f -> %s", self.level,
                    self.summary["n_samples"], self.summary["dim"], self.summary["ari"], self.summary["purity"],
                    self.output_dir)
        if engine is not None and hasattr(engine, "state"):
            engine.state.metrics["embedding_ari"] = self.summary["ari"]
            engine.state.metrics["embedding_purity"] = self.summary["purity"]
        self._log_mlflow()

    def _subject_report(self, log_probs: np.ndarray, labels: np.ndarray) -> None:
        from pipelines.evaluation.metrics import evaluate_predictions
        from pipelines.evaluation.report import markdown_table, write_evaluation

        result = evaluate_predictions(labels, np.exp(log_probs), self.class_names, n_resamples=self.n_resamples,
                                      seed=self.seed)
        out = self.subject_report_dir
        paths = write_evaluation(result, out, self.class_names)
        paths["metrics_md"] = atomic_write_text(out / "metrics.md", markdown_table(result))
        self.subject_result = result
        self.paths.update({f"subject_{k}": Path(p) for k, p in paths.items()})
        m = result["metrics"]
        logger.info("subject-level (%d subjects): accuracy %.3f, macro F1 %.3f, macro AUC %s", result["n_samples"],
                    m["accuracy"], m["macro_f1"], m.get("macro_auc"))

    def _log_mlflow(self) -> None:
        run_id = getattr(self.report_handler, "mlflow_run_id", None) or self.mlflow_run_id
        if not run_id:
            logger.info("EmbeddingHandler: no MLflow run id; embeddings not logged to MLflow")
            return
        import time

        from mlflow.entities import Metric

        from pipelines.evaluation.handler import sanitize_metric_name
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.mlflow_tracking_uri)
        now = int(time.time() * 1000)
        metrics = [Metric(f"embedding_{k}", float(self.summary[k]), now, 0) for k in ("ari", "nmi", "purity")
                   if math.isfinite(float(self.summary[k]))]
        if self.subject_result is not None:
            for key, value in self.subject_result["metrics"].items():
                lo, hi = self.subject_result["ci"].get(key, (math.nan, math.nan))
                for name, v in ((key, value), (f"{key}_ci_low", lo), (f"{key}_ci_high", hi)):
                    if v is not None and isinstance(v, (int, float)) and math.isfinite(float(v)):
                        metrics.append(Metric(sanitize_metric_name(f"subject_{name}"), float(v), now, 0))
        client.log_batch(run_id, metrics=metrics)
        for key, path in self.paths.items():
            client.log_artifact(run_id, str(path), artifact_path="subject_level" if key.startswith("subject_")
                                else "embeddings")
        self.mlflow_run_id = run_id


def _subject_ids(batch: Any, key: str, n: int) -> list[str] | None:
    """Subject id of each of the ``n`` samples of an engine batch (decollated list of dicts, or one collated
    dict); None when the batch does not carry them."""
    if isinstance(batch, (list, tuple)):
        ids = [item.get(key) if isinstance(item, Mapping) else None for item in batch]
    elif isinstance(batch, Mapping) and key in batch:
        value = batch[key]
        ids = list(value) if isinstance(value, (list, tuple)) else [value] * n
    else:
        ids = []
    if len(ids) != n or any(i is None for i in ids):
        return None
    return [str(i) for i in ids]


def _per_subject(feats: np.ndarray, preds: np.ndarray, labels: np.ndarray,
                 subjects: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean features and mean softmax probabilities per subject (first-seen order); one label per subject."""
    order = list(dict.fromkeys(subjects))
    index = {s: i for i, s in enumerate(order)}
    groups = np.array([index[s] for s in subjects])
    z = preds - preds.max(axis=1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    f = np.stack([feats[groups == g].mean(axis=0) for g in range(len(order))])
    p = np.stack([probs[groups == g].mean(axis=0) for g in range(len(order))])
    y = np.array([np.bincount(labels[groups == g]).argmax() for g in range(len(order))])
    return f, np.log(np.clip(p, 1e-12, 1.0)), y
