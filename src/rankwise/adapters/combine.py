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
* ``seq_merge``: the wᵢΔWᵢ merged one at a time in ``weights``' order by orthogonal projection with
  adaptive scaling (OPCM, Tang et al. 2025; ``seq_merge.SequentialMerge``), then SVD at ``rank``
  (default Σ rᵢ: exact for low-rank sources).
* ``lora_lego``: the rank-1 units of every low-rank source clustered into ``rank`` = k clusters
  (default max rᵢ), the centroids a rank-k LoRA with dual reweighting (LoRA-LEGO, Zhao et al. 2024;
  ``lego.lego_factors``).

The result is a new LoRA adapter ``name`` (per-layer rank, scale 1) made the only active one, or,
with ``into_base=True``, the exact dense ΔW added to the base weights (the sources are deleted).
A layer some source adapter is not on counts that adapter's ΔW there as 0.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import catalogue
from ..checks import choice, fraction, is_number
from .base import AdapterLayer
from .lego import lego_factors
from .merging import MERGE_METHODS, combine_deltas, concat_factors, truncate_delta
from .named import add_to_base, target_modules
from .ops import delete_adapter, set_active
from .registry import adapt, adapter_layers, adapter_names
from .seq_merge import SequentialMerge

SEQUENTIAL = ("seq_merge",)  # merged across all layers together, one source at a time
HOWS = ("cat", "svd", *MERGE_METHODS, *SEQUENTIAL, "lora_lego")


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
    if how in ("cat", "lora_lego"):
        factors = [_low_rank(layers[n], n, how) for n in names]
        if how == "cat":
            return concat_factors(factors, [weights[n] for n in names])
        k = rank if rank not in (None, -1) else max(f[1].shape[0] for f in factors)
        b, a = lego_factors(factors, [weights[n] for n in names], k, options["generator"])
        return b @ a if rank == -1 else (b, a)
    deltas = [layers[n].delta_from_original().float() for n in names]
    merged_how = "linear" if how == "svd" else how
    dense = combine_deltas(deltas, [weights[n] for n in names], merged_how, **options)
    return _factor(dense, [_rank(layers[n]) for n in names], how, rank)


def _factor(dense: torch.Tensor, ranks: list[int], how: str, rank: int | None
            ) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
    """A merged dense ΔW as rank-r factors (default Σ rᵢ for the exact sums, else max rᵢ), or itself
    (``rank=-1``)."""
    if rank == -1:
        return dense
    r = rank if rank is not None else (sum(ranks) if how in ("linear", *SEQUENTIAL) else max(ranks))
    return truncate_delta(dense, min(r, *dense.shape))


def _low_rank(layer: AdapterLayer, name: str, how: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(B, A, s)`` of a source's update relative to W₀; ValueError for a full-rank one."""
    f = layer.factors_from_original()
    if f is None:
        raise ValueError(f"how={how!r} needs low-rank adapters; adapter '{name}' ({layer.method}) has a "
                         "full-rank update: use how='linear' or 'svd'")
    return f[0].float(), f[1].float(), f[2]


@torch.no_grad()
def _sequential(
    per_layer: dict[str, dict[str, AdapterLayer]], weights: dict[str, float], rank: int | None, alpha: float
) -> dict[str, tuple[torch.Tensor, torch.Tensor] | torch.Tensor]:
    """``seq_merge``: each source's {layer: wᵢΔWᵢ} fed to one ``SequentialMerge`` in ``weights``' order."""
    merger = SequentialMerge(alpha)
    for source, w in weights.items():
        merger.add({target: w * layers[source].delta_from_original().float()
                    for target, layers in per_layer.items() if source in layers})
    return {target: _factor(merger.delta[target], [_rank(layers[n]) for n in layers if n in weights],
                            "seq_merge", rank)
            for target, layers in per_layer.items()}


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
    alpha: float = 0.5,
) -> nn.Module:
    """Combine the adapters ``weights`` names, ``{name: wᵢ}``, with ``how`` (one of ``HOWS``; see the
    module docstring) into a new LoRA adapter ``name`` (the only active one afterwards), or into the
    base weights with ``into_base=True`` (exact dense ΔW; the source adapters are then deleted).

    ``rank``: the new adapter's rank per layer (capped at the layer's min(out, in)); not used by
    ``cat`` or ``into_base``. ``density``, ``majority_sign``: of ties / dare / magnitude_prune
    (``merging.combine_deltas``); ``seed`` seeds DARE's random drops and LoRA-LEGO's k-means (one
    generator, layers in model order); ``alpha``: seq_merge's share of the merged update's singular
    values whose leading block the new update must avoid (the paper's α, default 0.5). For
    ``seq_merge`` the order of ``weights`` is the merge order; for ``lora_lego`` ``rank`` is k.
    """
    weights = _check_weights(model, weights)
    choice("how", how, HOWS)
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank={rank!r} must be a positive integer or None")
    alpha = fraction("alpha", alpha, allow_zero=True)
    if into_base and how == "cat":
        raise ValueError("how='cat' builds a new adapter; with into_base=True use how='linear' (the same exact sum)")
    if any(module.merged for _, module in target_modules(model)):
        raise ValueError("the model's adapters are merged; call rw.unmerge(model) before rw.merge_adapters")
    options = {"density": density, "majority_sign": majority_sign,
               "generator": torch.Generator().manual_seed(int(seed))}
    per_layer = _per_layer(model, list(weights))
    if how in SEQUENTIAL:
        merged = _sequential(per_layer, weights, -1 if into_base else rank, alpha)
    else:
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


_MERGE_METHODS = {
    "seq_merge": (
        "Merging Models on the Fly Without Retraining: A Sequential Approach to Scalable Continual Model Merging",
        "training-free, one adapter at a time: each new ΔW projected orthogonally to the merged update in its "
        "singular basis (diagonal and leading block removed), added, and the sum rescaled to the mean task-vector "
        "norm; the state is the running merged update only",
    ),
    "lora_lego": (
        "Merging LoRAs like Playing LEGO: Pushing the Modularity of LoRA to Extremes Through Rank-Wise Clustering",
        "every rank-1 unit (B column, A row) of every input LoRA clustered by seeded k-means into k clusters; the "
        "centroids, each rescaled to its members' mean norm, form a rank-k LoRA scaled by √(r̄/k)",
    ),
}
for _name, (_paper, _mechanism) in _MERGE_METHODS.items():
    catalogue.register(catalogue.MethodRecord(
        _name, "multi-adapter", _paper, _mechanism, api="merge", config=merge_adapters, exports="peft-lora",
        spec=merge_adapters, builder=lambda model, _how=_name, **options: merge_adapters(model, how=_how, **options),
    ))
