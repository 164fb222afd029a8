"""EvaluationReportHandler on a real MONAI SupervisedEvaluator with a local sqlite MLflow store."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from monai.data import DataLoader
from monai.engines import SupervisedEvaluator

from pipelines.evaluation.handler import EvaluationReportHandler, sanitize_metric_name
from pipelines.evaluation.metrics import evaluate_predictions
from pipelines.evaluation.report import atomic_write, markdown_table, write_evaluation

CLASSES = ["CN", "MCI (early)", "AD"]


class TinyCNN(torch.nn.Module):
    def __init__(self, n_classes: int = 3) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.head = torch.nn.Linear(4, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).mean(dim=(-2, -1)))


def _data(n: int = 18, one_hot: bool = False):
    g = torch.Generator().manual_seed(0)
    items = []
    for i in range(n):
        k = i % 3
        image = torch.rand(1, 12, 12, generator=g) + 0.3 * k
        label = torch.nn.functional.one_hot(torch.tensor(k), 3).float() if one_hot else torch.tensor(k)
        items.append({"image": image, "label": label, "subject_id": f"sub-SECRET{i:03d}"})
    return items


def _loader(items, batch_size: int = 4):
    return DataLoader(items, batch_size=batch_size, shuffle=False, num_workers=0)


def _mlflow_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    client.create_experiment("eval-test", artifact_location=(tmp_path / "artifacts").as_uri())
    return uri, client


def _run_evaluator(handler, items, decollate: bool = True, net=None):
    torch.manual_seed(0)
    net = net or TinyCNN()
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=_loader(items), network=net, decollate=decollate,
        val_handlers=[handler],
    )
    evaluator.run()
    return evaluator


@pytest.fixture(autouse=True)
def _no_active_run():
    yield
    while mlflow.active_run() is not None:
        mlflow.end_run()


def test_handler_writes_report_and_logs_a_finished_mlflow_run(tmp_path):
    uri, client = _mlflow_store(tmp_path)
    items = _data()
    torch.manual_seed(0)
    net = TinyCNN()
    handler = EvaluationReportHandler(
        tmp_path / "report", CLASSES, n_resamples=200, network=net, val_loader=_loader(items),
        test_loader=_loader(items), tta_policies=("none", "hflip"), explain_per_class=1,
        mlflow_tracking_uri=uri, mlflow_experiment="eval-test", mlflow_run_name="eval-tiny", tags={"task": "adni"},
    )
    evaluator = _run_evaluator(handler, items, net=net)

    out = tmp_path / "report"
    expected = ["metrics.json", "metrics_ci.csv", "classification_report.csv", "confusion_matrix.png", "metrics.md",
                "calibration.json", "reliability_diagram.png", "tta.csv",
                "explanations/CN_0.png", "explanations/MCI_early_0.png", "explanations/AD_0.png"]
    assert all((out / name).is_file() for name in expected)
    assert not list(out.rglob("*.tmp"))

    run = client.get_run(handler.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "eval-tiny"
    assert run.data.tags["stage"] == "evaluation" and run.data.tags["task"] == "adni"
    logged = run.data.metrics
    result = handler.result
    assert logged == pytest.approx(handler.mlflow_metrics())
    assert logged["accuracy"] == pytest.approx(result["metrics"]["accuracy"])
    assert logged["macro_auc_ci_low"] == pytest.approx(result["ci"]["macro_auc"][0])
    assert logged["recall/MCI _early_"] == pytest.approx(result["metrics"]["recall/MCI (early)"])
    assert logged["calibration/temperature"] == pytest.approx(result["calibration"]["temperature"])
    assert set(pd.read_csv(out / "tta.csv")["policy"]) == {"none", "hflip"}
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/metrics.json", "evaluation/explanations"} <= artifacts
    assert evaluator.state.metrics["macro_f1"] == result["metrics"]["macro_f1"]


def test_report_metrics_equal_metrics_of_the_collected_logits(tmp_path):
    handler = EvaluationReportHandler(tmp_path, CLASSES, n_resamples=50, log_to_mlflow=False)
    items = _data()
    evaluator = _run_evaluator(handler, items)
    torch.manual_seed(0)
    net = TinyCNN()
    with torch.no_grad():
        probs = torch.softmax(net(torch.stack([d["image"] for d in items])), 1).numpy()
    reference = evaluate_predictions(np.arange(18) % 3, probs, CLASSES, n_resamples=50)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["metrics"]["macro_auc"] == pytest.approx(reference["metrics"]["macro_auc"])
    assert saved["confusion_matrix"] == reference["confusion_matrix"]
    assert evaluator.state.metrics["accuracy"] == pytest.approx(reference["metrics"]["accuracy"])


def test_batched_output_with_one_hot_labels_gives_the_same_report(tmp_path):
    decollated = EvaluationReportHandler(tmp_path / "a", CLASSES, n_resamples=20, log_to_mlflow=False)
    batched = EvaluationReportHandler(tmp_path / "b", CLASSES, n_resamples=20, log_to_mlflow=False)
    _run_evaluator(decollated, _data())
    _run_evaluator(batched, _data(one_hot=True), decollate=False)
    assert batched.result["metrics"] == decollated.result["metrics"]


def test_handler_logs_into_an_active_run_without_ending_it(tmp_path):
    uri, client = _mlflow_store(tmp_path)
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run(experiment_id=client.get_experiment_by_name("eval-test").experiment_id) as active:
            handler = EvaluationReportHandler(tmp_path / "r", CLASSES, n_resamples=20)
            _run_evaluator(handler, _data())
            assert mlflow.active_run().info.run_id == active.info.run_id
        run = client.get_run(active.info.run_id)
    finally:
        mlflow.set_tracking_uri(None)
    assert handler.mlflow_run_id == active.info.run_id
    assert run.data.metrics["macro_f1"] == pytest.approx(handler.result["metrics"]["macro_f1"])


def test_failed_report_marks_the_started_run_failed(tmp_path):
    uri, client = _mlflow_store(tmp_path)
    (tmp_path / "blocked").write_text("a file where the report folder should go")
    handler = EvaluationReportHandler(tmp_path / "blocked", CLASSES, n_resamples=20, mlflow_tracking_uri=uri,
                                      mlflow_experiment="eval-test")
    with pytest.raises(FileExistsError):
        _run_evaluator(handler, _data())
    exp_id = client.get_experiment_by_name("eval-test").experiment_id
    runs = client.search_runs([exp_id])
    assert [r.info.status for r in runs] == ["FAILED"]


def test_nothing_patient_identifying_reaches_mlflow(tmp_path):
    uri, client = _mlflow_store(tmp_path)
    handler = EvaluationReportHandler(tmp_path / "r", CLASSES, n_resamples=20, mlflow_tracking_uri=uri,
                                      mlflow_experiment="eval-test")
    _run_evaluator(handler, _data())
    run = client.get_run(handler.mlflow_run_id)
    logged = json.dumps([run.data.params, run.data.tags, list(run.data.metrics)])
    artifacts = json.dumps([a.path for a in client.list_artifacts(run.info.run_id, "evaluation")])
    report = "".join(p.read_text() for p in (tmp_path / "r").glob("*.*") if p.suffix in {".json", ".csv", ".md"})
    assert "SECRET" not in logged + artifacts + report


def test_discretised_predictions_are_rejected(tmp_path):
    handler = EvaluationReportHandler(tmp_path, CLASSES, n_resamples=0, log_to_mlflow=False)
    with pytest.raises(ValueError, match="one-hot"):
        handler.evaluate(np.eye(3)[[0, 1, 2, 0]], [0, 1, 2, 1])


def test_softmax_predictions_are_accepted_as_probabilities(tmp_path):
    handler = EvaluationReportHandler(tmp_path, CLASSES, n_resamples=0, log_to_mlflow=False)
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6], [0.5, 0.3, 0.2]])
    result = handler.evaluate(probs, [0, 1, 2, 1])
    assert result["metrics"] == evaluate_predictions([0, 1, 2, 1], probs, CLASSES, n_resamples=0)["metrics"]


def test_metric_names_are_made_mlflow_safe():
    assert sanitize_metric_name("auc/MCI (early)+x") == "auc/MCI _early__x"
    with pytest.raises(ValueError, match="collide"):
        EvaluationReportHandler("unused", ["a+b", "a_b"])


def test_failed_write_leaves_neither_partial_file_nor_temp_file(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("previous complete report")

    def crash(path):
        path.write_text("half a rep")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, crash)
    assert target.read_text() == "previous complete report"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_write_evaluation_tables_hold_point_estimates_and_cis(tmp_path):
    y = np.arange(30) % 3
    probs = np.random.default_rng(0).dirichlet([1, 1, 1], 30)
    result = evaluate_predictions(y, probs, CLASSES, n_resamples=30)
    paths = write_evaluation(result, tmp_path, CLASSES)
    report = pd.read_csv(paths["classification_report_csv"]).set_index("class")
    assert report.loc["AD", "support"] == 10
    assert report.loc["AD", "auc"] == pytest.approx(result["metrics"]["auc/AD"])
    assert report.loc["AD", "auc_ci_high"] == pytest.approx(result["ci"]["auc/AD"][1])
    table = pd.read_csv(paths["metrics_ci_csv"]).set_index("metric")
    assert table.loc["macro_f1", "ci_low"] == pytest.approx(result["ci"]["macro_f1"][0])
    md = markdown_table(result)
    lo, hi = result["ci"]["accuracy"]
    assert f"| accuracy | {result['metrics']['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] W[" in md


def _repeated_subject_data(n_subjects: int = 6, images_per_subject: int = 3):
    items = _data(n_subjects * images_per_subject)
    for i, item in enumerate(items):
        item["subject_id"] = f"sub-SECRET{i // images_per_subject:03d}"
    return items


@pytest.mark.parametrize("decollate", [True, False])
def test_repeated_subject_ids_in_the_batch_make_the_bootstrap_resample_subjects(tmp_path, decollate):
    uri, client = _mlflow_store(tmp_path)
    handler = EvaluationReportHandler(tmp_path / "r", CLASSES, n_resamples=50, mlflow_tracking_uri=uri,
                                      mlflow_experiment="eval-test")
    items = _repeated_subject_data()
    _run_evaluator(handler, items, decollate=decollate)
    assert (handler.result["bootstrap_unit"], handler.result["n_groups"]) == ("subject", 6)
    torch.manual_seed(0)
    with torch.no_grad():
        probs = torch.softmax(TinyCNN()(torch.stack([d["image"] for d in items])), 1).numpy()
    groups = [d["subject_id"] for d in items]
    reference = evaluate_predictions(np.arange(18) % 3, probs, CLASSES, n_resamples=50, groups=groups)
    assert handler.result["ci"]["accuracy"] == pytest.approx(reference["ci"]["accuracy"])
    run = client.get_run(handler.mlflow_run_id)
    assert run.data.params["eval.bootstrap_unit"] == "subject"
    assert run.data.params["eval.n_groups"] == "6"
    assert "subjects resampled" in (tmp_path / "r" / "metrics.md").read_text()
    saved = (tmp_path / "r" / "metrics.json").read_text()
    assert "SECRET" not in saved and json.loads(saved)["bootstrap_unit"] == "subject"


def test_batches_without_subject_ids_fall_back_to_image_resampling(tmp_path):
    items = _repeated_subject_data()
    for item in items:
        del item["subject_id"]
    handler = EvaluationReportHandler(tmp_path, CLASSES, n_resamples=20, log_to_mlflow=False)
    _run_evaluator(handler, items)
    assert (handler.result["bootstrap_unit"], handler.result["n_groups"]) == ("image", 18)
    unique_ids = EvaluationReportHandler(tmp_path / "u", CLASSES, n_resamples=20, log_to_mlflow=False)
    _run_evaluator(unique_ids, _data())
    assert unique_ids.result["bootstrap_unit"] == "image"
    assert unique_ids.result["ci"] == handler.result["ci"]


def test_one_iteration_without_subject_ids_makes_the_whole_run_resample_images(tmp_path):
    from types import SimpleNamespace

    handler = EvaluationReportHandler(tmp_path, CLASSES, n_resamples=20, log_to_mlflow=False)
    logits = torch.eye(3)[[0, 1, 2, 0]]
    labels = torch.tensor([0, 1, 2, 1])
    first = SimpleNamespace(state=SimpleNamespace(output={"pred": logits, "label": labels},
                                                  batch={"subject_id": ["s1", "s1", "s2", "s2"]}))
    second = SimpleNamespace(state=SimpleNamespace(output={"pred": logits, "label": labels}, batch={}))
    handler.collect(first)
    assert handler._subjects == ["s1", "s1", "s2", "s2"]
    handler.collect(second)
    assert handler._subjects is None
    handler.reset()
    assert handler._subjects == []
