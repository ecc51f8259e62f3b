"""A bench folder's rows summarised: per (task, experiment) the chosen lr and the mean with a 95% interval
over the seeds of every measurement, written as ``summary.json``, ``report.md`` and Pareto plots."""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..report import Column, human_bytes, human_count, markdown_table, save_figure, write_text
from .runner import BENCH_FILE, chosen_lr, fill_planned_peaks, read_rows, sweep_grid

#: Two-sided 95% Student t quantiles by degrees of freedom (n − 1); larger n uses 1.96.
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
#: Measurements averaged over the seeds (besides the test metric).
MEASURES = ("val_metric", "train_loss", "tokens_per_s", "train_time_s", "step_s_median", "optimizer_step_s_median",
            "refresh_step_s", "peak_memory_bytes", "tensor_peak_bytes", "planned_peak_bytes", "optimizer_state_bytes",
            "trainable_params", "trained_params", "total_params", "saved_bytes", "updates_per_param")

#: Exact counts the gate bounds by the largest recorded seed's (``<key>_max``).
EXACT_COUNTS = ("optimizer_state_bytes", "trained_params")


def mean_ci(values: Sequence[float]) -> tuple[float, float | None]:
    """``(mean, half-width of the 95% Student-t interval)``; the half-width is None for one value."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None
    return mean, T95.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def summarise(rows: list[dict[str, Any]], higher: dict[str, bool], grids: dict[str, list[float]], extend: int = 0
              ) -> list[dict[str, Any]]:
    """One entry per (task, experiment): chosen lr, the seeds' test metric (values, mean, 95% interval,
    spread = max |value − mean|), each measurement's mean, the sweep (lr → validation metric) and failures.
    ``higher[task]``: whether a larger metric is better; ``grids[kind]``: the profile's lr grid of a kind (for
    rows that do not record theirs), grown past its edge up to ``extend`` times as the runner grows it. An entry
    whose sweep is still running has no chosen lr or results yet."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["task"], row["experiment"]), []).append(row)
    out = []
    for (task, name), mine in groups.items():
        own = mine[-1].get("own_lr_grid")  # the experiment's own grid (else the profile's, which may have grown)
        grid, pending = sweep_grid(mine[-1]["lr_grid"] if own else grids.get(mine[0]["kind"], []), mine,
                                   higher[task], extend)
        swept = {r["lr"] for r in mine if r["role"] == "sweep"}
        lr = chosen_lr(mine, higher[task], grid) if pending is None else None
        final = sorted((r for r in mine if r["status"] == "ok" and r["lr"] == lr), key=lambda r: r["seed"])
        first = mine[0]
        entry: dict[str, Any] = {
            "task": task, "experiment": name, "fingerprint": first["fingerprint"], "method": first["method"],
            "kind": first["kind"],
            "optimizer": first["optimizer"], "metric": first["metric"], "note": first.get("note", ""),
            "options": first["options"], "optimizer_options": first["optimizer_options"], "lr": lr,
            "sweep": {str(r["lr"]): r.get("val_metric") for r in mine if r["role"] == "sweep" and r["lr"] in grid},
            "lr_at_grid_edge": _at_edge(lr, grid), "sweep_done": f"{len(swept & set(grid))}/{len(grid)}",
            "failures": [f"lr={r['lr']:g} seed={r['seed']}: {r['error']}" for r in mine if r["status"] != "ok"],
            "seeds": [r["seed"] for r in final], "test_values": [r["test_metric"] for r in final],
            "loss_curve": _mean_curve([r["loss_curve"] for r in final]),
        }
        if final:
            values = entry["test_values"]
            entry["test_mean"], entry["test_ci95"] = mean_ci(values)
            entry["test_spread"] = max(abs(v - entry["test_mean"]) for v in values)
            for key in MEASURES:
                present = [r[key] for r in final if r.get(key) is not None]
                entry[key] = statistics.fmean(present) if present else None
            entry["peak_memory_max_bytes"] = max((r["peak_memory_bytes"] for r in final if r.get("peak_memory_bytes")),
                                                 default=None)
            for key in EXACT_COUNTS:  # the gate's bound: a method whose ranks move with the seed varies in these
                entry[f"{key}_max"] = max((r[key] for r in final if r.get(key) is not None), default=None)
        out.append(entry)
    return out


def _at_edge(lr: float | None, grid: list[float]) -> bool:
    """Whether the chosen lr is the smallest or largest of a grid of 3 or more (the best may lie outside it)."""
    return lr is not None and len(set(grid)) >= 3 and lr in (min(grid), max(grid))


def _mean_curve(curves: list[list[float]]) -> list[float]:
    curves = [c for c in curves if c]
    if not curves:
        return []
    n = min(len(c) for c in curves)
    return [statistics.fmean(c[i] for c in curves) for i in range(n)]


