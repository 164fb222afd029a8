"""``python -m pipelines enhance-sweep``: the classic-preprocessing study on the binary Alzheimer task.

Every combination of the enhancement chain (:class:`transforms.enhance.EnhancementPipeline`: invert,
morphological opening, CLAHE, smoothing average / median / Gaussian merged with the image by overlap weights
4/-4 .. 1/-1 or by multiplication) is trained and evaluated with ``bundles/alz_binary`` (Demented =
VeryMild + Mild + Moderate vs NonDemented), each as an MLflow **child run** (tag ``mlflow.parentRunId``)
of one parent run. The table (sensitivity, specificity, accuracy and AUC on the test split, each with a
stratified-bootstrap 95 % CI) is written as ``sweep.csv`` / ``sweep.md`` and logged to the parent::

    python -m pipelines enhance-sweep --grid steps --out outputs/enhance_sweep            # small CPU settings
    python -m pipelines enhance-sweep --combos none clahe inv+open+clahe+median11+overlap4/-4
    python -m pipelines enhance-sweep --grid full --epochs 30 --image-size 256 --learning-rate 3e-4 \\
        --network-params "{'widen_factor': 0.5}" --dataset-dir ../shared/data/alzheimer_mri_4class

A combination is written as the :attr:`EnhancementPipeline.tag` it produces: ``+``-joined steps among
``inv``, ``open``, ``clahe``, ``average<k>`` / ``median<k>`` / ``gaussian<k>`` (odd kernel k), then
``overlap<w1>/<w2>`` or ``multiply``; ``none`` is the plain baseline.

Each child runs the bundle in this process (``monai.bundle.ConfigWorkflow``): ``train.json`` with the
combination as the ``enhancement`` config id, then ``train.json + evaluate.json`` on the test split. A child
that fails is marked FAILED and listed in the table; the sweep goes on.
"""

from __future__ import annotations

import argparse
import ast
import itertools
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipelines.bundles import bundle_root, config_files, parse_overrides, read_config, run_workflow
from pipelines.tracking.progress import add_quiet_argument, progress_bar

__all__ = [
    "GRIDS",
    "binary_data",
    "combo_kwargs",
    "combo_tag",
    "grid_combos",
    "register",
    "run_sweep",
    "sweep_markdown",
]

logger = logging.getLogger(__name__)

#: 4-class Kaggle/OASIS labels -> the binary task.
DEFAULT_LABEL_MAP = {
    "NonDemented": "NonDemented",
    "VeryMildDemented": "Demented",
    "MildDemented": "Demented",
    "ModerateDemented": "Demented",
}

_CHAIN = "inv+open+clahe"
_SMOOTHING = ("average", "median", "gaussian")


def _full_grid() -> list[str]:
    tails = [""] + [f"+{m}11{merge}" for m in _SMOOTHING
                    for merge in ("", "+overlap4/-4", "+overlap3/-3", "+overlap2/-2", "+overlap1/-1", "+multiply")]
    out = []
    for inv, opening, clahe in itertools.product((False, True), repeat=3):
        head = "+".join(s for s, on in (("inv", inv), ("open", opening), ("clahe", clahe)) if on)
        for tail in tails:
            tag = (head + tail).lstrip("+")
            out.append(tag or "none")
    return out


#: Named grids of ``--grid``.
GRIDS: dict[str, list[str]] = {
    # two combinations: smoke tests
    "tiny": ["none", "clahe"],
    # each step alone, the chain, then the chain + every smoothing with the strongest/weakest overlap and multiply
    "steps": ["none", "inv", "open", "clahe", _CHAIN]
    + [f"{_CHAIN}+{m}11+{merge}" for m in _SMOOTHING for merge in ("overlap4/-4", "overlap1/-1", "multiply")],
    # the merge study of the reference: chain + each smoothing x every overlap weight and multiply
    "merges": [_CHAIN]
    + [f"{_CHAIN}+{m}11+{merge}" for m in _SMOOTHING
       for merge in ("overlap4/-4", "overlap3/-3", "overlap2/-2", "overlap1/-1", "multiply")],
    # full factorial: invert x opening x CLAHE x (no smoothing | smoothing x (replace | 4 overlaps | multiply))
    "full": _full_grid(),
}

