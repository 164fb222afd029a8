"""Quality harness: a bundle's recipe(s) against the plain loop, on the same test images, over several seeds.

``python -m pipelines benchmark-quality --bundle alz_hybrid --dataset-dir ../shared/data/alzheimer_mri_4class
--seeds 0 1 2 --budget-min 8`` runs, for each seed,

- the plain loop (``benchmarks/bench_plain_loop.py``: MONAI ResNet-18, Adam, hflip) for ``--budget-min`` CPU
  minutes of training, and
- each requested recipe of the bundle (``base`` = ``train.json`` as shipped, or a network overlay
  ``configs/<name>.json``, with ``--override`` config ids) through the real ``python -m monai.bundle run``,

each as its own subprocess with ``--threads`` torch/OpenMP threads (``--jobs`` of them at a time), and measures
the CPU time of every training subprocess (``os.wait4``: the process and the workers it waited for). Every
trained model then scores the data set's test folder (the bundle's ``test`` split: the same images the plain
loop scores, checked by path), and the harness writes

- ``runs.csv``: one row per (recipe, seed): CPU minutes, images/s, epochs, every metric with its 95 % CI;
- ``summary.csv`` / ``summary.md``: per recipe the mean and standard deviation over seeds, and the paired
  bootstrap difference to the plain loop (the same resampled test images for every run, metrics averaged over
  seeds within each arm) with its 95 % CI and the fraction of resamples where the recipe is not better;
- one MLflow parent run (experiment ``<bundle>-quality``) with a child run per (recipe, seed).

CPU time is the honest budget on a shared CPU: wall time depends on what else runs. The bundle's CPU time covers
its whole training process (data loading and checks, per-epoch validation, checkpointing), the plain loop's only
its training loop, so the comparison favours the plain loop. Test scoring is not counted for either.
A data set without its own test folder (the head-CT PNG set) is cross-validated with ``--folds K``: every
(recipe, seed) trains K times with the bundle's ``num_folds``/``fold`` config ids, the plain loop trains on the
same folds (a ``split.csv`` written from the bundle's own subject-grouped split: it trains on the bundle's train
and validation rows, scores its test rows), and the out-of-fold probabilities of the K folds are pooled, so every
image is scored once per seed; CIs and paired differences then resample subjects (the split's ``subject_id``).

Runs already complete in ``--out-dir`` (``run.json`` present, made by the same command) are reused, so seeds and
recipes can be added later; a recipe folder that is a symlink (e.g. ``plain_loop`` -> another study's) shares
that folder's runs, so a budget curve does not retrain the plain loop.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from pipelines.tracking.progress import PROGRESS_ENV, add_quiet_argument, progress_bar

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
PLAIN = "plain_loop"
METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auc")
__all__ = ["Job", "plan_jobs", "run_job", "summarise", "benchmark_quality", "register"]


@dataclass
class Job:
    """One training run: the plain loop or a bundle recipe, for one seed."""

    recipe: str
    seed: int
    out_dir: Path
    cmd: list[str] = field(default_factory=list)
    config_files: list[str] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)
    fold: int | None = None

    @property
    def probs_csv(self) -> Path:
        return self.out_dir / "test_probabilities.csv"

    @property
    def record(self) -> Path:
        return self.out_dir / "run.json"


def _child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    # the run writes to train.log: no progress bars in it, even under NEURO_PROGRESS=force
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1",
                PROGRESS_ENV: "0"})
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def plan_jobs(bundle: str, dataset_dir: str | os.PathLike, recipes: Sequence[str], seeds: Sequence[int],
              budget_min: float, out_dir: str | os.PathLike, overrides: Mapping[str, Any] | None = None,
              plain_image_size: int = 128, threads: int = 1, experiment: str | None = None,
              python: str = sys.executable, folds: int = 0,
              class_names: Sequence[str] | None = None) -> list[Job]:
    """The commands of every (recipe, seed[, fold]) run; ``recipes`` may include :data:`PLAIN`. With ``folds``
    the plain loop reads ``<job>/split.csv`` (written by :func:`run_job` from the bundle's split of that fold)."""
    from pipelines.bundles import bundle_commands, bundle_dir, config_files

    out = Path(out_dir).resolve()
    data = str(Path(dataset_dir).resolve())
    jobs: list[Job] = []
    for recipe in recipes:
        for seed in seeds:
            for fold in (range(folds) if folds else [None]):
                job_dir = (out / recipe).resolve() / f"seed{seed}"  # a symlinked recipe folder shares its runs
                ids = {"dataset_dir": data, "seed": seed, **dict(overrides or {})}
                if fold is not None:
                    job_dir, ids = job_dir / f"fold{fold}", {**ids, "num_folds": folds, "fold": fold}
                ids.update(output_dir=str(job_dir / "train"), ckpt_dir=str(job_dir / "models"))
                if recipe == PLAIN:
                    source = ["--data-dir", data] if fold is None else \
                        ["--split-csv", str(job_dir / "split.csv"), "--class-names", *map(str, class_names or [])]
                    cmd = [python, str(REPO_ROOT / "benchmarks" / "bench_plain_loop.py"), *source,
                           "--budget-min", str(budget_min), "--seed", str(seed), "--threads", str(threads),
                           "--image-size", str(plain_image_size), "--n-bootstrap", "0",
                           "--out", str(job_dir / "plain.json"), "--probs-out", str(job_dir / "test_probabilities.csv")]
                    files = config_files(bundle, "train.json") if fold is not None else []
                    jobs.append(Job(recipe, seed, job_dir, cmd, files, ids if fold is not None else {}, fold))
                    continue
                cmds = bundle_commands(bundle_dir(bundle), recipe, f"quality-seed{seed}", experiment or bundle,
                                       {k: v if isinstance(v, str) else json.dumps(v) for k, v in ids.items()},
                                       python=python)
                files = json.loads(cmds["train"][cmds["train"].index("--config_file") + 1].replace("'", '"'))
                jobs.append(Job(recipe, seed, job_dir, cmds["train"], files, ids, fold))
    return jobs


def _wait_cpu_s(proc: subprocess.Popen) -> tuple[int, float]:
    """Wait for ``proc``; its exit code and the CPU seconds (user + system) of it and its reaped children."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_utime + usage.ru_stime


def _bundle_parser(config_files: Sequence[str], overrides: Mapping[str, Any], scratch: str) -> Any:
    """The bundle's config with ``overrides``, on the CPU, writing its data records under ``<output_dir>/../scratch``."""
    from pipelines.bundles import read_config

    parser = read_config(list(config_files), {k: v for k, v in overrides.items() if k != "output_dir"})
    parser["output_dir"] = str(Path(str(overrides.get("output_dir", "."))).parent / scratch)
    parser["device"] = "$torch.device('cpu')"
    return parser


def write_fold_split(job: Job) -> Path:
    """``<job>/split.csv`` for the plain loop: the bundle's own split of ``job.fold`` (image, label, split, subject_id);
    the bundle's train and validation rows are the plain loop's training rows."""
    from pipelines.evaluation.report import atomic_write_csv

    data = _bundle_parser(job.config_files, job.overrides, "split").get_parsed_content("data")
    rows = [{"image": str(Path(r["image"]).resolve()), "label": int(r["label"]),
             "split": "test" if part == "test" else "train", "subject_id": str(r.get("subject_id", ""))}
            for part in ("train", "val", "test") for r in data[part]]
    path = job.out_dir / "split.csv"
    job.out_dir.mkdir(parents=True, exist_ok=True)
    return atomic_write_csv(path, pd.DataFrame(rows))


def bundle_test_probabilities(config_files: Sequence[str], overrides: Mapping[str, Any],
                              ckpt: str | os.PathLike) -> tuple[list[str], np.ndarray, np.ndarray, list[str]]:
    """Score the bundle's ``test`` split with a checkpoint: (image paths, labels, probabilities, class names).

    Uses the bundle's own ``data``, ``validate#preprocessing`` and ``network_def`` (so the preprocessing is the
    one the recipe validated with), on the CPU, one image batch at a time; weights load with ``weights_only``.
    """
    import torch

    parser = _bundle_parser(config_files, overrides, "score")
    data = parser.get_parsed_content("data")
    records = data["test"]
    if not records:
        raise ValueError(f"{config_files}: the bundle's data has no test split to score")
    names = [str(c) for c in parser.get_parsed_content("class_names")]
    net = parser.get_parsed_content("network_def")
    state = torch.load(str(ckpt), map_location="cpu", weights_only=True)
    net.load_state_dict(state["model"] if "model" in state else state)
    net.eval()
    pre = parser.get_parsed_content("validate#preprocessing")
    probs: list[np.ndarray] = []
    with torch.no_grad():
        for i in range(0, len(records), 32):
            batch = [pre(dict(r)) for r in records[i:i + 32]]
            x = torch.stack([torch.as_tensor(b["image"]) for b in batch]).float()
            probs.append(torch.softmax(net(x), dim=1).numpy())
    paths = [str(Path(r["image"]).resolve()) for r in records]
    labels = np.array([int(r["label"]) for r in records])
    return paths, labels, np.concatenate(probs), names


def _bundle_epochs_images(job: Job) -> tuple[int, int]:
    """(epochs, training images seen) from the bundle's executed config and split record."""
    cfg_path = job.out_dir / "train" / "config_executed.json"
    split_path = job.out_dir / "train" / "data" / "split.json"
    epochs = batch = n_train = 0
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        epochs, batch = int(cfg.get("epochs", 0)), int(cfg.get("batch_size", 0))
    if split_path.is_file():
        split = json.loads(split_path.read_text())
        counts = split.get("counts", {}).get("train", {})
        n_train = int(counts.get("images", 0)) if isinstance(counts, dict) else 0
    steps = n_train // batch if batch and n_train > batch else (1 if n_train else 0)
    return epochs, epochs * steps * batch if batch else 0


def _same_command(a: Sequence[str], b: Sequence[str]) -> bool:
    """The same program with the same ``--option value`` pairs, in any order (config-id order does not matter)."""

    def parts(cmd: Sequence[str]) -> tuple[list[str], dict[str, tuple[str, ...]]]:
        cmd = list(cmd)
        i = next((k for k, c in enumerate(cmd) if c.startswith("--")), len(cmd))
        opts: dict[str, list[str]] = {}
        key = None
        for c in cmd[i:]:
            if c.startswith("--"):
                key = c
                opts.setdefault(key, [])
            elif key is not None:
                opts[key].append(c)
        return cmd[:i], {k: tuple(v) for k, v in opts.items()}

    return list(a) == list(b) or parts(a) == parts(b)


def run_job(job: Job, threads: int = 1, reuse: bool = True) -> dict[str, Any]:
    """Train (unless a finished record exists and ``reuse``), score the test folder, write ``run.json``."""
    if reuse and job.record.is_file() and job.probs_csv.is_file():
        record = json.loads(job.record.read_text())
        if _same_command(record.get("command") or [], job.cmd):
            logger.info("%s seed %d: reusing %s", job.recipe, job.seed, job.record)
            return record
        logger.warning("%s seed %d: %s was made by another command (other overrides or budget); training again",
                       job.recipe, job.seed, job.record)
    job.out_dir.mkdir(parents=True, exist_ok=True)
    if job.recipe == PLAIN and job.fold is not None:
        write_fold_split(job)
    log_path = job.out_dir / "train.log"
    logger.info("%s seed %d: %s (log %s)", job.recipe, job.seed, " ".join(shlex.quote(c) for c in job.cmd), log_path)
    wall0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(job.cmd, stdout=log, stderr=subprocess.STDOUT, env=_child_env(threads),
                                cwd=str(REPO_ROOT))
        code, cpu_s = _wait_cpu_s(proc)
    wall_s = time.time() - wall0
    if code != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-15:]
        raise RuntimeError(f"{job.recipe} seed {job.seed} failed (exit {code}); last lines of {log_path}:\n"
                           + "\n".join(tail))
    record: dict[str, Any] = {"recipe": job.recipe, "seed": job.seed, "cpu_s": cpu_s, "wall_s": wall_s,
                              "threads": threads, "command": job.cmd}
    if job.recipe == PLAIN:
        plain = json.loads((job.out_dir / "plain.json").read_text())
        record.update(epochs=plain["epochs"], train_images=plain.get("train_images", 0),
                      train_cpu_s=plain["cpu_s"])
    else:
        from pipelines.evaluation.report import write_probabilities

        paths, labels, probs, names = bundle_test_probabilities(job.config_files, job.overrides,
                                                                job.out_dir / "models" / "model.pt")
        write_probabilities(job.probs_csv, paths, labels, probs, names)
        epochs, images = _bundle_epochs_images(job)
        record.update(epochs=epochs, train_images=images, train_cpu_s=cpu_s)
    record["images_per_s"] = record["train_images"] / record["train_cpu_s"] if record["train_cpu_s"] else float("nan")
    tmp = job.record.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(job.record)
    return record


