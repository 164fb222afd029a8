"""The "plain loop" reference: MONAI ResNet-18 from scratch in a bare PyTorch loop, for a fixed CPU-time budget.

The project's bar ("beat a plain loop") quotes this recipe: MONAI ResNet-18 (``conv1_t_stride=2``), 128 px,
trained from scratch for about 8 CPU minutes, scored on the data set's own test folder. This script reproduces
it on the machine at hand, so a bundle's figures can be set against a baseline measured on the same CPU, data
and test images, with the same CIs (``pipelines.evaluation.metrics``), instead of against quoted numbers::

    python benchmarks/bench_plain_loop.py --data-dir ../shared/data/alzheimer_mri_4class --budget-min 8
    python benchmarks/bench_plain_loop.py --data-dir ../shared/data/brain_tumor_mri_4class --budget-min 8

Recipe (deliberately plain): greyscale images min-max scaled to [0, 1], bilinear resize to ``--image-size``,
random horizontal flip, Adam (lr 1e-3), cross-entropy, batch 32, no validation split, no sampler, no schedule;
whole epochs until the CPU-time budget is spent (the last epoch may overrun it); the final weights are scored on
the test folder. It prints epochs, CPU and wall seconds, and accuracy / balanced accuracy / macro-F1 / macro AUC
with 95 % stratified bootstrap CIs; ``--out`` also writes them as JSON.

The train/test folders are the data set's own (``train``/``test`` or ``Training``/``Testing``, one sub-folder
per class). Neither Kaggle set has subject ids, so slices of one patient can fall on both sides: figures are
optimistic for every model alike. A data set without a test folder (the head-CT set) is split outside: with
``--split-csv`` (columns ``image``, ``label``, ``split``; ``split`` is ``test`` or anything else for training) and
``--class-names`` (label order), the loop trains on every non-test row and scores the test rows; the quality
harness writes that file from a bundle's own k-fold split, so both score the same held-out subjects.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.evaluation.metrics import evaluate_predictions  # noqa: E402
from pipelines.evaluation.report import write_probabilities  # noqa: E402
from pipelines.io.images import load_grey_2d  # noqa: E402

_SPLITS = (("train", "test"), ("Training", "Testing"))
_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"}


def find_splits(data_dir: Path) -> tuple[Path, Path]:
    for train, test in _SPLITS:
        if (data_dir / train).is_dir() and (data_dir / test).is_dir():
            return data_dir / train, data_dir / test
    raise SystemExit(f"{data_dir}: expected train/ and test/ (or Training/ and Testing/) class folders")


def load_folder(root: Path, classes: list[str], size: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    images, labels, paths = [], [], []
    for k, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in _SUFFIXES)
        if not files:
            raise SystemExit(f"{root / name}: no images")
        for path in files:
            images.append(_to_tensor(load_grey_2d(path), size))
            labels.append(k)
            paths.append(str(path.resolve()))
    return torch.stack(images), torch.tensor(labels), paths


def load_split(csv_path: Path, classes: list[str], size: int) -> tuple[tuple, tuple]:
    """(train, test) as ``load_folder`` returns them, from a split CSV (image, label, split)."""
    import pandas as pd

    df = pd.read_csv(csv_path)
    missing = {"image", "label", "split"} - set(df.columns)
    if missing:
        raise SystemExit(f"{csv_path}: missing columns {sorted(missing)}")
    if not df["label"].between(0, len(classes) - 1).all():
        raise SystemExit(f"{csv_path}: labels outside 0..{len(classes) - 1} for classes {classes}")

    def load(rows: pd.DataFrame) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        if rows.empty:
            raise SystemExit(f"{csv_path}: no rows for one side of the split")
        images = [_to_tensor(load_grey_2d(p), size) for p in rows["image"]]
        return torch.stack(images), torch.tensor(rows["label"].astype(int).tolist()), \
            [str(Path(p).resolve()) for p in rows["image"]]

    test = df["split"] == "test"
    return load(df[~test]), load(df[test])


def _to_tensor(img: np.ndarray, size: int) -> torch.Tensor:
    lo, hi = float(img.min()), float(img.max())
    img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None, None]
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, help="train/ and test/ class folders")
    parser.add_argument("--split-csv", type=Path, help="instead of --data-dir: image, label, split (test or train)")
    parser.add_argument("--class-names", nargs="+", help="with --split-csv: class names in label order")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--budget-min", type=float, default=8.0, help="CPU minutes of training (process time)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--n-bootstrap", type=int, default=1000)
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    parser.add_argument("--probs-out", type=Path,
                        help="write the test probabilities as CSV here (image path, label, one column per class)")
    args = parser.parse_args(argv)

    from monai.networks.nets import resnet18

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.split_csv:
        if not args.class_names:
            parser.error("--split-csv needs --class-names")
        classes = list(args.class_names)
        (x_train, y_train, _), (x_test, y_test, test_paths) = load_split(args.split_csv, classes, args.image_size)
    elif args.data_dir:
        train_dir, test_dir = find_splits(args.data_dir)
        classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
        x_train, y_train, _ = load_folder(train_dir, classes, args.image_size)
        x_test, y_test, test_paths = load_folder(test_dir, classes, args.image_size)
    else:
        parser.error("give --data-dir or --split-csv")
    print(f"classes {classes}; train {len(y_train)}, test {len(y_test)} images at {args.image_size} px")

    net = resnet18(spatial_dims=2, n_input_channels=1, num_classes=len(classes), conv1_t_stride=2)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    cpu0, wall0, epochs = time.process_time(), time.time(), 0
    while time.process_time() - cpu0 < args.budget_min * 60:
        net.train()
        order = torch.randperm(len(y_train), generator=gen)
        total = 0.0
        for i in range(0, len(order), args.batch_size):
            idx = order[i:i + args.batch_size]
            x = x_train[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            opt.zero_grad()
            loss = F.cross_entropy(net(x), y_train[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        epochs += 1
        print(f"epoch {epochs}: train loss {total / len(y_train):.4f}, "
              f"{time.process_time() - cpu0:.0f} CPU s, {time.time() - wall0:.0f} wall s", flush=True)
    cpu_s, wall_s = time.process_time() - cpu0, time.time() - wall0

    net.eval()
    with torch.no_grad():
        probs = torch.cat([net(x_test[i:i + 64]).softmax(1) for i in range(0, len(y_test), 64)]).numpy()
    result = evaluate_predictions(y_test.numpy(), probs, classes, n_resamples=args.n_bootstrap, seed=args.seed)
    m, ci = result["metrics"], result["ci"]
    print(f"\nplain loop: ResNet-18, {args.image_size} px, {epochs} epochs, {cpu_s / 60:.1f} CPU min, "
          f"{wall_s / 60:.1f} wall min, {torch.get_num_threads()} threads; test n = {len(y_test)}")
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc"):
        print(f"  {key:18s} {m[key]:.3f} [{ci[key][0]:.3f}, {ci[key][1]:.3f}]")
    if args.probs_out:
        write_probabilities(args.probs_out, test_paths, y_test.numpy(), probs, classes)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        summary = {"recipe": "plain loop: MONAI ResNet-18, Adam, CE, hflip", "image_size": args.image_size,
                   "epochs": epochs, "cpu_s": cpu_s, "train_images": epochs * len(y_train), "wall_s": wall_s, "threads": torch.get_num_threads(),
                   "data_dir": str(args.data_dir or args.split_csv), **result}
        tmp = args.out.with_suffix(args.out.suffix + ".tmp")
        tmp.write_text(json.dumps(summary, indent=2))
        tmp.replace(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
