"""``rankwise methods``: the method catalogue as a table, Markdown or JSON."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from .common import Formatter, UsageError

FORMATS = ("table", "markdown", "json")
FORMAT_ALIASES = {"text": "table"}
STATUSES = ("done", "planned", "all")
FAMILY_ALIASES = {"adapter-init": "init"}
EPILOG = """\
examples:
  rankwise methods                              # every implemented method
  rankwise methods --family optimizer           # one family
  rankwise methods --status all                 # with the catalogue's planned methods
  rankwise methods --format markdown > METHODS.md
  rankwise methods --format json"""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``methods`` to the ``rankwise`` subcommands."""
    from ..catalogue import FAMILIES

    p = subparsers.add_parser(
        "methods", help="list the methods of every family (adapters, optimizers, sparse, compression, ...)",
        formatter_class=Formatter, epilog=EPILOG,
        description="List the method catalogue: name, family, status (done, or planned in the project's "
                    "catalogue), entry point (adapt, optim, sparsify, compress), what the result exports to, "
                    "the one-line mechanism and the paper.",
    )
    p.add_argument("--family", default=None, help=f"only this family: {', '.join(FAMILIES)}")
    p.add_argument("--status", default="done", help="done (implemented, the default), planned or all")
    p.add_argument("--format", default="table",
                   help="table (aligned, long cells cut), markdown (full cells) or json [default: table]")
    p.set_defaults(func=run)
    return p


def method_rows(family: str | None = None, status: str = "done") -> list[dict[str, Any]]:
    """One row per catalogued method (of ``family`` and ``status`` when given; ``status="all"``: both)."""
    from ..catalogue import records

    return [r.row() for r in records(family, None if status == "all" else status)]


def _cut(n: int) -> Callable[[str], str]:
    return lambda v: v if len(v) <= n else v[: n - 1] + "…"


def _check(args: argparse.Namespace) -> tuple[str | None, str, str]:
    from ..catalogue import FAMILIES

    family = FAMILY_ALIASES.get(args.family, args.family)
    if family is not None and family not in FAMILIES:
        raise UsageError(f"--family {args.family!r} is not a family; choose one of {list(FAMILIES)}")
    if args.status not in STATUSES:
        raise UsageError(f"--status {args.status!r}; choose one of {list(STATUSES)}")
    fmt = FORMAT_ALIASES.get(args.format, args.format)
    if fmt not in FORMATS:
        raise UsageError(f"--format {args.format!r}; choose one of {list(FORMATS)}")
    return family, args.status, fmt


def run(args: argparse.Namespace) -> int:
    """Print the method table; returns the exit status."""
    from ..report import Column, markdown_table, text_table

    family, status, fmt = _check(args)
    rows = method_rows(family, status)
    if fmt == "json":
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return 0
    table = fmt == "table"
    cols = [Column("name", "name", align="<"), Column("family", "family", align="<"),
            Column("status", "status", align="<"), Column("api", "api", align="<"),
            Column("exports", "exports", align="<"),
            Column("mechanism", "mechanism", _cut(60) if table else str, align="<"),
            Column("paper", "paper", _cut(50) if table else str, align="<")]
    print(text_table(rows, cols) if table else markdown_table(rows, cols))
    if table:
        more = "" if status != "done" else f"; {len(method_rows(family, 'planned'))} more planned (--status all)"
        print(f"\n{len(rows)} methods{more}. 'rankwise methods --format markdown' shows full mechanisms and papers.")
    return 0
