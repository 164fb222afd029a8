"""``torch.distributed`` helpers for the bundles' ``multi_gpu_train.json`` / ``multi_gpu_evaluate.json`` overlays.

Started by ``torchrun`` (which sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` and the rendezvous), each process
trains a ``DistributedDataParallel`` copy of the network on its share of every epoch, validates its share of
the validation set, and the metrics are gathered so that every rank sees the same values (and so agrees on the
best epoch). Only rank 0 talks to MLflow, logs stats and writes checkpoints and reports.

Every rank must validate the same weights, the ones rank 0 then saves. DDP keeps the *parameters* equal, but not
the BatchNorm running statistics: each rank updates them from its own batches (DDP only broadcasts rank 0's before
each training forward), and the EMA copy averages each rank's own. :class:`SyncBuffers` averages them over the
ranks when validation starts (timm's ``distribute_bn(..., reduce=True)``); without it rank 1 scored its share
with other statistics than those of the saved ``model.pt``, and the gathered metrics matched no single model.

The backend is ``nccl`` when CUDA is available and ``gloo`` otherwise, so the same overlay runs on GPUs and on a
CPU machine.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

__all__ = ["init", "destroy", "rank", "world_size", "local_device", "device_ids", "hold_others", "release_others",
           "DistributedWeightedSampler", "make_sampler", "rank_zero_handlers", "gather_rows", "sample_indices",
           "gather_in_order", "sync_buffers", "SyncBuffers"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Global rank (0 outside ``torch.distributed``)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes (1 outside ``torch.distributed``)."""
    return dist.get_world_size() if is_distributed() else 1


def local_device() -> torch.device:
    """``cuda:<LOCAL_RANK>`` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    return torch.device("cpu")


def device_ids(device: torch.device) -> list[int] | None:
    """``device_ids`` for ``DistributedDataParallel``: ``[index]`` on a GPU, None on the CPU."""
    device = torch.device(device)
    return [device.index or 0] if device.type == "cuda" else None


def init(backend: str | None = None) -> bool:
    """Join the process group ``torchrun`` describes (``nccl`` on GPU, ``gloo`` on CPU unless ``backend``), pin
    this process's GPU, and return True; a no-op returning False when already initialised."""
    if is_distributed():
        return False
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(local_device())
    dist.init_process_group(backend=backend)
    logger.info("rank %d of %d joined the %s process group", rank(), world_size(), backend)
    return True


def destroy() -> None:
    """Leave the process group (after a barrier, so rank 0 finishes its writes first)."""
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


def hold_others() -> None:
    """Ranks > 0 wait here until rank 0 calls :func:`release_others` (rank 0 prepares data and split files first)."""
    if is_distributed() and rank() > 0:
        dist.barrier()


def release_others() -> None:
    """Rank 0 lets the ranks waiting in :func:`hold_others` go on."""
    if is_distributed() and rank() == 0:
        dist.barrier()


