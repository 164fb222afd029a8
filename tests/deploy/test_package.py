"""Staging an app folder for `monai-deploy package` (the MAP build itself needs Docker and is not run here)."""

from __future__ import annotations

import json

import pytest

from pipelines.deploy.package import main, package_command, stage_app
from pipelines.deploy.specs import APP_SPECS
from tests.deploy.helpers import REPO_ROOT


@pytest.mark.parametrize("bundle", sorted(APP_SPECS))
def test_every_app_has_main_yaml_and_requirements(bundle):
    app = REPO_ROOT / "pipelines" / "deploy" / bundle
    assert f'main("{bundle}")' in (app / "__main__.py").read_text()
    requirements = (app / "requirements.txt").read_text().splitlines()
    pins = {"monai-deploy-app-sdk==4.0.0", "holoscan-cu13==4.2.0", "torch==2.13.0", "highdicom==0.28.2"}
    assert pins <= set(requirements)
    assert (REPO_ROOT / "bundles" / bundle / "configs" / "inference.json").is_file()


@pytest.mark.parametrize("bundle", sorted(APP_SPECS))
def test_app_yaml_passes_the_holoscan_packager_reader(bundle):
    reader = pytest.importorskip("holoscan_cli.packager.config_reader", reason="holoscan-cli not installed",
                                 exc_type=ImportError)
    config = reader.ApplicationConfiguration()
    config.read(REPO_ROOT / "pipelines" / "deploy" / bundle / "app.yaml")
    assert config._application_object["input-formats"] == ["file"]
    assert bundle in config.title() and config._application_object["version"] == json.loads(
        (REPO_ROOT / "bundles" / bundle / "configs" / "metadata.json").read_text())["version"]


def test_staged_folder_holds_app_packages_and_bundle_configs(tmp_path):
    dest = stage_app("alz_hybrid", tmp_path / "map")
    for name in ("__main__.py", "app.yaml", "requirements.txt", "pipelines/deploy/app.py", "transforms/slicing.py",
                 "bundles/alz_hybrid/configs/inference.json", "bundles/alz_hybrid/configs/metadata.json"):
        assert (dest / name).is_file(), name
    assert not list(dest.rglob("__pycache__"))
    # pipelines.bundles.bundle_dir() (also pipelines.tracking.bundle_dir) resolves against the staged copy
    assert (dest / "pipelines" / "bundles.py").resolve().parents[1] == dest.resolve()


def test_staging_refuses_a_non_empty_folder_and_prints_the_package_command(tmp_path, capsys):
    (tmp_path / "map").mkdir()
    (tmp_path / "map" / "keep.txt").write_text("x")
    assert main(["alz_hybrid", "--dest", str(tmp_path / "map")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["alz_hybrid", "--dest", str(tmp_path / "map"), "--overwrite", "--model", "m.ts"]) == 0
    out = capsys.readouterr().out
    assert " ".join(package_command("alz_hybrid", tmp_path / "map", "m.ts")) in out
    assert not (tmp_path / "map" / "keep.txt").exists()
