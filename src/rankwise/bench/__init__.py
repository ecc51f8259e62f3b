"""``rankwise bench``: every family under one budget, fair and repeatable (docs/bench.md).

A bench folder holds ``bench.json`` (the profile's budget) and ``runs*.jsonl`` (one row per finished run);
``report`` turns it into ``report.md``, ``summary.json`` and Pareto plots, ``gate`` compares a fresh run
against a recorded one.
"""

from .experiments import Experiment, from_peft_config, load_experiment, load_experiments, write_experiment
from .profiles import PROFILES, BenchTask, Profile, builtin_experiments
from .runner import Bench, read_rows, run_one

__all__ = ["PROFILES", "Bench", "BenchTask", "Experiment", "Profile", "builtin_experiments", "from_peft_config",
           "load_experiment", "load_experiments", "read_rows", "run_one", "write_experiment"]
