"""``rankwise train``: fine-tune a packaged (or local) model with an adapter, full fine-tuning or the head
only, and write ``metrics.json`` plus what was trained into ``--output``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from .common import Formatter, UsageError, add_flag, check_writable, text_loader
from .train_config import (
    RUN_CONFIG,
    check_config,
    check_optimizer,
    parse_allow_change,
    resolve_task,
    resolve_train_config,
    resume_changes,
    run_settings,
)

DESCRIPTION = """\
Fine-tune a model on a packaged dataset and write metrics.json plus the trained
adapter (rankwise format: rw.load_adapter, 'rankwise export', 'rankwise merge') into
--output.

Settings come from defaults < a YAML file (first argument) < flags. YAML keys are the
flag names (dashes or underscores, old spellings such as r too); method options go under
'options:' or, for alpha, init and dropout, at the top level.

--method: any adapter in 'rankwise methods', 'none' (full fine-tuning) or 'head'
(train only the classification head). --rank is the adapter's rank r for adapter methods
and the projected optimizer's subspace rank for --method none / head (with an adapter
method, set the optimizer's rank with --optimizer-option rank=R). Other method options:
--alpha, --init, --dropout, or --option KEY=VALUE for any field of the method's config."""
EPILOG = """\
examples:
  rankwise train                                    # minilm-l6 + bbc + lora, 1 epoch
  rankwise train --method dora --rank 16 --lr 2e-3 --max-steps 200
  rankwise train --method lora --init pissa --targets query,value
  rankwise train --method none --lr 5e-5            # full fine-tuning
  rankwise train --method none --optimizer galore --rank 128 --update-gap 200
  rankwise train --method head --lr 5e-3            # head only
  rankwise train --model smollm2 --data stdlib-code --method lora --max-length 256
  rankwise train --model smollm2 --data stdlib-code --dtype bf16 --precision bf16 \
      --batch-size 2 --grad-accum 8 --gradient-checkpointing   # a 16-block step in little memory
  rankwise train run.yaml --seed 1 --checkpoint-every 50 --output runs/a
  rankwise train run.yaml --output runs/a --resume  # continue from the newest checkpoint
  rankwise train run.yaml --output runs/a --resume --lr 5e-4 --allow-change lr
  rankwise train run.yaml --output runs/a --overwrite   # a new run in place of the old one

run.yaml:
  model: minilm-l6
  data: bbc
  method: lora
  rank: 8
  alpha: 16
  lr: 2.0e-3
  max_steps: 300
  options: {init: pissa}"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``train`` to the ``rankwise`` subcommands."""
    p = subparsers.add_parser(
        "train", help="fine-tune a packaged model with an adapter, full FT or head-only", formatter_class=Formatter,
        argument_default=argparse.SUPPRESS, description=DESCRIPTION, epilog=EPILOG,
    )
    p.add_argument("config", nargs="?", help="YAML run file (flags override its values)")
    g = p.add_argument_group("what to train")
    add_flag(g, "model", "minilm-l6 (alias minilm), smollm2-135m (alias smollm2), scratch-20m, scratch-60m or a "
                         "local HF model dir [default: minilm-l6]")
    g.add_argument("--data", help="bbc, drug-reviews (classification); stdlib-code, bbc+stdlib-code (LM text) "
                                  "[default: bbc]")
    g.add_argument("--task", help="auto (seq-cls for labelled data when the model supports it), seq-cls, "
                                  "causal-lm [default: auto]")
    add_flag(g, "method", "adapter name, 'none' = full fine-tuning, 'head' = head only [default: lora]")
    g.add_argument("--targets", help="all-linear, comma-separated module-name suffixes (query,value) or "
                                     "re:<full-match regex> [default: all-linear]")
    add_flag(g, "rank", "adapter methods: the adapter rank r [default: the method's]; --method none/head: the "
                        "projected optimizer's subspace rank [default: 128]")
    g.add_argument("--quantize", help="quantize the base's linear layers (all-linear, head excluded) to 4 bits with "
                                      "bitsandbytes before adapting: nf4 (QLoRA) or fp4 [default: full precision]")
    g.add_argument("--alpha", type=float, help="adapter scaling alpha (LoRA-family)")
    g.add_argument("--init", help="adapter initialization (LoRA: default, pissa, olora, lora_ga, ...)")
    g.add_argument("--dropout", type=float, help="dropout on the adapter input")
    g.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="any other method option, repeatable (e.g. --option init_iters=2)")
    g = p.add_argument_group("optimization")
    add_flag(g, "lr", "learning rate [default: 1e-3 adapters, 5e-5 none, 5e-3 head]")
    g.add_argument("--epochs", type=int, help="passes over the training data [default: 1]")
    add_flag(g, "max_steps", "optimizer steps (overrides --epochs)")
    add_flag(g, "batch_size", "examples (or LM blocks) per batch; a step takes --grad-accum batches [default: 8]")
    add_flag(g, "dtype", "dtype the model's weights are loaded in: fp32, bf16 or fp16 (or float32, bfloat16, "
                         "float16; half the weight memory; adapters stay fp32; fp16 only for a frozen base: adapter "
                         "methods on a causal LM) [default: fp32]")
    g.add_argument("--precision", help="fp32, or mixed precision bf16 / fp16: forward and evaluation under "
                   "torch.autocast, fp16 with a GradScaler (needs fp32 trainable weights) [default: fp32]")
    add_flag(g, "gradient_checkpointing", "recompute each transformer block's activations in backward instead of "
                                          "keeping them: less activation memory for about one more forward; same "
                                          "update [default: off]")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model before training (in place: checkpoints and the saved adapter keep "
                        "their names); the first steps and evaluation compile, later ones run faster [default: off]")
    g.add_argument("--grad-accum", type=int, metavar="K",
                   help="gradient accumulation: batches per optimizer step, stepping as one batch of all their "
                        "rows (each loss weighted by its share of the step's labelled items), so a step sees K x "
                        "--batch-size examples with one batch's activation memory; --max-steps counts optimizer "
                        "steps [default: 1]")
    add_flag(g, "max_length", "tokens per example / LM block [default: 128]")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay of matrices [default: 0]")
    g.add_argument("--warmup-steps", type=int, help="linear warmup steps [default: 0]")
    g.add_argument("--schedule", help="constant, linear or cosine [default: linear]")
    g.add_argument("--max-grad-norm", type=_float_or_none, help="gradient clipping norm, 'none' = off [default: 1.0]")
    g.add_argument("--skip-nonfinite", action=argparse.BooleanOptionalAction,
                   help="skip (and count in metrics.json) optimizer steps whose gradients hold NaN or inf, leaving "
                        "weights and optimizer state untouched [default: on]")
    from ..train import optimizer_names

    g.add_argument("--optimizer", help="adamw, or a memory-efficient optimizer or layer sampler from rankwise.optim: "
                   f"{', '.join(n for n in optimizer_names() if n != 'adamw')} [default: adamw]")
    g.add_argument("--update-gap", type=int, help="projected optimizers: steps between subspace refreshes")
    g.add_argument("--scale", type=float, help="projected optimizers: scale of the projected update")
    g.add_argument("--optimizer-option", action="append", metavar="KEY=VALUE",
                   help="any other optimizer argument, repeatable (e.g. --optimizer-option switch_every=50)")
    add_flag(g, "seed", "seed for data order, init and dropout [default: 0]")
    g.add_argument("--nproc", type=int, help="processes: N > 1 relaunches under torchrun and trains with FSDP2 "
                   "(fully_shard per transformer layer), --batch-size being the global batch; checkpoints through "
                   "torch.distributed.checkpoint, --resume with the same N, no --quantize (docs/distributed.md) "
                   "[default: 1]")
    add_flag(g, "device", "auto (cuda if available), cpu, cuda, cuda:N [default: auto]")
    g = p.add_argument_group("data, evaluation and output")
    g.add_argument("--train-limit", type=int, help="use only the first N training examples/documents")
    g.add_argument("--test-limit", type=int, help="evaluate on the first N test examples/documents")
    g.add_argument("--val-size", type=int, help="methods that fit their own choices on held-out data while training "
                   "(autolora's selection variables, fast_forward's stopping rule): N examples (causal LM: blocks) "
                   "held out of the training data for them, never the test split; other methods train on "
                   "everything [default: 64]")
    g.add_argument("--eval-every", type=int, help="evaluate every N steps (0 = only at the end) [default: 0]")
    g.add_argument("--checkpoint-every", type=int, help="checkpoint every N steps under OUTPUT/checkpoints")
    add_flag(g, "output", "output directory [default: runs/<method>]")
    g.add_argument("--resume", nargs="?", const=True,
                   help="continue from the newest readable checkpoint under --output (or under the given directory); "
                        "the settings must be the run's (run_config.json), except --allow-change ones and a larger "
                        "--max-steps / --epochs")
    g.add_argument("--allow-change", metavar="KEYS",
                   help="with --resume: settings that may differ from the run's, comma-separated (e.g. lr,max_steps); "
                        "the model, method, targets, optimizer and adapter shape cannot change")
    add_flag(g, "overwrite", "start a new run in an --output that holds another run (its checkpoints are deleted)")
    add_flag(g, "progress", "no progress bar")
    p.set_defaults(func=run)
    return p


