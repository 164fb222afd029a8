"""Study-level evaluation of 2D slice classifiers trained on slices extracted from 3D volumes.

A study (subject + session) contributes several slices; its prediction aggregates the slice probabilities:

* ``mean``: the average of the slice probabilities;
* ``weighted``: soft voting as in ClinicaDL (Wen et al. 2020, Med Image Anal 63:101694): each slice is weighted by
  the balanced accuracy that its slice *position* reached on the validation set, so positions that carry the
  disease signal count more. Positions are ``rank`` (order of the slice among the study's extracted slices:
  0 = lowest index; anatomically comparable across unregistered subjects when the same number of slices is
  extracted around the brain centre) or ``index`` (the absolute slice index; right for registered data such as
  ClinicaDL's MNI-space t1-linear). A position absent from the validation set gets the overall validation
  score; positions below ``selection_threshold`` get weight 0; a study whose weights are all 0 falls back to
  the mean (counted in the result).

Slice tables are DataFrames with one row per slice: ``subject_id``, ``session_id``, ``slice_index``, ``label``
(int class index) and ``prob_<class>`` per class. Study-level metrics use
:func:`pipelines.evaluation.metrics.evaluate_predictions` (stratified bootstrap CIs), next to the slice-level
ones, so the report shows how much aggregation changes the numbers and on how few studies they rest.

:class:`VolumeSlices` expands volume records into slice records (for training and evaluating from NIfTI
manifests); :class:`StudyEvaluationHandler` runs the study-level evaluation at the end of a MONAI evaluator.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pipelines.evaluation.metrics import SUMMARY_METRICS, evaluate_predictions, labels_to_indices, to_numpy
from pipelines.inference.aggregate import aggregate_probs

__all__ = [
    "AGGREGATIONS",
    "POSITIONS",
    "StudyEvaluationHandler",
    "VolumeSlices",
    "aggregate_studies",
    "evaluate_studies",
    "expand_volumes",
    "position_weights",
    "slice_positions",
    "slice_table",
    "study_markdown",
    "write_study_report",
]

logger = logging.getLogger(__name__)

AGGREGATIONS = ("mean", "weighted")
POSITIONS = ("rank", "index")
WEIGHT_METRICS = ("balanced_accuracy", "accuracy")
_STUDY_KEYS = ["subject_id", "session_id"]


# --------------------------------------------------------------------------------------------------- volumes


def expand_volumes(records: Sequence[Mapping[str, Any]], transform: Callable) -> list[dict]:
    """Apply a volume -> slices transform (e.g. LoadImaged + Orientationd + ExtractSlicesd + 2D normalisation)
    to every record and return the flat list of slice records.

    Every slice record keeps the volume record's other keys (``label``, ``subject_id``, ``session_id``) and
    gets ``slice_index`` from the transform.

    Raises:
        ValueError: the transform fails on a volume (the message names its file) or returns no slice.
    """
    out: list[dict] = []
    for rec in records:
        try:
            items = transform(dict(rec))
        except Exception as err:  # MONAI wraps transform errors; surface the root cause with the file
            root = err
            while root.__cause__ is not None:
                root = root.__cause__
            raise ValueError(f"{rec.get('image')}: cannot extract slices ({root})") from err
        items = [items] if isinstance(items, Mapping) else list(items)
        if not items:
            raise ValueError(f"{rec.get('image')}: the volume gave no slice")
        out.extend(dict(it) for it in items)
    return out


class VolumeSlices(Mapping):
    """Lazy ``{split: slice records}`` view of volume data lists: each split is expanded on first access.

    Args:
        data: ``{"train": [volume records], "val": [...], "test": [...]}`` (e.g. ``prepare_data``'s output; other
            keys are ignored).
        transform: volume record -> list of slice records (see :func:`expand_volumes`).
        splits: the splits offered.
    """

    def __init__(self, data: Mapping[str, Any], transform: Callable, splits: Sequence[str] = ("train", "val", "test")):
        missing = [s for s in splits if s not in data]
        if missing:
            raise ValueError(f"data has no split(s) {missing}; has {list(data)}")
        self._data = data
        self._transform = transform
        self._splits = tuple(splits)
        self._cache: dict[str, list[dict]] = {}

    def __getitem__(self, split: str) -> list[dict]:
        if split not in self._splits:
            raise KeyError(f"unknown split {split!r}; use one of {self._splits}")
        if split not in self._cache:
            t0 = time.perf_counter()
            self._cache[split] = expand_volumes(self._data[split], self._transform)
            logger.info("%s: %d volume(s) -> %d slice(s) in %.1f s", split, len(self._data[split]),
                        len(self._cache[split]), time.perf_counter() - t0)
        return self._cache[split]

    def __iter__(self):
        return iter(self._splits)

    def __len__(self) -> int:
        return len(self._splits)


# --------------------------------------------------------------------------------------------------- tables


def _prob_columns(class_names: Sequence[str]) -> list[str]:
    return [f"prob_{c}" for c in class_names]


def slice_table(
    subject_id: Sequence[Any],
    slice_index: Sequence[Any],
    labels: Any,
    probs: Any,
    class_names: Sequence[str],
    session_id: Sequence[Any] | None = None,
) -> pd.DataFrame:
    """Build a slice table from aligned per-slice arrays (probabilities ``(N, C)``, rows summing to 1).

    Raises:
        ValueError: lengths differ, probabilities have the wrong shape or are not finite.
    """
    p = np.asarray(to_numpy(probs), dtype=np.float64)
    names = [str(c) for c in class_names]
    if p.ndim != 2 or p.shape[1] != len(names):
        raise ValueError(f"probabilities must be (N, {len(names)}), got {p.shape}")
    if not np.all(np.isfinite(p)):
        raise ValueError("probabilities contain NaN or infinite values")
    y = labels_to_indices(labels, len(names))
    n = len(p)
    session = ["ses-01"] * n if session_id is None else [str(s) for s in session_id]
    if not (len(subject_id) == len(slice_index) == len(y) == len(session) == n):
        raise ValueError(f"lengths differ: {len(subject_id)} subjects, {len(slice_index)} slice indices, "
                         f"{len(y)} labels, {len(session)} sessions, {n} probability rows")
    table = pd.DataFrame({"subject_id": [str(s) for s in subject_id], "session_id": session,
                          "slice_index": np.asarray(slice_index, dtype=np.int64), "label": y})
    for k, col in enumerate(_prob_columns(names)):
        table[col] = p[:, k]
    return table


def slice_positions(table: pd.DataFrame, position: str = "rank") -> pd.Series:
    """Position of each slice: ``rank`` within its study (0 = lowest slice index) or the absolute ``index``."""
    if position not in POSITIONS:
        raise ValueError(f"position must be one of {POSITIONS}, got {position!r}")
    if position == "index":
        return table["slice_index"].astype(np.int64)
    return table.groupby(_STUDY_KEYS)["slice_index"].rank(method="first").astype(np.int64) - 1


def _score(y: np.ndarray, pred: np.ndarray, metric: str) -> float:
    from sklearn.metrics import accuracy_score, balanced_accuracy_score

    if metric == "accuracy":
        return float(accuracy_score(y, pred))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true": expected on one position
        return float(balanced_accuracy_score(y, pred))


def position_weights(
    val_table: pd.DataFrame,
    class_names: Sequence[str],
    metric: str = "balanced_accuracy",
    position: str = "rank",
    selection_threshold: float | None = None,
) -> pd.DataFrame:
    """Per-position validation score used as soft-voting weight (ClinicaDL's soft voting).

    Args:
        val_table: validation slice table.
        class_names: class names (probability columns).
        metric: ``balanced_accuracy`` (ClinicaDL) or ``accuracy``.
        position: ``rank`` or ``index`` (see the module docstring).
        selection_threshold: positions scoring below it get weight 0.

    Returns:
        DataFrame indexed by position with ``n_slices``, ``score`` and ``weight``; ``attrs["overall"]`` holds the
        score over all validation slices (the weight of unseen positions).
    """
    if metric not in WEIGHT_METRICS:
        raise ValueError(f"metric must be one of {WEIGHT_METRICS}, got {metric!r}")
    if len(val_table) == 0:
        raise ValueError("the validation slice table is empty: no weights can be estimated")
    probs = val_table[_prob_columns(class_names)].to_numpy()
    pred = probs.argmax(axis=1)
    y = val_table["label"].to_numpy()
    pos = slice_positions(val_table, position).to_numpy()
    rows = []
    for p in np.unique(pos):
        sel = pos == p
        rows.append({"position": int(p), "n_slices": int(sel.sum()), "score": _score(y[sel], pred[sel], metric)})
    out = pd.DataFrame(rows).set_index("position")
    out["weight"] = out["score"]
    if selection_threshold is not None:
        out.loc[out["score"] < float(selection_threshold), "weight"] = 0.0
    out.attrs["overall"] = _score(y, pred, metric)
    out.attrs.update({"metric": metric, "position": position, "selection_threshold": selection_threshold})
    return out


def aggregate_studies(
    table: pd.DataFrame,
    class_names: Sequence[str],
    method: str = "mean",
    weights: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """One row per study: ``subject_id``, ``session_id``, ``label``, ``n_slices``, ``prob_<class>``,
    ``predicted`` (index), ``fallback`` (True when ``weighted`` fell back to the mean).

    Args:
        table: slice table.
        class_names: class names.
        method: ``mean`` or ``weighted`` (:func:`pipelines.inference.aggregate.aggregate_probs`).
        weights: :func:`position_weights` output (required for ``weighted``).

    Raises:
        ValueError: unknown method, missing weights, or a study whose slices disagree on the label.
    """
    if method not in AGGREGATIONS:
        raise ValueError(f"method must be one of {AGGREGATIONS}, got {method!r}")
    if method == "weighted" and weights is None:
        raise ValueError("method='weighted' needs the per-position weights (position_weights)")
    if len(table) == 0:
        raise ValueError("the slice table is empty")
    cols = _prob_columns(class_names)
    pos = slice_positions(table, weights.attrs.get("position", "rank")) if weights is not None else None
    lookup = weights["weight"].to_dict() if weights is not None else {}
    default = float(weights.attrs.get("overall", 1.0)) if weights is not None else 1.0
    rows = []
    for (subject, session), g in table.groupby(_STUDY_KEYS, sort=True):
        labels = g["label"].unique()
        if len(labels) != 1:
            raise ValueError(f"study {subject}/{session}: slices carry different labels {sorted(labels.tolist())}")
        probs = g[cols].to_numpy()
        fallback = False
        if method == "weighted":
            w = np.array([lookup.get(int(p), default) for p in pos.loc[g.index]], dtype=np.float64)
            if w.sum() > 0:
                agg = aggregate_probs(probs, "weighted", weights=w)
            else:
                agg, fallback = aggregate_probs(probs, "mean"), True
        else:
            agg = aggregate_probs(probs, "mean")
        row = {"subject_id": subject, "session_id": session, "label": int(labels[0]), "n_slices": len(g)}
        row.update({c: float(v) for c, v in zip(cols, agg)})
        row["predicted"] = int(np.argmax(agg))
        row["fallback"] = fallback
        rows.append(row)
    return pd.DataFrame(rows)


def evaluate_studies(
    test_table: pd.DataFrame,
    class_names: Sequence[str],
    val_table: pd.DataFrame | None = None,
    methods: Sequence[str] = AGGREGATIONS,
    n_resamples: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    weight_metric: str = "balanced_accuracy",
    position: str = "rank",
    selection_threshold: float | None = None,
) -> dict[str, Any]:
    """Slice-level and study-level metrics with bootstrap CIs.

    Args:
        test_table: slice table of the evaluated split.
        class_names: class names.
        val_table: validation slice table (needed for ``weighted``; without it ``weighted`` is skipped).
        methods: study aggregations to report.
        n_resamples, seed, alpha: bootstrap settings of :func:`evaluate_predictions`.
        weight_metric, position, selection_threshold: see :func:`position_weights`.

    Returns:
        ``{"slice": result, "study": {method: result}, "n_studies": int, "n_slices": int,
        "position_weights": {...} | None, "n_weighted_fallback": int, "studies": DataFrame (not JSON)}``;
        each result is an :func:`evaluate_predictions` dict.
    """
    bad = [m for m in methods if m not in AGGREGATIONS]
    if bad:
        raise ValueError(f"unknown aggregation(s) {bad}; use {AGGREGATIONS}")
    names = [str(c) for c in class_names]
    cols = _prob_columns(names)
    kw = {"n_resamples": n_resamples, "seed": seed, "alpha": alpha}
    out: dict[str, Any] = {
        "slice": evaluate_predictions(test_table["label"].to_numpy(), test_table[cols].to_numpy(), names, **kw),
        "study": {},
        "n_slices": int(len(test_table)),
        "n_studies": int(test_table.groupby(_STUDY_KEYS).ngroups),
        "position_weights": None,
        "n_weighted_fallback": 0,
    }
    weights = None
    if "weighted" in methods:
        if val_table is None or len(val_table) == 0:
            logger.warning("no validation slices: the weighted (soft-voting) aggregation is skipped")
        else:
            weights = position_weights(val_table, names, weight_metric, position, selection_threshold)
            out["position_weights"] = {
                "metric": weight_metric, "position": position, "selection_threshold": selection_threshold,
                "overall": weights.attrs["overall"],
                "table": [{"position": int(p), **{k: (int(v) if k == "n_slices" else float(v)) for k, v in r.items()}}
                          for p, r in weights.iterrows()],
            }
    studies = []
    for method in methods:
        if method == "weighted" and weights is None:
            continue
        agg = aggregate_studies(test_table, names, method, weights if method == "weighted" else None)
        out["study"][method] = evaluate_predictions(agg["label"].to_numpy(), agg[cols].to_numpy(), names, **kw)
        if method == "weighted":
            out["n_weighted_fallback"] = int(agg["fallback"].sum())
        studies.append(agg.drop(columns="fallback").assign(
            aggregation=method, true_class=[names[k] for k in agg["label"]],
            predicted_class=[names[k] for k in agg["predicted"]]))
    out["studies"] = pd.concat(studies, ignore_index=True) if studies else pd.DataFrame()
    return out


# --------------------------------------------------------------------------------------------------- reports


def _cell(result: dict[str, Any], key: str, digits: int = 3) -> str:
    value = result["metrics"][key]
    lo, hi = result["ci"].get(key, (math.nan, math.nan))

    def fmt(v: float | None) -> str:
        return "n/a" if v is None or not math.isfinite(float(v)) else f"{float(v):.{digits}f}"

    return f"{fmt(value)} [{fmt(lo)}, {fmt(hi)}]"


def study_markdown(result: dict[str, Any]) -> str:
    """Markdown table: one row per level (slice, study mean, study weighted), summary metrics with CIs."""
    level = 100.0 * (1.0 - float(result["slice"].get("alpha", 0.05)))
    lines = [
        f"| level | n | {' | '.join(SUMMARY_METRICS)} |",
        "|---" * (len(SUMMARY_METRICS) + 2) + "|",
        f"| slice | {result['n_slices']} | " + " | ".join(_cell(result["slice"], k) for k in SUMMARY_METRICS) + " |",
    ]
    for method, res in result["study"].items():
        lines.append(f"| study ({method}) | {result['n_studies']} | "
                     + " | ".join(_cell(res, k) for k in SUMMARY_METRICS) + " |")
    lines.append("")
    lines.append(f"Values with {level:g}% stratified-bootstrap CIs ({result['slice']['n_resamples']} resamples).")
    pw = result.get("position_weights")
    if pw:
        lines.append(f"Weighted: soft voting with per-slice-position ({pw['position']}) validation {pw['metric']} "
                     f"(overall {pw['overall']:.3f}); {result['n_weighted_fallback']} study(ies) fell back to the "
                     "mean.")
    return "\n".join(lines) + "\n"


def write_study_report(result: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write ``study_metrics.json``, ``study_metrics.md``, ``study_predictions.csv`` and, when computed,
    ``slice_position_weights.csv`` (atomically) to ``out_dir``."""
    from pipelines.evaluation.report import atomic_write_csv, atomic_write_json, atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "study_metrics_json": atomic_write_json(out / "study_metrics.json",
                                                {k: v for k, v in result.items() if k != "studies"}),
        "study_metrics_md": atomic_write_text(out / "study_metrics.md", study_markdown(result)),
        "study_predictions_csv": atomic_write_csv(out / "study_predictions.csv", result["studies"]),
    }
    if result.get("position_weights"):
        paths["slice_position_weights_csv"] = atomic_write_csv(
            out / "slice_position_weights.csv", pd.DataFrame(result["position_weights"]["table"])
        )
    return paths


