"""Stage a self-contained app folder for ``monai-deploy package`` (the MAP build itself needs Docker).

``monai-deploy package <folder>`` copies only the application folder into the image, so the folder must hold
everything the app imports and reads::

    <dest>/__main__.py, app.yaml, requirements.txt     the app (pipelines/deploy/<app>/)
    <dest>/pipelines/, <dest>/transforms/              this project's packages (no __pycache__)
    <dest>/bundles/<bundle>/configs/, LICENSE          the bundle's configs: inference.json preprocessing,
                                                       metadata.json name/version (pipelines.bundles.bundle_dir
                                                       resolves to <dest>/bundles/<bundle>)

Usage::

    python -m pipelines.deploy.package alz_hybrid --dest build/map/alz_hybrid

prints the ``monai-deploy package`` command to run where Docker exists.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from pipelines.bundles import bundle_dir
from pipelines.deploy.specs import get_spec

__all__ = ["package_command", "stage_app"]

REPO_ROOT = Path(__file__).resolve().parents[2]
_APP_FILES = ("__main__.py", "app.yaml", "requirements.txt")
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", ".*")


def stage_app(bundle: str, dest: str | Path, overwrite: bool = False) -> Path:
    """Copy the app of ``bundle`` and what it needs into ``dest`` (see the module docstring).

    Raises:
        ValueError: unknown bundle; FileNotFoundError: app files or bundle configs missing;
        FileExistsError: ``dest`` exists and is not empty, without ``overwrite``.
    """
    spec = get_spec(bundle)
    app_dir = REPO_ROOT / "pipelines" / "deploy" / spec.app_name
    source = Path(bundle_dir(spec.bundle_name))
    configs = source / "configs"
    for name in _APP_FILES:
        if not (app_dir / name).is_file():
            raise FileNotFoundError(f"app file missing: {app_dir / name}")
    if not (configs / spec.config_file).is_file():
        raise FileNotFoundError(f"bundle config missing: {configs / spec.config_file}")
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{dest} is not empty; pass overwrite=True (--overwrite) to replace it")
        shutil.rmtree(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name in _APP_FILES:
        shutil.copy2(app_dir / name, dest / name)
    for package in ("pipelines", "transforms"):
        shutil.copytree(REPO_ROOT / package, dest / package, ignore=_IGNORE)
    bundle_dest = dest / "bundles" / spec.bundle_name
    shutil.copytree(configs, bundle_dest / "configs", ignore=_IGNORE)
    licence = source / "LICENSE"
    if licence.is_file():
        shutil.copy2(licence, bundle_dest / "LICENSE")
    return dest


def package_command(bundle: str, dest: str | Path, model: str | Path, tag: str | None = None) -> list[str]:
    """The ``monai-deploy package`` command line for a staged app (x86_64, models folder from ``model``)."""
    spec = get_spec(bundle)
    dest = Path(dest)
    return ["monai-deploy", "package", str(dest), "--config", str(dest / "app.yaml"), "--models", str(model),
            "--platform", "x86_64", "--tag", tag or f"{spec.app_name.replace('_', '-')}:latest", "-l", "DEBUG"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="stage a deploy app for `monai-deploy package`")
    parser.add_argument("bundle", help="bundle name, e.g. alz_hybrid")
    parser.add_argument("--dest", required=True, help="folder to create (the MAP's application folder)")
    parser.add_argument("--model", default=None, help="model.ts for the printed command "
                                                      "(default bundles/<bundle>/models/model.ts)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --dest")
    args = parser.parse_args(argv)
    try:
        dest = stage_app(args.bundle, args.dest, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model = args.model or Path(bundle_dir(args.bundle)) / "models" / "model.ts"
    print(f"staged {args.bundle} app in {dest}; build the MAP where Docker exists with:")
    print("  " + " ".join(package_command(args.bundle, dest, model)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
