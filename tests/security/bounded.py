"""Run a snippet in a child interpreter whose address space is capped a little above what its imports took, so a
test can prove that a hostile header is refused without the multi-gigabyte allocation it asks for."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

_PRELUDE = '''
import resource

def cap_memory(headroom_mb):
    with open("/proc/self/status") as fh:
        vm = next(int(line.split()[1]) for line in fh if line.startswith("VmSize:")) * 1024
    limit = vm + headroom_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
'''


def run_bounded(imports: str, action: str, headroom_mb: int = 512, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``imports``, cap the address space at current + ``headroom_mb``, then run ``action``.

    The action should print its outcome; an allocation above the cap ends the child with MemoryError.
    """
    code = _PRELUDE + textwrap.dedent(imports) + f"\ncap_memory({int(headroom_mb)})\n" + textwrap.dedent(action)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2",
           "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=str(REPO_ROOT))
