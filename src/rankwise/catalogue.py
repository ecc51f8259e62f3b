"""The method catalogue: one record per method, every family, the only list of methods in rankwise.

Each package registers the methods it implements when it is imported (``register``): adapters
(``rw.adapt``), optimizers and samplers (``rw.optim.make``), structured training (``rw.sparsify``),
compression (``rw.compress``) and federated fine-tuning (``rw.federate``). Every other catalogued
method (``catalogue.tsv``, the project's reading of the papers: name, family, tier, paper, mechanism)
is listed with status ``planned``.
The CLI (``rankwise methods``), the README tables and the generic test matrices read this module;
the packages' own tables (``rw.REGISTRY``, ``rw.optim.OPTIMIZERS``, ``SPARSE_METHODS``,
``COMPRESS_METHODS``, ``FEDERATED_METHODS``) are views of it.
"""

from __future__ import annotations

import csv
import importlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import checks

FAMILIES = (
    "adapter", "init", "rank-allocation", "training-dynamics", "optimizer", "sampler", "sparse-finetuning",
    "sparse+low-rank", "from-scratch", "compression", "quantization", "multi-adapter", "federated", "other",
)
STATUSES = ("done", "planned")
#: How a method is applied: ``rw.adapt``, ``rw.optim.make``, ``rw.sparsify``, ``rw.compress``, a
#: compensation of a compressed model from its original (``rw.compression.eora`` / ``lrec``), LoRA
#: trained on a pruned copy and recovered onto the original (``rw.compression.loram``), a
#: training-free merge of named adapters (``rw.merge_adapters(model, weights, how=name)``), serving
#: many adapters from a bounded pool (``rw.AdapterServer``), or federated fine-tuning simulated in one
#: process (``rw.federate(model, method, clients)``).
APIS = ("adapt", "optim", "sparsify", "compress", "compensate", "train-pruned", "merge", "serve", "federate")
#: What a trained or compressed result can be written as.
EXPORTS = ("peft-lora", "peft-dora", "merge", "model", "compressed", "none")
_PACKAGES = ("rankwise.adapters", "rankwise.optim", "rankwise.sparse", "rankwise.compress", "rankwise.serving",
             "rankwise.federated")
_PLANNED_FILE = Path(__file__).with_name("catalogue.tsv")


@dataclass(frozen=True)
class MethodRecord:
    """One method: what it is (family, paper, one-line mechanism), whether it is done, and how to use it.

    ``api`` names the entry point and ``builder(model, **options)`` calls it; ``config`` is the
    class whose fields or keyword arguments are the method's options (``options`` holds defaults
    where the options are a plain mapping); ``exports`` says what the result can be saved as;
    ``spec`` is the implementing package's own description (e.g. the adapter layer spec).
    """

    name: str
    family: str
    paper: str
    mechanism: str
    status: str = "done"
    api: str = ""
    config: Any = None
    builder: Callable[..., Any] | None = None
    exports: str = "none"
    options: Mapping[str, Any] = field(default_factory=dict)
    spec: Any = None
    tier: int | None = None

    def __post_init__(self) -> None:
        checks.choice("family", self.family, FAMILIES)
        checks.choice("status", self.status, STATUSES)
        checks.choice("exports", self.exports, EXPORTS)
        if self.status == "done":
            checks.choice("api", self.api, APIS)
            if self.builder is None:
                raise ValueError(f"method {self.name!r} is done but has no builder")

    def build(self, model: Any, **options: Any) -> Any:
        """Apply the method to ``model`` (the adapted/restructured model, or the optimizer)."""
        if self.builder is None:
            raise ValueError(f"method {self.name!r} is {self.status}: not implemented in rankwise yet")
        return self.builder(model, **options)

    def row(self) -> dict[str, Any]:
        """The JSON-friendly fields shown by ``rankwise methods``."""
        return {"name": self.name, "family": self.family, "status": self.status, "api": self.api,
                "exports": self.exports, "tier": self.tier, "mechanism": self.mechanism, "paper": self.paper}


_RECORDS: dict[str, MethodRecord] = {}
_PLANNED: dict[str, MethodRecord] = {}


def register(record: MethodRecord) -> MethodRecord:
    """Add an implemented method; a second record under the same name is an error."""
    if record.name in _RECORDS:
        raise ValueError(f"method {record.name!r} is registered twice (by {_RECORDS[record.name].api!r} and "
                         f"{record.api!r})")
    planned = _planned().get(record.name)
    if planned is not None and record.tier is None:
        record = MethodRecord(**{**record.__dict__, "tier": planned.tier})
    _RECORDS[record.name] = record
    return record


def _planned() -> dict[str, MethodRecord]:
    """The catalogued methods of ``catalogue.tsv`` (read once)."""
    if not _PLANNED:
        with _PLANNED_FILE.open(encoding="utf-8", newline="") as f:
            for row in csv.DictReader(f, delimiter="\t"):
                _PLANNED[row["name"]] = MethodRecord(
                    row["name"], row["family"], row["paper"], row["mechanism"], status="planned",
                    tier=int(row["tier"]) if row["tier"].isdigit() else None,
                )
    return _PLANNED


