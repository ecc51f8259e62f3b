"""Named adapters: several adapters on one base layer, an active set, and per-example adapters.

A target layer with one adapter is that adapter's ``AdapterLayer`` (the common case, unchanged). A
second adapter on the same layer turns it into an ``AdapterStack``: one frozen base layer and a
``ModuleDict`` of adapter layers that all read that same base (each holds it as a plain attribute,
so the base weight is stored once in ``state_dict``).

In a stack the base keeps the untouched W₀: inits that move part O of W₀ out of the base when alone
(PiSSA, OLoRA, LoLDU, ...) give it back, and their adapter adds ΔW − O instead. So every adapter's
ΔW is relative to the same W₀, base-dependent deltas (DoRA's norm, Bone's W₀·b) see the W₀ they see
alone, and

    y = W₀ x + b + Σ_{a active} (ΔW_a − O_a) x        (``AdapterLayer.output_term``)

(DoRA's term is its additive form (g − 1)·W₀x + g·s·BAx). Each adapter alone therefore gives
exactly the model that holds only that adapter, and no adapter active gives the original model.

Per-example adapters (``model(..., adapter_names=[...])`` or ``with batch_adapters(model, names)``):
example i uses adapter ``names[i]`` alone (``None`` or ``"__base__"``: no adapter), which equals
running the batch with only that adapter active; PEFT's ``adapter_names`` semantics, DoRA included.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from ..quant import dequantize, requantize_, restore_
from ..targets import is_linear4bit, to_weight_layout
from .base import AdapterLayer
from .batched import BASE_NAME, mixed_forward


class AdapterStack(nn.Module):
    """One frozen ``base_layer`` shared by several named adapter layers (``adapters``)."""

    wraps_base_layer: ClassVar[bool] = True  # targets.base_modules sees it as its base layer

    def __init__(self, base_layer: nn.Module, layers: dict[str, AdapterLayer]) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.batch_names: list[str | None] | None = None
        self.merged_names: list[str] = []
        self.register_buffer("merged_delta", None, persistent=False)
        for name, layer in layers.items():
            self.add(name, layer)

    # ----------------------------------------------------------------- membership
    def add(self, name: str, layer: AdapterLayer) -> None:
        """Put ``layer`` (built over this stack's base layer) into the stack under ``name``; what its
        init moved out of the base goes back in (the stack's base is W₀)."""
        if not layer.stackable:
            raise ValueError(f"adapter '{name}' ({layer.method}) rewrites its base weight and cannot share a "
                             "layer with other adapters")
        if layer.merged:
            raise ValueError(f"adapter '{name}' is merged; unmerge it before adding another adapter to its layers")
        if self.merged_names:
            raise ValueError(f"adapters {self.merged_names} of this layer are merged; unmerge before adding '{name}'")
        if layer.base_layer is not self.base_layer:
            raise ValueError(f"adapter '{name}' was built over another base layer")
        base = layer._modules.pop("base_layer", None)
        if base is not None:  # held as a plain attribute: the stack owns the base
            object.__setattr__(layer, "base_layer", base)
        if not layer.shares_base:
            restore_offset(layer)
            layer.shares_base = True
        layer.adapter_name = name
        self.adapters[name] = layer

    def remove(self, name: str) -> AdapterLayer:
        """Take adapter ``name`` out of the stack."""
        if self.merged_names:
            raise ValueError(f"adapters {self.merged_names} of this layer are merged; unmerge before deleting '{name}'")
        layer = self.adapters[name]
        del self.adapters[name]
        return layer  # type: ignore[return-value]

    def release(self) -> AdapterLayer:
        """The stack's last adapter as a plain layer again (its base a submodule, its offset moved out)."""
        (layer,) = self.adapters.values()
        layer.base_layer = self.base_layer
        layer.shares_base = False
        layer.after_load()
        return layer  # type: ignore[return-value]

    # ----------------------------------------------------------------- the base, as AdapterLayer exposes it
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight  # type: ignore[return-value]

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias  # type: ignore[return-value]

    def first(self) -> AdapterLayer:
        return next(iter(self.adapters.values()))  # type: ignore[return-value]

    @property
    def base_weight(self) -> torch.Tensor:
        return self.first().base_weight

    # ----------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch_names is not None:
            layers: dict[str, AdapterLayer] = dict(self.adapters.items())  # type: ignore[arg-type]
            return mixed_forward(self.base_layer, layers, x, self.batch_names, self.merged)
        out = self.base_layer(x)
        extra = None
        for name, layer in self.adapters.items():
            if name in self.merged_names:
                continue
            term = layer.output_term(x, out.dtype, layer.enabled)
            if term is not None:
                extra = term if extra is None else extra + term
        return out if extra is None else out + extra

    # ----------------------------------------------------------------- merging
    @torch.no_grad()
    def merge(self) -> None:
        """W₀ ← W₀ + Σ_{active} (ΔW_a − O_a), every ΔW against the same W₀ (so the merged layer equals
        the unmerged forward also for base-dependent deltas: DoRA, Bone); the sum is kept
        (non-persistent) so that ``unmerge`` gives W₀ back."""
        if self.merged_names:
            return
        active = [(n, layer) for n, layer in self.adapters.items() if layer.enabled]
        if not active:
            return
        w = self.base_weight
        total = self.update_weight()
        self.first()._set_base_weight(w + total.to(w.dtype), merging=True)
        self.merged_delta = total
        self.merged_names = [n for n, _ in active]

    def update_weight(self) -> torch.Tensor:
        """What ``merge`` adds to the base weight W₀: Σ_{active} (ΔW_a − O_a), in fp32."""
        active = [layer for layer in self.adapters.values() if layer.enabled]
        w = self.base_weight
        return sum((layer.delta_from_original().float() for layer in active), torch.zeros(w.shape, device=w.device))

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged_names:
            return
        writer = self.first()
        if writer._merge_stash is not None:  # a 4-bit base: its codes from before the merge, exactly
            restore_(self.base_layer, writer._merge_stash)
            writer._merge_stash = None
        else:
            w = self.base_weight
            writer._set_base_weight(w - self.merged_delta.to(w.dtype))
        self.merged_delta = None
        self.merged_names = []

    @property
    def merged(self) -> bool:
        return bool(self.merged_names)

    @torch.no_grad()
    def unload(self) -> nn.Module:
        """The base module holding the original W₀."""
        self.unmerge()
        return self.base_layer

    @torch.no_grad()
    def merged_linear(self) -> nn.Module:
        """The base module with the active adapters folded in."""
        self.merge()
        return self.base_layer

    def extra_repr(self) -> str:
        return f"adapters={list(self.adapters)}"


@torch.no_grad()
def restore_offset(layer: AdapterLayer) -> None:
    """Add back into the base weight what ``layer``'s initialization moved out of it (if anything)."""
    offset = layer.base_offset()
    if offset is not None:
        w = layer.base_weight
        layer._set_base_weight(w + offset.to(w.dtype))


@torch.no_grad()
def add_to_base(module: nn.Module, delta: torch.Tensor) -> None:
    """W ← W + ΔW for a target layer: an adapter layer or stack (through its write path), or a plain
    base layer (``nn.Linear``, ``Conv1D``, ``nn.Embedding``, a convolution, or a 4-bit layer, requantized)."""
    if isinstance(module, AdapterStack | AdapterLayer):
        writer = module.first() if isinstance(module, AdapterStack) else module
        w = module.base_weight
        writer._set_base_weight(w + delta.to(w.dtype))
    elif is_linear4bit(module):
        requantize_(module, dequantize(module) + delta)
    else:  # nn.Linear, Conv1D, nn.Embedding, nn.Conv1d / nn.Conv2d: ΔW (out, in) in the weight's layout
        w = module.weight
        w.add_(to_weight_layout(module, delta.to(w.dtype)))


def target_modules(model: nn.Module) -> list[tuple[str, AdapterLayer | AdapterStack]]:
    """Every adapted target layer: ``(name, AdapterLayer)`` for one adapter, ``(name, AdapterStack)`` for several."""
    found: list[tuple[str, AdapterLayer | AdapterStack]] = []
    skip: str | None = None
    for name, module in model.named_modules():
        if skip is not None and name.startswith(skip):
            continue
        if isinstance(module, AdapterStack | AdapterLayer):
            found.append((name, module))
            skip = name + "."
    return found


def layers_of(module: AdapterLayer | AdapterStack) -> dict[str, AdapterLayer]:
    """``{adapter name: layer}`` of one adapted target."""
    if isinstance(module, AdapterStack):
        return dict(module.adapters.items())  # type: ignore[arg-type]
    return {module.adapter_name: module}


@contextlib.contextmanager
def batch_adapters(model: nn.Module, names: Sequence[str | None]) -> Iterator[nn.Module]:
    """``with batch_adapters(model, names):`` every forward in the block runs example i through
    adapter ``names[i]`` (None or "__base__": the base model). Works with ``generate`` too."""
    known = set(getattr(model, "rankwise_adapters", {}) or {})
    if not known:
        raise ValueError("adapter_names: the model has no rankwise adapters (call rw.adapt first)")
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise ValueError(f"adapter_names must be a list of adapter names (or None) per example, got {names!r}")
    unknown = sorted({str(n) for n in names if n is not None and n != BASE_NAME and n not in known})
    if unknown:
        raise ValueError(f"adapter_names has unknown adapter(s) {unknown}; known adapters: {sorted(known)} (or None / "
                         f"'{BASE_NAME}' for the base model)")
    targets = [m for _, m in target_modules(model)]
    for m in targets:
        m.batch_names = list(names)
    try:
        yield model
    finally:
        for m in targets:
            m.batch_names = None


def _pre_hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
    """``model(..., adapter_names=[...])``: take the keyword out and open ``batch_adapters``."""
    names = kwargs.pop("adapter_names", None)
    if names is None:
        return None
    stack = contextlib.ExitStack()
    stack.enter_context(batch_adapters(module, names))
    module._rankwise_batch_exit = stack  # type: ignore[assignment]
    return args, kwargs


def _post_hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
    stack = module.__dict__.pop("_rankwise_batch_exit", None)
    if stack is not None:
        stack.close()


def install_batch_hook(model: nn.Module) -> None:
    """Let ``model(..., adapter_names=[...])`` select an adapter per example (once per model; found
    by function, not by a handle, so a deep copy of the model keeps working hooks)."""
    if _pre_hook not in model._forward_pre_hooks.values():
        model.register_forward_pre_hook(_pre_hook, with_kwargs=True)
        model.register_forward_hook(_post_hook, with_kwargs=True, always_call=True)


def remove_batch_hook(model: nn.Module) -> None:
    for hooks, fn in ((model._forward_pre_hooks, _pre_hook), (model._forward_hooks, _post_hook)):
        for key in [k for k, h in hooks.items() if h is fn]:
            del hooks[key]
