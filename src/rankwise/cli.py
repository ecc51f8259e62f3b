"""``rankwise`` command line: a thin layer over the library (``methods``, ``train``, ``demo``).

Bad input (an unknown method, model, dataset or option) prints one ``rankwise: error: ...`` line and
exits with status 2; nothing here prints a traceback for a user mistake (``RANKWISE_DEBUG=1`` shows it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXIT_USAGE = 2


class UsageError(ValueError):
    """A user mistake reported as one line with exit status 2."""


# ----------------------------------------------------------------------------- helpers
_Formatter = argparse.RawDescriptionHelpFormatter


def _parse_value(text: str) -> Any:
    """``"8"`` -> 8, ``"1e-3"`` -> 0.001, ``"true"`` -> True, ``"null"`` -> None, else the string."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _coerce_number(value: Any) -> Any:
    """YAML 1.1 reads ``2e-3`` as a string; turn numeric-looking strings into int/float."""
    if isinstance(value, str):
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
    return value


def parse_targets(value: Any) -> Any:
    """``all-linear``; ``re:<regex>`` (full match); ``a,b,c`` or a list = module-name suffixes."""
    if isinstance(value, list | tuple):
        return [str(v) for v in value]
    value = str(value)
    if value == "all-linear":
        return value
    if value.startswith("re:"):
        return value[3:]
    return [t.strip() for t in value.split(",") if t.strip()]


# ----------------------------------------------------------------------------- methods
def _method_rows(family: str | None = None) -> list[dict[str, Any]]:
    from .adapters.registry import REGISTRY

    rows = []
    for name, spec in REGISTRY.items():
        if family and spec.family != family:
            continue
        rows.append({
            "name": name, "family": spec.family, "status": getattr(spec, "status", "implemented"),
            "export": spec.export, "summary": spec.summary, "paper": spec.paper,
        })
    return rows


def cmd_methods(args: argparse.Namespace) -> int:
    from .adapters.registry import FAMILIES
    from .report import Column, markdown_table, text_table

    if args.family is not None and args.family not in FAMILIES:
        raise UsageError(f"--family {args.family!r} is not a family; choose one of {list(FAMILIES)}")
    rows = _method_rows(args.family)
    if args.format == "json":
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return 0
    def cut(n: int):
        return lambda v: v if len(v) <= n else v[: n - 1] + "…"

    cols = [Column("name", "name", align="<"), Column("family", "family", align="<"),
            Column("status", "status", align="<"), Column("export", "export", align="<"),
            Column("summary", "summary", cut(64) if args.format == "text" else str, align="<"),
            Column("paper", "paper", cut(60) if args.format == "text" else str, align="<")]
    print(markdown_table(rows, cols) if args.format == "markdown" else text_table(rows, cols))
    if args.format == "text":
        print(f"\n{len(rows)} methods. 'rankwise methods --format markdown' shows full summaries and papers.")
    return 0


# ----------------------------------------------------------------------------- train
#: Every key a run config (YAML file or flags) may set, with its default.
TRAIN_DEFAULTS: dict[str, Any] = {
    "model": "minilm-l6",
    "data": "bbc",
    "task": "auto",
    "method": "lora",
    "targets": "all-linear",
    "options": {},
    "lr": None,  # None: 5e-5 for full fine-tuning, 5e-3 for head-only, 1e-3 for adapters
    "epochs": 1,
    "max_steps": None,
    "batch_size": 8,
    "max_length": 128,
    "weight_decay": 0.0,
    "warmup_steps": 0,
    "schedule": "linear",
    "max_grad_norm": 1.0,
    "optimizer": "adamw",
    "rank": None,  # projected optimizers: subspace rank
    "update_gap": None,  # projected optimizers: steps between subspace refreshes
    "scale": None,  # projected optimizers: update scale
    "optimizer_options": {},
    "eval_every": 0,
    "checkpoint_every": 0,
    "seed": 0,
    "device": "auto",
    "train_limit": None,
    "test_limit": None,
    "output": None,  # None: runs/<method>
    "resume": None,
    "progress": True,
}
#: Method options accepted at the top level of a YAML file and as their own flags.
OPTION_KEYS = ("r", "alpha", "init", "dropout")
DEFAULT_LR = {"none": 5e-5, "head": 5e-3}
ADAPTER_LR = 1e-3
TASK_NAMES = ("auto", "seq-cls", "causal-lm")