def _load_packages() -> None:
    for name in _PACKAGES:
        importlib.import_module(name)


def records(family: str | None = None, status: str | None = None, api: str | None = None) -> list[MethodRecord]:
    """Every method (done ones first, in registration order, then the planned ones), optionally
    only one family, status or api."""
    if family is not None:
        checks.choice("family", family, FAMILIES)
    if status is not None:
        checks.choice("status", status, STATUSES)
    _load_packages()
    done = list(_RECORDS.values())
    planned = [r for n, r in _planned().items() if n not in _RECORDS]
    return [r for r in done + planned
            if (family is None or r.family == family) and (status is None or r.status == status)
            and (api is None or r.api == api)]


def get(name: str) -> MethodRecord:
    """The record of ``name`` (done or planned); ValueError listing the known names otherwise."""
    _load_packages()
    record = _RECORDS.get(name) or _planned().get(name)
    if record is None:
        raise ValueError(f"unknown method {name!r}; known methods: {sorted({*_RECORDS, *_planned()})}")
    return record


class View(Mapping[str, Any]):
    """A live read-only mapping ``name -> value(record)`` over the registered records that pass
    ``keep``: how each package exposes its part of the catalogue (e.g. ``rw.REGISTRY``)."""

    def __init__(self, keep: Callable[[MethodRecord], bool], value: Callable[[MethodRecord], Any]):
        self._keep, self._value = keep, value

    def _names(self) -> list[str]:
        return [n for n, r in _RECORDS.items() if self._keep(r)]

    def __getitem__(self, name: str) -> Any:
        record = _RECORDS.get(name)
        if record is None or not self._keep(record):
            raise KeyError(name)
        return self._value(record)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    def __repr__(self) -> str:
        return f"View({self._names()})"




# ------------------------------------------------------------------------------------ README tables
README_BEGIN = "<!-- methods:begin (generated by `make readme` from rankwise.catalogue; do not edit) -->"
README_END = "<!-- methods:end -->"
_API_TITLES = {
    "adapt": "Adapters, inits and training dynamics (`rw.adapt`)",
    "optim": "Optimizers and samplers (`rw.optim.make`)",
    "sparsify": "Structured training from scratch (`rw.sparsify`)",
    "compress": "Compression and pruning (`rw.compress`)",
    "compensate": "Compensation of compressed models from their original (`rw.compression.eora`, training-free; "
                  "`rw.compression.lrec`, by distillation)",
    "train-pruned": "LoRA trained on a pruned copy, recovered onto the original model (`rw.compression.loram`)",
    "merge": "Merging named adapters (`rw.merge_adapters(model, weights, how=...)`)",
    "serve": "Serving many adapters from a bounded device pool (`rw.AdapterServer(model, pool_bytes)`)",
    "federate": "Federated fine-tuning, simulated in one process (`rw.federate(model, method, clients)`)",
}


def readme_tables() -> str:
    """The README's method section: one Markdown table per entry point, then done/planned per family."""
    from .report import Column, markdown_table

    columns = [Column("name", "method", lambda v: f"`{v}`", "<"), Column("family", "family", align="<"),
               Column("paper", "paper", align="<"), Column("mechanism", "mechanism", align="<"),
               Column("exports", "exports", align="<")]
    parts = []
    for api, title in _API_TITLES.items():
        rows = [r.row() for r in records(status="done", api=api)]
        parts += [f"### {title}", "", markdown_table(rows, columns), ""]
    counts = [{"family": f, "done": len(records(f, "done")), "planned": len(records(f, "planned"))} for f in FAMILIES]
    counts.append({"family": "**total**", "done": len(records(status="done")),
                   "planned": len(records(status="planned"))})
    parts += ["### Catalogue status by family", "",
              markdown_table(counts, [Column("family", "family", align="<"), Column("done", "done"),
                                      Column("planned", "planned")]), ""]
    return "\n".join(parts)


def replace_readme_section(text: str) -> str:
    """``text`` (a README) with the part between the method markers replaced by ``readme_tables()``."""
    if README_BEGIN not in text or README_END not in text:
        raise ValueError(f"the README has no method section: add the lines {README_BEGIN!r} and {README_END!r}")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    return f"{head}{README_BEGIN}\n{readme_tables()}{README_END}{tail}"


def write_readme(path: str | Path) -> None:
    """Regenerate the method tables of the README at ``path`` in place (``make readme``)."""
    from .io import atomic_file

    path = Path(path)
    new = replace_readme_section(path.read_text(encoding="utf-8"))
    with atomic_file(path) as f:
        f.write(new)


__all__ = [
    "APIS", "EXPORTS", "FAMILIES", "STATUSES", "MethodRecord", "View", "get", "readme_tables", "records", "register",
    "replace_readme_section", "write_readme",
]
