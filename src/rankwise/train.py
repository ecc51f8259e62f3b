"""A small, explicit training loop for Hugging Face models (sequence classification, causal LM).

Batches are dicts of tensors and the loss is ``model(**batch).loss``. The loop reports what a
memory-conscious user wants to compare: trainable parameters, exact optimizer-state bytes (the sum of
``numel · element_size`` over every tensor in ``optimizer.state``) and peak memory (CUDA
``max_memory_allocated``; on CPU the process peak RSS). Periodic checkpoints hold everything needed
for an exact resume: trained tensors, optimizer and scheduler state, the step, the position in the
epoch and every RNG state (torch, CUDA, numpy, python, the DataLoader's sampler generator), so
``train(..., resume_from=dir)`` ends with bit-identical weights to an uninterrupted run on CPU.

Callbacks are plain objects with any of ``on_train_begin(state)``, ``on_step_end(state)``,
``on_evaluate(state, metrics)`` and ``on_train_end(state)``; ``on_step_end`` runs right after
``optimizer.step()`` (where rank controllers prune or grow). A callback may set
``state.should_stop = True``. Callbacks with ``state_dict()``/``load_state_dict()`` are checkpointed.
"""

from __future__ import annotations

import math
import random
import resource
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader

from .adapters.base import allowed
from .io import atomic_directory, save_tensors, write_json
from .optim.factory import NAMES as OPTIMIZER_NAMES
from .optim.factory import make as make_optimizer

SCHEDULES = ("constant", "linear", "cosine")
TASKS = ("auto", "classification", "lm")
CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.pt"
TENSORS_FILE = "trained_tensors.safetensors"
INFO_FILE = "trainer_state.json"


