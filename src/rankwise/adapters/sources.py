"""Adapters built from the LoRA adapters already on a model (EigenLoRAx, MeteoRA): finding those source
adapters on each target layer, checking them before the model changes, and the ``rw.<method>(model,
names)`` front end that adapts the layers every source holds and makes the new adapter the active one."""

from __future__ import annotations

from typing import Any

from torch import nn

from .base import AdapterLayer
from .named import AdapterStack, layers_of
from .ops import set_active
from .registry import adapt, adapter_names, adapter_state


def held_at(model: nn.Module, target: str) -> dict[str, AdapterLayer]:
    """``{adapter name: layer}`` of the adapters on layer ``target`` (empty for a plain layer)."""
    module = model.get_submodule(target)
    return layers_of(module) if isinstance(module, AdapterLayer | AdapterStack) else {}


def check_sources_on(model: nn.Module, names: list[str], targets: list[str], what: str, method: str) -> None:
    """ValueError (naming the option ``what``) unless every adapter of ``names`` is on the model and holds
    LoRA factors (``factors_from_original``) on every layer of ``targets``."""
    known = adapter_names(model)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"{what}: unknown adapter(s) {unknown}; the model's adapters are {known}")
    for target in targets:
        held = held_at(model, target)
        for name in names:
            if name not in held:
                raise ValueError(f"{what}: adapter {name!r} is not on layer '{target}'; adapt {method} on the layers "
                                 f"all of {names} adapt (rw.{method} does)")
            if held[name].factors_from_original() is None:
                raise ValueError(f"{what}: adapter {name!r} ({held[name].method}) has no LoRA factors on '{target}'")


def adapt_from_sources(
    model: nn.Module, method: str, names: list[str] | None, what: str, *, name: str, targets: list[str] | None,
    **config: Any,
) -> nn.Module:
    """``rw.adapt(model, method, <what>=names, ...)`` on ``targets`` (default: the layers every source
    adapts; ``names`` None: every adapter on the model), then only the new adapter is active and trains
    (``rw.set_active``); the sources stay on the model, frozen."""
    names = adapter_names(model) if names is None else list(names)
    if not names:
        raise ValueError(f"{method} needs LoRA adapters on the model ({what}); rw.adapt them first")
    for n in names:
        adapter_state(model, n)
    if targets is None:
        targets = sorted(set.intersection(*(set(adapter_state(model, n).layers) for n in names)))
        if not targets:
            raise ValueError(f"the {what} {names} share no adapted layer")
    adapt(model, method, targets=targets, name=name, **{what: names}, **config)
    set_active(model, name)
    return model
