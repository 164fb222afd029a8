"""Crash-safe checkpoints: the best model written atomically, and an exact-resume checkpoint every epoch.

``AtomicCheckpointSaver`` is MONAI's ``CheckpointSaver`` whose files are written to a temporary sibling and moved
into place with ``os.replace``. MONAI's saver writes in place, and with a fixed ``key_metric_filename`` ignite
first *deletes* the previous best file and then writes the new one: a ``kill -9`` between the two, or during the
write, left no ``model.pt`` at all. Here the old file stays until the new one is complete.

``TrainingCheckpoint`` (a trainer handler) writes ``checkpoint_last.pt`` at the end of every epoch, after
validation, holding everything needed to continue as if the process had never stopped:

- ``network``, ``optimizer``, ``lr_scheduler`` and any further ``state_dict`` objects given (``ema``,
  ``prepare_batch``, ``sampler``: its generator);
- ``trainer``: epoch, iteration, epoch length, max epochs, best training metric;
- ``validator``: best validation metric, its epoch, and the best-model saver's record (so ``model.pt`` is only
  replaced by a better epoch after a resume);
- ``rng``: torch (CPU and CUDA), NumPy and Python ``random`` states;
- ``mlflow_run_id``: the training run to continue.

Only tensors and plain Python values are stored, so :func:`load_checkpoint` reads it with
``torch.load(weights_only=True)``. With ``resume`` set, the handler restores all of it when the trainer starts
and the bundle's :class:`pipelines.tracking.handlers.BundleMLFlowHandler` continues the same MLflow run, so
metrics go on at the right epochs.

Under ``torch.distributed`` every rank restores; only rank 0 writes.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import DiskSaver
from monai.handlers import CheckpointSaver

from pipelines.io.atomic import atomic_torch_save

logger = logging.getLogger(__name__)

__all__ = ["AtomicCheckpointSaver", "AtomicDiskSaver", "TrainingCheckpoint", "load_checkpoint", "resume_path",
           "rng_state", "set_rng_state"]

#: Format version of ``checkpoint_last.pt``.
CHECKPOINT_VERSION = 1


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0


def _unwrap(obj: Any) -> Any:
    return obj.module if isinstance(obj, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)) else obj


class AtomicDiskSaver(DiskSaver):
    """ignite ``DiskSaver`` that writes through :func:`pipelines.io.atomic.atomic_torch_save` (usual file
    permissions, unlike ``DiskSaver(atomic=True)``), on rank 0 only.

    Args:
        dirname: destination folder (created).
        filename: a fixed file name (MONAI's ``key_metric_filename``/``final_filename``); the file is then never
            removed before its replacement is written, only replaced.
    """

    def __init__(self, dirname: str | os.PathLike, filename: str | None = None) -> None:
        super().__init__(dirname=str(dirname), require_empty=False, atomic=False, create_dir=True)
        self.filename = filename

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        super().__call__(checkpoint, self.filename or filename, metadata)

    def _save_func(self, checkpoint: Mapping, path: Path, func: Any) -> None:
        atomic_torch_save(checkpoint, path)

    def remove(self, filename: str) -> None:
        if self.filename is not None:  # the next save replaces it atomically: never delete the best model first
            return
        super().remove(filename)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI ``CheckpointSaver`` (same arguments) whose every file is written atomically; see the module docstring."""

    def __init__(self, save_dir: str, save_dict: dict, *args: Any, **kwargs: Any) -> None:
        super().__init__(save_dir, save_dict, *args, **kwargs)
        fixed = {"_final_checkpoint": kwargs.get("final_filename"),
                 "_key_metric_checkpoint": kwargs.get("key_metric_filename"),
                 "_interval_checkpoint": None}
        for attr, filename in fixed.items():
            checkpoint = getattr(self, attr)
            if checkpoint is not None:
                checkpoint.save_handler = AtomicDiskSaver(save_dir, filename)


def rng_state() -> dict[str, Any]:
    """Torch (CPU, CUDA), NumPy and Python ``random`` generator states as tensors and plain values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": int(version), "internal": list(internal), "gauss_next": gauss_next},
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)`` (tensors and plain values only)."""
    return torch.load(path, map_location=map_location, weights_only=True)


def resume_path(resume: Any, default: str | os.PathLike) -> Path | None:
    """The checkpoint a ``resume`` config value asks for: None for false/None/``""``/``"false"``, ``default``
    for true/``"true"``, else the value as a path."""
    if resume is None or resume is False:
        return None
    if resume is True:
        return Path(default)
    text = str(resume).strip()
    if text.lower() in ("", "0", "false", "no", "off", "none"):
        return None
    if text.lower() in ("1", "true", "yes", "on"):
        return Path(default)
    return Path(text)


class TrainingCheckpoint:
    """Trainer handler: write an exact-resume checkpoint every epoch, and restore one when ``resume`` is set.

    Attach it after the ``ValidationHandler`` (last in ``train#handlers``), so each checkpoint holds the epoch's
    validation result.

    Args:
        path: the checkpoint file, e.g. ``<ckpt_dir>/checkpoint_last.pt``.
        save_dict: ``name -> object with state_dict/load_state_dict`` (network, optimizer, lr_scheduler, ema,
            prepare_batch, ...). A sampler is stored through its ``generator``; None values are skipped.
            The trainer is the engine this handler is attached to.
        resume: false (start afresh), true (restore ``path``) or the path of a checkpoint to restore.
        validator: the validation engine whose best metric, best epoch and best-model saver are kept.
        save_interval: write every this many epochs (the last epoch is always written).

    Raises:
        FileNotFoundError: ``resume`` names a checkpoint that does not exist.
        ValueError: the checkpoint's run is already complete, or it lacks an object of ``save_dict``.
    """

    def __init__(self, path: str | os.PathLike, save_dict: Mapping[str, Any], resume: Any = False,
                 validator: Engine | None = None, save_interval: int = 1) -> None:
        if int(save_interval) < 1:
            raise ValueError(f"save_interval must be >= 1, got {save_interval}")
        self.path = Path(path)
        self.save_dict = {k: v for k, v in save_dict.items() if v is not None}
        self.validator = validator
        self.save_interval = int(save_interval)
        self.resume_from = resume_path(resume, self.path)
        self.resumed: dict[str, Any] | None = None
        self.run_id: str | None = None  # MLflow run to continue, read by BundleMLFlowHandler
        if self.resume_from is not None:
            if not self.resume_from.is_file():
                raise FileNotFoundError(f"{self.resume_from}: no checkpoint to resume from")
            self.resumed = load_checkpoint(self.resume_from)
            missing = sorted(set(self.save_dict) - set(self.resumed.get("state", {})))
            if missing:
                raise ValueError(f"{self.resume_from}: the checkpoint lacks {missing}")
            self.run_id = self.resumed.get("mlflow_run_id")
        elif self.path.is_file():
            logger.warning("%s exists and is overwritten by this new run; pass --resume True to continue it instead",
                           self.path)

    # ------------------------------------------------------------------ saving

    def attach(self, engine: Engine) -> None:
        self.engine = engine
        if self.resumed is not None:
            engine.add_event_handler(Events.STARTED, self.restore)
            handlers = engine._event_handlers[Events.STARTED]
            handlers.insert(0, handlers.pop())  # before every other STARTED handler (MLflow opens the run there)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)

    def _objects(self) -> dict[str, Any]:
        out = {}
        for name, obj in self.save_dict.items():
            if isinstance(obj, torch.utils.data.Sampler):
                gen = getattr(obj, "generator", None)
                out[name] = {"generator": gen.get_state() if gen is not None else None,
                             "epoch": getattr(obj, "epoch", None)}
            else:
                out[name] = _unwrap(obj).state_dict()
        return out

    def _validator_state(self) -> dict[str, Any]:
        v = self.validator
        if v is None:
            return {}
        state = {"best_metric": float(getattr(v.state, "best_metric", -1)),
                 "best_metric_epoch": int(getattr(v.state, "best_metric_epoch", -1))}
        saver = self._best_saver()
        if saver is not None:
            state["saver"] = {k: [(float(p), str(f)) for p, f in v]
                              for k, v in saver._key_metric_checkpoint.state_dict().items()}
        return state

    def _best_saver(self) -> CheckpointSaver | None:
        from pipelines.tracking.handlers import handler_objects

        if self.validator is None:
            return None
        return next((h for h in handler_objects(self.validator)
                     if isinstance(h, CheckpointSaver) and h._key_metric_checkpoint is not None), None)

    def _mlflow_run_id(self, engine: Engine) -> str | None:
        from monai.handlers import MLFlowHandler

        from pipelines.tracking.handlers import handler_objects

        for h in handler_objects(engine):
            if isinstance(h, MLFlowHandler) and getattr(h, "cur_run", None) is not None:
                return h.cur_run.info.run_id
        return self.run_id

    def state(self, engine: Engine) -> dict[str, Any]:
        """The checkpoint of ``engine`` now (what :meth:`save` writes)."""
        s = engine.state
        return {
            "version": CHECKPOINT_VERSION,
            "epoch": int(s.epoch),
            "trainer": {"iteration": int(s.iteration), "epoch_length": int(s.epoch_length),
                        "max_epochs": int(s.max_epochs), "best_metric": float(getattr(s, "best_metric", -1)),
                        "best_metric_epoch": int(getattr(s, "best_metric_epoch", -1))},
            "state": self._objects(),
            "validator": self._validator_state(),
            "rng": rng_state(),
            "mlflow_run_id": self._mlflow_run_id(engine),
        }

    def save(self, engine: Engine) -> None:
        epoch = int(engine.state.epoch)
        if epoch % self.save_interval and epoch != engine.state.max_epochs:
            return
        state = self.state(engine)  # every rank builds it (cheap), rank 0 writes
        if _rank() == 0:
            atomic_torch_save(state, self.path)
            logger.info("epoch %d: wrote %s", epoch, self.path)

    # ------------------------------------------------------------------ resuming

    def restore(self, engine: Engine) -> None:
        ckpt = self.resumed
        t = ckpt["trainer"]
        max_epochs = int(engine.state.max_epochs)
        if t["iteration"] >= max_epochs * t["epoch_length"]:
            raise ValueError(f"{self.resume_from}: that run is complete (epoch {ckpt['epoch']} of {max_epochs}); "
                             "nothing to resume")
        if t["epoch_length"] != engine.state.epoch_length:
            raise ValueError(f"{self.resume_from}: {t['epoch_length']} iterations an epoch, this run has "
                             f"{engine.state.epoch_length} (different data or batch size)")
        for name, obj in self.save_dict.items():
            value = ckpt["state"][name]
            if isinstance(obj, torch.utils.data.Sampler):
                if value.get("generator") is not None and getattr(obj, "generator", None) is not None:
                    obj.generator.set_state(value["generator"])
                if value.get("epoch") is not None and hasattr(obj, "set_epoch"):
                    obj.set_epoch(value["epoch"])
            else:
                _unwrap(obj).load_state_dict(value)
        engine.state.iteration = int(t["iteration"])
        engine.state.epoch = int(t["iteration"]) // int(t["epoch_length"])
        engine.state.best_metric = t["best_metric"]
        engine.state.best_metric_epoch = t["best_metric_epoch"]
        v = ckpt.get("validator") or {}
        if self.validator is not None and v:
            self.validator.state.best_metric = v["best_metric"]
            self.validator.state.best_metric_epoch = v["best_metric_epoch"]
            saver = self._best_saver()
            if saver is not None and "saver" in v:
                saver.load_state_dict({k: [tuple(x) for x in items] for k, items in v["saver"].items()})
        set_rng_state(ckpt["rng"])
        logger.info("resumed from %s at epoch %d of %d (iteration %d)%s", self.resume_from, engine.state.epoch,
                    max_epochs, engine.state.iteration,
                    f", MLflow run {self.run_id}" if self.run_id else "")
