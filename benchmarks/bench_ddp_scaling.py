"""Training throughput of a bundle on 1 process against N processes (``torchrun`` + ``multi_gpu_train.json``).

Runs the real bundle twice on the same data and settings, ``python -m monai.bundle run`` with ``train.json`` (one
process) and ``torchrun --standalone --nproc_per_node=N`` with ``train.json`` + ``multi_gpu_train.json``, and
prints training images per second of each and their ratio (ideal: N)::

    # CPU (gloo): 1 vs 2 processes, tiny phantom, the bundle network at 128 px, batch 4, 1 thread a process
    python benchmarks/bench_ddp_scaling.py
    # N GPUs (nccl, chosen automatically), the bundle's own sizes on the default phantom
    python benchmarks/bench_ddp_scaling.py --nproc N --dataset alzheimer --image_size 128 --network_width 0.5 \\
        --batch_size 32 --epochs 5 --threads 4

``batch_size`` is per process, so N processes step through an epoch in 1/N of the iterations. Validation is off
(``val_interval`` past the last epoch) and the first epoch (caching, warm-up) is not timed: the figure is the median
epoch time over the remaining epochs, from ignite's ``Epoch[k] Complete. Time taken`` lines (the slowest rank's).
Processes share the machine's cores: on a CPU the ratio is bounded by the cores free for ``N * threads`` threads.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipelines.bundles import bundle_command  # noqa: E402

EPOCH_LINE = re.compile(r"Epoch\[(\d+)\] Complete\. Time taken: (\d+):(\d+):([\d.]+)")


def epoch_seconds(log: str) -> dict[int, float]:
    """Epoch -> seconds from ignite's log lines (the maximum over ranks, which log the same epoch)."""
    times: dict[int, float] = defaultdict(float)
    for epoch, h, m, s in EPOCH_LINE.findall(log):
        times[int(epoch)] = max(times[int(epoch)], int(h) * 3600 + int(m) * 60 + float(s))
    return dict(times)


def images_per_epoch(n_train: int, batch: int, nproc: int) -> int:
    """Images one epoch trains on: each rank draws ceil(n / nproc) and drops the last partial batch."""
    per_rank = -(-n_train // nproc)
    if n_train > batch:  # the bundles' drop_last
        per_rank = per_rank // batch * batch
    return per_rank * nproc


def run(args: argparse.Namespace, nproc: int, root: Path) -> tuple[float, dict[int, float], int]:
    cfg = f"bundles/{args.bundle}/configs"
    configs = [f"{cfg}/train.json"] + ([f"{cfg}/multi_gpu_train.json"] if nproc > 1 else [])
    out = root / f"p{nproc}"
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    data = ({"dataset_dir": f"$pipelines.phantoms.alzheimer.default_dataset('{args.dataset}')"}
            if args.bundle.startswith("alz") else {})
    cmd = bundle_command(configs, {**data, "image_size": args.image_size, "network_width": args.network_width,
                                   "batch_size": args.batch_size, "epochs": args.epochs,
                                   "val_interval": args.epochs + 1, "num_workers": 0, "output_dir": out,
                                   "ckpt_dir": out / "models"}, python=launcher)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{log[-4000:]}")
    times = epoch_seconds(log)
    if len(times) < 2:
        raise SystemExit(f"need >= 2 epochs to time, found {sorted(times)}")
    manifest = pd.read_csv(out / "data" / "manifest.csv")
    images = images_per_epoch(int((manifest["split"] == "train").sum()), args.batch_size, nproc)
    timed = [t for e, t in sorted(times.items()) if e > 1]
    return images / statistics.median(timed), times, images


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", default="alz_hybrid")
    p.add_argument("--nproc", type=int, default=2, help="processes of the distributed run (GPUs on a GPU machine)")
    p.add_argument("--dataset", default="alzheimer-tiny", help="alzheimer phantom preset (alz_* bundles)")
    p.add_argument("--image_size", type=int, default=128)
    p.add_argument("--network_width", type=float, default=0.5)
    p.add_argument("--batch_size", type=int, default=4, help="per process")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every process")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ddp-scaling-") as tmp:
        results = {n: run(args, n, Path(tmp)) for n in (1, args.nproc)}
    for n, (rate, times, images) in results.items():
        epochs = ", ".join(f"{t:.2f}" for _, t in sorted(times.items()))
        print(f"{n} process(es): {rate:8.1f} images/s  ({images} images an epoch; epoch seconds {epochs})")
    ratio = results[args.nproc][0] / results[1][0]
    print(f"scaling {args.nproc} vs 1 process: {ratio:.2f}x (ideal {args.nproc}x)")


if __name__ == "__main__":
    main()
