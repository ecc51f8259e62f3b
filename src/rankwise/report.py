"""Result tables (plain text and Markdown), JSON-lines run logs and the accuracy-vs-parameters plot."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .io import atomic_file


def human_bytes(n: float | None) -> str:
    """1536 -> '1.5 KiB'."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def human_count(n: float | None) -> str:
    """22713216 -> '22.71M'."""
    if n is None:
        return "-"
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}"
    return str(int(n))


@dataclass(frozen=True)
class Column:
    """A table column: the row key, its header and how a value is shown."""

    key: str
    header: str
    fmt: Callable[[Any], str] = str
    align: str = ">"  # ">" right, "<" left


def _cells(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> list[list[str]]:
    return [[c.fmt(row.get(c.key)) if row.get(c.key) is not None else "-" for c in columns] for row in rows]


def text_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    """Aligned plain-text table with a header rule."""
    cells = _cells(rows, columns)
    widths = [max([len(c.header)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]

    def line(vals: Sequence[str]) -> str:
        return "  ".join(f"{v:{c.align}{w}}" for v, c, w in zip(vals, columns, widths, strict=True))

    out = [line([c.header for c in columns]), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    return "\n".join(out)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column]) -> str:
    """GitHub-flavoured Markdown table."""
    cells = _cells(rows, columns)
    rule = ["---:" if c.align == ">" else ":---" for c in columns]
    out = ["| " + " | ".join(c.header for c in columns) + " |", "| " + " | ".join(rule) + " |"]
    out += ["| " + " | ".join(v.replace("|", "\\|") for v in r) + " |" for r in cells]
    return "\n".join(out)


def read_runs(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a JSON-lines run log (one JSON object per line; ``[]`` when it does not exist yet)."""
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def append_run(path: str | os.PathLike, row: dict[str, Any]) -> None:
    """Append ``row`` as one line to a JSON-lines run log and fsync it, so an interrupted benchmark
    resumes after the last finished run."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` atomically, readable by everyone (reports are meant to be shared)."""
    with atomic_file(path) as f:
        f.write(text)
    os.chmod(path, 0o644)
    return Path(path)


def plot_accuracy_vs_params(
    rows: Sequence[dict[str, Any]],
    path: str | os.PathLike,
    title: str = "",
    x: str = "trainable_params",
    y: str = "test_accuracy",
    label: str = "method",
) -> Path:
    """Scatter of ``y`` against ``x`` (log x axis), each point labelled; written as PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    pts = [(r[x], r[y], r[label]) for r in rows if r.get(x) and r.get(y) is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(y.replace("_", " "))
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if pts:
        lo, hi = min(p[1] for p in pts), max(p[1] for p in pts)
        pad = max(0.02, 0.1 * (hi - lo))
        ax.set_ylim(lo - pad, hi + pad)
        xs = [p[0] for p in pts]
        ax.set_xlim(min(xs) / 2, max(xs) * 4)
    fig.tight_layout()
    # Labels: top to bottom, each moved down (in points) until it clears the labels already placed.
    to_px = ax.transData.transform
    pt = fig.dpi / 72.0
    placed: list[tuple[float, float, float]] = []  # (x px, y px, width px) of placed labels
    for px, py, name in sorted(pts, key=lambda p: -p[1]):
        ax.scatter([px], [py], s=36)
        lx, ly = to_px((px, py))
        lx, ly = lx + 6 * pt, ly + 3 * pt
        width = 5.5 * pt * len(name)
        while any(abs(ly - qy) < 10 * pt and lx < qx + qw and qx < lx + width for qx, qy, qw in placed):
            ly -= 2 * pt
        placed.append((lx, ly, width))
        dx, dy = (lx - to_px((px, py))[0]) / pt, (ly - to_px((px, py))[1]) / pt
        ax.annotate(name, (px, py), textcoords="offset points", xytext=(dx, dy), fontsize=9,
                    arrowprops={"arrowstyle": "-", "lw": 0.5, "alpha": 0.5} if dy < -4 else None)
    return save_figure(fig, path)


def save_figure(fig: Any, path: str | os.PathLike) -> Path:
    """Write matplotlib figure ``fig`` as PNG to ``path`` atomically (a temporary sibling, then a rename) and
    close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


__all__ = ["Column", "human_bytes", "human_count", "markdown_table", "plot_accuracy_vs_params", "save_figure",
           "text_table", "write_text"]
