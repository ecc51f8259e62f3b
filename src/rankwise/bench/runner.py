"""Running a bench: the validation sweep, the seeds, one run's measurements, resumable and shardable.

For each (task, experiment) the runner first trains seed 0 at every learning rate of the grid, scoring each
on the validation split (held out of the training split; the test split is scored too but never read to
choose), picks the lr with the best validation metric, then trains seeds 1..n−1 at that lr. The seed-0
run at the chosen lr is the first of the n seeds. Every finished run is one JSON line appended (and
fsync'd) to ``<out>/runs*.jsonl``; a restarted bench skips what is there. ``shard=(i, n)`` runs the
(task, experiment) pairs whose index is i mod n, each shard writing its own ``runs.shard-i-of-n.jsonl``.
``<out>/bench.json`` records the profile's settings: a bench folder never mixes two budgets, and the
rows of an experiment whose settings changed are refused, not mixed.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..report import append_run, read_runs
from .experiments import FULL_FINETUNE, HEAD_ONLY, Experiment, resolve_budget
from .profiles import PROFILES, BenchTask, Profile

BENCH_FILE = "bench.json"
RUNS_GLOB = "runs*.jsonl"
CURVE_POINTS = 100


# ------------------------------------------------------------------------------------------ data
@dataclass
class Splits:
    """Loaders of one (task, seed): ``train`` (shuffled by the seed), ``val`` (held out of the training
    split, the same for every seed), ``test`` and ``init`` (unshuffled training batches for data-driven inits)."""

    train: Any
    val: Any
    test: Any
    init: Any


def _cls_splits(task: BenchTask, profile: Profile, tok: Any, seed: int) -> Splits:
    from torch.utils.data import DataLoader

    from ..data import TextClassification, classification_loader, load_classification

    full = load_classification(task.data, "train", seed=0)  # the same order (and validation set) for every seed
    if len(full) <= profile.val_size:
        raise ValueError(f"{task.data}: {len(full)} training examples cannot spare val_size={profile.val_size}")
    val = TextClassification(full.texts[: profile.val_size], full.labels[: profile.val_size], full.label_names)
    rest = TextClassification(full.texts[profile.val_size:], full.labels[profile.val_size:], full.label_names)
    test = load_classification(task.data, "test", seed=0, limit=profile.test_size)
    bs, n = profile.batch_size, profile.max_length
    train = classification_loader(rest, tok, bs, n, shuffle=True, seed=seed)
    return Splits(train, classification_loader(val, tok, 32, n, shuffle=False),
                  classification_loader(test, tok, 32, n, shuffle=False),
                  DataLoader(train.dataset, batch_size=bs, collate_fn=train.collate_fn))


def _lm_splits(task: BenchTask, profile: Profile, tok: Any, seed: int) -> Splits:
    from ..data import lm_blocks, lm_loader, load_text

    docs = load_text(task.data, "train", seed=0)
    n_val = 1  # documents held out until they fill val_size blocks (whole documents: no block straddles the cut)
    while n_val < len(docs) and len(lm_blocks(docs[:n_val], tok, profile.max_length)) < profile.val_size:
        n_val = min(len(docs), 2 * n_val)
    val = lm_blocks(docs[:n_val], tok, profile.max_length)[: profile.val_size]
    train_blocks = lm_blocks(docs[n_val:], tok, profile.max_length)
    test = lm_blocks(load_text(task.data, "test", seed=0), tok, profile.max_length)[: profile.test_size]
    if len(train_blocks) == 0 or len(val) == 0 or len(test) == 0:
        raise ValueError(f"{task.data}: too little text for blocks of {profile.max_length} tokens")
    return Splits(lm_loader(train_blocks, profile.batch_size, shuffle=True, seed=seed),
                  lm_loader(val, 8, shuffle=False), lm_loader(test, 8, shuffle=False),
                  lm_loader(train_blocks, profile.batch_size, shuffle=False))


class CountingLoader:
    """``loader`` as the training loop sees it, counting the (unpadded) tokens of the batches it yields."""

    def __init__(self, loader: Any):
        self.loader, self.dataset, self.tokens = loader, loader.dataset, 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            self.tokens += int(batch["attention_mask"].sum())
            yield batch


# ------------------------------------------------------------------------------------------ one run
class Meter:
    """Loop callback timing each step (``step_s``) and its optimizer part (after backward to step end:
    clipping, ``optimizer.step()``, the schedule), and counting how many trainable entries get a gradient
    per step (block samplers update only their active block)."""

    def __init__(self) -> None:
        self.step_s: list[float] = []
        self.optimizer_s: list[float] = []
        self.updated = 0
        self._t0 = self._t1 = 0.0
        self.optimizer: torch.optim.Optimizer | None = None

    def on_train_begin(self, state: Any) -> None:
        self.optimizer = state.optimizer
        self._t0 = time.perf_counter()

    def on_after_backward(self, state: Any) -> None:
        self._t1 = time.perf_counter()
        self.updated += sum(p.numel() for g in state.optimizer.param_groups for p in g["params"] if p.grad is not None)

    def on_step_end(self, state: Any) -> None:
        now = time.perf_counter()
        self.step_s.append(now - self._t0)
        self.optimizer_s.append(now - self._t1)
        self._t0 = now

    def refresh_s(self) -> float | None:
        """Mean optimizer-step time of the subspace-refresh steps (step k·update_gap, k ≥ 1; step 0 also
        allocates the state) of a projected optimizer; None for others."""
        groups = self.optimizer.param_groups if self.optimizer is not None else []
        gaps = {g.get("update_gap") for g in groups if g.get("update_gap")}
        if len(gaps) != 1:
            return None
        gap = int(gaps.pop() or 1)
        times = [t for i, t in enumerate(self.optimizer_s) if i % gap == 0 and i > 0] or self.optimizer_s[:1]
        return statistics.fmean(times) if times else None


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


_SPLITS: dict[tuple[Any, ...], Splits] = {}


def _build(task: BenchTask, profile: Profile, seed: int) -> tuple[Any, Any, Splits]:
    """The model (seeded: the new head, or the scratch model's init), its tokenizer and the splits (tokenized
    once per process; the training loader is rebuilt with a fresh seeded generator for every run)."""
    from torch.utils.data import DataLoader

    from ..data import load_classification
    from ..models import load_model

    torch.manual_seed(seed)
    labels = load_classification(task.data, "test", limit=1).num_labels if task.kind == "seq-cls" else None
    model, tok = load_model(task.model, task=task.kind, num_labels=labels)
    key = (task, profile.batch_size, profile.max_length, profile.val_size, profile.test_size, seed)
    if key not in _SPLITS:
        _SPLITS[key] = (_cls_splits if task.kind == "seq-cls" else _lm_splits)(task, profile, tok, seed)
    s = _SPLITS[key]
    train = DataLoader(s.train.dataset, batch_size=profile.batch_size, shuffle=True,
                       generator=torch.Generator().manual_seed(seed), collate_fn=s.train.collate_fn)
    return model, tok, Splits(train, s.val, s.test, s.init)


#: Structured methods whose controller restructures the dense model itself after a warm start (ReLoRA's recipe:
#: dense steps, then LoRA merged and restarted with a jagged lr); ``rw.sparsify`` is not called for them.
DENSE_START = {"relora": "ReLoRAWarmStart"}


def _prepare(model: Any, exp: Experiment, splits: Splits, seed: int) -> None:
    """Make ``exp``'s parameters trainable: its adapter (seeded), full training, head only or a structured model
    (``rw.sparsify`` with the options its method takes; :func:`structured_controller` adds its controller)."""
    from ..train import prepare_model

    if exp.kind == "structured":
        from ..sparse.api import SPARSE_METHODS, sparsify

        if exp.method in DENSE_START:
            return
        own = SPARSE_METHODS[exp.method].options
        sparsify(model, exp.method, targets=exp.targets, **{k: v for k, v in exp.options.items() if k in own})
        return
    options = dict(exp.options)
    if exp.method not in (FULL_FINETUNE, HEAD_ONLY):
        from ..adapters.registry import get_method

        if "seed" in get_method(exp.method).config_cls.field_names():
            options.setdefault("seed", seed)
        prepare_model(model, exp.method, targets=exp.targets, init_data=splits.init, **options)
    else:
        prepare_model(model, exp.method, **options)


def structured_controller(model: Any, exp: Experiment, optimizer: torch.optim.Optimizer, steps: int
                          ) -> tuple[list[Any], Any]:
    """``([controller], loss_fn)`` of a structured method whose catalogue record names a controller class of
    ``rankwise.sparse`` (none: ``([], None)``): built from the model, the loop's optimizer and step count where
    its constructor takes them, and the experiment's options that ``rw.sparsify`` does not take (``steps/K``
    resolved); a controller with a ``loss`` method (Maestro) wraps the loop's loss."""
    import inspect

    from .. import sparse
    from ..batches import default_loss
    from ..sparse.api import SPARSE_METHODS

    spec = SPARSE_METHODS[exp.method]
    name = DENSE_START.get(exp.method, spec.controller)
    if not name:
        return [], None
    cls = getattr(sparse, name)
    takes = inspect.signature(cls).parameters
    own = () if exp.method in DENSE_START else spec.options  # a dense start: every option is the controller's
    kwargs = resolve_budget({k: v for k, v in exp.options.items() if k not in own}, steps)
    kwargs.update({k: v for k, v in (("optimizer", optimizer), ("total_steps", steps)) if k in takes})
    controller = cls(model, **kwargs)
    loss_fn = None
    if callable(getattr(controller, "loss", None)):
        def loss_fn(m: Any, batch: Any) -> torch.Tensor:
            return controller.loss(lambda: default_loss(m, batch))
    return [controller], loss_fn


