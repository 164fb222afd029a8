"""``python -m pipelines demo``: the main job on the embedded default data, end to end.

Trains the alz_hybrid bundle on the synthetic Alzheimer phantom for a few epochs, evaluates it on the
held-out test subjects (metrics with bootstrap CIs, calibration, TTA, explanations), predicts on a 3D NIfTI
volume and on a folder of 2D slices, exports TorchScript, verifies the export, and prints where everything
is and how to open the MLflow UI. Every step is the real ``python -m monai.bundle`` command a user would type;
the demo prints each one before running it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pipelines.bundles import bundle_command, run_subprocess
from pipelines.tracking import REPO_ROOT, default_tracking_uri

BUNDLE = "bundles/alz_hybrid"


def _run(cmd: list[str]) -> float:
    t0 = time.time()
    code = run_subprocess(cmd, cwd=REPO_ROOT)
    if code != 0:
        raise SystemExit(f"demo step failed (exit {code}): {' '.join(cmd)}")
    return time.time() - t0


def run_demo(epochs: int = 20, image_size: int = 128, n_bootstrap: int = 1000) -> dict:
    """Run every step; returns wall times and the key figures."""
    from pipelines.phantoms.alzheimer import default_dataset, example_volume

    t0 = time.time()
    data = default_dataset()
    gen_s = time.time() - t0
    cfg = f"{BUNDLE}/configs"
    common = {"epochs": epochs, "image_size": image_size}
    times = {"phantom_generation_s": round(gen_s, 1)}
    times["train_s"] = _run(bundle_command(f"{cfg}/train.json", common))
    times["evaluate_s"] = _run(
        bundle_command([f"{cfg}/train.json", f"{cfg}/evaluate.json"], {**common, "n_bootstrap": n_bootstrap})
    )
    volume = example_volume()
    times["predict_volume_s"] = _run(bundle_command(
        f"{cfg}/inference.json",
        {"image_size": image_size, "input_path": volume, "output_dir": f"{BUNDLE}/outputs/inference_volume"},
    ))
    times["predict_slices_s"] = _run(bundle_command(
        f"{cfg}/inference.json",
        {"image_size": image_size, "input_path": Path(data) / "slices" / "test",
         "output_dir": f"{BUNDLE}/outputs/inference_slices"},
    ))
    times["export_s"] = _run(bundle_command(
        f"{cfg}/inference.json", {"image_size": image_size}, command=["ckpt_export", "network_def"],
        args=["--filepath", f"{BUNDLE}/models/model.ts", "--ckpt_file", f"{BUNDLE}/models/model.pt",
              "--meta_file", f"{cfg}/metadata.json", "--use_trace", "True",
              "--input_shape", f"[1, 1, {image_size}, {image_size}]"],
    ))
    _run(bundle_command(f"{cfg}/inference.json", {"image_size": image_size},
                        command=["verify_net_in_out", "network_def"], args=["--meta_file", f"{cfg}/metadata.json"]))
    metrics = json.loads((REPO_ROOT / BUNDLE / "outputs" / "eval" / "metrics.json").read_text())
    vol = json.loads((REPO_ROOT / BUNDLE / "outputs" / "inference_volume" / "predictions.json").read_text())
    m, ci = metrics["metrics"], metrics["ci"]
    print("\n" + "=" * 78)
    print(f"alz_hybrid demo on the synthetic phantom ({epochs} epochs, {image_size} px), test split:")
    for k in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc"):
        lo, hi = ci.get(k, [float("nan")] * 2)
        print(f"  {k:18s} {m[k]:.3f}  95% CI [{lo:.3f}, {hi:.3f}]")
    study = vol["studies"][0]
    print(f"  volume {study['study']}: {study['predicted_class']} (p={study['probability']:.3f}, {study['n_slices']} slices)")
    print("\nResults:")
    print(f"  checkpoint        {BUNDLE}/models/model.pt   TorchScript {BUNDLE}/models/model.ts")
    print(f"  training outputs  {BUNDLE}/outputs/train/ (split, best-epoch report, executed config)")
    print(f"  evaluation        {BUNDLE}/outputs/eval/ (metrics.json, metrics.md, calibration, tta.csv, explanations/)")
    print(f"  predictions       {BUNDLE}/outputs/inference_volume/ and {BUNDLE}/outputs/inference_slices/")
    print(f"  phantom data      {data}")
    uri = default_tracking_uri()
    if uri.startswith(f"sqlite:///{REPO_ROOT}/"):
        uri = "sqlite:///" + uri[len(f"sqlite:///{REPO_ROOT}/"):]
    print("\nReview the runs in MLflow:")
    print(f"  .venv/bin/mlflow ui --backend-store-uri {uri}    # then open http://127.0.0.1:5000")
    times = {k: round(v, 1) for k, v in times.items()}
    print(f"\nWall times (s): {times}")
    return {"times": times, "metrics": m, "ci": ci}


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="train, evaluate, predict and export alz_hybrid on the phantom")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--n-bootstrap", type=int, default=1000)
    p.set_defaults(func=lambda a: run_demo(a.epochs, a.image_size, a.n_bootstrap) and 0)
