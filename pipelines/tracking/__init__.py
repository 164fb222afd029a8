"""MLflow tracking for the bundles: store location, run parameters, and a handler that never leaves RUNNING runs.

The store is ``sqlite:///<repo>/mlruns/mlflow.db`` with artifacts in ``<repo>/mlruns/artifacts`` (MLflow
>= 3.13 refuses plain-folder stores). ``MLFLOW_TRACKING_URI`` overrides it. Review with::

    mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db
"""

from __future__ import annotations

import ast
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]


def bundle_dir(name: str) -> str:
    """Absolute path of ``bundles/<name>`` in this repository (the default ``bundle_root``)."""
    return str(REPO_ROOT / "bundles" / name)


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else the repository store ``sqlite:///<repo>/mlruns/mlflow.db``."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    (REPO_ROOT / "mlruns").mkdir(exist_ok=True)
    return f"sqlite:///{REPO_ROOT / 'mlruns' / 'mlflow.db'}"


def artifact_location(tracking_uri: str) -> str | None:
    """Artifact root for a new experiment: ``<folder of the sqlite db>/artifacts`` (a file URI), else None."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):])
        return (db.parent / "artifacts").resolve().as_uri()
    return None


def git_commit() -> str:
    """Commit of the working tree (``+dirty`` when modified), or ``unknown``."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha.stdout.strip()[:12] + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_params(params: Mapping[str, Any], data: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Parameters of a run: the tracked config ids, the manifest digest, split sizes and the git commit.

    Paths are reduced to their last component so no user folder names (which may carry patient names)
    reach MLflow.
    """
    out: dict[str, str] = {}
    for k, v in params.items():
        if isinstance(v, (str, os.PathLike)) and os.sep in str(v) and (os.path.isabs(str(v)) or os.path.exists(str(v))):
            v = Path(str(v)).name  # a path: keep only its last component
        out[k] = json.dumps(v) if isinstance(v, (list, tuple, dict)) else str(v)
    if data is not None:
        out["manifest_digest"] = str(data.get("digest"))
        for split, c in (data.get("counts") or {}).items():
            out[f"n_{split}_images"] = str(c["images"])
            out[f"n_{split}_subjects"] = str(c["subjects"])
    out["git_commit"] = git_commit()
    return out


def _parse_cli_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def save_executed_config(path: str | os.PathLike, argv: list[str] | None = None) -> str | None:
    """Write the config that ``python -m monai.bundle run`` executed (files merged, CLI overrides applied).

    It re-reads ``--config_file`` and the ``--id value`` overrides from the command line the way
    ``monai.bundle run`` does. Returns the path, or None when not started through ``monai.bundle``.
    """
    from monai.bundle import ConfigParser

    argv = list(sys.argv if argv is None else argv)
    if "run" not in argv and not any(a.endswith("monai/bundle/__main__.py") for a in argv):
        return None
    args: dict[str, Any] = {}
    i = argv.index("run") + 1 if "run" in argv else 1
    while i < len(argv):
        tok = argv[i]
        if tok.startswith("--"):
            if "=" in tok:
                k, v = tok[2:].split("=", 1)
                i += 1
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                k, v = tok[2:], argv[i + 1]
                i += 2
            else:
                k, v = tok[2:], "True"
                i += 1
            args[k] = _parse_cli_value(v)
        else:
            i += 1
    files = args.pop("config_file", None)
    if files is None:
        return None
    for k in ("meta_file", "logging_file", "tracking", "args_file", "run_id", "init_id", "final_id"):
        args.pop(k, None)
    parser = ConfigParser()
    parser.read_config(files)
    parser.update(args)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ConfigParser.export_config_file(parser.get(), str(path), indent=2)
    return str(path)


def bundle_version(bundle_root: str | os.PathLike) -> str:
    """The ``version`` in ``<bundle_root>/configs/metadata.json`` (empty string when absent)."""
    meta = Path(bundle_root) / "configs" / "metadata.json"
    try:
        return str(json.loads(meta.read_text()).get("version", ""))
    except (OSError, ValueError):
        return ""


def experiment_id(client, name: str, tracking_uri: str | None) -> str:
    """Id of experiment ``name``, creating it (with the project's artifact location) when absent."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location(tracking_uri) if tracking_uri else None)


def open_run(tracking_uri: str | None, experiment: str, run_name: str | None, tags: Mapping[str, Any] | None = None,
             what: str = "report"):
    """``(client, run_id, started_here)`` for logging a report: the active MLflow run if there is one, else a new
    run (tag ``stage=evaluation`` plus ``tags``) in ``experiment`` of ``tracking_uri``, created with the project's
    artifact location; None when there is no active run and no ``tracking_uri``."""
    import mlflow
    from mlflow.tracking import MlflowClient

    active = mlflow.active_run()
    if active is not None:
        return MlflowClient(), active.info.run_id, False
    if not tracking_uri:
        logger.info("no active MLflow run and no tracking_uri: %s not logged to MLflow", what)
        return None
    client = MlflowClient(tracking_uri=tracking_uri)
    exp_id = experiment_id(client, experiment, tracking_uri)
    run = client.create_run(exp_id, run_name=run_name, tags={**(tags or {}), "stage": "evaluation"})
    return client, run.info.run_id, True