def pool_folds(jobs: Sequence[Job], records: Sequence[Mapping[str, Any]], class_names: Sequence[str]
               ) -> tuple[list[Job], list[dict[str, Any]], dict[str, str]]:
    """Pool the folds of each (recipe, seed): its out-of-fold probabilities (``<seed dir>/test_probabilities.csv``,
    each image once), summed CPU/wall time and images, mean epochs; and image -> subject from the folds' splits.

    Raises ValueError when a (recipe, seed) scored an image twice (folds that overlap)."""
    from pipelines.evaluation.report import read_probabilities, write_probabilities

    pooled_jobs, pooled_records, groups = [], [], {}
    keys = list(dict.fromkeys((j.recipe, j.seed) for j in jobs))
    for recipe, seed in keys:
        parts = [(j, r) for j, r in zip(jobs, records) if (j.recipe, j.seed) == (recipe, seed)]
        frames = [read_probabilities(j.probs_csv, class_names) for j, _ in parts]
        df = pd.concat(frames, ignore_index=True).sort_values("image", kind="stable")
        if df["image"].duplicated().any():
            raise ValueError(f"{recipe} seed {seed}: folds score the same image twice, e.g. "
                             f"{df.loc[df['image'].duplicated(), 'image'].iloc[0]}")
        seed_dir = parts[0][0].out_dir.parent
        write_probabilities(seed_dir / "test_probabilities.csv", df["image"].tolist(), df["label"].to_numpy(),
                            df[[f"prob_{c}" for c in class_names]].to_numpy(), class_names)
        pooled_jobs.append(Job(recipe, seed, seed_dir))
        rec = {k: sum(float(r[k]) for _, r in parts) for k in ("cpu_s", "wall_s", "train_images", "train_cpu_s")}
        rec.update(recipe=recipe, seed=seed, threads=parts[0][1]["threads"], folds=len(parts),
                   epochs=float(np.mean([r["epochs"] for _, r in parts])))
        rec["images_per_s"] = rec["train_images"] / rec["train_cpu_s"] if rec["train_cpu_s"] else float("nan")
        pooled_records.append(rec)
        for j, _ in parts:
            split = j.out_dir / "split.csv"
            if split.is_file():
                s = pd.read_csv(split, dtype={"image": str, "subject_id": str})
                groups.update(zip(s["image"], s["subject_id"].fillna("")))
    return pooled_jobs, pooled_records, groups


