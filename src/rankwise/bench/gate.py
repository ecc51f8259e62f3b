"""The regression gate: a fixed subset of a recorded bench rerun at the recorded learning rates, failing
when a method's quality or memory moved beyond what the recorded seeds allow.

Quality: the fresh test metric may not be worse than the recorded mean by more than the recorded spread
(max |seed − mean|) plus a floor (``quality_floor``: 0.01 accuracy, 2% of a perplexity), so seed noise
and a different machine's rounding pass and a real regression does not. Memory: the optimizer state
and the trained-parameter count are exact and may not exceed the largest recorded seed's (they move with
the seed only where ranks are re-allocated from the data: ElaLoRA, IncreLoRA, ...); the exact tensor peak of a training
step may not exceed the recorded one by more than ``memory_slack`` (5%). The process's peak RSS is not
gated: it moves with the interpreter, the libraries loaded and the allocator, not with the method.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .profiles import Profile
from .runner import run_one
from .summary import EXACT_COUNTS


@dataclass(frozen=True)
class Verdict:
    """One gated (task, experiment): the fresh value against the recorded one and what failed."""

    task: str
    experiment: str
    fresh: dict[str, Any]
    recorded: dict[str, Any]
    failures: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.failures


def quality_floor(metric: str, recorded_mean: float) -> float:
    """The smallest quality change the gate calls a regression (absolute, in the metric's unit)."""
    return 0.01 if metric == "accuracy" else 0.02 * recorded_mean


def judge(fresh: dict[str, Any], recorded: dict[str, Any], memory_slack: float = 0.05) -> tuple[str, ...]:
    """What regressed in run row ``fresh`` against summary entry ``recorded`` (empty: nothing)."""
    failures = []
    metric, mean = recorded["metric"], recorded["test_mean"]
    allowed = recorded["test_spread"] + quality_floor(metric, mean)
    value = fresh["test_metric"]
    worse = mean - value if metric == "accuracy" else value - mean
    if not worse <= allowed:  # NaN fails too
        failures.append(f"test {metric} {value:.4g} vs recorded {mean:.4g} (allowed change {allowed:.3g})")
    for key in EXACT_COUNTS:  # bounded by the largest recorded seed's (dynamic ranks move them with the seed)
        bound = recorded.get(f"{key}_max", recorded.get(key))
        if bound is not None and fresh[key] > bound:
            failures.append(f"{key} {fresh[key]:,} > recorded {bound:,.0f}")
    peak = recorded.get("tensor_peak_bytes")
    if peak and fresh.get("tensor_peak_bytes") and fresh["tensor_peak_bytes"] > peak * (1 + memory_slack):
        failures.append(f"tensor peak {fresh['tensor_peak_bytes'] / 2**20:.1f} MiB > recorded "
                        f"{peak / 2**20:.1f} MiB + {memory_slack:.0%}")
    return tuple(failures)


def recorded_entries(baseline: str | os.PathLike) -> tuple[Profile, dict[tuple[str, str], dict[str, Any]]]:
    """The profile and ``{(task, experiment): summary entry}`` of a reported bench folder."""
    from .profiles import BenchTask

    file = Path(baseline) / "summary.json"
    if not file.is_file():
        raise ValueError(f"{file} not found: run 'rankwise bench report {baseline}' first")
    data = json.loads(file.read_text())
    settings = dict(data["profile"])
    settings["tasks"] = tuple(BenchTask(**t) for t in settings["tasks"])
    settings["lr_grids"] = {k: tuple(v) for k, v in settings["lr_grids"].items()}
    profile = Profile(description="", **settings)
    return profile, {(e["task"], e["experiment"]): e for e in data["entries"]}


def gate(baseline: str | os.PathLike, experiments: list[Any], tasks: list[str] | None = None, seed: int = 0,
         device: str = "auto", memory_slack: float = 0.05) -> list[Verdict]:
    """Rerun ``experiments`` (on ``tasks``, default the baseline's) at the recorded lr with ``seed`` and judge each
    against the baseline bench folder ``baseline``."""
    from ..models import quiet_transformers

    quiet_transformers()
    profile, entries = recorded_entries(baseline)
    names = tasks or [t.name for t in profile.tasks]
    unknown = sorted(set(names) - {t.name for t in profile.tasks})
    if unknown:
        raise ValueError(f"tasks {unknown} are not in the baseline; allowed: {[t.name for t in profile.tasks]}")
    pairs = [(task, exp) for task in profile.tasks if task.name in names for exp in experiments]
    # every pair checked before the first rerun (each takes minutes): one error that names them all
    missing = [f"{exp.name} on {task.name}" for task, exp in pairs
               if entries.get((task.name, exp.name), {}).get("test_mean") is None]
    if missing:
        raise ValueError(f"the baseline has no finished runs of {', '.join(missing)}; gate only what it recorded")
    changed = sorted({exp.name for task, exp in pairs
                      if entries[(task.name, exp.name)]["fingerprint"] != exp.fingerprint()})
    if changed:
        raise ValueError(f"experiments {changed} differ from the ones the baseline recorded")
    verdicts = []
    for task, exp in pairs:
        recorded = entries[(task.name, exp.name)]
        fresh = run_one(profile, task, exp, recorded["lr"], seed, device)
        verdicts.append(Verdict(task.name, exp.name, fresh, recorded, judge(fresh, recorded, memory_slack)))
    return verdicts
