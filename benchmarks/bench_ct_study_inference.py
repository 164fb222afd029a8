"""Time head-CT study inference (a DICOM series folder to predictions.json) against a bare forward pass.

Usage:
    python benchmarks/bench_ct_study_inference.py [--slices 40] [--size 128] [--image-size 128]
        [--network densenet121] [--repeats 3] [--threads 2] [--gradcam]

A synthetic 40-slice head-CT series (``pipelines.phantoms.head_ct``, 5 mm slices, haemorrhage on some slices) is
written to a temporary folder. In the same process, best of ``--repeats`` runs each (the two paths alternate)
after one untimed warm-up:

* **study**: ``CTStudyPredictor.run(folder, out)`` built from the bundle's ``inference.json`` (series scan, load,
  per-slice preprocessing, batched forward, study aggregation, atomic CSV + JSON; Grad-CAM only with
  ``--gradcam``);
* **bare**: ``load_series(folder)`` + windowing and resizing of the whole stack as tensor ops + one
  ``torch.no_grad()`` forward in the same batch size, i.e. the least work that yields the same slice
  probabilities.

The network has random weights (seed 0; timing does not depend on them); with ``--gradcam`` the threshold is set
so the study is positive and one overlay is drawn. The script prints both times, their ratio, and
the largest difference between the two paths' slice probabilities.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from pipelines.bundles import read_config  # noqa: E402
from pipelines.io.dicom import load_series  # noqa: E402
from pipelines.phantoms.head_ct import make_head_ct_volume, write_dicom_series  # noqa: E402
from transforms.ct import CT_WINDOW_PRESETS  # noqa: E402

CONFIG = REPO_ROOT / "bundles" / "ct_hemorrhage" / "configs" / "inference.json"


def _best_interleaved(fns, repeats: int) -> list[tuple[float, object]]:
    """Best time of each function; the functions alternate so a busy machine slows them alike."""
    times: list[list[float]] = [[] for _ in fns]
    outs: list[object] = [None] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            outs[i] = fn()
            times[i].append(time.perf_counter() - start)
    return [(min(t), o) for t, o in zip(times, outs)]


def bare_forward(network: torch.nn.Module, folder: Path, image_size: int, batch_size: int) -> np.ndarray:
    """load_series + vectorised multi-window + resize + no_grad forward; (N, C) softmax probabilities."""
    vol = load_series(folder)
    hu = torch.from_numpy(vol.array).transpose(1, 2)[:, None]  # (z, 1, x, y), the training layout
    windows = [CT_WINDOW_PRESETS[w] for w in ("brain", "subdural", "bone")]
    chans = [((hu - (level - width / 2)) / width).clamp(0, 1) for level, width in windows]
    x = torch.cat(chans, dim=1).contiguous()  # the transpose above leaves a permuted layout that slows conv
    if tuple(x.shape[-2:]) != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="area")
    out = []
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            out.append(torch.softmax(network(x[i : i + batch_size]), dim=1))
    return torch.cat(out).numpy()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=40, help="slices in the series (default 40)")
    parser.add_argument("--size", type=int, default=128, help="in-plane matrix of the series (default 128)")
    parser.add_argument("--image-size", type=int, default=128, help="network input size (default 128)")
    parser.add_argument("--network", default="densenet121", help="network_name of the bundle (default densenet121)")
    parser.add_argument("--batch-size", type=int, default=32, help="slices per forward pass (default 32)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per path; the best is reported")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    parser.add_argument("--gradcam", action="store_true", help="include Grad-CAM overlays in the study path")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.slices < 3 or args.size < 32:
        parser.error("--repeats >= 1, --slices >= 3 and --size >= 32 are required")
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    cfg = read_config(CONFIG, {"ckpt_path": None, "gradcam": args.gradcam, "image_size": args.image_size,
                               "network_name": args.network, "batch_size": args.batch_size,
                               "device": "$torch.device('cpu')"})
    if args.gradcam:
        cfg["threshold"] = 1e-6  # random weights: make the study positive so its overlay is always drawn
    predictor = cfg.get_parsed_content("predictor")
    network = predictor.network.eval()

    with tempfile.TemporaryDirectory(prefix="bench-ct-") as tmp:
        folder, out = Path(tmp) / "series", Path(tmp) / "out"
        hu, labels, _ = make_head_ct_volume(7, (args.slices, args.size, args.size), "iph")
        write_dicom_series(hu, folder, patient_id="PHANTOM-BENCH", seed=7)

        predictor.run(folder, out)  # warm-up, also of the file cache
        bare_forward(network, folder, args.image_size, args.batch_size)
        (t_study, _), (t_bare, probs_bare) = _best_interleaved(
            [lambda: predictor.run(folder, out),
             lambda: bare_forward(network, folder, args.image_size, args.batch_size)], args.repeats)
        result = json.loads((out / "predictions.json").read_text())["studies"][0]

    probs_study = np.array([[s["prob_normal"], s["prob_hemorrhage"]] for s in result["slices"]])
    diff = float(np.abs(probs_study - probs_bare).max())
    print(f"series: {args.slices} slices of {args.size}x{args.size}, network {args.network} at {args.image_size} px, "
          f"batch {args.batch_size}, torch threads {torch.get_num_threads()}, best of {args.repeats}")
    print(f"study inference (series -> predictions.json{' + Grad-CAM' if args.gradcam else ''}): {t_study:.3f} s "
          f"({1000 * t_study / args.slices:.1f} ms/slice)")
    print(f"load_series + bare no_grad forward:          {t_bare:.3f} s ({1000 * t_bare / args.slices:.1f} ms/slice)")
    print(f"ratio study / bare: {t_study / t_bare:.2f}")
    print(f"max |slice probability difference| between the two paths: {diff:.2e}")
    print(f"most suspicious slice {result['most_suspicious_slice']}, labelled haemorrhage slices "
          f"{np.flatnonzero(labels).tolist()} (random weights: not a detection result)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