def pareto(points: list[tuple[float, float]], higher: bool) -> list[int]:
    """Indices of the points no other point beats on both cost (x, lower is better) and quality (y)."""
    def beats(a: tuple[float, float], b: tuple[float, float]) -> bool:
        better_y = a[1] >= b[1] if higher else a[1] <= b[1]
        strictly = a[0] < b[0] or (a[1] > b[1] if higher else a[1] < b[1])
        return a[0] <= b[0] and better_y and strictly

    return [i for i, p in enumerate(points) if not any(beats(q, p) for j, q in enumerate(points) if j != i)]


# ------------------------------------------------------------------------------------------ report
def _metric(entry: dict[str, Any]) -> str:
    if entry.get("test_mean") is None:
        return "failed" if entry["lr"] is not None or entry["failures"] else f"sweep {entry['sweep_done']}"
    mean, ci = entry["test_mean"], entry["test_ci95"]
    fmt = "{:.3f}" if entry["metric"] == "accuracy" else "{:.2f}"
    return fmt.format(mean) + (f" ± {fmt.format(ci)}" if ci is not None else "") + f" ({len(entry['seeds'])})"


def _seconds(x: float | None) -> str:
    return "-" if x is None else (f"{x * 1000:.0f} ms" if x < 1 else f"{x:.1f} s")


COLUMNS = (
    Column("experiment", "experiment", align="<"),
    Column("lr", "lr", lambda v: f"{v:g}"),
    Column("metric_text", "test (mean ± 95% CI, seeds)"),
    Column("trained_params", "trained params", human_count),
    Column("peak_memory_bytes", "peak RSS", human_bytes),
    Column("tensor_peak_bytes", "tensor peak", human_bytes),
    Column("planned_peak_bytes", "rw.plan peak", human_bytes),
    Column("optimizer_state_bytes", "optimizer state", human_bytes),
    Column("tokens_per_s", "tokens/s", lambda v: f"{v:,.0f}"),
    Column("train_time_s", "train time", _seconds),
    Column("refresh_step_s", "refresh step", _seconds),
    Column("saved_bytes", "saved", human_bytes),
    Column("updates_per_param", "updates/param", lambda v: f"{v:.1f}"),
)


#: The columns of the terminal summary (``terminal_table``).
BRIEF = ("experiment", "lr", "metric_text", "trained_params", "tensor_peak_bytes", "tokens_per_s")


