"""Ignite/MONAI handler that turns a finished evaluation run into the project's standard report.

Used by every bundle's ``evaluate.json``::

    {"_target_": "pipelines.evaluation.handler.EvaluationReportHandler",
     "output_dir": "$@output_dir + '/evaluation'", "class_names": "@class_names",
     "network": "@network", "val_loader": "@validate#dataloader", "test_loader": "@validate#dataloader", ...}

Nothing patient-identifying is written or logged: logits and labels are read from the engine output, subject ids
(``subject_id`` of the batch) are held in memory only to resample whole subjects in the bootstrap, overlay files
are named by class, and MLflow receives aggregate metrics, run settings and the report files.

The MLflow run is linked to the training run that made the evaluated checkpoint (found by the checkpoint's
SHA-256, tagged by :class:`pipelines.tracking.handlers.BundleMLFlowHandler`): tags ``train_run_id`` /
``source_run_id`` / ``source_model_id``, a description with a link to it, the training run's LoggedModel as a
model input, and the metrics logged against that model and the evaluated dataset (a dataset input).
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.evaluation.calibration import apply_temperature, calibration_summary, reliability_diagram
from pipelines.evaluation.explain import EXPLAIN_METHODS, explain_examples
from pipelines.evaluation.metrics import evaluate_predictions, labels_to_indices, to_numpy
from pipelines.evaluation.report import atomic_write_csv, atomic_write_text, markdown_table, write_evaluation
from pipelines.evaluation.tta import TTA_POLICIES, model_logits, run_tta_table
from pipelines.training.distributed import gather_in_order, sample_indices, world_size

__all__ = ["EvaluationReportHandler", "sanitize_metric_name", "ENGINE_METRICS"]

logger = logging.getLogger(__name__)

#: Scalars copied into ``engine.state.metrics`` so MONAI's StatsHandler / key-metric logic sees them.
ENGINE_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc")

_MLFLOW_BATCH = 500


def sanitize_metric_name(name: str) -> str:
    """Replace characters MLflow rejects in metric/param names (allowed: alphanumerics, ``_ - . space / :``)."""
    return re.sub(r"[^A-Za-z0-9_\-. /:]", "_", str(name))


class EvaluationReportHandler:
    """Collects predictions during a MONAI evaluator run and, on completion, writes and logs the full report.

    Files written to ``output_dir`` (atomically): ``metrics.json``, ``metrics_ci.csv``,
    ``classification_report.csv``, ``confusion_matrix.png``, ``metrics.md``; with ``network`` and ``val_loader``:
    ``calibration.json`` and ``reliability_diagram.png`` (temperature fitted on validation logits, ECE/NLL before
    and after on the evaluated set); with ``network`` and ``test_loader``: ``tta.csv``; with
    ``explain_per_class > 0`` and a network: ``explanations/<class>_<k>.png``.

    Args:
        output_dir: report folder, created if needed.
        class_names: C class names in logit order.
        n_resamples: stratified bootstrap resamples for the CIs (0 disables them). When the batches carry
            ``subject_key`` and a subject has several images, whole subjects are resampled (see
            :func:`pipelines.evaluation.metrics.bootstrap_ci`); otherwise images are. The result, metrics.md and
            the MLflow param ``eval.bootstrap_unit`` say which (``subject`` or ``image``).
        seed: bootstrap seed.
        network: the evaluated classifier (returns (N, C) logits); needed for calibration, TTA and explanations.
        val_loader: validation loader (dicts with ``image``, ``label``) for fitting the temperature.
        test_loader: loader of the evaluated set for the TTA table and explanations (deterministic transforms).
        tta_policies: policies of :mod:`pipelines.evaluation.tta` for the TTA table.
        explain_per_class: overlays per class (0 = none); read from ``test_loader``, else ``val_loader``.
        explain_method: ``auto``, ``rollout`` or ``gradcam``.
        gradcam_layer: Grad-CAM layer name (default: the last convolution).
        device: device for the extra network passes.
        log_to_mlflow: log to MLflow when a run is active or ``mlflow_tracking_uri`` is given.
        mlflow_tracking_uri: store for a run started by this handler when none is active.
        mlflow_experiment: experiment of that run (created if absent; default ``evaluation``).
        mlflow_run_name: name of that run.
        tags: extra MLflow tags; runs started here also get ``stage=evaluation``.
        checkpoint: the evaluated checkpoint file, to find its training run; None: the ``load_path`` of a
            ``CheckpointLoader`` on the same engine.
        progress: tqdm progress bar over the evaluated batches; None: the ``progress`` config id (default true);
            never when stderr is not a terminal.
        alpha: two-sided CI level (0.05 = 95 % CIs).
        calibration_bins: ECE / reliability-diagram bins.
        tta_crop_fraction: crop side fraction of the 5-crop policies.
        tta_flip_dim: axis mirrored by the flip policies (see :func:`pipelines.evaluation.tta.tta_views`).
        pred_key: engine-output key of the logits: raw (N, C) logits or softmax probabilities, never discretised;
            a single channel with two classes is read as the sigmoid logit of class 1.
        label_key: engine-output/loader key of the labels (indices or one-hot).
        image_key: loader key of the images.
        subject_key: engine-output or batch key of the subject ids used as bootstrap groups (None: always
            resample images). When any iteration lacks it, the whole run falls back to image-level resampling.

    After completion, ``self.result`` holds the result dict and ``self.paths`` the written files.
    """

    def __init__(
        self,
        output_dir: str | Path,
        class_names: Sequence[str],
        n_resamples: int = 1000,
        seed: int = 0,
        network: torch.nn.Module | None = None,
        val_loader: Iterable[dict[str, Any]] | None = None,
        test_loader: Iterable[dict[str, Any]] | None = None,
        tta_policies: Sequence[str] = ("none",),
        explain_per_class: int = 0,
        explain_method: str = "auto",
        gradcam_layer: str | None = None,
        device: str | torch.device = "cpu",
        log_to_mlflow: bool = True,
        mlflow_tracking_uri: str | None = None,
        mlflow_experiment: str | None = None,
        mlflow_run_name: str | None = None,
        tags: Mapping[str, Any] | None = None,
        alpha: float = 0.05,
        calibration_bins: int = 15,
        tta_crop_fraction: float = 0.875,
        tta_flip_dim: int = -1,
        pred_key: str = "pred",
        label_key: str = "label",
        image_key: str = "image",
        subject_key: str | None = "subject_id",
        checkpoint: str | Path | None = None,
        progress: bool | None = None,
    ) -> None:
        self.class_names = [str(c) for c in class_names]
        if len(self.class_names) < 2 or len(set(self.class_names)) != len(self.class_names):
            raise ValueError(f"class_names must hold at least 2 unique names, got {self.class_names}")
        sanitized = [sanitize_metric_name(c) for c in self.class_names]
        if len(set(sanitized)) != len(sanitized):
            raise ValueError(f"class_names {self.class_names} collide once made MLflow-safe: {sanitized}")
        if int(n_resamples) < 0:
            raise ValueError(f"n_resamples must be >= 0, got {n_resamples}")
        if not 0.0 < float(alpha) < 1.0:
            raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
        bad = [p for p in tta_policies if p not in TTA_POLICIES]
        if bad:
            raise ValueError(f"unknown TTA policies {bad}; expected a subset of {TTA_POLICIES}")
        if explain_method not in EXPLAIN_METHODS:
            raise ValueError(f"explain_method must be one of {EXPLAIN_METHODS}, got {explain_method!r}")
        if int(explain_per_class) < 0:
            raise ValueError(f"explain_per_class must be >= 0, got {explain_per_class}")
        if int(explain_per_class) > 0 and network is None:
            raise ValueError("explain_per_class > 0 needs `network`")
        self.output_dir = Path(output_dir)
        self.n_resamples = int(n_resamples)
        self.seed = int(seed)
        self.network = network
        self.val_loader = val_loader
        self.test_loader = test_loader
        self.tta_policies = tuple(tta_policies)
        self.explain_per_class = int(explain_per_class)
        self.explain_method = explain_method
        self.gradcam_layer = gradcam_layer
        self.device = torch.device(device)
        self.log_to_mlflow = bool(log_to_mlflow)
        self.mlflow_tracking_uri = mlflow_tracking_uri
        self.mlflow_experiment = mlflow_experiment or "evaluation"
        self.mlflow_run_name = mlflow_run_name
        self.tags = {str(k): str(v) for k, v in (tags or {}).items()}
        self.alpha = float(alpha)
        self.calibration_bins = int(calibration_bins)
        self.tta_crop_fraction = float(tta_crop_fraction)
        self.tta_flip_dim = int(tta_flip_dim)
        self.pred_key = pred_key
        self.label_key = label_key
        self.image_key = image_key
        self.subject_key = subject_key
        self.result: dict[str, Any] | None = None
        self.paths: dict[str, Path] = {}
        self.mlflow_run_id: str | None = None
        self.checkpoint = checkpoint
        self.progress = progress
        self.source_run_id: str | None = None
        self._engine: Any = None
        self._preds: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._subjects: list[Any] | None = []

    def attach(self, engine: Any) -> None:
        """Register on a MONAI ``SupervisedEvaluator`` (or any ignite Engine producing MONAI-style outputs)."""
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.COMPLETED, self)
        self._engine = engine
        from pipelines.tracking.handlers import attach_progress

        attach_progress(engine, "evaluate", self.progress)

    def reset(self, engine: Any = None) -> None:
        """Drop predictions of a previous run."""
        self._preds, self._labels, self._subjects = [], [], []

    def collect(self, engine: Any) -> None:
        """Store logits, labels and subject ids of one iteration (decollated list of dicts, or one batched dict).

        Subject ids are read from the engine output, else from ``engine.state.batch`` (where MONAI's
        SupervisedEvaluator keeps the data-record keys it does not copy into the output).
        """
        output = engine.state.output
        items = output if isinstance(output, (list, tuple)) else [output]
        n_items = 0
        for item in items:
            if not isinstance(item, Mapping) or self.pred_key not in item or self.label_key not in item:
                raise ValueError(
                    f"engine output must be dicts with {self.pred_key!r} and {self.label_key!r} keys; "
                    f"got {type(item).__name__} with keys {list(item) if isinstance(item, Mapping) else None}"
                )
            pred = to_numpy(item[self.pred_key]).astype(np.float64)
            label = to_numpy(item[self.label_key])
            if pred.ndim == 1:  # one decollated sample
                pred, label = pred[None], label.reshape(1, -1)
            self._preds.append(pred.reshape(pred.shape[0], -1))
            self._labels.append(labels_to_indices(label, len(self.class_names)))
            n_items += pred.shape[0]
        if self.subject_key is not None and self._subjects is not None:
            ids = self._subject_ids(items, n_items)
            if ids is None:
                ids = self._subject_ids(getattr(engine.state, "batch", None), n_items)
            if ids is None:
                logger.info("EvaluationReportHandler: no %r in the batch; the bootstrap resamples images",
                            self.subject_key)
                self._subjects = None
            else:
                self._subjects.extend(ids)

    def _subject_ids(self, source: Any, n_items: int) -> list[Any] | None:
        """The ``subject_key`` values of a decollated list or a batched dict, or None when absent or misaligned."""
        if source is None:
            return None
        entries = source if isinstance(source, (list, tuple)) else [source]
        ids: list[Any] = []
        for entry in entries:
            if not isinstance(entry, Mapping) or entry.get(self.subject_key) is None:
                return None
            value = entry[self.subject_key]
            if isinstance(value, (str, bytes)):
                ids.append(value)
            elif hasattr(value, "detach") or isinstance(value, np.ndarray):
                ids.extend(to_numpy(value).reshape(-1).tolist())
            elif isinstance(value, (list, tuple)):
                ids.extend(value)
            else:
                ids.append(value)
        if len(ids) != n_items or any(i is None for i in ids):
            return None
        return ids

    def __call__(self, engine: Any) -> None:
        """Events.COMPLETED: compute, write, and log the report; set ``engine.state.metrics``."""
        n_classes = len(self.class_names)
        logits = np.concatenate(self._preds) if self._preds else np.zeros((0, n_classes))
        labels = np.concatenate(self._labels) if self._labels else np.zeros(0, dtype=np.int64)
        # every rank takes part in the gather, also one whose shard is empty
        logits, labels, subjects, is_main = _gather(logits, labels, self._subjects, sample_indices(engine))
        if not is_main:
            return
        if len(labels) == 0:
            logger.warning("EvaluationReportHandler: the evaluator produced no predictions; no report written")
            return
        run = self._start_mlflow()
        try:
            result = self.evaluate(logits, labels, groups=subjects)
            for key in ENGINE_METRICS:
                engine.state.metrics[key] = result["metrics"][key]
            if run is not None:
                self._log_mlflow(run[0], run[1], result, run[2])
        except BaseException:
            if run is not None and run[2]:
                run[0].set_terminated(run[1], status="FAILED")
            raise
        if run is not None and run[2]:
            run[0].set_terminated(run[1], status="FINISHED")

    def evaluate(self, logits: Any, labels: Any, groups: Sequence[Any] | None = None) -> dict[str, Any]:
        """Compute and write the whole report from collected logits (N, C) and labels; no MLflow.

        Args:
            logits: (N, C) logits or softmax probabilities (see ``pred_key``).
            labels: N labels (indices or one-hot).
            groups: optional N subject ids; the bootstrap resamples subjects when one has several images.

        Returns:
            The result dict (also in ``self.result``), as written to metrics.json.
        """
        z = self._as_logits(to_numpy(logits).astype(np.float64))
        y = labels_to_indices(labels, len(self.class_names))
        if len(y) != len(z):
            raise ValueError(f"{len(z)} predictions but {len(y)} labels")
        probs = apply_temperature(z, 1.0)
        result = evaluate_predictions(y, probs, self.class_names, n_resamples=self.n_resamples, seed=self.seed,
                                      alpha=self.alpha, groups=groups)
        out = self.output_dir
        out.mkdir(parents=True, exist_ok=True)
        paths: dict[str, Path] = {}
        if self.network is not None and self.val_loader is not None:
            val_z, val_y = self._network_logits(self.val_loader)
            cal = calibration_summary(val_z, val_y, z, y, n_bins=self.calibration_bins)
            result["calibration"] = cal
            paths["calibration_json"] = atomic_write_text(out / "calibration.json", json.dumps(cal, indent=2) + "\n")
            paths["reliability_png"] = reliability_diagram(
                probs, apply_temperature(z, cal["temperature"]), y, out / "reliability_diagram.png",
                n_bins=self.calibration_bins,
            )
        if self.network is not None and self.test_loader is not None:
            table = run_tta_table(self.network, self.test_loader, self.class_names, self.tta_policies, self.device,
                                  crop_fraction=self.tta_crop_fraction, flip_dim=self.tta_flip_dim,
                                  image_key=self.image_key, label_key=self.label_key)
            result["tta"] = table.to_dict(orient="records")
            paths["tta_csv"] = atomic_write_csv(out / "tta.csv", table)
        paths.update(write_evaluation(result, out, self.class_names))
        paths["metrics_md"] = atomic_write_text(out / "metrics.md", markdown_table(result))
        if self.explain_per_class > 0:
            source = self.test_loader if self.test_loader is not None else self.val_loader
            if source is None:
                logger.warning("explain_per_class > 0 but neither test_loader nor val_loader given; no overlays")
            else:
                overlays = explain_examples(self.network, source, self.class_names, out / "explanations",
                                            per_class=self.explain_per_class, method=self.explain_method,
                                            target_layer=self.gradcam_layer, device=self.device,
                                            image_key=self.image_key, label_key=self.label_key)
                paths.update({f"explanation_{i}": p for i, p in enumerate(overlays)})
        self.result, self.paths = result, paths
        return result

    def mlflow_metrics(self, result: dict[str, Any] | None = None) -> dict[str, float]:
        """The finite scalars logged to MLflow, keyed by MLflow-safe names."""
        result = self.result if result is None else result
        if result is None:
            return {}
        metrics: dict[str, float] = {}
        for key, value in result["metrics"].items():
            metrics[key] = value
            lo, hi = result["ci"].get(key, (math.nan, math.nan))
            metrics[f"{key}_ci_low"], metrics[f"{key}_ci_high"] = lo, hi
        for key, value in result.get("calibration", {}).items():
            metrics[f"calibration/{key}"] = value
        for row in result.get("tta", []):
            for key in ("accuracy", "macro_f1", "macro_auc", "ms_per_image"):
                metrics[f"tta/{row['policy']}/{key}"] = row[key]
        return {
            sanitize_metric_name(k): float(v)
            for k, v in metrics.items()
            if v is not None and math.isfinite(float(v))
        }

    def _as_logits(self, pred: np.ndarray) -> np.ndarray:
        n_classes = len(self.class_names)
        if pred.ndim != 2:
            raise ValueError(f"{self.pred_key!r} must be (C,) per sample or (N, C); got {pred.shape}")
        if pred.shape[1] == 1 and n_classes == 2:
            # A single sigmoid logit z is exactly the two-class softmax over (0, z).
            pred = np.concatenate([np.zeros_like(pred), pred], axis=1)
        if pred.shape[1] != n_classes:
            raise ValueError(
                f"{self.pred_key!r} has {pred.shape[1]} channels for {n_classes} classes {self.class_names}"
            )
        if not np.all(np.isfinite(pred)):
            raise ValueError(f"{self.pred_key!r} contains NaN or infinite values")
        in_unit = pred.min() >= 0.0 and pred.max() <= 1.0
        if in_unit and np.allclose(pred.sum(axis=1), 1.0, atol=1e-4):
            if np.all((pred == 0.0) | (pred == 1.0)):
                raise ValueError(
                    f"{self.pred_key!r} is discretised (one-hot); AUC and calibration need raw logits: keep "
                    "AsDiscreted out of the postprocessing, or copy the logits to another key and set pred_key"
                )
            # Softmax outputs: log-probabilities are logits that give back the same softmax.
            pred = np.log(np.clip(pred, 1e-12, 1.0))
        return pred

    @torch.no_grad()
    def _network_logits(self, loader: Iterable[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
        net = self.network.to(self.device)
        was_training = net.training
        net.eval()
        zs, ys = [], []
        try:
            for batch in loader:
                x = torch.as_tensor(batch[self.image_key]).to(self.device)
                x = x.as_tensor() if hasattr(x, "as_tensor") else x
                zs.append(self._as_logits(model_logits(net, x).float().cpu().numpy().astype(np.float64)))
                ys.append(labels_to_indices(batch[self.label_key], len(self.class_names)))
        finally:
            net.train(was_training)
        if not zs:
            raise ValueError("val_loader yielded no batches; cannot fit the temperature")
        return np.concatenate(zs), np.concatenate(ys)

    def _start_mlflow(self) -> tuple[Any, str, bool] | None:
        """(client, run_id, started_here) for the active run or a new one; None when MLflow is not used."""
        if not self.log_to_mlflow:
            return None
        from pipelines.tracking import open_run

        return open_run(self.mlflow_tracking_uri, self.mlflow_experiment, self.mlflow_run_name, self.tags, "evaluation")

    def _checkpoint_path(self) -> Path | None:
        if self.checkpoint:
            return Path(self.checkpoint)
        if self._engine is None:
            return None
        from monai.handlers import CheckpointLoader

        from pipelines.tracking.handlers import handler_objects

        loader = next((h for h in handler_objects(self._engine) if isinstance(h, CheckpointLoader)), None)
        return Path(loader.load_path) if loader is not None else None

    def _training_run(self, client: Any, run_id: str) -> Any | None:
        """The finished training run (same experiment) whose best checkpoint is the evaluated one, else None."""
        from pipelines.tracking import file_digest

        ckpt = self._checkpoint_path()
        if ckpt is None or not ckpt.is_file():
            return None
        digest = file_digest(ckpt)
        exp_id = client.get_run(run_id).info.experiment_id
        runs = client.search_runs(
            [exp_id], filter_string=f"tags.checkpoint_sha256 = '{digest}'",
            order_by=["attributes.start_time DESC"], max_results=5,
        )
        # an evaluation logged into its own training run (the enhancement sweep) links nothing
        return next((r for r in runs if r.info.run_id != run_id), None)

    def _evaluated_dataset(self, train_run: Any | None) -> tuple[Any, str] | None:
        """(PandasDataset, context) of the evaluated split: the training run's input with the same digest when
        there is one (same name and source), else one named after the bundle and split."""
        from pipelines.tracking.datasets import CONTEXTS, split_dataset

        loader = getattr(self._engine, "data_loader", None)
        records = getattr(getattr(loader, "dataset", None), "data", None)
        if not isinstance(records, Sequence) or not records or not isinstance(records[0], Mapping):
            return None
        split = self.tags.get("split", "test")
        context = CONTEXTS.get(split, split)
        ds = split_dataset(records, f"{self.tags.get('bundle', self.mlflow_experiment)}-{context}", "unknown")
        if train_run is not None and train_run.inputs is not None:
            for di in train_run.inputs.dataset_inputs:
                if di.dataset.digest == ds.digest:
                    ds = split_dataset(records, di.dataset.name, json.loads(di.dataset.source).get("uri", "unknown"))
                    break
        return ds, context

    def _link(self, client: Any, run_id: str, started_here: bool = True) -> tuple[dict[str, str], str | None, Any]:
        """Tags, LoggedModel id and dataset linking this evaluation to its training run and data; the description
        only for a run started here (an active run keeps its own)."""
        from mlflow.entities import LoggedModelInput

        from pipelines.tracking import run_link
        from pipelines.tracking.datasets import dataset_input

        tags: dict[str, str] = {}
        model_id = None
        try:
            train = self._training_run(client, run_id)
        except Exception as e:
            logger.warning("could not look up the training run of the evaluated checkpoint: %s", e)
            train = None
        evaluated = None
        try:
            evaluated = self._evaluated_dataset(train)
        except Exception as e:
            logger.warning("could not build the evaluated dataset for MLflow: %s", e)
        lines = []
        if train is not None:
            self.source_run_id = train.info.run_id
            tags["train_run_id"] = tags["source_run_id"] = train.info.run_id
            model_id = train.data.tags.get("model_id")
            lines.append(f"Evaluation of training run [{train.info.run_name or train.info.run_id}]"
                         f"({run_link(train.info.experiment_id, train.info.run_id)}) "
                         f"(best epoch {train.data.tags.get('best_epoch', '?')}).")
            if model_id:
                tags["source_model_id"] = model_id
                lines.append(f"Model: `models:/{model_id}`.")
        else:
            lines.append("Evaluation of a checkpoint whose training run is not in this experiment.")
        if evaluated is not None:
            ds, context = evaluated
            lines.append(f"Data: `{ds.name}` ({context}, digest `{ds.digest}`, {ds.profile.get('num_rows')} rows).")
            client.log_inputs(run_id, datasets=[dataset_input(ds, context)],
                              models=[LoggedModelInput(model_id)] if model_id else None)
        elif model_id:
            client.log_inputs(run_id, models=[LoggedModelInput(model_id)])
        if started_here:
            tags["mlflow.note.content"] = "\n\n".join(lines) + "\n"
        return tags, model_id, evaluated[0] if evaluated is not None else None

    def _log_mlflow(self, client: Any, run_id: str, result: dict[str, Any], started_here: bool = True) -> None:
        from mlflow.entities import Metric, Param, RunTag

        link_tags, model_id, ds = self._link(client, run_id, started_here)
        now = int(time.time() * 1000)
        ds_name, ds_digest = (ds.name, ds.digest) if ds is not None else (None, None)
        metrics = [Metric(k, v, now, 0, model_id=model_id, dataset_name=ds_name, dataset_digest=ds_digest)
                   for k, v in self.mlflow_metrics(result).items()]
        params = [
            Param("eval.n_samples", str(result["n_samples"])),
            Param("eval.n_resamples", str(self.n_resamples)),
            Param("eval.bootstrap_seed", str(self.seed)),
            Param("eval.ci_alpha", str(self.alpha)),
            Param("eval.bootstrap_unit", str(result["bootstrap_unit"])),
            Param("eval.n_groups", str(result["n_groups"])),
            Param("eval.class_names", ", ".join(self.class_names)),
        ]
        if "tta" in result:
            params.append(Param("eval.tta_policies", ", ".join(self.tta_policies)))
        tags = [RunTag(k, v) for k, v in {**self.tags, **link_tags}.items()]
        for start in range(0, max(len(metrics), 1), _MLFLOW_BATCH):
            client.log_batch(run_id, metrics=metrics[start : start + _MLFLOW_BATCH],
                             params=params if start == 0 else [], tags=tags if start == 0 else [])
        for path in self.paths.values():
            rel_parent = path.parent.relative_to(self.output_dir).as_posix()
            artifact_path = "evaluation" if rel_parent == "." else f"evaluation/{rel_parent}"
            client.log_artifact(run_id, str(path), artifact_path=artifact_path)
        self.mlflow_run_id = run_id


def _gather(
    logits: np.ndarray, labels: np.ndarray, subjects: list[Any] | None = None, indices: Sequence[int] | None = None
) -> tuple[np.ndarray, np.ndarray, list[Any] | None, bool]:
    """Concatenate the shards of all ranks under torch.distributed; (logits, labels, subjects, is_rank_0).

    Subject ids are None when any rank lacks them. With the dataset ``indices`` of every rank's rows (its
    ``DistributedSampler``) the rows come back in dataset order without a padding sampler's copies
    (:func:`pipelines.training.distributed.gather_in_order`), so the report, bootstrap included, equals a
    one-process evaluation.
    """
    if world_size() == 1:
        return logits, labels, subjects, True
    rows, is_main = gather_in_order(list(zip(logits, labels, subjects or [None] * len(labels))), indices)
    z = np.stack([r[0] for r in rows]) if rows else logits[:0]
    y = np.asarray([r[1] for r in rows], dtype=labels.dtype)
    ids = [r[2] for r in rows]  # a rank without ids sent None for each of its rows
    missing = any(i is None for i in ids) or (not rows and subjects is None)
    return z, y, None if missing else ids, is_main
