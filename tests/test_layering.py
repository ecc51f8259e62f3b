"""The method packages are siblings on a ground floor.

Every module of ``optim``, ``adapters``, ``sparse``, ``compress`` and ``federated`` may import its own
package, the top-level modules in ``TOP`` (checks, batches, layout, linalg, rng, targets, ...) and, for
``sparse``, ``compress`` and ``federated`` only, the public API of the packages in ``SIBLINGS``
(``from ..adapters import adapt``, never ``from ..adapters.lora import ...``). No module imports another package's or a
top-level module's private (``_``) name. Read from the source with ``ast``; nothing is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGES = ("optim", "adapters", "sparse", "compress", "federated")
# Top-level modules of rankwise the packages may use (catalogue: each package registers its methods; callbacks,
# memory: the loop's protocol and accounting; data / models: the compression loaders).
TOP = {"batches", "callbacks", "catalogue", "checks", "data", "io", "layout", "linalg", "memory", "models",
       "param_groups", "quant", "rng", "shards", "targets"}
# Packages (and, for compress and federated, the one training loop ``rankwise.train``, which sits above optim
# because it builds optimizers by name) whose public API a package may import: the package itself, not its
# modules.
SIBLINGS = {"optim": set(), "adapters": set(), "sparse": {"adapters"}, "compress": {"adapters", "sparse", "train"},
            "federated": {"adapters", "train"}}


def _is_module(dotted: str) -> bool:
    path = SRC.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imports(where: str, source: str) -> list[tuple[str, list[str]]]:
    """``(module, names)`` for every rankwise import of the module at ``where`` (its path below
    ``src``); ``from .. import checks`` imports the module ``rankwise.checks`` (no names)."""
    package = where.removesuffix(".py").split("/")[:-1]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + (node.module.split(".") if node.module else []))
            names = [alias.name for alias in node.names]
            found += [(f"{module}.{n}", []) for n in names if _is_module(f"{module}.{n}")]
            names = [n for n in names if not _is_module(f"{module}.{n}")]
            if names:
                found.append((module, names))
    return [(module, names) for module, names in found if module.split(".")[0] == "rankwise"]


def _violations(where: str, source: str) -> list[str]:
    package = where.split("/")[1]
    bad = []
    for module, names in _imports(where, source):
        parts = module.split(".")[1:]
        if parts[:1] == [package]:
            continue
        public = bool(parts) and (parts[0] in TOP or (parts[0] in SIBLINGS[package] and len(parts) == 1))
        if not public or any(n.startswith("_") for n in names):
            bad.append(f"{where}: {module} {names}")
    return bad


def test_method_packages_import_only_the_floor_and_public_sibling_apis():
    bad = []
    for package in PACKAGES:
        for path in sorted((SRC / "rankwise" / package).rglob("*.py")):
            bad += _violations(path.relative_to(SRC).as_posix(), path.read_text())
    assert not bad, "imports that cross the layering:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    "where,source,ok",
    [
        ("rankwise/optim/blocks.py", "from ..batches import call_model", True),
        ("rankwise/optim/blocks.py", "from .. import checks", True),
        ("rankwise/optim/blocks.py", "from ..adapters.gradients import call_model", False),
        ("rankwise/optim/blocks.py", "from ..adapters import adapt", False),
        ("rankwise/optim/blocks.py", "import rankwise.adapters", False),
        ("rankwise/compress/dsee.py", "from ..adapters import AdapterLayer, register", True),
        ("rankwise/compress/dsee.py", "from ..adapters.base import AdapterLayer", False),
        ("rankwise/compress/dsee.py", "from ..layout import _private", False),
        ("rankwise/compress/dsee.py", "from .loraprune import _input_side", True),
        ("rankwise/sparse/api.py", "from ..compress import compress", False),
        ("rankwise/adapters/lora.py", "from ..sparse import FactorizedLinear", False),
        ("rankwise/adapters/__init__.py", "from . import lora", True),
        ("rankwise/federated/api.py", "from ..train import TrainConfig, train", True),
        ("rankwise/federated/api.py", "from ..adapters.lora import LoRALayer", False),
    ],
)
def test_the_rules(where, source, ok):
    assert (_violations(where, source) == []) is ok
