"""NOLA (Koohpayegani et al. 2024, "NOLA: Compressing LoRA using Linear Combination of Random Basis",
ICLR 2024).

LoRA's factors re-parameterised as linear combinations of frozen random matrices; only the mixture
coefficients are trained (paper Eq. 2):

    ΔW = (α/r) · B A,    A = A₀ + Σᵢ₌₁ᵏ αᵢ Aᵢ,    B = Σⱼ₌₁ˡ βⱼ Bⱼ

with k = ``num_basis_A`` bases Aᵢ (r × in) and l = ``num_basis_B`` bases Bⱼ (out × r), entries
U(−1, 1)/√(number of bases), and A₀ ``nn.Linear``'s init (U(±1/√in)). α = β = 0 at init, so ΔW = 0
while β gets a gradient through A₀ (the authors' code keeps this frozen A₀ as the LoRA A's weight; B
has none). The trainable count is k + l, whatever the layer's shape or r. All frozen tensors are drawn
from a per-layer generator (``seed`` and the layer name) and regenerated on load: a saved adapter
holds the coefficients only. ΔW is a rank-r product (PEFT LoRA export, B′ = B, A′ = A).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..checks import integer
from ..rng import kaiming_uniform_, layer_generator
from .base import AdapterLayer, AlphaScale
from .init import InitContext
from .registry import MethodSpec, register


@dataclass
class NOLAConfig(AlphaScale):
    """NOLA hyper-parameters: ``num_basis_A`` (k) and ``num_basis_B`` (l) random bases per layer for
    A and B, ``alpha`` the LoRA α (None: r; scale α/r)."""

    num_basis_A: int = 256
    num_basis_B: int = 256
    alpha: float | None = None

    def validate(self) -> None:
        super().validate()
        integer("num_basis_A", self.num_basis_A, 1)
        integer("num_basis_B", self.num_basis_B, 1)


def nola_bases(
    seed: int, name: str, r: int, in_features: int, out_features: int, num_a: int, num_b: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The frozen fp32 tensors of one layer, a pure function of the arguments: A₀ (r × in), the A
    bases (num_a × r × in) and the B bases (num_b × out × r)."""
    g = layer_generator(seed, name)
    a0 = kaiming_uniform_(torch.empty(r, in_features), generator=g)
    basis_a = torch.empty(num_a, r, in_features).uniform_(-1.0, 1.0, generator=g) / math.sqrt(num_a)
    basis_b = torch.empty(num_b, out_features, r).uniform_(-1.0, 1.0, generator=g) / math.sqrt(num_b)
    return a0, basis_a, basis_b


class NOLALayer(AdapterLayer):
    """Trainable ``nola_alpha`` (k,) and ``nola_beta`` (l,); frozen, unsaved ``nola_A0`` and bases."""

    method = "nola"

    def __init__(self, base_layer: nn.Module, config: NOLAConfig, ctx: InitContext) -> None:
        super().__init__(base_layer, config)
        device, dtype = self.base_weight.device, self.adapter_dtype
        frozen = nola_bases(config.seed, ctx.name, config.r, self.in_features, self.out_features,
                            config.num_basis_A, config.num_basis_B)
        for name, t in zip(("nola_A0", "nola_basis_A", "nola_basis_B"), frozen, strict=True):
            self.register_buffer(name, t.to(device=device, dtype=dtype), persistent=False)
        self.scale = config.scale
        self.nola_alpha = nn.Parameter(torch.zeros(config.num_basis_A, dtype=dtype, device=device))
        self.nola_beta = nn.Parameter(torch.zeros(config.num_basis_B, dtype=dtype, device=device))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(B, A, α/r) with A = A₀ + Σ αᵢAᵢ and B = Σ βⱼBⱼ."""
        a = self.nola_A0 + torch.einsum("k,kri->ri", self.nola_alpha, self.nola_basis_A)
        b = torch.einsum("l,lor->or", self.nola_beta, self.nola_basis_B)
        return b, a, self.scale

    def delta_weight(self) -> torch.Tensor:
        b, a, s = self.factors()
        return (b @ a) * s

    def trainable_count(self) -> int:
        return self.config.num_basis_A + self.config.num_basis_B

    def extra_repr(self) -> str:
        c = self.config
        return super().extra_repr() + f", bases=({c.num_basis_A}, {c.num_basis_B}), scale={self.scale:g}"


register(
    MethodSpec(
        "nola",
        "adapter",
        "Koohpayegani et al. 2024, NOLA: Compressing LoRA using Linear Combination of Random Basis",
        NOLAConfig,
        NOLALayer,
        summary="ΔW = (α/r)·(Σ βⱼBⱼ)(A₀ + Σ αᵢAᵢ) over frozen per-layer seeded random bases; only the "
                "coefficients α, β (0 at init) are trained",
    )
)