def _float_or_none(text: str) -> float | None:
    if text.lower() in ("none", "null", "off"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None


def _check_max_length(model: Any, max_length: int) -> None:
    """--max-length may not exceed the positions the model has (``config.max_position_embeddings``)."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and max_length > limit:
        raise UsageError(f"--max-length {max_length} is more than the {limit} positions of this model; "
                         f"choose --max-length <= {limit}")


def _hold_out(n_items: int, val_size: int, what: str) -> None:
    """UsageError when holding ``val_size`` of the ``n_items`` training items out would leave none to train on."""
    if val_size >= n_items:
        raise UsageError(f"--val-size {val_size} leaves no training data: the training split has {n_items} {what}; "
                         f"choose --val-size < {n_items}")


def _build(cfg: dict[str, Any], task: str):
    """(model, tokenizer, train loader, eval loader, val loader) for the run. The eval loader is the test split;
    the val loader (None unless the method needs one) holds the first ``val_size`` training items out of training."""
    import torch

    from .. import data
    from ..adapters.registry import needs_validation
    from ..models import load_model
    from ..planner import DTYPES

    seed, n_val = cfg["seed"], cfg["val_size"] if needs_validation(cfg["method"]) else 0
    dtype = DTYPES[cfg["dtype"]]
    val_loader = None
    if task == "seq-cls":
        if data.DATASETS.get(cfg["data"]) is None or data.DATASETS[cfg["data"]].kind != "classification":
            raise UsageError(f"dataset {cfg['data']!r} has no labels; use --task causal-lm")
        train_ds = data.load_classification(cfg["data"], "train", seed=seed, limit=cfg["train_limit"])
        test_ds = data.load_classification(cfg["data"], "test", seed=seed, limit=cfg["test_limit"])
        torch.manual_seed(seed)  # the new classification head
        model, tok = load_model(cfg["model"], task="seq-cls", num_labels=train_ds.num_labels, dtype=dtype)
        _check_max_length(model, cfg["max_length"])
        eval_batch = max(32, cfg["batch_size"])
        if n_val:
            _hold_out(len(train_ds), n_val, "examples")
            names = train_ds.label_names
            val_ds = data.TextClassification(train_ds.texts[:n_val], train_ds.labels[:n_val], names)
            train_ds = data.TextClassification(train_ds.texts[n_val:], train_ds.labels[n_val:], names)
            val_loader = data.classification_loader(val_ds, tok, eval_batch, cfg["max_length"], False)
        train_loader = data.classification_loader(train_ds, tok, cfg["batch_size"], cfg["max_length"], True, seed)
        eval_loader = data.classification_loader(test_ds, tok, eval_batch, cfg["max_length"], False)
    else:
        model, tok = load_model(cfg["model"], task="causal-lm", dtype=dtype)
        _check_max_length(model, cfg["max_length"])
        common = {"tokenizer": tok, "max_length": cfg["max_length"], "batch_size": cfg["batch_size"], "seed": seed}
        train_loader = text_loader(cfg["data"], "train", limit=cfg["train_limit"], shuffle=True, **common)
        eval_loader = text_loader(cfg["data"], "test", limit=cfg["test_limit"], shuffle=False, **common)
        if n_val:
            blocks = torch.stack(list(train_loader.dataset))  # lm_loader's dataset: the blocks, in corpus order
            _hold_out(len(blocks), n_val, "blocks")
            train_loader = data.lm_loader(blocks[n_val:], batch_size=cfg["batch_size"], shuffle=True, seed=seed)
            val_loader = data.lm_loader(blocks[:n_val], batch_size=cfg["batch_size"], shuffle=False)
    return model, tok, train_loader, eval_loader, val_loader


def _train_config(cfg: dict[str, Any]):
    from ..train import TrainConfig

    try:
        return TrainConfig(
            lr=cfg["lr"], epochs=cfg["epochs"], max_steps=cfg["max_steps"], batch_size=cfg["batch_size"],
            grad_accum=cfg["grad_accum"], precision=cfg["precision"],
            gradient_checkpointing=cfg["gradient_checkpointing"],
            max_length=cfg["max_length"], weight_decay=cfg["weight_decay"], warmup_steps=cfg["warmup_steps"],
            schedule=cfg["schedule"], max_grad_norm=cfg["max_grad_norm"], optimizer=cfg["optimizer"],
            skip_nonfinite=cfg["skip_nonfinite"],
            optimizer_kwargs=dict(cfg["optimizer_options"]),
            eval_every=cfg["eval_every"], checkpoint_every=cfg["checkpoint_every"], output_dir=cfg["output"],
            seed=cfg["seed"], device=cfg["device"], progress=cfg["progress"],
        )
    except (TypeError, ValueError) as e:
        raise UsageError(str(e)) from None


#: What a ``rankwise train`` run writes into its output directory.
RUN_FILES = (RUN_CONFIG, "metrics.json", "checkpoints", "adapter", "model", "head.safetensors")


def _save(model: Any, tok: Any, method: str, out: Path) -> Path:
    """Write what was trained (atomically): the whole model (none), the head's tensors (head) or the adapter."""
    from ..io import atomic_directory, atomic_path, save_adapter, save_tensors, write_errors
    from ..train import FULL_FINETUNE, HEAD_ONLY

    if method == FULL_FINETUNE:
        with atomic_directory(out / "model") as tmp, write_errors(out / "model"):
            model.save_pretrained(str(tmp))
            tok.save_pretrained(str(tmp))
        return out / "model"
    if method == HEAD_ONLY:
        with atomic_path(out / "head.safetensors") as tmp:
            save_tensors({n: p for n, p in model.named_parameters() if p.requires_grad}, tmp)
        return out / "head.safetensors"
    return save_adapter(model, out / "adapter")


def _remove(path: Path) -> None:
    """Delete ``path`` (a file or a directory tree), renaming a directory aside first so that a kill midway
    leaves no half-deleted checkpoint under its old name."""
    import shutil
    import tempfile

    if path.is_dir() and not path.is_symlink():
        aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
        os.replace(path, aside / path.name)
        shutil.rmtree(aside, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _recorded_settings(resume: Path) -> tuple[Path, dict[str, Any]] | None:
    """``(file, settings)`` of the run that wrote the checkpoints at ``resume`` (its ``run_config.json``,
    in ``resume`` or up to three directories above it); None for a run written before run configs."""
    import json

    for d in (resume, *list(resume.absolute().parents)[:3]):
        file = d / RUN_CONFIG
        if file.is_file():
            try:
                data = json.loads(file.read_text())
            except (OSError, ValueError) as e:
                raise UsageError(f"{file} cannot be read ({e}); it records the run --resume continues") from None
            if not isinstance(data, dict) or not isinstance(data.get("settings"), dict):
                raise UsageError(f"{file} is not a rankwise run config")
            return file, data["settings"]
    return None


def check_output(cfg: dict[str, Any], overwrite: bool, allow_text: str | None) -> list[str]:
    """Check ``--output`` and the run it may hold, changing nothing, and return the settings a resume may change.

    Fresh run: an output holding another run is refused unless ``--overwrite``. Resume: the newest checkpoint
    must exist and the settings must be the recorded run's, except ``--allow-change`` ones and a larger
    ``max_steps`` / ``epochs``."""
    from ..checkpoint import checkpoints

    out = Path(cfg["output"])
    settings = run_settings(cfg)
    allow = parse_allow_change(allow_text, settings)
    if cfg["resume"] is not None:
        if overwrite:
            raise UsageError("--resume continues the run in the output directory and --overwrite replaces it; "
                             "choose one")
        resume = out if cfg["resume"] is True else Path(cfg["resume"])
        try:
            checkpoints(resume)
        except FileNotFoundError:
            raise UsageError(f"--resume: no checkpoint under {str(resume)!r} (write them with --checkpoint-every N)"
                             ) from None
        recorded = _recorded_settings(resume)
        if recorded is not None:
            changed = resume_changes(recorded[1], settings, allow)
            if changed:
                raise UsageError(f"--resume: the settings differ from the run recorded in {recorded[0]}: "
                                 f"{'; '.join(changed)}; resume with the run's settings or name the ones that may "
                                 "change with --allow-change KEY,KEY")
    else:
        if allow:
            raise UsageError("--allow-change applies only with --resume")
        held = [name for name in RUN_FILES if (out / name).exists()]
        if held and not overwrite:
            raise UsageError(f"--output {str(out)!r} holds another run ({', '.join(held)}); pass --resume to "
                             "continue it or --overwrite to replace it")
    return allow


def prepare_output(cfg: dict[str, Any], overwrite: bool, allow_text: str | None) -> list[str]:
    """:func:`check_output` before anything is loaded (the caller holds the output's lock), then, for a fresh
    run, remove what ``--overwrite`` replaces (its checkpoints and record: a later ``--resume`` cannot bring them
    back). :func:`write_run_config` records the run once it starts."""
    allow = check_output(cfg, overwrite, allow_text)
    if cfg["resume"] is None:
        for name in ("checkpoints", "metrics.json", RUN_CONFIG):
            _remove(Path(cfg["output"]) / name)
    return allow


def write_run_config(cfg: dict[str, Any]) -> None:
    """Record the run's settings in ``OUTPUT/run_config.json`` (written when training starts, so a run that
    fails while loading leaves no record that would block its rerun)."""
    from ..io import write_json

    write_json(Path(cfg["output"]) / RUN_CONFIG, {"format": "rankwise-run", "settings": run_settings(cfg)})


def run(args: argparse.Namespace) -> int:
    """Run the ``train`` subcommand; returns the exit status."""
    from ..io import directory_lock
    from .distributed import relaunch, world

    nproc = getattr(args, "nproc", 1)
    if not isinstance(nproc, int) or nproc < 1:
        raise UsageError(f"--nproc {nproc} must be a positive number of processes")
    rank, size = world()
    cfg = resolve_train_config(args)
    check_config(cfg)
    tcfg = _train_config(cfg)
    check_optimizer(cfg)
    check_writable(cfg["output"])
    overwrite, allow_change = bool(getattr(args, "overwrite", False)), getattr(args, "allow_change", None)
    if max(nproc, size) > 1 and cfg["quantize"] is not None:
        raise UsageError("--quantize is not supported with --nproc > 1 yet (docs/distributed.md)")
    if nproc > 1 and size == 1:
        # every setting and the output are checked here, before the processes start (a wrong one is one line and
        # exit 2, not a failure in each process); rank 0 checks the output again under its lock
        check_output(cfg, overwrite, allow_change)
        return relaunch(nproc, ["train", *getattr(args, "argv", sys.argv[1:])[1:]])
    if size > 1:
        return _run_distributed(cfg, tcfg, rank, overwrite, allow_change)
    with directory_lock(cfg["output"]):
        allow = prepare_output(cfg, overwrite, allow_change)
        return _run(cfg, tcfg, allow)


def _run_distributed(cfg: dict[str, Any], tcfg: Any, rank: int, overwrite: bool, allow_change: str | None) -> int:
    """One process of ``--nproc N`` under torchrun (``cli/distributed.py``): rank 0 checks and owns the
    output directory (and hands every rank the settings a resume may change); every rank builds,
    shards and trains (checkpoints: ``torch.distributed.checkpoint``, see ``rankwise.train``); rank 0
    writes the results."""
    import torch.distributed as dist

    from ..io import directory_lock
    from .distributed import init

    device = init(cfg["device"])
    tcfg.device, tcfg.progress = device, tcfg.progress and rank == 0
    if rank != 0:
        allow: list[Any] = [None]
        dist.broadcast_object_list(allow, src=0)  # rank 0 has checked and prepared the output directory
        return _run(cfg, tcfg, allow[0], rank=rank)
    with directory_lock(cfg["output"]):
        allow = [prepare_output(cfg, overwrite, allow_change)]
        dist.broadcast_object_list(allow, src=0)
        return _run(cfg, tcfg, allow[0], rank=rank)


def _run(cfg: dict[str, Any], tcfg: Any, allow: list[str], rank: int | None = None) -> int:
    from dataclasses import fields

    from torch.utils.data import DataLoader

    from ..io import write_json
    from ..models import quiet_transformers
    from ..train import TrainConfig, prepare_model, train

    quiet_transformers()
    task = resolve_task(cfg)
    model, tok, train_loader, eval_loader, val_loader = _build(cfg, task)
    init_loader = DataLoader(train_loader.dataset, batch_size=cfg["batch_size"], collate_fn=train_loader.collate_fn)
    if cfg["quantize"] is not None:
        from ..quant import quantize

        quantize(model, cfg["quantize"])
    prepare_model(model, cfg["method"], targets=cfg["targets"], init_data=init_loader, **cfg["options"])
    resume = cfg["output"] if cfg["resume"] is True else cfg["resume"]
    if rank is not None:  # --nproc: this rank's slice of every batch, FSDP2 over all ranks
        import torch.distributed as dist

        from ..train import reshape_for_resume
        from .distributed import RankSlices, gather_full, shard_model

        if resume:  # a run whose ranks changed: its shapes, before the parameters are sharded
            reshape_for_resume(model, resume, train_loader, tcfg)
        shard_model(model, tcfg.device)
        train_loader = RankSlices(train_loader, rank, dist.get_world_size())
        eval_loader = RankSlices(eval_loader, rank, dist.get_world_size())  # each rank evaluates its rows
    if not rank:
        print(f"rankwise train: {cfg['method']} on {cfg['model']} ({task}) / {cfg['data']}: "
              f"{len(train_loader.dataset)} train, "
              + (f"{len(val_loader.dataset)} validation (held out for the method), " if val_loader is not None else "")
              + f"{len(eval_loader.dataset)} eval items -> {cfg['output']}"
              + (f" on {dist.get_world_size()} processes (FSDP2)" if rank is not None else ""), file=sys.stderr)
        write_run_config(cfg)
    if cfg["compile"]:
        model.compile()  # nn.Module.compile: in place, so state-dict keys and saving are unchanged
    train_fields = {f.name for f in fields(TrainConfig)}
    result = train(model, train_loader, eval_loader, tcfg, resume_from=resume,
                   allow_change=[k for k in allow if k in train_fields], val_loader=val_loader)
    if rank is not None:
        gather_full(model)  # every rank: the full weights, so rank 0 saves what one process would
        if rank != 0:
            dist.barrier()
            return 0

    out = Path(cfg["output"])
    saved = _save(model, tok, cfg["method"], out)
    record = {"run": {**cfg, "task": task}, "metrics": result.metrics, "result": result.to_dict(),
              "saved": str(saved)}
    write_json(out / "metrics.json", record)
    shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in result.metrics.items()}
    print(f"{cfg['method']}: {shown}; trainable {result.trainable_params:,} / {result.total_params:,}; "
          f"optimizer state {result.optimizer_state_bytes:,} B; {result.wall_time_s:.1f} s")
    skipped = result.history[-1].get("skipped_steps", 0) if result.history else 0
    if skipped:
        print(f"{skipped} step(s) skipped: their gradients held NaN or inf (metrics.json: skipped_steps)")
    print(f"wrote {out / 'metrics.json'} and {saved}")
    if rank is not None:
        dist.barrier()
        dist.destroy_process_group()
    return 0
