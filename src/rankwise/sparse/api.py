"""``rw.sparsify(model, method, targets, **config)``: swap target ``nn.Linear`` layers for structured
ones (SLTrain, SST, TRP, Maestro) or set up ReLoRA's LoRA factors; ``rw.sparse.densify`` merges
everything back into plain ``nn.Linear`` layers for export.

Methods and their options (``SPARSE_METHODS``):

* ``sltrain`` — ``rank``, ``density``, ``alpha``, ``seed``, ``kernel``; no controller needed.
* ``sst`` — ``rank`` (active singular vectors), ``seed``, ``uniform_mix``; then :class:`SST`.
* ``trp`` — no options; then :class:`TRP` and finally :func:`~rankwise.sparse.trp.decompose`.
* ``maestro`` — ``rank`` (initial inner rank, default full); then :class:`Maestro`.
* ``relora`` — ``rank``, ``alpha``, ``dropout``, ``seed``, ``train_rest``; then :class:`ReLoRA`
  and :func:`relora_schedule`.
* ``lte`` — ``heads``, ``rank``, ``alpha``, ``seed``; then :class:`LTE` (merges every T steps).
* ``slope`` — ``n``, ``m`` (N:M sparsity), ``rank``, ``alpha``, ``seed`` of the lazy adapter; then
  :class:`SLoPe`, which adds the adapters in the final steps.
* ``cuttlefish`` — no options (the layers stay ``nn.Linear``); then :class:`Cuttlefish`, which
  factorizes them when their stable ranks settle.
* ``refactor_reset`` — ``rank``: W = B A (:class:`FactorizedLinear`); then :class:`RefactorReset`
  (periodic re-balancing of B, A by SVD and reset of their optimizer moments).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import catalogue, checks
from ..adapters import adapter_layers, merge_and_unload
from ..rng import layer_generator
from ..targets import Targets, find_targets, replace_module
from .layers import FactorizedLinear, SparseLowRankLinear
from .lte import LTELinear
from .maestro import MaestroLinear
from .relora import prepare_relora
from .slope import SLoPeLinear, slope_layer
from .sltrain import SLTrainConfig, sltrain_layer
from .sst import SpectralLinear
from .trp import TRPLinear

Apply = Callable[[nn.Module, Targets, dict[str, Any]], list[str]]


@dataclass(frozen=True)
class SparseMethod:
    """A structured-training method as this package registers it in the catalogue: its options
    (with defaults), the controller to use after ``sparsify``, and ``apply(model, targets, options)``
    that restructures the model and returns the changed layer names."""

    name: str
    family: str
    paper: str
    summary: str
    options: dict[str, Any]  # option -> default
    controller: str  # the class/function to use after sparsify ("" when none is needed)
    apply: Apply


@dataclass
class SparseState:
    """What ``sparsify`` did; stored as ``model.rankwise_sparse``."""

    method: str
    config: dict[str, Any]
    layers: list[str] = field(default_factory=list)


def swap_layers(build: Callable[[str, nn.Linear], nn.Module]) -> Apply:
    """``apply`` for the methods that replace each target ``nn.Linear`` by ``build(name, linear)``."""

    def apply(model: nn.Module, targets: Targets, opts: dict[str, Any]) -> list[str]:
        found = find_targets(model, targets, conv1d=False)
        with torch.no_grad():
            for name, lin in found:
                replace_module(model, name, build(name, lin))
        return [n for n, _ in found]

    return apply


def _sltrain(model: nn.Module, targets: Targets, opts: dict[str, Any]) -> list[str]:
    cfg = SLTrainConfig(**opts)
    return swap_layers(lambda name, lin: sltrain_layer(lin, cfg, name))(model, targets, opts)


def _sst(model: nn.Module, targets: Targets, opts: dict[str, Any]) -> list[str]:
    seed = checks.integer("seed", opts["seed"])
    mix = checks.fraction("uniform_mix", opts["uniform_mix"], allow_zero=True)
    return swap_layers(
        lambda name, lin: SpectralLinear.from_linear(lin, opts["rank"], layer_generator(seed, name), mix)
    )(model, targets, opts)


def _maestro(model: nn.Module, targets: Targets, opts: dict[str, Any]) -> list[str]:
    return swap_layers(lambda name, lin: MaestroLinear.from_linear(lin, opts["rank"]))(model, targets, opts)


def _lte(model: nn.Module, targets: Targets, opts: dict[str, Any]) -> list[str]:
    heads = checks.integer("heads", opts["heads"], 1, what="a positive integer")
    alpha = checks.positive("alpha", opts["alpha"])
    seed = checks.integer("seed", opts["seed"])
    return swap_layers(
        lambda name, lin: LTELinear(lin, heads, opts["rank"], alpha, layer_generator(seed, name))
    )(model, targets, opts)


def _targets_only(model: nn.Module, targets: Targets, opts: dict[str, Any]) -> list[str]:
    """``apply`` for a method whose layers stay plain ``nn.Linear`` until its controller acts (Cuttlefish)."""
    return [name for name, _ in find_targets(model, targets, conv1d=False)]


def _relora(model: nn.Module, targets: Targets, opts: dict[str, Any]) -> list[str]:
    prepare_relora(model, opts["rank"], targets, alpha=opts["alpha"], dropout=opts["dropout"], seed=opts["seed"],
                   train_rest=opts["train_rest"])
    return [name for name, _ in adapter_layers(model)]


_METHODS = (
    SparseMethod(
        "sltrain", "sparse+low-rank",
        "Han et al. 2024, SLTrain: a sparse plus low-rank approach for parameter and memory efficient pretraining",
        "W = (α/r)·B·A + S, S on a fixed uniformly random support of ⌊δ·m·n⌋ entries",
        {f: getattr(SLTrainConfig, f) for f in ("rank", "density", "alpha", "seed", "kernel")}, "", _sltrain,
    ),
    SparseMethod(
        "sst", "from-scratch",
        "Zhao et al. 2024, Sparse Spectral Training and Inference on Euclidean and Hyperbolic Neural Networks",
        "W = U·diag(Σ)·Vᵀ; all Σ every step, r Σ-sampled singular vectors per iteration, periodic re-SVD",
        {"rank": 64, "seed": 0, "uniform_mix": 0.5}, "SST", _sst,
    ),
    SparseMethod(
        "trp", "from-scratch", "Xu et al. 2020, Trained Rank Pruning for Efficient Deep Neural Networks",
        "periodic energy-criterion SVD truncation + nuclear-norm sub-gradient U·Vᵀ",
        {}, "TRP", swap_layers(lambda name, lin: TRPLinear.from_linear(lin)),
    ),
    SparseMethod(
        "maestro", "from-scratch",
        "Horváth et al. 2024, Maestro: Uncovering Low-Rank Structures via Trainable Decomposition",
        "W = U·Vᵀ with ordered dropout over (layer, rank) and hierarchical group lasso",
        {"rank": None}, "Maestro", _maestro,
    ),
    SparseMethod(
        "relora", "from-scratch",
        "Lialin et al. 2023, Stack More Layers Differently: High-Rank Training Through Low-Rank Updates",
        "LoRA with merge-and-restart every T steps, optimizer-state pruning, jagged cosine LR",
        {"rank": 128, "alpha": 32.0, "dropout": 0.0, "seed": 0, "train_rest": True}, "ReLoRA", _relora,
    ),
    SparseMethod(
        "cuttlefish", "from-scratch",
        "Wang et al. 2023, Cuttlefish: Low-Rank Model Training without All the Tuning",
        "full-rank until every layer's stable rank settles (EMA slope ≤ tol), then W ≈ UV at the scaled stable rank",
        {}, "Cuttlefish", _targets_only,
    ),
    SparseMethod(
        "lte", "from-scratch",
        "Huh et al. 2024, Training Neural Networks from Scratch with Parallel Low-Rank Adapters (LoRA-the-Explorer)",
        "frozen W, H LoRA heads each on its own batch chunk, W += mean of the heads' updates every T steps",
        {"heads": 4, "rank": 8, "alpha": 16.0, "seed": 0}, "LTE", _lte,
    ),
    SparseMethod(
        "refactor_reset", "from-scratch",
        "Glentis et al. 2025, Scalable Parameter and Memory Efficient Pretraining for LLM: Recent Algorithmic "
        "Advances and Benchmarking",
        "W = B A trained from scratch; every T steps B, A ← U√Σ, √ΣVᵀ of B A (product unchanged, balanced) and the "
        "factors' Adam moments reset",
        {"rank": 128}, "RefactorReset",
        lambda model, targets, opts: swap_layers(
            lambda name, lin: FactorizedLinear.from_linear(lin, opts["rank"]))(model, targets, opts),
    ),
    SparseMethod(
        "slope", "sparse+low-rank",
        "Mozaffari et al. 2024, SLoPe: Double-Pruned Sparse Plus Lazy Low-Rank Adapter Pretraining of LLMs",
        "fixed N:M-sparse W (magnitude), backward with Wᵀ also N:M-pruned, low-rank adapters added only in "
        "the final steps",
        {"n": 2, "m": 4, "rank": 8, "alpha": 16.0, "seed": 0}, "SLoPe",
        lambda model, targets, opts: swap_layers(lambda name, lin: slope_layer(lin, opts, name))(model, targets, opts),
    ),
)
for _spec in _METHODS:
    catalogue.register(catalogue.MethodRecord(
        _spec.name, _spec.family, _spec.paper, _spec.summary, api="sparsify", options=dict(_spec.options),
        builder=lambda model, _name=_spec.name, **options: sparsify(model, _name, **options), exports="model",
        spec=_spec,
    ))

#: name -> SparseMethod: a view of the catalogue.
SPARSE_METHODS: Mapping[str, SparseMethod] = catalogue.View(lambda r: r.api == "sparsify", lambda r: r.spec)


def _options(method: str, config: dict[str, Any]) -> dict[str, Any]:
    checks.choice("method", method, SPARSE_METHODS)
    spec = SPARSE_METHODS[method]
    checks.known_options(config, spec.options, f"sparse method '{method}'")
    return {**spec.options, **config}


def sparsify(model: nn.Module, method: str, targets: Targets = "all-linear", **config: Any) -> nn.Module:
    """Restructure ``targets`` of ``model`` in place for ``method`` and return ``model``.

    ``targets``: ``"all-linear"`` (output heads excluded), a full-match regex or name suffixes; a
    matched module that is not ``nn.Linear`` is a ValueError. Options per method: ``SPARSE_METHODS``.
    """
    opts = _options(method, config)
    if getattr(model, "rankwise_sparse", None) is not None:
        raise ValueError("model is already sparsified; call rw.sparse.densify(model) first")
    if opts.get("rank") is not None:
        for name, lin in find_targets(model, targets, conv1d=False):  # validate every layer before touching any
            checks.rank("rank", opts["rank"], min(lin.out_features, lin.in_features), where=name)
    names = SPARSE_METHODS[method].apply(model, targets, opts)
    state = SparseState(method, dict(opts), names)
    model.rankwise_sparse = state  # type: ignore[assignment]  # Module attribute
    return model


STRUCTURED = (FactorizedLinear, SparseLowRankLinear, SpectralLinear, TRPLinear, LTELinear, SLoPeLinear)


@torch.no_grad()
def densify(model: nn.Module) -> nn.Module:
    """Merge every structured layer back into a plain ``nn.Linear`` (and ReLoRA's LoRA into W)."""
    state = getattr(model, "rankwise_sparse", None)
    if state is not None and state.method == "relora":
        merge_and_unload(model)
    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, STRUCTURED)]:
        if isinstance(module, TRPLinear):
            lin = nn.Linear(module.in_features, module.out_features, module.bias is not None,
                            device=module.weight.device, dtype=module.weight.dtype)
            lin.weight, lin.bias = module.weight, module.bias
        else:
            lin = module.to_linear()
        replace_module(model, name, lin)
    model.rankwise_sparse = None  # type: ignore[assignment]  # Module attribute
    return model


def sparse_summary(model: nn.Module) -> dict[str, Any]:
    """Method, config, trainable / total parameter counts and per-layer structure of a sparsified model."""
    state = getattr(model, "rankwise_sparse", None)
    params = {id(p): p for p in model.parameters()}.values()
    return {
        "method": None if state is None else state.method,
        "config": None if state is None else state.config,
        "trainable": sum(p.numel() for p in params if p.requires_grad),
        "total": sum(p.numel() for p in params),
        "layers": {n: m.extra_repr() for n, m in model.named_modules() if isinstance(m, STRUCTURED)},
    }


__all__ = ["SPARSE_METHODS", "STRUCTURED", "SparseMethod", "SparseState", "densify", "sparse_summary", "sparsify"]