def ranked(entries: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """``{task: its entries, best test mean first (unfinished last)}``, each with its ``metric_text``."""
    out = {}
    for task in sorted({e["task"] for e in entries}):
        mine = [e for e in entries if e["task"] == task]
        higher = mine[0]["metric"] == "accuracy"
        mine.sort(key=lambda e: (e.get("test_mean") is None,
                                 -(e.get("test_mean") or 0) if higher else (e.get("test_mean") or 0)))
        for e in mine:
            e["metric_text"] = _metric(e)
        out[task] = mine
    return out


def terminal_table(out: str | os.PathLike) -> str:
    """Each task's experiments, best first, as a plain-text table (from the folder's ``summary.json``)."""
    from ..report import text_table

    data = json.loads((Path(out) / "summary.json").read_text())
    columns = [c for c in COLUMNS if c.key in BRIEF]
    return "\n\n".join(f"{task} ({mine[0]['metric']})\n{text_table(mine, columns)}"
                       for task, mine in ranked(data["entries"]).items())


def write_report(out: str | os.PathLike, plots: bool = True) -> Path:
    """Write ``summary.json``, ``report.md`` and (``plots``) ``pareto-<task>.png`` into bench folder ``out``."""
    out = Path(out)
    record = json.loads((out / BENCH_FILE).read_text()) if (out / BENCH_FILE).is_file() else None
    if record is None:
        raise ValueError(f"{out} is not a bench folder (no {BENCH_FILE})")
    rows = read_rows(out)
    if not rows:
        raise ValueError(f"{out} holds no finished run yet")
    planned_now = fill_planned_peaks(rows, record["profile"]["name"])
    higher = {r["task"]: r["metric"] == "accuracy" for r in rows}
    entries = summarise(rows, higher, record["profile"]["lr_grids"], record["profile"].get("lr_extend", 0))
    from ..io import write_json

    write_json(out / "summary.json", {"profile": record["profile"], "entries": entries, "env": rows[-1]["env"]})
    profile = record["profile"]
    lines = [f"# rankwise bench: {profile['name']}", "",
             f"Budget per run: {profile['steps']} optimizer steps of {profile['batch_size']} examples (LM: blocks) "
             f"of at most {profile['max_length']} tokens, linear warm-up over {profile['warmup']:.0%} of the steps "
             f"then linear decay. The learning rate of each experiment is the best of its grid on "
             f"{profile['val_size']} validation examples held out of the training split (seed 0); the test split "
             f"({profile['test_size']} examples) is never used to choose. Test metric: mean ± 95% Student-t "
             "interval over the seeds (their count in brackets).", "",
             _environment(rows[-1]["env"]), ""]
    for task, mine in ranked(entries).items():
        lines += [f"## {task} ({mine[0]['metric']}, {'higher' if higher[task] else 'lower'} is better)", "",
                  markdown_table(mine, COLUMNS), ""]
        if plots:
            plot = plot_pareto(mine, out / f"pareto-{task}.png", higher[task], f"{profile['name']}: {task}")
            curves = plot_curves(mine, out / f"curves-{task}.png", f"{profile['name']}: {task}")
            lines += [f"![Pareto fronts]({plot.name})", "", f"![Training loss]({curves.name})", ""]
        edge = [e["experiment"] for e in mine if e["lr_at_grid_edge"]]
        if edge:
            lines += [f"Chosen lr at the edge of its grid, grown past its edge up to {profile.get('lr_extend', 0)} "
                      "times (a tie at the edge stops the growth; the best may lie beyond it; widen `lr_grid`): "
                      f"{', '.join(edge)}.", ""]
        failed = [f"- {e['experiment']}: {f}" for e in mine for f in e["failures"]]
        if failed:
            lines += ["Failed runs:", "", *failed, ""]
    if planned_now:
        lines += [f"rw.plan peak planned when this report was written, after the runs (the planner could not plan "
                  f"their setup then; code changed since a run is planned as it is now): {', '.join(planned_now)}.",
                  ""]
    lines += _settings_section(entries)
    return write_text(out / "report.md", "\n".join(lines) + "\n")


def _environment(env: dict[str, Any]) -> str:
    packages = ", ".join(f"{k} {v}" for k, v in env["packages"].items() if v)
    return (f"Machine: {env['cpu']} ({env['cpu_count']} cores, {env['torch_threads']} torch threads)"
            f"{', GPU ' + env['gpu'] if env.get('gpu') else ''}; Python {env['python']}; {packages}; "
            f"commit {env.get('commit') or '-'}. Peak RSS: the process's peak resident memory over the run on CPU "
            "(includes the interpreter and libraries; CUDA max allocated on a GPU); tensor peak: the exact peak of "
            "live tensors (weights, buffers, optimizer state, gradients, activations) over one more training step; "
            "rw.plan peak: what `rw.plan` predicts for the same setup.")


def _settings_section(entries: list[dict[str, Any]]) -> list[str]:
    lines = ["## Settings of each experiment", "",
             "The method's own knobs as run (`steps/K` resolved against the budget) and the validation sweep "
             "(lr: validation metric).", ""]
    seen = set()
    for e in sorted(entries, key=lambda e: e["experiment"]):
        sweep = ", ".join(f"{float(lr):g}: {v:.4g}" if v is not None else f"{float(lr):g}: failed"
                          for lr, v in e["sweep"].items())
        text = (f"- **{e['experiment']}** ({e['task']}): method `{e['method']}` {json.dumps(e['options'])}, "
                f"optimizer `{e['optimizer']}` {json.dumps(e['optimizer_options'])}; sweep {sweep}"
                + (f". {e['note']}" if e["note"] else ""))
        if text not in seen:
            seen.add(text)
            lines.append(text)
    return [*lines, ""]


def plot_curves(entries: list[dict[str, Any]], path: Path, title: str) -> Path:
    """The training loss of each experiment (mean over its seeds at the chosen lr) against the fraction of its
    steps done, the ten with the lowest final loss labelled."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=110)
    done = sorted((e for e in entries if e.get("loss_curve")), key=lambda e: e["loss_curve"][-1])
    for i, e in enumerate(done):
        curve = e["loss_curve"]
        xs = [k / max(1, len(curve) - 1) for k in range(len(curve))]
        ax.plot(xs, curve, lw=1.4 if i < 10 else 0.6, alpha=0.9 if i < 10 else 0.35,
                label=e["experiment"] if i < 10 else None)
    ax.set_xlabel("fraction of the run's steps")
    ax.set_ylabel("training loss (mean over seeds)")
    ax.set_title(f"{title}: training loss at the chosen lr", fontsize=10)
    ax.grid(True, alpha=0.3)
    if done:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_pareto(entries: list[dict[str, Any]], path: Path, higher: bool, title: str) -> Path:
    """Three panels: the test metric against peak memory, trainable parameters and train time; the Pareto
    front of each panel drawn as a line, its points labelled."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    axes_spec = (("peak_memory_bytes", "peak memory (MiB)", 2**20), ("trained_params", "trained parameters", 1),
                 ("train_time_s", "train time (s)", 1))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8), dpi=110)
    ok = [e for e in entries if e.get("test_mean") is not None]
    for ax, (key, label, div) in zip(axes, axes_spec, strict=True):
        pts = [(e[key] / div, e["test_mean"], e["experiment"]) for e in ok if e.get(key)]
        if not pts:
            continue
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=14, alpha=0.6)
        front = sorted((pts[i] for i in pareto([(p[0], p[1]) for p in pts], higher)), key=lambda p: p[0])
        ax.plot([p[0] for p in front], [p[1] for p in front], "-o", ms=4, color="tab:red", lw=1)
        for x, y, name in front:
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel(label + " (log)")
        ax.set_ylabel(f"test {ok[0]['metric']}")
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"{title} — red: Pareto front (lower cost, {'higher' if higher else 'lower'} metric)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)
