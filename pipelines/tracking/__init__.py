"""MLflow tracking for the bundles: store location, run parameters, and a handler that never leaves RUNNING runs.

The store is ``sqlite:///<repo>/mlruns/mlflow.db`` with artifacts in ``<repo>/mlruns/artifacts`` (MLflow
>= 3.13 refuses plain-folder stores). ``MLFLOW_TRACKING_URI`` overrides it. Review with::

    mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db

Every experiment the project creates carries the MLflow 3 experiment-kind tag
(``mlflow.experimentKind = custom_model_development``), so the UI opens the runs table with the
training view, not the GenAI view.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, TypeVar

from pipelines.bundles import bundle_dir  # noqa: F401 - the bundles' configs call pipelines.tracking.bundle_dir

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]

#: MLflow 3 experiment tag read by the UI to choose the training view or the GenAI view.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
#: Value of :data:`EXPERIMENT_KIND_TAG` for model-training experiments.
EXPERIMENT_KIND = "custom_model_development"


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else the repository store ``sqlite:///<repo>/mlruns/mlflow.db``."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    (REPO_ROOT / "mlruns").mkdir(exist_ok=True)
    return f"sqlite:///{REPO_ROOT / 'mlruns' / 'mlflow.db'}"


def mlflow_client(tracking_uri: str | None = None):
    """An ``MlflowClient`` of ``tracking_uri``, else of :func:`default_tracking_uri`."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri or default_tracking_uri())


@contextlib.contextmanager
def tracking_store(uri: str | None) -> Iterator[None]:
    """Point MLflow's global tracking URI and ``$MLFLOW_TRACKING_URI`` (which the bundles' handlers read, and
    which MONAI's ``MLFlowHandler`` puts above an explicit ``tracking_uri``) at ``uri``, then restore both.
    ``uri=None`` changes nothing but still restores, so code inside may set either freely."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    old_global, old_env = getattr(utils, "_tracking_uri", None), os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        mlflow.set_tracking_uri(uri)
        os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        yield
    finally:
        if hasattr(utils, "_tracking_uri"):
            utils._tracking_uri = old_global
        if old_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_env


_F = TypeVar("_F", bound=Callable[..., Any])


def keeps_tracking_store(fn: _F) -> _F:
    """Decorate an in-process entry point that exports a store to its subprocesses, so that it leaves the
    caller's ``$MLFLOW_TRACKING_URI`` and global tracking URI as they were."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with tracking_store(None):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


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


class RunParams(dict):
    """The params dict of a training run (``str -> str``) that also keeps what the run's handler needs beyond
    params: ``tracked`` (the config ids as given, before paths are shortened) and ``data`` (the data dict of
    the bundle: split lists, ``digest``, ``manifest``). MLflow only ever sees the dict itself."""

    tracked: dict[str, Any]
    data: Mapping[str, Any] | None


def run_params(params: Mapping[str, Any], data: Mapping[str, Any] | None = None) -> RunParams:
    """Parameters of a run: the tracked config ids, the manifest digest, split sizes and the git commit.

    Paths are reduced to their last component so no user folder names (which may carry patient names)
    reach MLflow. The returned :class:`RunParams` also carries ``params`` and ``data`` unchanged, so
    :class:`pipelines.tracking.handlers.BundleMLFlowHandler` can tag the run and log the splits as MLflow
    dataset inputs without further config ids.
    """
    out = RunParams()
    out.tracked = dict(params)
    out.data = data
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


def executed_config(argv: list[str] | None = None) -> dict | None:
    """The raw config that ``python -m monai.bundle run`` executes (files merged, CLI overrides applied), or None
    when not started through ``monai.bundle``. Values are as written (``$`` expressions are not evaluated).

    It re-reads ``--config_file`` and the ``--id value`` overrides from the command line the way
    ``monai.bundle run`` does.
    """
    parser = _executed_parser(argv)
    return None if parser is None else parser.get()


def config_id(key: str, default: Any = None, argv: list[str] | None = None) -> Any:
    """A literal top-level config id of the running bundle (``--key value`` overrides applied), else ``default``.

    Lets a handler honour an optional id such as ``register_model`` or ``progress`` that a bundle may define or
    that is only given on the command line. ``$`` expressions and ``@`` references are not evaluated: they give
    ``default``.
    """
    try:
        cfg = executed_config(argv)
    except Exception as e:  # a config that cannot be re-read must not stop the run
        logger.debug("could not re-read the executed config: %s", e)
        return default
    if not cfg or key not in cfg:
        return default
    value = cfg[key]
    if isinstance(value, str) and value[:1] in ("$", "@", "%"):
        return default
    return value


def _executed_parser(argv: list[str] | None = None):
    from pipelines.bundles import read_config

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
    return read_config(files, args)


