"""``python -m pipelines compare``: a side-by-side table of MLflow runs, made from the store, never by hand.

Compares runs already in the store, selected by experiment and tags or by run ids::

    python -m pipelines compare --experiment tumor_mri [--tag k=v ...] [--run-ids ID ...] [--out DIR]

By default only FINISHED runs tagged ``stage=evaluation`` (the runs of
:class:`pipelines.evaluation.handler.EvaluationReportHandler`) are compared; ``--stage any`` drops that filter.
Training, evaluating and then comparing every network overlay of a bundle (``--train-bundle``), and the command
line itself, are in :mod:`pipelines.experiments.compare_networks`.

The table has one row per run: the model (the ``network`` param or tag, of the run or its linked training run),
every param whose value differs between the runs, each metric with its CI (the evaluation runs log
``<metric>``, ``<metric>_ci_low`` and ``<metric>_ci_high``), and wall times (run end - run start). It is
written as ``comparison.md`` and ``comparison.csv`` to ``--out`` and logged as artifacts of a new MLflow run
tagged ``stage=comparison`` in the experiment of the compared runs.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from pipelines.evaluation.metrics import SUMMARY_METRICS
from pipelines.evaluation.report import atomic_write_csv, atomic_write_text
from pipelines.tracking import mlflow_client

__all__ = [
    "DEFAULT_METRICS",
    "METRIC_LABELS",
    "ComparisonError",
    "Comparison",
    "parse_tags",
    "select_runs",
    "comparison_table",
    "comparison_markdown",
    "compare_runs",
    "run_by_name",
]

logger = logging.getLogger(__name__)

#: Metrics shown by default (those present in the runs), in this order.
DEFAULT_METRICS = ("accuracy", "macro_auc", "balanced_accuracy", "macro_specificity", "macro_f1")
#: Column headers of the Markdown table for well-known metric names.
METRIC_LABELS = {
    "accuracy": "accuracy",
    "balanced_accuracy": "sensitivity (macro)",
    "macro_specificity": "specificity (macro)",
    "macro_f1": "macro F1",
    "weighted_f1": "weighted F1",
    "macro_auc": "macro AUC",
}
#: Params never shown as "differing": the model has its own column.
MODEL_PARAM = "network"
_CI_LOW, _CI_HIGH = "_ci_low", "_ci_high"
_MISSING = "–"


class ComparisonError(ValueError):
    """The selection is empty or invalid; the message names the store, experiment and filters."""


@dataclass
class Comparison:
    """Result of :func:`compare_runs`.

    Attributes:
        table: one row per run (see :func:`comparison_table`).
        markdown: the Markdown report.
        metrics: metric names in the table.
        paths: ``{"csv": Path, "markdown": Path}`` of the written files.
        run_id: id of the MLflow run that holds them (None when not logged).
        failed: networks left out because training or evaluation failed
            (:func:`pipelines.experiments.compare_networks.train_and_compare` only).
    """

    table: pd.DataFrame
    markdown: str
    metrics: list[str]
    paths: dict[str, Path] = field(default_factory=dict)
    run_id: str | None = None
    failed: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ selection


def parse_tags(items: Iterable[str] | None) -> dict[str, str]:
    """``["k=v", ...]`` to ``{k: v}``.

    Raises:
        ValueError: an item without ``=`` or with an empty key.
    """
    tags: dict[str, str] = {}
    for item in items or ():
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise ValueError(f"tag filter {item!r} must look like key=value")
        tags[key.strip()] = value
    return tags


def _quote(value: str) -> str:
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"tag value {value!r} holds both quote characters; MLflow filters cannot express it")


def _search_all(client: Any, experiment_ids: list[str], filter_string: str) -> list[Any]:
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string, max_results=1000,
                                  order_by=["attributes.start_time ASC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def run_by_name(client: Any, experiment: str, run_name: str) -> Any | None:
    """The newest run named ``run_name`` in ``experiment`` (None when the experiment or the run does not exist)."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = _search_all(client, [exp.experiment_id], f"attributes.run_name = {_quote(run_name)}")
    return runs[-1] if runs else None