def load_yaml_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read a run YAML: keys of ``TRAIN_DEFAULTS`` (``-`` or ``_``), method options under ``options``
    or (for r, alpha, init, dropout) at the top level."""
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
        k = str(key).replace("-", "_")
        value = _coerce_number(value) if k not in ("model", "data", "output", "resume") else value
        if k in OPTION_KEYS:
            options[k] = value
        elif k == "options":
            if not isinstance(value, dict):
                raise UsageError(f"config file: 'options' must be a mapping of method options, got {value!r}")
            options.update({str(ok): _coerce_number(ov) for ok, ov in value.items()})
        elif k in TRAIN_DEFAULTS:
            out[k] = value
        else:
            allowed = sorted([*TRAIN_DEFAULTS, *OPTION_KEYS])
            raise UsageError(f"config file {str(p)!r}: unknown key {key!r}; allowed keys: {allowed}")
    if options:
        out["options"] = options
    return out


def _key_values(items: list[str] | None, flag: str, example: str) -> dict[str, Any]:
    """``["k=v", ...]`` from a repeatable flag as a dict with parsed values."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise UsageError(f"{flag} {item!r} must look like KEY=VALUE (e.g. {flag} {example})")
        k, v = item.split("=", 1)
        out[k.strip()] = _parse_value(v)
    return out


def resolve_train_config(args: argparse.Namespace) -> dict[str, Any]:
    """Defaults < YAML file < flags (only flags given on the command line count)."""
    cfg = {**TRAIN_DEFAULTS, "options": {}}
    given = vars(args)
    if given.get("config"):
        y = load_yaml_config(given["config"])
        cfg["options"].update(y.pop("options", {}))
        cfg.update(y)
    options = dict(cfg["options"])
    for key, value in given.items():
        if key in ("config", "command", "func", "option", "optimizer_option"):
            continue
        if key in OPTION_KEYS:
            options[key] = value
        elif key in TRAIN_DEFAULTS:
            cfg[key] = value
    options.update(_key_values(given.get("option"), "--option", "init_iters=2"))
    cfg["options"] = options
    cfg["optimizer_options"] = {
        **cfg["optimizer_options"],
        **_key_values(given.get("optimizer_option"), "--optimizer-option", "switch_every=50"),
        **{k: cfg[k] for k in ("rank", "update_gap", "scale") if cfg[k] is not None},
    }
    cfg["targets"] = parse_targets(cfg["targets"])
    if cfg["lr"] is None:
        cfg["lr"] = DEFAULT_LR.get(cfg["method"], ADAPTER_LR)
    if cfg["output"] is None:
        cfg["output"] = str(Path("runs") / str(cfg["method"]))
    return cfg


def _check_names(cfg: dict[str, Any]) -> None:
    """Fail fast (before loading anything heavy) on an unknown method, model, dataset or task."""
    from .adapters.registry import REGISTRY
    from .data.datasets import COMBINED_TEXT, DATASETS
    from .models import resolve_model_name

    method = cfg["method"]
    if method not in ("none", "head") and method not in REGISTRY:
        raise UsageError(
            f"unknown method {method!r}; choose 'none' (full fine-tuning), 'head' (head only) or one of "
            f"{sorted(REGISTRY)} (see 'rankwise methods')"
        )
    if method in ("none", "head") and cfg["options"]:
        raise UsageError(f"method options {sorted(cfg['options'])} apply only to adapter methods, not {method!r}")
    if method in REGISTRY:
        try:
            REGISTRY[method].make_config(**cfg["options"])
        except (TypeError, ValueError) as e:
            raise UsageError(str(e)) from None
    if not os.path.isdir(str(cfg["model"])):
        try:
            resolve_model_name(str(cfg["model"]))
        except ValueError as e:
            raise UsageError(str(e)) from None
    if cfg["data"] not in DATASETS and cfg["data"] not in COMBINED_TEXT:
        known = sorted([*DATASETS, *COMBINED_TEXT])
        raise UsageError(f"unknown dataset {cfg['data']!r}; choose one of {known}")
    if cfg["task"] not in TASK_NAMES:
        raise UsageError(f"--task {cfg['task']!r}; choose one of {list(TASK_NAMES)}")


