"""``pipelines.bundles``: finding a bundle, reading its configs, building and running its commands."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from pipelines.bundles import (
    REPO_ROOT,
    bundle_command,
    bundle_root,
    load_config,
    parse_overrides,
    read_config,
    run_subprocess,
)


def _bundle(tmp_path: Path) -> Path:
    cfg = tmp_path / "tiny_bundle" / "configs"
    cfg.mkdir(parents=True)
    (cfg / "train.json").write_text(json.dumps({"epochs": 5, "image_size": 64, "double": "$@epochs * 2"}))
    (cfg / "overlay.json").write_text(json.dumps({"epochs": 7}))
    return cfg.parent


def test_bundle_root_takes_a_name_under_bundles_or_a_folder(tmp_path):
    assert bundle_root("alz_hybrid") == REPO_ROOT / "bundles" / "alz_hybrid"
    assert bundle_root(_bundle(tmp_path)) == (tmp_path / "tiny_bundle").resolve()


def test_bundle_root_names_the_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="no configs/train.json"):
        bundle_root("no_such_bundle")
    assert bundle_root("no_such_bundle", required=None).name == "no_such_bundle"


def test_load_config_merges_files_in_order_then_applies_overrides(tmp_path):
    root = _bundle(tmp_path)
    parser = load_config(root, "train.json", "overlay.json", overrides={"image_size": 32})
    assert (parser["epochs"], parser["image_size"], parser.get_parsed_content("double")) == (7, 32, 14)
    with pytest.raises(FileNotFoundError, match="bundle config not found: .*missing.json"):
        load_config(root, "train.json", "missing.json")


def test_read_config_takes_a_dict():
    assert read_config({"a": 1}, {"b": 2}).get() == {"_meta_": {}, "a": 1, "b": 2}


def test_bundle_command_merges_several_files_and_passes_overrides_as_text():
    cmd = bundle_command(["a.json", Path("b.json")], {"epochs": 2, "input_shape": [1, 1, 8, 8]},
                         args=["--meta_file", "m.json"], python="py")
    assert cmd == ["py", "-m", "monai.bundle", "run", "--config_file", "['a.json', 'b.json']", "--meta_file",
                   "m.json", "--epochs", "2", "--input_shape", "[1, 1, 8, 8]"]
    export = bundle_command("i.json", command=["ckpt_export", "network_def"], python=["torchrun", "--x"])
    assert export == ["torchrun", "--x", "-m", "monai.bundle", "ckpt_export", "network_def", "--config_file",
                      "i.json"]


def test_parse_overrides_reads_literals_unless_told_to_keep_text():
    assert parse_overrides(["epochs=3", "--name=vit", "shape=[1, 2]"]) == {"epochs": 3, "name": "vit",
                                                                            "shape": [1, 2]}
    assert parse_overrides(["epochs=3"], literal=False) == {"epochs": "3"}
    with pytest.raises(ValueError, match="config_id=value"):
        parse_overrides(["epochs"])


def test_run_subprocess_prints_the_command_and_returns_its_exit_code(capsys):
    assert run_subprocess([sys.executable, "-c", "raise SystemExit(3)"]) == 3
    assert "$ " in capsys.readouterr().out