def select_runs(
    client: Any,
    experiment: str | None = None,
    tags: Mapping[str, str] | None = None,
    run_ids: Sequence[str] | None = None,
    stage: str | None = "evaluation",
    finished_only: bool = True,
) -> list[Any]:
    """MLflow runs to compare, oldest first.

    Args:
        client: an ``MlflowClient``.
        experiment: experiment name (required unless ``run_ids`` are given).
        tags: every tag must match exactly.
        run_ids: explicit runs (combined with ``experiment``/``tags`` as a further filter when those are given).
        stage: required value of the ``stage`` tag (ignored when ``tags`` holds ``stage`` or with ``run_ids``
            alone); None or ``"any"``: no stage filter. Runs tagged ``stage=comparison`` are always left out.
        finished_only: leave out RUNNING and FAILED runs.

    Raises:
        ComparisonError: unknown experiment, unknown run id, or no run matches.
    """
    tags = dict(tags or {})
    if stage and stage != "any" and "stage" not in tags and not (run_ids and not experiment and not tags):
        tags["stage"] = stage
    where = " and ".join(f"tags.`{k}` = {_quote(str(v))}" for k, v in tags.items())
    if finished_only:
        where = " and ".join(filter(None, [where, "attributes.status = 'FINISHED'"]))
    if experiment is not None:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise ComparisonError(f"no MLflow experiment named {experiment!r} in {client.tracking_uri}")
        runs = _search_all(client, [exp.experiment_id], where)
    elif run_ids:
        runs = []
    else:
        raise ComparisonError("select runs with --experiment NAME (and --tag k=v) or --run-ids ID ...")
    if run_ids:
        wanted = list(dict.fromkeys(run_ids))
        if experiment is not None:
            by_id = {r.info.run_id: r for r in runs}
            missing = [r for r in wanted if r not in by_id]
            if missing:
                raise ComparisonError(f"run(s) {missing} are not in experiment {experiment!r} or do not match "
                                      f"the filter {where!r}")
            runs = [by_id[r] for r in wanted]
        else:
            from mlflow.exceptions import MlflowException

            runs = []
            for rid in wanted:
                try:
                    run = client.get_run(rid)
                except MlflowException as e:
                    raise ComparisonError(f"run {rid!r} not found in {client.tracking_uri}: {e}") from e
                if finished_only and run.info.status != "FINISHED":
                    raise ComparisonError(f"run {rid} is {run.info.status}, not FINISHED")
                if any(run.data.tags.get(k) != v for k, v in tags.items()):
                    raise ComparisonError(f"run {rid} does not carry the tags {tags}")
                runs.append(run)
    runs = [r for r in runs if r.data.tags.get("stage") != "comparison"]
    if not runs:
        raise ComparisonError(
            f"no runs to compare in {client.tracking_uri}: experiment={experiment!r}, tags={tags}, "
            f"run_ids={list(run_ids or [])}, finished_only={finished_only}"
        )
    return runs


# ------------------------------------------------------------------------------------------------ the table


def _wall_time_s(run: Any) -> float:
    start, end = run.info.start_time, run.info.end_time
    return (end - start) / 1000.0 if start and end else math.nan


def _model_name(run: Any, train_run: Any | None) -> str:
    for source in (run.data.params, run.data.tags, train_run.data.params if train_run else {}):
        if source.get(MODEL_PARAM):
            return str(source[MODEL_PARAM])
    return run.info.run_name or run.info.run_id


