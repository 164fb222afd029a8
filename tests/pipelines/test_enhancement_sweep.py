"""Tests for pipelines.enhancement_sweep and the alz_binary bundle it drives."""

from __future__ import annotations


import mlflow
import pandas as pd
import pytest
import torch

from pipelines.enhancement_sweep import GRIDS, binary_data, combo_kwargs, combo_tag, grid_combos, run_sweep
from tests.conftest import REPO_ROOT, SHARED_SCHEMA

TINY_PHANTOM = "$pipelines.phantoms.alzheimer.default_dataset('alzheimer-tiny')"


@pytest.fixture(autouse=True)
def _one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def phantom_cache(tmp_path_factory):
    """A private phantom cache (the tiny phantom is generated once for the module)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("NEURO_MONAI_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


@pytest.mark.parametrize("tag", sorted({t for g in GRIDS.values() for t in g}))
def test_every_grid_tag_round_trips_through_the_pipeline(tag):
    assert combo_tag(combo_kwargs(tag)) == tag


def test_combo_kwargs_of_the_full_reference_chain():
    assert combo_kwargs("inv+open+clahe+median11+overlap4/-4") == {
        "invert": True, "opening": True, "clahe": True, "smoothing": "median", "merge": "overlap",
        "merge_weights": [4.0, -4.0],
    }
    assert combo_kwargs("gaussian5+multiply")["smoothing"] == {
        "_target_": "transforms.enhance.Smooth", "method": "gaussian", "kernel_size": 5}


@pytest.mark.parametrize("tag, match", [
    ("sharpen", "unknown step"),
    ("clahe+inv", "out of order"),
    ("clahe+clahe", "repeated"),
    ("overlap4/-4", "needs a smoothing"),
    ("median4", "odd"),
])
def test_invalid_combinations_raise(tag, match):
    with pytest.raises(ValueError, match=match):
        combo_kwargs(tag)


def test_grid_sizes():
    assert len(GRIDS["tiny"]) == 2 and len(GRIDS["steps"]) == 14 and len(GRIDS["merges"]) == 16
    assert len(GRIDS["full"]) == 8 * (1 + 3 * 6) == len(set(GRIDS["full"]))


def test_grid_combos_canonicalises_and_deduplicates():
    assert grid_combos("tiny", ["clahe", "inv+open"]) == ["none", "clahe", "inv+open"]
    with pytest.raises(ValueError, match="unknown grid"):
        grid_combos("huge")


def test_binary_data_maps_the_three_demented_stages_to_class_1(phantom_cache, tmp_path):
    from pipelines.phantoms.alzheimer import default_dataset

    data = binary_data(dataset_dir=default_dataset("alzheimer-tiny"), output_dir=tmp_path, check_images=False)
    recs = data["train"] + data["val"] + data["test"]
    assert {r["label"] for r in recs} == {0, 1}
    assert all((r["label"] == 0) == (r["source_label"] == "NonDemented") for r in recs)
    assert {r["source_label"] for r in recs if r["label"] == 1} == {"VeryMildDemented", "MildDemented", "ModerateDemented"}
    assert sum(data["binary_counts"]["test"].values()) == len(data["test"])


@pytest.mark.slow
def test_sweep_creates_one_parent_and_one_child_run_per_combination(phantom_cache, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = {"dataset_dir": TINY_PHANTOM, "epochs": 1, "image_size": 32, "batch_size": 16, "num_workers": 0,
                 "network_params": {"widen_factor": 0.125}, "n_bootstrap": 50, "tta_policies": ["none"],
                 "explain_per_class": 0}
    combos = ["none", "clahe+median11+overlap4/-4"]
    result = run_sweep(combos, tmp_path / "sweep", overrides=overrides, tracking_uri=uri, grid_name="tiny")
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("alz_binary")
    runs = client.search_runs(exp.experiment_id)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.run_id == result["parent_run_id"]
    assert parents[0].info.status == "FINISHED" and parents[0].data.tags["stage"] == "sweep"
    assert len(children) == 2
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {result["parent_run_id"]}
    assert sorted(c.data.tags["enhancement"] for c in children) == sorted(combos)
    for c in children:
        assert c.info.status == "FINISHED"
        # the bundle's tracked param keeps the whole tag (run_params would cut a '/' as a path separator)
        assert c.data.params["enhancement"] == c.data.tags["enhancement"].replace("/", ":")
        # training (per epoch) and test evaluation (with CIs) land in the same child run
        assert {"train_loss", "val_auc", "macro_auc", "macro_auc_ci_low", "accuracy_ci_high"} <= set(c.data.metrics)
    table = pd.read_csv(tmp_path / "sweep" / "sweep.csv")
    assert list(table["combination"]) == combos and set(table["status"]) == {"FINISHED"}
    for col in ("sensitivity", "specificity", "accuracy", "auc"):
        assert table[col].between(0, 1).all()
        assert (table[f"{col}_ci_low"] <= table[col] + 1e-9).all()
    arts = {a.path for a in client.list_artifacts(result["parent_run_id"])}
    assert {"sweep.csv", "sweep.md"} <= arts
    assert "| `clahe+median11+overlap4/-4` | FINISHED |" in (tmp_path / "sweep" / "sweep.md").read_text()


def test_bundle_metadata_verifies_against_the_schema():
    if not SHARED_SCHEMA.is_file():
        pytest.skip("bundle metadata schema not available")
    from monai.bundle import verify_metadata

    verify_metadata(meta_file=str(REPO_ROOT / "bundles/alz_binary/configs/metadata.json"), filepath=str(SHARED_SCHEMA))


def test_enhancement_config_id_inserts_the_pipeline_into_preprocessing():
    from pipelines.bundles import load_config
    from transforms.enhance import EnhancementPipelined

    parser = load_config("alz_binary", "inference.json", overrides={"enhancement": combo_kwargs("inv+clahe")})
    pre = parser.get_parsed_content("slice_preprocessing")
    steps = [t for t in pre.transforms if isinstance(t, EnhancementPipelined)]
    assert len(steps) == 1 and steps[0].tag == "inv+clahe"
    img = torch.linspace(0, 1, 64 * 64).reshape(1, 64, 64)
    out = pre({"image": img})["image"]
    assert tuple(out.shape) == (1, 256, 256)
    assert float(out[0, 0, 0]) > float(out[0, -1, -1])  # inverted: the dark corner became the bright one