_STEP_RE = re.compile(r"^(average|median|gaussian)(\d+)$")
_OVERLAP_RE = re.compile(r"^overlap(-?\d+(?:\.\d+)?)/(-?\d+(?:\.\d+)?)$")


def combo_kwargs(tag: str) -> dict[str, Any]:
    """``EnhancementPipeline`` keyword arguments (config-ready: plain values / ``_target_`` dicts) of a tag.

    Raises:
        ValueError: unknown step, a step twice, steps out of the pipeline order, or a merge without smoothing.
    """
    tag = str(tag).strip()
    if tag in ("", "none"):
        return {}
    kw: dict[str, Any] = {}
    order = {"inv": 0, "open": 1, "clahe": 2, "smooth": 3, "merge": 4}
    last = -1
    for step in tag.split("+"):
        m_s, m_o = _STEP_RE.match(step), _OVERLAP_RE.match(step)
        if step == "inv":
            key, value = "invert", True
        elif step == "open":
            key, value = "opening", True
        elif step == "clahe":
            key, value = "clahe", True
        elif m_s:
            k = int(m_s.group(2))
            if k < 1 or k % 2 == 0:
                raise ValueError(f"combination {tag!r}: kernel of {step!r} must be odd and >= 1")
            key = "smoothing"
            value = m_s.group(1) if k == 11 else {"_target_": "transforms.enhance.Smooth", "method": m_s.group(1),
                                                  "kernel_size": k}
        elif m_o:
            key, value = "merge", "overlap"
            kw["merge_weights"] = [float(m_o.group(1)), float(m_o.group(2))]
        elif step == "multiply":
            key, value = "merge", "multiply"
        else:
            raise ValueError(
                f"combination {tag!r}: unknown step {step!r}; steps: inv, open, clahe, average|median|gaussian<k>, "
                "overlap<w1>/<w2>, multiply (or 'none')"
            )
        pos = order["smooth" if key == "smoothing" else "merge" if key == "merge" else step]
        if key in kw or pos <= last:
            raise ValueError(f"combination {tag!r}: step {step!r} repeated or out of order "
                             "(order: inv, open, clahe, smoothing, merge)")
        last = pos
        kw[key] = value
    if "merge" in kw and "smoothing" not in kw:
        raise ValueError(f"combination {tag!r}: a merge needs a smoothing step before it")
    return kw


def combo_tag(kwargs: Mapping[str, Any]) -> str:
    """The canonical tag of ``EnhancementPipeline(**kwargs)`` (round trip of :func:`combo_kwargs`)."""
    from transforms.enhance import EnhancementPipeline, Smooth

    kw = dict(kwargs)
    sm = kw.get("smoothing")
    if isinstance(sm, Mapping):
        kw["smoothing"] = Smooth(method=sm["method"], kernel_size=sm.get("kernel_size", 11))
    return EnhancementPipeline(**kw).tag


def grid_combos(grid: str | None = None, combos: Sequence[str] | None = None) -> list[str]:
    """Canonical tags of a named grid and/or explicit combinations (duplicates dropped, order kept).

    Raises:
        ValueError: unknown grid name or an invalid combination.
    """
    tags: list[str] = []
    if grid:
        if grid not in GRIDS:
            raise ValueError(f"unknown grid {grid!r}; choose one of {sorted(GRIDS)}")
        tags += GRIDS[grid]
    tags += list(combos or [])
    if not tags:
        raise ValueError("no combinations: give --grid and/or --combos")
    out: list[str] = []
    for t in tags:
        canon = combo_tag(combo_kwargs(t))
        if canon not in out:
            out.append(canon)
    return out


# ------------------------------------------------------------------------------------------------ bundle data


