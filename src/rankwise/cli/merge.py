"""``rankwise merge``: a rankwise adapter directory -> a Hugging Face model directory with the adapter
folded into the weights (``save_pretrained`` + tokenizer), loadable with ``from_pretrained`` alone."""

from __future__ import annotations

import argparse
from typing import Any

from .adapted import add_command, find_adapter, load_adapted, prepare

DESCRIPTION = """\
Fold a rankwise adapter into its base model (rw.merge_and_unload) and write the result
as a plain Hugging Face model directory (config, safetensors weights and tokenizer). It
loads with AutoModelFor....from_pretrained(DIR), needs neither rankwise nor PEFT, and
gives the outputs of the adapted model. Every method merges, including those that
cannot export to PEFT (randlora, bone, dsee); a trained classification head is kept.

The base model is --model, or the one the adapter records (the 'rankwise train' run's
metrics.json beside it, else base_model in rankwise_adapter.json)."""
EPILOG = """\
examples:
  rankwise merge runs/lora --output merged/lora        # a 'rankwise train' output directory
  rankwise merge runs/vera/adapter --output merged/vera --overwrite
  rankwise merge out/adapter --model smollm2-135m --output merged/smollm2

then, in Python:
  model = AutoModelForSequenceClassification.from_pretrained("merged/lora")"""
#: transformers class that loads the merged directory, by task.
AUTO_CLASSES = {"seq-cls": "AutoModelForSequenceClassification", "causal-lm": "AutoModelForCausalLM",
                "base": "AutoModel"}


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``merge`` to the ``rankwise`` subcommands."""
    return add_command(subparsers, "merge", run, "fold an adapter into its base model and save a HF model directory",
                       DESCRIPTION, EPILOG, "the merged model directory to write")


def run(args: argparse.Namespace) -> int:
    """Run the ``merge`` subcommand; returns the exit status."""
    from ..adapters.ops import merge_and_unload
    from ..io import atomic_directory

    adapter = find_adapter(args.adapter)
    base = prepare(args, adapter)
    model, tokenizer = load_adapted(adapter, base)
    merged = merge_and_unload(model, dequantize=True)  # a 4-bit base (qlora, loftq) gives plain 16/32-bit layers
    with atomic_directory(args.output) as tmp:
        merged.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    print(f"wrote {args.output}: {base.model} with the {adapter.method} adapter merged ({base.task}); load it with "
          f"{AUTO_CLASSES[base.task]}.from_pretrained({str(args.output)!r})")
    return 0
