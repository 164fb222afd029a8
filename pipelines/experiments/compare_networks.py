"""Train, evaluate, then compare every network overlay of a bundle; and the ``python -m pipelines compare`` command.

::

    python -m pipelines compare --train-bundle tumor_mri [--networks resnet18 vit] [--override epochs=30 ...]

runs ``python -m monai.bundle run`` with ``train.json + <network>.json`` and then with ``evaluate.json``
added, for each overlay in turn (one subprocess at a time), links each evaluation run to its training run
(tag ``train_run_id``), tags both with one ``comparison_group``, and compares the evaluation runs with
:func:`pipelines.evaluation.compare.compare_runs`. Without ``--train-bundle`` the command compares runs already
in the store (see :mod:`pipelines.evaluation.compare`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pipelines.bundles import bundle_commands, bundle_root, parse_overrides, run_subprocess
from pipelines.evaluation import compare as cmp
from pipelines.evaluation.compare import Comparison, ComparisonError, compare_runs, run_by_name
from pipelines.tracking import keeps_tracking_store, mlflow_client
from pipelines.tracking.progress import add_quiet_argument, progress_bar

__all__ = ["train_and_compare", "register"]

logger = logging.getLogger(__name__)


@keeps_tracking_store
def train_and_compare(
    bundle: str,
    networks: Sequence[str] | None = None,
    overrides: Mapping[str, str] | None = None,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    out_dir: str | Path | None = None,
    metrics: Sequence[str] | str | None = None,
    sort_by: str | None = None,
    runner: Callable[[list[str]], int] = run_subprocess,
) -> Comparison:
    """Train and evaluate each network overlay of a bundle, one after another, then compare the evaluations.

    Args:
        bundle: bundle name under ``bundles/`` or a bundle folder.
        networks: overlay names (default: the bundle's ``compare_networks`` in ``configs/metadata.json``).
        overrides: config-id overrides for every command (``{"epochs": "2"}``).
        tracking_uri: MLflow store; exported as ``MLFLOW_TRACKING_URI`` to the subprocesses.
        experiment: MLflow experiment (default: the bundle name).
        out_dir, metrics, sort_by: see :func:`pipelines.evaluation.compare.compare_runs`.
        runner: executes one command and returns its exit code (for tests).

    Returns:
        The :class:`pipelines.evaluation.compare.Comparison` of the evaluation runs that succeeded.

    Raises:
        ComparisonError: no network trained and evaluated successfully.
    """
    root = bundle_root(bundle)
    if not networks:
        meta = json.loads((root / "configs" / "metadata.json").read_text())
        networks = meta.get("compare_networks") or []
        if not networks:
            raise ComparisonError(f"{root}: pass --networks (metadata.json lists no compare_networks)")
    experiment = experiment or root.name
    if tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    client = mlflow_client(tracking_uri)
    group = time.strftime("%Y%m%d-%H%M%S")
    plans = [bundle_commands(root, n, group, experiment, overrides) for n in networks]  # fail before training
    eval_ids, failed = [], []
    for network, plan in progress_bar(list(zip(networks, plans)), desc=f"compare {root.name}", unit="network"):
        t0 = time.time()
        code = runner(plan["train"])
        if code == 0:
            code = runner(plan["evaluate"])
        train_run = run_by_name(client, experiment, plan["train_run_name"])
        eval_run = run_by_name(client, experiment, plan["eval_run_name"])
        if code != 0 or eval_run is None:
            logger.error("%s: failed (exit %s) after %.0f s; left out of the comparison", network, code,
                         time.time() - t0)
            for run in (train_run, eval_run):
                if run is not None and run.info.status == "RUNNING":  # a killed process leaves its run open
                    client.set_terminated(run.info.run_id, status="FAILED")
            failed.append(network)
            continue
        client.set_tag(eval_run.info.run_id, "comparison_group", group)
        if train_run is not None:
            client.set_tag(eval_run.info.run_id, "train_run_id", train_run.info.run_id)
            client.set_tag(train_run.info.run_id, "comparison_group", group)
        eval_ids.append(eval_run.info.run_id)
        logger.info("%s: trained and evaluated in %.0f s", network, time.time() - t0)
    if not eval_ids:
        raise ComparisonError(f"no network of {root.name} was trained and evaluated: failed {failed}")
    result = compare_runs(tracking_uri, experiment, tags={"comparison_group": group}, run_ids=eval_ids,
                          metrics=metrics, out_dir=out_dir, sort_by=sort_by,
                          title=f"{root.name}: {', '.join(n for n in networks if n not in failed)}")
    if failed:
        result.failed = failed
        result.markdown += f"\nFailed (not in the table): {', '.join(failed)}\n"
    return result


# ------------------------------------------------------------------------------------------------ CLI


def _main(args: argparse.Namespace) -> int:
    metrics = args.metrics
    if metrics and len(metrics) == 1 and metrics[0] == "all":
        metrics = "all"
    try:
        if args.train_bundle:
            result = train_and_compare(args.train_bundle, args.networks, parse_overrides(args.override, literal=False),
                                       args.tracking_uri, args.experiment, args.out, metrics, args.sort_by)
        else:
            if args.networks or args.override:
                raise ComparisonError("--networks and --override only apply with --train-bundle")
            result = compare_runs(args.tracking_uri, args.experiment, cmp.parse_tags(args.tag), args.run_ids,
                                  args.stage, metrics, args.out, not args.no_log, sort_by=args.sort_by)
    except (ComparisonError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(result.markdown)
    print(f"written: {result.paths['markdown']} and {result.paths['csv']}"
          + (f"; MLflow run {result.run_id} (stage=comparison)" if result.run_id else ""))
    return 1 if result.failed else 0


def register(subparsers: Any) -> None:
    """Add the ``compare`` command to ``python -m pipelines``."""
    p = subparsers.add_parser(
        "compare",
        help="side-by-side table of MLflow runs (metrics with CIs), or train+evaluate+compare a bundle's networks",
        description=cmp.__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--experiment", help="MLflow experiment name (default with --train-bundle: the bundle name)")
    p.add_argument("--tag", action="append", metavar="KEY=VALUE", help="tag filter (repeatable; all must match)")
    p.add_argument("--run-ids", nargs="+", metavar="ID", help="compare these runs")
    p.add_argument("--stage", default="evaluation",
                   help="required value of the runs' stage tag; 'any' to drop the filter (default: evaluation)")
    p.add_argument("--metrics", nargs="+", metavar="NAME",
                   help=f"metrics to show, or 'all' (default: those of {', '.join(cmp.DEFAULT_METRICS)} that are "
                        "logged)")
    p.add_argument("--sort-by", metavar="METRIC", help="sort rows by this metric, best first")
    p.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI or <repo>/mlruns/mlflow.db)")
    p.add_argument("--out", type=Path, help="output folder (default: outputs/comparisons/<experiment>-<time>)")
    p.add_argument("--no-log", action="store_true", help="do not log the comparison to MLflow")
    p.add_argument("--train-bundle", metavar="BUNDLE",
                   help="first train and evaluate each network overlay of this bundle, then compare")
    p.add_argument("--networks", nargs="+", metavar="OVERLAY",
                   help="network overlays (configs/<name>.json) for --train-bundle (default: all of the bundle); "
                        "'base' is train.json's own network")
    p.add_argument("--override", action="append", metavar="ID=VALUE",
                   help="config-id override for every bundle command, e.g. epochs=30 (repeatable)")
    add_quiet_argument(p)
    p.set_defaults(func=_main)