def binary_data(
    label_map: Mapping[str, str] | None = None,
    class_names: Sequence[str] = ("NonDemented", "Demented"),
    **prepare_kwargs: Any,
) -> dict:
    """:func:`pipelines.training.data.prepare_data` on the source classes, with labels mapped to the binary task.

    The split is made on the source (4-class) labels, per subject, so each split keeps every severity; then
    ``label`` becomes the index of ``label_map[source label]`` in ``class_names`` and ``source_label`` keeps
    the original class name.

    Args:
        label_map: source class -> binary class (default: NonDemented vs the three demented stages).
        class_names: binary classes in output order (index 1 is the positive class of sensitivity / AUC).
        prepare_kwargs: passed to ``prepare_data`` (``dataset_dir``, ``manifest``, ``output_dir``, ...).

    Raises:
        ValueError: a mapped class not in ``class_names``.
    """
    from pipelines.training.data import prepare_data

    label_map = dict(label_map or DEFAULT_LABEL_MAP)
    bad = sorted(set(label_map.values()) - set(class_names))
    if bad:
        raise ValueError(f"label_map maps to {bad}, which are not in class_names {list(class_names)}")
    sources = list(label_map)
    data = prepare_data(class_names=sources, **prepare_kwargs)
    index = {src: list(class_names).index(dst) for src, dst in label_map.items()}
    for split in ("train", "val", "test"):
        for rec in data[split]:
            rec["source_label"] = sources[rec["label"]]
            rec["label"] = index[rec["source_label"]]
    data["binary_counts"] = {
        split: {c: sum(1 for r in data[split] if r["label"] == i) for i, c in enumerate(class_names)}
        for split in ("train", "val", "test")
    }
    logger.info("binary counts per split: %s", data["binary_counts"])
    return data


# ------------------------------------------------------------------------------------------------ sweep


def _row_from_eval(metrics_json: Path, positive: str) -> dict[str, Any]:
    res = json.loads(metrics_json.read_text())
    m, ci = res["metrics"], res["ci"]
    row: dict[str, Any] = {"n_test": res.get("n_samples")}
    for col, key in (("sensitivity", f"recall/{positive}"), ("specificity", f"specificity/{positive}"),
                     ("accuracy", "accuracy"), ("auc", "macro_auc")):
        lo, hi = ci.get(key, [math.nan, math.nan])
        row[col] = m.get(key, math.nan)
        row[f"{col}_ci_low"] = math.nan if lo is None else lo
        row[f"{col}_ci_high"] = math.nan if hi is None else hi
    return row


def _fmt(v: Any, lo: Any, hi: Any) -> str:
    try:
        v, lo, hi = float(v), float(lo), float(hi)
    except (TypeError, ValueError):
        return "–"
    if not math.isfinite(v):
        return "–"
    return f"{v:.3f} [{lo:.3f}, {hi:.3f}]" if math.isfinite(lo) else f"{v:.3f}"


def _count(v: Any) -> str:
    try:
        return str(int(v))
    except (TypeError, ValueError):
        return "–"


