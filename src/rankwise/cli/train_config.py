"""The settings of a ``rankwise train`` run: defaults < a YAML file < command-line flags, checked
before anything heavy is loaded."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from ..checks import integer
from ..train import FULL_FINETUNE, HEAD_ONLY
from .common import (
    UsageError,
    check_model_name,
    coerce_number,
    dtype_name,
    key_aliases,
    key_values,
    parse_targets,
)

#: Every key a run config (YAML file or flags) may set, with its default.
TRAIN_DEFAULTS: dict[str, Any] = {
    "model": "minilm-l6",
    "data": "bbc",
    "task": "auto",
    "method": "lora",
    "targets": "all-linear",
    "quantize": None,  # "nf4" / "fp4": the base's linear layers are quantized to 4 bits before adapting (QLoRA)
    "options": {},
    "lr": None,  # None: 5e-5 for full fine-tuning, 5e-3 for head-only, 1e-3 for adapters
    "epochs": 1,
    "max_steps": None,
    "batch_size": 8,
    "grad_accum": 1,  # batches per optimizer step (gradient accumulation)
    "dtype": "fp32",  # the dtype the model's weights are loaded in (adapters stay fp32): fp32, bf16, fp16
    "precision": "fp32",  # fp32, or bf16 / fp16 mixed precision (autocast; fp16 with a GradScaler)
    "gradient_checkpointing": False,  # recompute activations in backward (Hugging Face models)
    "compile": False,  # torch.compile the model (nn.Module.compile: in place, same state-dict keys)
    "max_length": 128,
    "weight_decay": 0.0,
    "warmup_steps": 0,
    "schedule": "linear",
    "max_grad_norm": 1.0,
    "skip_nonfinite": True,  # the CLI skips (and counts) steps with NaN/inf gradients
    "optimizer": "adamw",
    "rank": None,  # adapter methods: the adapter's r; none/head: the projected optimizer's subspace rank
    "update_gap": None,  # projected optimizers: steps between subspace refreshes
    "scale": None,  # projected optimizers: update scale
    "optimizer_options": {},
    "eval_every": 0,
    "checkpoint_every": 0,
    "seed": 0,
    "device": "auto",
    "train_limit": None,
    "test_limit": None,
    "val_size": 64,  # held out of the training data for methods that fit choices on validation data
    "output": None,  # None: runs/<method>
    "resume": None,
    "progress": True,
}
#: Method options accepted at the top level of a YAML file and as their own flags (the adapter rank is
#: ``rank``, alias ``r``: see ``_route``).
OPTION_KEYS = ("alpha", "init", "dropout")
#: Optimizer settings with their own flags; they apply to projected optimizers only.
PROJECTED_KEYS = ("rank", "update_gap", "scale")
DEFAULT_LR = {FULL_FINETUNE: 5e-5, HEAD_ONLY: 5e-3}
ADAPTER_LR = 1e-3
TASK_NAMES = ("auto", "seq-cls", "causal-lm")
#: Values kept as written in YAML (paths and names are never numbers).
VERBATIM_KEYS = ("model", "data", "output", "resume")
#: Settings that must be strings (names, paths and choices).
STRING_KEYS = ("model", "data", "task", "method", "schedule", "optimizer", "device", "output", "dtype", "precision")

#: The run's settings as written into its output directory (``--resume`` compares against them).
RUN_CONFIG = "run_config.json"
#: Settings that never change what is trained: a resume may give other values.
RUN_FREE_KEYS = ("output", "resume", "progress", "device", "eval_every", "checkpoint_every", "test_limit",
                 "gradient_checkpointing", "compile",
                 *PROJECTED_KEYS)  # the routed flags: their values are compared in options / optimizer_options
#: Settings a resume cannot change: the checkpoint's tensors and optimizer state depend on them.
RUN_FIXED_KEYS = ("model", "task", "method", "targets", "quantize", "optimizer", "optimizer_options")
#: Method options a resume may change when allowed (the others shape the adapter or its base weights).
CHANGEABLE_OPTIONS = ("alpha", "dropout")


def projected_optimizers() -> list[str]:
    """Optimizers with a subspace rank: ``rankwise.optim.OPTIMIZERS`` except plain AdamW, and the layer samplers
    that project the sampled layers' gradients (OwLore: GaLore at ``rank``, ``update_gap``, ``scale``)."""
    import inspect

    from ..optim.factory import OPTIMIZERS, SAMPLERS

    samplers = [name for name, cls in SAMPLERS.items() if "rank" in inspect.signature(cls).parameters]
    return [name for name in OPTIMIZERS if name != "adamw"] + samplers