def _aligned(jobs: Sequence[Job], class_names: Sequence[str]) -> tuple[list[str], np.ndarray, dict[str, list[np.ndarray]]]:
    """Probabilities of every job on the same images in the same order; refuses mismatched test sets."""
    from pipelines.evaluation.report import read_probabilities

    images: list[str] | None = None
    labels: np.ndarray | None = None
    probs: dict[str, list[np.ndarray]] = {}
    cols = [f"prob_{c}" for c in class_names]
    for job in jobs:
        df = read_probabilities(job.probs_csv, class_names)
        if images is None:
            images, labels = df["image"].tolist(), df["label"].to_numpy()
        elif df["image"].tolist() != images:
            diff = sorted(set(df["image"]) ^ set(images))
            raise ValueError(f"{job.probs_csv}: scored {len(df)} test images, not the same {len(images)} images as "
                             f"{jobs[0].probs_csv} (e.g. {diff[:2]}); the recipes must score the same test folder")
        elif not np.array_equal(df["label"].to_numpy(), labels):
            raise ValueError(f"{job.probs_csv}: labels differ from {jobs[0].probs_csv} on the same images")
        probs.setdefault(job.recipe, []).append(df[cols].to_numpy())
    assert images is not None and labels is not None
    return images, labels, probs


def summarise(jobs: Sequence[Job], records: Sequence[Mapping[str, Any]], class_names: Sequence[str],
              n_bootstrap: int = 2000, seed: int = 0,
              groups: Mapping[str, str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-run table (metrics with 95 % CIs) and per-recipe summary with paired differences to the plain loop.
    With ``groups`` (image -> subject id) the bootstraps resample subjects, not images."""
    from pipelines.evaluation.metrics import evaluate_predictions, paired_difference_ci

    images, labels, probs = _aligned(jobs, class_names)
    by = None
    if groups:
        missing = [i for i in images if not groups.get(i)]
        if missing:
            raise ValueError(f"no subject id for {len(missing)} test images, e.g. {missing[0]}")
        by = [groups[i] for i in images]
    rows = []
    for job, rec in zip(jobs, records):
        k = [j for j in jobs if j.recipe == job.recipe].index(job)
        res = evaluate_predictions(labels, probs[job.recipe][k], class_names, n_resamples=n_bootstrap, seed=seed,
                                   groups=by)
        row = {"recipe": job.recipe, "seed": job.seed, "cpu_min": rec["cpu_s"] / 60.0,
               "train_cpu_min": rec["train_cpu_s"] / 60.0, "wall_min": rec["wall_s"] / 60.0,
               "epochs": rec["epochs"], "images_per_s": rec["images_per_s"], "n_test": len(images)}
        for m in METRICS:
            row[m] = res["metrics"][m]
            row[f"{m}_ci_low"], row[f"{m}_ci_high"] = res["ci"][m]
        rows.append(row)
    runs = pd.DataFrame(rows)
    summary = []
    plain_cpu = runs.loc[runs["recipe"] == PLAIN, "cpu_min"].mean() if PLAIN in probs else float("nan")
    for recipe, group in runs.groupby("recipe", sort=False):
        row = {"recipe": recipe, "seeds": len(group), "cpu_min": group["cpu_min"].mean(),
               "cpu_ratio_to_plain": group["cpu_min"].mean() / plain_cpu if plain_cpu == plain_cpu else float("nan"),
               "images_per_s": group["images_per_s"].mean(), "epochs": group["epochs"].mean()}
        for m in METRICS:
            row[f"{m}_mean"], row[f"{m}_sd"] = group[m].mean(), group[m].std(ddof=1) if len(group) > 1 else 0.0
        if recipe != PLAIN and PLAIN in probs:
            diff = paired_difference_ci(labels, probs[recipe], probs[PLAIN], class_names, metrics=METRICS,
                                        n_resamples=n_bootstrap, seed=seed, groups=by)
            for m in METRICS:
                row[f"{m}_diff"] = diff[m]["diff"]
                row[f"{m}_diff_ci_low"], row[f"{m}_diff_ci_high"] = diff[m]["ci"]
                row[f"{m}_p_le_0"] = diff[m]["p_le_0"]
        summary.append(row)
    return runs, pd.DataFrame(summary)


def _f(x: Any, d: int = 3) -> str:
    return "–" if x is None or (isinstance(x, float) and x != x) else f"{x:.{d}f}"


def summary_markdown(runs: pd.DataFrame, summary: pd.DataFrame, title: str) -> str:
    """The Markdown report: summary (mean ± sd, paired differences with CIs) then one row per run."""
    lines = [f"### {title}", "",
             "| recipe | seeds | CPU min | x plain | images/s | accuracy | balanced acc. | macro-F1 | macro AUC | "
             "Δ macro-F1 vs plain [95 % CI] | Δ macro AUC vs plain [95 % CI] |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in summary.iterrows():
        cells = [f"{_f(r[f'{m}_mean'])} ± {_f(r[f'{m}_sd'])}" for m in METRICS]
        diffs = []
        for m in ("macro_f1", "macro_auc"):
            if f"{m}_diff" in r and r[f"{m}_diff"] == r[f"{m}_diff"]:
                mark = " **" if r[f"{m}_diff_ci_low"] > 0 or r[f"{m}_diff_ci_high"] < 0 else ""
                diffs.append(f"{mark.strip()}{r[f'{m}_diff']:+.3f} [{r[f'{m}_diff_ci_low']:+.3f}, "
                             f"{r[f'{m}_diff_ci_high']:+.3f}]{mark.strip()}")
            else:
                diffs.append("–")
        lines.append(f"| {r['recipe']} | {int(r['seeds'])} | {_f(r['cpu_min'], 1)} | {_f(r['cpu_ratio_to_plain'], 2)} | "
                     f"{_f(r['images_per_s'], 1)} | " + " | ".join(cells) + " | " + " | ".join(diffs) + " |")
    lines += ["", "Per run (95 % stratified bootstrap CIs over test images; over subjects when the split has subject ids):", "",
              "| recipe | seed | CPU min | epochs | accuracy | macro-F1 | macro AUC |", "|---|---|---|---|---|---|---|"]
    for _, r in runs.iterrows():
        cells = [f"{r[m]:.3f} [{r[f'{m}_ci_low']:.3f}, {r[f'{m}_ci_high']:.3f}]" for m in ("accuracy", "macro_f1", "macro_auc")]
        lines.append(f"| {r['recipe']} | {int(r['seed'])} | {r['cpu_min']:.1f} | {int(r['epochs'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _log_mlflow(tracking_uri: str | None, experiment: str, params: Mapping[str, Any], runs: pd.DataFrame,
                summary: pd.DataFrame, files: Sequence[Path]) -> str | None:
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import default_tracking_uri, experiment_id

    uri = tracking_uri or default_tracking_uri()
    client = MlflowClient(uri)
    exp = experiment_id(client, experiment, uri)
    parent = client.create_run(exp, run_name=f"{params['bundle']}-quality-{time.strftime('%Y%m%d-%H%M%S')}",
                               tags={"stage": "quality-benchmark", "bundle": str(params["bundle"])})
    pid = parent.info.run_id
    for key, value in params.items():
        client.log_param(pid, key, str(value)[:500])
    for _, r in summary.iterrows():
        for col, value in r.items():
            if col not in ("recipe",) and isinstance(value, (int, float, np.floating)) and value == value:
                client.log_metric(pid, f"{r['recipe']}.{col}", float(value))
    for path in files:
        client.log_artifact(pid, str(path))
    for _, r in runs.iterrows():
        child = client.create_run(exp, run_name=f"{r['recipe']}-seed{int(r['seed'])}",
                                  tags={"mlflow.parentRunId": pid, "recipe": str(r["recipe"]), "stage": "quality-run"})
        for col, value in r.items():
            if col == "seed":
                client.log_param(child.info.run_id, "seed", int(value))
            elif isinstance(value, (int, float, np.floating)) and value == value:
                client.log_metric(child.info.run_id, col, float(value))
        client.set_terminated(child.info.run_id)
    client.set_terminated(pid)
    del mlflow
    return pid


def benchmark_quality(bundle: str, dataset_dir: str, recipes: Sequence[str] = ("base",), seeds: Sequence[int] = (0, 1, 2),
                      budget_min: float = 8.0, out_dir: str | os.PathLike | None = None,
                      overrides: Mapping[str, Any] | None = None, threads: int = 1, jobs: int = 1,
                      plain_image_size: int = 128, n_bootstrap: int = 2000, reuse: bool = True,
                      tracking_uri: str | None = None, title: str | None = None,
                      report_dir: str | os.PathLike | None = None, folds: int = 0) -> dict[str, Any]:
    """Run (or reuse) every (recipe, seed) and the plain loop, then write and log the tables; see the module doc."""
    from pipelines.bundles import load_config
    from pipelines.evaluation.report import atomic_write_csv, atomic_write_text

    out = Path(out_dir or Path("runs") / "quality" / bundle).resolve()
    out.mkdir(parents=True, exist_ok=True)
    all_recipes = [PLAIN] + [r for r in recipes if r != PLAIN]
    class_names = [str(c) for c in load_config(bundle, "train.json").get_parsed_content("class_names")]
    plan = plan_jobs(bundle, dataset_dir, all_recipes, seeds, budget_min, out, overrides, plain_image_size, threads,
                     folds=folds, class_names=class_names)
    with ThreadPoolExecutor(max_workers=max(1, int(jobs))) as pool:
        records = list(progress_bar(pool.map(lambda j: run_job(j, threads, reuse), plan), desc=f"benchmark {bundle}",
                                    total=len(plan), unit="run"))
    # the plain loop orders classes by folder name: re-read its CSV columns in the bundle's class order
    groups = None
    if folds:
        plan, records, groups = pool_folds(plan, records, class_names)
    runs, summary = summarise(plan, records, class_names, n_bootstrap=n_bootstrap, groups=groups)
    report = Path(report_dir).resolve() if report_dir else out
    report.mkdir(parents=True, exist_ok=True)
    runs_csv, summary_csv, md = report / "runs.csv", report / "summary.csv", report / "summary.md"
    atomic_write_csv(runs_csv, runs)
    atomic_write_csv(summary_csv, summary)
    text = summary_markdown(runs, summary, title or f"{bundle} vs the plain loop on {Path(dataset_dir).name}")
    atomic_write_text(md, text)
    params = {"bundle": bundle, "dataset": Path(dataset_dir).name, "recipes": list(recipes), "seeds": list(seeds),
              "budget_min": budget_min, "folds": folds, "threads": threads, "overrides": dict(overrides or {}),
              "n_bootstrap": n_bootstrap}
    run_id = _log_mlflow(tracking_uri, f"{bundle}-quality", params, runs, summary, [runs_csv, summary_csv, md])
    return {"runs": runs, "summary": summary, "markdown": text, "paths": [runs_csv, summary_csv, md],
            "mlflow_run_id": run_id}


def _main(args: argparse.Namespace) -> int:
    from pipelines.bundles import parse_overrides

    result = benchmark_quality(args.bundle, args.dataset_dir, args.recipes, args.seeds, args.budget_min, args.out_dir,
                               parse_overrides(args.override), args.threads, args.jobs, args.plain_image_size,
                               args.n_bootstrap, not args.no_reuse, args.tracking_uri, args.title, args.report_dir,
                               args.folds)
    print(result["markdown"])
    print("written: " + ", ".join(str(p) for p in result["paths"]) + f"; MLflow run {result['mlflow_run_id']}")
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("benchmark-quality", help="a bundle's recipes vs the plain loop: same test images, "
                              "CPU budget, seeds; paired CIs", description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", required=True, help="bundle name under bundles/ (e.g. alz_hybrid, tumor_mri)")
    p.add_argument("--dataset-dir", required=True,
                   help="class-folder tree with train/test (Training/Testing) folders, or (with --folds) any data "
                        "set the bundle reads")
    p.add_argument("--recipes", "--networks", nargs="+", default=["base"],
                   help="'base' (train.json as shipped) and/or network overlays configs/<name>.json")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--budget-min", type=float, default=8.0,
                   help="CPU minutes of the plain loop's training (per fold with --folds)")
    p.add_argument("--folds", type=int, default=0,
                   help="K-fold cross-validation through the bundle's num_folds/fold ids, for a data set without a "
                        "test folder; out-of-fold predictions pooled (e.g. 5 for the head-CT set)")
    p.add_argument("--override", action="append", default=[], metavar="ID=VALUE",
                   help="config-id override for every bundle run (repeatable), e.g. epochs=20")
    p.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads per run (default 1)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (e.g. 2 on 2 cores with --threads 1)")
    p.add_argument("--plain-image-size", type=int, default=128)
    p.add_argument("--n-bootstrap", type=int, default=2000)
    p.add_argument("--out-dir", default=None, help="default runs/quality/<bundle>")
    p.add_argument("--title", default=None)
    p.add_argument("--report-dir", default=None,
                   help="where runs.csv / summary.csv / summary.md go (default --out-dir), e.g. one report per table")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--no-reuse", action="store_true", help="re-run runs whose run.json already exists")
    add_quiet_argument(p)
    p.set_defaults(func=_main)
