"""Running the multi-process tests' jobs: ``torchrun --standalone --nproc_per_node 2`` (one thread per
process) or a command that launches it itself (``rankwise train --nproc 2``).

gloo can abort a worker at start-up on a loaded machine (a C++ exception in its connection thread:
``terminate called ...``, exit -6; seen on the 2-core CI machine, twice in one second, and once here; the same
launch passes when rerun). Such a launch is retried after a pause, from what its folder held before it (its
half-written run folders would be refused as another run's); any other failure fails at once. A failure reports
what the workers printed (faulthandler's Python traceback of an abort included), not only torchrun's summary.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ABORTED = ("terminate called", "exitcode: -6", "Fatal Python error: Aborted")
ATTEMPTS = 3
PAUSE_S = 5.0
# what a worker prints when it fails; torchrun's own traceback (elastic/, run.py) is left out
TELLING = ("terminate called", "what():", "Fatal Python error", "File \"", "Error", "error:", "Exception",
           "[rank")


def worker_report(stderr: str, tail: int = 1500) -> str:
    """The lines of ``stderr`` that tell why a worker failed, then its last ``tail`` characters."""
    lines = [line for line in stderr.splitlines() if any(k in line for k in TELLING)
             and not any(launcher in line for launcher in ("distributed/elastic", "distributed/run.py"))]
    return "\n".join(lines[-60:]) + "\n--- stderr tail ---\n" + stderr[-tail:]


def run_retrying(cmd: list[str], *, timeout: float, env: dict[str, str] | None = None, cwd: Path | None = None,
                 scratch: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd`` (one thread per process, faulthandler on); rerun it up to ``ATTEMPTS`` times when a worker
    aborted, after removing what the failed attempt added to ``scratch``. Returns the last attempt, its ``report``
    the workers' reports of every failed attempt."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1", **(env or {})}
    before = set(scratch.iterdir()) if scratch is not None else set()
    reports: list[str] = []
    for attempt in range(ATTEMPTS):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
        if done.returncode == 0:
            break
        reports.append(worker_report(done.stderr))
        if attempt + 1 == ATTEMPTS or not any(mark in done.stderr for mark in ABORTED):
            break
        if scratch is not None:
            for path in set(scratch.iterdir()) - before:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        time.sleep(PAUSE_S * (attempt + 1))
    done.report = "\n=== next attempt ===\n".join(reports)  # type: ignore[attr-defined]
    return done


def torchrun(script: Path, *args: str, timeout: float, env: dict[str, str] | None = None,
             cwd: Path | None = None, scratch: Path | None = None) -> None:
    """``script`` under ``torchrun --standalone --nproc_per_node 2``; AssertionError with the workers' report
    when it fails."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           *args]
    done = run_retrying(cmd, timeout=timeout, env=env, cwd=cwd, scratch=scratch)
    assert done.returncode == 0, done.report