def ci_metrics(runs: Sequence[Any]) -> list[str]:
    """Scalar metric names logged with both CI bounds by at least one run (summary metrics first)."""
    names: set[str] = set()
    for run in runs:
        m = run.data.metrics
        names.update(k for k in m if not k.endswith((_CI_LOW, _CI_HIGH)) and f"{k}{_CI_LOW}" in m
                     and f"{k}{_CI_HIGH}" in m)
    first = [k for k in SUMMARY_METRICS if k in names]
    return first + sorted(names - set(first))


def _resolve_metrics(runs: Sequence[Any], metrics: Sequence[str] | str | None) -> list[str]:
    logged = set().union(*(r.data.metrics for r in runs))
    if metrics is None:
        chosen = [m for m in DEFAULT_METRICS if m in logged]
        return chosen or ci_metrics(runs)
    if metrics == "all" or list(metrics) == ["all"]:
        return ci_metrics(runs)
    unknown = [m for m in metrics if m not in logged]
    if unknown:
        raise ComparisonError(f"metric(s) {unknown} are not logged by any selected run; logged: {sorted(logged)}")
    return list(metrics)


def comparison_table(
    client: Any,
    runs: Sequence[Any],
    metrics: Sequence[str] | str | None = None,
    ignore_params: Iterable[str] = (),
) -> tuple[pd.DataFrame, list[str], list[str]]:
    """The comparison as a DataFrame, one row per run, in the order of ``runs``.

    Params of a run are its own params over those of its training run (tag ``train_run_id``), when linked.

    Args:
        client: ``MlflowClient`` (reads linked training runs and their ``train_loss`` history).
        runs: MLflow runs.
        metrics: metric names, ``"all"`` (every metric logged with CIs), or None (:data:`DEFAULT_METRICS` that
            are logged, else all).
        ignore_params: params never shown.

    Returns:
        ``(table, metrics, differing_params)``. Columns: ``run_id``, ``run_name``, ``model``, the differing
        params (``None`` where a run lacks one), per metric ``<m>``, ``<m>_ci_low``, ``<m>_ci_high`` (NaN when
        absent), ``wall_time_s``; with linked training runs also ``train_run_id``, ``train_wall_time_s`` and
        ``train_epochs`` (entries in the training run's ``train_loss`` history).
    """
    names = _resolve_metrics(runs, metrics)
    ignore = set(ignore_params) | {MODEL_PARAM}
    train_runs: dict[str, Any] = {}
    trains: list[Any | None] = []
    params: list[dict[str, str]] = []
    for run in runs:
        tid = run.data.tags.get("train_run_id")
        train = None
        if tid:
            train = train_runs.get(tid)
            if train is None:
                try:
                    train = train_runs[tid] = client.get_run(tid)
                except Exception as e:  # a deleted training run must not block the comparison
                    logger.warning("run %s: linked training run %s unreadable (%s)", run.info.run_id, tid, e)
        trains.append(train)
        params.append({**(train.data.params if train else {}), **run.data.params})
    keys = sorted(set().union(*params) - ignore)
    differing = [k for k in keys if len({p.get(k) for p in params}) > 1]
    rows = []
    linked = any(t is not None for t in trains)
    for run, train, p in zip(runs, trains, params):
        row: dict[str, Any] = {
            "run_id": run.info.run_id,
            "run_name": run.info.run_name,
            "model": _model_name(run, train),
        }
        row.update({k: p.get(k) for k in differing})
        m = run.data.metrics
        for name in names:
            row[name] = m.get(name, math.nan)
            row[f"{name}{_CI_LOW}"] = m.get(f"{name}{_CI_LOW}", math.nan)
            row[f"{name}{_CI_HIGH}"] = m.get(f"{name}{_CI_HIGH}", math.nan)
        row["wall_time_s"] = _wall_time_s(run)
        if linked:
            row["train_run_id"] = train.info.run_id if train else None
            row["train_wall_time_s"] = _wall_time_s(train) if train else math.nan
            row["train_epochs"] = (len(client.get_metric_history(train.info.run_id, "train_loss"))
                                   if train and "train_loss" in train.data.metrics else None)
        rows.append(row)
    return pd.DataFrame(rows), names, differing