class DistributedWeightedSampler(torch.utils.data.distributed.DistributedSampler):
    """Weighted sampling with replacement (the class-balanced sampler) split across ranks.

    Every rank draws the same ``num_samples * world_size`` indices from a generator seeded by ``seed + epoch`` and
    keeps every ``world_size``-th one from its rank on, so the ranks see disjoint draws whose union is one
    weighted draw of the whole epoch. Call :meth:`set_epoch` at every epoch (MONAI's trainers do).

    Args:
        weights: sampling weight of every item (need not sum to 1).
        num_samples: total draws per epoch over all ranks (default ``len(weights)``); each rank gets
            ``ceil(num_samples / num_replicas)``.
        seed: base seed, the same on every rank.
        num_replicas, rank: default to the process group's.

    Raises:
        ValueError: negative or all-zero weights, or a rank outside ``[0, num_replicas)``.
    """

    def __init__(self, weights: Sequence[float], num_samples: int | None = None, seed: int = 0,
                 num_replicas: int | None = None, rank: int | None = None) -> None:
        self.weights = torch.as_tensor(weights, dtype=torch.double)
        if self.weights.ndim != 1 or (self.weights < 0).any() or self.weights.sum() <= 0:
            raise ValueError("weights must be a non-empty 1-D sequence of non-negative numbers, not all zero")
        self.num_replicas = world_size() if num_replicas is None else int(num_replicas)
        self.rank = globals()["rank"]() if rank is None else int(rank)
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank {self.rank} outside [0, {self.num_replicas})")
        total = len(self.weights) if num_samples is None else int(num_samples)
        self.num_samples = math.ceil(total / self.num_replicas)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        idx = torch.multinomial(self.weights, self.num_samples * self.num_replicas, replacement=True, generator=g)
        return iter(idx[self.rank::self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples


def make_sampler(records: Sequence[dict], balanced: bool, seed: int = 0) -> torch.utils.data.Sampler:
    """The training sampler of a rank: :class:`DistributedWeightedSampler` (each class drawn equally often) when
    ``balanced``, else MONAI's shuffling ``DistributedSampler``."""
    if balanced:
        labels = np.array([r["label"] for r in records])
        weights = 1.0 / np.bincount(labels)[labels]
        return DistributedWeightedSampler(weights, len(records), seed=seed)
    from monai.data import DistributedSampler

    return DistributedSampler(list(range(len(records))), shuffle=True, even_divisible=True, seed=seed)


def rank_zero_handlers(handlers: Sequence[Any]) -> list[Any]:
    """``handlers`` on rank 0; on other ranks without those that log or talk to MLflow (``MLFlowHandler``,
    ``StatsHandler``, TensorBoard). Checkpoint savers and report handlers stay: they take part in gathers and
    write only on rank 0 themselves."""
    if rank() == 0:
        return list(handlers)
    from monai.handlers import MLFlowHandler, StatsHandler, TensorBoardStatsHandler

    return [h for h in handlers if not isinstance(h, (MLFlowHandler, StatsHandler, TensorBoardStatsHandler))]


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (rows may differ in number between ranks) over all ranks in rank order; ``x`` itself
    outside ``torch.distributed``."""
    if not is_distributed():
        return x
    from monai.utils import evenly_divisible_all_gather

    device = local_device() if dist.get_backend() == "nccl" else torch.device("cpu")
    return evenly_divisible_all_gather(x.contiguous().to(device), concat=True).to(x.device)


def sample_indices(engine: Any) -> list[int] | None:
    """Dataset indices of this rank's samples in evaluation order, read from a ``DistributedSampler`` of the
    engine's loader (MONAI's or torch's); None without one."""
    loader = getattr(getattr(engine, "state", None), "dataloader", None) or getattr(engine, "data_loader", None)
    sampler = getattr(loader, "sampler", None)
    if not isinstance(sampler, torch.utils.data.distributed.DistributedSampler):
        return None
    return [int(i) for i in sampler]


def gather_in_order(rows: Sequence[Any], indices: Sequence[int] | None = None) -> tuple[list[Any], bool]:
    """All ranks' ``rows`` (any picklable per-sample records) on every rank; ``(rows, is_rank_0)``.

    With the dataset ``indices`` of every rank's rows (:func:`sample_indices`, one per row), the rows come back in
    dataset order and the copies a padding sampler adds (torch's ``DistributedSampler`` repeats samples to split
    evenly) are dropped, so a report computed from them (bootstrap included) equals a one-process one; without
    indices on every rank, or when a rank's rows and indices differ in number, they stay in rank order.
    Outside ``torch.distributed``: ``(list(rows), True)``.
    """
    if not is_distributed() or world_size() == 1:
        return list(rows), True
    shards: list[Any] = [None] * world_size()
    dist.all_gather_object(shards, (list(rows), None if indices is None else [int(i) for i in indices]))
    gathered = [r for shard in shards for r in shard[0]]
    if all(s[1] is not None and len(s[1]) == len(s[0]) for s in shards):
        first: dict[int, int] = {}
        for row, index in enumerate(i for s in shards for i in s[1]):
            first.setdefault(index, row)  # a padded copy comes after its original
        gathered = [gathered[first[i]] for i in sorted(first)]
    return gathered, rank() == 0


@torch.no_grad()
def sync_buffers(module: torch.nn.Module) -> int:
    """Make the buffers of ``module`` (a DDP wrapper is unwrapped) equal on every rank: floating-point buffers
    (BatchNorm ``running_mean``/``running_var``) become their mean over the ranks, the others (``num_batches_tracked``)
    rank 0's. Returns the number of buffers synchronised (0 outside ``torch.distributed``)."""
    if not is_distributed() or world_size() == 1:
        return 0
    module = getattr(module, "module", module)
    device = local_device() if dist.get_backend() == "nccl" else torch.device("cpu")
    n = 0
    for buf in module.buffers():
        t = buf.detach().to(device)
        if t.dtype.is_floating_point:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t /= world_size()
        else:
            dist.broadcast(t, src=0)
        buf.copy_(t.to(buf.device))
        n += 1
    return n


class SyncBuffers:
    """Evaluator handler: :func:`sync_buffers` of ``module`` when the evaluator starts, so that every rank scores
    its share with the same network (the one rank 0 saves). Attach it to the evaluator, on every rank.

    Args:
        module: the evaluated network (e.g. the EMA copy).
    """

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Any = None) -> None:
        sync_buffers(self.module)
