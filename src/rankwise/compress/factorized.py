"""Factorized linear layers for compression.

The layer itself is :class:`rankwise.sparse.layers.FactorizedLinear` (``y = U(Vx) + b``, two dense
factors ``U`` out×r and ``V`` r×in, ``from_linear``/``to_linear``); this module only adds what
compression needs on top of it: building one from given factors without its random spectral init,
listing the factorized layers of a model, and turning a factorized model back into a dense one.
"""

from __future__ import annotations

import torch
from torch import nn

from ..sparse import FactorizedLinear
from ..targets import replace_module

__all__ = ["FactorizedLinear", "densify", "empty_factorized", "factorized_from_factors", "factorized_layers"]


def empty_factorized(
    in_features: int,
    out_features: int,
    rank: int,
    bias: bool,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> FactorizedLinear:
    """A :class:`FactorizedLinear` with uninitialized storage: built on the meta device (so its
    spectral ``reset_parameters`` costs nothing) and materialized with ``to_empty``. The caller
    must fill ``U``, ``V`` (and ``bias``) — from factors or a checkpoint."""
    with torch.device("meta"):
        layer = FactorizedLinear(in_features, out_features, rank, bias=bias, dtype=dtype)
    return layer.to_empty(device=device if device is not None else "cpu")


@torch.no_grad()
def factorized_from_factors(
    up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None = None, dtype: torch.dtype | None = None
) -> FactorizedLinear:
    """``FactorizedLinear`` with ``U = up`` (out×r), ``V = down`` (r×in) and a copy of ``bias``."""
    if up.dim() != 2 or down.dim() != 2 or up.shape[1] != down.shape[0]:
        raise ValueError(f"up {tuple(up.shape)} and down {tuple(down.shape)} must be (out×r) and (r×in)")
    dtype = dtype or up.dtype
    layer = empty_factorized(down.shape[1], up.shape[0], up.shape[1], bias is not None, up.device, dtype)
    layer.U.copy_(up)
    layer.V.copy_(down)
    if bias is not None:
        layer.bias.copy_(bias)
    return layer


def factorized_layers(model: nn.Module) -> list[tuple[str, FactorizedLinear]]:
    """``(name, layer)`` for every :class:`FactorizedLinear` in ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FactorizedLinear)]


def densify(model: nn.Module) -> nn.Module:
    """Replace every :class:`FactorizedLinear` with the dense ``nn.Linear`` holding ``U V`` (in place)."""
    for name, layer in factorized_layers(model):
        replace_module(model, name, layer.to_linear())
    return model