# ----------------------------------------------------------------------------- configuration
@dataclass
class TrainConfig:
    """Hyper-parameters of one run. ``max_steps`` (when set) overrides ``epochs``.

    ``batch_size`` and ``max_length`` are not used by :func:`train` itself (it is given loaders);
    they are recorded with the run and used by the CLI and the demo to build the loaders.
    """

    lr: float = 1e-3
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 8
    max_length: int = 128
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "linear"
    max_grad_norm: float | None = 1.0
    optimizer: str = "adamw"
    optimizer_kwargs: dict[str, Any] = field(default_factory=dict)
    eval_every: int = 0  # 0: evaluate only at the end
    eval_max_batches: int | None = None  # cap on periodic (not final) evaluations
    checkpoint_every: int = 0  # 0: no periodic checkpoints
    keep_checkpoints: int | None = 2  # newest checkpoints kept (None = all)
    output_dir: str | None = None
    seed: int = 0
    device: str = "auto"
    task: str = "auto"
    progress: bool = True
    log_every: int = 10  # progress-bar refresh of the running loss

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        allowed("schedule", self.schedule, SCHEDULES)
        allowed("task", self.task, TASKS)
        allowed("optimizer", self.optimizer, tuple(OPTIMIZERS))
        if not (isinstance(self.lr, int | float) and self.lr > 0):
            raise ValueError(f"lr={self.lr!r} must be a positive number")
        if not (isinstance(self.epochs, int) and self.epochs >= 1):
            raise ValueError(f"epochs={self.epochs!r} must be an integer >= 1")
        if self.max_steps is not None and not (isinstance(self.max_steps, int) and self.max_steps >= 1):
            raise ValueError(f"max_steps={self.max_steps!r} must be None or an integer >= 1")
        for name in ("batch_size", "max_length", "log_every"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"{name}={v!r} must be an integer >= 1")
        for name in ("warmup_steps", "eval_every", "checkpoint_every"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 0):
                raise ValueError(f"{name}={v!r} must be an integer >= 0")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay={self.weight_decay!r} must be >= 0")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm={self.max_grad_norm!r} must be > 0 or None (no clipping)")
        if self.keep_checkpoints is not None and self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints={self.keep_checkpoints!r} must be >= 1 or None (keep all)")
        if self.eval_max_batches is not None and self.eval_max_batches < 1:
            raise ValueError(f"eval_max_batches={self.eval_max_batches!r} must be >= 1 or None")
        if self.checkpoint_every and not self.output_dir:
            raise ValueError("checkpoint_every > 0 needs output_dir (where checkpoints are written)")
        if not (self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device={self.device!r}; choose 'auto', 'cpu', 'cuda' or 'cuda:N'")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_device(device: str) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# ----------------------------------------------------------------------------- what is trained
FULL_FINETUNE = "none"  # method name for full fine-tuning (every parameter trains)
HEAD_ONLY = "head"  # method name for training only the classification head
HEAD_MODULES = ("classifier", "score")  # Hugging Face sequence-classification heads


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
        heads = [m for n, m in model.named_children() if n in HEAD_MODULES]
        if not heads:
            raise ValueError(
                f"method='head' needs a classification head (a child module named one of {list(HEAD_MODULES)}); "
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
def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in two groups: matrices get ``weight_decay``, vectors/biases/norms none."""
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters (requires_grad=False everywhere)")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _adamw(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, **cfg.optimizer_kwargs)


def _rankwise_optimizer(name: str) -> Callable[[nn.Module, TrainConfig], torch.optim.Optimizer]:
    """Factory for a ``rankwise.optim.make`` optimizer; ``cfg.optimizer_kwargs`` go to its class
    (``rank``, ``update_gap``, ``scale``, ``targets``, ``switch_every``, ...)."""

    def build(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
        return make_optimizer(name, model, **{"lr": cfg.lr, "weight_decay": cfg.weight_decay, **cfg.optimizer_kwargs})

    return build


#: name -> factory(model, cfg). The one place where optimizers are added (see ``register_optimizer``).
OPTIMIZERS: dict[str, Callable[[nn.Module, TrainConfig], torch.optim.Optimizer]] = {
    "adamw": _adamw,
    **{name: _rankwise_optimizer(name) for name in OPTIMIZER_NAMES if name != "adamw"},
}


def register_optimizer(name: str, factory: Callable[[nn.Module, TrainConfig], torch.optim.Optimizer]) -> None:
    """Make ``TrainConfig(optimizer=name)`` build ``factory(model, cfg)``."""
    OPTIMIZERS[name] = factory


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg.optimizer`` over the model's trainable parameters."""
    allowed("optimizer", cfg.optimizer, tuple(OPTIMIZERS))
    return OPTIMIZERS[cfg.optimizer](model, cfg)


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
    allowed("schedule", cfg.schedule, SCHEDULES)

    def factor(step: int) -> float:
        return lr_factor(step, total_steps, cfg.warmup_steps, cfg.schedule)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ----------------------------------------------------------------------------- measurements
def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Exact bytes of the optimizer state: Σ numel·element_size over every tensor in ``optimizer.state``."""

    def walk(obj: Any) -> int:
        if torch.is_tensor(obj):
            return obj.numel() * obj.element_size()
        if isinstance(obj, dict):
            return sum(walk(v) for v in obj.values())
        if isinstance(obj, list | tuple):
            return sum(walk(v) for v in obj)
        return 0

    return sum(walk(s) for s in optimizer.state.values())


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) unique parameters."""
    seen: dict[int, nn.Parameter] = {}
    for p in model.parameters():
        seen.setdefault(id(p), p)
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    return trainable, sum(p.numel() for p in seen.values())


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window (CUDA allocator stats; on Linux also the process RSS peak)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    import gc

    gc.collect()
    try:  # give freed heap back to the OS first, so the window starts from what is really in use
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:  # Linux: writing 5 to clear_refs resets the RSS high-water mark of this process
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, kind): CUDA ``max_memory_allocated`` or the CPU process peak RSS (getrusage)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "cpu_peak_rss"


# ----------------------------------------------------------------------------- evaluation
def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _infer_task(logits: torch.Tensor, labels: torch.Tensor) -> str:
    return "classification" if labels.dim() == 1 and logits.dim() == 2 else "lm"


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Iterable[dict[str, Any]], task: str = "auto", max_batches: int | None = None
) -> dict[str, float]:
    """Mean loss and accuracy (classification) or perplexity = exp(token-mean loss) (causal LM).

    The loss is averaged over examples (classification) or predicted tokens (LM), not over batches.
    The model's train/eval mode and the global RNG states are restored afterwards.
    """
    allowed("task", task, TASKS)
    device = _model_device(model)
    was_training = model.training
    model.eval()
    loss_sum, weight, correct, examples = 0.0, 0, 0, 0
    kind = None if task == "auto" else task
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for i, batch in enumerate(loader):
                if max_batches is not None and i >= max_batches:
                    break
                if "labels" not in batch:
                    raise ValueError("evaluate: every batch needs a 'labels' entry (class ids or token ids)")
                batch = _to_device(batch, device)
                out = model(**batch)
                labels = batch["labels"]
                kind = kind or _infer_task(out.logits, labels)
                if kind == "classification":
                    n = labels.numel()
                    correct += int((out.logits.argmax(-1) == labels).sum())
                    examples += n
                else:  # HF causal LMs shift labels by one and ignore -100
                    n = int((labels[:, 1:] != -100).sum())
                loss_sum += float(out.loss) * n
                weight += n
    finally:
        model.train(was_training)
    if weight == 0:
        raise ValueError("evaluate: the loader yielded no labelled examples")
    loss = loss_sum / weight
    if kind == "classification":
        return {"loss": loss, "accuracy": correct / examples, "examples": examples}
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": weight}