def sweep_markdown(table: Any, title: str, notes: Sequence[str] = ()) -> str:
    """Markdown of a sweep table: one row per combination, metrics as ``value [CI]``."""
    lines = [f"# {title}", ""] + [f"- {n}" for n in notes] + ([""] if notes else [])
    lines += ["| combination | status | sensitivity | specificity | accuracy | AUC | test images | wall (s) |",
              "|---|---|---|---|---|---|---|---|"]
    for r in table.to_dict(orient="records"):
        cells = [f"`{r['combination']}`", r["status"]] + [
            _fmt(r.get(c), r.get(f"{c}_ci_low"), r.get(f"{c}_ci_high"))
            for c in ("sensitivity", "specificity", "accuracy", "auc")
        ] + [_count(r.get("n_test")), f"{r['wall_s']:.0f}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def run_sweep(
    combos: Sequence[str],
    out_dir: str | os.PathLike,
    bundle: str = "alz_binary",
    overrides: Mapping[str, Any] | None = None,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    parent_run_name: str | None = None,
    grid_name: str = "custom",
) -> dict[str, Any]:
    """Train and evaluate one child run per combination under one MLflow parent run; write the table.

    Args:
        combos: combination tags (see :func:`combo_kwargs`).
        out_dir: folder for the table (``sweep.csv``, ``sweep.md``) and the per-combination outputs
            (``<i>_<tag>/{train,models,eval}``).
        bundle: bundle name under ``bundles/`` or a bundle folder (needs the ``enhancement`` config id).
        overrides: config-id overrides for every child (e.g. ``{"epochs": 1, "image_size": 64}``).
        tracking_uri: MLflow store (default ``$MLFLOW_TRACKING_URI`` or the repository store); exported to
            ``MLFLOW_TRACKING_URI`` for the children.
        experiment: MLflow experiment (default: the bundle name).
        parent_run_name: name of the parent run (default ``<bundle>-sweep-<time>``).
        grid_name: recorded as a parameter.

    Returns:
        ``{"parent_run_id", "child_run_ids", "table" (DataFrame), "paths"}``.
    """
    from pipelines.tracking import default_tracking_uri

    root = bundle_root(bundle, required=None)
    train_files = config_files(root, "train.json")
    eval_files = config_files(root, "train.json", "evaluate.json")
    meta_file = str(root / "configs" / "metadata.json")
    tags = [combo_tag(combo_kwargs(t)) for t in combos]  # fail on a bad combination before any run
    if not tags:
        raise ValueError("no combinations to run")
    uri = tracking_uri or default_tracking_uri()
    from pipelines.tracking import tracking_store

    with tracking_store(uri):
        return _sweep(root, tags, Path(out_dir), uri, experiment or root.name, parent_run_name, dict(overrides or {}),
                      grid_name, train_files, eval_files, meta_file)


