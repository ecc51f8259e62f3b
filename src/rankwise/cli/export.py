"""``rankwise export``: a rankwise adapter directory -> a PEFT LoRA (or DoRA) directory that
``peft.PeftModel.from_pretrained(base, DIR)`` loads onto the untouched base model."""

from __future__ import annotations

import argparse
from typing import Any

from .adapted import add_command, find_adapter, load_adapted, prepare
from .common import UsageError

DESCRIPTION = """\
Write a rankwise adapter as a Hugging Face PEFT adapter directory (adapter_config.json +
adapter_model.safetensors, rw.export_peft). Loaded with peft.PeftModel.from_pretrained
onto the original base model, it gives the outputs of the rankwise model; a trained
classification head goes to modules_to_save.

The base model is needed to rebuild the adapted model: --model, or the one the adapter
records (the 'rankwise train' run's metrics.json beside it, else base_model in
rankwise_adapter.json). Classification adapters load the model with as many labels as
their trained head has.

Only methods whose update is a low-rank pair export (the 'export' column of 'rankwise
methods': lora or dora); for the others (randlora, bone, dsee) use 'rankwise merge'."""
EPILOG = """\
examples:
  rankwise export runs/lora --output peft/lora          # a 'rankwise train' output directory
  rankwise export runs/lora/adapter --output peft/lora --overwrite
  rankwise export out/adapter --model minilm-l6 --output peft/minilm
  rankwise export out/adapter --model ./my-llama --output peft/llama

then, in Python:
  base = AutoModelForSequenceClassification.from_pretrained(BASE, num_labels=5)
  model = peft.PeftModel.from_pretrained(base, "peft/lora")"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``export`` to the ``rankwise`` subcommands."""
    return add_command(subparsers, "export", run, "write a rankwise adapter as a PEFT LoRA directory",
                       DESCRIPTION, EPILOG, "the PEFT adapter directory to write")


def run(args: argparse.Namespace) -> int:
    """Run the ``export`` subcommand; returns the exit status."""
    from ..adapters.registry import REGISTRY
    from ..peft_io import export_peft

    adapter = find_adapter(args.adapter)
    spec = REGISTRY.get(adapter.method)
    if spec is None:
        raise UsageError(f"the adapter in {adapter.path} uses method {adapter.method!r}, which is not registered")
    if spec.export == "none":
        instead = (f"use 'rankwise merge {args.adapter} --output DIR' for a merged model" if spec.mergeable else
                   f"its update depends on the input, so it cannot be merged either: load {args.adapter} with "
                   "rw.load_adapter")
        raise UsageError(f"method {adapter.method!r} cannot be exported as a PEFT LoRA adapter (its update is not a "
                         f"low-rank LoRA pair); {instead}")
    base = prepare(args, adapter)
    model, _ = load_adapted(adapter, base)
    out = export_peft(model, args.output)
    kind = "DoRA" if spec.export == "dora" else "LoRA"
    print(f"wrote {out}: PEFT {kind} adapter ({adapter.method}) for {base.model} ({base.task}); load it with "
          f"peft.PeftModel.from_pretrained(base, {str(out)!r})")
    return 0
