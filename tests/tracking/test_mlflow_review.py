"""What an MLflow user sees of a training and its evaluation, read back through ``MlflowClient``.

A tiny in-process MONAI training (2 epochs, 4-channel CNN, 32 px) with the bundles' handlers, then an evaluation of
its best checkpoint, against a throw-away sqlite store.
"""

from __future__ import annotations

import io
import json
import shutil

import mlflow
import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import CheckpointLoader, CheckpointSaver, ValidationHandler, from_engine

from pipelines.evaluation.handler import EvaluationReportHandler
from pipelines.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, experiment_id, run_params
from pipelines.tracking.handlers import BundleMLFlowHandler, attach_progress, progress_enabled
from pipelines.training.metrics import EpochClassificationMetric
from tests.conftest import REPO_ROOT

EXP = "tiny"


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(4, 2),
    )


def _data(root):
    """A data dict as the bundles' data functions make it, with images held in memory by path."""
    gen = torch.Generator().manual_seed(0)
    images, records = {}, []
    for i in range(12):
        label = i % 2
        path = str(root / "phantom-set" / ("Demented" if label else "NonDemented") / f"sub-{i:02d}_slice.png")
        images[path] = torch.rand(1, 32, 32, generator=gen) + 0.5 * label
        records.append({"image": path, "label": label, "subject_id": f"sub-{i:02d}", "session_id": "ses-01",
                        "slice_index": -1})
    data = {"train": records[:6], "val": records[6:9], "test": records[9:], "digest": "0123456789abcdef",
            "counts": {s: {"images": 3, "subjects": 3} for s in ("train", "val", "test")}}
    return data, images


def _loader(records, images, batch_size=3):
    def load(d):
        return {**d, "image": images[d["image"]], "label": torch.tensor(d["label"])}

    return DataLoader(Dataset(records, transform=load), batch_size=batch_size, shuffle=False, num_workers=0)


def _bundle_root(tmp):
    root = tmp / "bundle"
    (root / "configs").mkdir(parents=True)
    meta = json.loads((REPO_ROOT / "bundles" / "alz_binary" / "configs" / "metadata.json").read_text())
    meta["network_data_format"]["inputs"]["image"]["spatial_shape"] = [32, 32]
    (root / "configs" / "metadata.json").write_text(json.dumps(meta))
    (root / "configs" / "train.json").write_text("{}")
    return root


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlflow_review")
    return train_and_evaluate(tmp, f"sqlite:///{tmp / 'mlflow.db'}")


