"""Whole-model adapter operations: summary, merge/unmerge, unload, enable/disable."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..quant import dense_linear
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


def merge_and_unload(model: nn.Module, *, dequantize: bool = False) -> nn.Module:
    """Fold the adapters into the weights and return a plain model (no adapter modules).

    On a 4-bit base (``rw.quantize``, methods ``qlora`` / ``loftq``) the default keeps the layer
    4-bit: W + ΔW is requantized (PEFT does the same) and each layer's relative Frobenius error
    ‖deq(Q(W + ΔW)) − (W + ΔW)‖_F / ‖W + ΔW‖_F is recorded in ``model.rankwise_merge_errors``
    ``{layer name: error}``. That error is small next to ‖W‖ but not next to ‖ΔW‖: an update smaller
    than the 4-bit grid's resolution is largely lost (``AdapterLayer.merge_delta_error``, the error
    over ‖ΔW‖, is ≈ 1 for a typical fine-tune, ``docs/quantized.md``), and then a warning says so.
    ``dequantize=True`` gives those layers as plain ``nn.Linear`` holding W + ΔW exactly, in the
    layer's compute dtype (16/32-bit; no requantization, error 0); ``rankwise merge`` writes that."""
    errors: dict[str, float] = {}
    lost: list[float] = []
    for name, layer in adapter_layers(model):
        if layer.base_quantized and dequantize:
            layer.unmerge()
            w = layer.base_weight
            replace_module(model, name, dense_linear(layer.base_layer, w + layer.delta_weight().to(w.dtype)))
            errors[name] = 0.0
            continue
        replace_module(model, name, layer.merged_linear())
        if layer.base_quantized:
            errors[name] = float(layer.requant_error or 0.0)
            lost.append(float(layer.merge_delta_error or 0.0))
    if lost and max(lost) > 0.5:
        warnings.warn(
            f"merging into the 4-bit base changed the merged weights by up to {max(lost):.2f}×‖ΔW‖ (the update is "
            "below the 4-bit grid's resolution); merge_and_unload(model, dequantize=True) keeps it exactly",
            stacklevel=2,
        )
    model.rankwise_adapter = None  # type: ignore[assignment]  # Module attribute
    if errors:
        model.rankwise_merge_errors = errors  # type: ignore[assignment]  # Module attribute
    return model


def set_adapters_enabled(model: nn.Module, enabled: bool) -> nn.Module:
    for _, layer in adapter_layers(model):
        layer.enabled = enabled
    return model


def enable_adapters(model: nn.Module) -> nn.Module:
    return set_adapters_enabled(model, True)


def disable_adapters(model: nn.Module) -> nn.Module:
    """Switch every adapter layer off (each gives its original W₀'s output). Unlike
    ``adapters_disabled`` this leaves fully trained modules (``trainable_modules``, e.g. a
    classification head) with their trained weights, and it does not unmerge merged layers."""
    return set_adapters_enabled(model, False)


def _swap_trainable_modules(model: nn.Module, states: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict]:
    """Copy ``states`` into the named modules in place (parameters keep their identity, so an
    optimizer holding them is unaffected); return copies of the values they held before."""
    held: dict[str, dict] = {}
    with torch.no_grad():
        for name, saved in states.items():
            current = model.get_submodule(name).state_dict()
            held[name] = {k: t.detach().clone() for k, t in current.items()}
            for key, t in saved.items():
                current[key].copy_(t)
    return held


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """``with rw.adapters_disabled(model):`` runs the original base model, exactly as it was before
    ``adapt``: merged adapter layers are unmerged, every adapter layer is switched off (its output
    is the original W₀'s, init offsets of PiSSA-style inits given back), and the modules trained in
    full next to the adapters (``model.rankwise_adapter.trainable_modules``, e.g. a classification
    head) get the values ``adapt`` found them with (copied in place). On exit the trained values of
    those modules are copied back, the adapters switched on and the merged layers merged again."""
    state = getattr(model, "rankwise_adapter", None)
    originals = getattr(state, "trainable_originals", None) or {}
    merged = [layer for _, layer in adapter_layers(model) if layer.merged]
    for layer in merged:
        layer.unmerge()
    disable_adapters(model)
    trained = _swap_trainable_modules(model, originals)
    try:
        yield model
    finally:
        _swap_trainable_modules(model, trained)
        enable_adapters(model)
        for layer in merged:
            layer.merge()