def _fmt(value: Any, digits: int = 3) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return _MISSING if value is None else str(value)
    return _MISSING if not math.isfinite(v) else f"{v:.{digits}f}"


def _fmt_seconds(seconds: Any) -> str:
    try:
        s = float(seconds)
    except (TypeError, ValueError):
        return _MISSING
    if not math.isfinite(s):
        return _MISSING
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def _cell_text(value: Any) -> str:
    return _MISSING if value is None or (isinstance(value, float) and math.isnan(value)) else \
        str(value).replace("|", "\\|").replace("\n", " ")


def comparison_markdown(
    table: pd.DataFrame,
    metrics: Sequence[str],
    differing: Sequence[str],
    title: str = "Model comparison",
    notes: Sequence[str] = (),
    digits: int = 3,
    ci_level: float | None = 95.0,
) -> str:
    """Markdown report of :func:`comparison_table`: ``value [low, high]`` cells, the best value of each metric
    in bold, and which model is best by each metric."""
    level = f"{ci_level:g}% CI" if ci_level else "CI"
    has_train = "train_wall_time_s" in table.columns
    header = ["model", *differing, *(f"{METRIC_LABELS.get(m, m)} [{level}]" for m in metrics),
              "eval time" if has_train else "wall time"]
    if has_train:
        header += ["train time", "epochs"]
    header.append("run")
    best = {m: table[m].max(skipna=True) for m in metrics}
    lines = [f"# {title}", ""]
    lines += [f"- {n}" for n in notes]
    if notes:
        lines.append("")
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in table.iterrows():
        cells = [_cell_text(row["model"]), *(_cell_text(row[k]) for k in differing)]
        for m in metrics:
            text = f"{_fmt(row[m], digits)} [{_fmt(row[m + _CI_LOW], digits)}, {_fmt(row[m + _CI_HIGH], digits)}]"
            if math.isfinite(float(row[m])) and row[m] == best[m] and table[m].notna().sum() > 1:
                text = f"**{text}**"
            cells.append(text)
        cells.append(_fmt_seconds(row["wall_time_s"]))
        if has_train:
            epochs = row.get("train_epochs")
            cells += [_fmt_seconds(row["train_wall_time_s"]),
                      _MISSING if epochs is None or pd.isna(epochs) else str(int(epochs))]
        cells.append(f"`{str(row['run_id'])[:8]}`")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if len(table) > 1:
        for m in metrics:
            if table[m].notna().any():
                winners = table.loc[table[m] == best[m], "model"].astype(str).tolist()
                lines.append(f"- best {METRIC_LABELS.get(m, m)}: {', '.join(dict.fromkeys(winners))} "
                             f"({_fmt(best[m], digits)})")
        lines.append("")
    lines.append("Bold: the highest point estimate of each metric; overlapping CIs mean the difference is not "
                 "resolved by this test set. Sensitivity (macro) is the mean per-class recall "
                 "(= balanced accuracy); specificity (macro) the mean one-vs-rest specificity. Times: run end - "
                 "start; epochs: epochs trained (early stopping may end training before the configured number).")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ compare


def _ci_level(runs: Sequence[Any]) -> float | None:
    alphas = {r.data.params.get("eval.ci_alpha") for r in runs} - {None}
    if len(alphas) == 1:
        return 100.0 * (1.0 - float(alphas.pop()))
    return None


def _notes(runs: Sequence[Any], selection: Mapping[str, Any]) -> list[str]:
    notes = [f"selection: {', '.join(f'{k}={v}' for k, v in selection.items() if v)}"]
    n_samples = {r.data.params.get("eval.n_samples") for r in runs} - {None}
    if len(n_samples) == 1:
        notes.append(f"evaluated images per run: {n_samples.pop()}")
    resamples = {r.data.params.get("eval.n_resamples") for r in runs} - {None}
    if len(resamples) == 1:
        notes.append(f"CIs: stratified bootstrap, {resamples.pop()} resamples")
    notes.append(f"generated by `python -m pipelines compare` at {time.strftime('%Y-%m-%d %H:%M:%S')}")
    return notes