def _yaml_key(key: Any, where: str) -> str:
    """A YAML key as a settings key: dashes as underscores, old flag spellings (``r``, ``steps``,
    ``block_size``) as the current ones."""
    k = str(key).replace("-", "_")
    k = key_aliases().get(k, k)
    if k not in TRAIN_DEFAULTS and k not in OPTION_KEYS and k != "options":
        allowed = sorted([*TRAIN_DEFAULTS, *OPTION_KEYS, *key_aliases()])
        raise UsageError(f"config file {where!r}: unknown key {key!r}; allowed keys: {allowed}")
    return k


def load_yaml_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read a run YAML: the flag names as keys (``-`` or ``_``; old spellings such as ``r`` too),
    method options under ``options`` or (for alpha, init, dropout) at the top level."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"config file {str(p)!r} not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UsageError(f"config file {str(p)!r} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UsageError(f"config file {str(p)!r} must hold a mapping of settings, got {type(data).__name__}")
    out: dict[str, Any] = {}
    options: dict[str, Any] = {}
    for key, value in data.items():
        k = _yaml_key(key, str(p))
        value = value if k in VERBATIM_KEYS else coerce_number(value)
        if k == "max_grad_norm" and isinstance(value, str) and value.lower() in ("none", "null", "off"):
            value = None
        if k == "options":
            if not isinstance(value, dict):
                raise UsageError(f"config file: 'options' must be a mapping of method options, got {value!r}")
            options.update({str(ok): coerce_number(ov) for ok, ov in value.items()})
        elif k in out or k in options:
            raise UsageError(f"config file {str(p)!r}: {key!r} sets {k!r} a second time; keep one of them")
        elif k in OPTION_KEYS:
            options[k] = value
        else:
            out[k] = value
    if options:
        out["options"] = options
    # what resolving the layers reads: the method (it routes the rank) and the optimizer options
    if "method" in out and (not isinstance(out["method"], str) or not out["method"].strip()):
        raise UsageError(f"config file {str(p)!r}: method={out['method']!r} must be a non-empty string")
    if "optimizer_options" in out and not isinstance(out["optimizer_options"], dict):
        raise UsageError(f"config file {str(p)!r}: optimizer_options={out['optimizer_options']!r} must be a "
                         "mapping of optimizer arguments (KEY: VALUE)")
    return out


def _flag_layer(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags, shaped like a YAML layer (method options under ``options``)."""
    given = vars(args)
    layer = {k: v for k, v in given.items() if k in TRAIN_DEFAULTS}
    options = {k: given[k] for k in OPTION_KEYS if k in given}
    options.update(key_values(given.get("option"), "--option", "init_iters=2"))
    layer["options"] = options
    layer["optimizer_options"] = key_values(given.get("optimizer_option"), "--optimizer-option", "switch_every=50")
    return layer


def _route(layer: dict[str, Any], method: str) -> None:
    """Move a layer's optimizer flags into its ``optimizer_options`` and its ``rank`` to where it applies:
    the adapter's ``r`` for adapter methods, the optimizer's subspace ``rank`` for ``none`` / ``head``.
    One layer giving the rank twice with two values is an error."""
    optimizer_options = dict(layer.get("optimizer_options") or {})
    optimizer_options.update({k: layer[k] for k in ("update_gap", "scale") if layer.get(k) is not None})
    options = dict(layer.get("options") or {})
    rank = layer.get("rank")
    if rank is not None:
        if method in (FULL_FINETUNE, HEAD_ONLY):
            target, key, other = optimizer_options, "rank", "optimizer option rank"
        else:
            target, key, other = options, "r", "method option r"
        if target.get(key, rank) != rank:
            raise UsageError(f"the rank is given twice: rank {rank} and {other}={target[key]}; keep one")
        target[key] = rank
    layer["options"], layer["optimizer_options"] = options, optimizer_options


def resolve_train_config(args: argparse.Namespace) -> dict[str, Any]:
    """Defaults < YAML file < flags (only flags given on the command line count)."""
    config = getattr(args, "config", None)
    layers = [load_yaml_config(config) if config else {}, _flag_layer(args)]
    method = next((layer["method"] for layer in reversed(layers) if "method" in layer), TRAIN_DEFAULTS["method"])
    cfg: dict[str, Any] = {**TRAIN_DEFAULTS, "options": {}, "optimizer_options": {}}
    for layer in layers:
        _route(layer, method)
        cfg["options"].update(layer.pop("options"))
        cfg["optimizer_options"].update(layer.pop("optimizer_options"))
        cfg.update(layer)
    if isinstance(cfg["targets"], str | list | tuple):
        cfg["targets"] = parse_targets(cfg["targets"])
    if os.path.isdir(str(cfg["model"])):  # recorded with the run and the adapter: export/merge find it
        cfg["model"] = os.path.abspath(cfg["model"])
    if cfg["lr"] is None:
        cfg["lr"] = DEFAULT_LR.get(cfg["method"], ADAPTER_LR)
    if cfg["output"] is None:
        cfg["output"] = str(Path("runs") / str(cfg["method"]))
    return cfg


def _check_optimizer_options(cfg: dict[str, Any]) -> None:
    projected = projected_optimizers()
    given = [k for k in PROJECTED_KEYS if k in cfg["optimizer_options"]]
    if not given or cfg["optimizer"] in projected:
        return
    if "rank" in given:
        raise UsageError(
            f"--rank {cfg['optimizer_options']['rank']}: ranks apply only to adapter methods (their r) and to "
            f"the projected optimizers ({', '.join(projected)}); --method {cfg['method']} trains with "
            f"--optimizer {cfg['optimizer']}, which has no rank"
        )
    flags = ", ".join("--" + k.replace("_", "-") for k in given)
    raise UsageError(f"{flags} apply only to the projected optimizers ({', '.join(projected)}), "
                     f"not to --optimizer {cfg['optimizer']}")


def check_config(cfg: dict[str, Any]) -> None:
    """Fail fast (before loading anything heavy) on an unknown method, model, dataset or task, and on
    options or optimizer settings that do not apply to the method or the optimizer."""
    from ..adapters.registry import REGISTRY

    check_types(cfg)
    from ..data.datasets import COMBINED_TEXT, DATASETS

    method = cfg["method"]
    if method not in (FULL_FINETUNE, HEAD_ONLY) and method not in REGISTRY:
        raise UsageError(
            f"unknown method {method!r}; choose 'none' (full fine-tuning), 'head' (head only) or one of "
            f"{sorted(REGISTRY)} (see 'rankwise methods')"
        )
    if method in (FULL_FINETUNE, HEAD_ONLY) and cfg["options"]:
        raise UsageError(
            f"method options {sorted(cfg['options'])} apply only to adapter methods, not {method!r}; for "
            "the optimizer's subspace rank use --rank R, for other optimizer arguments --optimizer-option KEY=VALUE"
        )
    _check_optimizer_options(cfg)
    if method in REGISTRY:
        try:
            REGISTRY[method].make_config(**cfg["options"])
        except (TypeError, ValueError) as e:
            raise UsageError(str(e)) from None
    _check_quantize(cfg)
    _check_dtype(cfg)
    check_model_name(cfg["model"])
    targets = cfg["targets"]
    if isinstance(targets, str) and targets != "all-linear":
        import re

        try:
            re.compile(targets)
        except re.error as e:
            raise UsageError(f"--targets re:{targets} is not a valid regular expression ({e})") from None
    if cfg["data"] not in DATASETS and cfg["data"] not in COMBINED_TEXT:
        known = sorted([*DATASETS, *COMBINED_TEXT])
        raise UsageError(f"unknown dataset {cfg['data']!r}; choose one of {known}")
    if cfg["task"] not in TASK_NAMES:
        raise UsageError(f"--task {cfg['task']!r}; choose one of {list(TASK_NAMES)}")
    for key in ("train_limit", "test_limit"):
        try:
            integer(key, cfg[key], 1, optional=True)
        except ValueError as e:
            raise UsageError(f"{e} (or leave it out to use every example)") from None
    try:
        integer("val_size", cfg["val_size"], 1)
    except ValueError as e:
        raise UsageError(f"--val-size: {e}") from None


def _check_dtype(cfg: dict[str, Any]) -> None:
    """``dtype`` a ``dtype_name`` (stored as its short name); fp16 weights only frozen (an adapter method on a
    causal LM: nothing else trains in them), since Adam on fp16 weights diverges (docs/precision.md)."""
    cfg["dtype"] = dtype_name(cfg["dtype"])
    if cfg["dtype"] != "fp16":
        return
    trains_half = "every weight" if cfg["method"] == FULL_FINETUNE else "the classification head" if (
        cfg["method"] == HEAD_ONLY or resolve_task(cfg) == "seq-cls") else None
    if trains_half:
        raise UsageError(f"--dtype fp16 would train {trains_half} in fp16, where Adam's second moment underflows "
                         "and the run diverges; use --dtype bf16, or fp32 weights with --precision fp16")


def resolve_task(cfg: dict[str, Any]) -> str:
    """The run's task: ``--task``, or for 'auto' seq-cls on labelled data when the model has that head."""
    from ..data.datasets import DATASETS
    from ..models import MODELS, resolve_model_name

    if cfg["task"] != "auto":
        return cfg["task"]
    info = DATASETS.get(cfg["data"])
    classification = info is not None and info.kind == "classification"
    if classification and not os.path.isdir(str(cfg["model"])):
        return "seq-cls" if "seq-cls" in MODELS[resolve_model_name(cfg["model"])].tasks else "causal-lm"
    return "seq-cls" if classification else "causal-lm"


def _check_quantize(cfg: dict[str, Any]) -> None:
    """``quantize``: None or a 4-bit scheme, for adapter methods over a full-precision base."""
    from ..quant import SCHEMES

    scheme = cfg.get("quantize")
    if scheme is None:
        return
    if scheme not in SCHEMES:
        raise UsageError(f"--quantize {scheme!r}; choose one of {list(SCHEMES)} "
                         "(or leave it out for a full-precision base)")
    if cfg["method"] in (FULL_FINETUNE, HEAD_ONLY):
        raise UsageError(f"--quantize applies to adapter methods (a 4-bit base is frozen), "
                         f"not --method {cfg['method']}")
    if cfg["method"] == "loftq" or cfg["options"].get("init") == "loftq":
        raise UsageError("--quantize does not apply to LoftQ: it quantizes the layers it adapts itself "
                         "(options quant_type, double_quant, loftq_iter)")


# ----------------------------------------------------------------------------- value types
def _kind(value: Any) -> str:
    return type(value).__name__


def check_types(cfg: dict[str, Any]) -> None:
    """UsageError naming the setting whose value has the wrong type (a YAML file can give anything):
    names and paths are non-empty strings, ``progress`` a boolean, ``options`` / ``optimizer_options``
    mappings, ``targets`` a string or a list of strings, ``resume`` a path or true. Numbers are checked
    by :class:`rankwise.train.TrainConfig` and the method's config."""
    for key in STRING_KEYS:
        value = cfg.get(key)
        if not isinstance(value, str) or not value.strip():
            raise UsageError(f"{key}={value!r} must be a non-empty string (a {_kind(value)} was given)")
    for key in ("progress", "skip_nonfinite", "gradient_checkpointing", "compile"):
        if not isinstance(cfg.get(key), bool):
            raise UsageError(f"{key}={cfg.get(key)!r} must be true or false")
    for key in ("options", "optimizer_options"):
        value = cfg.get(key)
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise UsageError(f"{key}={value!r} must be a mapping of option names to values (KEY: VALUE)")
    targets = cfg.get("targets")
    if not (isinstance(targets, str) and targets) and not (
            isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets)):
        raise UsageError(f"targets={targets!r} must be 'all-linear', re:<regex> or a list of module-name suffixes")
    resume = cfg.get("resume")
    if not (resume is None or resume is True or (isinstance(resume, str) and resume.strip())):
        raise UsageError(f"resume={resume!r} must be true (the newest checkpoint under output) or a directory")


# ----------------------------------------------------------------------------- the run's settings
def run_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """The settings a resume compares (JSON values): the top-level ones, and each method option under
    its own name (``r``, ``alpha``; ``options.<name>`` where a top-level key has the name)."""
    import json

    flat = {k: v for k, v in cfg.items() if k != "options"}
    for key, value in (cfg.get("options") or {}).items():
        flat[f"options.{key}" if key in flat else key] = value
    return json.loads(json.dumps(flat, default=str))


def _fixed_keys(settings: dict[str, Any]) -> list[str]:
    options = [k for k in settings if k not in TRAIN_DEFAULTS and k.split(".")[-1] not in CHANGEABLE_OPTIONS]
    return [*RUN_FIXED_KEYS, *options]


def parse_allow_change(text: str | None, settings: dict[str, Any]) -> list[str]:
    """The settings ``--allow-change a,b`` names; UsageError for a name that is no setting or cannot change."""
    names = [n.strip().replace("-", "_") for n in (text or "").split(",") if n.strip()]
    aliases = {**key_aliases(), "r": "r", "rank": "r"}  # the adapter's rank is the option r
    names = [aliases.get(n, n) for n in names]
    fixed = [*_fixed_keys(settings), "r"]
    changeable = sorted((set(settings) | {"alpha", "dropout"}) - set(RUN_FREE_KEYS) - set(fixed))
    for name in names:
        if name in fixed:
            raise UsageError(f"--allow-change {name}: {name!r} cannot change on resume (the checkpoint's tensors "
                             "or optimizer state depend on it); start a new run (--overwrite or another --output)")
        if name not in changeable:
            raise UsageError(f"--allow-change {name!r} is not a setting a resume may change; choose from {changeable}")
    return names


def resume_changes(old: dict[str, Any], new: dict[str, Any], allow: list[str]) -> list[str]:
    """``"key: old -> new"`` for each setting that differs from the recorded run and is not allowed to
    (``val_size`` only matters to a method that holds validation data out of the training data)."""
    from ..adapters.registry import needs_validation
    from ..checkpoint import config_changes

    free = RUN_FREE_KEYS if needs_validation(str(new.get("method"))) else (*RUN_FREE_KEYS, "val_size")
    # a setting newer than the recorded run (absent from its run_config.json): that run had its default
    old = {**{k: v for k, v in TRAIN_DEFAULTS.items() if k != "options"}, **old}
    return config_changes(old, new, allow, free=free, fixed=_fixed_keys({**old, **new}))


def check_optimizer(cfg: dict[str, Any]) -> None:
    """Build the run's optimizer once over a placeholder weight (no memory: the meta device), so that a bad
    optimizer argument (``--update-gap 0``, ``--optimizer-option bogus=1``) fails before the model loads.
    The layer samplers (badam, lisa, owlore) need the model itself and are checked when it is built."""
    import torch

    from ..optim.factory import OPTIMIZERS, SAMPLERS, make
    from ..optim.projected import ProjectedOptimizer

    name = cfg["optimizer"]
    if name in SAMPLERS or name not in OPTIMIZERS:
        return
    kwargs = {"lr": cfg["lr"], "weight_decay": cfg["weight_decay"], **cfg["optimizer_options"]}
    projected = isinstance(OPTIMIZERS[name], type) and issubclass(OPTIMIZERS[name], ProjectedOptimizer)
    rank = kwargs.pop("rank", 1 if name == "apollo_mini" else 128)
    kwargs.pop("targets", None)
    try:
        if projected:
            integer("rank", rank, 1)
            weight = torch.empty(rank + 1, rank + 1, device="meta", requires_grad=True)
            make(name, [{"params": [weight], "rank": rank}], **kwargs)
        else:
            make(name, [torch.empty(2, 2, device="meta", requires_grad=True)], **kwargs)
    except (TypeError, ValueError) as e:
        raise UsageError(f"--optimizer {name}: {e}") from None
