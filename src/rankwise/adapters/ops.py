"""Whole-model adapter operations: summary, merge/unmerge, unload, enable/disable."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..quant import dense_linear
from ..targets import replace_module
from .base import AdapterLayer
from .named import AdapterStack, layers_of, remove_batch_hook, target_modules
from .registry import adapter_layers, adapter_names, adapter_state, adapter_states


@dataclass
class LayerRow:
    name: str
    method: str
    shape: tuple[int, int]
    trainable: int
    adapter: str = "default"


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
        named = len({row.adapter for row in self.layers}) > 1
        title = "layer [adapter]" if named else "layer"
        lines = [f"{title:<48} {'method':<10} {'shape':>12} {'trainable':>11}"]
        for row in self.layers:
            shape = f"{row.shape[0]}x{row.shape[1]}"
            name = f"{row.name} [{row.adapter}]" if named else row.name
            lines.append(f"{name:<48} {row.method:<10} {shape:>12} {row.trainable:>11,}")
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
        for p in adapter_parameters(layer):
            if p.requires_grad:
                n += p.numel()
                in_adapters.add(id(p))
        layers.append(LayerRow(name, layer.method, (layer.out_features, layer.in_features), n, layer.adapter_name))
        per_method[layer.method] = per_method.get(layer.method, 0) + n
    params = list(_unique_params(model))
    trainable = sum(p.numel() for p in params if p.requires_grad)
    other = sum(p.numel() for p in params if p.requires_grad and id(p) not in in_adapters)
    return Summary(trainable, sum(p.numel() for p in params), per_method, layers, other)


def adapter_parameters(layer: AdapterLayer) -> list[nn.Parameter]:
    """The adapter's own parameters (not the base layer's)."""
    return [p for n, p in layer.named_parameters() if not n.startswith("base_layer.")]


def merge(model: nn.Module) -> nn.Module:
    """Fold the active adapters' ΔW into the base weights (forward unchanged, no adapter compute)."""
    for _, module in target_modules(model):
        module.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo ``merge``: the base weights go back to the frozen ones."""
    for _, module in target_modules(model):
        module.unmerge()
    return model


def _replace_all(model: nn.Module, build: Callable[[str, AdapterLayer | AdapterStack], nn.Module]) -> nn.Module:
    for name, module in target_modules(model):
        replace_module(model, name, build(name, module))
    model.rankwise_adapters = {}  # type: ignore[assignment]  # Module attribute
    remove_batch_hook(model)
    return model


def unload(model: nn.Module) -> nn.Module:
    """Remove all adapters and return the base model with its original weights W₀."""
    return _replace_all(model, lambda _, m: m.unload())


def merge_and_unload(model: nn.Module, *, dequantize: bool = False) -> nn.Module:
    """Fold the active adapters into the weights and return a plain model (no adapter modules; the
    inactive adapters of a layer holding several are dropped).

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
    quantized = {name for name, module in target_modules(model) if _writer(module).base_quantized}

    def build(name: str, module: AdapterLayer | AdapterStack) -> nn.Module:
        if name in quantized and dequantize:
            module.unmerge()
            w = module.base_weight
            errors[name] = 0.0
            return dense_linear(module.base_layer, w + module.update_weight().to(w.dtype))
        merged = module.merged_linear()
        if name in quantized:
            writer = _writer(module)
            errors[name] = float(writer.requant_error or 0.0)
            lost.append(float(writer.merge_delta_error or 0.0))
        return merged

    _replace_all(model, build)
    if lost and max(lost) > 0.5:
        warnings.warn(
            f"merging into the 4-bit base changed the merged weights by up to {max(lost):.2f}×‖ΔW‖ (the update is "
            "below the 4-bit grid's resolution); merge_and_unload(model, dequantize=True) keeps it exactly",
            stacklevel=2,
        )
    if errors:
        model.rankwise_merge_errors = errors  # type: ignore[assignment]  # Module attribute
    return model


def _writer(module: AdapterLayer | AdapterStack) -> AdapterLayer:
    """The adapter layer that writes (and reports on) the base weight of a target."""
    return module.first() if isinstance(module, AdapterStack) else module


