"""``merge_adapters``: combine named adapters into a new adapter or into the base weights.

Every source adapter enters as its exact update relative to the original W₀ on each layer
(``AdapterLayer.delta_from_original``: the rsLoRA scale, DoRA's magnitude rescaling, VeRA's vectors,
an init's base offset, all included), so the result is the stated formula of the ΔWᵢ; where PEFT's
``add_weighted_adapter`` combines raw A / B factors (and so drops rsLoRA scaling, DoRA magnitudes,
and mixes cross terms in ``linear``), rankwise combines the updates themselves:

* ``cat``: ΔW = Σ wᵢΔWᵢ exactly, as LoRA factors stacked side by side (rank Σ rᵢ; low-rank sources only).
* ``linear``: ΔW = Σ wᵢΔWᵢ, factored by SVD at ``rank`` (default Σ rᵢ: exact for low-rank sources).
* ``svd``: the same sum truncated to ``rank`` (default max rᵢ, PEFT's ``svd`` default): the best
  rank-r approximation (Eckart–Young).
* ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: ``merging.combine_deltas`` on the
  ΔWᵢ (TIES-Merging, Yadav et al. 2023; DARE, Yu et al. 2024), then SVD at ``rank`` (default max rᵢ),
  or exact with ``into_base=True``.

The result is a new LoRA adapter ``name`` (per-layer rank, scale 1) made the only active one, or,
with ``into_base=True``, the exact dense ΔW added to the base weights (the sources are deleted).
A layer some source adapter is not on counts that adapter's ΔW there as 0.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..checks import choice, is_number
from .base import AdapterLayer
from .merging import MERGE_METHODS, combine_deltas, concat_factors, truncate_delta
from .named import add_to_base, target_modules
from .ops import delete_adapter, set_active
from .registry import adapt, adapter_layers, adapter_names

HOWS = ("cat", "svd", *MERGE_METHODS)


def _check_weights(model: nn.Module, weights: Any) -> dict[str, float]:
    known = adapter_names(model)
    if not isinstance(weights, dict) or not weights:
        raise ValueError(f"weights={weights!r} must be a dict {{adapter name: weight}}; the model's adapters: {known}")
    unknown = [n for n in weights if n not in known]
    if unknown:
        raise ValueError(f"weights names unknown adapter(s) {unknown}; the model's adapters are {known}")
    bad = [n for n, w in weights.items() if not is_number(w)]
    if bad:
        raise ValueError(f"weights[{bad[0]!r}]={weights[bad[0]]!r} must be a finite number")
    return {n: float(w) for n, w in weights.items()}


def _per_layer(model: nn.Module, names: list[str]) -> dict[str, dict[str, AdapterLayer]]:
    """``{target layer: {adapter: layer}}`` over the layers any of ``names`` is on, in model order."""
    out: dict[str, dict[str, AdapterLayer]] = {}
    for target, layer in adapter_layers(model):
        if layer.adapter_name in names:
            out.setdefault(target, {})[layer.adapter_name] = layer
    return out


@torch.no_grad()
def _layer_factors(
    layers: dict[str, AdapterLayer], weights: dict[str, float], how: str, rank: int | None, options: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
    """The merged update of one layer: ``(B, A)`` with ΔW = B·A, or the dense ΔW (``rank=-1``)."""
    names = [n for n in weights if n in layers]
    if how == "cat":
        factors = []
        for n in names:
            f = layers[n].factors_from_original()
            if f is None:
                raise ValueError(f"how='cat' needs low-rank adapters; adapter '{n}' ({layers[n].method}) has a "
                                 "full-rank update: use how='linear' or 'svd'")
            factors.append((f[0].float(), f[1].float(), f[2]))
        return concat_factors(factors, [weights[n] for n in names])
    deltas = [layers[n].delta_from_original().float() for n in names]
    merged_how = "linear" if how == "svd" else how
    dense = combine_deltas(deltas, [weights[n] for n in names], merged_how, **options)
    if rank == -1:
        return dense
    ranks = [_rank(layers[n]) for n in names]
    r = rank if rank is not None else (sum(ranks) if how == "linear" else max(ranks))
    return truncate_delta(dense, min(r, *dense.shape))


def _rank(layer: AdapterLayer) -> int:
    """The rank of a layer's update relative to W₀ (min(out, in) for a full-rank one)."""
    f = layer.factors_from_original()
    return int(f[1].shape[0]) if f is not None else min(layer.out_features, layer.in_features)


