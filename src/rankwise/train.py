"""The training loop: one loop, one callback protocol, for every trainer in rankwise.

Batches are dicts of tensors and the loss is ``model(**batch).loss`` (or ``loss_fn(model, batch)``).
:func:`train` runs the optimizer steps, calls the callbacks (:mod:`rankwise.callbacks`), evaluates,
checkpoints (:mod:`rankwise.checkpoint`) and reports what a memory-conscious user compares
(:mod:`rankwise.memory`): trainable parameters, exact optimizer-state bytes and peak memory.
``train(..., resume_from=dir)`` ends with bit-identical weights to an uninterrupted run on CPU.

Callers with their own optimizer (a chosen parameter list, a controller bound to it) pass
``optimizer=``; :meth:`TrainConfig.plain` configures the loop to take exactly the steps of a
hand-written one (no reseeding, clipping, schedule, device move or memory window).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence, Sized
from dataclasses import MISSING, asdict, dataclass, field, fields
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from .batches import LossFn, loss_of, model_device, move_batch
from .callbacks import TrainState, call
from .checkpoint import (
    CHECKPOINT_PREFIX,
    FIXED_KEYS,
    UnreadableCheckpoint,
    all_ranks,
    checkpoints,
    config_changes,
    find_checkpoint,
    load_sharded,
    load_trained_tensors,
    loader_generators,
    prune_checkpoints,
    read_checkpoint,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
    sharded_tensors,
    world,
)
from .checks import choice, integer, number
from .io import directory_lock
from .layout import CLASSIFIER_NAMES
from .memory import (
    count_params,
    enable_activation_checkpointing,
    optimizer_state_bytes,
    peak_memory,
    reset_peak_memory,
)
from .optim.factory import make as make_optimizer
from .optim.factory import names as optimizer_names

SCHEDULES = ("constant", "linear", "cosine")
#: Mixed precision of the loop: the forward under ``torch.autocast`` in this dtype (weights, gradients and
#: optimizer state keep their own dtypes); "fp16" also scales the loss (``torch.amp.GradScaler``).
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
TASKS = ("auto", "classification", "lm")


# ----------------------------------------------------------------------------- configuration
@dataclass
class TrainConfig:
    """Hyper-parameters of one run. ``max_steps`` (when set) overrides ``epochs``.

    ``batch_size`` and ``max_length`` are not used by :func:`train` itself (it is given loaders);
    they are recorded with the run and used by the CLI and the demo to build the loaders.
    ``grad_accum``: loader batches (micro-batches) per optimizer step, stepping as one batch of all their rows:
    each ``model(**batch).loss`` is weighted by its batch's share of the step's labelled items (rows; a causal
    LM's predicted tokens, :func:`micro_batch_shares`), a custom ``loss_fn`` by 1/k. ``max_steps`` counts
    optimizer steps.
    ``precision``: "fp32", or "bf16" / "fp16" mixed precision (:data:`PRECISIONS`): forward and evaluation
    under ``torch.autocast``, backward outside it; "fp16" scales the loss with a ``torch.amp.GradScaler``
    (unscaled before the callbacks and clipping, a step with inf/NaN gradients skipped and the scale lowered;
    its state is checkpointed) and needs fp32 trainable parameters.
    ``gradient_checkpointing``: recompute each transformer block's activations in backward instead of keeping
    them (a Hugging Face model's ``gradient_checkpointing_enable``; same update, less activation memory).
    """

    lr: float = 1e-3
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 8
    max_length: int = 128
    grad_accum: int = 1
    precision: str = "fp32"
    gradient_checkpointing: bool = False  # HF activation checkpointing (memory.enable_activation_checkpointing)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "linear"
    max_grad_norm: float | None = 1.0
    skip_nonfinite: bool = False  # skip (and count) optimizer steps whose gradients hold NaN/inf
    optimizer: str = "adamw"
    optimizer_kwargs: dict[str, Any] = field(default_factory=dict)
    eval_every: int = 0  # 0: evaluate only at the end
    eval_max_batches: int | None = None  # cap on periodic (not final) evaluations
    checkpoint_every: int = 0  # 0: no periodic checkpoints
    keep_checkpoints: int | None = 2  # newest checkpoints kept (None = all)
    output_dir: str | None = None
    seed: int | None = 0  # None: do not reseed (the RNGs go on from where they are)
    device: str | None = "auto"  # None: leave the model on its device
    task: str = "auto"
    progress: bool = True
    log_every: int = 10  # progress-bar refresh of the running loss
    measure_memory: bool = True  # reset and read the peak-memory window (process-wide)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        choice("schedule", self.schedule, SCHEDULES)
        choice("task", self.task, TASKS)
        choice("precision", self.precision, tuple(PRECISIONS))
        choice("optimizer", self.optimizer, optimizer_names())
        number("lr", self.lr, 0, low_open=True)
        number("weight_decay", self.weight_decay, 0)
        number("max_grad_norm", self.max_grad_norm, 0, low_open=True, optional=True)
        integer("epochs", self.epochs, 1)
        integer("max_steps", self.max_steps, 1, optional=True)
        for name in ("batch_size", "max_length", "grad_accum", "log_every"):
            integer(name, getattr(self, name), 1)
        for name in ("warmup_steps", "eval_every", "checkpoint_every"):
            integer(name, getattr(self, name), 0)
        integer("keep_checkpoints", self.keep_checkpoints, 1, optional=True)
        integer("eval_max_batches", self.eval_max_batches, 1, optional=True)
        integer("seed", self.seed, optional=True)
        for name in ("progress", "measure_memory", "skip_nonfinite", "gradient_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be True or False")
        if not isinstance(self.optimizer_kwargs, dict) or not all(isinstance(k, str) for k in self.optimizer_kwargs):
            raise ValueError(f"optimizer_kwargs={self.optimizer_kwargs!r} must be a dict of optimizer arguments")
        out = self.output_dir
        if out is not None and (not isinstance(out, str | PathLike) or not str(out)):
            raise ValueError(f"output_dir={self.output_dir!r} must be a directory path or None")
        if self.checkpoint_every and not self.output_dir:
            raise ValueError("checkpoint_every > 0 needs output_dir (where checkpoints are written)")
        if self.device is not None:
            check_device(self.device)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def plain(cls, steps: int, progress: bool = False) -> TrainConfig:
        """``steps`` optimizer steps taken exactly as a hand-written loop takes them: the optimizer's
        lr unchanged (constant, no warmup), no clipping, no reseeding, the model left on its device,
        no evaluation, checkpoint or memory window."""
        return cls(max_steps=steps, schedule="constant", max_grad_norm=None, seed=None, device=None,
                   progress=progress, measure_memory=False)


_DEFAULTS = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}


def check_device(device: str) -> str:
    """``device`` if it is ``"auto"``, ``"cpu"`` or an available ``"cuda"``/``"cuda:N"``; else a ValueError."""
    if not isinstance(device, str) or not (device in ("auto", "cpu") or device.startswith("cuda")):
        raise ValueError(f"device={device!r}; choose 'auto', 'cpu', 'cuda', 'cuda:N' or None (the model's)")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but CUDA is not available here; choose 'auto' or 'cpu'")
        index = device.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise ValueError(f"device={device!r}: this machine has CUDA devices 0..{torch.cuda.device_count() - 1}")
    return device


def resolve_device(device: str) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def place_model(model: nn.Module, device: str | None) -> torch.device:
    """Move ``model`` to ``device`` (:func:`resolve_device`); ``None`` leaves it where it is."""
    if device is None:
        return model_device(model)
    target = resolve_device(device)
    model.to(target)
    return target


# ----------------------------------------------------------------------------- what is trained
FULL_FINETUNE = "none"  # method name for full fine-tuning (every parameter trains)
HEAD_ONLY = "head"  # method name for training only the classification head


def prepare_model(
    model: nn.Module,
    method: str,
    targets: Any = "all-linear",
    init_data: Iterable | None = None,
    **options: Any,
) -> nn.Module:
    """Choose what trains: ``"none"`` = full fine-tuning, ``"head"`` = the classification head only,
    any registered adapter name = ``rw.adapt(model, method, targets, init_data=..., **options)``."""
    if method in (FULL_FINETUNE, HEAD_ONLY):
        if options:
            raise ValueError(f"options {sorted(options)} apply only to adapter methods, not method={method!r}")
        if method == FULL_FINETUNE:
            for p in model.parameters():
                p.requires_grad_(True)
            return model
        heads = [m for n, m in model.named_children() if n in CLASSIFIER_NAMES]
        if not heads:
            raise ValueError(
                f"method='head' needs a classification head (a child module named one of {list(CLASSIFIER_NAMES)}); "
                f"this {type(model).__name__} has none"
            )
        for p in model.parameters():
            p.requires_grad_(False)
        for head in heads:
            for p in head.parameters():
                p.requires_grad_(True)
        return model
    from .adapters.registry import adapt

    return adapt(model, method, targets=targets, init_data=init_data, **options)


# ----------------------------------------------------------------------------- optimizers
def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg.optimizer`` (any name of ``rw.optim.make``, i.e. of the catalogue)
    over the model's trainable parameters, with ``cfg.lr``, ``cfg.weight_decay`` (matrices only for
    plain optimizers), ``cfg.skip_nonfinite`` and ``cfg.optimizer_kwargs``; or the optimizer the model's
    adapter method trains with (:func:`method_optimizer`, e.g. LoRA-Pro's)."""
    choice("optimizer", cfg.optimizer, optimizer_names())
    guard = {"skip_nonfinite": True} if cfg.skip_nonfinite else {}
    own = method_optimizer(model, cfg, guard)
    if own is not None:
        return own
    return make_optimizer(cfg.optimizer, model, **{"lr": cfg.lr, "weight_decay": cfg.weight_decay, **guard,
                                                   **cfg.optimizer_kwargs})


# ----------------------------------------------------------------------------- training-dynamics methods
# An adapter method that changes how LoRA trains (not its form) says so on its config: a config may
# define ``training_callbacks(model, adapter_name, optimizer) -> list`` (per-step actions: ALLoRA's
# per-row step sizes, COLA's merge-and-restart: attached with the rank controllers by
# ``adapters.rank_control.with_method_controllers``) and ``training_optimizer(model, adapter_name, lr,
# weight_decay, **optimizer_kwargs)`` (an optimizer of its own: LoRA-Pro's, built here).
def _method_hooks(model: nn.Module, hook: str) -> list[tuple[str, Any]]:
    """``(adapter name, bound hook)`` for every adapter on ``model`` whose config defines ``hook``."""
    from .adapters.registry import adapter_states

    found = [(name, getattr(st.config, hook, None)) for name, st in adapter_states(model).items()]
    return [(name, fn) for name, fn in found if fn is not None]


def method_optimizer(model: nn.Module, cfg: TrainConfig, guard: dict[str, Any] | None = None
                     ) -> torch.optim.Optimizer | None:
    """The optimizer of the model's adapter method, when it has one (None otherwise), built with ``cfg.lr``,
    ``cfg.weight_decay`` and ``cfg.optimizer_kwargs``. Such a method replaces AdamW: any other
    ``cfg.optimizer`` is a ValueError naming the method."""
    hooks = _method_hooks(model, "training_optimizer")
    if not hooks:
        return None
    if len(hooks) > 1:
        raise ValueError(f"adapters {[n for n, _ in hooks]} each bring their own optimizer; train one at a time")
    name, fn = hooks[0]
    if cfg.optimizer != "adamw":
        raise ValueError(f"optimizer={cfg.optimizer!r}: adapter {name!r} ({type(fn.__self__).__name__}) trains "
                         "with its own AdamW-style optimizer; leave optimizer='adamw'")
    from .optim.guard import GUARD_OPTIONS
    from .optim.guard import guard as wrap

    options = dict(cfg.optimizer_kwargs)
    guard = {**(guard or {}), **{k: options.pop(k) for k in GUARD_OPTIONS if k in options}}
    return wrap(fn(model, name, cfg.lr, cfg.weight_decay, **options), **guard)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base lr at ``step``: linear warmup 0→1, then constant, linear→0 or cosine→0."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    choice("schedule", cfg.schedule, SCHEDULES)

    def factor(step: int) -> float:
        return lr_factor(step, total_steps, cfg.warmup_steps, cfg.schedule)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ----------------------------------------------------------------------------- evaluation
def _infer_task(logits: torch.Tensor, labels: torch.Tensor) -> str:
    return "classification" if labels.dim() == 1 and logits.dim() == 2 else "lm"


def labelled_items(labels: torch.Tensor, lm: bool) -> int:
    """The items a Hugging Face loss averages over: a classification batch's labels, a causal LM batch's
    predicted tokens (the labels after the first position that are not -100: the model shifts them by one)."""
    return int((labels[..., 1:] != -100).sum()) if lm else labels.numel()


@dataclass
class _EvalSums:
    """Running sums of one evaluation: loss weighted by examples (classification) or predicted tokens (LM)."""

    kind: str | None
    loss_sum: float = 0.0
    weight: int = 0
    correct: int = 0

    def add(self, model: nn.Module, batch: dict[str, Any], counted: bool = True) -> None:
        if "labels" not in batch:
            raise ValueError("evaluate: every batch needs a 'labels' entry (class ids or token ids)")
        out = model(**batch)
        labels = batch["labels"]
        self.kind = self.kind or _infer_task(out.logits, labels)
        if not counted:  # a forward this rank takes part in, counted by another
            return
        n = labelled_items(labels, lm=self.kind != "classification")
        if self.kind == "classification":
            self.correct += int((out.logits.argmax(-1) == labels).sum())
        self.loss_sum += float(out.loss) * n
        self.weight += n

    def add_over_ranks(self, device: torch.device) -> None:
        """Every rank's sums replaced by their totals over the ranks (one all-reduce)."""
        loss_sum, weight, correct = sum_over_ranks([self.loss_sum, self.weight, self.correct], device)
        self.loss_sum, self.weight, self.correct = loss_sum, round(weight), round(correct)

    def metrics(self) -> dict[str, float]:
        if self.weight == 0:
            raise ValueError("evaluate: the loader yielded no labelled examples")
        loss = self.loss_sum / self.weight
        if self.kind == "classification":
            return {"loss": loss, "accuracy": self.correct / self.weight, "examples": self.weight}
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": self.weight}


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Iterable[dict[str, Any]], task: str = "auto", max_batches: int | None = None
) -> dict[str, float]:
    """Mean loss and accuracy (classification) or perplexity (causal LM) over the first ``max_batches``.

    The loss is averaged over examples (classification) or predicted tokens (LM), not over batches:
    perplexity = exp(Σ NLL / Σ predicted tokens), the one perplexity of rankwise. The model's
    train/eval mode and the global RNG states are restored afterwards. A loader with ``eval_slices()``
    (``(batch, counted)`` pairs: ``cli.distributed.RankSlices`` under ``torch.distributed``) is evaluated
    split over the ranks, its sums added up over them.
    """
    choice("task", task, TASKS)
    device = model_device(model)
    was_training = model.training
    model.eval()
    sums = _EvalSums(None if task == "auto" else task)
    split = hasattr(loader, "eval_slices")
    pairs = loader.eval_slices() if split else ((batch, True) for batch in loader)  # type: ignore[attr-defined]
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for batch, counted in itertools.islice(pairs, max_batches):
                sums.add(model, move_batch(batch, device), counted)
    finally:
        model.train(was_training)
    if split:
        sums.add_over_ranks(device)
    return sums.metrics()


# ----------------------------------------------------------------------------- result
@dataclass
class TrainResult:
    """History and measurements of one run (``to_dict()`` is JSON-ready).

    ``history`` holds one record per step: ``{"step", "loss", "lr"}`` plus what callbacks put in
    ``state.log`` (and ``skipped_steps``, the running count, when the optimizer skips non-finite
    steps). ``wall_time_s`` spans the whole call (and, after a resume, the time recorded
    before the checkpoint); ``train_time_s`` only this call's optimization loop. ``metrics`` is the
    final evaluation, or the mean of the last 10 training losses when there is no eval loader.
    ``trainable_params`` / ``total_params`` are counted when training ends, so they describe what the run
    leaves (IncreLoRA grows its ranks, AutoLoRA prunes at the end, ElaLoRA moves ranks between layers).
    """

    history: list[dict[str, float]]
    evals: list[dict[str, float]]
    metrics: dict[str, float]
    steps: int
    wall_time_s: float
    train_time_s: float
    trainable_params: int
    total_params: int
    optimizer_state_bytes: int
    peak_memory_bytes: int
    peak_memory_kind: str
    device: str
    config: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- the loop
def _total_steps(loader: Iterable, cfg: TrainConfig) -> tuple[int, int | None]:
    """(optimizer steps of the run, batches per epoch or None for loaders without len()). An epoch of
    n batches takes ⌈n / grad_accum⌉ steps (its last step accumulates the batches that are left)."""
    per_epoch = len(loader) if isinstance(loader, Sized) else None
    if cfg.max_steps is not None:
        total = cfg.max_steps
    elif per_epoch:
        total = cfg.epochs * -(-per_epoch // cfg.grad_accum)
    else:
        raise ValueError("max_steps must be set when train_loader has no len()")
    if per_epoch == 0:
        raise ValueError("train_loader is empty")
    return total, per_epoch


def _batches(loader: Iterable, skip: int) -> Iterator[Any]:
    """``iter(loader)`` with the first ``skip`` batches consumed now (not lazily)."""
    it = iter(loader)
    for _ in range(skip):  # what the interrupted run already trained on
        next(it)
    return it


def _read_newest(candidates: list[Path]) -> tuple[Path, dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """The newest checkpoint that can be read; each unreadable one is reported on stderr and skipped."""
    reasons = []
    for ckpt in candidates:
        try:
            payload, tensors, old_cfg = read_checkpoint(ckpt)
            error = None
        except UnreadableCheckpoint as e:
            error = str(e)
        if not all_ranks(error is None):  # under torch.distributed every rank resumes from the same one
            error = error or f"{ckpt}: unreadable on another rank"
            reasons.append(error)
            print(f"rankwise: checkpoint {ckpt} is unreadable ({error}); trying the previous one", file=sys.stderr)
            continue
        if reasons:
            print(f"rankwise: resuming from {ckpt}", file=sys.stderr)
        return ckpt, payload, tensors, old_cfg
    raise ValueError(f"resume_from: no readable checkpoint in {candidates[0].parent}: {'; '.join(reasons)}")


@contextlib.contextmanager
def progress_bar(on: bool, total: int, initial: int = 0, desc: str = "train") -> Iterator[Any]:
    """A tqdm bar when ``on`` and stderr is a terminal, else None."""
    if not (on and sys.stderr.isatty()):
        yield None
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()


class _Loop:
    """One call of :func:`train`: the :class:`TrainState` callbacks see, plus the history and the
    epoch-start RNG states that make a checkpoint resumable."""

    def __init__(self, state: TrainState, loader: Iterable, eval_loader: Iterable | None, callbacks: list[Any],
                 loss_fn: LossFn | None, device: torch.device, per_epoch: int | None, t_start: float,
                 allow_change: Sequence[str] = (), built_optimizer: bool = True) -> None:
        self.state, self.cfg = state, state.config
        self.allow_change, self.built_optimizer = tuple(allow_change), built_optimizer
        self.loader, self.eval_loader, self.callbacks, self.loss_fn = loader, eval_loader, callbacks, loss_fn
        self.device, self.per_epoch, self.t_start = device, per_epoch, t_start
        self.generators = loader_generators(loader)
        self.history: list[dict[str, float]] = []
        self.evals: list[dict[str, float]] = []
        self.elapsed_before = 0.0
        self.epoch_rng: dict[str, Any] = {}
        self.epoch_gens: list[torch.Tensor] = []
        self.resume_rng: dict[str, Any] | None = None
        self.ckpt_root = Path(self.cfg.output_dir) / "checkpoints" if self.cfg.output_dir else None
        self.bar: Any = None

    # ---- start: fresh or resumed
    def start(self, resume_from: str | Path | None) -> None:
        if resume_from is not None:
            self._resume(checkpoints(resume_from))
            return
        if self.ckpt_root is not None and self.cfg.checkpoint_every and self.ckpt_root.is_dir():
            old = sorted(p.name for p in self.ckpt_root.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir())
            if old:
                raise ValueError(
                    f"output_dir={self.cfg.output_dir!r} already holds checkpoints of another run ({', '.join(old[:3])}"
                    f"{', ...' if len(old) > 3 else ''}); resume it (resume_from=...), or choose another output_dir "
                    "or delete them"
                )
        if self.cfg.seed is not None:
            seed_everything(self.cfg.seed)
        self._mark_epoch_start()

    def _mark_epoch_start(self) -> None:
        self.epoch_rng = rng_state(self.device)
        self.epoch_gens = [g.get_state() for g in self.generators]

    def _resume(self, candidates: list[Path]) -> None:
        state = self.state
        ckpt, payload, tensors, old_cfg = _read_newest(candidates)
        old_cfg = {**_DEFAULTS, **old_cfg}  # a setting newer than the checkpoint: it ran with the default
        changed = config_changes(old_cfg, self.cfg.to_dict(), self.allow_change,
                                 fixed=FIXED_KEYS if self.built_optimizer else ())
        if changed:
            raise ValueError(
                f"resume_from: the settings differ from the checkpointed run ({ckpt}): {'; '.join(changed)}; "
                "resume with the run's settings or allow the change (allow_change / --allow-change)"
            )
        if state.total_steps < payload["step"]:
            raise ValueError(
                f"resume_from: the checkpoint is at step {payload['step']}, beyond this run's {state.total_steps} "
                "total steps; raise max_steps/epochs"
            )
        if len(payload["loader_generators"]) != len(self.generators):
            raise ValueError("resume_from: the train loader's generators differ from the checkpointed run")
        distributed = "world_size" in payload  # written under torch.distributed: model and optimizer through DCP
        # a method that reshapes its model while training (IncreLoRA's growth, Cuttlefish's switch) resizes
        # it to the checkpoint's shapes first, so the tensors and the optimizer state fit
        _before_load(state.model, self.callbacks, sharded_tensors(ckpt, state.model) if distributed else tensors)
        if distributed:
            state.optimizer.zero_grad(set_to_none=True)
            load_sharded(ckpt, state.model, state.optimizer)
        else:
            load_trained_tensors(state.model, ckpt, tensors)
            state.optimizer.load_state_dict(payload["optimizer"])
        state.scheduler.load_state_dict(payload["scheduler"])
        if state.scaler is not None and payload.get("grad_scaler") is not None:
            state.scaler.load_state_dict(payload["grad_scaler"])
        if self.built_optimizer:
            self._apply_changed_hyperparameters(old_cfg)
        # the resumed run may pass other callbacks than the checkpointed one (e.g. without the one
        # that stopped it): states pair up by position, extra callbacks or states are skipped
        for cb, cb_state in zip(self.callbacks, payload["callbacks"], strict=False):
            if cb_state is not None and hasattr(cb, "load_state_dict"):
                cb.load_state_dict(cb_state)
        state.step, state.epoch, state.batch_in_epoch = payload["step"], payload["epoch"], payload["batch_in_epoch"]
        self.history, self.evals = list(payload["history"]), list(payload["evals"])
        self.elapsed_before = payload["elapsed"]
        self.epoch_rng, self.epoch_gens = payload["rng"]["epoch_start"], payload["loader_generators"]
        self.resume_rng = payload["rng"]["now"]

    def _apply_changed_hyperparameters(self, old_cfg: dict[str, Any]) -> None:
        """An allowed new ``lr`` / ``weight_decay``: the optimizer state just loaded brought the old ones back
        (the groups' lr and the scheduler's base lrs); scale / set them to the new values."""
        optimizer, scheduler, cfg = self.state.optimizer, self.state.scheduler, self.cfg
        old_lr, old_wd = old_cfg.get("lr"), old_cfg.get("weight_decay")
        if isinstance(old_lr, int | float) and old_lr > 0 and old_lr != cfg.lr:
            ratio = cfg.lr / old_lr
            for group in optimizer.param_groups:
                group["lr"] *= ratio
                if "initial_lr" in group:
                    group["initial_lr"] *= ratio
            scheduler.base_lrs = [lr * ratio for lr in scheduler.base_lrs]
        if isinstance(old_wd, int | float) and old_wd != cfg.weight_decay:
            for group in optimizer.param_groups:
                if group.get("weight_decay") == old_wd:
                    group["weight_decay"] = cfg.weight_decay

    # ---- epochs and steps
    def done(self) -> bool:
        return self.state.step >= self.state.total_steps or self.state.should_stop

    def run_epoch(self) -> None:
        """One pass over the loader (after a resume: the rest of the interrupted pass)."""
        # The epoch's order is drawn from these states when the loader is iterated: restore them
        # (a resume re-draws the same permutation, then skips the batches already trained on).
        set_rng_state(self.epoch_rng, self.device)
        for g, s in zip(self.generators, self.epoch_gens, strict=True):
            g.set_state(s)
        batches = _batches(self.loader, self.state.batch_in_epoch)
        if self.resume_rng is not None:  # RNG exactly as at the checkpoint (dropout masks etc.)
            set_rng_state(self.resume_rng, self.device)
            self.resume_rng = None
        empty = True
        # a step takes grad_accum batches; the epoch's last step the ones left
        while group := list(itertools.islice(batches, self.cfg.grad_accum)):
            empty = False
            self._step(group)
            self._after_step()
            if self.done():
                return
        # the loader is exhausted (the only end of an epoch for loaders without len())
        if empty and self.state.batch_in_epoch == 0:
            raise ValueError("train_loader yielded no batches")
        if self.state.batch_in_epoch:
            self._next_epoch()

    def _step(self, group: list[Any]) -> None:
        """loss and backward of each batch of ``group`` (the gradients summed, each loss weighted by its batch's
        share, :func:`micro_batch_shares`), clip, optimizer and scheduler step: one optimizer step and its record."""
        state, cfg, optimizer = self.state, self.cfg, self.state.optimizer
        state.log = {}
        losses, scaler = [], state.scaler
        shares = micro_batch_shares(group, cfg.task) if self.loss_fn is None else [None] * len(group)
        for i, (batch, share) in enumerate(zip(group, shares, strict=True)):
            with gradient_sync(state.model, on=i == len(group) - 1):
                with self.autocast():
                    loss = loss_of(state.model, move_batch(batch, self.device), self.loss_fn)
                part = loss if len(group) == 1 else loss / len(group) if share is None else loss * share
                (part if scaler is None else scaler.scale(part)).backward()  # outside autocast (torch's AMP recipe)
            losses.append(float(part.detach()))
        state.loss = sum(losses)
        size = world()[1]
        if size > 1:  # under torch.distributed: the global batch's loss, the ranks' mean (as their gradients)
            state.loss = sum_over_ranks([state.loss], self.device)[0] / size
        if scaler is not None:
            scaler.unscale_(optimizer)  # the callbacks and the clipping see the true gradients
        call(self.callbacks, "on_after_backward", state)
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.max_grad_norm)
        lr = optimizer.param_groups[0]["lr"]
        if scaler is None:
            optimizer.step()
        else:
            state.log["loss_scale"] = float(scaler.get_scale())  # the scale this step's gradients carried
            scaler.step(optimizer)  # skipped when a gradient is inf/NaN
            scaler.update()
        with warnings.catch_warnings():
            if scaler is not None:  # a step the scaler skipped still counts in the schedule (as in the Trainer)
                warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before")
            state.scheduler.step()
        state.step += 1
        state.batch_in_epoch += len(group)
        call(self.callbacks, "on_step_end", state)
        optimizer.zero_grad(set_to_none=True)
        record = {"step": state.step, "loss": state.loss, "lr": lr, **state.log}
        skipped = getattr(optimizer, "skipped_steps", None)  # optimizers built with skip_nonfinite count them
        if skipped is not None:
            record["skipped_steps"] = int(skipped)
        self.history.append(record)

    def _after_step(self) -> None:
        """Progress, periodic evaluation, the epoch boundary and periodic checkpoints."""
        state, cfg = self.state, self.cfg
        if self.bar is not None:
            self.bar.update(1)
            if state.step % cfg.log_every == 0:
                self.bar.set_postfix(loss=f"{state.loss:.4f}")
        if self.eval_loader is not None and cfg.eval_every and state.step % cfg.eval_every == 0 \
                and state.step < state.total_steps:
            self._evaluate(self.eval_loader, cfg.eval_max_batches)
        if self.per_epoch is not None and state.batch_in_epoch >= self.per_epoch:
            self._next_epoch()
        if self.ckpt_root is not None and cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
            self._checkpoint(self.ckpt_root)

    def _next_epoch(self) -> None:
        """Epoch done: the next one starts from the RNG and loader states as they are now."""
        self.state.epoch += 1
        self.state.batch_in_epoch = 0
        self._mark_epoch_start()

    # ---- evaluation, checkpoints, end
    def autocast(self) -> contextlib.AbstractContextManager:
        """``torch.autocast`` in the run's precision (a no-op context for "fp32")."""
        dtype = PRECISIONS[self.cfg.precision]
        return contextlib.nullcontext() if dtype is None else torch.autocast(self.device.type, dtype=dtype)

    def _evaluate(self, loader: Iterable[dict[str, Any]], max_batches: int | None) -> dict[str, float]:
        with self.autocast():
            metrics = evaluate(self.state.model, loader, self.cfg.task, max_batches)
        self.evals.append({"step": self.state.step, **metrics})
        call(self.callbacks, "on_evaluate", self.state, metrics)
        return metrics

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t_start

    def _checkpoint(self, root: Path) -> None:
        rng = {"epoch_start": self.epoch_rng, "now": rng_state(self.device)}
        path = save_checkpoint(root / f"{CHECKPOINT_PREFIX}{self.state.step}", self.state, rng,
                               self.epoch_gens, self.history, self.evals, self.elapsed(), self.callbacks)
        if world()[0] == 0:  # under torch.distributed rank 0 owns the directory
            prune_checkpoints(root, self.cfg.keep_checkpoints)
        call(self.callbacks, "on_save", self.state, path)

    def finish(self) -> dict[str, float]:
        """Final checkpoint and evaluation, ``on_train_end``; returns the final metrics."""
        cfg, state = self.cfg, self.state
        if self.ckpt_root is not None and cfg.checkpoint_every and state.step % cfg.checkpoint_every != 0:
            self._checkpoint(self.ckpt_root)  # the final state, so resuming a finished run is a no-op
        if self.eval_loader is not None:
            metrics = self._evaluate(self.eval_loader, None)
        else:
            tail = self.history[-10:]
            metrics = {"train_loss": sum(h["loss"] for h in tail) / max(1, len(tail))}
        call(self.callbacks, "on_train_end", state)
        return metrics


def micro_batch_shares(group: list[Any], task: str) -> list[float | None]:
    """Each batch's share of an accumulated step whose losses are ``model(**batch).loss``, so that the step's
    loss is the mean over all its labelled items (what one large batch would average): n_i / Σn with n_i the
    batch's :func:`labelled_items`, as :func:`evaluate` counts them. ``None`` each (1/k, the mean of the
    batches' losses) for batches without labels or with equal counts (the same weight, divided exactly)."""
    if not all(isinstance(b, dict) and torch.is_tensor(b.get("labels")) for b in group):
        return [None] * len(group)
    counts = [labelled_items(b["labels"], lm=b["labels"].dim() >= 2 and task != "classification") for b in group]
    if len(set(counts)) == 1:
        return [None] * len(group)
    total = sum(counts)
    return [n / total for n in counts]


def _check_step_settings(cfg: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """ValueError for settings the optimizer or the model cannot take: gradient accumulation or a GradScaler
    with a layer-wise optimizer (it steps inside backward, per micro-batch, on scaled gradients), and fp16
    loss scaling over fp16 trainable parameters (the scaler unscales fp32 gradients only)."""
    if hasattr(optimizer, "accumulate"):  # a LayerwiseOptimizer
        why = f"{type(optimizer).__name__} steps each parameter inside backward"
        if cfg.grad_accum > 1:
            raise ValueError(f"grad_accum={cfg.grad_accum}: {why}, one micro-batch at a time; use grad_accum=1 "
                             "(or a larger batch) with a layer-wise optimizer")
        if cfg.precision == "fp16":
            raise ValueError(f"precision='fp16': {why}, on the scaled gradients before the GradScaler can check and "
                             "unscale them; use precision='bf16' or 'fp32' with a layer-wise optimizer")
    if cfg.precision == "fp16":
        half = [n for n, p in model.named_parameters() if p.requires_grad and p.dtype == torch.float16]
        if half:
            raise ValueError(
                f"precision='fp16' scales the loss with a GradScaler, which needs fp32 trainable parameters; "
                f"{half[0]} (and {len(half) - 1} more) is float16: keep trainable weights in float32 "
                "(autocast computes in fp16) or use precision='bf16'"
            )


def sum_over_ranks(values: Sequence[float], device: torch.device) -> list[float]:
    """``values`` summed over the ranks of the ``torch.distributed`` process group (one float64 all-reduce, on
    ``device``: the training's, which the group's backend serves)."""
    import torch.distributed as dist

    total = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


@contextlib.contextmanager
def gradient_sync(model: nn.Module, on: bool) -> Iterator[None]:
    """With ``on=False`` (a micro-batch before the step's last), let DDP (``no_sync``) or FSDP2
    (``set_requires_gradient_sync``) keep this backward's gradient local: the step's summed gradient is
    reduced once, on the last micro-batch. Same update either way; elsewhere nothing changes."""
    from torch.nn.parallel import DistributedDataParallel

    if on:
        yield
    elif isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    elif callable(set_sync := getattr(model, "set_requires_gradient_sync", None)):  # an FSDP2 root (fully_shard)
        set_sync(False)
        try:
            yield
        finally:
            set_sync(True)
    else:
        yield


def _before_load(model: nn.Module, callbacks: Sequence[Any], tensors: dict[str, torch.Tensor]) -> None:
    """The callbacks' ``before_load(model, tensors)``, unless ``model`` is sharded (FSDP2): a sharded
    parameter cannot change shape, so such a model was resized before ``fully_shard``
    (:func:`reshape_for_resume`), and a model that still does not fit fails its load naming the tensors."""
    from .optim.sharding import is_dtensor

    if not any(is_dtensor(p) for p in model.parameters()):
        call(callbacks, "before_load", model, tensors)


def reshape_for_resume(model: nn.Module, resume_from: str | Path, train_loader: Iterable,
                       config: TrainConfig | None = None, callbacks: Sequence[Any] = ()) -> None:
    """Resize an unsharded ``model`` to the newest checkpoint at ``resume_from`` as :func:`train`'s resume
    does (``before_load`` of ``callbacks`` and of the model's method controllers, built for the run of
    ``train_loader`` and ``config``), so that it can be sharded (``fully_shard``) and then resumed: under
    FSDP2 the reshape comes first. Call on every rank of a checkpoint written under ``torch.distributed``."""
    ckpt, payload, tensors, _ = _read_newest(checkpoints(resume_from))
    if "world_size" in payload:
        tensors = sharded_tensors(ckpt, model)
    total_steps = _total_steps(train_loader, config or TrainConfig())[0]
    _before_load(model, _with_method_controllers(model, callbacks, None, total_steps), tensors)


def _with_method_controllers(model: nn.Module, callbacks: Sequence[Any], optimizer: torch.optim.Optimizer | None,
                             total_steps: int) -> list[Any]:
    """The controllers and training callbacks of the model's adapter methods (AdaLoRA, SoRA, ALLoRA,
    COLA, ...: ``adapters.rank_control``), then ``callbacks``."""
    from .adapters.rank_control import with_method_controllers

    return with_method_controllers(model, callbacks, optimizer, total_steps)


def train(
    model: nn.Module,
    train_loader: DataLoader | Iterable[dict[str, Any]],
    eval_loader: Iterable[dict[str, Any]] | None = None,
    config: TrainConfig | None = None,
    callbacks: Sequence[Any] = (),
    resume_from: str | Path | None = None,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    loss_fn: LossFn | None = None,
    allow_change: Sequence[str] = (),
    val_loader: Iterable[dict[str, Any]] | None = None,
) -> TrainResult:
    """Train ``model`` on ``train_loader`` (batches: dicts; loss ``model(**batch).loss`` or ``loss_fn(model, batch)``).

    Runs ``max_steps`` optimizer steps (or ``epochs`` passes; a loader that runs out is iterated
    again), evaluating on ``eval_loader`` every ``eval_every`` steps and at the end, checkpointing
    every ``checkpoint_every`` steps to ``output_dir/checkpoints/checkpoint-N``. ``resume_from`` (a
    checkpoint, or a directory holding some) continues an interrupted run exactly; build the model
    and loaders as for the first run. A fresh run seeds every RNG with ``config.seed`` (unless None).
    ``optimizer`` replaces the one ``config`` would build (``lr``, ``weight_decay`` and ``optimizer*``
    are then unused; the schedule scales its learning rates). ``callbacks``: :mod:`rankwise.callbacks`.
    ``val_loader``: held-out data that methods which fit their own choices while training read
    (AutoLoRA's selection variables, Fast Forward's stopping rule; ``MethodSpec.needs_validation``);
    without it they read ``eval_loader``, so keep the test split out of both when you report on it.

    Run integrity: while checkpoints are written, ``output_dir`` is locked (a second run there fails
    naming the holder's pid); a fresh run refuses an ``output_dir`` that holds another run's
    checkpoints. A resume reads the newest readable checkpoint (unreadable ones are reported and
    skipped) and refuses settings that differ from the checkpointed run's, naming them, unless
    ``allow_change`` lists them (an allowed new ``lr`` / ``weight_decay`` is applied to the restored
    optimizer); ``max_steps`` / ``epochs`` may always grow (the schedule then spans the new total), and
    bookkeeping settings (progress, evaluation and checkpoint cadence, device, output_dir) may always
    differ. The optimizer and its ``optimizer_kwargs`` cannot change on resume.

    Under ``torch.distributed`` (world size > 1, e.g. FSDP2 by ``rankwise train --nproc N``) every rank
    calls ``train``: checkpoints hold the model and optimizer through ``torch.distributed.checkpoint``
    and each rank's loop state (RNG, loader, scheduler, callbacks), rank 0 holds the lock and renames
    the directory, and a resume needs the same world size (:func:`rankwise.checkpoint.save_checkpoint`);
    a model whose ranks changed while training is resized before ``fully_shard`` (:func:`reshape_for_resume`).
    """
    cfg = config or TrainConfig()
    cfg.validate()
    with contextlib.ExitStack() as stack:
        if cfg.output_dir and cfg.checkpoint_every and world()[0] == 0:  # rank 0 holds it for all ranks
            stack.enter_context(directory_lock(cfg.output_dir))
        return _train(model, train_loader, eval_loader, cfg, callbacks, resume_from, optimizer, loss_fn,
                      allow_change, val_loader)


def _train(model: nn.Module, train_loader: Iterable, eval_loader: Iterable | None, cfg: TrainConfig,
           callbacks: Sequence[Any], resume_from: str | Path | None, optimizer: torch.optim.Optimizer | None,
           loss_fn: LossFn | None, allow_change: Sequence[str], val_loader: Iterable | None = None) -> TrainResult:
    t_start = time.perf_counter()
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(model)
    device = place_model(model, cfg.device)
    if cfg.measure_memory:
        reset_peak_memory(device)
    total_steps, per_epoch = _total_steps(train_loader, cfg)
    built = optimizer is None
    optimizer = optimizer if optimizer is not None else build_optimizer(model, cfg)
    _check_step_settings(cfg, model, optimizer)
    state = TrainState(model, optimizer, build_scheduler(optimizer, cfg, total_steps), cfg, total_steps=total_steps,
                       eval_loader=eval_loader, loss_fn=loss_fn,
                       val_loader=val_loader if val_loader is not None else eval_loader,
                       scaler=torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None)
    callbacks = _with_method_controllers(model, callbacks, optimizer, total_steps)
    loop = _Loop(state, train_loader, eval_loader, list(callbacks), loss_fn, device, per_epoch, t_start,
                 allow_change, built)
    loop.start(resume_from)
    optimizer.zero_grad(set_to_none=True)  # no gradient left over from before the run enters step 1
    model.train()
    call(loop.callbacks, "on_train_begin", state)
    t_train = time.perf_counter()
    with progress_bar(cfg.progress, total_steps, state.step) as loop.bar:
        while not loop.done():
            loop.run_epoch()
    train_time = time.perf_counter() - t_train
    metrics = loop.finish()
    trainable, total = count_params(model)  # what the run leaves: growing / pruning adapters change it
    model.eval()
    peak, kind = peak_memory(device) if cfg.measure_memory else (0, "not_measured")
    return TrainResult(
        history=loop.history, evals=loop.evals, metrics=metrics, steps=state.step, wall_time_s=loop.elapsed(),
        train_time_s=train_time, trainable_params=trainable, total_params=total,
        optimizer_state_bytes=optimizer_state_bytes(optimizer), peak_memory_bytes=peak, peak_memory_kind=kind,
        device=str(device), config=cfg.to_dict(),
    )


__all__ = [
    "FULL_FINETUNE", "HEAD_ONLY", "PRECISIONS", "SCHEDULES", "TrainConfig", "TrainResult", "TrainState",
    "build_optimizer", "build_scheduler", "count_params", "evaluate", "find_checkpoint", "lr_factor",
    "method_optimizer",
    "optimizer_state_bytes", "peak_memory", "place_model", "prepare_model", "progress_bar",
    "reset_peak_memory", "reshape_for_resume", "resolve_device", "save_checkpoint", "seed_everything", "train",
]
