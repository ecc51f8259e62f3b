"""``rankwise demo``: head-only vs full fine-tuning vs adapter methods on MiniLM + BBC News.

Every method gets the same budget (optimizer steps, batch size, max_length, seed, train/test
examples, the same initial classification head); only the learning rate is set per method
(LoRA-shaped adapters 1e-3..2e-3, vector/core-only adapters 1e-2..2e-2, full fine-tuning 1e-4,
head-only 1e-2; chosen on this budget). The result is a table of test
accuracy, trainable parameters, optimizer-state bytes, wall time and peak memory, written as JSON,
Markdown and a PNG of accuracy against trainable parameters.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .report import Column, human_bytes, human_count, markdown_table, plot_accuracy_vs_params, text_table, write_text
from .train import FULL_FINETUNE, HEAD_ONLY, TrainConfig, prepare_model, train

RESULTS_JSON = "results.json"
REPORT_MD = "report.md"
PLOT_PNG = "accuracy_vs_params.png"


@dataclass(frozen=True)
class DemoEntry:
    """One row of the comparison: a label, the method that implements it, its options and lr."""

    label: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    lr: float = 2e-3


#: Preferred order. An entry runs when its method is registered (and accepts its options).
#: Entries with several ways to exist (PiSSA: its own method, or LoRA with init="pissa") list all.
CANDIDATES: tuple[tuple[DemoEntry, ...], ...] = (
    (DemoEntry("head-only", HEAD_ONLY, lr=1e-2),),
    (DemoEntry("full-ft", FULL_FINETUNE, lr=1e-4),),
    (DemoEntry("lora", "lora", lr=2e-3),),
    (DemoEntry("rslora", "rslora", lr=1e-3),),  # scale α/√r = √r·(α/r): a smaller lr
    (DemoEntry("dora", "dora", lr=2e-3),),
    (DemoEntry("pissa", "pissa", lr=1e-3), DemoEntry("pissa", "lora", {"init": "pissa"}, lr=1e-3)),
    (DemoEntry("vera", "vera", lr=1e-2),),
    (DemoEntry("lora_xs", "lora_xs", lr=2e-2),),  # r×r cores only: a large lr
    (DemoEntry("loldu", "loldu", lr=1e-2),),
    (DemoEntry("svfit", "svfit", lr=1e-2),),
    (DemoEntry("olora", "olora", lr=2e-3), DemoEntry("olora", "lora", {"init": "olora"}, lr=2e-3)),
    (DemoEntry("lora_sb", "lora_sb", lr=2e-3),),
)
#: How many adapter entries the default run takes (head-only and full-ft always run).
DEFAULT_ADAPTERS = 6


def _usable(entry: DemoEntry) -> bool:
    if entry.method in (HEAD_ONLY, FULL_FINETUNE):
        return True
    from .adapters.registry import REGISTRY

    spec = REGISTRY.get(entry.method)
    if spec is None:
        return False
    try:
        spec.make_config(**entry.options)
    except ValueError:
        return False
    return True


def available_entries() -> list[DemoEntry]:
    """Every candidate that can run now, in preferred order (one entry per label)."""
    out = []
    for alternatives in CANDIDATES:
        usable = [e for e in alternatives if _usable(e)]
        if usable:
            out.append(usable[0])
    return out


def select_entries(names: Sequence[str] | None = None) -> list[DemoEntry]:
    """The default selection (head-only, full-ft, the first ``DEFAULT_ADAPTERS`` adapters) or ``names``.

    ``names`` may be demo labels or any registered adapter method (run with its defaults, lr 2e-3).
    """
    avail = available_entries()
    if names is None:
        base = [e for e in avail if e.method in (HEAD_ONLY, FULL_FINETUNE)]
        return base + [e for e in avail if e.method not in (HEAD_ONLY, FULL_FINETUNE)][:DEFAULT_ADAPTERS]
    by_label = {e.label: e for e in avail}
    aliases = {"none": "full-ft", "full": "full-ft", "head": "head-only"}
    from .adapters.registry import REGISTRY

    out = []
    for name in names:
        key = aliases.get(name, name)
        if key in by_label:
            out.append(by_label[key])
        elif key in REGISTRY:
            out.append(DemoEntry(key, key))
        else:
            known = sorted(set(by_label) | set(REGISTRY) | set(aliases))
            raise ValueError(f"unknown demo method {name!r}; choose from {known}")
    if not out:
        raise ValueError("methods is empty; name at least one method")
    return out


@dataclass
class DemoSettings:
    """The shared budget.

    Defaults: 80 steps of 8 examples cut to 64 tokens (a BBC headline and first sentences carry the
    topic), 300 test examples. Measured: about 280 s of single-thread CPU for the 8 default methods
    (≈ 3-3.5 min wall on 2 cores), full-ft 0.965, LoRA 0.95, head-only 0.84 test accuracy.
    """

    model: str = "minilm-l6"
    data: str = "bbc"
    steps: int = 80
    batch_size: int = 8
    max_length: int = 64
    train_limit: int | None = None  # None: the whole train split (steps x batch of it are seen)
    test_limit: int | None = 300  # test examples evaluated (a fixed, class-mixed subset)
    r: int = 8  # adapter rank, for every adapter entry
    seed: int = 0
    device: str = "auto"

    def validate(self) -> None:
        for name in ("steps", "batch_size", "max_length", "r"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"{name}={v!r} must be an integer >= 1")
        for name in ("train_limit", "test_limit"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, int) and v >= 1):
                raise ValueError(f"{name}={v!r} must be None or an integer >= 1")


#: ``--quick``: a few steps on a few short examples (for tests; the numbers mean nothing).
QUICK = DemoSettings(steps=3, batch_size=8, max_length=32, train_limit=48, test_limit=24, r=4)

COLUMNS = (
    Column("method", "method", align="<"),
    Column("test_accuracy", "test acc", lambda v: f"{v:.3f}"),
    Column("trainable_params", "trainable", human_count),
    Column("trainable_pct", "% of model", lambda v: f"{v:.3f}%"),
    Column("optimizer_state_bytes", "optim state", human_bytes),
    Column("wall_time_s", "wall time", lambda v: f"{v:.1f} s"),
    Column("peak_memory_bytes", "peak mem", human_bytes),
    Column("lr", "lr", lambda v: f"{v:g}"),
)


def _cpu_time() -> float:
    """User + system CPU seconds of this process (all threads)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _with_lrs(entries: list[DemoEntry], lrs: dict[str, float] | None) -> list[DemoEntry]:
    """``entries`` with the learning rates that ``lrs`` gives by label; every label must be selected."""
    lrs = dict(lrs or {})
    unknown = sorted(set(lrs) - {e.label for e in entries})
    if unknown:
        raise ValueError(f"lrs names {unknown}, which are not among the selected methods {[e.label for e in entries]}")
    return [replace(e, lr=float(lrs[e.label])) if e.label in lrs else e for e in entries]