def merge_adapters(
    model: nn.Module,
    weights: dict[str, float],
    how: str = "linear",
    *,
    name: str = "merged",
    rank: int | None = None,
    into_base: bool = False,
    density: float = 1.0,
    majority_sign: str = "total",
    seed: int = 0,
) -> nn.Module:
    """Combine the adapters ``weights`` names, ``{name: wᵢ}``, with ``how`` (one of ``HOWS``; see the
    module docstring) into a new LoRA adapter ``name`` (the only active one afterwards), or into the
    base weights with ``into_base=True`` (exact dense ΔW; the source adapters are then deleted).

    ``rank``: the new adapter's rank per layer (capped at the layer's min(out, in)); not used by
    ``cat`` or ``into_base``. ``density``, ``majority_sign``: of ties / dare / magnitude_prune
    (``merging.combine_deltas``); ``seed`` seeds DARE's random drops (one generator, layers in model order).
    """
    weights = _check_weights(model, weights)
    choice("how", how, HOWS)
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank={rank!r} must be a positive integer or None")
    if into_base and how == "cat":
        raise ValueError("how='cat' builds a new adapter; with into_base=True use how='linear' (the same exact sum)")
    if any(module.merged for _, module in target_modules(model)):
        raise ValueError("the model's adapters are merged; call rw.unmerge(model) before rw.merge_adapters")
    options = {"density": density, "majority_sign": majority_sign,
               "generator": torch.Generator().manual_seed(int(seed))}
    per_layer = _per_layer(model, list(weights))
    merged = {
        target: _layer_factors(layers, weights, how, -1 if into_base else rank, options)
        for target, layers in per_layer.items()
    }
    if into_base:
        for source in weights:
            delete_adapter(model, source)
        for target, delta in merged.items():
            add_to_base(model.get_submodule(target), delta)
        return model
    first = next(iter(per_layer.values()))
    lora_from_factors(model, merged, name, adapter_dtype=next(iter(first.values())).adapter_dtype)  # type: ignore[arg-type]
    set_active(model, name)
    return model


def lora_from_factors(
    model: nn.Module,
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
    name: str,
    *,
    adapter_dtype: Any = "float32",
) -> nn.Module:
    """Add a LoRA adapter ``name`` holding the given factors, ``{target layer: (B, A)}`` with B
    (out×r) and A (r×in), so that each layer's ΔW = B·A exactly: the rank is set per layer and the
    scale is 1 (α = r, per-layer ``overrides``), so it saves, exports to PEFT and trains as any LoRA
    adapter. The new adapter is active and trainable (``rw.adapt``'s rules for the others); returns
    ``model``. Used by ``merge_adapters`` and ``rw.compression.eora``."""
    if not factors:
        raise ValueError("factors is empty: give {target layer name: (B, A)} for at least one layer")
    for target, (b, a) in factors.items():
        if b.dim() != 2 or a.dim() != 2 or b.shape[1] != a.shape[0]:
            raise ValueError(f"factors[{target!r}]: B {tuple(b.shape)} and A {tuple(a.shape)} must be (out×r), (r×in)")
    overrides = {t: {"r": int(f[1].shape[0]), "alpha": int(f[1].shape[0])} for t, f in factors.items()}
    adapt(model, "lora", targets=list(factors), name=name, trainable=None, overrides=overrides,
          adapter_dtype=adapter_dtype, _skip_init=True)
    new = dict(adapter_layers(model, name))
    with torch.no_grad():
        for target, (b, a) in factors.items():
            new[target].lora_B.copy_(b)
            new[target].lora_A.copy_(a)
    return model
