"""Ignite handlers for tracking: the bundles' MLflow handler (training view, datasets, logged model, FAILED runs)
and a best-epoch report."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.handlers import MLFlowHandler

from pipelines.tracking.progress import progress_enabled

logger = logging.getLogger(__name__)

#: ``(tracking uri, experiment id) -> run id`` of the training run this process owns, joined by validators.
_TRAINING_RUNS: dict[tuple[str, str], str] = {}


def handler_objects(engine: Engine) -> Iterator[Any]:
    """Every object registered as an event handler on ``engine`` (bound methods give their instance; handlers
    behind an event filter are unwrapped)."""
    seen: set[int] = set()
    for entries in list(engine._event_handlers.values()):
        for entry in entries:
            fn = entry[0]
            parent = getattr(fn, "_parent", None)
            if parent is not None:
                fn = parent()
            owner = getattr(fn, "__self__", fn)
            if owner is not None and id(owner) not in seen:
                seen.add(id(owner))
                yield owner


def attach_progress(engine: Engine, desc: str, progress: bool | None = None, output_transform=None) -> Any:
    """Attach an ignite ``ProgressBar`` (tqdm, one bar per epoch, cleared at its end) when
    :func:`progress_enabled`; returns it, or None."""
    if not progress_enabled(progress):
        return None
    from ignite.handlers import ProgressBar

    def _postfix(output):
        try:
            return {"loss": float(output_transform(output))}
        except Exception:
            return {}

    bar = ProgressBar(persist=False, desc=desc)
    bar.attach(engine, output_transform=_postfix if output_transform is not None else None)
    return bar


class BundleMLFlowHandler(MLFlowHandler):
    """MONAI's ``MLFlowHandler`` plus what an MLflow user expects of a training run:

    - the experiment is tagged as model training (``mlflow.experimentKind``), so the UI opens the runs table;
    - the trainer's run gets tags (``stage=training``, bundle, bundle version, network, dataset, data digest,
      git commit), the train/validation/test splits as dataset inputs (:mod:`pipelines.tracking.datasets`),
      system metrics (CPU, memory; ``log_system_metrics``) and, at the end, a Markdown description with the best
      epoch and its validation metrics;
    - at the end of training the best checkpoint is logged as an MLflow model (:mod:`pipelines.tracking.model`)
      with the best epoch's metrics, and registered under ``register_model`` when that is set;
    - a tqdm progress bar per epoch (trainer and validator) when stderr is a terminal;
    - a failed run is ended ``FAILED`` (never left ``RUNNING``), and a second MLFlowHandler on the same engine
      (what ``--tracking mlflow`` appends) is detached so each value is logged once.

    Tags, datasets and the model need ``experiment_param`` made by :func:`pipelines.tracking.run_params` (it
    carries the tracked config ids and the data dict) and, for the model, the bundle's ``metadata.json``.

    Args:
        executed_config: path where the executed config is written at start and logged as an artifact.
        log_model: log the best checkpoint as an MLflow model at the end of training.
        register_model: Model Registry name to register that model under; None: the bundle's ``register_model``
            config id (``--register_model NAME``), if any; no registration when that is null too.
        log_datasets: log the splits as MLflow dataset inputs.
        log_system_metrics: sample CPU/memory (and GPU when available) into the run's system metrics.
        progress: progress bars; None: the ``progress`` config id (default true); never when not a terminal.
        bundle_root: bundle folder for metadata.json and configs; None: ``bundles/<bundle>`` of this repository.
        kwargs: passed to ``MLFlowHandler``.
    """

    def __init__(self, *args, executed_config: str | None = None, log_model: bool = True,
                 register_model: str | None = None, log_datasets: bool = True, log_system_metrics: bool = True,
                 progress: bool | None = None, bundle_root: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.executed_config = executed_config
        self.log_model = log_model
        self.register_model = register_model
        self.log_datasets = log_datasets
        self.log_system_metrics = log_system_metrics
        self.progress = progress
        self.bundle_root = bundle_root
        self.model_info = None
        self._engine: Engine | None = None
        self._sysmon = None
        self._kind_checked = False
        self._resumed = False

    def attach(self, engine: Engine) -> None:
        super().attach(engine)
        # run before StatsHandler, whose exception handler re-raises and would stop the chain
        engine.add_event_handler(Events.EXCEPTION_RAISED, self.exception_raised)
        handlers = engine._event_handlers[Events.EXCEPTION_RAISED]
        handlers.insert(0, handlers.pop())
        self._engine = engine
        attach_progress(engine, "train" if self.close_on_complete else "validate", self.progress,
                        self.output_transform if self.close_on_complete else None)

    def _set_experiment(self) -> None:
        super()._set_experiment()
        if not self._kind_checked:
            from pipelines.tracking import mark_model_training

            mark_model_training(self.client, self.experiment.experiment_id)
            self._kind_checked = True

    def start(self, engine: Engine) -> None:
        self._detach_duplicates(engine)
        if self.cur_run is None:
            self._open_run(self._resume_run_id(engine) if self.close_on_complete else None)
        super().start(engine)
        self._raise_on_sigterm()
        if self.executed_config:
            from pipelines.tracking import save_executed_config

            try:
                saved = save_executed_config(self.executed_config)
            except Exception as e:  # the config record must never stop training
                logger.warning("could not write the executed config: %s", e)
                saved = None
            if saved:
                self.artifacts = tuple(a for a in self.artifacts if a) + (saved,)
        if self.close_on_complete:  # the trainer's handler owns the run
            self._engine = engine
            if not self._resumed:
                self._describe_start()
            else:
                self._start_system_metrics()

    @staticmethod
    def _resume_run_id(engine: Engine) -> str | None:
        """The MLflow run of the checkpoint a :class:`pipelines.training.checkpoint.TrainingCheckpoint` on
        ``engine`` resumes, else None."""
        from pipelines.training.checkpoint import TrainingCheckpoint

        for h in handler_objects(engine):
            if isinstance(h, TrainingCheckpoint) and h.resumed is not None and h.run_id:
                return str(h.run_id)
        return None

    def _log_params(self, params: dict[str, Any]) -> None:
        if self._resumed and self.cur_run is not None:  # MLflow params are write-once: log only new keys
            logged = self.client.get_run(self.cur_run.info.run_id).data.params
            changed = sorted(k for k, v in params.items() if k in logged and logged[k] != str(v))
            if changed:
                logger.warning("resumed MLflow run %s keeps its original value of %s", self.cur_run.info.run_id,
                               changed)
            params = {k: v for k, v in params.items() if k not in logged}
            if not params:
                return
        super()._log_params(params)

    # ------------------------------------------------------------------ what the trainer's run records

    def _tracked(self) -> tuple[dict[str, Any], Mapping[str, Any] | None]:
        params = self.experiment_param or {}
        return dict(getattr(params, "tracked", params)), getattr(params, "data", None)

    def _bundle_root(self) -> Path | None:
        if self.bundle_root:
            return Path(self.bundle_root)
        from pipelines.bundles import bundle_dir

        bundle = self._tracked()[0].get("bundle")
        root = Path(bundle_dir(str(bundle))) if bundle else None
        return root if root is not None and (root / "configs" / "metadata.json").is_file() else None

    def _run_tags(self) -> dict[str, str]:
        from pipelines.tracking import bundle_version, git_commit
        from pipelines.tracking.datasets import dataset_name

        tracked, data = self._tracked()
        tags = {"stage": "training", "git_commit": git_commit()}
        if tracked.get("bundle"):
            tags["bundle"] = str(tracked["bundle"])
        root = self._bundle_root()
        if root is not None:
            tags["bundle_version"] = bundle_version(root)
        if tracked.get("network"):
            tags["network"] = str(tracked["network"])
        if tracked.get("dataset"):
            tags["dataset"] = dataset_name(tracked["dataset"])
        if data is not None and data.get("digest"):
            tags["data_digest"] = str(data["digest"])
        return tags

    def _describe_start(self) -> None:
        from mlflow.entities import RunTag

        run_id = self.cur_run.info.run_id
        try:
            tags = self._run_tags()
            self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
            tracked, data = self._tracked()
            if self.log_datasets and data is not None:
                from pipelines.tracking.datasets import log_splits

                self.datasets = log_splits(self.client, run_id, data, tracked.get("dataset"))
        except Exception as e:  # tracking extras must never stop training
            logger.warning("could not tag the MLflow run or log its datasets: %s", e)
        self._start_system_metrics()

    def _start_system_metrics(self) -> None:
        run_id = self.cur_run.info.run_id
        if self.log_system_metrics and self._sysmon is None:
            try:
                from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

                self._sysmon = SystemMetricsMonitor(run_id, tracking_uri=self.client.tracking_uri)
                self._sysmon.start()
            except Exception as e:
                logger.warning("system metrics are not logged: %s", e)
                self._sysmon = None

    def _stop_system_metrics(self) -> None:
        if self._sysmon is not None:
            try:
                mon = self._sysmon
                mon._shutdown_event.set()
                if mon._process is not None:
                    mon._process.join()
                if mon._logging_step == 0:  # a run shorter than one logging period still gets one sample
                    mon.collect_metrics()
                    mon.publish_metrics(mon.aggregate_metrics())
                mon.finish()
            except Exception as e:
                logger.warning("could not stop the system metrics monitor: %s", e)
            self._sysmon = None

    def _validator_and_checkpoint(self, engine: Engine) -> tuple[Any, Path | None]:
        """The trainer's validator (through its ``ValidationHandler``) and its best-metric checkpoint file."""
        from monai.handlers import CheckpointSaver, ValidationHandler

        validator = next((h.validator for h in handler_objects(engine) if isinstance(h, ValidationHandler)), None)
        if validator is None:
            return None, None
        for h in handler_objects(validator):
            checkpoint = getattr(h, "_key_metric_checkpoint", None) if isinstance(h, CheckpointSaver) else None
            if checkpoint is None or not checkpoint._saved:
                continue
            # MONAI's saver writes a fixed ``key_metric_filename`` when given, else ignite's generated name
            fixed = getattr(checkpoint.save_handler, "filename", None)
            path = Path(fixed or checkpoint._saved[-1].filename)
            path = path if path.is_absolute() else Path(h.save_dir) / path
            if path.is_file():
                return validator, path
        return validator, None

    def _best_metrics(self, step: int) -> dict[str, float]:
        run_id = self.cur_run.info.run_id
        out = {}
        for key in sorted(self.client.get_run(run_id).data.metrics):
            if key.startswith("val_"):
                hist = [m for m in self.client.get_metric_history(run_id, key) if m.step == step]
                if hist:
                    out[key] = hist[-1].value
        return out

    def _finish_training(self) -> None:
        from mlflow.entities import RunTag

        from pipelines.tracking import config_id, file_digest

        engine = self._engine
        run_id = self.cur_run.info.run_id
        tracked, _ = self._tracked()
        tags = self._run_tags()
        validator, ckpt = self._validator_and_checkpoint(engine)
        best_epoch = int(getattr(validator.state, "best_metric_epoch", -1)) if validator is not None else -1
        key_metric = getattr(validator.state, "key_metric_name", None) if validator is not None else None
        step = best_epoch if best_epoch > 0 else int(engine.state.epoch)
        metrics = self._best_metrics(step)
        root = self._bundle_root()
        new_tags: dict[str, str] = {}
        if best_epoch > 0:
            new_tags["best_epoch"] = str(best_epoch)
        if ckpt is not None:
            new_tags["checkpoint_sha256"] = file_digest(ckpt)
        register = self.register_model if self.register_model is not None else config_id("register_model", None)
        if self.log_model and ckpt is not None and root is not None and getattr(engine, "network", None) is not None:
            from pipelines.tracking.model import log_bundle_model

            network = engine.network
            if isinstance(network, torch.nn.parallel.DistributedDataParallel):
                network = network.module
            try:
                self.model_info = log_bundle_model(
                    self.client, run_id, network, ckpt, root, image_size=tracked.get("image_size"),
                    step=step, register_model=register or None,
                    tags={**{k: v for k, v in tags.items() if k != "stage"}, **new_tags},
                )
                new_tags["model_id"] = self.model_info.model_id
            except Exception as e:  # the model is a convenience: the checkpoint artifact is the record
                logger.warning("could not log the MLflow model: %s", e)
        elif self.log_model:
            logger.info("no MLflow model logged (best checkpoint %s, bundle metadata %s)", ckpt, root)
        new_tags["mlflow.note.content"] = self._description(tags, tracked, best_epoch, key_metric, metrics, ckpt, root,
                                                             int(engine.state.epoch), register)
        self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in new_tags.items()])

    def _description(self, tags, tracked, best_epoch, key_metric, metrics, ckpt, root, epochs, register) -> str:
        lines = [f"**{tags.get('bundle', 'bundle')}** {tags.get('bundle_version', '')} · network "
                 f"`{tags.get('network', '?')}` · data `{tags.get('dataset', '?')}` (digest "
                 f"`{tags.get('data_digest', '?')}`) · commit `{tags.get('git_commit', '?')}`", ""]
        if best_epoch > 0:
            lines.append(f"Best epoch **{best_epoch}** of {epochs}"
                         + (f" by `{key_metric}`" if key_metric else "") + ".")
        if metrics:
            lines += ["", "| validation metric (best epoch) | value |", "|---|---|"]
            lines += [f"| {k} | {v:.4f} |" for k, v in metrics.items()]
        if ckpt is not None:
            where = os.path.relpath(ckpt, root) if root is not None and Path(ckpt).resolve().is_relative_to(
                Path(root).resolve()) else Path(ckpt).name
            lines += ["", f"Checkpoint: `{where}` in the bundle (also the run artifact `{Path(ckpt).name}`)."]
        if self.model_info is not None:
            lines.append(f"Logged model: `{self.model_info.model_uri}` (pytorch, outputs class probabilities)"
                         + (f", registered as `{register}` version {self.model_info.registered_model_version}."
                            if register else "."))
        return "\n".join(lines) + "\n"

    def close(self) -> None:
        if self.close_on_complete and self.cur_run is not None and self._engine is not None:
            try:
                self._finish_training()
            except Exception as e:  # never leave the run RUNNING because of a description
                logger.warning("could not describe the MLflow run: %s", e)
        self._stop_system_metrics()
        if self.close_on_complete and self.cur_run is not None:
            for key, run_id in list(_TRAINING_RUNS.items()):
                if run_id == self.cur_run.info.run_id:
                    del _TRAINING_RUNS[key]
        super().close()

    def _open_run(self, resume_run_id: str | None = None) -> None:
        """The trainer's handler (``close_on_complete``) opens a new run, or reopens ``resume_run_id`` (a resumed
        training); the validator's joins the trainer's run of this process, else the newest RUNNING run of that
        name. (MONAI's own lookup would reuse an old FAILED run with the same name.)

        Before the trainer's run starts, RUNNING runs of the experiment whose process is gone are marked KILLED
        (:func:`pipelines.tracking.mark_dead_runs`); the run is tagged with this process id and host."""
        import time

        from mlflow.entities import RunTag

        from pipelines.tracking import mark_dead_runs, process_tags

        self._set_experiment()
        name = self.run_name or f"run_{time.strftime('%Y%m%d_%H%M%S')}"
        exp_id = self.experiment.experiment_id
        key = (str(self.client.tracking_uri), str(exp_id))
        if self.close_on_complete:
            mark_dead_runs(self.client, exp_id)
            if resume_run_id is not None:
                run = self.client.get_run(resume_run_id)
                if run.info.experiment_id != exp_id:
                    raise ValueError(f"the checkpoint's MLflow run {resume_run_id} belongs to another experiment "
                                     f"({run.info.experiment_id}, not {exp_id} '{self.experiment_name}')")
                self.client.update_run(resume_run_id, status="RUNNING")
                self.client.log_batch(resume_run_id, tags=[RunTag(k, v) for k, v in process_tags().items()])
                self.cur_run = self.client.get_run(resume_run_id)
                self._resumed = True
                logger.info("continuing MLflow run %s (%s) from status %s", resume_run_id, run.info.run_name,
                            run.info.status)
            else:
                self.cur_run = self.client.create_run(experiment_id=exp_id, run_name=name, tags=process_tags())
            _TRAINING_RUNS[key] = self.cur_run.info.run_id
            return
        if key in _TRAINING_RUNS:
            self.cur_run = self.client.get_run(_TRAINING_RUNS[key])
            return
        if not self.close_on_complete:
            safe = name.replace("'", "\\'")
            runs = self.client.search_runs(
                [exp_id], filter_string=f"attributes.run_name = '{safe}' and attributes.status = 'RUNNING'",
                order_by=["attributes.start_time DESC"], max_results=1,
            )
            if runs:
                self.cur_run = runs[0]
                return
        self.cur_run = self.client.create_run(experiment_id=exp_id, run_name=name)

    @staticmethod
    def _raise_on_sigterm() -> None:
        """Turn SIGTERM (``kill``, a CI time-out) into an exception, so the run is ended FAILED, not left RUNNING."""
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:

            def _terminate(signum, frame):
                raise KeyboardInterrupt(f"terminated by signal {signum}")

            signal.signal(signal.SIGTERM, _terminate)

    def _detach_duplicates(self, engine: Engine) -> None:
        for event, entries in list(engine._event_handlers.items()):
            keep = []
            for entry in entries:
                owner = getattr(entry[0], "__self__", None)
                if isinstance(owner, MLFlowHandler) and owner is not self and not isinstance(owner, BundleMLFlowHandler):
                    continue
                keep.append(entry)
            entries[:] = keep

    def exception_raised(self, engine: Engine, e: BaseException) -> None:
        self._stop_system_metrics()
        if self.cur_run is not None and not getattr(self, "_marked_failed", False):
            self._marked_failed = True
            try:
                self.client.set_terminated(self.cur_run.info.run_id, status="FAILED")
                logger.error("MLflow run %s marked FAILED: %s", self.cur_run.info.run_id, e)
            except Exception as err:  # never hide the original error
                logger.error("could not mark the MLflow run FAILED: %s", err)
        raise e