def _saved_bytes(model: Any, exp: Experiment) -> int:
    """Bytes of what a user keeps after training: the adapter directory (rankwise format), or the trainable
    tensors (full training, head only)."""
    if exp.kind != "adapter":  # full training (a block sampler's trainable set moves): every weight
        return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad or exp.kind == "full")
    from ..io import save_adapter

    with tempfile.TemporaryDirectory() as tmp:
        save_adapter(model, Path(tmp) / "adapter")
        return sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())


_PLANS: dict[tuple[str, str, str], int | None] = {}


def planned_peak(task: BenchTask, exp: Experiment, profile: Profile, device: str = "cuda") -> int | None:
    """``rw.plan``'s predicted peak bytes of this training setup on ``device``'s kernels (``cuda`` or ``cpu``;
    None where the planner has no model of it)."""
    key = (task.name, exp.fingerprint(), device)
    if key not in _PLANS:
        from ..planner import plan

        method = None if exp.kind == "full" else exp.method
        try:
            if exp.kind in ("head", "structured"):
                raise ValueError("not planned")
            _PLANS[key] = plan(task.model, method, exp.optimizer, batch_size=profile.batch_size,
                               seq_len=profile.max_length, task=task.kind, method_options=exp.options or None,
                               optimizer_options=resolve_budget(exp.optimizer_options, profile.steps) or None,
                               device=device).peak
        except Exception:  # noqa: BLE001 - a setup the planner cannot trace is reported as unplanned
            _PLANS[key] = None
    return _PLANS[key]