# --------------------------------------------------------------------------------------------------- handler


class StudyEvaluationHandler:
    """Study-level evaluation at the end of a MONAI evaluator run over slices of volumes.

    Collects the evaluator's per-slice logits (``pred``) with ``label``, ``subject_id``, ``session_id`` and
    ``slice_index`` from the batches; on completion computes the validation slice probabilities with
    ``network`` over ``val_loader`` (for the soft-voting weights), runs :func:`evaluate_studies`, writes
    :func:`write_study_report` to ``output_dir`` and logs the study-level metrics to MLflow: into the run named
    ``mlflow_run_name`` in ``mlflow_experiment`` when it exists (e.g. the one the
    :class:`~pipelines.evaluation.handler.EvaluationReportHandler` listed before it just wrote), else a new one.
    Metric names: ``study_<method>/<metric>`` (+ ``_ci_low``/``_ci_high``), ``study/n_studies``.

    Args:
        output_dir: report folder.
        class_names: class names in logit order.
        network: the classifier (for the validation pass); None skips the weighted aggregation.
        val_loader: validation slices (dicts with image, label, subject_id, slice_index[, session_id]).
        methods, n_resamples, seed, alpha, weight_metric, position, selection_threshold: see
            :func:`evaluate_studies`.
        device: device of the validation pass.
        log_to_mlflow, mlflow_tracking_uri, mlflow_experiment, mlflow_run_name, tags: MLflow settings.
    """

    def __init__(
        self,
        output_dir: str | Path,
        class_names: Sequence[str],
        network: torch.nn.Module | None = None,
        val_loader: Iterable[dict[str, Any]] | None = None,
        methods: Sequence[str] = AGGREGATIONS,
        n_resamples: int = 1000,
        seed: int = 0,
        alpha: float = 0.05,
        weight_metric: str = "balanced_accuracy",
        position: str = "rank",
        selection_threshold: float | None = None,
        device: str | torch.device = "cpu",
        log_to_mlflow: bool = True,
        mlflow_tracking_uri: str | None = None,
        mlflow_experiment: str | None = None,
        mlflow_run_name: str | None = None,
        tags: Mapping[str, Any] | None = None,
    ) -> None:
        self.class_names = [str(c) for c in class_names]
        if len(self.class_names) < 2:
            raise ValueError(f"class_names must hold at least 2 names, got {self.class_names}")
        bad = [m for m in methods if m not in AGGREGATIONS]
        if bad or not methods:
            raise ValueError(f"methods must be a non-empty subset of {AGGREGATIONS}, got {list(methods)}")
        if weight_metric not in WEIGHT_METRICS:
            raise ValueError(f"weight_metric must be one of {WEIGHT_METRICS}, got {weight_metric!r}")
        if position not in POSITIONS:
            raise ValueError(f"position must be one of {POSITIONS}, got {position!r}")
        if int(n_resamples) < 0:
            raise ValueError(f"n_resamples must be >= 0, got {n_resamples}")
        self.output_dir = Path(output_dir)
        self.network = network
        self.val_loader = val_loader
        self.methods = tuple(methods)
        self.n_resamples = int(n_resamples)
        self.seed = int(seed)
        self.alpha = float(alpha)
        self.weight_metric = weight_metric
        self.position = position
        self.selection_threshold = selection_threshold
        self.device = torch.device(device)
        self.log_to_mlflow = bool(log_to_mlflow)
        self.mlflow_tracking_uri = mlflow_tracking_uri
        self.mlflow_experiment = mlflow_experiment or "evaluation"
        self.mlflow_run_name = mlflow_run_name
        self.tags = {str(k): str(v) for k, v in (tags or {}).items()}
        self.result: dict[str, Any] | None = None
        self.paths: dict[str, Path] = {}
        self.mlflow_run_id: str | None = None
        self.reset()

    def attach(self, engine: Any) -> None:
        """Register on a MONAI evaluator (collect per iteration, report on completion)."""
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.COMPLETED, self)

    def reset(self, engine: Any = None) -> None:
        """Drop the predictions of a previous run."""
        self._rows: dict[str, list] = {"subject_id": [], "session_id": [], "slice_index": [], "label": [], "prob": []}

    def _add(self, items: list[Mapping[str, Any]], preds: list[Any], labels: list[Any]) -> None:
        for item, pred, label in zip(items, preds, labels):
            for key in ("subject_id", "slice_index"):
                if key not in item:
                    raise ValueError(f"batch items need {key!r} for the study-level evaluation; got {list(item)}")
            z = np.asarray(to_numpy(pred), dtype=np.float64).reshape(-1)
            self._rows["prob"].append(z)
            self._rows["label"].append(int(labels_to_indices(np.asarray(to_numpy(label)).reshape(1, -1),
                                                             len(self.class_names))[0]))
            self._rows["subject_id"].append(str(item["subject_id"]))
            self._rows["session_id"].append(str(item.get("session_id", "ses-01")))
            self._rows["slice_index"].append(int(np.asarray(to_numpy(item["slice_index"])).reshape(-1)[0]))

    def collect(self, engine: Any) -> None:
        """Store the logits of one iteration with the ids of its slices (decollated or batched engine data)."""
        output, batch = engine.state.output, engine.state.batch
        if isinstance(output, Mapping):  # decollate=False: one batched dict
            n = len(output["pred"])
            items = [{k: _index(v, i) for k, v in batch.items()} for i in range(n)]
            preds = [output["pred"][i] for i in range(n)]
            labels = [output["label"][i] for i in range(n)]
        else:
            items = list(batch)
            preds = [o["pred"] for o in output]
            labels = [o["label"] for o in output]
        self._add(items, preds, labels)

    def _table(self, rows: Mapping[str, list]) -> pd.DataFrame:
        logits = np.stack(rows["prob"])
        if logits.shape[1] != len(self.class_names):
            raise ValueError(f"pred has {logits.shape[1]} channels for {len(self.class_names)} classes")
        probs = torch.softmax(torch.as_tensor(logits), dim=1).numpy()
        return slice_table(rows["subject_id"], rows["slice_index"], rows["label"], probs, self.class_names,
                           session_id=rows["session_id"])

    @torch.no_grad()
    def _val_table(self) -> pd.DataFrame | None:
        if self.network is None or self.val_loader is None or "weighted" not in self.methods:
            return None
        from pipelines.evaluation.tta import model_logits

        net = self.network.to(self.device)
        was_training = net.training
        net.eval()
        rows: dict[str, list] = {"subject_id": [], "session_id": [], "slice_index": [], "label": [], "prob": []}
        saved, self._rows = self._rows, rows
        try:
            for batch in self.val_loader:
                x = torch.as_tensor(batch["image"]).to(self.device)
                x = x.as_tensor() if hasattr(x, "as_tensor") else x
                z = model_logits(net, x).float().cpu().numpy()
                n = len(z)
                items = [{k: _index(v, i) for k, v in batch.items() if k != "image"} for i in range(n)]
                self._add(items, list(z), [batch["label"][i] for i in range(n)])
        finally:
            self._rows = saved
            net.train(was_training)
        return self._table(rows) if rows["prob"] else None

    def __call__(self, engine: Any = None) -> dict[str, Any] | None:
        """Events.COMPLETED: evaluate, write, log."""
        if not self._rows["prob"]:
            logger.warning("StudyEvaluationHandler: no predictions collected; no study report written")
            return None
        result = evaluate_studies(
            self._table(self._rows), self.class_names, val_table=self._val_table(), methods=self.methods,
            n_resamples=self.n_resamples, seed=self.seed, alpha=self.alpha, weight_metric=self.weight_metric,
            position=self.position, selection_threshold=self.selection_threshold,
        )
        self.paths = write_study_report(result, self.output_dir)
        self.result = result
        for method, res in result["study"].items():
            logger.info("study-level (%s, %d studies): accuracy %.3f, balanced accuracy %.3f, macro F1 %.3f",
                        method, result["n_studies"], res["metrics"]["accuracy"], res["metrics"]["balanced_accuracy"],
                        res["metrics"]["macro_f1"])
        if engine is not None and "mean" in result["study"]:
            engine.state.metrics["study_mean_accuracy"] = result["study"]["mean"]["metrics"]["accuracy"]
        if self.log_to_mlflow and self.mlflow_tracking_uri:
            self._log_mlflow(result)
        return result

    def mlflow_metrics(self, result: dict[str, Any]) -> dict[str, float]:
        """Finite study-level scalars keyed by MLflow metric names."""
        metrics = {"study/n_studies": float(result["n_studies"]), "study/n_slices": float(result["n_slices"])}
        for method, res in result["study"].items():
            for key in SUMMARY_METRICS:
                lo, hi = res["ci"].get(key, (math.nan, math.nan))
                metrics[f"study_{method}/{key}"] = res["metrics"][key]
                metrics[f"study_{method}/{key}_ci_low"] = lo
                metrics[f"study_{method}/{key}_ci_high"] = hi
        return {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}

    def _log_mlflow(self, result: dict[str, Any]) -> None:
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        from pipelines.tracking import experiment_id

        client = MlflowClient(tracking_uri=self.mlflow_tracking_uri)
        exp_id = experiment_id(client, self.mlflow_experiment, self.mlflow_tracking_uri)
        run_id, started = None, False
        if self.mlflow_run_name:
            name = self.mlflow_run_name.replace("'", "\\'")
            runs = client.search_runs([exp_id], filter_string=f"tags.mlflow.runName = '{name}'",
                                      order_by=["attributes.start_time DESC"], max_results=1)
            run_id = runs[0].info.run_id if runs else None
        if run_id is None:
            run_id = client.create_run(exp_id, run_name=self.mlflow_run_name,
                                       tags={**self.tags, "stage": "evaluation"}).info.run_id
            started = True
        try:
            now = int(time.time() * 1000)
            params = [Param("study.aggregations", ", ".join(result["study"])),
                      Param("study.weight_metric", self.weight_metric), Param("study.position", self.position)]
            client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in self.mlflow_metrics(result).items()],
                             params=params)
            for path in self.paths.values():
                client.log_artifact(run_id, str(path), artifact_path="evaluation/study")
        except BaseException:
            if started:
                client.set_terminated(run_id, status="FAILED")
            raise
        if started:
            client.set_terminated(run_id, status="FINISHED")
        self.mlflow_run_id = run_id


def _index(value: Any, i: int) -> Any:
    """Item ``i`` of a collated batch value (tensor, array, list); scalars are returned as they are."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return value[i] if value.ndim > 0 else value
    if isinstance(value, (list, tuple)):
        return value[i]
    return value

