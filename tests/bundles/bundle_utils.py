"""Run the real ``python -m monai.bundle`` in a subprocess, with a throw-away MLflow store and phantom cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def bundle_env(tmp_root: Path) -> dict[str, str]:
    """Environment for a bundle subprocess: MLflow store and phantom cache under ``tmp_root``."""
    env = os.environ.copy()
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_root / 'mlruns' / 'mlflow.db'}"
    (tmp_root / "mlruns").mkdir(parents=True, exist_ok=True)
    env.setdefault("NEURO_MONAI_CACHE", str(tmp_root / "cache"))
    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "2")
    env["PYTHONWARNINGS"] = "ignore"
    return env


def run_monai_bundle(*args: str, env: dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess:
    """``python -m monai.bundle <args>`` from the repository root; fails the test with the output tail."""
    cmd = [sys.executable, "-m", "monai.bundle", *args]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-6000:]
        raise AssertionError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")
    return proc


def torchrun_command(*args: str, nproc: int = 2) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc_per_node=<nproc> -m monai.bundle <args>``."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
            "monai.bundle", *args]


def run_checked(cmd: list[str], env: dict[str, str], timeout: int = 600) -> str:
    """Run ``cmd`` from the repository root; its stdout + stderr, or the test fails with their tail."""
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return proc.stdout + proc.stderr


def overrides(**kwargs) -> list[str]:
    """``--key value`` pairs for config-id overrides (lists/tuples written as Python literals)."""
    out: list[str] = []
    for k, v in kwargs.items():
        out += [f"--{k}", repr(list(v)) if isinstance(v, (list, tuple)) else str(v)]
    return out