def fill_planned_peaks(rows: list[dict[str, Any]], profile_name: str) -> list[str]:
    """Plan now the finished rows that carry no plan (run before ``rw.plan`` could plan their setup: samplers,
    QLoRA, initializations read from data); the plan reads only the model, the settings stored in the row and
    the profile's batch (and the code as it is now, which may have changed since the run). Rows of an unknown
    profile or task are left alone. Returns the experiments filled."""
    profile = PROFILES.get(profile_name)
    if profile is None:
        return []
    tasks = {t.name: t for t in profile.tasks}
    filled: list[str] = []
    for row in rows:
        task = tasks.get(row.get("task", ""))
        if task is None or row.get("planned_peak_bytes") is not None or row.get("status") != "ok":
            continue
        exp = Experiment(row["experiment"], row["method"], row.get("options") or {}, row.get("targets", "all-linear"),
                         row.get("optimizer", "adamw"), row.get("optimizer_options") or {})
        kernels = "cpu" if str(row.get("device", "cpu")).startswith("cpu") else "cuda"
        row["planned_peak_bytes"] = planned_peak(task, exp, profile, kernels)
        if row["planned_peak_bytes"] is not None and exp.name not in filled:
            filled.append(exp.name)
    return filled


def tensor_peak(model: Any, optimizer: torch.optim.Optimizer, batch: dict[str, Any]) -> int:
    """Exact peak bytes of live tensors over one more training step (forward, backward, optimizer step) on
    ``batch``: the weights, buffers and optimizer state held before it plus every storage the step creates
    while alive (``rankwise.memory.TensorMemoryTracker``), the quantity ``rw.plan`` predicts."""
    from ..batches import loss_of, model_device, move_batch
    from ..memory import TensorMemoryTracker, optimizer_state_bytes

    held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for t in [*model.parameters(), *model.buffers()]}
    optimizer.zero_grad(set_to_none=True)
    model.train()
    batch = move_batch(batch, model_device(model))
    with TensorMemoryTracker(baseline=sum(held.values()) + optimizer_state_bytes(optimizer)) as tracker:
        loss_of(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return tracker.peaks()["total"]


def _curve(values: list[float]) -> list[float]:
    """At most CURVE_POINTS evenly spaced values (the first and last kept)."""
    if len(values) <= CURVE_POINTS:
        return values
    idx = [round(i * (len(values) - 1) / (CURVE_POINTS - 1)) for i in range(CURVE_POINTS)]
    return [values[i] for i in idx]


def run_one(profile: Profile, task: BenchTask, exp: Experiment, lr: float, seed: int,
            device: str = "auto") -> dict[str, Any]:
    """Train ``exp`` on ``task`` at ``lr`` with ``seed`` under ``profile``'s budget; the result row."""
    from ..memory import peak_memory
    from ..train import TrainConfig, build_optimizer, evaluate, place_model, train

    model, _, splits = _build(task, profile, seed)
    _prepare(model, exp, splits, seed)
    steps = exp.steps(profile.steps)
    cfg = TrainConfig(lr=lr, max_steps=steps, batch_size=profile.batch_size, max_length=profile.max_length,
                      warmup_steps=max(1, round(profile.warmup * steps)), schedule="linear",
                      optimizer=exp.optimizer, optimizer_kwargs=resolve_budget(exp.optimizer_options, steps),
                      seed=seed, device=device, progress=False, task="lm" if task.kind == "causal-lm" else "auto")
    loader, meter = CountingLoader(splits.train), Meter()
    rss_before = _rss()
    optimizer, loss_fn = None, None
    controllers: list[Any] = []
    if exp.kind == "structured":  # its controller is built on the loop's optimizer
        place_model(model, device)
        optimizer = build_optimizer(model, cfg)
        controllers, loss_fn = structured_controller(model, exp, optimizer, steps)
    # methods that fit their own choices on held-out data (AutoLoRA's α, Fast Forward's stops) read the
    # validation split that also picks the lr; the test split stays unseen
    result = train(model, loader, None, cfg, callbacks=[*controllers, meter], optimizer=optimizer, loss_fn=loss_fn,
                   val_loader=splits.val)
    peak, kind = peak_memory(torch.device(result.device))
    eval_task = "lm" if task.kind == "causal-lm" else "classification"
    val, test = evaluate(model, splits.val, task=eval_task), evaluate(model, splits.test, task=eval_task)
    kernels = "cpu" if torch.device(result.device).type == "cpu" else "cuda"  # whose dropout / attention to plan
    step_peak = tensor_peak(model, meter.optimizer, next(iter(splits.init))) if meter.optimizer is not None else None
    losses = [h["loss"] for h in result.history if "loss" in h]
    # parameters the run trains over its course: every weight for full training (a block sampler
    # unfreezes one block at a time), else those trainable at the end
    trained = result.total_params if exp.kind == "full" else result.trainable_params
    return {
        "val_metric": val[task.metric], "test_metric": test[task.metric], "test_loss": test["loss"],
        "train_loss": statistics.fmean(losses[-10:]) if losses else None, "loss_curve": _curve(losses),
        "steps": result.steps, "tokens": loader.tokens, "train_time_s": result.train_time_s,
        "tokens_per_s": loader.tokens / result.train_time_s if result.train_time_s > 0 else None,
        "step_s_median": statistics.median(meter.step_s) if meter.step_s else None,
        "optimizer_step_s_median": statistics.median(meter.optimizer_s) if meter.optimizer_s else None,
        "refresh_step_s": meter.refresh_s(),
        "updates_per_param": meter.updated / max(1, trained),
        "peak_memory_bytes": peak, "peak_memory_kind": kind, "rss_before_bytes": rss_before,
        "tensor_peak_bytes": step_peak,
        "planned_peak_bytes": planned_peak(task, exp, profile, kernels),
        "optimizer_state_bytes": result.optimizer_state_bytes, "trainable_params": result.trainable_params,
        "total_params": result.total_params, "trained_params": trained, "saved_bytes": _saved_bytes(model, exp),
        "device": result.device,
        "skipped_steps": result.history[-1].get("skipped_steps", 0) if result.history else 0,
    }


def _duration(seconds: float) -> str:
    """3725 -> '1 h 02 min', 95 -> '2 min'."""
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


# ------------------------------------------------------------------------------------------ environment
def environment() -> dict[str, Any]:
    """Package versions and the machine (stored with every run)."""
    from importlib import metadata

    versions: dict[str, str | None] = {}
    for package in ("rankwise", "torch", "transformers", "peft", "accelerate", "bitsandbytes"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"packages": versions, "python": sys.version.split()[0], "platform": platform.platform(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "commit": _git_commit()}


def _git_commit() -> str | None:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


# ------------------------------------------------------------------------------------------ the bench
def read_rows(out: str | os.PathLike) -> list[dict[str, Any]]:
    """Every run row of bench folder ``out`` (all its shards' logs)."""
    return [row for log in sorted(Path(out).glob(RUNS_GLOB)) for row in read_runs(log)]


def _better(metric: float, best: float | None, higher: bool) -> bool:
    if not math.isfinite(metric):
        return False
    return best is None or (metric > best if higher else metric < best)


def chosen_lr(rows: list[dict[str, Any]], higher: bool, grid: Sequence[float] | None = None) -> float | None:
    """The lr of the sweep row (seed 0) with the best validation metric, among the lrs of ``grid`` (default:
    every swept lr), the smallest lr on a tie; None if every sweep run failed."""
    best, lr = None, None
    for row in sorted(rows, key=lambda r: r["lr"]):
        if grid is not None and row["lr"] not in grid:
            continue
        if row["role"] == "sweep" and row["status"] == "ok" and _better(row["val_metric"], best, higher):
            best, lr = row["val_metric"], row["lr"]
    return lr


def sweep_grid(base: Sequence[float], rows: list[dict[str, Any]], higher: bool, extend: int
               ) -> tuple[list[float], float | None]:
    """``(grid, next lr to sweep)``: the sweep's grid grown past its edge. Every lr of ``base`` is swept first;
    then, while the lr with the best validation metric is the smallest or largest of a grid of 3 or more and
    strictly better than its neighbour (a tie says nothing about what lies beyond), the next lr beyond it (the
    edge's own ratio, 2 significant digits) joins the grid, at most ``extend`` times.
    The next lr is None once every lr of the grid has a sweep row (ok or failed) and the best is inside it
    (or the extensions are used up). The runner and the report grow the grid from the same rows alike."""
    grid = sorted(set(base))
    swept = {r["lr"] for r in rows if r["role"] == "sweep"}
    added = 0
    while True:
        missing = [lr for lr in grid if lr not in swept]
        if missing:
            return grid, missing[0]
        best = chosen_lr(rows, higher, grid)
        if best is None or len(grid) < 3 or added >= extend or best not in (grid[0], grid[-1]):
            return grid, None
        neighbour = grid[1] if best == grid[0] else grid[-2]
        val = {r["lr"]: r["val_metric"] for r in rows if r["role"] == "sweep" and r["status"] == "ok"}
        if neighbour in val and not _better(val[best], val[neighbour], higher):
            return grid, None
        if best == grid[0]:
            grid.insert(0, float(f"{grid[0] * grid[0] / grid[1]:.2g}"))
        else:
            grid.append(float(f"{grid[-1] * grid[-1] / grid[-2]:.2g}"))
        added += 1


@dataclass
class Bench:
    """One bench folder: ``profile``'s budget, its ``experiments`` on ``tasks`` with ``seeds`` seeds, this
    process's ``shard`` (index, count) of the (task, experiment) pairs."""

    profile: Profile
    experiments: list[Experiment]
    out: Path
    tasks: tuple[BenchTask, ...]
    seeds: int
    shard: tuple[int, int] = (0, 1)
    device: str = "auto"

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self._left, self._walls = 0, list[float]()  # runs left in this shard, wall times of the runs done here
        index, count = self.shard
        if not (isinstance(count, int) and isinstance(index, int) and 0 <= index < count):
            raise ValueError(f"shard={self.shard!r} must be (i, n) with 0 <= i < n")
        if self.seeds < 1:
            raise ValueError(f"seeds={self.seeds} must be at least 1")
        names = [e.name for e in self.experiments]
        if len(set(names)) != len(names):
            repeated = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"experiment names must be unique; repeated: {repeated}")
        for exp in self.experiments:
            self.grid(exp)

    def grid(self, exp: Experiment) -> tuple[float, ...]:
        """The learning rates the sweep tries for ``exp``."""
        if exp.lr_grid is not None:
            return exp.lr_grid
        if exp.kind not in self.profile.lr_grids:
            raise ValueError(f"experiment {exp.name!r} ({exp.kind}) needs an lr_grid: profile {self.profile.name!r} "
                             f"has default grids for {sorted(self.profile.lr_grids)} only")
        return self.profile.lr_grids[exp.kind]

    def pairs(self) -> list[tuple[BenchTask, Experiment]]:
        """This shard's (task, experiment) pairs."""
        index, count = self.shard
        every = [(t, e) for t in self.tasks for e in self.experiments]
        return [p for i, p in enumerate(every) if i % count == index]

    def log(self) -> Path:
        index, count = self.shard
        return self.out / ("runs.jsonl" if count == 1 else f"runs.shard-{index}-of-{count}.jsonl")

    def check_folder(self) -> list[dict[str, Any]]:
        """Create or check ``bench.json`` (same profile settings; the lr grids may change: they are the search
        space, and runs at lrs still in it are reused) and the recorded rows (same experiment settings);
        return the rows."""
        from ..io import write_json

        self.out.mkdir(parents=True, exist_ok=True)
        record = self.out / BENCH_FILE
        settings = self.profile.settings()
        settings = json.loads(json.dumps(settings))  # tuples as lists, as read back
        held = json.loads(record.read_text()).get("profile") or {} if record.is_file() else None
        if held is not None:
            search = ("lr_grids", "lr_extend")  # the search space may change; the budget may not
            diff = sorted(k for k in set(held) | set(settings) if held.get(k) != settings.get(k) and k not in search)
            if diff:
                raise ValueError(f"{self.out} holds a bench with other settings ({', '.join(diff)}); use another --out")
        if held != settings:
            write_json(record, {"format": "rankwise-bench", "profile": settings})
        rows = read_rows(self.out)
        current = {e.name: e.fingerprint() for e in self.experiments}
        for row in rows:
            if row["experiment"] in current and row["fingerprint"] != current[row["experiment"]]:
                raise ValueError(f"experiment {row['experiment']!r} changed since its runs in {self.out} were written; "
                                 "restore its settings, rename it, or use another --out")
        return rows

    def planned_runs(self) -> int:
        return sum(len(self.grid(e)) + self.seeds - 1 for _, e in self.pairs())

    def run(self, say: Callable[[str], None] = lambda text: print(text, file=sys.stderr)) -> None:
        """Run every missing run of this shard (sweep first, then the seeds at the chosen lr)."""
        if self.profile.needs_cuda and not torch.cuda.is_available():
            raise ValueError(f"profile {self.profile.name!r} needs a CUDA GPU; this machine has none")
        from ..models import quiet_transformers

        quiet_transformers()
        rows = self.check_folder()
        env = environment()
        done = {(r["task"], r["experiment"], r["lr"], r["seed"]) for r in rows}
        total, count = self.planned_runs(), 0
        mine_pairs = {(t.name, e.name) for t, e in self.pairs()}
        self._left = max(0, total - sum((r["task"], r["experiment"]) in mine_pairs for r in rows))
        self._walls = []
        for task, exp in self.pairs():
            mine = [r for r in rows if r["task"] == task.name and r["experiment"] == exp.name]
            count += len(self.grid(exp))
            while True:  # the grid's lrs, then past its edge while the best lies there
                grid, lr = sweep_grid(self.grid(exp), mine, task.higher_is_better, self.profile.lr_extend)
                if lr is None:
                    break
                mine.append(self._run(task, exp, lr, 0, "sweep", env, say, f"[{count}/{total}]"))
            best = chosen_lr(mine, task.higher_is_better, grid)
            for seed in range(1, self.seeds):
                count += 1
                if best is not None and (task.name, exp.name, best, seed) not in done:
                    mine.append(self._run(task, exp, best, seed, "seed", env, say, f"[{count}/{total}]"))

    def _run(self, task: BenchTask, exp: Experiment, lr: float, seed: int, role: str, env: dict[str, Any],
             say: Callable[[str], None], where: str) -> dict[str, Any]:
        row: dict[str, Any] = {
            "profile": self.profile.name, "task": task.name, "experiment": exp.name, "fingerprint": exp.fingerprint(),
            "method": exp.method, "kind": exp.kind, "optimizer": exp.optimizer, "options": exp.options,
            "optimizer_options": resolve_budget(exp.optimizer_options, exp.steps(self.profile.steps)),
            "targets": exp.targets,
            "note": exp.note, "lr_grid": list(self.grid(exp)), "own_lr_grid": exp.lr_grid is not None, "lr": lr,
            "seed": seed, "role": role,
            "metric": task.metric,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "env": env,
        }
        t0 = time.perf_counter()
        try:
            row.update(run_one(self.profile, task, exp, lr, seed, self.device), status="ok", error=None)
            summary = f"val {row['val_metric']:.4g}, test {row['test_metric']:.4g}"
        except Exception as e:  # noqa: BLE001 - a method that fails is a result (PEFT's comparison records it too)
            if os.environ.get("RANKWISE_DEBUG"):
                traceback.print_exc()
            row.update(status="failed", error=f"{type(e).__name__}: {e}".splitlines()[0][:500])
            summary = f"FAILED: {row['error']}"
        row["wall_s"] = time.perf_counter() - t0
        append_run(self.log(), json.loads(json.dumps(row, default=str)))
        self._walls.append(row["wall_s"])
        self._left = max(0, self._left - 1)
        eta = statistics.fmean(self._walls) * self._left
        say(f"{where} {task.name} {exp.name} lr={lr:g} seed={seed}: {summary} ({row['wall_s']:.0f} s; "
            f"about {_duration(eta)} left in this shard)")
        return row
