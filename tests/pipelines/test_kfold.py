"""Subject-level stratified k-fold and hold-out splits (pipelines.manifests.kfold)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pipelines.manifests.audit import subject_overlap
from pipelines.manifests.kfold import (
    fold_manifest,
    stratification_keys,
    stratified_subject_split,
    subject_kfold,
    write_kfold,
)
from pipelines.manifests.schema import ManifestError, read_manifest


def _manifest(n_per_label=(20, 20, 10), slices=3, with_age_sex=True, seed=0) -> pd.DataFrame:
    """``slices`` rows per subject; labels A/B/C; age 50..90 and sex alternating (independent of label)."""
    rng = np.random.default_rng(seed)
    rows = []
    sid = 0
    for label, n in zip("ABC", n_per_label):
        for _ in range(n):
            sid += 1
            age = float(rng.uniform(50, 90))
            sex = "F" if sid % 2 else "M"
            for k in range(slices):
                row = {"subject_id": f"sub-{sid:03d}", "session_id": "ses-01", "image": f"/x/sub-{sid:03d}_{k}.png",
                       "label": label, "split": "", "slice_index": k}
                if with_age_sex:
                    row.update(age=age, sex=sex)
                rows.append(row)
    return pd.DataFrame(rows)


def _subjects_per_fold(df: pd.DataFrame, column: str) -> pd.DataFrame:
    sub = df[df["fold"].notna()].drop_duplicates("subject_id")
    return sub.groupby(["fold", column]).size().unstack(fill_value=0)


def test_kfold_puts_every_subject_in_exactly_one_fold():
    df = subject_kfold(_manifest(), n_splits=5, seed=0)
    per_subject = df.groupby("subject_id")["fold"].nunique()
    assert (per_subject == 1).all()
    assert sorted(df["fold"].unique()) == [0, 1, 2, 3, 4]
    assert df["fold"].notna().all()


def test_kfold_balances_labels_across_folds():
    df = subject_kfold(_manifest((20, 20, 10)), n_splits=5, seed=3)
    counts = _subjects_per_fold(df, "label")
    assert counts["A"].tolist() == [4] * 5
    assert counts["B"].tolist() == [4] * 5
    assert counts["C"].tolist() == [2] * 5


def test_kfold_balances_sex_when_present():
    m = _manifest((30, 30, 20), seed=1)
    balanced = _subjects_per_fold(subject_kfold(m, n_splits=4, seed=1, age_bins=1), "sex")
    label_only = subject_kfold(m.drop(columns=["age", "sex"]), n_splits=4, seed=1).assign(sex=m["sex"])
    unbalanced = _subjects_per_fold(label_only, "sex")
    # 40 F / 40 M over 4 folds of 20: the label+sex key keeps each fold at 10 +- 1
    assert balanced["F"].between(9, 11).all(), balanced
    assert (balanced["F"] - 10).abs().max() < (unbalanced["F"] - 10).abs().max()


def test_stratification_keys_combine_label_age_bin_and_sex():
    keys, info = stratification_keys(_manifest((30, 30, 30)), min_stratum=2, age_bins=2)
    assert set(k.split("|")[1] for k in keys) == {"age0", "age1"}
    assert set(k.split("|")[2] for k in keys) == {"F", "M"}
    assert len(info["age_bin_edges"]) == 3
    assert info["n_subjects_fallback_to_label"] == 0


def test_small_strata_fall_back_to_the_label_key():
    keys, info = stratification_keys(_manifest((3, 30, 30)), min_stratum=5, age_bins=3)
    a_keys = keys[keys.index.isin([f"sub-{i:03d}" for i in (1, 2, 3)])]
    assert set(a_keys) == {"A"}  # 3 subjects of A cannot fill any combined stratum of 5
    assert info["n_subjects_fallback_to_label"] >= 3


def test_kfold_without_age_and_sex_stratifies_on_label_only():
    df = subject_kfold(_manifest(with_age_sex=False), n_splits=5, seed=0)
    assert df.attrs["split_params"]["stratified_on"] == ["label"]


def test_existing_test_rows_stay_out_of_the_folds():
    m = _manifest()
    test_subjects = {"sub-001", "sub-021", "sub-041"}
    m.loc[m["subject_id"].isin(test_subjects), "split"] = "test"
    df = subject_kfold(m, n_splits=3, seed=0)
    assert df.loc[df["split"] == "test", "fold"].isna().all()
    assert set(df.loc[df["split"] == "test", "subject_id"]) == test_subjects


def test_test_fraction_holds_out_whole_subjects_first():
    df = subject_kfold(_manifest((20, 20, 20)), n_splits=3, seed=0, test_fraction=0.2)
    test = df[df["split"] == "test"]
    assert test["subject_id"].nunique() == 12  # 20 % of each label's 20 subjects
    assert not set(test["subject_id"]) & set(df.loc[df["fold"].notna(), "subject_id"])


def test_same_seed_gives_the_same_folds_and_another_seed_differs():
    m = _manifest()
    a = subject_kfold(m, n_splits=5, seed=7)["fold"].tolist()
    b = subject_kfold(m, n_splits=5, seed=7)["fold"].tolist()
    c = subject_kfold(m, n_splits=5, seed=8)["fold"].tolist()
    assert a == b
    assert a != c


def test_fold_manifest_marks_one_fold_val_and_never_shares_a_subject():
    df = subject_kfold(_manifest(), n_splits=5, seed=0)
    fm = fold_manifest(df, 2)
    assert set(fm.loc[fm["fold"] == 2, "split"]) == {"val"}
    assert set(fm.loc[fm["fold"] != 2, "split"]) == {"train"}
    assert subject_overlap(fm) == {}


def test_fewer_subjects_than_folds_is_an_error():
    with pytest.raises(ManifestError, match="cannot fill 5 folds"):
        subject_kfold(_manifest((1, 1, 1)), n_splits=5)


def test_n_splits_below_two_is_rejected():
    with pytest.raises(ValueError, match="n_splits"):
        subject_kfold(_manifest(), n_splits=1)


def test_write_kfold_writes_fold_manifests_and_split_json(tmp_path):
    df = subject_kfold(_manifest(), n_splits=3, seed=4)
    out = write_kfold(df, tmp_path / "cv3", source="m.csv")
    info = json.loads((out / "split.json").read_text())
    assert info["params"]["n_splits"] == 3 and info["params"]["seed"] == 4 and info["params"]["source"] == "m.csv"
    assert sum(f["subjects"] for f in info["folds"].values()) == 50
    fold1 = read_manifest(out / "fold-1" / "manifest.csv")
    assert set(fold1["split"]) == {"train", "val"}
    assert fold1.loc[fold1["split"] == "val", "subject_id"].nunique() == info["folds"]["fold-1"]["subjects"]


def test_write_kfold_refuses_to_overwrite(tmp_path):
    df = subject_kfold(_manifest(), n_splits=3)
    write_kfold(df, tmp_path / "cv3")
    with pytest.raises(FileExistsError, match="split already exists"):
        write_kfold(df, tmp_path / "cv3")
    write_kfold(df, tmp_path / "cv3", overwrite=True)


def test_write_kfold_relative_paths_resolve_from_each_manifest(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    m = _manifest((4, 4, 4), slices=1, with_age_sex=False)
    m["image"] = [str(data / f"{s}.png") for s in m["subject_id"]]
    out = write_kfold(subject_kfold(m, n_splits=2), tmp_path / "splits" / "cv2", paths="relative")
    fold0 = pd.read_csv(out / "fold-0" / "manifest.csv")
    assert fold0["image"].iloc[0].startswith("../../../data/")
    assert (out / "fold-0" / fold0["image"].iloc[0]).resolve() == (data / f"{fold0['subject_id'].iloc[0]}.png")


def test_holdout_split_is_stratified_and_subject_level():
    df = stratified_subject_split(_manifest((40, 40, 20)), val_fraction=0.2, test_fraction=0.2, seed=0)
    assert subject_overlap(df) == {}
    per = df.drop_duplicates("subject_id").groupby(["split", "label"]).size().unstack()
    # 20 % of 40/40/20 subjects, up to one off from rounding inside the label|age|sex strata
    for split in ("val", "test"):
        assert np.abs(per.loc[split].to_numpy() - np.array([8, 8, 4])).max() <= 1, per
    assert set(df["label"]) == {"A", "B", "C"}  # labels restored after stratifying on the combined keys
    assert "label+age+sex" in df.attrs["split_params"]["method"]
