"""``rankwise plan``: the per-rank memory of a training setup, itemized, before any weight is loaded
(``rw.plan``)."""

from __future__ import annotations

import argparse
import json
import re
from typing import Any

from .common import Formatter, UsageError, add_flag, dtype_name, key_values, parse_targets

DESCRIPTION = """\
Predict the memory one rank needs to train a model, without loading its weights: the model
is built on the meta device from its config, the adapter is injected with rw.adapt, the
optimizer's state is measured by one real CPU step on one tensor per distinct shape, and
the activations come from a forward and backward on meta tensors at the requested batch
and length (bytes saved for backward, each storage once, and the live peak).

Itemized per rank: weights, gradients, optimizer state, projectors (GaLore-style bases,
replicated under FSDP2), the refresh-step transient (exact SVD and randomized), other
optimizer-step temporaries, activations, logits, the forward/backward live peak and the
overall peak. With --memory, says whether the peak fits (exit status 1 when it does
not, 0 when it does; a bad input is one error line and status 2).

--rank is the adapter's r with --method, else the projected optimizer's subspace rank.
Adapter weights stay fp32 whatever --dtype (the base's) is. docs/plan.md explains each
item and what is still a formula."""
EPILOG = """\
examples:
  rankwise plan --model smollm2 --method lora --rank 8 --dtype bf16 --memory 8GiB
  rankwise plan --model smollm2 --method lora --quantize nf4 --gradient-checkpointing
  rankwise plan --model scratch-60m --optimizer galore --rank 128 --batch-size 16 --max-length 1024
  rankwise plan --model path/to/config.json --optimizer apollo --world-size 8 --layerwise
  rankwise plan --model minilm --method lora --batch-size 32 --max-length 128 --format json"""
FORMATS = ("table", "json")
_UNITS = {"": 2**30, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_memory(text: str) -> int:
    """``"24GiB"`` / ``"80GB"`` / ``"512MiB"`` / ``"16"`` (GiB) as bytes; UsageError otherwise."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise UsageError(f"--memory {text!r}: give a positive size such as 24GiB, 80GB, 512MiB or 16 (GiB)")
    return int(float(match.group(1)) * _UNITS[unit])


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``plan`` to the ``rankwise`` subcommands."""
    p = subparsers.add_parser(
        "plan", help="predict per-rank training memory (weights, grads, optimizer, activations, peak)",
        formatter_class=Formatter, description=DESCRIPTION, epilog=EPILOG,
    )
    g = p.add_argument_group("model and method")
    add_flag(g, "model", "minilm-l6 (alias minilm), smollm2-135m (alias smollm2), scratch-20m, scratch-60m, a "
                         "local HF model directory, a config.json, or a config name cached offline [required]",
             required=True)
    g.add_argument("--task", choices=("causal-lm", "seq-cls", "base"),
                   help="head to build [default: seq-cls for minilm, else causal-lm]")
    add_flag(g, "method", "adapter method (rankwise methods), 'none' = full training [default: none]",
             default="none")
    add_flag(g, "rank", "with --method: the adapter rank r; else the projected optimizer's subspace rank")
    g.add_argument("--targets", help="adapter / projection targets: all-linear, name suffixes or re:<regex>")
    g.add_argument("--option", action="append", metavar="KEY=VALUE", help="any other method option, repeatable")
    g = p.add_argument_group("optimizer")
    g.add_argument("--optimizer", default="adamw",
                   help="adamw or any rw.optim.make name: galore, apollo, fira, frugal, q_galore, badam, lisa, ... "
                        "[default: adamw]")
    g.add_argument("--optimizer-option", action="append", metavar="KEY=VALUE",
                   help="any optimizer argument, repeatable (e.g. --optimizer-option update_gap=200)")
    g.add_argument("--layerwise", action="store_true",
                   help="step each parameter in backward and free its gradient (LayerwiseOptimizer)")
    g = p.add_argument_group("shape and precision")
    add_flag(g, "batch_size", "sequences per rank per step [default: 8]", default=8)
    add_flag(g, "max_length", "tokens per sequence [default: 512]", default=512)
    add_flag(g, "dtype", "dtype of the base weights: fp32, bf16 or fp16 (or float32, bfloat16, float16); "
                         "adapters stay fp32 [default: fp32]", default="fp32")
    g.add_argument("--quantize", metavar="FORMAT",
                   help="4-bit base under an adapter: nf4, fp4 or <scheme>-b<blocksize>[-dq] [default: none]")
    add_flag(g, "gradient_checkpointing", "activation checkpointing of every layer [default: off]", default=False)
    g.add_argument("--world-size", type=int, default=1, metavar="N",
                   help="FSDP2 ranks: parameters, gradients and state sharded, projectors replicated [default: 1]")
    g.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="whose attention / dropout kernels: CUDA keeps bool dropout masks and no attention "
                        "mask, CPU float masks and, with attention dropout, the S x S probabilities [default: cuda]")
    g = p.add_argument_group("output")
    g.add_argument("--memory", metavar="SIZE", help="budget per rank (24GiB, 80GB, 16 = GiB): say if the peak fits")
    g.add_argument("--format", default="table", choices=FORMATS, help="table or json [default: table]")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run the ``plan`` subcommand; returns the exit status (0; 1 when --memory is given and the peak
    does not fit)."""
    from ..planner import plan

    budget = parse_memory(args.memory) if args.memory is not None else None
    method = None if args.method in ("none", "full") else args.method
    options = key_values(args.option, "--option", "init=pissa")
    if options and method is None:
        raise UsageError(f"--option {sorted(options)} sets adapter options: give --method (or use "
                         "--optimizer-option for the optimizer)")
    optimizer_options = key_values(args.optimizer_option, "--optimizer-option", "update_gap=200")
    if args.targets is not None:
        (options if method else optimizer_options)["targets"] = parse_targets(args.targets)
    if args.rank is not None:
        if method:
            options["r"] = args.rank
        else:
            optimizer_options["rank"] = args.rank
    if args.world_size < 1:
        raise UsageError(f"--world-size {args.world_size}: give a number of ranks >= 1")
    for flag, value in (("--batch-size", args.batch_size), ("--max-length", args.max_length)):
        if value < 1:
            raise UsageError(f"{flag} {value}: give a positive number")
    try:
        result = plan(args.model, method, args.optimizer, batch_size=args.batch_size, seq_len=args.max_length,
                      dtype=dtype_name(args.dtype), checkpointing=args.gradient_checkpointing,
                      layerwise=args.layerwise,
                      quant=args.quantize, world_size=args.world_size, memory=budget, task=args.task,
                      method_options=options, optimizer_options=optimizer_options,
                      device=args.device)
    except TypeError as e:  # an option the method's config / optimizer's class does not take
        raise UsageError(str(e)) from None
    print(json.dumps(result.to_dict(), indent=2) if args.format == "json" else result.table())
    return 1 if result.fits is False else 0