def _sweep(root: Path, tags: list[str], out: Path, uri: str, experiment: str, parent_run_name: str | None,
           overrides: dict[str, Any], grid_name: str, train_files: list[str], eval_files: list[str],
           meta_file: str) -> dict[str, Any]:
    import mlflow
    import pandas as pd
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    from pipelines.evaluation.report import atomic_write_csv, atomic_write_text
    from pipelines.tracking import experiment_id, git_commit

    client = MlflowClient(tracking_uri=uri)
    exp_id = experiment_id(client, experiment, uri)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    parent_name = parent_run_name or f"{root.name}-sweep-{stamp}"
    parent = client.create_run(exp_id, run_name=parent_name, tags={"stage": "sweep", "bundle": root.name,
                                                                    "grid": grid_name})
    pid = parent.info.run_id
    client.log_batch(pid, params=[
        Param("grid", grid_name), Param("n_combinations", str(len(tags))),
        Param("combinations", json.dumps(tags)[:6000]),
        Param("overrides", json.dumps(overrides, default=str)[:6000]), Param("git_commit", git_commit()),
    ])
    out.mkdir(parents=True, exist_ok=True)
    positive = "Demented"
    rows, child_ids = [], []
    try:
        for i, tag in enumerate(progress_bar(tags, desc=f"sweep {root.name}", unit="combination")):
            kw = combo_kwargs(tag)
            child_name = f"{parent_name}/{tag}"
            work = out / f"{i:02d}_{re.sub(r'[^A-Za-z0-9_.-]', '_', tag)}"
            common = {**overrides, "enhancement": kw, "experiment_name": experiment, "tracking_uri": uri,
                      "run_name": child_name, "output_dir": str(work / "train"), "ckpt_dir": str(work / "models")}
            row: dict[str, Any] = {"combination": tag, "status": "FAILED", "run_id": None}
            t0 = time.time()
            cid = None
            try:
                try:
                    # the bundle's MLflow handler opens the training run under child_name ...
                    run_workflow(train_files, meta_file, common)
                finally:
                    # ... which becomes a child of the parent (even when training failed)
                    cid = _child_run(client, exp_id, child_name, pid, tag, root.name)
                positive = _positive_class(root, overrides)
                # evaluation logs into the same run: the handler uses the active run
                with mlflow.start_run(run_id=cid):
                    run_workflow(eval_files, meta_file, {**common, "eval_dir": str(work / "eval"),
                                                         "ckpt_path": str(work / "models" / "model.pt")})
                row.update(_row_from_eval(work / "eval" / "metrics.json", positive))
                row["status"] = "FINISHED"
            except Exception as e:  # one failed combination must not stop the sweep
                logger.exception("combination %s failed", tag)
                row["error"] = f"{type(e).__name__}: {e}"[:500]
                if cid is not None:
                    client.set_terminated(cid, status="FAILED")
            row["run_id"] = cid
            child_ids.append(cid)
            row["wall_s"] = round(time.time() - t0, 1)
            if cid is not None:
                client.log_metric(cid, "wall_s", row["wall_s"])
            rows.append(row)
            logger.info("[%d/%d] %s: %s in %.0f s", i + 1, len(tags), tag, row["status"], row["wall_s"])
        table = pd.DataFrame(rows)
        for col in ("sensitivity", "specificity", "accuracy", "auc"):
            for suffix in ("", "_ci_low", "_ci_high"):
                if col + suffix not in table.columns:
                    table[col + suffix] = math.nan
        if "n_test" not in table.columns:
            table["n_test"] = math.nan
        cols = ["combination", "status", "n_test"] + [c + s for c in ("sensitivity", "specificity", "accuracy", "auc")
                                                      for s in ("", "_ci_low", "_ci_high")] + ["wall_s", "run_id"]
        table = table[cols + [c for c in table.columns if c not in cols]]
        notes = [f"bundle `{root.name}`, grid `{grid_name}`, {len(tags)} combination(s); positive class "
                 f"`{positive}`; test split; 95 % stratified-bootstrap CIs",
                 f"overrides: `{json.dumps(overrides, default=str)}`",
                 f"MLflow parent run `{pid}` ({parent_name}) in experiment `{experiment}`"]
        md = sweep_markdown(table, f"Enhancement sweep: {root.name}", notes)
        paths = {"csv": atomic_write_csv(out / "sweep.csv", table), "markdown": atomic_write_text(out / "sweep.md", md)}
        for p in paths.values():
            client.log_artifact(pid, str(p))
        done = table[table["status"] == "FINISHED"]
        client.log_metric(pid, "n_finished", float(len(done)))
        if len(done) and done["auc"].notna().any():
            best = done.loc[done["auc"].idxmax()]
            client.log_metric(pid, "best_auc", float(best["auc"]))
            client.set_tag(pid, "best_combination", str(best["combination"]))
        client.set_terminated(pid, status="FINISHED" if len(done) else "FAILED")
    except BaseException:
        client.set_terminated(pid, status="FAILED")
        raise
    print(md)
    return {"parent_run_id": pid, "child_run_ids": child_ids, "table": table, "paths": paths}


