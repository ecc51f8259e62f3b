"""Whole-model adapter operations: summary, merge/unmerge, unload, enable/disable."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from ..targets import replace_module
from .base import AdapterLayer
from .registry import adapter_layers


@dataclass
class LayerRow:
    name: str
    method: str
    shape: tuple[int, int]
    trainable: int


@dataclass
class Summary:
    """Trainable / total parameters, overall, per method and per adapted layer."""

    trainable: int
    total: int
    per_method: dict[str, int]
    layers: list[LayerRow]
    other_trainable: int  # trainable parameters outside adapters (e.g. a classification head)

    @property
    def trainable_fraction(self) -> float:
        return self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        lines = [f"{'layer':<48} {'method':<10} {'shape':>12} {'trainable':>11}"]
        for row in self.layers:
            shape = f"{row.shape[0]}x{row.shape[1]}"
            lines.append(f"{row.name:<48} {row.method:<10} {shape:>12} {row.trainable:>11,}")
        for method, n in self.per_method.items():
            lines.append(f"{'total ' + method:<48} {'':<10} {'':>12} {n:>11,}")
        if self.other_trainable:
            lines.append(f"{'other trainable (heads)':<48} {'':<10} {'':>12} {self.other_trainable:>11,}")
        lines.append(
            f"trainable {self.trainable:,} / total {self.total:,} ({100 * self.trainable_fraction:.3f}%)"
        )
        return "\n".join(lines)


def _unique_params(model: nn.Module):
    seen = set()
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            yield p


def summary(model: nn.Module) -> Summary:
    """Count trainable and total parameters, per method and per adapted layer."""
    layers = []
    per_method: dict[str, int] = {}
    in_adapters = set()
    for name, layer in adapter_layers(model):
        n = 0
        for pname, p in layer.named_parameters():
            if not pname.startswith("base_layer.") and p.requires_grad:
                n += p.numel()
                in_adapters.add(id(p))
        layers.append(LayerRow(name, layer.method, (layer.out_features, layer.in_features), n))
        per_method[layer.method] = per_method.get(layer.method, 0) + n
    params = list(_unique_params(model))
    trainable = sum(p.numel() for p in params if p.requires_grad)
    other = sum(p.numel() for p in params if p.requires_grad and id(p) not in in_adapters)
    return Summary(trainable, sum(p.numel() for p in params), per_method, layers, other)


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter's ΔW into its base weight (forward unchanged, no adapter compute)."""
    for _, layer in adapter_layers(model):
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo ``merge``: subtract each ΔW from its base weight again."""
    for _, layer in adapter_layers(model):
        layer.unmerge()
    return model


def _replace_all(model: nn.Module, build) -> nn.Module:
    for name, layer in adapter_layers(model):
        replace_module(model, name, build(layer))
    model.rankwise_adapter = None  # type: ignore[assignment]  # Module attribute
    return model


def unload(model: nn.Module) -> nn.Module:
    """Remove all adapters and return the base model with its original weights W₀."""
    return _replace_all(model, AdapterLayer.unload)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold the adapters into the weights and return a plain model (no adapter modules)."""
    return _replace_all(model, AdapterLayer.merged_linear)


def set_adapters_enabled(model: nn.Module, enabled: bool) -> nn.Module:
    for _, layer in adapter_layers(model):
        layer.enabled = enabled
    return model


def enable_adapters(model: nn.Module) -> nn.Module:
    return set_adapters_enabled(model, True)


def disable_adapters(model: nn.Module) -> nn.Module:
    return set_adapters_enabled(model, False)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """``with rw.adapters_disabled(model):`` runs the base model (merged adapters are unmerged first)."""
    merged = [layer for _, layer in adapter_layers(model) if layer.merged]
    for layer in merged:
        layer.unmerge()
    disable_adapters(model)
    try:
        yield model
    finally:
        enable_adapters(model)
        for layer in merged:
            layer.merge()