def save_executed_config(path: str | os.PathLike, argv: list[str] | None = None) -> str | None:
    """Write the config that ``python -m monai.bundle run`` executed (files merged, CLI overrides applied).

    It re-reads ``--config_file`` and the ``--id value`` overrides from the command line the way
    ``monai.bundle run`` does. Returns the path, or None when not started through ``monai.bundle``.
    The file is written atomically (:func:`pipelines.io.atomic.atomic_write`): a crash leaves the old one or the
    new one, never half a JSON file.
    """
    from pipelines.io.atomic import atomic_write

    parser = _executed_parser(argv)
    if parser is None:
        return None
    config = parser.get()
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(config, indent=2)))
    return str(path)


def bundle_version(bundle_root: str | os.PathLike) -> str:
    """The ``version`` in ``<bundle_root>/configs/metadata.json`` (empty string when absent)."""
    meta = Path(bundle_root) / "configs" / "metadata.json"
    try:
        return str(json.loads(meta.read_text()).get("version", ""))
    except (OSError, ValueError):
        return ""


def mark_model_training(client, experiment) -> None:
    """Tag ``experiment`` (an Experiment or its id) as a model-training experiment unless it already has a kind."""
    exp = client.get_experiment(experiment) if isinstance(experiment, str) else experiment
    if exp is not None and EXPERIMENT_KIND_TAG not in (exp.tags or {}):
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)


def experiment_id(client, name: str, tracking_uri: str | None) -> str:
    """Id of experiment ``name``, creating it (with the project's artifact location) when absent.

    A created experiment is tagged as model training (:data:`EXPERIMENT_KIND_TAG`); an existing one without a
    kind (made by an older version of the project) is tagged too, a kind set by someone else is left alone.
    """
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(
                name, artifact_location=artifact_location(tracking_uri) if tracking_uri else None,
                tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
            )
        except MlflowException as e:  # created meanwhile by a concurrent process
            if "RESOURCE_ALREADY_EXISTS" not in str(e):
                raise
            exp = client.get_experiment_by_name(name)
    mark_model_training(client, exp)
    return exp.experiment_id


def run_link(experiment_id: str, run_id: str) -> str:
    """Relative link to a run in the MLflow UI (works in a run description)."""
    return f"#/experiments/{experiment_id}/runs/{run_id}"


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, first 16 hex digits (identifies a checkpoint between training and evaluation)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


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
    mark_dead_runs(client, exp_id)
    run = client.create_run(exp_id, run_name=run_name, tags={**(tags or {}), **process_tags(), "stage": "evaluation"})
    return client, run.info.run_id, True


#: Run tags naming the process that owns a RUNNING run (see :func:`mark_dead_runs`).
PID_TAG = "process_id"
HOST_TAG = "hostname"


def process_tags() -> dict[str, str]:
    """``{process_id, hostname}`` of this process, recorded on every run the project opens."""
    import socket

    return {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def mark_dead_runs(client, experiment: str, keep: str | None = None) -> list[str]:
    """End as KILLED every RUNNING run of ``experiment`` (an id) whose owning process is gone.

    A run is judged only when it carries :data:`PID_TAG` and :data:`HOST_TAG` and the host is this machine
    (a run owned by another host, or by a version of the project that did not record its process, is left
    alone); its process is gone when ``os.kill(pid, 0)`` finds no such process. ``keep`` (a run id) is never
    touched. Each run ended is logged at WARNING. Returns the run ids ended.
    """
    import socket

    host = socket.gethostname()
    ended: list[str] = []
    try:
        runs = client.search_runs([experiment], filter_string="attributes.status = 'RUNNING'", max_results=1000)
    except Exception as e:  # a tracking hiccup must not stop a run from starting
        logger.warning("could not look for abandoned MLflow runs: %s", e)
        return ended
    for run in runs:
        tags = run.data.tags
        if run.info.run_id == keep or tags.get(HOST_TAG) != host or not str(tags.get(PID_TAG, "")).isdigit():
            continue
        pid = int(tags[PID_TAG])
        if pid == os.getpid() or _pid_alive(pid):
            continue
        try:
            client.set_terminated(run.info.run_id, status="KILLED")
            ended.append(run.info.run_id)
            logger.warning("MLflow run %s (%s) was still RUNNING but its process %d on %s is gone: marked KILLED",
                           run.info.run_id, run.info.run_name, pid, host)
        except Exception as e:
            logger.warning("could not mark the abandoned MLflow run %s KILLED: %s", run.info.run_id, e)
    return ended


def prepare_store(tracking_uri: str | None) -> None:
    """Create (or migrate) the tracking store now, e.g. on rank 0 before other ranks open clients on it: two
    processes creating one new SQLite store at once race on its schema."""
    if not tracking_uri:
        return
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=tracking_uri).search_experiments(max_results=1)
