"""Tests for pipelines.restoration.augment (restoration augmentation up to a class ratio)."""

from __future__ import annotations

import os

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipelines.cli import main as cli_main
from pipelines.restoration.augment import (
    AugmentationLeakError,
    check_augmented_manifest,
    parse_ratio,
    restore_augment,
    score_augmented,
    target_count,
)
from pipelines.restoration.denoise import load_network
from pipelines.restoration.networks import DenoisingUNet

CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Two intra-op threads on two shared cores run these tiny convolutions ~10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture()
def dataset(tmp_path: Path) -> Path:
    """4 classes x 6 subjects x 2 images (36 x 32 px): subjects 0-3 train, 4 val, 5 test."""
    rng = np.random.default_rng(0)
    rows = []
    for c in CLASSES:
        for s in range(6):
            sid = f"sub-{c[:3]}{s}"
            split = "train" if s < 4 else ("val" if s == 4 else "test")
            for k in range(2):
                path = tmp_path / "data" / split / c / f"{sid}_{k}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray((rng.random((32, 36)) * 255).astype(np.uint8)).save(path)
                rows.append({"subject_id": sid, "session_id": "ses-01", "image": str(path.relative_to(tmp_path)),
                             "label": c, "split": split})
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    return tmp_path / "manifest.csv"


