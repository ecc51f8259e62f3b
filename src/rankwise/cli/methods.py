"""``rankwise methods``: list every registered adapter method (text, Markdown or JSON)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from .common import Formatter, UsageError

FORMATS = ("text", "markdown", "json")
EPILOG = """\
examples:
  rankwise methods
  rankwise methods --family adapter-init
  rankwise methods --format markdown > METHODS.md
  rankwise methods --format json"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``methods`` to the ``rankwise`` subcommands."""
    p = subparsers.add_parser(
        "methods", help="list every registered adapter method", formatter_class=Formatter, epilog=EPILOG,
        description="List every adapter method in rankwise.REGISTRY: name, family, status, PEFT export "
                    "format, a one-line summary and the paper.",
    )
    p.add_argument("--family", default=None, help="only this family: adapter, adapter-init or training-dynamics")
    p.add_argument("--format", choices=FORMATS, default="text",
                   help="text (an aligned table, long cells cut), markdown (full cells) or json [default: text]")
    p.set_defaults(func=run)
    return p


def method_rows(family: str | None = None) -> list[dict[str, Any]]:
    """One row per registered method (of ``family`` when given)."""
    from ..adapters.registry import REGISTRY

    return [
        {"name": name, "family": spec.family, "status": getattr(spec, "status", "implemented"),
         "export": spec.export, "summary": spec.summary, "paper": spec.paper}
        for name, spec in REGISTRY.items() if family is None or spec.family == family
    ]


def _cut(n: int) -> Callable[[str], str]:
    return lambda v: v if len(v) <= n else v[: n - 1] + "…"


def run(args: argparse.Namespace) -> int:
    """Print the method table; returns the exit status."""
    from ..adapters.registry import FAMILIES
    from ..report import Column, markdown_table, text_table

    if args.family is not None and args.family not in FAMILIES:
        raise UsageError(f"--family {args.family!r} is not a family; choose one of {list(FAMILIES)}")
    rows = method_rows(args.family)
    if args.format == "json":
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return 0
    text = args.format == "text"
    cols = [Column("name", "name", align="<"), Column("family", "family", align="<"),
            Column("status", "status", align="<"), Column("export", "export", align="<"),
            Column("summary", "summary", _cut(64) if text else str, align="<"),
            Column("paper", "paper", _cut(60) if text else str, align="<")]
    print(text_table(rows, cols) if text else markdown_table(rows, cols))
    if text:
        print(f"\n{len(rows)} methods. 'rankwise methods --format markdown' shows full summaries and papers.")
    return 0
