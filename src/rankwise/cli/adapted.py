"""A saved rankwise adapter and the base model it belongs to, for ``rankwise export`` and ``rankwise merge``.

The base model is ``--model`` when given, else the model of the ``rankwise train`` run that wrote the
adapter (``metrics.json`` beside the adapter directory), else ``base_model`` in ``rankwise_adapter.json``
(the path ``from_pretrained`` read). The task comes from the adapter itself: a trained classification
head (``classifier`` / ``score`` among its trainable modules) means ``seq-cls`` with as many labels as
the head has output rows; otherwise ``causal-lm`` when the model has an LM head, else the bare model.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .common import Formatter, UsageError, add_flag, check_model_name, check_output_dir

RUN_RECORD = "metrics.json"
PATH_HELP = ("a rankwise adapter directory (rankwise_adapter.json + rankwise_adapter.safetensors, written by "
             "rw.save_adapter), or a 'rankwise train' output directory with one in adapter/")
MODEL_HELP = ("the base model the adapter was trained on: a packaged name (minilm-l6, smollm2-135m) or a local "
              "HF model dir [default: the model of the 'rankwise train' run (metrics.json beside the adapter), "
              "else base_model in rankwise_adapter.json]")


def add_command(subparsers: Any, name: str, run: Callable[[argparse.Namespace], int], summary: str,
                description: str, epilog: str, output_help: str) -> argparse.ArgumentParser:
    """Add ``export`` or ``merge``, which take the same arguments: ADAPTER, --model, --output, --overwrite."""
    parser = subparsers.add_parser(name, help=summary, formatter_class=Formatter, description=description,
                                   epilog=epilog)
    parser.add_argument("adapter", metavar="ADAPTER", help=PATH_HELP)
    add_flag(parser, "model", MODEL_HELP)
    add_flag(parser, "output", output_help + " (required)", required=True)
    add_flag(parser, "overwrite", "replace --output when it exists and is not empty")
    parser.set_defaults(func=run)
    return parser


@dataclass(frozen=True)
class SavedAdapter:
    """An adapter directory and its ``rankwise_adapter.json``."""

    path: Path
    config: dict[str, Any]

    @property
    def method(self) -> str:
        return str(self.config.get("method"))


@dataclass(frozen=True)
class BaseModel:
    """What to load before the adapter: a model name or directory, its task and number of labels."""

    model: str
    task: str
    num_labels: int | None = None


def find_adapter(path: str | os.PathLike) -> SavedAdapter:
    """The adapter at ``path`` (or at ``path/adapter``, a ``rankwise train`` output directory)."""
    from ..io import ADAPTER_CONFIG

    if not str(path).strip():
        raise UsageError("ADAPTER '' is empty; give a rankwise adapter directory")
    root = Path(path)
    if not root.is_dir():
        raise UsageError(f"adapter directory {str(root)!r} not found")
    for candidate in (root, root / "adapter"):
        if (candidate / ADAPTER_CONFIG).is_file():
            try:
                config = json.loads((candidate / ADAPTER_CONFIG).read_text())
            except json.JSONDecodeError as e:
                raise UsageError(f"{candidate / ADAPTER_CONFIG} is not valid JSON: {e}") from None
            return SavedAdapter(candidate, config)
    raise UsageError(f"{str(root)!r} is not a rankwise adapter directory: it has no {ADAPTER_CONFIG} (nor "
                     f"adapter/{ADAPTER_CONFIG}); write one with rw.save_adapter or 'rankwise train' with an "
                     "adapter method")


def _run_model(adapter: SavedAdapter) -> str | None:
    """The ``--model`` of the ``rankwise train`` run that saved this adapter, if its record is beside it."""
    record_file = adapter.path.parent / RUN_RECORD
    try:
        record = json.loads(record_file.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict) or Path(str(record.get("saved", ""))).name != adapter.path.name:
        return None
    return (record.get("run") or {}).get("model")


def _check_loadable(name: str) -> None:
    """UsageError unless ``name`` is a local directory or a packaged model whose weights are fixed."""
    from ..models import resolve_model_name

    check_model_name(name)
    if os.path.isdir(name):
        return
    key = resolve_model_name(name)
    if key.startswith("scratch-"):
        raise UsageError(f"base model {name!r} is randomly initialized on every load, so an adapter trained on "
                         "it cannot be applied to a new copy; pass --model with a directory of the exact base weights")


def _base_name(adapter: SavedAdapter, model: str | None) -> str:
    if model is not None:
        _check_loadable(model)
        return model
    recorded = [(name, source) for name, source in ((_run_model(adapter), RUN_RECORD),
                                                    (adapter.config.get("base_model"), "rankwise_adapter.json"))
                if name]
    for name, _ in recorded:
        try:
            _check_loadable(name)
            return name
        except ValueError:
            continue
    if recorded:
        named = ", ".join(f"{name!r} ({source})" for name, source in recorded)
        raise UsageError(f"the adapter in {adapter.path} was trained on {named}, which is not a packaged model "
                         "or a directory here; pass --model NAME_OR_DIR")
    raise UsageError(f"the adapter in {adapter.path} does not record its base model (no base_model in "
                     f"rankwise_adapter.json, no {RUN_RECORD} of a 'rankwise train' run beside it); "
                     "pass --model NAME_OR_DIR")


def _num_labels(adapter: SavedAdapter, head: str) -> int:
    """Output rows of the trained head (``<head>.weight``, or ``<head>.out_proj.weight`` for RoBERTa-style)."""
    from safetensors import safe_open

    from ..io import ADAPTER_WEIGHTS

    with safe_open(str(adapter.path / ADAPTER_WEIGHTS), framework="pt") as f:
        keys = set(f.keys())
        for key in (f"{head}.weight", f"{head}.out_proj.weight"):
            if key in keys:
                return int(f.get_slice(key).get_shape()[0])
    raise UsageError(f"the adapter trains the head {head!r} but holds no {head}.weight to count its labels")


def _task_without_head(model: str) -> tuple[str, int | None]:
    """``causal-lm`` for a model with an LM head, ``seq-cls`` for a saved classifier (its own head), else
    ``base``."""
    from ..models import MODELS, resolve_model_name

    if not os.path.isdir(model):
        return ("causal-lm" if "causal-lm" in MODELS[resolve_model_name(model)].tasks else "base"), None
    try:
        architectures = json.loads((Path(model) / "config.json").read_text()).get("architectures") or []
    except (OSError, json.JSONDecodeError):
        architectures = []
    for suffix, task in (("ForCausalLM", "causal-lm"), ("ForSequenceClassification", "seq-cls")):
        if any(str(a).endswith(suffix) for a in architectures):
            return task, None
    return "base", None


def base_model(adapter: SavedAdapter, model: str | None = None) -> BaseModel:
    """The base model of ``adapter`` (``model`` overrides the recorded one) and the task to load it with."""
    from ..layout import CLASSIFIER_NAMES

    name = _base_name(adapter, model)
    heads = [m for m in adapter.config.get("trainable_modules") or [] if m.split(".")[-1] in CLASSIFIER_NAMES]
    if heads:
        return BaseModel(name, "seq-cls", _num_labels(adapter, heads[0]))
    return BaseModel(name, *_task_without_head(name))


def prepare(args: argparse.Namespace, adapter: SavedAdapter) -> BaseModel:
    """Check ``--output`` (before anything is loaded) and find the adapter's base model."""
    check_output_dir(args.output, args.overwrite, source=adapter.path)
    return base_model(adapter, args.model)


def load_adapted(adapter: SavedAdapter, base: BaseModel) -> tuple[Any, Any]:
    """``(model, tokenizer)``: ``base`` loaded offline with the adapter injected and its tensors loaded."""
    from ..io import load_adapter
    from ..models import load_model, quiet_transformers

    quiet_transformers()
    model, tokenizer = load_model(base.model, task=base.task, num_labels=base.num_labels)
    try:
        load_adapter(model, adapter.path)
    except (ValueError, KeyError, AttributeError) as e:
        raise UsageError(f"the adapter in {adapter.path} does not fit base model {base.model!r} ({base.task}): "
                         f"{e}; pass --model with the model it was trained on") from None
    return model, tokenizer