def _child_run(client: Any, exp_id: str, name: str, parent_id: str, tag: str, bundle: str) -> str:
    """Id of the newest run named ``name`` (created FAILED when the bundle never opened one), tagged as a child
    of ``parent_id`` (``mlflow.parentRunId``: the MLflow UI nests it under the parent)."""
    safe = name.replace("'", "\\'")
    runs = client.search_runs([exp_id], filter_string=f"attributes.run_name = '{safe}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if runs:
        cid = runs[0].info.run_id
    else:
        cid = client.create_run(exp_id, run_name=name).info.run_id
        client.set_terminated(cid, status="FAILED")
    for key, value in (("mlflow.parentRunId", parent_id), ("enhancement", tag), ("stage", "sweep-child"),
                       ("bundle", bundle)):
        client.set_tag(cid, key, value)
    return cid


def _positive_class(root: Path, overrides: Mapping[str, Any]) -> str:
    names = overrides.get("class_names")
    if names is None:
        names = read_config(root / "configs" / "train.json").get("class_names")
    return str(list(names)[1])


# ------------------------------------------------------------------------------------------------ CLI


def _main(args: argparse.Namespace) -> int:
    try:
        if args.list:
            for name, tags in GRIDS.items():
                print(f"{name} ({len(tags)}): {', '.join(tags)}")
            return 0
        # --combos alone runs only those; --grid with --combos runs both
        combos = grid_combos(args.grid if (args.grid_given or not args.combos) else None, args.combos)
        overrides: dict[str, Any] = {
            "epochs": args.epochs,
            "learning_rate": args.learning_rate,
            "image_size": args.image_size,
            "batch_size": args.batch_size,
            "network_name": args.network,
            "network_params": ast.literal_eval(args.network_params),
            "num_workers": args.num_workers,
            "n_bootstrap": args.n_bootstrap,
            "seed": args.seed,
        }
        if args.max_per_split:
            overrides["max_per_split"] = args.max_per_split
        if args.dataset_dir:
            overrides["dataset_dir"] = str(Path(args.dataset_dir).resolve())
        if args.manifest:
            overrides["manifest"] = str(Path(args.manifest).resolve())
        overrides.update(parse_overrides(args.override))
        out = args.out or Path("outputs") / "enhance_sweep" / time.strftime("%Y%m%d-%H%M%S")
        result = run_sweep(combos, out, args.bundle, overrides, args.tracking_uri, args.experiment,
                           grid_name=args.grid if args.grid_given or not args.combos else "custom")
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    failed = int((result["table"]["status"] != "FINISHED").sum())
    print(f"parent run {result['parent_run_id']}: {len(result['child_run_ids'])} child run(s), {failed} failed; "
          f"table {result['paths']['markdown']}")
    return 1 if failed else 0


class _GridAction(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):  # noqa: D102
        setattr(namespace, self.dest, values)
        namespace.grid_given = True


def register(subparsers: Any) -> None:
    """Add ``enhance-sweep`` to ``python -m pipelines``."""
    p = subparsers.add_parser(
        "enhance-sweep",
        help="train+evaluate the binary Alzheimer bundle for each enhancement combination (MLflow child runs)",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--grid", default="steps", action=_GridAction,
                   help=f"named grid: {', '.join(f'{k} ({len(v)})' for k, v in GRIDS.items())} (default steps; "
                        "with --combos only those unless --grid is given too)")
    p.add_argument("--combos", nargs="+", metavar="TAG", help="explicit combinations, e.g. none clahe "
                   "inv+open+clahe+median11+overlap4/-4")
    p.add_argument("--list", action="store_true", help="list the named grids and exit")
    p.add_argument("--bundle", default="alz_binary", help="bundle name or folder (default alz_binary)")
    p.add_argument("--dataset-dir", help="class-folder tree (default: the bundle's, the Alzheimer phantom)")
    p.add_argument("--manifest", help="manifest CSV instead of --dataset-dir")
    p.add_argument("--epochs", type=int, default=6, help="epochs per combination (default 6: a CPU setting)")
    p.add_argument("--learning-rate", type=float, default=0.001,
                   help="AdamW learning rate (default 1e-3 for the short CPU runs; the bundle's own default is 3e-4)")
    p.add_argument("--image-size", type=int, default=64, help="resize after enhancement (default 64; reference 256)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--network", default="resnet18", help="pipelines.networks.cnn name (default resnet18)")
    p.add_argument("--network-params", default="{'widen_factor': 0.25}",
                   help="extra build_classifier kwargs as a Python dict (default {'widen_factor': 0.25}: a small "
                        "ResNet-18; '{}' for the full width)")
    p.add_argument("--max-per-split", type=int, help="cap images per split (smoke runs)")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--n-bootstrap", type=int, default=1000, help="bootstrap resamples of the CIs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--override", action="append", metavar="ID=VALUE", help="any other config-id override")
    p.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI or <repo>/mlruns/mlflow.db)")
    p.add_argument("--experiment", help="MLflow experiment (default: the bundle name)")
    p.add_argument("--out", type=Path, help="output folder (default outputs/enhance_sweep/<time>)")
    add_quiet_argument(p)
    p.set_defaults(func=_main, grid_given=False)
