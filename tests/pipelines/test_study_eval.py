"""Study-level aggregation and evaluation of slice predictions (pipelines.evaluation.study)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from monai.data import DataLoader
from monai.engines import SupervisedEvaluator

from pipelines.evaluation.study import (
    StudyEvaluationHandler,
    VolumeSlices,
    aggregate_studies,
    evaluate_studies,
    expand_volumes,
    position_weights,
    slice_positions,
    slice_table,
    write_study_report,
)

CLASSES = ["CN", "AD"]


def _table(rows: list[tuple[str, int, int, float]]) -> pd.DataFrame:
    """rows: (subject, slice_index, label, probability of AD)."""
    p_ad = np.array([r[3] for r in rows])
    return slice_table([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
                       np.stack([1 - p_ad, p_ad], axis=1), CLASSES)


def _trap_set(prefix: str, n_per_class: int = 3) -> pd.DataFrame:
    """Each study: slice 10 (position 0) right with p = 0.7, slice 11 (position 1) wrong with p = 0.8."""
    rows = []
    for k in range(2 * n_per_class):
        label = k % 2
        rows.append((f"{prefix}{k}", 10, label, 0.7 if label else 0.3))
        rows.append((f"{prefix}{k}", 11, label, 0.2 if label else 0.8))
    return _table(rows)


def test_rank_positions_count_from_the_lowest_slice_of_each_study():
    t = _table([("a", 40, 0, 0.1), ("a", 38, 0, 0.1), ("b", 7, 1, 0.9), ("a", 39, 0, 0.1)])
    assert slice_positions(t, "rank").tolist() == [2, 0, 0, 1]
    assert slice_positions(t, "index").tolist() == [40, 38, 7, 39]


def test_position_weights_are_the_balanced_accuracy_of_each_position():
    val = _table([("a", 0, 0, 0.1), ("a", 1, 0, 0.2), ("b", 0, 1, 0.9), ("b", 1, 1, 0.3),
                  ("c", 0, 1, 0.8), ("c", 1, 1, 0.4)])
    w = position_weights(val, CLASSES, "balanced_accuracy", "rank")
    assert w.loc[0, "score"] == pytest.approx(1.0)
    assert w.loc[1, "score"] == pytest.approx(0.5)  # recall CN 1, recall AD 0
    assert w.attrs["overall"] == pytest.approx(0.75)  # recall CN 2/2, AD 2/4
    acc = position_weights(val, CLASSES, "accuracy", "rank")
    assert acc.loc[1, "score"] == pytest.approx(1 / 3)


def test_mean_aggregation_averages_slice_probabilities():
    t = _table([("a", 0, 1, 0.9), ("a", 1, 1, 0.3), ("b", 0, 0, 0.2)])
    agg = aggregate_studies(t, CLASSES, "mean").set_index("subject_id")
    assert agg.loc["a", "prob_AD"] == pytest.approx(0.6)
    assert agg.loc["a", "n_slices"] == 2
    assert agg.loc["b", "predicted"] == 0


def test_weighted_aggregation_follows_the_position_weights():
    val = _trap_set("v")
    test = _table([("t", 10, 1, 0.7), ("t", 11, 1, 0.2)])
    w = position_weights(val, CLASSES)
    assert w["weight"].tolist() == [1.0, 0.0]
    agg = aggregate_studies(test, CLASSES, "weighted", w).iloc[0]
    assert agg["prob_AD"] == pytest.approx(0.7)  # only position 0 counts
    assert aggregate_studies(test, CLASSES, "mean").iloc[0]["prob_AD"] == pytest.approx(0.45)


def test_unseen_position_gets_the_overall_validation_score():
    val = _table([("a", 0, 0, 0.1), ("b", 0, 1, 0.2)])  # position 0 only, balanced accuracy 0.5
    w = position_weights(val, CLASSES)
    test = _table([("t", 5, 1, 0.9), ("t", 6, 1, 0.1), ("t", 7, 1, 0.1)])
    w_index = position_weights(val, CLASSES, position="index")
    agg = aggregate_studies(test, CLASSES, "weighted", w_index).iloc[0]
    # positions 5, 6, 7 unseen: all get 0.5, i.e. the mean
    assert agg["prob_AD"] == pytest.approx((0.9 + 0.1 + 0.1) / 3)
    assert w.attrs["overall"] == pytest.approx(0.5)


def test_all_zero_weights_fall_back_to_the_mean():
    val = _trap_set("v")
    w = position_weights(val, CLASSES, selection_threshold=1.1)  # every position below the threshold
    agg = aggregate_studies(_table([("t", 10, 1, 0.7), ("t", 11, 1, 0.2)]), CLASSES, "weighted", w).iloc[0]
    assert bool(agg["fallback"]) is True
    assert agg["prob_AD"] == pytest.approx(0.45)


def test_a_study_whose_slices_disagree_on_the_label_is_an_error():
    with pytest.raises(ValueError, match="different labels"):
        aggregate_studies(_table([("a", 0, 0, 0.1), ("a", 1, 1, 0.9)]), CLASSES)


def test_weighted_without_weights_is_rejected():
    with pytest.raises(ValueError, match="needs the per-position weights"):
        aggregate_studies(_table([("a", 0, 0, 0.1)]), CLASSES, "weighted")


def test_evaluate_studies_reports_slice_mean_and_weighted_levels():
    result = evaluate_studies(_trap_set("t", 4), CLASSES, val_table=_trap_set("v"), n_resamples=50, seed=0)
    assert result["n_slices"] == 16 and result["n_studies"] == 8
    assert result["slice"]["metrics"]["accuracy"] == pytest.approx(0.5)
    assert result["study"]["mean"]["metrics"]["accuracy"] == pytest.approx(0.0)  # the wrong slice is surer
    assert result["study"]["weighted"]["metrics"]["accuracy"] == pytest.approx(1.0)
    lo, hi = result["study"]["weighted"]["ci"]["accuracy"]
    assert lo <= 1.0 <= hi
    assert result["position_weights"]["table"][0] == {"position": 0, "n_slices": 6, "score": 1.0, "weight": 1.0}
    studies = result["studies"]
    assert set(studies["aggregation"]) == {"mean", "weighted"} and len(studies) == 16
    assert set(studies["true_class"]) == set(CLASSES)


def test_evaluate_studies_without_validation_skips_weighted():
    result = evaluate_studies(_trap_set("t"), CLASSES, val_table=None, n_resamples=0)
    assert list(result["study"]) == ["mean"]
    assert result["position_weights"] is None


def test_write_study_report_writes_json_markdown_and_tables(tmp_path):
    result = evaluate_studies(_trap_set("t"), CLASSES, val_table=_trap_set("v"), n_resamples=20)
    paths = write_study_report(result, tmp_path)
    data = json.loads(paths["study_metrics_json"].read_text())
    assert data["study"]["weighted"]["metrics"]["accuracy"] == 1.0
    assert "studies" not in data
    md = paths["study_metrics_md"].read_text()
    assert "| study (weighted) | 6 |" in md and "| slice | 12 |" in md
    assert len(pd.read_csv(paths["study_predictions_csv"])) == 12
    assert pd.read_csv(paths["slice_position_weights_csv"])["weight"].tolist() == [1.0, 0.0]


def test_volume_slices_expand_each_split_once_and_keep_the_ids():
    calls = []

    def to_slices(rec):
        calls.append(rec["image"])
        return [{**rec, "image": torch.zeros(1, 2, 2), "slice_index": i} for i in (3, 4)]

    data = {"train": [{"image": "a.nii", "subject_id": "sub-1", "label": 0}], "val": [], "test": []}
    view = VolumeSlices(data, to_slices)
    assert calls == []  # lazy
    train = view["train"]
    assert [(s["subject_id"], s["slice_index"], s["label"]) for s in train] == [("sub-1", 3, 0), ("sub-1", 4, 0)]
    assert view["train"] is train and calls == ["a.nii"]
    with pytest.raises(KeyError, match="unknown split"):
        view["extra"]


def test_expand_volumes_names_the_volume_that_fails():
    def broken(rec):
        raise RuntimeError("no foreground")

    with pytest.raises(ValueError, match="bad.nii.gz: cannot extract slices .*no foreground"):
        expand_volumes([{"image": "bad.nii.gz"}], broken)


class _SliceNet(torch.nn.Module):
    """Logit of AD = mean intensity of the slice - 0.5 (a fixed rule: no training needed)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.mean(dim=(1, 2, 3)) - 0.5
        return torch.stack([-z, z], dim=1) * 10