def train_and_evaluate(tmp, uri):
    """Train 2 epochs with the bundles' handlers, then evaluate the best checkpoint, both tracked at ``uri``."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)  # MONAI's MLFlowHandler puts it above tracking_uri
    data, images = _data(tmp / "data")
    net = _net()
    metric = {"val_accuracy": EpochClassificationMetric("accuracy", 2)}
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=_loader(data["val"], images), network=net,
        key_val_metric={"val_auc": EpochClassificationMetric("macro_auc", 2)}, additional_metrics=metric,
        val_handlers=[
            BundleMLFlowHandler(tracking_uri=uri, experiment_name=EXP, run_name="tiny-train", iteration_log=False),
            CheckpointSaver(save_dir=str(tmp / "models"), save_dict={"model": net}, save_key_metric=True,
                            key_metric_filename="model.pt"),
        ],
    )
    tracked = {"bundle": "tiny", "network": "tinycnn", "dataset": str(tmp / "data" / "phantom-set"), "image_size": 32}
    train_handler = BundleMLFlowHandler(
        tracking_uri=uri, experiment_name=EXP, run_name="tiny-train", experiment_param=run_params(tracked, data),
        iteration_log=False, tag_name="train_loss", output_transform=from_engine(["loss"], first=True),
        close_on_complete=True, bundle_root=str(_bundle_root(tmp)), register_model="tiny-classifier",
    )
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=2, train_data_loader=_loader(data["train"], images), network=net,
        optimizer=torch.optim.Adam(net.parameters(), 1e-2), loss_function=torch.nn.CrossEntropyLoss(),
        train_handlers=[ValidationHandler(validator=evaluator, epoch_level=True, interval=1), train_handler],
    )
    trainer.run()
    mp.undo()
    ckpt = tmp / "models" / "model.pt"
    # the evaluation of the best checkpoint, as evaluate.json runs it
    eval_net = _net()
    report = EvaluationReportHandler(
        output_dir=tmp / "eval", class_names=["NonDemented", "Demented"], n_resamples=0, mlflow_tracking_uri=uri,
        mlflow_experiment=EXP, mlflow_run_name="tiny-evaluate", tags={"bundle": "tiny", "split": "test"},
    )
    test_eval = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=_loader(data["test"], images), network=eval_net,
        val_handlers=[CheckpointLoader(load_path=str(ckpt), load_dict={"model": eval_net}), report],
    )
    test_eval.run()
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(EXP)
    train = client.search_runs([exp.experiment_id], "tags.stage = 'training'")
    ev = client.search_runs([exp.experiment_id], "tags.stage = 'evaluation'")
    assert len(train) == 1 and len(ev) == 1
    return {"uri": uri, "client": client, "exp": exp, "train": train[0], "eval": ev[0], "ckpt": ckpt, "images": images,
            "data": data, "tmp": tmp}


@pytest.fixture
def tracking(store):
    """``models:/`` URIs resolve through the global tracking URI, as for a user with MLFLOW_TRACKING_URI set."""
    from pipelines.tracking.model import _global_tracking_uri

    with _global_tracking_uri(store["uri"]):
        yield store


# ------------------------------------------------------------------------------------------------ 1 experiment kind


def test_experiment_opens_as_model_training(store):
    assert store["exp"].tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"


def test_experiment_id_marks_old_experiments_and_keeps_a_kind_set_by_others(tmp_path):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = mlflow.MlflowClient(uri)
    old = client.create_experiment("old")
    genai = client.create_experiment("genai", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    assert experiment_id(client, "old", uri) == old
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    experiment_id(client, "genai", uri)
    assert client.get_experiment(genai).tags[EXPERIMENT_KIND_TAG] == "genai_development"
    new = experiment_id(client, "new", uri)
    assert client.get_experiment(new).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND


# ------------------------------------------------------------------------------------------------ 2 datasets


def _inputs(run):
    out = {}
    for di in run.inputs.dataset_inputs:
        ctx = {t.key: t.value for t in di.tags}["mlflow.data.context"]
        out[ctx] = di.dataset
    return out


def test_training_run_logs_each_split_as_a_dataset_without_paths(store):
    inputs = _inputs(store["client"].get_run(store["train"].info.run_id))
    assert set(inputs) == {"train", "validation", "test"}
    for ctx, ds in inputs.items():
        assert ds.name == f"phantom-set-{ctx}"
        assert json.loads(ds.source) == {"uri": "phantom-set"}  # the folder name, nothing above it
        cols = [c["name"] for c in json.loads(ds.schema)["mlflow_colspec"]]
        assert cols == ["subject_id", "session_id", "slice_index", "label", "image"]
        assert json.loads(ds.profile)["num_rows"] == {"train": 6, "validation": 3, "test": 3}[ctx]
        assert str(store["tmp"]) not in ds.source + ds.schema + ds.name


def test_evaluation_run_logs_the_same_test_dataset(store):
    train_inputs = _inputs(store["client"].get_run(store["train"].info.run_id))
    eval_inputs = _inputs(store["eval"])
    assert set(eval_inputs) == {"test"}
    assert eval_inputs["test"].digest == train_inputs["test"].digest
    assert eval_inputs["test"].name == train_inputs["test"].name


# ------------------------------------------------------------------------------------------------ 3 logged model


def test_best_checkpoint_is_a_registered_mlflow_model_with_signature(tracking):
    store = tracking
    client, run = store["client"], store["train"]
    model_id = run.data.tags["model_id"]
    model = client.get_logged_model(model_id)
    assert model.source_run_id == run.info.run_id and model.experiment_id == store["exp"].experiment_id
    assert {o.model_id for o in client.get_run(run.info.run_id).outputs.model_outputs} == {model_id}
    info = mlflow.models.get_model_info(f"models:/{model_id}")
    assert info.signature.inputs.inputs[0].shape == (-1, 1, 32, 32)
    assert info.signature.outputs.inputs[0].shape == (-1, 2)
    assert info.flavors["pytorch"]
    files = {a.path for a in client.list_logged_model_artifacts(model_id)}
    assert {"MLmodel", "input_example.json", "requirements.txt", "extra_files"} <= files
    extra = {a.path for a in client.list_logged_model_artifacts(model_id, "extra_files")}
    assert {"extra_files/metadata.json", "extra_files/train.json", "extra_files/model.ts"} <= extra
    reqs = mlflow.artifacts.download_artifacts(model.artifact_location + "/requirements.txt",
                                           dst_path=str(store["tmp"] / "r"))
    assert "torch==2.13.0" in open(reqs).read().split()
    # the best epoch's validation metrics are on the model
    best = int(run.data.tags["best_epoch"])
    on_model = {m.key: m for m in model.metrics}
    assert on_model["val_accuracy"].step == best
    versions = client.search_model_versions("name = 'tiny-classifier'")
    assert len(versions) == 1 and versions[0].source == f"models:/{model_id}" and versions[0].run_id == run.info.run_id


def test_pyfunc_returns_the_probabilities_of_the_checkpoint(tracking):
    store = tracking
    model_id = store["train"].data.tags["model_id"]
    pyfunc = mlflow.pyfunc.load_model(f"models:/{model_id}")
    x = torch.stack([store["images"][r["image"]] for r in store["data"]["test"]]).numpy().astype(np.float32)
    net = _net()
    net.load_state_dict(torch.load(store["ckpt"], weights_only=True))
    with torch.no_grad():
        expected = torch.softmax(net.eval()(torch.from_numpy(x)), dim=1).numpy()
    np.testing.assert_allclose(np.asarray(pyfunc.predict(x)), expected, atol=1e-5)


# ------------------------------------------------------------------------------------------------ 4 linked evaluation


def test_evaluation_links_to_its_training_run_and_model(store):
    client, train = store["client"], store["train"]
    ev = client.get_run(store["eval"].info.run_id)
    model_id = train.data.tags["model_id"]
    assert ev.data.tags["source_run_id"] == ev.data.tags["train_run_id"] == train.info.run_id
    assert ev.data.tags["source_model_id"] == model_id
    assert "mlflow.parentRunId" not in ev.data.tags
    assert f"#/experiments/{store['exp'].experiment_id}/runs/{train.info.run_id}" in ev.data.tags["mlflow.note.content"]
    assert [m.model_id for m in ev.inputs.model_inputs] == [model_id]
    on_model = {(m.key, m.run_id) for m in client.get_logged_model(model_id).metrics}
    assert ("accuracy", ev.info.run_id) in on_model
    acc = [m for m in client.get_logged_model(model_id).metrics if m.key == "accuracy"][0]
    assert acc.dataset_name == "phantom-set-test"


# ------------------------------------------------------------------------------------------------ 5 tags, description


def test_training_run_has_tags_description_and_system_metrics(store):
    run = store["client"].get_run(store["train"].info.run_id)
    tags = run.data.tags
    assert tags["stage"] == "training" and tags["bundle"] == "tiny" and tags["network"] == "tinycnn"
    assert tags["dataset"] == "phantom-set" and tags["data_digest"] == "0123456789abcdef"
    assert tags["git_commit"] and tags["checkpoint_sha256"]
    note = tags["mlflow.note.content"]
    assert f"Best epoch **{tags['best_epoch']}** of 2" in note and "val_accuracy" in note
    assert f"models:/{tags['model_id']}" in note and str(store["tmp"]) not in note
    assert any(k.startswith("system/") for k in run.data.metrics), sorted(run.data.metrics)
    assert [m.step for m in store["client"].get_metric_history(run.info.run_id, "val_accuracy")] == [1, 2]
    assert run.info.status == "FINISHED"


# ------------------------------------------------------------------------------------------------ 6 progress


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_only_on_a_terminal_and_when_wanted():
    assert progress_enabled(None, stream=_Tty()) and progress_enabled(True, stream=_Tty())
    assert not progress_enabled(False, stream=_Tty()) and not progress_enabled("false", stream=_Tty())
    assert not progress_enabled(True, stream=io.StringIO())


def test_progress_bar_counts_the_iterations_of_each_epoch(monkeypatch):
    from ignite.handlers import ProgressBar

    out = _Tty()
    monkeypatch.setattr("sys.stderr", out)
    engine = Engine(lambda e, b: b)
    bar = attach_progress(engine, "train", progress=True)
    assert isinstance(bar, ProgressBar)
    engine.run(range(5), max_epochs=2)
    assert "train [2/2]: [4/5]" in out.getvalue()
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert attach_progress(Engine(lambda e, b: b), "train", progress=True) is None