@pytest.fixture()
def denoiser_ts(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "denoiser.ts"
    torch.jit.script(DenoisingUNet(features=(2, 2, 4, 4, 8, 2))).save(str(path))
    return path


class _Constant(torch.nn.Module):
    """A 'classifier' that always predicts one class (for the validity check)."""

    def __init__(self, index: int, n: int = 4) -> None:
        super().__init__()
        logits = torch.zeros(n)
        logits[index] = 5.0
        self.register_buffer("logits", logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(x.shape[0], -1)


def _files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


def test_parse_ratio_positional_puts_augmented_class_first():
    assert parse_ratio("8:1:1:1", CLASSES, "notumor") == {"notumor": 8, "glioma": 1, "meningioma": 1, "pituitary": 1}


def test_parse_ratio_named():
    r = parse_ratio("notumor=4,glioma=2,meningioma=1,pituitary=1", CLASSES, "notumor")
    assert r == {"notumor": 4, "glioma": 2, "meningioma": 1, "pituitary": 1}


def test_parse_ratio_with_wrong_length_or_class_raises():
    with pytest.raises(ValueError, match="3 values for 4 classes"):
        parse_ratio("8:1:1", CLASSES, "notumor")
    with pytest.raises(ValueError, match="unknown class"):
        parse_ratio("notumor=8,glioma=1,meningioma=1,pituitry=1", CLASSES, "notumor")


def test_target_count_is_ratio_times_mean_unit_of_other_classes():
    counts = {"glioma": 150, "meningioma": 150, "notumor": 150, "pituitary": 150}
    assert target_count(counts, parse_ratio("8:1:1:1", CLASSES, "notumor"), "notumor") == 1200


def test_generator_reaches_the_ratio_with_train_only_augmented_rows(dataset, denoiser_ts, tmp_path):
    code = cli_main(["restore-augment", "--manifest", str(dataset), "--denoiser", str(denoiser_ts),
                     "--ratio", "8:1:1:1", "--out", str(tmp_path / "aug")])
    assert code == 0
    out = pd.read_csv(tmp_path / "aug" / "manifest.csv")
    train = out[out["split"] == "train"]
    assert train["label"].value_counts().to_dict() == {"notumor": 64, "glioma": 8, "meningioma": 8, "pituitary": 8}
    new = out[out["augmented"]]
    assert len(new) == 56 and set(new["split"]) == {"train"} and set(new["label"]) == {"notumor"}
    # each new image keeps the subject of its (train) source
    src = out.set_index("image")
    assert all(src.loc[s, "split"] == "train" and src.loc[s, "subject_id"] == sid
               for s, sid in zip(new["source_image"], new["subject_id"]))
    assert set(new["noise_sigma"]) <= {0.1, 0.2, 0.3, 0.4, 0.5}
    assert all(Path(p).is_file() and Path(p).parent == tmp_path / "aug" / "images" / "notumor" for p in new["image"])


def test_generator_never_writes_into_val_or_test(dataset, denoiser_ts, tmp_path):
    before = pd.read_csv(dataset)
    held_out_files = _files(tmp_path / "data" / "val") | _files(tmp_path / "data" / "test")
    res = restore_augment(dataset, denoiser_ts, tmp_path / "aug")
    assert _files(tmp_path / "data" / "val") | _files(tmp_path / "data" / "test") == held_out_files
    after = res.manifest
    for split in ("val", "test"):
        b = before[before["split"] == split]
        a = after[after["split"] == split]
        assert sorted(Path(p).name for p in a["image"]) == sorted(Path(p).name for p in b["image"])
        assert not a["augmented"].any()


def test_check_refuses_augmented_rows_outside_train():
    df = pd.DataFrame({"subject_id": ["s1", "s2"], "session_id": "ses-01", "image": ["/a.png", "/b.png"],
                       "label": "notumor", "split": ["train", "val"], "augmented": [False, True]})
    with pytest.raises(AugmentationLeakError, match="outside the train split"):
        check_augmented_manifest(df)


def test_check_refuses_augmented_subject_with_test_images():
    df = pd.DataFrame({"subject_id": ["s1", "s1", "s1"], "session_id": "ses-01",
                       "image": ["/a.png", "/b.png", "/a_aug.png"], "label": "notumor",
                       "split": ["train", "test", "train"], "augmented": [False, False, True]})
    with pytest.raises(AugmentationLeakError, match=r"subject\(s\) \['s1'\]"):
        check_augmented_manifest(df)


def test_check_refuses_augmented_rows_made_from_non_train_images():
    df = pd.DataFrame({"subject_id": ["s1", "s2", "s2"], "session_id": "ses-01",
                       "image": ["/a.png", "/b.png", "/b_aug.png"], "label": "notumor",
                       "split": ["val", "train", "train"], "augmented": [False, False, True],
                       "source_image": ["", "", "/a.png"]})
    with pytest.raises(AugmentationLeakError, match="not train rows"):
        check_augmented_manifest(df)


def test_generator_refuses_an_output_folder_holding_test_images(dataset, denoiser_ts, tmp_path):
    with pytest.raises(AugmentationLeakError, match="val/test image"):
        restore_augment(dataset, denoiser_ts, tmp_path / "data")


def test_generator_refuses_rows_without_split(dataset, denoiser_ts, tmp_path):
    df = pd.read_csv(dataset)
    df.loc[0, "split"] = np.nan
    df.to_csv(dataset, index=False)
    with pytest.raises(ValueError, match="have no split"):
        restore_augment(dataset, denoiser_ts, tmp_path / "aug")


def test_state_dict_denoiser_rebuilt_from_bundle_config_matches_module(tmp_path):
    torch.manual_seed(0)
    net = DenoisingUNet(features=(2, 2, 4, 4, 8, 2)).eval()
    torch.save({"model": net.state_dict()}, tmp_path / "model.pt")
    loaded = load_network(tmp_path / "model.pt", REPO / "bundles" / "mri_denoiser" / "configs" / "inference.json",
                          {"features": [2, 2, 4, 4, 8, 2]})
    x = torch.rand(1, 1, 40, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x))


def test_validity_check_scores_augmented_images_with_the_classifier(dataset, denoiser_ts, tmp_path):
    res = restore_augment(dataset, denoiser_ts, tmp_path / "aug", max_new=6)
    right, wrong = tmp_path / "right.ts", tmp_path / "wrong.ts"
    torch.jit.script(_Constant(CLASSES.index("notumor"))).save(str(right))
    torch.jit.script(_Constant(CLASSES.index("glioma"))).save(str(wrong))
    good = score_augmented(res.paths["manifest"], right, class_names=CLASSES, image_size=16, n_resamples=50)
    bad = score_augmented(res.paths["manifest"], wrong, class_names=CLASSES, image_size=16, n_resamples=50)
    assert good["augmented"]["n"] == 6 and good["augmented"]["accuracy"] == 1.0
    assert good["sources"]["accuracy"] == 1.0
    assert bad["augmented"]["accuracy"] == 0.0 and bad["augmented"]["predicted"]["glioma"] == 6


def test_validity_cli_flag_writes_validity_json(dataset, denoiser_ts, tmp_path):
    restore_augment(dataset, denoiser_ts, tmp_path / "aug", max_new=4)
    clf = tmp_path / "clf.ts"
    torch.jit.script(_Constant(CLASSES.index("notumor"))).save(str(clf))
    code = cli_main(["restore-augment", "--manifest", str(tmp_path / "aug" / "manifest.csv"), "--check-only",
                     "--validate-with", str(clf), "--classifier-classes", *CLASSES, "--classifier-image-size", "16",
                     "--out", str(tmp_path / "check")])
    assert code == 0
    import json

    v = json.loads((tmp_path / "check" / "validity.json").read_text())
    assert v["class"] == "notumor" and v["augmented"]["n"] == 4 and v["augmented"]["accuracy"] == 1.0


def test_comparison_trains_both_variants_on_the_same_test_set_with_equal_steps(dataset, denoiser_ts, tmp_path):
    import mlflow

    from pipelines.restoration.augment import compare_augmentation

    res = restore_augment(dataset, denoiser_ts, tmp_path / "aug")
    bundle = tmp_path / "fake_bundle"
    (bundle / "configs").mkdir(parents=True)
    for name in ("train", "resnet18", "evaluate", "metadata"):
        (bundle / "configs" / f"{name}.json").write_text("{}")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp_id = client.create_experiment("fake_bundle")
    commands: list[list[str]] = []

    def runner(cmd: list[str]) -> int:
        """Stands in for `python -m monai.bundle run`: logs the run the real bundle would log."""
        commands.append(cmd)
        args = dict(zip(cmd, cmd[1:]))
        if "--eval_run_name" in args:
            variant_auc = 0.9 if "augmented" in args["--eval_run_name"] else 0.8
            run = client.create_run(exp_id, run_name=args["--eval_run_name"], tags={"stage": "evaluation"})
            for k, v in (("macro_auc", variant_auc), ("macro_auc_ci_low", variant_auc - 0.05),
                         ("macro_auc_ci_high", variant_auc + 0.05), ("accuracy", 0.7), ("balanced_accuracy", 0.7),
                         ("macro_f1", 0.6)):
                client.log_metric(run.info.run_id, k, v)
        else:
            run = client.create_run(exp_id, run_name=args["--run_name"])
        client.set_terminated(run.info.run_id, "FINISHED")
        return 0

    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    seen: list[str | None] = []
    inner = runner

    def runner(cmd: list[str]) -> int:  # noqa: F811 -- records the store the subprocess would inherit
        seen.append(os.environ.get("MLFLOW_TRACKING_URI"))
        return inner(cmd)

    result = compare_augmentation(str(bundle), dataset, res.paths["manifest"], overrides={"epochs": "16"},
                                  tracking_uri=uri, out_dir=tmp_path / "cmp", runner=runner, equal_steps=True)
    # the subprocesses get the store; the caller's environment is left as it was
    assert set(seen) == {uri} and os.environ.get("MLFLOW_TRACKING_URI") == env_before
    trains = [c for c in commands if "--eval_run_name" not in c]
    epochs = [c[c.index("--epochs") + 1] for c in trains]
    manifests = [Path(c[c.index("--manifest") + 1]).resolve() for c in trains]
    assert epochs == ["16", str(round(16 * 32 / 88))]  # 32 original vs 88 augmented train images
    assert manifests == [dataset.resolve(), res.paths["manifest"].resolve()]
    table = result.table.set_index("training_set")
    assert table.loc["original", "macro_auc"] == 0.8 and table.loc["augmented", "macro_auc"] == 0.9
    assert (tmp_path / "cmp" / "comparison.md").is_file()


def test_comparison_refuses_manifests_with_different_test_rows(dataset, denoiser_ts, tmp_path):
    from pipelines.restoration.augment import compare_augmentation

    res = restore_augment(dataset, denoiser_ts, tmp_path / "aug")
    other = pd.read_csv(dataset)
    other = other[other["split"] != "test"]
    other.to_csv(tmp_path / "other.csv", index=False)
    with pytest.raises(ValueError, match="differ in their val/test rows"):
        compare_augmentation("tumor_mri", tmp_path / "other.csv", res.paths["manifest"], runner=lambda c: 0)
