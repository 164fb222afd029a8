"""The one way into a bundle: find its folder, read its configs, build and run its ``python -m monai.bundle``
commands, and parse ``--override id=value`` options.

Every driver (demo, compare, restore-augment, enhance-sweep, deploy, benchmarks) and the tests go through here
instead of building ``ConfigParser`` objects and ``monai.bundle`` command lines of their own::

    parser = load_config("alz_hybrid", "train.json", "hybrid.json", overrides={"image_size": 64})
    cmd = bundle_command(["configs/train.json", "configs/evaluate.json"], {"epochs": 2})
    run_subprocess(cmd)

This module imports neither MONAI nor torch at import time: bundle configs import :mod:`pipelines` (and through
:mod:`pipelines.tracking`, this module) on every run.
"""

from __future__ import annotations

import ast
import os
import shlex
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "BASE_NETWORK",
    "REPO_ROOT",
    "bundle_dir",
    "bundle_root",
    "config_files",
    "read_config",
    "load_config",
    "override_args",
    "config_file_arg",
    "bundle_command",
    "bundle_commands",
    "run_subprocess",
    "run_workflow",
    "parse_overrides",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
#: Network name meaning "train.json's own network, no overlay" (``--networks base vit``).
BASE_NETWORK = "base"
#: Configs that are not network overlays.
# configs/<name>.json files that are not network overlays: the workflows, their variants and the multi-GPU overlays
_NOT_OVERLAYS = ("train", "evaluate", "inference", "metadata")
_NOT_OVERLAY_PREFIXES = ("train_", "evaluate_", "inference_", "multi_gpu_")

PathLike = str | os.PathLike


# ------------------------------------------------------------------------------------------------ folders


def bundle_dir(name: str) -> str:
    """Absolute path of ``bundles/<name>`` in this repository (the default ``bundle_root``)."""
    return str(REPO_ROOT / "bundles" / name)


def bundle_root(bundle: PathLike, required: str | None = "train.json") -> Path:
    """The absolute folder of a bundle given by name (under ``bundles/``) or as a folder holding ``configs/``.

    Args:
        bundle: bundle name or folder.
        required: a file that must exist in ``configs/`` (None: no check).

    Raises:
        FileNotFoundError: ``configs/<required>`` does not exist.
    """
    path = Path(bundle)
    root = path if (path / "configs").is_dir() else Path(bundle_dir(str(bundle)))
    if required and not (root / "configs" / required).is_file():
        raise FileNotFoundError(f"bundle {str(bundle)!r}: no configs/{required} under {root}")
    return root.resolve()


def config_files(bundle: PathLike, *names: str) -> list[str]:
    """Paths of ``configs/<name>`` of a bundle (name or folder), in the order given.

    Raises:
        FileNotFoundError: one of them does not exist.
    """
    cfg = bundle_root(bundle, required=None) / "configs"
    files = [cfg / n for n in names]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"bundle config not found: {f}")
    return [str(f) for f in files]


# ------------------------------------------------------------------------------------------------ configs


def read_config(source: PathLike | Sequence[PathLike] | Mapping[str, Any],
                overrides: Mapping[str, Any] | None = None) -> Any:
    """A ``monai.bundle.ConfigParser`` over one config file, several merged in order, or a config dict, with
    ``config id -> value`` overrides set on top (as ``--id value`` does on the command line)."""
    from monai.bundle import ConfigParser

    if isinstance(source, Mapping):
        content: Any = dict(source)
    elif isinstance(source, (str, os.PathLike)):
        content = str(source)
    else:
        content = [str(f) for f in source]
    parser = ConfigParser()
    parser.read_config(content)
    parser.update(dict(overrides or {}))
    return parser


def load_config(bundle: PathLike, *names: str, overrides: Mapping[str, Any] | None = None) -> Any:
    """:func:`read_config` of ``configs/<name>`` files of a bundle (name or folder), merged in order.

    Raises:
        FileNotFoundError: a config file does not exist.
    """
    return read_config(config_files(bundle, *names), overrides)


# ------------------------------------------------------------------------------------------------ commands


def override_args(overrides: Mapping[str, Any] | None) -> list[str]:
    """``{"epochs": 2}`` -> ``["--epochs", "2"]``."""
    args: list[str] = []
    for key, value in (overrides or {}).items():
        args += [f"--{key}", str(value)]
    return args


def config_file_arg(files: PathLike | Sequence[PathLike]) -> str:
    """The ``--config_file`` value: one path as it is, several as a Python list literal (merged in order)."""
    if isinstance(files, (str, os.PathLike)):
        return str(files)
    return repr([str(f) for f in files])