def _resolve_task(cfg: dict[str, Any]) -> str:
    from .data.datasets import DATASETS
    from .models import MODELS, resolve_model_name

    if cfg["task"] != "auto":
        return cfg["task"]
    info = DATASETS.get(cfg["data"])
    classification = info is not None and info.kind == "classification"
    if classification and not os.path.isdir(str(cfg["model"])):
        return "seq-cls" if "seq-cls" in MODELS[resolve_model_name(cfg["model"])].tasks else "causal-lm"
    return "seq-cls" if classification else "causal-lm"


def _build(cfg: dict[str, Any], task: str):
    """(model, tokenizer, train loader, eval loader) for the run."""
    from . import data
    from .models import load_model

    seed = cfg["seed"]
    if task == "seq-cls":
        if data.DATASETS.get(cfg["data"]) is None or data.DATASETS[cfg["data"]].kind != "classification":
            raise UsageError(f"dataset {cfg['data']!r} has no labels; use --task causal-lm")
        train_ds = data.load_classification(cfg["data"], "train", seed=seed, limit=cfg["train_limit"])
        test_ds = data.load_classification(cfg["data"], "test", seed=seed, limit=cfg["test_limit"])
        import torch

        torch.manual_seed(seed)  # the new classification head
        model, tok = load_model(cfg["model"], task="seq-cls", num_labels=train_ds.num_labels)
        train_loader = data.classification_loader(train_ds, tok, cfg["batch_size"], cfg["max_length"], True, seed)
        eval_loader = data.classification_loader(test_ds, tok, max(32, cfg["batch_size"]), cfg["max_length"], False)
    else:
        model, tok = load_model(cfg["model"], task="causal-lm")
        train_blocks = data.lm_blocks(data.load_text(cfg["data"], "train", seed=seed, limit=cfg["train_limit"]),
                                      tok, cfg["max_length"])
        test_blocks = data.lm_blocks(data.load_text(cfg["data"], "test", seed=seed, limit=cfg["test_limit"]),
                                     tok, cfg["max_length"])
        if len(train_blocks) == 0 or len(test_blocks) == 0:
            raise UsageError("too little text for one block of max_length tokens; raise the limits or lower --max-length")
        train_loader = data.lm_loader(train_blocks, cfg["batch_size"], True, seed)
        eval_loader = data.lm_loader(test_blocks, cfg["batch_size"], False, seed)
    return model, tok, train_loader, eval_loader