def compare_runs(
    tracking_uri: str | None = None,
    experiment: str | None = None,
    tags: Mapping[str, str] | None = None,
    run_ids: Sequence[str] | None = None,
    stage: str | None = "evaluation",
    metrics: Sequence[str] | str | None = None,
    out_dir: str | Path | None = None,
    log_to_mlflow: bool = True,
    ignore_params: Iterable[str] = (),
    sort_by: str | None = None,
    title: str | None = None,
) -> Comparison:
    """Select runs, build the table, write ``comparison.md``/``comparison.csv``, and log them to MLflow.

    Args:
        tracking_uri: MLflow store (default :func:`pipelines.tracking.default_tracking_uri`).
        experiment, tags, run_ids, stage: the selection (see :func:`select_runs`).
        metrics: see :func:`comparison_table`.
        out_dir: output folder (default ``<repo>/outputs/comparisons/<experiment>-<time>``).
        log_to_mlflow: log a ``stage=comparison`` run with both files as artifacts in the runs' experiment.
        ignore_params: params never shown.
        sort_by: metric to sort by (descending); default: run start time.
        title: Markdown title.

    Returns:
        A :class:`Comparison`.
    """
    from pipelines.tracking import REPO_ROOT

    client = mlflow_client(tracking_uri)
    runs = select_runs(client, experiment, tags, run_ids, stage)
    table, names, differing = comparison_table(client, runs, metrics, ignore_params)
    if sort_by:
        if sort_by not in table.columns:
            raise ComparisonError(f"cannot sort by {sort_by!r}: not a column of the table ({names})")
        table = table.sort_values(sort_by, ascending=False, kind="stable").reset_index(drop=True)
    exp_id = runs[0].info.experiment_id
    exp_name = experiment or client.get_experiment(exp_id).name
    selection = {"experiment": exp_name, "tags": dict(tags or {}), "stage": stage,
                 "run_ids": ",".join(run_ids or [])}
    markdown = comparison_markdown(table, names, differing, title or f"Model comparison: {exp_name}",
                                   _notes(runs, selection), ci_level=_ci_level(runs))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(out_dir) if out_dir else REPO_ROOT / "outputs" / "comparisons" / f"{exp_name}-{stamp}"
    paths = {"csv": atomic_write_csv(out / "comparison.csv", table),
             "markdown": atomic_write_text(out / "comparison.md", markdown)}
    result = Comparison(table=table, markdown=markdown, metrics=names, paths=paths)
    if log_to_mlflow:
        result.run_id = _log_comparison(client, exp_id, runs, paths, names, selection)
    return result


def _log_comparison(client: Any, experiment_id: str, runs: Sequence[Any], paths: Mapping[str, Path],
                    metrics: Sequence[str], selection: Mapping[str, Any]) -> str:
    from mlflow.entities import Param

    ids = [r.info.run_id for r in runs]
    tags = {"stage": "comparison", "compared_run_ids": ",".join(ids)[:5000]}
    run = client.create_run(experiment_id, run_name=f"comparison-{time.strftime('%Y%m%d-%H%M%S')}", tags=tags)
    rid = run.info.run_id
    try:
        params = [Param("n_runs", str(len(ids))), Param("metrics", ",".join(metrics)[:6000])]
        params += [Param(f"selection.{k}", str(v)[:6000]) for k, v in selection.items() if v]
        client.log_batch(rid, params=params)
        for path in paths.values():
            client.log_artifact(rid, str(path), artifact_path="comparison")
    except BaseException:
        client.set_terminated(rid, status="FAILED")
        raise
    client.set_terminated(rid, status="FINISHED")
    return rid