def bundle_command(
    files: PathLike | Sequence[PathLike],
    overrides: Mapping[str, Any] | None = None,
    command: str | Sequence[str] = "run",
    args: Sequence[str] = (),
    python: str | Sequence[str] = sys.executable,
) -> list[str]:
    """``python -m monai.bundle <command> --config_file <files> <args> --<id> <value> ...``.

    Args:
        files: config file(s), merged in order.
        overrides: ``config id -> value`` (values passed as text, parsed by ``monai.bundle``).
        command: ``run``, or e.g. ``["ckpt_export", "network_def"]``.
        args: further options (``--meta_file``, ``--run_name`` ...), placed before the overrides.
        python: interpreter, or a launcher such as ``[python, "-m", "torch.distributed.run", ...]``.
    """
    launcher = [python] if isinstance(python, str) else list(python)
    command = [command] if isinstance(command, str) else list(command)
    return [*launcher, "-m", "monai.bundle", *command, "--config_file", config_file_arg(files), *args,
            *override_args(overrides)]


def bundle_commands(
    bundle_root: PathLike,
    network: str,
    group: str,
    experiment: str,
    overrides: Mapping[str, str] | None = None,
    python: str = sys.executable,
) -> dict[str, Any]:
    """The train and evaluate commands of one network overlay, and their MLflow run names.

    Args:
        bundle_root: bundle folder (holding ``configs/``).
        network: overlay name: ``configs/<network>.json``; ``"base"`` (without a ``base.json``) is the network
            of ``train.json`` itself, with no overlay.
        group: comparison-group id, part of the run names.
        experiment: MLflow experiment (passed as ``experiment_name``).
        overrides: further ``config id -> value`` overrides for both commands.
        python: interpreter.

    Raises:
        FileNotFoundError: the overlay (or evaluate.json) does not exist.
    """
    root = Path(bundle_root)
    cfg = root / "configs"
    overlay = cfg / f"{network}.json"
    base = network == BASE_NETWORK and not overlay.is_file()  # train.json's own network, no overlay
    for path in ([] if base else [overlay]) + [cfg / "evaluate.json"]:
        if not path.is_file():
            available = sorted(p.stem for p in cfg.glob("*.json")
                               if p.stem not in _NOT_OVERLAYS and not p.stem.startswith(_NOT_OVERLAY_PREFIXES))
            raise FileNotFoundError(f"{path} not found (network overlays in {cfg}: {available}; "
                                    f"'{BASE_NETWORK}' is train.json's own network)")
    name = root.name
    train_name, eval_name = f"{name}-{network}-train-{group}", f"{name}-{network}-evaluate-{group}"
    files = [str(cfg / "train.json")] + ([] if base else [str(overlay)])
    common = ["--meta_file", str(cfg / "metadata.json"), "--logging_file", str(cfg / "logging.conf"),
              "--experiment_name", experiment]
    train = bundle_command(files, overrides, args=[*common, "--run_name", train_name], python=python)
    evaluate = bundle_command(files + [str(cfg / "evaluate.json")], overrides,
                              args=[*common, "--eval_run_name", eval_name], python=python)
    return {"train": train, "evaluate": evaluate, "train_run_name": train_name, "eval_run_name": eval_name}


# ------------------------------------------------------------------------------------------------ running


def run_subprocess(cmd: Sequence[str], cwd: PathLike | None = None) -> int:
    """Print ``$ <cmd>`` and run it (output not captured); returns its exit code."""
    print("\n$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    return subprocess.run(list(cmd), cwd=cwd, check=False).returncode


def run_workflow(files: PathLike | Sequence[PathLike], meta_file: PathLike | None = None,
                 overrides: Mapping[str, Any] | None = None) -> None:
    """Run a bundle in this process (``monai.bundle.ConfigWorkflow``: initialize, run, finalize), without
    ``logging.conf``; ``overrides`` are config ids. Without ``meta_file`` MONAI looks for ``metadata.json``
    next to the configs."""
    from monai.bundle import ConfigWorkflow

    config = str(files) if isinstance(files, (str, os.PathLike)) else [str(f) for f in files]
    wf = ConfigWorkflow(config_file=config, meta_file=None if meta_file is None else str(meta_file),
                        logging_file=False, workflow_type=None, **dict(overrides or {}))
    wf.initialize()
    try:
        wf.run()
    finally:
        wf.finalize()


# ------------------------------------------------------------------------------------------------ CLI options


def parse_overrides(items: Iterable[str] | None, literal: bool = True) -> dict:
    """``["epochs=3", "image_size=64"]`` -> ``{"epochs": 3, "image_size": 64}`` for ``--override`` options.

    Args:
        items: ``config_id=value`` strings (a leading ``--`` on the id is dropped).
        literal: parse values as Python literals where possible (else keep the text, e.g. to pass it on to
            ``python -m monai.bundle`` unchanged).

    Raises:
        ValueError: an item without ``=`` or with an empty id.
    """
    out: dict = {}
    for item in items or ():
        key, sep, value = str(item).partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like config_id=value")
        if literal:
            try:
                out[key] = ast.literal_eval(value)
                continue
            except (ValueError, SyntaxError):
                pass
        out[key] = value
    return out
