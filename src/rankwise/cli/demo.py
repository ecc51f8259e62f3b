"""``rankwise demo``: head-only vs full fine-tuning vs adapters on MiniLM + BBC News, under one budget."""

from __future__ import annotations

import argparse
from typing import Any

from .common import Formatter, UsageError, add_flag, check_writable, key_values

DESCRIPTION = """\
The main job on the embedded default: all-MiniLM-L6-v2 fine-tuned on BBC News (5 topics)
with head-only training, full fine-tuning and the registered adapter methods (LoRA,
rsLoRA, DoRA, PiSSA, VeRA, LoRA-XS, ... in that order) under one budget: the same
steps, batch size, max_length, seed and initial head; only the learning rate is set
per method family. Prints a table (test accuracy, trainable parameters, optimizer-state
bytes, wall time, peak memory) and writes results.json, report.md and
accuracy_vs_params.png into --output. The default run takes 3-5 minutes on 2 CPU cores."""
EPILOG = """\
examples:
  rankwise demo
  rankwise demo --quick --output /tmp/demo   # seconds; numbers are meaningless
  rankwise demo --methods lora,dora,vera --max-steps 100 --lr vera=2e-2
  rankwise demo --methods head,full,lora_sb --rank 4"""
#: ``DemoSettings`` field of each flag that overrides one.
SETTINGS = {"max_steps": "steps", "batch_size": "batch_size", "max_length": "max_length",
            "train_limit": "train_limit", "test_limit": "test_limit", "rank": "r", "seed": "seed", "device": "device"}


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``demo`` to the ``rankwise`` subcommands."""
    p = subparsers.add_parser(
        "demo", help="compare head-only, full FT and adapters on MiniLM + BBC News", formatter_class=Formatter,
        description=DESCRIPTION, epilog=EPILOG,
    )
    p.add_argument("--quick", action="store_true", help="a tiny run (a few steps on a few short examples)")
    p.add_argument("--methods", default=None,
                   help="comma-separated labels or adapter names (head-only/head, full-ft/none, lora, ...); "
                        "default: head-only, full-ft and the first 6 registered of the preferred list")
    add_flag(p, "max_steps", "optimizer steps per method (default: 80; quick: 3)")
    add_flag(p, "batch_size", "batch size (default: 8)")
    add_flag(p, "max_length", "tokens per example (default: 64; quick: 32)")
    p.add_argument("--train-limit", type=int, default=None, metavar="N",
                   help="training examples available (default: all)")
    p.add_argument("--test-limit", type=int, default=None, metavar="N", help="test examples evaluated (default: 300)")
    add_flag(p, "rank", "adapter rank r for every adapter (default: 8; quick: 4)")
    add_flag(p, "seed", "seed (default: 0)")
    add_flag(p, "device", "auto, cpu, cuda (default: auto)")
    add_flag(p, "lr", "override one method's learning rate, repeatable (e.g. --lr lora=3e-3)",
             type=str, action="append", metavar="METHOD=VALUE")
    add_flag(p, "output", "output directory (default: demo-out)", default="demo-out")
    add_flag(p, "progress", "no progress bars")
    p.set_defaults(func=run)
    return p


def _learning_rates(items: list[str] | None) -> dict[str, float]:
    from ..checks import is_number

    lrs = key_values(items, "--lr", "lora=3e-3")
    for label, value in lrs.items():
        if not is_number(value) or value <= 0:
            raise UsageError(f"--lr {label}={value!r} must be a finite number > 0 (e.g. --lr lora=3e-3)")
    return {label: float(value) for label, value in lrs.items()}


def _check(settings: Any, methods: list[str] | None, lrs: dict[str, float]) -> None:
    """Every setting, method name and learning-rate label checked before anything is loaded."""
    from ..checks import integer
    from ..demo import select_entries
    from ..train import check_device

    settings.validate()
    integer("seed", settings.seed)
    check_device(settings.device)
    if methods == []:
        raise UsageError("--methods names no method; give comma-separated labels (e.g. --methods lora,dora)")
    labels = [e.label for e in select_entries(methods)]
    unknown = sorted(set(lrs) - set(labels))
    if unknown:
        raise UsageError(f"--lr names {unknown}, which are not among the selected methods {labels}")


def run(args: argparse.Namespace) -> int:
    """Run the ``demo`` subcommand; returns the exit status."""
    from dataclasses import replace

    from ..demo import QUICK, DemoSettings, run_demo
    from ..io import directory_lock

    settings = QUICK if args.quick else DemoSettings()
    settings = replace(settings, **{field: getattr(args, flag) for flag, field in SETTINGS.items()
                                    if getattr(args, flag) is not None})
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods is not None else None
    lrs = _learning_rates(args.lr)
    _check(settings, methods, lrs)
    check_writable(args.output)
    with directory_lock(args.output):
        run_demo(settings, methods=methods, output=args.output, progress=args.progress, lrs=lrs)
    return 0
