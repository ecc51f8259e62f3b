"""Physically smaller models: slice kept rows/columns out of ``nn.Linear`` layers, and rebuild a
saved layout of resized layers on a freshly built model (used by LoRAPrune's unit removal and by
``load_compressed``)."""

from __future__ import annotations

import torch
from torch import nn

from ..targets import replace_module


@torch.no_grad()
def sliced_linear(lin: nn.Linear, keep: torch.Tensor, input_side: bool) -> nn.Linear:
    """A new ``nn.Linear`` (same dtype, device, ``requires_grad``) with only the kept input columns
    (``input_side``; bias unchanged) or the kept output rows and bias entries."""
    if not isinstance(lin, nn.Linear):
        raise ValueError(f"expected an nn.Linear (merge LoRA first), got {type(lin).__name__}")
    idx = torch.nonzero(keep).flatten().to(lin.weight.device)
    weight = lin.weight.index_select(1 if input_side else 0, idx)
    bias = lin.bias if (lin.bias is None or input_side) else lin.bias.index_select(0, idx)
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    out.weight.copy_(weight)
    out.weight.requires_grad_(lin.weight.requires_grad)
    if bias is not None:
        out.bias.copy_(bias)
        out.bias.requires_grad_(lin.bias.requires_grad)
    return out


def set_weight(lin: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Give ``lin`` a new (float64-computed) weight and bias of any shape, keeping dtype and flags."""
    old = lin.weight
    lin.weight = nn.Parameter(weight.to(old.dtype), requires_grad=old.requires_grad)
    lin.out_features, lin.in_features = weight.shape
    if bias is not None and lin.bias is not None:
        lin.bias = nn.Parameter(bias.to(lin.bias.dtype), requires_grad=lin.bias.requires_grad)


def apply_layout(model: nn.Module, layout: dict[str, dict]) -> None:
    """Give a freshly built model the shapes recorded by :func:`remove_pruned_units`: new (untrained)
    ``nn.Linear`` layers of the recorded sizes and the recorded attention / MLP attributes, ready
    for a strict ``load_state_dict``."""
    for name, spec in layout.get("linears", {}).items():
        old = model.get_submodule(name)
        replace_module(model, name, nn.Linear(spec["in_features"], spec["out_features"], bias=spec["bias"],
                                              device=old.weight.device, dtype=old.weight.dtype))
    for name, attrs in layout.get("attributes", {}).items():
        module = model.get_submodule(name)
        for key, value in attrs.items():
            setattr(module, key, value)