def cmd_train(args: argparse.Namespace) -> int:
    cfg = resolve_train_config(args)
    _check_names(cfg)
    from torch.utils.data import DataLoader

    from .models import quiet_transformers
    from .io import save_adapter, save_tensors, write_json
    from .train import TrainConfig, prepare_model, train

    quiet_transformers()
    try:
        tcfg = TrainConfig(
            lr=float(cfg["lr"]), epochs=cfg["epochs"], max_steps=cfg["max_steps"], batch_size=cfg["batch_size"],
            max_length=cfg["max_length"], weight_decay=float(cfg["weight_decay"]), warmup_steps=cfg["warmup_steps"],
            schedule=cfg["schedule"], max_grad_norm=cfg["max_grad_norm"], optimizer=cfg["optimizer"],
            optimizer_kwargs=dict(cfg["optimizer_options"]),
            eval_every=cfg["eval_every"], checkpoint_every=cfg["checkpoint_every"], output_dir=cfg["output"],
            seed=cfg["seed"], device=cfg["device"], progress=bool(cfg["progress"]),
        )
    except (TypeError, ValueError) as e:
        raise UsageError(str(e)) from None
    task = _resolve_task(cfg)
    model, tok, train_loader, eval_loader = _build(cfg, task)
    init_loader = DataLoader(train_loader.dataset, batch_size=cfg["batch_size"], collate_fn=train_loader.collate_fn)
    prepare_model(model, cfg["method"], targets=cfg["targets"], init_data=init_loader, **cfg["options"])
    resume = cfg["resume"]
    if resume is True:
        resume = cfg["output"]
    print(f"rankwise train: {cfg['method']} on {cfg['model']} ({task}) / {cfg['data']}: "
          f"{len(train_loader.dataset)} train, {len(eval_loader.dataset)} eval items -> {cfg['output']}",
          file=sys.stderr)
    result = train(model, train_loader, eval_loader, tcfg, resume_from=resume)

    out = Path(cfg["output"])
    out.mkdir(parents=True, exist_ok=True)
    if cfg["method"] == "none":
        model.save_pretrained(str(out / "model"))
        tok.save_pretrained(str(out / "model"))
        saved = out / "model"
    elif cfg["method"] == "head":
        saved = out / "head.safetensors"
        save_tensors({n: p for n, p in model.named_parameters() if p.requires_grad}, saved)
    else:
        saved = save_adapter(model, out / "adapter")
    record = {"run": {**cfg, "task": task}, "metrics": result.metrics, "result": result.to_dict(),
              "saved": str(saved)}
    write_json(out / "metrics.json", record)
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.metrics.items()}
    print(f"{cfg['method']}: {shown}; trainable {result.trainable_params:,} / {result.total_params:,}; "
          f"optimizer state {result.optimizer_state_bytes:,} B; {result.wall_time_s:.1f} s")
    print(f"wrote {out / 'metrics.json'} and {saved}")
    return 0


