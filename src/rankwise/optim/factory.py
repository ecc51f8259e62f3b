"""``make(name, model_or_params, **kw)``: build a named memory-efficient optimizer."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .. import catalogue, checks
from .apollo import APOLLO, APOLLOMini
from .blocks import IST, LISA, BAdam, OwLore
from .coap import COAP
from .conventions import check_lr
from .dct import DCTGaLore
from .fira import Fira
from .flora import Flora
from .frugal import FRUGAL
from .galore import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit
from .galore_plus import GaLorePlus
from .gradnormlorp import GradNormLoRP
from .groups import decay_groups, param_groups
from .guard import GUARD_OPTIONS, guard
from .natural_galore import NaturalGaLore
from .osd import OnlineSubspaceDescent
from .projected import ProjectedOptimizer
from .q_galore import QGaLoreAdamW

_METHODS: list[tuple[str, str, type[torch.optim.Optimizer], str, str]] = [
    # (name, family, class, paper, one-line mechanism)
    ("galore", "optimizer", GaLoreAdamW, "Zhao et al. 2024, GaLore: Memory-Efficient LLM Training by Gradient "
     "Low-Rank Projection", "AdamW on PᵀG with P the top-r left singular vectors of G, refreshed every T steps; "
     "update P·N·α"),
    ("galore_adafactor", "optimizer", GaLoreAdafactor, "Zhao et al. 2024, GaLore (Adafactor variant)",
     "GaLore's projection with Adafactor (factored second moment) in the subspace"),
    ("galore_8bit", "optimizer", GaLoreAdamW8bit, "Zhao et al. 2024, GaLore (8-bit Adam variant)",
     "GaLore's projection with 8-bit blockwise-quantized Adam moments"),
    ("q_galore", "optimizer", QGaLoreAdamW, "Zhang et al. 2024, Q-GaLore: Quantized GaLore with INT4 Projection and "
     "Layer-Adaptive Low-Rank Gradients", "INT4 projector, lazy refresh when successive subspaces agree, INT8 weights "
     "with stochastic rounding"),
    ("fira", "optimizer", Fira, "Chen et al. 2024, Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank "
     "Constraint?", "GaLore plus the residual G − PPᵀG scaled by the subspace's Adam/SGD norm ratio, with a "
     "norm-growth limiter"),
    ("frugal", "optimizer", FRUGAL, "Zmushko et al. 2024, FRUGAL: Memory-Efficient Optimization by Reducing State "
     "Overhead for Scalable Training", "state-full AdamW in a subspace, state-free signSGD on the rest"),
    ("apollo", "optimizer", APOLLO, "Zhu et al. 2024, APOLLO: SGD-like Memory, AdamW-level Performance",
     "AdamW moments of a random projection give channel-wise scaling factors for the raw gradient"),
    ("apollo_mini", "optimizer", APOLLOMini, "Zhu et al. 2024, APOLLO (APOLLO-Mini)",
     "APOLLO at rank 1 with one tensor-wise scaling factor"),
    ("gradnormlorp", "optimizer", GradNormLoRP, "Huang et al. 2024, Gradient Weight-normalized Low-rank Projection "
     "for Efficient LLM Training", "weight-normalized W = m·V/‖V‖ with GaLore-style projected updates"),
    ("flora_opt", "optimizer", Flora, "Hao et al. 2024, Flora: Low-Rank Adapters Are Secretly Gradient Compressors",
     "momentum compressed by seeded random projections, resampled (and transferred) every T steps"),
    ("osd", "optimizer", OnlineSubspaceDescent, "Liang et al. 2024, Memory-Efficient LLM Training with Online "
     "Subspace Descent", "the projection P is updated by online PCA (a gradient step on ‖G − PPᵀG‖²) "
     "instead of SVD"),
    ("dct_proj", "optimizer", DCTGaLore, "Modoranu et al. 2025, SVD-Free Low-Rank Adaptive Gradient Optimization for "
     "Large Language Models", "the subspace is the r DCT columns best aligned with G (no SVD)"),
    ("coap", "optimizer", COAP, "Xiao et al. 2025, COAP: Memory-Efficient Training with Correlation-Aware Gradient "
     "Projection", "GaLore-style AdamW whose projection takes a correlation-aware gradient step every T_u steps "
     "and is recomputed by a warm-started range finder every λ·T_u steps (no SVD of G)"),
    ("natural_galore", "optimizer", NaturalGaLore, "Das 2024, Natural GaLore: Accelerating GaLore for "
     "memory-efficient LLM Training and Fine-tuning", "GaLore whose low-rank gradient is preconditioned by the "
     "inverse empirical Fisher of its last s gradients (Woodbury identity) before AdamW"),
    ("galore_plus", "optimizer", GaLorePlus, "Liao et al. 2024, GaLore+: Boosting Low-Rank Adaptation for LLMs "
     "with Cross-Head Projection", "GaLore whose basis comes from randomized subspace iteration (no SVD) on one "
     "head's gradient, shared by all heads of an attention weight, plus AdamW moments of the residual G − PPᵀG "
     "on a sparse set of entries fixed after a warm-up (Ω and the default ρ, warm-up: our reading)"),
    ("adamw", "optimizer", torch.optim.AdamW, "Loshchilov & Hutter 2019, Decoupled Weight Decay Regularization",
     "full-state AdamW on every trainable parameter (the baseline)"),
    ("badam", "sampler", BAdam, "Luo et al. 2024, BAdam: A Memory Efficient Full Parameter Optimization Method for "
     "Large Language Models",
     "block coordinate descent: Adam on one block of layers at a time, switched every K steps"),
    ("lisa", "sampler", LISA, "Pan et al. 2024, LISA: Layerwise Importance Sampling for Memory-Efficient Large "
     "Language Model Fine-Tuning", "embedding and head always train; γ uniformly sampled middle layers every K steps"),
    ("ist", "sampler", IST, "Yao et al. 2024, Layer-wise Importance Matters: Less Memory for Better Performance in "
     "Parameter-efficient Fine-tuning of Large Language Models", "γ layers drawn each step by their importance "
     "scores, which are re-estimated every T steps from the loss of models with random layers' PEFT output "
     "suppressed"),
    ("owlore", "sampler", OwLore, "Li et al. 2024, OwLore: Outlier-weighed Layerwise Sampled Low-Rank Projection",
     "layers sampled by their share of outlier weights, trained with GaLore-projected updates"),
]


def _register(name: str, family: str, cls: type[torch.optim.Optimizer], paper: str, mechanism: str) -> None:
    catalogue.register(catalogue.MethodRecord(
        name, family, paper, mechanism, api="optim", config=cls,
        builder=lambda model, **kwargs: make(name, model, **kwargs),
    ))


for _method in _METHODS:
    _register(*_method)

#: Optimizers taking parameters or groups (name -> class): a view of the catalogue.
OPTIMIZERS: Mapping[str, type[torch.optim.Optimizer]] = catalogue.View(
    lambda r: r.api == "optim" and r.family == "optimizer", lambda r: r.config)
#: Block/layer samplers: they decide themselves which parameters train, so they take the model.
SAMPLERS: Mapping[str, Callable[..., torch.optim.Optimizer]] = catalogue.View(
    lambda r: r.api == "optim" and r.family == "sampler", lambda r: r.config)


def names() -> list[str]:
    """Every optimizer and sampler name ``make`` accepts (the catalogue's, so registered ones count)."""
    return sorted([*OPTIMIZERS, *SAMPLERS])


def make(
    name: str,
    model_or_params: nn.Module | Iterable[torch.Tensor] | Iterable[dict[str, Any]],
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """The optimizer ``name`` (see ``OPTIMIZERS``) with the same keyword arguments as its class.

    Given an ``nn.Module``: a projected optimizer gets ``param_groups(model, targets=..., rank=...)``
    (``targets`` default ``"all-linear"``, ``rank`` default 128; ``apollo_mini`` uses rank 1); any
    other optimizer (``'adamw'``, the full-state baseline, or one registered in the catalogue) gets
    every trainable parameter, split by ``decay_groups`` when ``weight_decay`` is given (matrices
    decay, vectors do not). Given parameters or groups, they are passed through unchanged
    (``rank``/``targets`` are then rejected). ``'badam'``, ``'lisa'``, ``'owlore'``, ``'ist'`` (``SAMPLERS``)
    take the model and their own keyword arguments.

    ``skip_nonfinite``, ``master_weights`` and ``bf16_rounding`` (any optimizer or sampler) wrap the
    result in :class:`~rankwise.optim.guard.GuardedOptimizer` (see ``rankwise.optim.guard``): skip
    steps with a NaN/inf gradient (counted in ``skipped_steps``), fp32 master weights for bf16/fp16
    parameters, stochastic rounding back to bf16. All off by default (the optimizer is returned as is).
    """
    options = {k: kwargs.pop(k) for k in GUARD_OPTIONS if k in kwargs}
    return guard(_make(name, model_or_params, **kwargs), **options)


def _check_shared_options(kwargs: dict[str, Any]) -> None:
    """The options every optimizer shares, checked here once (torch's AdamW takes lr=0, inf or NaN
    weight decay, and a bad ``betas`` raises a TypeError that does not name it)."""
    if "lr" in kwargs:
        check_lr(kwargs["lr"], low_open=True)
    if "weight_decay" in kwargs:
        checks.non_negative("weight_decay", kwargs["weight_decay"])
    if "betas" in kwargs:
        checks.beta_pair("betas", kwargs["betas"])
    if "eps" in kwargs and kwargs["eps"] is not None:
        checks.non_negative("eps", kwargs["eps"])


def _make(
    name: str,
    model_or_params: nn.Module | Iterable[torch.Tensor] | Iterable[dict[str, Any]],
    **kwargs: Any,
) -> torch.optim.Optimizer:
    checks.choice("optimizer", name, names())
    _check_shared_options(kwargs)
    if name in SAMPLERS:
        if not isinstance(model_or_params, nn.Module):
            raise ValueError(f"optimizer {name!r} samples transformer layers and needs the model, not parameters")
        return SAMPLERS[name](model_or_params, **kwargs)
    cls = OPTIMIZERS[name]
    grouping = {k: kwargs.pop(k) for k in ("targets", "rank") if k in kwargs}
    if not isinstance(model_or_params, nn.Module):
        if grouping:
            raise ValueError(f"{sorted(grouping)} only apply when make() gets a model; "
                             "with parameters or groups, put 'rank' in the groups")
        return cls(model_or_params, **kwargs)
    model = model_or_params
    if not issubclass(cls, ProjectedOptimizer):
        if grouping:
            raise ValueError(f"{sorted(grouping)} apply only to projected optimizers, not optimizer={name!r}")
        if "weight_decay" in kwargs:
            return cls(decay_groups(model, kwargs.pop("weight_decay")), **kwargs)
        return cls([p for p in model.parameters() if p.requires_grad], **kwargs)
    rank = 1 if name == "apollo_mini" else grouping.get("rank", 128)
    return cls(param_groups(model, targets=grouping.get("targets", "all-linear"), rank=rank), **kwargs)
