"""Penultimate-layer embeddings: layer choice, hook features, clustering scores, report files, evaluator handler."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from pipelines.evaluation.embeddings import (
    EmbeddingHandler,
    FeatureHook,
    cluster_embeddings,
    embedding_layer,
    extract_embeddings,
    write_embedding_report,
)
from pipelines.networks.cnn import build_classifier

CLASSES = ["negative", "intermediate", "positive"]


def _blobs(n_per_class=(12, 6, 12), dim=16, spread=0.05, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 5, size=(len(n_per_class), dim))
    x = np.concatenate([c + spread * rng.standard_normal((n, dim)) for c, n in zip(centres, n_per_class)])
    y = np.repeat(np.arange(len(n_per_class)), n_per_class)
    return x, y


def _tiny_densenet(spatial_dims=2):
    return build_classifier("densenet121", 1, 3, spatial_dims=spatial_dims, init_features=4, growth_rate=4,
                            block_config=(1, 1))


def test_kmeans_on_well_separated_features_gives_ari_one_and_purity_one():
    x, y = _blobs()
    result = cluster_embeddings(x, y, n_clusters=3, seed=0)
    assert result["ari"] == pytest.approx(1.0)
    assert result["nmi"] == pytest.approx(1.0)
    assert result["purity"] == pytest.approx(1.0)
    # clusters are a relabelling of the classes
    assert len(set(zip(result["clusters"].tolist(), y.tolist()))) == 3


def test_clustering_unrelated_to_labels_has_ari_near_zero():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 8))
    y = rng.integers(0, 3, size=300)
    result = cluster_embeddings(x, y, n_clusters=3, seed=0)
    assert abs(result["ari"]) < 0.05
    assert 1 / 3 <= result["purity"] < 0.5


def test_default_layer_is_the_one_feeding_the_classifier():
    assert embedding_layer(_tiny_densenet()) == "class_layers.flatten"
    resnet = build_classifier("resnet18", 1, 3)
    assert embedding_layer(resnet) == "avgpool"


def test_unknown_layer_name_rejected_with_the_last_layers_listed():
    with pytest.raises(ValueError, match="not a module.*class_layers"):
        embedding_layer(_tiny_densenet(), "no.such.layer")


def test_hook_features_reproduce_the_logits_through_the_classifier():
    net = _tiny_densenet().eval()
    x = torch.rand(5, 1, 32, 32)
    with torch.no_grad(), FeatureHook(net) as hook:
        logits = net(x)
        feats = hook.pop()
    assert feats.shape == (5, net.class_layers.out.in_features)
    with torch.no_grad():
        assert torch.allclose(net.class_layers.out(feats), logits, atol=1e-5)
    # the hook is gone after the context
    with torch.no_grad():
        net(x)
    assert hook._batches == []


def test_extract_embeddings_over_a_loader_returns_aligned_arrays_and_restores_train_mode():
    net = _tiny_densenet(spatial_dims=3).train()
    loader = [{"image": torch.rand(2, 1, 16, 16, 16), "label": torch.tensor([0, 2])},
              {"image": torch.rand(1, 1, 16, 16, 16), "label": torch.tensor([1])}]
    out = extract_embeddings(net, loader, num_classes=3)
    assert out["features"].shape == (3, net.class_layers.out.in_features)
    assert out["logits"].shape == (3, 3)
    assert out["labels"].tolist() == [0, 2, 1]
    assert out["layer"] == "class_layers.flatten"
    assert net.training


def test_report_writes_csv_without_subject_ids_pca_and_tsne_plots(tmp_path):
    x, y = _blobs()
    summary, paths = write_embedding_report(x, y, CLASSES, tmp_path, logits=np.eye(3)[y], seed=0, layer="f")
    assert summary["n_samples"] == 30 and summary["dim"] == 16 and summary["ari"] == pytest.approx(1.0)
    for name in ("embeddings.csv", "embeddings.json", "embeddings_pca.png", "embeddings_tsne.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    table = pd.read_csv(tmp_path / "embeddings.csv")
    assert table["row"].tolist() == list(range(30))
    assert not any("subject" in c for c in table.columns)
    assert {"label", "class", "predicted", "cluster", "pca_1", "pca_2", "tsne_1", "tsne_2"} <= set(table.columns)
    assert np.allclose(table.filter(like="f00").to_numpy(), x, atol=1e-5)
    assert json.loads((tmp_path / "embeddings.json").read_text())["purity"] == pytest.approx(1.0)


def test_report_skips_tsne_below_the_minimum_sample_count(tmp_path):
    x, y = _blobs(n_per_class=(5, 3, 5))
    _, paths = write_embedding_report(x, y, CLASSES, tmp_path, tsne_min_samples=30)
    assert (tmp_path / "embeddings_pca.png").is_file()
    assert not (tmp_path / "embeddings_tsne.png").exists()
    assert "tsne_1" not in pd.read_csv(tmp_path / "embeddings.csv").columns


class _RecordingClient:
    """Stands in for ``mlflow.tracking.MlflowClient`` (the real store is exercised by the bundle test)."""

    calls: list = []

    def __init__(self, tracking_uri=None):
        self.tracking_uri = tracking_uri

    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        self.calls.append(("metrics", run_id, {m.key: m.value for m in metrics}))

    def log_artifact(self, run_id, local_path, artifact_path=None):
        self.calls.append(("artifact", run_id, f"{artifact_path}/{local_path.rsplit('/', 1)[-1]}"))


def test_handler_collects_during_evaluation_averages_subjects_and_logs_to_the_report_run(tmp_path, monkeypatch):
    import mlflow.tracking
    from monai.engines import SupervisedEvaluator

    monkeypatch.setattr(mlflow.tracking, "MlflowClient", _RecordingClient)
    _RecordingClient.calls = []
    torch.manual_seed(0)
    net = _tiny_densenet()
    # 4 subjects x 3 slices; each batch holds the slices of 2 subjects
    data = []
    for s in range(4):
        for k in range(3):
            data.append({"image": torch.rand(1, 32, 32) + s, "label": torch.tensor(s % 3), "subject_id": f"sub-{s}"})
    loader = torch.utils.data.DataLoader(data, batch_size=6, shuffle=False)

    class Report:  # what EvaluationReportHandler exposes once it has logged its run
        mlflow_run_id = "run-123"

    handler = EmbeddingHandler(tmp_path / "emb", CLASSES, net, level="subject", seed=0, report_handler=Report(),
                               mlflow_tracking_uri="sqlite:///unused.db", subject_report_dir=tmp_path / "subject",
                               n_resamples=20)
    evaluator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=loader, network=net,
                                    val_handlers=[handler])
    evaluator.run()
    table = pd.read_csv(tmp_path / "emb" / "embeddings.csv")
    assert len(table) == 4  # one row per subject
    expected = extract_embeddings(net, loader, num_classes=3)["features"].reshape(4, 3, -1).mean(axis=1)
    assert np.allclose(table.filter(like="f0").to_numpy(), expected, atol=1e-5)
    subject = json.loads((tmp_path / "subject" / "metrics.json").read_text())
    assert subject["n_samples"] == 4
    logged = {}
    for kind, run_id, value in _RecordingClient.calls:
        assert run_id == "run-123"
        if kind == "metrics":
            logged.update(value)
    assert logged["embedding_ari"] == pytest.approx(handler.summary["ari"])
    assert logged["subject_accuracy"] == pytest.approx(subject["metrics"]["accuracy"])
    artifacts = {v for kind, _, v in _RecordingClient.calls if kind == "artifact"}
    assert {"embeddings/embeddings.csv", "embeddings/embeddings_pca.png", "subject_level/metrics.json"} <= artifacts
    assert evaluator.state.metrics["embedding_purity"] == pytest.approx(handler.summary["purity"])
    assert handler.hook._handle is None  # hook removed after the epoch
