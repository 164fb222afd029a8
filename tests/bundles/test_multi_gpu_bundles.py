"""alz_binary, amyloid_pet, ct_hemorrhage and mri_denoiser with their ``multi_gpu_train.json`` /
``multi_gpu_evaluate.json`` through the real ``torchrun --nproc_per_node=2 -m monai.bundle run`` on the CPU
(gloo); alz_hybrid, the reference, is covered in ``test_multi_gpu.py``.

Per bundle: 2 processes train 2 epochs on its tiny phantom (one FINISHED MLflow run with both epochs, one
``model.pt`` and one ``checkpoint_last.pt``, stats from rank 0 only), then the model is evaluated on the validation
split with 1 and with 2 processes. The evaluation reports must be the same files with the same values (the
embedding report of amyloid_pet and the per-image denoising report are gathered from the ranks, in dataset
order), except the measured ``ms_per_image``.

The tiny amyloid_pet split (6 training series, batch 4) also covers the per-rank ``drop_last``: 3 series per rank
must still give one batch per epoch, not none.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import mlflow
import pytest

from pipelines.training.checkpoint import load_checkpoint
from tests.bundles.bundle_utils import bundle_env, overrides, run_checked, torchrun_command

pytestmark = pytest.mark.slow

CASES = {
    "alz_binary": {
        "args": ["--dataset_dir", "$pipelines.phantoms.alzheimer.default_dataset('alzheimer-tiny')",
                 *overrides(image_size=64, num_workers=0, batch_size=8), "--network_params", "{'widen_factor': 0.25}"],
        "metric": "val_auc", "eval": ["--tta_policies", "['none']", "--explain_per_class", "0"],
    },
    "amyloid_pet": {
        "args": ["--dataset_dir", "$pipelines.training.pet_data.default_dataset('amyloid_pet-tiny')", "--num_folds",
                 "3", *overrides(image_size=32, num_slices=4, num_workers=0, batch_size=4),
                 "--network_kwargs", "{'init_features': 8, 'growth_rate': 8, 'block_config': [2, 2, 2, 2]}"],
        "metric": "val_macro_f1", "eval": ["--tta_policies", "['none']", "--explain_per_class", "0"],
    },
    "ct_hemorrhage": {
        "args": ["--dataset_dir", "$pipelines.training.ct_data.default_dataset('head_ct-tiny')",
                 *overrides(image_size=64, num_workers=0, batch_size=16), "--network_kwargs", "{'width': 0.25}"],
        "metric": "val_macro_f1", "eval": ["--tta_policies", "['none']", "--explain_per_class", "0"],
    },
    "mri_denoiser": {
        "args": ["--dataset_dir", "$pipelines.phantoms.alzheimer.default_dataset('alzheimer-tiny')",
                 *overrides(image_size=64, features=[4, 4, 8, 16, 32, 4], num_workers=0, batch_size=4,
                            learning_rate=0.003)],
        "metric": "val_psnr", "eval": [],
    },
}


@pytest.fixture(scope="module", params=sorted(CASES))
def trained(request, tmp_path_factory):
    bundle = request.param
    case = CASES[bundle]
    root = tmp_path_factory.mktemp(f"ddp-{bundle}")
    env = {**bundle_env(root), "OMP_NUM_THREADS": "1"}
    cfg = f"bundles/{bundle}/configs"
    args = [*case["args"], "--epochs", "2", "--output_dir", str(root / "out"), "--ckpt_dir", str(root / "models")]
    files = f"['{cfg}/train.json','{cfg}/multi_gpu_train.json']"
    log = run_checked(torchrun_command("run", "--config_file", files, *args), env)
    return {**case, "bundle": bundle, "cfg": cfg, "root": root, "env": env, "args": args, "log": log}


def _evaluate(trained, processes: int) -> Path:
    eval_dir = trained["root"] / f"eval{processes}"
    cfg = trained["cfg"]
    configs = [f"{cfg}/train.json", f"{cfg}/evaluate.json"] + [f"{cfg}/multi_gpu_evaluate.json"] * (processes == 2)
    args = ["run", "--config_file", str(configs), *trained["args"], "--eval_split", "val", "--n_bootstrap", "20",
            *trained["eval"], "--eval_dir", str(eval_dir)]
    cmd = torchrun_command(*args) if processes == 2 else [sys.executable, "-m", "monai.bundle", *args]
    run_checked(cmd, trained["env"])
    return eval_dir


def _reports(eval_dir: Path) -> dict[str, object]:
    """Every JSON/CSV/Markdown report under ``eval_dir`` (figures left out), timing fields dropped."""
    out: dict[str, object] = {}
    for path in sorted(eval_dir.rglob("*")):
        rel = path.relative_to(eval_dir).as_posix()
        if path.suffix == ".json":
            out[rel] = _drop_timing(json.loads(path.read_text()))
        elif path.suffix in (".csv", ".md"):
            out[rel] = path.read_text() if "tta" not in path.name else None  # tta.csv carries ms/image
    return out


def _drop_timing(value):
    if isinstance(value, dict):
        return {k: _drop_timing(v) for k, v in value.items() if k != "ms_per_image"}
    if isinstance(value, list):
        return [_drop_timing(v) for v in value]
    return "nan" if isinstance(value, float) and math.isnan(value) else value


def test_two_processes_make_one_mlflow_run_and_one_checkpoint(trained):
    client = mlflow.MlflowClient(trained["env"]["MLFLOW_TRACKING_URI"])
    runs = client.search_runs(client.get_experiment_by_name(trained["bundle"]).experiment_id)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, trained["metric"])] == [1, 2]
    assert sorted(p.name for p in (trained["root"] / "models").iterdir()) == ["checkpoint_last.pt", "model.pt"]
    last = load_checkpoint(trained["root"] / "models" / "checkpoint_last.pt")
    assert last["epoch"] == 2 and last["mlflow_run_id"] == runs[0].info.run_id
    assert last["trainer"]["iteration"] >= 2  # at least one batch per epoch on every rank
    assert trained["log"].count("Epoch[2] Metrics -- ") == 2  # trainer and validator stats, from rank 0 only


def test_two_process_evaluation_writes_the_reports_of_one_process(trained):
    one, two = _reports(_evaluate(trained, 1)), _reports(_evaluate(trained, 2))
    assert one and sorted(one) == sorted(two)
    assert two == one
    client = mlflow.MlflowClient(trained["env"]["MLFLOW_TRACKING_URI"])
    runs = client.search_runs(client.get_experiment_by_name(trained["bundle"]).experiment_id,
                              filter_string="tags.stage = 'evaluation'")
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}


def test_deit_distillation_overlay_trains_on_two_processes(tmp_path):
    # the transformer overlays (hybrid, ViT, DeiT) hold MONAI's unused cross-attention LayerNorm; DDP stopped them
    # at the second iteration until it was frozen (tests/pipelines/test_transformer_ddp_ready.py)
    import torch

    from pipelines.networks.cnn import build_classifier

    env = {**bundle_env(tmp_path), "OMP_NUM_THREADS": "1"}
    teacher = tmp_path / "teacher.pt"
    torch.save(build_classifier("resnet50", in_channels=1, num_classes=4, widen_factor=0.125).state_dict(), teacher)
    cfg = "bundles/alz_hybrid/configs"
    files = f"['{cfg}/train.json','{cfg}/deit_distill.json','{cfg}/multi_gpu_train.json']"
    tiny = overrides(image_size=32, batch_size=4, num_workers=0, vit_patch_size=8, vit_hidden_size=32, vit_layers=1,
                     vit_heads=2, vit_mlp_dim=64, teacher_widen_factor=0.125, epochs=2)
    run_checked(torchrun_command("run", "--config_file", files, "--dataset_dir",
                                 "$pipelines.phantoms.alzheimer.default_dataset('alzheimer-tiny')", *tiny,
                                 "--teacher_ckpt", str(teacher), "--output_dir", str(tmp_path / "out"),
                                 "--ckpt_dir", str(tmp_path / "models")), env)
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs(client.get_experiment_by_name("alz_hybrid").experiment_id)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "val_macro_f1")] == [1, 2]
    last = load_checkpoint(tmp_path / "models" / "checkpoint_last.pt")
    assert last["trainer"]["iteration"] > 2  # several iterations per epoch: the second one used to fail
