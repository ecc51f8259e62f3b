"""Which modules to touch: name suffixes, a regex, or ``"all-linear"``; and module replacement.

Target conventions (the same as PEFT's ``target_modules``):

* ``"all-linear"``: every ``nn.Linear`` except the output head(s);
* a ``str``: a regular expression that must match the *full* module name;
* a list/tuple of ``str``: a module matches when its name equals an entry or ends with ``"." + entry``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from .layout import CLASSIFIER_NAMES, head_module_names

ALL_LINEAR = "all-linear"

Targets = str | Sequence[str]


def _under_head(name: str, heads: set[str]) -> bool:
    return any(name == h or name.startswith(h + ".") for h in heads)


def name_matches(name: str, targets: Targets) -> bool:
    """Whether module ``name`` is selected by ``targets`` (regex string or suffix list)."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def find_targets(model: nn.Module, targets: Targets) -> list[tuple[str, nn.Linear]]:
    """Return ``(name, module)`` for every module selected by ``targets``.

    Raises ``ValueError`` when ``targets`` is not a valid regular expression, when nothing matches,
    when a matched module is not an ``nn.Linear`` or is part of a classification head (``classifier`` /
    ``score``), and for ``"all-linear"`` on a model with transformers ``Conv1D`` layers (GPT-2), which
    would otherwise be skipped silently.
    """
    if isinstance(targets, str) and targets != ALL_LINEAR:
        try:
            re.compile(targets)
        except re.error as e:
            raise ValueError(f"targets={targets!r} is not a valid regular expression ({e})") from None
    if isinstance(targets, str) and targets == ALL_LINEAR:
        heads = head_module_names(model)
        conv1d = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D" and not _under_head(n, heads)]
        if conv1d:
            more = f" and {len(conv1d) - 3} more" if len(conv1d) > 3 else ""
            raise ValueError(
                f"targets='all-linear': this {type(model).__name__} has transformers Conv1D layers ({conv1d[:3]}"
                f"{more}), which are not supported yet (nn.Linear only); 'all-linear' would silently skip them"
            )
        found = [
            (n, m)
            for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and not _under_head(n, heads)
        ]
        if not found:
            raise ValueError("targets='all-linear' matched no nn.Linear module outside the output head")
        return found
    if not isinstance(targets, str | list | tuple) or (
        not isinstance(targets, str) and not all(isinstance(t, str) for t in targets)
    ):
        raise ValueError(
            f"targets must be 'all-linear', a regex string or a list of name suffixes, got {targets!r}"
        )
    classifiers = {h for h in head_module_names(model) if set(h.split(".")) & set(CLASSIFIER_NAMES)}
    found = []
    for name, module in model.named_modules():
        if not name or not name_matches(name, targets):
            continue
        if _under_head(name, classifiers):
            raise ValueError(
                f"targets={targets!r} matched '{name}', part of the classification head; the head is not a "
                "target (adapter methods train it in full); choose targets that leave it out"
            )
        if not isinstance(module, nn.Linear):
            raise ValueError(
                f"targets={targets!r} matched module '{name}' of type {type(module).__name__}; "
                "only nn.Linear modules can be adapted"
            )
        found.append((name, module))
    if not found:
        examples = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:6]
        raise ValueError(
            f"targets={targets!r} matched no module; Linear modules look like {examples} "
            "(use 'all-linear', a list of name suffixes, or a full-match regex)"
        )
    return found


def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """Return (parent module, attribute name) for the dotted module ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    return parent, child


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Replace the submodule ``name`` with ``new``; return the old module."""
    parent, child = get_submodule_parent(model, name)
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old
