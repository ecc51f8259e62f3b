"""The regression gate on the committed cpu-smoke bench (issue 15): LoRA on BBC News, rerun in a fresh process
at its recorded learning rate with seed 0, must stay within the recorded spread in quality and memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ..cli.cli_helpers import needs_assets

BASELINE = Path(__file__).parents[2] / "benchmarks" / "results" / "bench" / "cpu-smoke"


@needs_assets
def test_lora_on_bbc_has_not_regressed_against_the_committed_bench():
    entries = json.loads((BASELINE / "summary.json").read_text())["entries"]
    assert any(e["task"] == "bbc" and e["experiment"] == "lora" and e.get("test_mean") for e in entries)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the committed runs used one thread
    proc = subprocess.run([sys.executable, "-m", "rankwise", "bench", "gate", str(BASELINE), "--only", "lora",
                           "--tasks", "bbc", "--device", "cpu"], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "bbc lora: test" in proc.stdout and " ok" in proc.stdout