class BestEpochReport:
    """On every validation epoch that sets a new best key metric, write the confusion matrix (PNG) and the
    classification report and metrics with bootstrap CIs of that epoch to ``output_dir``
    (:func:`pipelines.evaluation.report.write_evaluation`).

    Args:
        output_dir: destination folder (created).
        class_names: class names in output-channel order.
        n_resamples: bootstrap resamples for the CIs.
    """

    def __init__(self, output_dir: str | os.PathLike, class_names: Sequence[str], n_resamples: int = 200) -> None:
        self.output_dir = Path(output_dir)
        self.class_names = list(class_names)
        self.n_resamples = n_resamples

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self.logits, self.labels = [], []

    def _collect(self, engine: Engine) -> None:
        for item in engine.state.output:
            self.logits.append(torch.as_tensor(item["pred"]).detach().float().cpu().view(-1))
            lab = torch.as_tensor(item["label"]).detach().cpu().view(-1)
            self.labels.append(int(lab.argmax()) if lab.numel() > 1 else int(lab.item()))

    def _write(self, engine: Engine) -> None:
        if getattr(engine.state, "best_metric_epoch", -1) != engine.state.epoch:
            return
        from pipelines.evaluation.metrics import evaluate_predictions
        from pipelines.evaluation.report import write_evaluation

        from pipelines.training.distributed import gather_rows, rank

        logits = gather_rows(torch.stack(self.logits) if self.logits else torch.zeros(0, len(self.class_names)))
        labels = gather_rows(torch.as_tensor(self.labels, dtype=torch.long))
        if rank() != 0:  # every rank takes part in the gather, rank 0 writes
            return
        probs = torch.softmax(logits, dim=1).numpy()
        result = evaluate_predictions(labels.numpy(), probs, self.class_names, n_resamples=self.n_resamples)
        result["epoch"] = int(engine.state.epoch)
        write_evaluation(result, self.output_dir, self.class_names)
