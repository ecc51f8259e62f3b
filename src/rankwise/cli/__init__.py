"""``rankwise`` command line: a thin layer over the library, one module per subcommand.

Bad input (an unknown method, model, dataset, option or path) prints one ``rankwise: error: ...`` line
and exits with status 2; nothing here prints a traceback for a user mistake (``RANKWISE_DEBUG=1`` shows
it). Flags shared by several subcommands are defined once in :data:`common.FLAGS`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import bench, compress, demo, export, federate, merge, methods, plan, train
from .common import Formatter, Parser, run_command

#: The subcommand modules, in the order ``rankwise --help`` lists them.
COMMANDS = (methods, train, demo, compress, export, merge, plan, federate, bench)
EPILOG = """\
examples:
  rankwise methods                                  # every registered adapter method
  rankwise train --method lora --rank 8             # MiniLM + BBC News with LoRA
  rankwise train run.yaml --lr 2e-3                 # a YAML run, one value overridden
  rankwise demo                                     # head-only vs full FT vs adapters (~5 min CPU)
  rankwise compress --method welore --ratio 0.5     # compress SmolLM2, perplexity report
  rankwise export runs/lora --output peft/lora      # a trained adapter as a PEFT LoRA directory
  rankwise merge runs/lora --output merged/lora     # the adapter folded into a HF model directory
  rankwise plan --model smollm2 --method lora --dtype bf16 --memory 8GiB   # predicted memory per rank
  rankwise federate --method ffa_lora --clients 4   # federated LoRA on BBC shards, simulated in process
  rankwise bench run --profile cpu-smoke --only lora,dora   # methods under one budget, lr swept on validation
'rankwise COMMAND --help' explains each command."""


def build_parser() -> argparse.ArgumentParser:
    """The ``rankwise`` parser with every subcommand; each sets ``func`` to the function that runs it."""
    parser = Parser(prog="rankwise", formatter_class=Formatter, epilog=EPILOG,
                    description="Low-rank adapters, projected optimizers, sparse training and compression.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rankwise`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # `train --nproc` relaunches with it
    return run_command(args.func, args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