# ----------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from .demo import QUICK, DemoSettings, run_demo

    settings = QUICK if args.quick else DemoSettings()
    over = {k: getattr(args, k) for k in ("steps", "batch_size", "max_length", "test_limit", "train_limit", "r",
                                          "seed", "device") if getattr(args, k) is not None}
    settings = replace(settings, **over)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    lrs = {}
    for item in args.lr or []:
        label, _, value = item.partition("=")
        try:
            lrs[label.strip()] = float(value)
        except ValueError:
            raise UsageError(f"--lr {item!r} must look like METHOD=VALUE (e.g. --lr lora=3e-3)") from None
    run_demo(settings, methods=methods, output=args.output, progress=not args.no_progress, lrs=lrs)
    return 0


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rankwise",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Low-rank adapters, projected optimizers, sparse training and compression.",
        epilog=textwrap.dedent("""\
            examples:
              rankwise methods                                  # every registered adapter method
              rankwise train --method lora --r 8                # MiniLM + BBC News with LoRA
              rankwise train run.yaml --lr 2e-3                 # a YAML run, one value overridden
              rankwise demo                                     # head-only vs full FT vs adapters (~5 min CPU)
            'rankwise COMMAND --help' explains each command."""),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    # methods
    p = sub.add_parser(
        "methods", help="list every registered adapter method", formatter_class=_Formatter,
        description="List every adapter method in rankwise.REGISTRY: name, family, status, PEFT export "
                    "format, a one-line summary and the paper.",
        epilog="examples:\n  rankwise methods\n  rankwise methods --family adapter-init\n"
               "  rankwise methods --format markdown > METHODS.md\n  rankwise methods --format json",
    )
    p.add_argument("--family", default=None, help="only this family: adapter, adapter-init or training-dynamics")
    p.add_argument("--format", choices=("text", "markdown", "json"), default="text", help="output format [default: text]")
    p.set_defaults(func=cmd_methods)

    # train
    p = sub.add_parser(
        "train", help="fine-tune a packaged model with an adapter, full FT or head-only",
        formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=argparse.SUPPRESS,
        description=textwrap.dedent("""\
            Fine-tune a model on a packaged dataset and write metrics.json plus the trained
            adapter (rankwise format, rw.load_adapter) into --output.

            Settings come from defaults < a YAML file (first argument) < flags. YAML keys are the
            flag names (dashes or underscores); method options go under 'options:' or, for r,
            alpha, init and dropout, at the top level.

            --method: any adapter in 'rankwise methods', 'none' (full fine-tuning) or 'head'
            (train only the classification head). Method options: --r, --alpha, --init,
            --dropout, or --option KEY=VALUE for any other field of the method's config."""),
        epilog=textwrap.dedent("""\
            examples:
              rankwise train                                    # minilm-l6 + bbc + lora, 1 epoch
              rankwise train --method dora --r 16 --lr 2e-3 --max-steps 200
              rankwise train --method lora --init pissa --targets query,value
              rankwise train --method none --lr 5e-5            # full fine-tuning
              rankwise train --method head --lr 5e-3            # head only
              rankwise train --model smollm2 --data stdlib-code --method lora --max-length 256
              rankwise train run.yaml --seed 1 --checkpoint-every 50 --output runs/a
              rankwise train run.yaml --output runs/a --resume  # continue from the newest checkpoint

            run.yaml:
              model: minilm-l6
              data: bbc
              method: lora
              r: 8
              alpha: 16
              lr: 2.0e-3
              max_steps: 300
              options: {init: pissa}"""),
    )
    p.add_argument("config", nargs="?", help="YAML run file (flags override its values)")
    g = p.add_argument_group("what to train")
    g.add_argument("--model", help="minilm-l6 (alias minilm), smollm2-135m (alias smollm2) or a local HF model dir "
                                   "[default: minilm-l6]")
    g.add_argument("--data", help="bbc, drug-reviews (classification); stdlib-code, bbc+stdlib-code (LM text) "
                                  "[default: bbc]")
    g.add_argument("--task", help="auto (seq-cls for labelled data when the model supports it), seq-cls, "
                                  "causal-lm [default: auto]")
    g.add_argument("--method", help="adapter name, 'none' = full fine-tuning, 'head' = head only [default: lora]")
    g.add_argument("--targets", help="all-linear, comma-separated module-name suffixes (query,value) or "
                                     "re:<full-match regex> [default: all-linear]")
    g.add_argument("--r", type=int, help="adapter rank")
    g.add_argument("--alpha", type=float, help="adapter scaling alpha (LoRA-family)")
    g.add_argument("--init", help="adapter initialization (LoRA: default, pissa, olora, lora_ga, ...)")
    g.add_argument("--dropout", type=float, help="dropout on the adapter input")
    g.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="any other method option, repeatable (e.g. --option init_iters=2)")
    g = p.add_argument_group("optimization")
    g.add_argument("--lr", type=float, help="learning rate [default: 1e-3 adapters, 5e-5 none, 5e-3 head]")
    g.add_argument("--epochs", type=int, help="passes over the training data [default: 1]")
    g.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    g.add_argument("--batch-size", type=int, help="[default: 8]")
    g.add_argument("--max-length", type=int, help="tokens per example / LM block [default: 128]")
    g.add_argument("--weight-decay", type=float, help="[default: 0]")
    g.add_argument("--warmup-steps", type=int, help="linear warmup steps [default: 0]")
    g.add_argument("--schedule", help="constant, linear or cosine [default: linear]")
    g.add_argument("--max-grad-norm", type=_float_or_none, help="gradient clipping norm, 'none' = off [default: 1.0]")
    g.add_argument("--optimizer", help="adamw, or a memory-efficient optimizer from rankwise.optim: galore, "
                   "galore_adafactor, galore_8bit, q_galore, fira, frugal, apollo, apollo_mini, gradnormlorp, "
                   "flora_opt, osd, dct_proj, badam, lisa, owlore [default: adamw]")
    g.add_argument("--rank", type=int, help="projected optimizers: subspace rank [default: 128]")
    g.add_argument("--update-gap", type=int, help="projected optimizers: steps between subspace refreshes")
    g.add_argument("--scale", type=float, help="projected optimizers: scale of the projected update")
    g.add_argument("--optimizer-option", action="append", metavar="KEY=VALUE",
                   help="any other optimizer argument, repeatable (e.g. --optimizer-option switch_every=50)")
    g.add_argument("--seed", type=int, help="seed for data order, init and dropout [default: 0]")
    g.add_argument("--device", help="auto (cuda if available), cpu, cuda, cuda:N [default: auto]")
    g = p.add_argument_group("data, evaluation and output")
    g.add_argument("--train-limit", type=int, help="use only the first N training examples/documents")
    g.add_argument("--test-limit", type=int, help="evaluate on the first N test examples/documents")
    g.add_argument("--eval-every", type=int, help="evaluate every N steps (0 = only at the end) [default: 0]")
    g.add_argument("--checkpoint-every", type=int, help="checkpoint every N steps under OUTPUT/checkpoints")
    g.add_argument("--output", help="output directory [default: runs/<method>]")
    g.add_argument("--resume", nargs="?", const=True,
                   help="continue from the newest checkpoint under --output (or under the given directory)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=cmd_train)

    # demo
    p = sub.add_parser(
        "demo", help="compare head-only, full FT and adapters on MiniLM + BBC News", formatter_class=_Formatter,
        description=textwrap.dedent("""\
            The main job on the embedded default: all-MiniLM-L6-v2 fine-tuned on BBC News (5 topics)
            with head-only training, full fine-tuning and the registered adapter methods (LoRA,
            rsLoRA, DoRA, PiSSA, VeRA, LoRA-XS, ... in that order) under one budget: the same
            steps, batch size, max_length, seed and initial head; only the learning rate is set
            per method family. Prints a table (test accuracy, trainable parameters, optimizer-state
            bytes, wall time, peak memory) and writes results.json, report.md and
            accuracy_vs_params.png into --output. The default run takes 3-5 minutes on 2 CPU cores."""),
        epilog="examples:\n  rankwise demo\n  rankwise demo --quick --output /tmp/demo   # seconds; numbers are meaningless\n"
               "  rankwise demo --methods lora,dora,vera --steps 100 --lr vera=2e-2\n"
               "  rankwise demo --methods head,full,lora_sb",
    )
    p.add_argument("--quick", action="store_true", help="a tiny run (a few steps on a few short examples)")
    p.add_argument("--methods", default=None,
                   help="comma-separated labels or adapter names (head-only/head, full-ft/none, lora, ...); "
                        "default: head-only, full-ft and the first 6 registered of the preferred list")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per method (default: 80; quick: 3)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default: 8)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per example (default: 64; quick: 32)")
    p.add_argument("--train-limit", type=int, default=None, help="training examples available (default: all)")
    p.add_argument("--test-limit", type=int, default=None, help="test examples evaluated (default: 300)")
    p.add_argument("--r", type=int, default=None, help="adapter rank for every adapter (default: 8)")
    p.add_argument("--seed", type=int, default=None, help="seed (default: 0)")
    p.add_argument("--device", default=None, help="auto, cpu, cuda (default: auto)")
    p.add_argument("--lr", action="append", metavar="METHOD=VALUE",
                   help="override one method's learning rate, repeatable (e.g. --lr lora=3e-3)")
    p.add_argument("--output", default="demo-out", help="output directory (default: demo-out)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)

    from .compress.cli import add_parser as add_compress_parser
    from .compress.cli import run as run_compress

    add_compress_parser(sub).set_defaults(func=run_compress)
    return parser


def _float_or_none(text: str) -> float | None:
    if text.lower() in ("none", "null", "off", "0"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rankwise`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("rankwise: interrupted", file=sys.stderr)
        return 130
    except (UsageError, ValueError, FileNotFoundError) as e:
        if os.environ.get("RANKWISE_DEBUG"):
            raise
        print(f"rankwise: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as e:
        from .data.datasets import MissingAssetError

        if isinstance(e, MissingAssetError):
            print(f"rankwise: error: {e}", file=sys.stderr)
            return EXIT_USAGE
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