def _make_loaders(train_ds: Any, test_ds: Any, tokenizer: Any, settings: DemoSettings) -> tuple[Any, Any]:
    """The tokenized train (shuffled, seeded) and test loaders, shared by every method."""
    from .data import classification_loader

    return (
        classification_loader(train_ds, tokenizer, settings.batch_size, settings.max_length,
                              shuffle=True, seed=settings.seed),
        classification_loader(test_ds, tokenizer, 32, settings.max_length, shuffle=False),
    )


def _entry_options(entry: DemoEntry, settings: DemoSettings) -> dict[str, Any]:
    """The entry's options, with the shared rank and seed for adapter methods."""
    options = dict(entry.options)
    if entry.method not in (HEAD_ONLY, FULL_FINETUNE):
        options.setdefault("r", settings.r)
        options.setdefault("seed", settings.seed)
    return options


def _train_config(entry: DemoEntry, settings: DemoSettings, progress: bool) -> TrainConfig:
    """The shared budget as a ``TrainConfig``, with the entry's learning rate."""
    return TrainConfig(
        lr=entry.lr, max_steps=settings.steps, batch_size=settings.batch_size, max_length=settings.max_length,
        warmup_steps=max(1, settings.steps // 10), schedule="linear", seed=settings.seed,
        device=settings.device, progress=progress,
    )


def _result_row(entry: DemoEntry, options: dict[str, Any], result: Any, wall: float, cpu: float) -> dict[str, Any]:
    """One row of ``results.json`` from a method's training result and its wall / CPU time."""
    return {
        "method": entry.label,
        "adapter_method": entry.method,
        "options": options,
        "test_accuracy": result.metrics["accuracy"],
        "test_loss": result.metrics["loss"],
        "trainable_params": result.trainable_params,
        "total_params": result.total_params,
        "trainable_pct": 100.0 * result.trainable_params / result.total_params,
        "optimizer_state_bytes": result.optimizer_state_bytes,
        "wall_time_s": wall,
        "cpu_time_s": cpu,
        "train_time_s": result.train_time_s,
        "peak_memory_bytes": result.peak_memory_bytes,
        "peak_memory_kind": result.peak_memory_kind,
        "lr": entry.lr,
        "steps": result.steps,
        "final_train_loss": result.history[-1]["loss"],
        "device": result.device,
    }


def _run_entry(
    model: torch.nn.Module, entry: DemoEntry, loaders: tuple[Any, Any], settings: DemoSettings, progress: bool
) -> dict[str, Any]:
    """Prepare ``model`` for the entry's method, train and evaluate it; its result row."""
    train_loader, test_loader = loaders
    train_loader.generator.manual_seed(settings.seed)
    options = _entry_options(entry, settings)
    init_loader = torch.utils.data.DataLoader(
        train_loader.dataset, batch_size=settings.batch_size, collate_fn=train_loader.collate_fn
    )
    prepare_model(model, entry.method, init_data=init_loader, **options)
    cfg = _train_config(entry, settings, progress)
    t_method, cpu_method = time.perf_counter(), _cpu_time()
    result = train(model, train_loader, test_loader, cfg)
    wall, cpu = time.perf_counter() - t_method, _cpu_time() - cpu_method
    return _result_row(entry, options, result, wall, cpu)


def _run_entries(
    entries: list[DemoEntry], settings: DemoSettings, train_ds: Any, test_ds: Any, progress: bool,
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Every entry on a freshly loaded model with the same initial head; one result row each."""
    from .models import load_model

    rows: list[dict[str, Any]] = []
    loaders = None
    for i, entry in enumerate(entries, 1):
        torch.manual_seed(settings.seed)  # the same initial head for every method
        model, tokenizer = load_model(settings.model, task="seq-cls", num_labels=train_ds.num_labels)
        if loaders is None:  # tokenize once; the sampler is re-seeded for every method in _run_entry
            loaders = _make_loaders(train_ds, test_ds, tokenizer, settings)
        row = _run_entry(model, entry, loaders, settings, progress)
        rows.append(row)
        log(f"[{i}/{len(entries)}] {entry.label:<10} test acc {row['test_accuracy']:.3f}  "
            f"trainable {human_count(row['trainable_params']):>7}  {row['wall_time_s']:5.1f} s")
        del model
    return rows


def _results(
    settings: DemoSettings, train_ds: Any, test_ds: Any, rows: list[dict[str, Any]], total: float
) -> dict[str, Any]:
    """The content of ``results.json``: settings, example counts, environment, timing and rows."""
    return {
        "settings": asdict(settings),
        "examples": {"train_seen": settings.steps * settings.batch_size, "train_available": len(train_ds),
                     "test": len(test_ds)},
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                        "python": platform.python_version(), "machine": platform.machine(),
                        "device": rows[0]["device"] if rows else None},
        "total_time_s": total,
        "columns": [c.key for c in COLUMNS],
        "results": rows,
    }


def _write_outputs(results: dict[str, Any], settings: DemoSettings, out: Path) -> None:
    """Write ``results.json``, the accuracy-vs-parameters plot and ``report.md`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / RESULTS_JSON, json.dumps(results, indent=2, sort_keys=False) + "\n")
    title = (f"{settings.model} on {settings.data}: {settings.steps} steps x {settings.batch_size}, "
             f"max_length {settings.max_length}")
    plot_accuracy_vs_params(results["results"], out / PLOT_PNG, title=title)
    write_text(out / REPORT_MD, markdown_report(results))


def run_demo(
    settings: DemoSettings | None = None,
    methods: Sequence[str] | None = None,
    output: str | os.PathLike = "demo-out",
    progress: bool = True,
    log: Callable[[str], None] = print,
    lrs: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Run every selected method under ``settings``; write JSON, Markdown and PNG into ``output``.

    ``lrs`` overrides the learning rate of entries by label (e.g. ``{"lora": 3e-3}``).
    """
    from .data import load_classification
    from .models import quiet_transformers

    settings = settings or DemoSettings()
    settings.validate()
    entries = _with_lrs(select_entries(methods), lrs)
    quiet_transformers()
    t0 = time.perf_counter()
    train_ds = load_classification(settings.data, "train", seed=settings.seed, limit=settings.train_limit)
    test_ds = load_classification(settings.data, "test", seed=settings.seed, limit=settings.test_limit)
    log(
        f"rankwise demo: {settings.model} on {settings.data} ({train_ds.num_labels} classes), "
        f"{settings.steps} steps x batch {settings.batch_size}, max_length {settings.max_length}, "
        f"{len(test_ds)} test examples; methods: {', '.join(e.label for e in entries)}"
    )
    rows = _run_entries(entries, settings, train_ds, test_ds, progress, log)
    total = time.perf_counter() - t0
    results = _results(settings, train_ds, test_ds, rows, total)
    log("\n" + text_table(rows, COLUMNS))
    out = Path(output)
    _write_outputs(results, settings, out)
    log(f"\nwrote {out / RESULTS_JSON}, {out / REPORT_MD}, {out / PLOT_PNG} (total {total:.0f} s)")
    return results


def markdown_report(results: dict[str, Any]) -> str:
    """The Markdown report of a demo run."""
    s, ex, env, rows = results["settings"], results["examples"], results["environment"], results["results"]
    lines = [
        f"# rankwise demo: {s['model']} on {s['data']}",
        "",
        (f"Same budget for every method: {s['steps']} optimizer steps of batch {s['batch_size']} "
         f"({ex['train_seen']} training examples seen out of {ex['train_available']}), "
         f"max_length {s['max_length']}, seed {s['seed']}, adapter rank r = {s['r']}, AdamW with linear decay "
         f"and 10% warmup; test accuracy on {ex['test']} held-out examples. Only the learning rate differs "
         "per method (column lr)."),
        "",
        markdown_table(rows, COLUMNS),
        "",
        f"![test accuracy against trainable parameters]({PLOT_PNG})",
        "",
        ("- *trainable*: parameters with `requires_grad` (adapters plus the new classification head; "
         "full-ft trains everything)."),
        "- *optim state*: exact bytes of AdamW's state tensors (Σ numel·element_size over `optimizer.state`).",
        "- *peak mem*: " + ("CUDA `max_memory_allocated`." if env["device"] and env["device"].startswith("cuda")
                            else "peak resident set size of the process during the method's run (CPU), "
                                 "model weights and activations included."),
        (f"- torch {env['torch']}, {env['threads']} threads, device {env['device']}, python {env['python']}; "
         f"total time {results['total_time_s']:.0f} s."),
        "",
    ]
    return "\n".join(lines)


def quick_settings(**overrides: Any) -> DemoSettings:
    return replace(QUICK, **overrides)


__all__ = [
    "CANDIDATES", "COLUMNS", "QUICK", "DemoEntry", "DemoSettings", "available_entries", "markdown_report",
    "quick_settings", "run_demo", "select_entries",
]
