"""``rankwise bench``: run a profile's experiments under one budget (resumable, shardable), report them,
gate a fresh run against a recorded one, list or write out the built-in experiments."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .common import Formatter, UsageError, add_flag, check_writable

DESCRIPTION = """\
Compare adapters, optimizers, block samplers and structured models under one budget.

'run' trains every experiment of a profile on each of its tasks: first seed 0 at each
learning rate of the experiment's grid, scored on a validation split held out of the
training data (never the test split), then the other seeds at the best one. Each finished
run is one line in OUT/runs*.jsonl: an interrupted bench continues where it stopped, and
--shard I/N splits the (task, experiment) pairs over N processes. 'report' writes
OUT/report.md (mean +- 95% interval over the seeds, memory, speed, sizes), summary.json
and Pareto plots. 'gate' reruns a subset at the recorded learning rates and exits 1 when
quality or memory regressed beyond the recorded spread.

Experiments: the profile's built-in ones, or folders given with --experiments, each holding
a PEFT adapter_config.json (run unchanged) and/or a training.json (method, options, targets,
optimizer, optimizer_options, lr_grid, note); 'rankwise bench list --write DIR' writes the
built-in ones out as folders to start from (docs/bench.md)."""
EPILOG = """\
examples:
  rankwise bench list --profile cpu-smoke
  rankwise bench run --profile cpu-smoke --only lora,dora,full-galore --out bench/smoke
  rankwise bench run --profile cpu-smoke --out bench/smoke --shard 0/2 &   # two processes,
  rankwise bench run --profile cpu-smoke --out bench/smoke --shard 1/2     # one folder
  rankwise bench run --profile cpu-lm --experiments my-experiments/ --seeds 5 --out bench/lm
  rankwise bench report bench/smoke
  rankwise bench gate benchmarks/results/bench/cpu-smoke --only lora,full-galore --tasks bbc"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``bench`` (with its actions run, report, gate, list) to the ``rankwise`` subcommands."""
    from ..bench import PROFILES

    p = subparsers.add_parser("bench", help="compare methods under one budget: run, report, gate, list",
                              description=DESCRIPTION, epilog=EPILOG, formatter_class=Formatter)
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True,
                               help="run (or continue) a bench, report it, gate against it, list experiments")
    profiles = ", ".join(f"{k} ({v.description.split(':')[0]})" for k, v in PROFILES.items())

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--only", metavar="NAMES", help="comma-separated experiment names, run in this order "
                                                   "[default: all]")
        q.add_argument("--tasks", metavar="NAMES", help="comma-separated task names [default: the profile's]")
        add_flag(q, "device", "auto, cpu, cuda or cuda:N [default: auto]", default="auto")

    q = actions.add_parser("run", help="run (or continue) a bench", formatter_class=Formatter, epilog=EPILOG,
                           description="Run every missing run of a profile's experiments into --output: seed 0 at "
                           "each lr of the grid (scored on validation), then the other seeds at the best lr.")
    q.add_argument("--profile", default="cpu-smoke", choices=list(PROFILES), metavar="NAME",
                   help=f"one of: {profiles} [default: cpu-smoke]")
    q.add_argument("--experiments", metavar="DIR", help="experiment folders to run instead of the built-in ones")
    common(q)
    q.add_argument("--seeds", type=int, metavar="N", help="seeds per experiment [default: the profile's, 3]")
    add_flag(q, "output", "bench folder [default: bench/<profile>]")
    q.add_argument("--shard", metavar="I/N", default="0/1", help="run the I-th of N shares of the (task, experiment) "
                   "pairs (0-based), writing its own log in the same folder [default: 0/1]")
    q.add_argument("--no-report", dest="report", action="store_false", help="do not write the report at the end")
    q.set_defaults(func=run)

    q = actions.add_parser("report", help="write report.md, summary.json and plots of a bench folder",
                           formatter_class=Formatter, description="Summarise a bench folder (any finished runs).")
    q.add_argument("folder", help="bench folder")
    q.add_argument("--no-plots", dest="plots", action="store_false", help="tables only")
    q.set_defaults(func=report)

    q = actions.add_parser("gate", help="rerun a subset at the recorded lrs; exit 1 on a regression",
                           formatter_class=Formatter, description=(
                               "Rerun --only experiments on --tasks with --seed at the learning rates recorded in "
                               "BASELINE (a reported bench folder) and compare: the test metric may not be worse "
                               "than the recorded mean by more than the recorded spread plus a floor, optimizer "
                               "state and trained parameters may not exceed the largest recorded seed's, the exact "
                               "tensor peak of a training step may not grow by more than --memory-slack. Exit status "
                               "1 when anything regressed."))
    q.add_argument("baseline", help="reported bench folder (holding summary.json)")
    q.add_argument("--experiments", metavar="DIR", help="experiment folders [default: the built-in ones]")
    common(q)
    q.add_argument("--seed", type=int, default=0, help="seed of the rerun [default: 0]")
    q.add_argument("--memory-slack", type=float, default=0.05, metavar="F",
                   help="allowed growth of the exact tensor peak of a training step [default: 0.05]")
    q.set_defaults(func=gate)

    q = actions.add_parser("list", help="the experiments of a profile (or write them out as folders)",
                           formatter_class=Formatter, description="List a profile's built-in experiments.")
    q.add_argument("--profile", default="cpu-smoke", choices=list(PROFILES), metavar="NAME",
                   help=f"one of: {', '.join(PROFILES)} [default: cpu-smoke]")
    q.add_argument("--write", metavar="DIR", help="write each experiment as DIR/<name>/training.json")
    q.set_defaults(func=list_experiments)
    return p


