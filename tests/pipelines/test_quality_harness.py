"""The quality harness (``python -m pipelines benchmark-quality``) on the tiny phantom: two seeds, seconds a run."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from pipelines.evaluation.report import read_probabilities, write_probabilities
from pipelines.experiments.quality import PLAIN, Job, _aligned, benchmark_quality, plan_jobs

TINY = {"image_size": 32, "cnn_block": "basic", "cnn_layers": [1, 1], "cnn_inplanes": [8, 16], "hidden_size": 16,
        "num_heads": 2, "mlp_dim": 32, "num_layers": 1, "batch_size": 8, "epochs": 2, "warmup_epochs": 0}
CLASSES = ["NonDemented", "VeryMildDemented", "MildDemented", "ModerateDemented"]


@pytest.fixture(scope="module")
def tiny_slices(tmp_path_factory):
    import os

    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("NEURO_MONAI_CACHE")
    os.environ["NEURO_MONAI_CACHE"] = str(cache)
    try:
        from pipelines.phantoms.alzheimer import default_dataset

        return Path(default_dataset("alzheimer-tiny")) / "slices"
    finally:
        if old is None:
            os.environ.pop("NEURO_MONAI_CACHE", None)
        else:
            os.environ["NEURO_MONAI_CACHE"] = old


def test_probability_csv_round_trip_pairs_by_name(tmp_path):
    probs = np.array([[0.7, 0.1, 0.1, 0.1], [0.1, 0.2, 0.3, 0.4]])
    write_probabilities(tmp_path / "p.csv", ["/b.png", "/a.png"], [0, 3], probs, CLASSES)
    # read back in another class order: columns and labels follow the names
    other = list(reversed(CLASSES))
    df = read_probabilities(tmp_path / "p.csv", other)
    assert df["image"].tolist() == ["/a.png", "/b.png"]
    assert df["label"].tolist() == [0, 3]  # ModerateDemented is index 0 in the reversed order
    assert df[[f"prob_{c}" for c in other]].to_numpy()[0].tolist() == [0.4, 0.3, 0.2, 0.1]
    with pytest.raises(ValueError, match="missing column"):
        read_probabilities(tmp_path / "p.csv", ["x", "y", "z", "w"])
    text = (tmp_path / "p.csv").read_text().replace(",ModerateDemented,", ",Unknown,")
    (tmp_path / "bad.csv").write_text(text)
    with pytest.raises(ValueError, match="Unknown.*not among the classes"):
        read_probabilities(tmp_path / "bad.csv", CLASSES)
    with pytest.raises(ValueError, match="2 images x 4 classes"):
        write_probabilities(tmp_path / "q.csv", ["/a.png", "/b.png"], [0, 1], probs[:, :3], CLASSES)


def test_mismatched_test_sets_are_refused(tmp_path):
    jobs = []
    for k, images in enumerate((["/a.png", "/b.png"], ["/a.png", "/c.png"])):
        job = Job("base" if k else PLAIN, 0, tmp_path / str(k))
        job.out_dir.mkdir()
        write_probabilities(job.probs_csv, images, [0, 1], np.full((2, 4), 0.25), CLASSES)
        jobs.append(job)
    with pytest.raises(ValueError, match="not the same 2 images"):
        _aligned(jobs, CLASSES)


def test_plan_names_every_seed_and_isolates_outputs(tmp_path):
    jobs = plan_jobs("alz_hybrid", tmp_path, [PLAIN, "base", "vit"], [0, 1], 8, tmp_path / "q", {"epochs": 3})
    assert [(j.recipe, j.seed) for j in jobs] == [(PLAIN, 0), (PLAIN, 1), ("base", 0), ("base", 1), ("vit", 0), ("vit", 1)]
    assert "--budget-min" in jobs[0].cmd and jobs[0].cmd[jobs[0].cmd.index("--seed") + 1] == "0"
    base = jobs[3]
    assert base.overrides["seed"] == 1 and base.overrides["epochs"] == 3
    assert base.overrides["ckpt_dir"].endswith("base/seed1/models")
    assert [Path(f).name for f in jobs[4].config_files] == ["train.json", "vit.json"]


@pytest.mark.slow
def test_harness_runs_two_seeds_pairs_and_logs(tiny_slices, tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("NEURO_MONAI_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "quality"
    result = benchmark_quality("alz_hybrid", str(tiny_slices), ["base"], [0, 1], budget_min=0.01, out_dir=out,
                               overrides=TINY, threads=1, jobs=1, plain_image_size=32, n_bootstrap=200,
                               tracking_uri=uri)
    runs, summary = result["runs"], result["summary"]
    assert sorted(zip(runs["recipe"], runs["seed"])) == [("base", 0), ("base", 1), (PLAIN, 0), (PLAIN, 1)]
    assert (runs["n_test"] == 16).all()  # the phantom's test folder: 4 classes x 4 slices, scored by every run
    assert (runs["cpu_min"] > 0).all() and (runs["images_per_s"] > 0).all()
    assert (runs.loc[runs["recipe"] == "base", "epochs"] == 2).all()
    for m in ("accuracy", "macro_auc"):
        assert ((runs[f"{m}_ci_low"] <= runs[m] + 1e-9) & (runs[m] <= runs[f"{m}_ci_high"] + 1e-9)).all()
    base = summary.set_index("recipe").loc["base"]
    plain = summary.set_index("recipe").loc[PLAIN]
    # the paired difference is the difference of the seed means, inside its own CI
    assert base["macro_auc_diff"] == pytest.approx(base["macro_auc_mean"] - plain["macro_auc_mean"], abs=1e-9)
    assert base["macro_auc_diff_ci_low"] <= base["macro_auc_diff"] <= base["macro_auc_diff_ci_high"]
    assert base["seeds"] == 2 and base["cpu_ratio_to_plain"] > 0
    for name in ("runs.csv", "summary.csv", "summary.md"):
        assert (out / name).is_file()
    assert "| base | 2 |" in result["markdown"] and "| plain_loop | 2 |" in result["markdown"]
    assert len(pd.read_csv(out / "runs.csv")) == 4
    # one parent run with a child per (recipe, seed)
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("alz_hybrid-quality")
    children = client.search_runs(exp.experiment_id, f"tags.mlflow.parentRunId = '{result['mlflow_run_id']}'")
    assert sorted(r.info.run_name for r in children) == ["base-seed0", "base-seed1", "plain_loop-seed0", "plain_loop-seed1"]
    parent = client.get_run(result["mlflow_run_id"])
    assert "base.macro_auc_diff" in parent.data.metrics
    # a second call reuses the finished runs instead of training again
    record = json.loads((out / "base" / "seed0" / "run.json").read_text())
    again = benchmark_quality("alz_hybrid", str(tiny_slices), ["base"], [0, 1], budget_min=0.01, out_dir=out,
                              overrides=TINY, plain_image_size=32, n_bootstrap=200, tracking_uri=uri)
    assert json.loads((out / "base" / "seed0" / "run.json").read_text()) == record
    assert again["runs"]["macro_auc"].tolist() == runs["macro_auc"].tolist()
    # another budget for the plain loop is another command: that run is not reused
    from pipelines.experiments.quality import run_job

    plain0 = plan_jobs("alz_hybrid", tiny_slices, [PLAIN], [0], 0.02, out, plain_image_size=32)[0]
    record = json.loads(plain0.record.read_text())
    rerun = run_job(plain0)
    assert rerun["command"] == plain0.cmd and rerun["command"] != record["command"]


# ------------------------------------------------------------------------------------------------ k-fold


CT_CLASSES = ["normal", "hemorrhage"]


def test_plan_with_folds_gives_each_fold_its_own_run_and_the_plain_loop_its_split(tmp_path):
    jobs = plan_jobs("ct_hemorrhage", tmp_path, [PLAIN, "base"], [0], 1, tmp_path / "q", {"epochs": 3}, folds=3,
                     class_names=CT_CLASSES)
    assert [(j.recipe, j.seed, j.fold) for j in jobs] == [(PLAIN, 0, 0), (PLAIN, 0, 1), (PLAIN, 0, 2),
                                                          ("base", 0, 0), ("base", 0, 1), ("base", 0, 2)]
    assert len({j.out_dir for j in jobs}) == 6
    plain = jobs[1]
    assert plain.cmd[plain.cmd.index("--split-csv") + 1] == str(plain.out_dir / "split.csv")
    assert plain.cmd[plain.cmd.index("--class-names") + 1:][:2] == CT_CLASSES and "--data-dir" not in plain.cmd
    # the plain job carries the bundle's split ids of its fold, so it can write the same split
    assert plain.overrides["num_folds"] == 3 and plain.overrides["fold"] == 1 and plain.overrides["seed"] == 0
    base = jobs[4]
    assert base.overrides["num_folds"] == 3 and base.overrides["fold"] == 1 and base.overrides["epochs"] == 3
    assert base.overrides["ckpt_dir"].endswith("base/seed0/fold1/models")


def test_pooled_folds_score_each_image_once_and_sum_the_budget(tmp_path):
    from pipelines.experiments.quality import pool_folds

    jobs, records = [], []
    for fold, images in enumerate((["/c.png", "/a.png"], ["/b.png", "/d.png"])):
        job = Job("base", 0, tmp_path / "base" / "seed0" / f"fold{fold}", fold=fold)
        job.out_dir.mkdir(parents=True)
        write_probabilities(job.probs_csv, images, [0, 1], np.array([[0.9, 0.1], [0.2, 0.8]]), CT_CLASSES)
        pd.DataFrame({"image": images, "label": [0, 1], "split": "test",
                      "subject_id": [f"grp-{fold}", f"grp-{fold}"]}).to_csv(job.out_dir / "split.csv", index=False)
        jobs.append(job)
        records.append({"cpu_s": 60.0 * (fold + 1), "wall_s": 10.0, "train_images": 100, "train_cpu_s": 50.0,
                        "epochs": 4 + 2 * fold, "threads": 1})
    pooled, recs, groups = pool_folds(jobs, records, CT_CLASSES)
    assert [(j.recipe, j.seed, j.out_dir) for j in pooled] == [("base", 0, tmp_path / "base" / "seed0")]
    df = read_probabilities(pooled[0].probs_csv, CT_CLASSES)
    assert df["image"].tolist() == ["/a.png", "/b.png", "/c.png", "/d.png"] and df["label"].tolist() == [1, 0, 0, 1]
    assert recs[0]["cpu_s"] == 180.0 and recs[0]["epochs"] == 5 and recs[0]["folds"] == 2
    assert recs[0]["images_per_s"] == pytest.approx(200 / 100.0)
    assert groups == {"/c.png": "grp-0", "/a.png": "grp-0", "/b.png": "grp-1", "/d.png": "grp-1"}
    # overlapping folds would count an image twice: refused
    write_probabilities(jobs[1].probs_csv, ["/a.png", "/d.png"], [0, 1], np.full((2, 2), 0.5), CT_CLASSES)
    with pytest.raises(ValueError, match="score the same image twice.*a.png"):
        pool_folds(jobs, records, CT_CLASSES)


def test_fold_splits_are_the_bundles_subject_grouped_folds(tmp_path):
    from tests.conftest import shared_dataset

    data = shared_dataset("head_ct_hemorrhage_png")
    from pipelines.experiments.quality import write_fold_split

    jobs = [j for j in plan_jobs("ct_hemorrhage", data, [PLAIN], [0], 1, tmp_path / "q",
                                 {"window_preset": "prewindowed"}, folds=5, class_names=CT_CLASSES)]
    tests = []
    for job in jobs:
        split = pd.read_csv(write_fold_split(job))
        test, train = split[split["split"] == "test"], split[split["split"] != "test"]
        assert not set(test["subject_id"]) & set(train["subject_id"])  # no subject on both sides
        assert len(split) == 100 and set(test["label"]) == {0, 1}
        tests += test["image"].tolist()
    assert len(tests) == len(set(tests)) == 100  # every image held out exactly once over the 5 folds


def test_plain_loop_trains_on_the_split_rows_and_scores_only_the_test_rows(tmp_path):
    import subprocess
    import sys

    from PIL import Image

    from tests.conftest import REPO_ROOT

    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        path = tmp_path / f"{i:02d}.png"
        Image.fromarray(rng.integers(0, 255, (20, 24), dtype=np.uint8)).save(path)
        rows.append({"image": str(path), "label": i % 2, "split": "test" if i >= 8 else "train"})
    pd.DataFrame(rows).to_csv(tmp_path / "split.csv", index=False)
    subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "bench_plain_loop.py"), "--split-csv",
                    str(tmp_path / "split.csv"), "--class-names", *CT_CLASSES, "--budget-min", "0.001",
                    "--image-size", "16", "--threads", "1", "--n-bootstrap", "0", "--probs-out",
                    str(tmp_path / "p.csv")], check=True, capture_output=True, cwd=REPO_ROOT)
    df = read_probabilities(tmp_path / "p.csv", CT_CLASSES)
    assert df["image"].tolist() == [str((tmp_path / f"{i:02d}.png").resolve()) for i in range(8, 12)]
    assert df["label"].tolist() == [0, 1, 0, 1]


def test_a_run_is_reused_whatever_the_order_of_its_config_ids():
    from pipelines.experiments.quality import _same_command

    a = ["py", "-m", "monai.bundle", "run", "--config_file", "t.json", "--seed", "0", "--epochs", "20"]
    assert _same_command(a, a[:6] + ["--epochs", "20", "--seed", "0"])
    assert not _same_command(a, a[:6] + ["--epochs", "40", "--seed", "0"])
    assert not _same_command(a, a[:8])
    assert not _same_command(a, ["py", "other.py"] + a[4:])


def test_a_bad_split_csv_is_refused_naming_the_file(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    bad = tmp_path / "split.csv"
    cmd = [sys.executable, str(REPO_ROOT / "benchmarks" / "bench_plain_loop.py"), "--split-csv", str(bad),
           "--class-names", *CT_CLASSES, "--budget-min", "0.001"]
    pd.DataFrame({"image": ["/a.png"], "label": [0]}).to_csv(bad, index=False)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT)
    assert proc.returncode != 0 and f"{bad}: missing columns ['split']" in proc.stderr
    pd.DataFrame({"image": ["/a.png"], "label": [2], "split": ["test"]}).to_csv(bad, index=False)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT)
    assert proc.returncode != 0 and f"{bad}: labels outside 0..1" in proc.stderr


def test_pooled_images_without_a_subject_id_are_refused(tmp_path):
    from pipelines.experiments.quality import summarise

    jobs = []
    for recipe in (PLAIN, "base"):
        job = Job(recipe, 0, tmp_path / recipe)
        job.out_dir.mkdir()
        write_probabilities(job.probs_csv, ["/a.png", "/b.png"], [0, 1], np.full((2, 2), 0.5), CT_CLASSES)
        jobs.append(job)
    rec = {"cpu_s": 60.0, "train_cpu_s": 60.0, "wall_s": 60.0, "epochs": 1, "images_per_s": 1.0}
    with pytest.raises(ValueError, match=r"no subject id for 1 test images, e.g. /b.png"):
        summarise(jobs, [rec, rec], CT_CLASSES, n_bootstrap=10, groups={"/a.png": "grp-0"})
