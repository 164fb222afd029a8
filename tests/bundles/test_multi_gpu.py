"""alz_hybrid with ``multi_gpu_train.json`` / ``multi_gpu_evaluate.json`` through the real ``torchrun
--nproc_per_node=2 -m monai.bundle run`` on the CPU (gloo): one MLflow run, one best model and one resume
checkpoint, stats from rank 0 only; validation and evaluation metrics equal to one process's.

The validation set is cut to 15 images, so the two ranks get uneven shards (8 and 7).

Metric tolerance: 1e-9. One process scores the images in other batches than two (rank shards), and float32
convolutions over another batch may differ in the last bit; the metrics are counts and rank statistics of the
logits, so they only move on a tie closer than that, and are compared (near) exactly.
"""

from __future__ import annotations

import json
import sys

import mlflow
import pytest

from pipelines.training.checkpoint import load_checkpoint
from tests.bundles.bundle_utils import bundle_env, overrides, run_checked, torchrun_command
from tests.bundles.test_alz_hybrid import TINY_DATA

pytestmark = pytest.mark.slow
CFG = "bundles/alz_hybrid/configs"
TINY = overrides(image_size=64, network_width=0.25, num_workers=0, batch_size=8, epochs=2)
ODD_VAL = ["--validate#dataset#data", "$@data['val'][:15]"]
EVAL = ["--eval_split", "val", *ODD_VAL, "--n_bootstrap", "20", "--tta_policies", "['none']",
        "--explain_per_class", "0"]
TOL = 1e-9


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    env = {**bundle_env(root), "OMP_NUM_THREADS": "1"}
    paths = ["--output_dir", str(root / "out"), "--ckpt_dir", str(root / "models")]
    files = f"['{CFG}/train.json','{CFG}/multi_gpu_train.json']"
    log = run_checked(torchrun_command("run", "--config_file", files, *TINY_DATA, *TINY, *ODD_VAL, *paths), env)
    return {"root": root, "env": env, "paths": paths, "log": log}


def _evaluate(trained, processes: int) -> dict:
    """metrics.json of evaluating the 2-process run's model.pt on its validation set with 1 or 2 processes."""
    eval_dir = trained["root"] / f"eval{processes}"
    configs = [f"{CFG}/train.json", f"{CFG}/evaluate.json"] + [f"{CFG}/multi_gpu_evaluate.json"] * (processes == 2)
    args = ["run", "--config_file", str(configs), *TINY_DATA, *TINY, *trained["paths"], *EVAL,
            "--eval_dir", str(eval_dir)]
    cmd = torchrun_command(*args) if processes == 2 else [sys.executable, "-m", "monai.bundle", *args]
    run_checked(cmd, trained["env"])
    return json.loads((eval_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def one_process_eval(trained):
    return _evaluate(trained, 1)


def test_two_processes_make_one_mlflow_run_and_one_checkpoint(trained):
    client = mlflow.MlflowClient(trained["env"]["MLFLOW_TRACKING_URI"])
    runs = client.search_runs(client.get_experiment_by_name("alz_hybrid").experiment_id)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "val_macro_f1")] == [1, 2]
    assert sorted(p.name for p in (trained["root"] / "models").iterdir()) == ["checkpoint_last.pt", "model.pt"]
    last = load_checkpoint(trained["root"] / "models" / "checkpoint_last.pt")
    assert last["epoch"] == 2 and last["mlflow_run_id"] == runs[0].info.run_id
    assert trained["log"].count("Epoch[2] Metrics -- val_accuracy") == 1  # stats from rank 0 only


def test_validation_metrics_equal_one_process_scoring_of_the_saved_model(trained, one_process_eval):
    # every rank must validate the weights rank 0 saves (BatchNorm statistics included), or the gathered
    # metrics belong to no single model
    client = mlflow.MlflowClient(trained["env"]["MLFLOW_TRACKING_URI"])
    run = client.search_runs(client.get_experiment_by_name("alz_hybrid").experiment_id,
                             filter_string="attributes.run_name LIKE 'alz_hybrid-train-%'")[0]
    best = load_checkpoint(trained["root"] / "models" / "checkpoint_last.pt")["validator"]["best_metric_epoch"]
    logged = {k: next(m.value for m in client.get_metric_history(run.info.run_id, k) if m.step == best)
              for k in run.data.metrics if k.startswith("val_")}
    m = one_process_eval["metrics"]
    assert one_process_eval["n_samples"] == 15
    expected = {"val_accuracy": m["accuracy"], "val_macro_f1": m["macro_f1"], "val_macro_auc": m["macro_auc"],
                **{f"val_recall_{c}": m[f"recall/{c}"] for c in one_process_eval["class_names"]}}
    assert logged == pytest.approx(expected, abs=TOL)


def test_two_process_evaluation_reports_what_one_process_does(trained, one_process_eval):
    two = _evaluate(trained, 2)
    assert two["n_samples"] == 15 and two["n_groups"] == one_process_eval["n_groups"]
    assert two["confusion_matrix"] == one_process_eval["confusion_matrix"]
    assert two["metrics"] == pytest.approx(one_process_eval["metrics"], abs=TOL, nan_ok=True)
    # rows back in dataset order: the subject bootstrap draws the same resamples
    flat = lambda ci: {(k, i): v for k, pair in ci.items() for i, v in enumerate(pair)}  # noqa: E731
    assert flat(two["ci"]) == pytest.approx(flat(one_process_eval["ci"]), abs=TOL, nan_ok=True)
    client = mlflow.MlflowClient(trained["env"]["MLFLOW_TRACKING_URI"])
    runs = client.search_runs(client.get_experiment_by_name("alz_hybrid").experiment_id,
                              filter_string="tags.stage = 'evaluation'")
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}  # one run per evaluation