# ----------------------------------------------------------------------------- state and result
@dataclass
class TrainState:
    """What callbacks see: the live objects and the position in training."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    config: TrainConfig
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    total_steps: int = 0
    loss: float | None = None
    should_stop: bool = False


@dataclass
class TrainResult:
    """History and measurements of one run (``to_dict()`` is JSON-ready).

    ``wall_time_s`` spans the whole call (and, after a resume, the time recorded before the
    checkpoint); ``train_time_s`` only this call's optimization loop. ``metrics`` is the final
    evaluation, or the mean of the last 10 training losses when there is no eval loader.
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


# ----------------------------------------------------------------------------- checkpoints
def _loader_generators(loader: Any) -> list[torch.Generator]:
    """The distinct torch.Generators that decide a DataLoader's order (its own and its sampler's)."""
    gens: list[torch.Generator] = []
    for obj in (loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None),
                getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        g = getattr(obj, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not h for h in gens):
            gens.append(g)
    return gens


def _rng_state(device: torch.device) -> dict[str, Any]:
    np_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    npst = state["numpy"]
    np.random.set_state({
        "bit_generator": "MT19937",
        "state": {"key": npst["key"].numpy().astype(np.uint32), "pos": npst["pos"]},
        "has_gauss": npst["has_gauss"],
        "gauss": npst["gauss"],
    })
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


def _trained_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter and every persistent buffer, by state_dict name.

    With full fine-tuning this is the whole model state; with adapters it is the adapter tensors,
    the trained heads and the buffers (adapter masks or ranks a controller may change).
    """
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    buffers = {id(b) for b in model.buffers()}
    return {
        k: v for k, v in model.state_dict(keep_vars=True).items()
        if id(v) in trainable or id(v) in buffers
    }


def save_checkpoint(path: str | Path, state: TrainState, rng: dict[str, Any], loader_states: list[torch.Tensor],
                    history: list, evals: list, elapsed: float, callbacks: Sequence[Any]) -> Path:
    """Write one checkpoint directory atomically (a crash mid-write leaves no partial checkpoint)."""
    payload = {
        "step": state.step,
        "epoch": state.epoch,
        "batch_in_epoch": state.batch_in_epoch,
        "total_steps": state.total_steps,
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "rng": rng,
        "loader_generators": loader_states,
        "callbacks": [cb.state_dict() if hasattr(cb, "state_dict") else None for cb in callbacks],
        "history": history,
        "evals": evals,
        "elapsed": elapsed,
    }
    with atomic_directory(path) as tmp:
        save_tensors({k: v.detach() for k, v in _trained_tensors(state.model).items()}, tmp / TENSORS_FILE)
        torch.save(payload, tmp / STATE_FILE)
        write_json(tmp / INFO_FILE, {"step": state.step, "epoch": state.epoch,
                                     "batch_in_epoch": state.batch_in_epoch, "config": state.config.to_dict()})
    return Path(path)


def find_checkpoint(path: str | Path) -> Path:
    """``path`` itself when it is a checkpoint, else its newest ``checkpoint-N`` (directly or under checkpoints/)."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    for root in (path, path / "checkpoints"):
        found = sorted(
            (p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if (p / STATE_FILE).is_file()),
            key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]) if p.name[len(CHECKPOINT_PREFIX):].isdigit() else -1,
        )
        if found:
            return found[-1]
    raise FileNotFoundError(f"resume_from={str(path)!r}: no checkpoint ({STATE_FILE}) found there")


