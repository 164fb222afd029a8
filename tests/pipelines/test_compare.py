"""``python -m pipelines compare``: selection, table, Markdown/CSV, MLflow logging, and the train+compare driver.

Runs are fabricated in a throw-away sqlite MLflow store, with known params, metrics and start/end times.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pandas as pd
import pytest

mlflow = pytest.importorskip("mlflow")
from mlflow.entities import Metric, Param  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from pipelines.bundles import bundle_commands  # noqa: E402
from pipelines.evaluation import compare as cmp  # noqa: E402
from pipelines.experiments.compare_networks import train_and_compare  # noqa: E402

T0 = 1_700_000_000_000  # ms
_STARTS = itertools.count(T0, 1000)  # runs start 1 s apart, in creation order


def _metrics(values: dict[str, tuple[float, float, float]]) -> list[Metric]:
    out = []
    for name, (v, lo, hi) in values.items():
        out += [Metric(name, v, T0, 0), Metric(f"{name}_ci_low", lo, T0, 0), Metric(f"{name}_ci_high", hi, T0, 0)]
    return out


def _train_run(client, exp_id, network, lr, epochs_logged, duration_s, run_name=None):
    start = next(_STARTS)
    run = client.create_run(exp_id, start_time=start, run_name=run_name or f"{network}-train")
    rid = run.info.run_id
    params = {"network": network, "learning_rate": lr, "batch_size": "16", "image_size": "224"}
    losses = [Metric("train_loss", 1.0 / (e + 1), T0, e + 1) for e in range(epochs_logged)]
    client.log_batch(rid, metrics=losses, params=[Param(k, v) for k, v in params.items()])
    client.set_terminated(rid, "FINISHED", end_time=start + int(duration_s * 1000))
    return rid


def _eval_run(client, exp_id, name, metrics, duration_s, tags=None, status="FINISHED"):
    start = next(_STARTS)
    run = client.create_run(exp_id, start_time=start, run_name=name, tags={"stage": "evaluation", **(tags or {})})
    rid = run.info.run_id
    params = [Param("eval.n_samples", "80"), Param("eval.n_resamples", "1000"), Param("eval.ci_alpha", "0.05")]
    client.log_batch(rid, metrics=_metrics(metrics), params=params)
    client.set_terminated(rid, status, end_time=start + int(duration_s * 1000))
    return rid


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Experiment ``tumor`` with 3 finished evaluation runs (2 linked to training runs), 1 failed evaluation run
    and 1 run of another stage."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment("tumor", artifact_location=(root / "artifacts").as_uri())
    t_res = _train_run(client, exp_id, "resnet18", "0.0001", epochs_logged=7, duration_s=600)
    t_vit = _train_run(client, exp_id, "vit", "0.0003", epochs_logged=4, duration_s=1200)
    ids = {
        "resnet18": _eval_run(client, exp_id, "resnet18-eval",
                              {"accuracy": (0.90, 0.85, 0.95), "macro_auc": (0.95, 0.92, 0.98)}, 30,
                              tags={"train_run_id": t_res, "group": "a"}),
        "vit": _eval_run(client, exp_id, "vit-eval",
                         {"accuracy": (0.85, 0.80, 0.90), "macro_auc": (0.97, 0.95, 0.99)}, 90,
                         tags={"train_run_id": t_vit, "group": "a"}),
        "other": _eval_run(client, exp_id, "other-eval",
                           {"accuracy": (0.70, 0.60, 0.80), "macro_auc": (0.80, 0.70, 0.90)}, 10,
                           tags={"network": "densenet121", "group": "b"}),
    }
    ids["failed"] = _eval_run(client, exp_id, "failed-eval", {"accuracy": (0.1, 0.0, 0.2)}, 5, status="FAILED")
    ids["train_resnet18"], ids["train_vit"] = t_res, t_vit
    return {"uri": uri, "client": client, "exp_id": exp_id, "ids": ids, "root": root}


def test_selection_keeps_finished_evaluation_runs_only(store):
    runs = cmp.select_runs(store["client"], "tumor")
    assert [r.info.run_name for r in runs] == ["resnet18-eval", "vit-eval", "other-eval"]


def test_stage_any_includes_training_runs(store):
    runs = cmp.select_runs(store["client"], "tumor", stage="any")
    assert {r.info.run_name for r in runs} == {"resnet18-train", "vit-train", "resnet18-eval", "vit-eval",
                                               "other-eval"}


def test_tag_filter_selects_matching_runs(store):
    runs = cmp.select_runs(store["client"], "tumor", tags={"group": "b"})
    assert [r.info.run_id for r in runs] == [store["ids"]["other"]]


def test_run_ids_keep_the_given_order(store):
    ids = [store["ids"]["vit"], store["ids"]["resnet18"]]
    runs = cmp.select_runs(store["client"], run_ids=ids)
    assert [r.info.run_id for r in runs] == ids


def test_empty_selection_names_experiment_and_filter(store):
    with pytest.raises(cmp.ComparisonError, match=r"tumor.*nope"):
        cmp.select_runs(store["client"], "tumor", tags={"group": "nope"})


def test_unknown_experiment_raises(store):
    with pytest.raises(cmp.ComparisonError, match="no MLflow experiment named 'missing'"):
        cmp.select_runs(store["client"], "missing")


def test_failed_run_id_is_refused(store):
    with pytest.raises(cmp.ComparisonError, match="FAILED"):
        cmp.select_runs(store["client"], run_ids=[store["ids"]["failed"]])


def test_table_takes_model_and_params_from_linked_training_run(store):
    runs = cmp.select_runs(store["client"], "tumor", tags={"group": "a"})
    table, metrics, differing = cmp.comparison_table(store["client"], runs)
    assert table["model"].tolist() == ["resnet18", "vit"]
    # learning_rate differs, batch_size and image_size do not; the model has its own column
    assert differing == ["learning_rate"]
    assert table["learning_rate"].tolist() == ["0.0001", "0.0003"]
    assert metrics == ["accuracy", "macro_auc"]


def test_table_holds_metric_and_ci_values(store):
    runs = cmp.select_runs(store["client"], "tumor", tags={"group": "a"})
    table, _, _ = cmp.comparison_table(store["client"], runs)
    row = table.set_index("model").loc["vit"]
    assert (row["macro_auc"], row["macro_auc_ci_low"], row["macro_auc_ci_high"]) == (0.97, 0.95, 0.99)


def test_wall_times_are_end_minus_start(store):
    runs = cmp.select_runs(store["client"], "tumor", tags={"group": "a"})
    table, _, _ = cmp.comparison_table(store["client"], runs)
    assert table["wall_time_s"].tolist() == [30.0, 90.0]
    assert table["train_wall_time_s"].tolist() == [600.0, 1200.0]


def test_train_epochs_count_the_train_loss_history(store):
    runs = cmp.select_runs(store["client"], "tumor", tags={"group": "a"})
    table, _, _ = cmp.comparison_table(store["client"], runs)
    assert table["train_epochs"].tolist() == [7, 4]


def test_model_falls_back_to_network_tag(store):
    runs = cmp.select_runs(store["client"], run_ids=[store["ids"]["other"]])
    table, _, _ = cmp.comparison_table(store["client"], runs)
    assert table["model"].tolist() == ["densenet121"]


def test_unknown_metric_raises(store):
    runs = cmp.select_runs(store["client"], "tumor")
    with pytest.raises(cmp.ComparisonError, match="macro_f1"):
        cmp.comparison_table(store["client"], runs, metrics=["macro_f1"])


def test_markdown_cells_show_point_and_ci_with_best_in_bold(store):
    runs = cmp.select_runs(store["client"], "tumor", tags={"group": "a"})
    table, metrics, differing = cmp.comparison_table(store["client"], runs)
    md = cmp.comparison_markdown(table, metrics, differing, ci_level=95.0)
    resnet = next(line for line in md.splitlines() if line.startswith("| resnet18"))
    vit = next(line for line in md.splitlines() if line.startswith("| vit"))
    assert "**0.900 [0.850, 0.950]**" in resnet and "| 0.950 [0.920, 0.980] |" in resnet
    assert "**0.970 [0.950, 0.990]**" in vit and "| 0.850 [0.800, 0.900] |" in vit
    assert "| model | learning_rate | accuracy [95% CI] | macro AUC [95% CI] |" in md
    assert "- best accuracy: resnet18 (0.900)" in md and "- best macro AUC: vit (0.970)" in md
    assert "| 30 s | 10.0 min | 7 |" in resnet


def test_compare_runs_writes_files_and_logs_a_comparison_run(store, tmp_path):
    result = cmp.compare_runs(store["uri"], "tumor", tags={"group": "a"}, out_dir=tmp_path)
    csv = pd.read_csv(tmp_path / "comparison.csv")
    assert csv["model"].tolist() == ["resnet18", "vit"] and csv["accuracy"].tolist() == [0.90, 0.85]
    assert (tmp_path / "comparison.md").read_text() == result.markdown
    client = store["client"]
    run = client.get_run(result.run_id)
    assert run.info.experiment_id == store["exp_id"] and run.info.status == "FINISHED"
    assert run.data.tags["stage"] == "comparison"
    assert run.data.tags["compared_run_ids"] == f"{store['ids']['resnet18']},{store['ids']['vit']}"
    assert sorted(a.path for a in client.list_artifacts(result.run_id, "comparison")) == [
        "comparison/comparison.csv", "comparison/comparison.md"]
    # the comparison run itself is never selected for a later comparison
    assert result.run_id not in [r.info.run_id for r in cmp.select_runs(client, "tumor", stage="any")]


def test_sort_by_orders_rows_best_first(store, tmp_path):
    result = cmp.compare_runs(store["uri"], "tumor", out_dir=tmp_path, log_to_mlflow=False, sort_by="macro_auc")
    assert result.table["model"].tolist() == ["vit", "resnet18", "densenet121"]
    assert result.run_id is None


def test_cli_prints_table_and_returns_zero(store, tmp_path, capsys):
    from pipelines.cli import main

    code = main(["compare", "--experiment", "tumor", "--tag", "group=a", "--tracking-uri", store["uri"],
                 "--out", str(tmp_path), "--no-log"])
    out = capsys.readouterr().out
    assert code == 0
    assert "| resnet18 |" in out and "| vit |" in out and (tmp_path / "comparison.csv").is_file()


def test_cli_reports_bad_tag_filter(store, capsys):
    from pipelines.cli import main

    assert main(["compare", "--experiment", "tumor", "--tag", "group", "--tracking-uri", store["uri"]]) == 2
    assert "key=value" in capsys.readouterr().err


def test_parse_tags_splits_on_first_equals():
    assert cmp.parse_tags(["a=b=c", "stage=evaluation"]) == {"a": "b=c", "stage": "evaluation"}


def _fake_bundle(root: Path, networks: list[str]) -> Path:
    cfg = root / "fake_bundle" / "configs"
    cfg.mkdir(parents=True)
    for name in ["train", "evaluate", *networks]:
        (cfg / f"{name}.json").write_text("{}")
    (cfg / "metadata.json").write_text(json.dumps({"compare_networks": networks}))
    (cfg / "logging.conf").write_text("")
    return cfg.parent


def test_bundle_commands_stack_overlay_and_evaluate(tmp_path):
    root = _fake_bundle(tmp_path, ["resnet18"])
    plan = bundle_commands(root, "resnet18", "G", "exp", {"epochs": "2"}, python="py")
    cfg = root / "configs"
    assert plan["train"][:5] == ["py", "-m", "monai.bundle", "run", "--config_file"]
    assert plan["train"][5] == repr([str(cfg / "train.json"), str(cfg / "resnet18.json")])
    assert plan["evaluate"][5] == repr([str(cfg / "train.json"), str(cfg / "resnet18.json"),
                                        str(cfg / "evaluate.json")])
    assert plan["train"][-4:] == ["--run_name", "fake_bundle-resnet18-train-G", "--epochs", "2"]
    assert plan["evaluate"][-4:] == ["--eval_run_name", "fake_bundle-resnet18-evaluate-G", "--epochs", "2"]


def test_bundle_commands_name_available_overlays_when_missing(tmp_path):
    root = _fake_bundle(tmp_path, ["resnet18", "vit"])
    for other in ("multi_gpu_train", "multi_gpu_evaluate", "inference_deit", "train_volumes", "evaluate_volumes"):
        (root / "configs" / f"{other}.json").write_text("{}")  # workflows and their overlays: not networks
    with pytest.raises(FileNotFoundError, match=r"\['resnet18', 'vit'\]"):
        bundle_commands(root, "densenet121", "G", "exp")


def test_train_and_compare_links_runs_and_skips_failures(store, tmp_path, monkeypatch):
    """A fake runner stands in for ``monai.bundle run``: it logs the runs the real bundle would log."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    root = _fake_bundle(tmp_path, ["net_a", "net_b", "broken"])
    client = store["client"]

    def runner(cmd: list[str]) -> int:
        args = {tok: cmd[i + 1] for i, tok in enumerate(cmd[:-1]) if tok.startswith("--")}
        exp = client.get_experiment_by_name(args["--experiment_name"])
        exp_id = exp.experiment_id if exp else client.create_experiment(args["--experiment_name"])
        net = "net_a" if "net_a" in args["--config_file"] else "net_b" if "net_b" in args["--config_file"] else None
        if net is None:  # a crashed training process leaves its run RUNNING
            client.create_run(exp_id, run_name=args["--run_name"])
            return 1
        if "--run_name" in args:
            _train_run(client, exp_id, net, args["--learning_rate"], 3, 100, run_name=args["--run_name"])
        else:
            auc = 0.9 if net == "net_a" else 0.8
            _eval_run(client, exp_id, args["--eval_run_name"], {"macro_auc": (auc, auc - 0.05, auc + 0.05)}, 20)
        return 0

    result = train_and_compare(str(root), overrides={"learning_rate": "0.001"}, out_dir=tmp_path / "out",
                                   runner=runner)
    assert result.failed == ["broken"]
    assert result.table["model"].tolist() == ["net_a", "net_b"]
    assert result.table["macro_auc"].tolist() == [0.9, 0.8]
    assert result.table["train_epochs"].tolist() == [3, 3]
    evals = [client.get_run(r) for r in result.table["run_id"]]
    trains = [client.get_run(r.data.tags["train_run_id"]) for r in evals]
    assert [t.data.params["network"] for t in trains] == ["net_a", "net_b"]
    assert len({r.data.tags["comparison_group"] for r in evals + trains}) == 1
    assert "Failed (not in the table): broken" in result.markdown
    broken = client.search_runs([evals[0].info.experiment_id], "attributes.run_name LIKE 'fake_bundle-broken-train-%'")
    assert [r.info.status for r in broken] == ["FAILED"]
    assert math.isclose(result.table["wall_time_s"].iloc[0], 20.0)


def test_bundle_commands_base_is_train_json_alone(tmp_path):
    root = _fake_bundle(tmp_path, ["vit"])
    cfg = root / "configs"
    plan = bundle_commands(root, "base", "G", "exp", python="py")
    assert plan["train"][5] == repr([str(cfg / "train.json")])
    assert plan["evaluate"][5] == repr([str(cfg / "train.json"), str(cfg / "evaluate.json")])
    assert plan["train_run_name"] == "fake_bundle-base-train-G"