def _names(text: str | None, allowed: list[str], what: str) -> list[str]:
    if text is None:
        return allowed
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise UsageError(f"--{what} {text!r}: unknown {unknown or 'empty'}; allowed: {', '.join(allowed)}")
    return names


def _experiments(profile: str, folder: str | None, only: str | None) -> list[Any]:
    from ..bench import builtin_experiments, load_experiments

    found = {e.name: e for e in (load_experiments(folder) if folder else builtin_experiments(profile))}
    return [found[name] for name in _names(only, list(found), "only")]  # in the order --only gives


def _shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard {text!r} must be I/N, e.g. 0/2") from None
    if not 0 <= index < count:
        raise UsageError(f"--shard {text!r}: need 0 <= I < N")
    return index, count


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..bench import PROFILES, Bench
    from ..bench.summary import terminal_table, write_report

    profile = PROFILES[args.profile]
    experiments = _experiments(args.profile, args.experiments, args.only)
    tasks = _names(args.tasks, [t.name for t in profile.tasks], "tasks")
    seeds = profile.seeds if args.seeds is None else args.seeds
    if seeds < 1:
        raise UsageError(f"--seeds {seeds} must be at least 1")
    out = Path(getattr(args, "output", None) or f"bench/{profile.name}")
    check_writable(out)
    bench = Bench(profile, experiments, out, tuple(t for t in profile.tasks if t.name in tasks), seeds,
                  _shard(args.shard), args.device)
    print(f"rankwise bench: {profile.name}, {len(bench.pairs())} (task, experiment) pairs in this shard, "
          f"{bench.planned_runs()} runs ({profile.steps} steps each) -> {out}", file=sys.stderr)
    bench.run()
    if args.report:
        path = write_report(out)
        print(terminal_table(out))
        print(f"report: {path}", file=sys.stderr)
    return 0


def report(args: argparse.Namespace) -> int:
    from ..bench.summary import terminal_table, write_report

    path = write_report(args.folder, plots=args.plots)
    print(terminal_table(args.folder))
    print(f"report: {path}", file=sys.stderr)
    return 0


def gate(args: argparse.Namespace) -> int:
    from ..bench.gate import gate as run_gate
    from ..bench.gate import recorded_entries

    profile, _ = recorded_entries(args.baseline)
    experiments = _experiments(profile.name, args.experiments, args.only)
    tasks = _names(args.tasks, [t.name for t in profile.tasks], "tasks")
    verdicts = run_gate(args.baseline, experiments, tasks, args.seed, args.device, args.memory_slack)
    for v in verdicts:
        status = "ok" if v.ok else "REGRESSED: " + "; ".join(v.failures)
        print(f"{v.task} {v.experiment}: test {v.fresh['test_metric']:.4g} (recorded {v.recorded['test_mean']:.4g} "
              f"± {v.recorded['test_spread']:.2g}) {status}")
    return 0 if all(v.ok for v in verdicts) else 1


def list_experiments(args: argparse.Namespace) -> int:
    from ..bench import PROFILES, builtin_experiments, write_experiment
    from ..report import Column, text_table

    profile = PROFILES[args.profile]
    experiments = builtin_experiments(args.profile)
    if args.write:
        check_writable(args.write, "--write")
        for exp in experiments:
            write_experiment(exp, args.write)
        print(f"wrote {len(experiments)} experiment folders under {args.write}", file=sys.stderr)
        return 0
    rows = [{"name": e.name, "kind": e.kind, "method": e.method, "optimizer": e.optimizer,
             "grid": ", ".join(f"{v:g}" for v in (e.lr_grid or profile.lr_grids.get(e.kind, ()))),
             "options": ", ".join(f"{k}={v}" for k, v in {**e.options, **e.optimizer_options}.items())}
            for e in experiments]
    columns = [Column(k, k, align="<") for k in ("name", "kind", "method", "optimizer", "grid", "options")]
    print(text_table(rows, columns))
    print(f"\n{len(rows)} experiments; budget per run: {profile.steps} steps x {profile.batch_size} x "
          f"{profile.max_length} tokens, {profile.seeds} seeds, tasks "
          f"{', '.join(t.name for t in profile.tasks)}")
    return 0