def _prune_checkpoints(root: Path, keep: int | None) -> None:
    if keep is None:
        return
    ckpts = sorted(
        (p for p in root.glob(f"{CHECKPOINT_PREFIX}*") if p.name[len(CHECKPOINT_PREFIX):].isdigit()),
        key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]),
    )
    for old in ckpts[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _load_trained_tensors(model: nn.Module, file: Path) -> None:
    tensors = load_file(str(file))
    expected = _trained_tensors(model)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not match the model (build it exactly as for the first run): "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    with torch.no_grad():
        for k, t in tensors.items():
            expected[k].copy_(t)


# ----------------------------------------------------------------------------- the loop
def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _call(callbacks: Sequence[Any], hook: str, *args: Any) -> None:
    for cb in callbacks:
        fn = getattr(cb, hook, None)
        if fn is not None:
            fn(*args)


def _batches(loader: Iterable, skip: int) -> Iterator[Any]:
    """``iter(loader)`` with the first ``skip`` batches consumed now (not lazily)."""
    it = iter(loader)
    for _ in range(skip):  # what the interrupted run already trained on
        next(it)
    return it


def train(
    model: nn.Module,
    train_loader: DataLoader | Iterable[dict[str, Any]],
    eval_loader: Iterable[dict[str, Any]] | None = None,
    config: TrainConfig | None = None,
    callbacks: Sequence[Any] = (),
    resume_from: str | Path | None = None,
) -> TrainResult:
    """Train ``model`` on ``train_loader`` (batches: dicts, loss = ``model(**batch).loss``).

    Runs ``max_steps`` optimizer steps (or ``epochs`` passes), evaluating on ``eval_loader`` every
    ``eval_every`` steps and at the end, checkpointing every ``checkpoint_every`` steps to
    ``output_dir/checkpoints/checkpoint-N``. ``resume_from`` (a checkpoint, or a directory holding
    some) continues an interrupted run exactly; build the model and loaders as for the first run.
    All RNGs are seeded with ``config.seed`` at the start of a fresh run.
    """
    cfg = config or TrainConfig()
    cfg.validate()
    callbacks = list(callbacks)
    t_start = time.perf_counter()
    device = resolve_device(cfg.device)
    model.to(device)
    reset_peak_memory(device)

    steps_per_epoch = len(train_loader) if hasattr(train_loader, "__len__") else None
    if cfg.max_steps is not None:
        total_steps = cfg.max_steps
    elif steps_per_epoch:
        total_steps = cfg.epochs * steps_per_epoch
    else:
        raise ValueError("max_steps must be set when train_loader has no len()")
    if steps_per_epoch == 0:
        raise ValueError("train_loader is empty")

    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps)
    state = TrainState(model, optimizer, scheduler, cfg, total_steps=total_steps)
    generators = _loader_generators(train_loader)
    history: list[dict[str, float]] = []
    evals: list[dict[str, float]] = []
    elapsed_before = 0.0
    resume_rng = None

    if resume_from is None:
        seed_everything(cfg.seed)
        epoch_start_rng = _rng_state(device)
        epoch_start_gens = [g.get_state() for g in generators]
    else:
        ckpt = find_checkpoint(resume_from)
        payload = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
        if payload["total_steps"] != total_steps:
            raise ValueError(
                f"resume_from: the checkpoint was made for {payload['total_steps']} total steps, "
                f"this run has {total_steps}; use the same max_steps/epochs"
            )
        if len(payload["loader_generators"]) != len(generators):
            raise ValueError("resume_from: the train loader's generators differ from the checkpointed run")
        _load_trained_tensors(model, ckpt / TENSORS_FILE)
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        for cb, cb_state in zip(callbacks, payload["callbacks"]):
            if cb_state is not None and hasattr(cb, "load_state_dict"):
                cb.load_state_dict(cb_state)
        state.step, state.epoch, state.batch_in_epoch = payload["step"], payload["epoch"], payload["batch_in_epoch"]
        history, evals, elapsed_before = list(payload["history"]), list(payload["evals"]), payload["elapsed"]
        epoch_start_rng = payload["rng"]["epoch_start"]
        epoch_start_gens = payload["loader_generators"]
        resume_rng = payload["rng"]["now"]

    trainable, total = count_params(model)
    ckpt_root = Path(cfg.output_dir) / "checkpoints" if cfg.output_dir else None
    interactive = cfg.progress and sys.stderr.isatty()
    bar = None
    if interactive:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=state.step, desc="train", dynamic_ncols=True)

    def checkpoint() -> None:
        rng = {"epoch_start": epoch_start_rng, "now": _rng_state(device)}
        elapsed = elapsed_before + time.perf_counter() - t_start
        save_checkpoint(ckpt_root / f"{CHECKPOINT_PREFIX}{state.step}", state, rng, epoch_start_gens,
                        history, evals, elapsed, callbacks)
        _prune_checkpoints(ckpt_root, cfg.keep_checkpoints)

    model.train()
    _call(callbacks, "on_train_begin", state)
    t_train = time.perf_counter()
    try:
        while state.step < total_steps and not state.should_stop:
            # The epoch's order is drawn from these states when the loader is iterated: restore them
            # (a resume re-draws the same permutation, then skips the batches already trained on).
            _set_rng_state(epoch_start_rng, device)
            for g, s in zip(generators, epoch_start_gens):
                g.set_state(s)
            batches = _batches(train_loader, state.batch_in_epoch)
            if resume_rng is not None:  # RNG exactly as at the checkpoint (dropout masks etc.)
                _set_rng_state(resume_rng, device)
                resume_rng = None
            empty = True
            for batch in batches:
                empty = False
                batch = _to_device(batch, device)
                loss = model(**batch).loss
                loss.backward()
                if cfg.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(
                        [p for g in optimizer.param_groups for p in g["params"]], cfg.max_grad_norm
                    )
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                state.batch_in_epoch += 1
                state.loss = float(loss.detach())
                history.append({"step": state.step, "loss": state.loss, "lr": lr})
                _call(callbacks, "on_step_end", state)
                if bar is not None:
                    bar.update(1)
                    if state.step % cfg.log_every == 0:
                        bar.set_postfix(loss=f"{state.loss:.4f}")
                if eval_loader is not None and cfg.eval_every and state.step % cfg.eval_every == 0 \
                        and state.step < total_steps:
                    metrics = evaluate(model, eval_loader, cfg.task, cfg.eval_max_batches)
                    evals.append({"step": state.step, **metrics})
                    _call(callbacks, "on_evaluate", state, metrics)
                if steps_per_epoch is not None and state.batch_in_epoch >= steps_per_epoch:
                    # epoch done: the next epoch starts from the states as they are now
                    state.epoch += 1
                    state.batch_in_epoch = 0
                    epoch_start_rng = _rng_state(device)
                    epoch_start_gens = [g.get_state() for g in generators]
                if ckpt_root is not None and cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
                    checkpoint()
                if state.step >= total_steps or state.should_stop:
                    break
            else:  # loader exhausted (also covers loaders without len())
                if empty and state.batch_in_epoch == 0:
                    raise ValueError("train_loader yielded no batches")
                if state.batch_in_epoch:
                    state.epoch += 1
                    state.batch_in_epoch = 0
                    epoch_start_rng = _rng_state(device)
                    epoch_start_gens = [g.get_state() for g in generators]
    finally:
        if bar is not None:
            bar.close()
    train_time = time.perf_counter() - t_train

    if ckpt_root is not None and cfg.checkpoint_every and state.step % cfg.checkpoint_every != 0:
        checkpoint()  # the final state, so resuming a finished run is a no-op
    if eval_loader is not None:
        metrics = evaluate(model, eval_loader, cfg.task)
        evals.append({"step": state.step, **metrics})
        _call(callbacks, "on_evaluate", state, metrics)
    else:
        tail = history[-10:]
        metrics = {"train_loss": sum(h["loss"] for h in tail) / max(1, len(tail))}
    _call(callbacks, "on_train_end", state)
    model.eval()

    peak, kind = peak_memory(device)
    return TrainResult(
        history=history,
        evals=evals,
        metrics=metrics,
        steps=state.step,
        wall_time_s=elapsed_before + time.perf_counter() - t_start,
        train_time_s=train_time,
        trainable_params=trainable,
        total_params=total,
        optimizer_state_bytes=optimizer_state_bytes(optimizer),
        peak_memory_bytes=peak,
        peak_memory_kind=kind,
        device=str(device),
        config=cfg.to_dict(),
    )


__all__ = [
    "FULL_FINETUNE", "HEAD_ONLY", "OPTIMIZERS", "SCHEDULES", "TrainConfig", "TrainResult", "TrainState",
    "build_optimizer", "build_scheduler", "count_params", "evaluate", "find_checkpoint", "lr_factor",
    "optimizer_state_bytes", "param_groups", "peak_memory", "prepare_model", "register_optimizer",
    "reset_peak_memory", "resolve_device", "save_checkpoint", "seed_everything", "train",
]
