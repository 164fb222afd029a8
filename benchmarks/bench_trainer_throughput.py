"""Training throughput of the bundles' trainer against a bare PyTorch loop, same network, same images, same CPU.

The bundles train through MONAI's ``SupervisedTrainer`` (ignite engine, DataLoader over cached samples,
batch-level augmentation in ``prepare_batch``, weight EMA after every step, per-epoch handlers). This script
times that stack against the plain loop of ``bench_plain_loop.py`` (tensors in memory, flip, Adam) on the
same network and batch size, and prints images per CPU second of each and their ratio (target: >= 0.9)::

    python benchmarks/bench_trainer_throughput.py                       # ResNet-18, 128 px, 1 thread
    python benchmarks/bench_trainer_throughput.py --network resnet18 --width 0.5 --threads 2

Images are random tensors (throughput does not depend on content); both sides run ``--iterations`` steps after
``--warmup`` untimed steps, with CPU time measured by ``time.process_time`` (this process and its threads).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def plain_loop(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int, steps: int) -> None:
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    net.train()
    for i in range(steps):
        idx = torch.randint(0, len(y), (batch,), generator=gen)
        xb = x[idx]
        flip = torch.rand(batch, generator=gen) < 0.5
        xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
        opt.zero_grad()
        F.cross_entropy(net(xb), y[idx]).backward()
        opt.step()


def bundle_trainer(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int, steps: int) -> None:
    from monai.data import DataLoader, Dataset
    from monai.engines import SupervisedTrainer
    from monai.optimizers import WarmupCosineSchedule
    from monai.handlers import LrScheduleHandler

    from pipelines.training.batch_aug import BatchAugment
    from pipelines.training.ema import EMAHandler, ModelEMA
    from pipelines.training.optim import decay_groups

    data = [{"image": x[i], "label": y[i]} for i in range(len(y))]
    loader = DataLoader(Dataset(data), batch_size=batch, shuffle=True, num_workers=0, drop_last=True)
    opt = torch.optim.AdamW(decay_groups(net, 0.05), lr=1e-3)
    ema = ModelEMA(net, 0.99)
    trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=max(1, steps // len(loader)),
                                train_data_loader=loader, network=net, optimizer=opt,
                                loss_function=torch.nn.CrossEntropyLoss(label_smoothing=0.1),
                                prepare_batch=BatchAugment(seed=0), epoch_length=min(steps, len(loader)))
    LrScheduleHandler(WarmupCosineSchedule(opt, 1, steps), epoch_level=False).attach(trainer)
    EMAHandler(ema, net).attach(trainer)
    trainer.run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--network", default="resnet18")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    from pipelines.networks.cnn import build_classifier

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n = max(args.batch_size * (args.iterations + args.warmup), 256)
    x = torch.rand(n, 1, args.image_size, args.image_size)
    y = torch.randint(0, 4, (n,))
    results = {}
    for name, fn in (("plain loop", plain_loop), ("bundle trainer", bundle_trainer)):
        net = build_classifier(args.network, 1, 4, width=args.width)
        fn(net, x, y, args.batch_size, args.warmup)
        cpu0, wall0 = time.process_time(), time.time()
        fn(net, x, y, args.batch_size, args.iterations)
        cpu, wall = time.process_time() - cpu0, time.time() - wall0
        results[name] = args.batch_size * args.iterations / cpu
        print(f"{name:15s} {results[name]:7.1f} images/CPU s  ({args.iterations} steps, {cpu:.1f} CPU s, {wall:.1f} wall s)")
    ratio = results["bundle trainer"] / results["plain loop"]
    print(f"\n{args.network} width {args.width}, {args.image_size} px, batch {args.batch_size}, {args.threads} thread(s): "
          f"bundle trainer / plain loop = {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
