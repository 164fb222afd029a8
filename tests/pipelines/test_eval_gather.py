"""The evaluation report's gather across 2 real gloo processes: dataset order restored, padded copies dropped,
an empty shard allowed."""

from __future__ import annotations

import os
import socket

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: str) -> None:
    from pipelines.evaluation.handler import _gather
    from pipelines.training.distributed import gather_in_order

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        results = []
        # torch's sampler pads 5 samples to 6 (rank 1 repeats sample 0); then a shard that is empty on rank 1
        padded = torch.utils.data.distributed.DistributedSampler(range(5), 2, rank, shuffle=False)
        for idx in (list(padded), [0] if rank == 0 else []):
            logits = np.array([[float(i), -float(i)] for i in idx]).reshape(-1, 2)
            labels = np.array([i % 2 for i in idx], dtype=np.int64)
            results.append(_gather(logits, labels, [f"sub-{i}" for i in idx], idx))
        # any per-sample records (the denoising and embedding reports); without indices: rank order
        records = [{"i": i, "rank": rank} for i in padded]
        results.append(gather_in_order(records, list(padded)))
        results.append(gather_in_order(records))
        results.append(gather_in_order(records, [0] if rank == 0 else None))  # not every rank knows: rank order
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def test_gather_restores_dataset_order_without_padding_copies(tmp_path):
    out = str(tmp_path / "gathered.pt")
    mp.start_processes(_worker, args=(_free_port(), out), nprocs=2, start_method="spawn")
    (z, y, subjects, main), (z1, y1, subjects1, _), ordered, by_rank, partial = torch.load(out, weights_only=False)
    assert main and z[:, 0].tolist() == [0, 1, 2, 3, 4] and y.tolist() == [0, 1, 0, 1, 0]
    assert subjects == [f"sub-{i}" for i in range(5)]
    assert z1.shape == (1, 2) and subjects1 == ["sub-0"]
    # rank 0 holds 0, 2, 4; rank 1 holds 1, 3 and the padded copy of 0
    assert ordered == ([{"i": i, "rank": i % 2} for i in range(5)], True)
    assert [r["i"] for r in by_rank[0]] == [0, 2, 4, 1, 3, 0] and by_rank[1]
    assert partial == by_rank