def _slices(prefix: str, n_studies: int) -> list[dict]:
    """Per study 3 slices; position 0 shows the class (bright = AD), positions 1-2 show the opposite."""
    items = []
    for k in range(n_studies):
        label = k % 2
        for pos in range(3):
            bright = label if pos == 0 else 1 - label
            value = 0.9 if bright else 0.1
            items.append({"image": torch.full((1, 4, 4), value), "label": torch.tensor(label),
                          "subject_id": f"{prefix}{k}", "session_id": "ses-01", "slice_index": 20 + pos})
    return items


def test_handler_on_a_monai_evaluator_writes_the_study_report_and_joins_the_named_run(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("study-test")
    existing = client.create_run(exp, run_name="eval-run").info.run_id
    client.set_terminated(existing, "FINISHED")
    handler = StudyEvaluationHandler(
        tmp_path / "study", CLASSES, network=_SliceNet(), val_loader=DataLoader(_slices("v", 4), batch_size=5),
        n_resamples=20, mlflow_tracking_uri=uri, mlflow_experiment="study-test", mlflow_run_name="eval-run",
    )
    loader = DataLoader(_slices("t", 6), batch_size=4)
    evaluator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=loader, network=_SliceNet(),
                                    val_handlers=[handler])
    evaluator.run()
    result = handler.result
    assert result["n_studies"] == 6 and result["n_slices"] == 18
    assert result["slice"]["metrics"]["accuracy"] == pytest.approx(1 / 3)
    assert result["study"]["mean"]["metrics"]["accuracy"] == pytest.approx(0.0)  # 2 of 3 slices mislead
    assert result["study"]["weighted"]["metrics"]["accuracy"] == pytest.approx(1.0)
    assert (tmp_path / "study" / "study_metrics.json").is_file()
    assert handler.mlflow_run_id == existing
    metrics = client.get_run(existing).data.metrics
    assert metrics["study_weighted/accuracy"] == pytest.approx(1.0)
    assert metrics["study/n_studies"] == 6
    assert evaluator.state.metrics["study_mean_accuracy"] == pytest.approx(0.0)


def test_handler_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="methods"):
        StudyEvaluationHandler(tmp_path, CLASSES, methods=["median"])
    with pytest.raises(ValueError, match="position"):
        StudyEvaluationHandler(tmp_path, CLASSES, position="centre")
