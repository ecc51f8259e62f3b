"""`rankwise train --method <rank-allocation method>`: the loop attaches each method's controller (DRS-LoRA,
PRILoRA, ElaLoRA) or runs its data-driven plan (GoRA), and the saved adapter carries the per-layer ranks."""

from __future__ import annotations

import json

import pytest

from tests.cli.cli_helpers import needs_assets, run_cli
from tests.cli.test_dynamics_cli import tiny_llama_dir  # noqa: F401  (the module fixture)


@pytest.mark.slow
@needs_assets
@pytest.mark.parametrize("method, options", [
    ("drs_lora", ["--option", "max_kappa=0.5", "--option", "dense_fraction=0"]),
    ("prilora", ["--option", "prune_interval=1", "--option", "r_start=1", "--option", "r_end=3"]),
    ("gora", ["--option", "min_r=1", "--option", "max_r=4"]),
    ("elalora", ["--option", "warmup=1", "--option", "adjust_interval=1", "--option", "adjust_k=1"]),
    ("autolora", ["--option", "threshold=0.6"]),  # r = 2: weights start at 0.5, one component kept per layer
])
def test_cli_trains_the_rank_allocation_methods(tmp_path, capsys, tiny_llama_dir, method, options):  # noqa: F811
    code, _, err = run_cli(capsys, "train", "--model", str(tiny_llama_dir), "--data", "stdlib-code", "--method",
                           method, "--r", "2", "--output", str(tmp_path), "--max-steps", "3", "--max-length", "32",
                           "--train-limit", "2", "--test-limit", "1", "--no-progress", *options)
    assert code == 0, err
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["result"]["steps"] == 3
    saved = json.loads((tmp_path / "adapter" / "rankwise_adapter.json").read_text())
    assert saved["method"] == method and saved["overrides"]  # per-layer ranks