def set_adapters_enabled(model: nn.Module, enabled: bool) -> nn.Module:
    """Switch every adapter off, or the active ones (``rw.set_active``) on again."""
    states = adapter_states(model)
    for _, layer in adapter_layers(model):
        state = states.get(layer.adapter_name)
        layer.enabled = enabled and (state is None or state.active)
    return model


def enable_adapters(model: nn.Module) -> nn.Module:
    """Switch the active adapters on again (all of them, unless ``rw.set_active`` chose some)."""
    return set_adapters_enabled(model, True)


def disable_adapters(model: nn.Module) -> nn.Module:
    """Switch every adapter layer off (each gives its original W₀'s output). Unlike
    ``adapters_disabled`` this leaves fully trained modules (``trainable_modules``, e.g. a
    classification head) with their trained weights, and it does not unmerge merged layers."""
    return set_adapters_enabled(model, False)


def _names_arg(model: nn.Module, names: str | list[str] | tuple[str, ...], what: str) -> list[str]:
    wanted = [names] if isinstance(names, str) else list(names) if isinstance(names, list | tuple) else None
    known = adapter_names(model)
    if wanted is None or not all(isinstance(n, str) for n in wanted):
        raise ValueError(f"{what}={names!r} must be an adapter name or a list of them; adapters: {known}")
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise ValueError(f"{what}={names!r}: unknown adapter(s) {unknown}; the model's adapters are {known}")
    return wanted


def set_active(
    model: nn.Module, names: str | list[str] | tuple[str, ...], *, trainable: bool = True
) -> nn.Module:
    """Run only the adapters ``names`` (the others give the base output, offsets included); with
    ``trainable=True`` their parameters are trained and every other adapter's are frozen (PEFT's
    ``set_adapter``). Modules trained in full (a classification head) are left as they are."""
    wanted = _names_arg(model, names, "names")
    if any(module.merged for _, module in target_modules(model)):
        raise ValueError("the model's adapters are merged; call rw.unmerge(model) before rw.set_active")
    for name, state in adapter_states(model).items():
        state.active = name in wanted
    for _, layer in adapter_layers(model):
        layer.enabled = layer.adapter_name in wanted
        if trainable:
            for p in adapter_parameters(layer):
                p.requires_grad_(layer.adapter_name in wanted)
    return model


def active_adapters(model: nn.Module) -> list[str]:
    """The names of the adapters that run (all, unless ``rw.set_active`` chose some)."""
    return [name for name, state in adapter_states(model).items() if state.active]


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Remove adapter ``name`` from every layer it is on; a layer left with one adapter holds it
    directly again, and a layer left with none is its original base layer. Deleting the last adapter
    is ``rw.unload``."""
    adapter_state(model, name)  # a clear error for an unknown name
    if any(module.merged for _, module in target_modules(model)):
        raise ValueError(f"the model's adapters are merged; call rw.unmerge(model) before deleting {name!r}")
    if adapter_names(model) == [name]:
        return unload(model)
    for target, module in target_modules(model):
        layers = layers_of(module)
        if name not in layers:
            continue
        if isinstance(module, AdapterStack):
            module.remove(name)
            if len(module.adapters) == 1:
                replace_module(model, target, module.release())
        else:  # the adapter's only layer here: give back the plain base
            replace_module(model, target, module.unload())
    model.rankwise_adapters = {k: v for k, v in adapter_states(model).items() if k != name}  # type: ignore[assignment]
    return model


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
    full next to the adapters (each adapter state's ``trainable_modules``, e.g. a classification
    head) get the values ``adapt`` found them with (copied in place). On exit the trained values of
    those modules are copied back, the adapters switched on and the merged layers merged again."""
    originals: dict[str, dict[str, torch.Tensor]] = {}
    for state in reversed(adapter_states(model).values()):  # the first adapter saw the original heads
        originals.update(state.trainable_originals)
    merged = [module for _, module in target_modules(model) if module.merged]
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
