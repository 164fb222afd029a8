"""Ignite handlers for tracking: an MLflow handler that ends failed runs as FAILED, and a best-epoch report."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.handlers import MLFlowHandler

logger = logging.getLogger(__name__)


class BundleMLFlowHandler(MLFlowHandler):
    """MONAI's ``MLFlowHandler`` plus: a failed run is ended ``FAILED`` (never left ``RUNNING``), and a
    second MLFlowHandler on the same engine (what ``--tracking mlflow`` appends) is detached so each
    value is logged once.

    Args:
        executed_config: path where the executed config is written at start and logged as an artifact.
        kwargs: passed to ``MLFlowHandler``.
    """

    def __init__(self, *args, executed_config: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.executed_config = executed_config

    def attach(self, engine: Engine) -> None:
        super().attach(engine)
        # run before StatsHandler, whose exception handler re-raises and would stop the chain
        engine.add_event_handler(Events.EXCEPTION_RAISED, self.exception_raised)
        handlers = engine._event_handlers[Events.EXCEPTION_RAISED]
        handlers.insert(0, handlers.pop())

    def start(self, engine: Engine) -> None:
        self._detach_duplicates(engine)
        if self.cur_run is None:
            self._open_run()
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

    def _open_run(self) -> None:
        """The trainer's handler (``close_on_complete``) always opens a new run; the validator's joins the newest
        RUNNING run of that name. (MONAI's own lookup would reuse an old FAILED run with the same name.)"""
        import time

        self._set_experiment()
        name = self.run_name or f"run_{time.strftime('%Y%m%d_%H%M%S')}"
        exp_id = self.experiment.experiment_id
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

        probs = torch.softmax(torch.stack(self.logits), dim=1).numpy()
        result = evaluate_predictions(np.asarray(self.labels), probs, self.class_names, n_resamples=self.n_resamples)
        result["epoch"] = int(engine.state.epoch)
        write_evaluation(result, self.output_dir, self.class_names)
