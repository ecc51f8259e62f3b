"""SLTrain (Han et al. 2024, "SLTrain: a sparse plus low-rank approach for parameter and memory
efficient pretraining", NeurIPS 2024).

Each target weight is re-parameterized as ``W = (α/r)·B A + S`` (Eq. 2): B ∈ ℝ^{d×r}, A ∈ ℝ^{r×p}
learned by matrix factorization, and S with a support Ω of exactly ⌊δ·d·p⌋ entries drawn uniformly
at random once and fixed (§3.2), only its values learned. Initialization as in the paper's reference
code: A ~ Kaiming-uniform U(±1/√p), B = 0, values of S ~ U(±1/√p), so the initial weight is the
random sparse matrix S. The dense W is never stored: see :class:`~rankwise.sparse.layers.SparseLowRankLinear`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import checks
from ..rng import kaiming_uniform_, layer_generator
from .layers import KERNELS, SparseLowRankLinear, random_support


@dataclass
class SLTrainConfig:
    """``rank`` r of B A, ``density`` δ of S, ``alpha`` (scale α/r), support ``seed``, ``kernel``."""

    rank: int = 128
    density: float = 0.03
    alpha: float = 32.0
    seed: int = 0
    kernel: str = "sparse"

    def __post_init__(self) -> None:
        checks.rank("rank", self.rank)
        checks.fraction("density", self.density)
        checks.positive("alpha", self.alpha)
        checks.choice("kernel", self.kernel, KERNELS)

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank


@torch.no_grad()
def sltrain_layer(linear: nn.Linear, config: SLTrainConfig, name: str = "") -> SparseLowRankLinear:
    """A from-scratch SLTrain layer with the shape (and bias) of ``linear``; its weight is discarded."""
    checks.rank("rank", config.rank, min(linear.out_features, linear.in_features), where=name)
    g = layer_generator(config.seed, name)
    index = random_support(linear.out_features, linear.in_features, config.density, generator=g)
    w = linear.weight
    layer = SparseLowRankLinear(
        linear.in_features, linear.out_features, config.rank, index, linear.bias is not None,
        config.scale, config.kernel, device=w.device, dtype=w.dtype,
    )
    kaiming_uniform_(layer.A, generator=g)
    layer.B.zero_()
    bound = 1.0 / linear.in_features**0.5
    layer.values.uniform_(-bound, bound, generator=g)
    if linear.bias is not None:
        layer.bias.copy_(linear.bias)
    return layer
