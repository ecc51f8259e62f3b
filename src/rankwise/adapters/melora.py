"""MELoRA (Ren et al. 2024, "Mini-Ensemble Low-Rank Adapters for Parameter-Efficient Fine-Tuning").

n mini LoRAs of rank r, mini LoRA i reading the i-th of n equal slices of the input and writing the
i-th slice of the output (paper Sec. 3, Eq. 5):

    ΔW = (α/r) · blockdiag(B₁A₁, …, BₙAₙ),    Aᵢ ∈ ℝ^{r × k/n},  Bᵢ ∈ ℝ^{d/n × r}

so the trainable count is r(d + k), that of one rank-r LoRA, while rank(ΔW) reaches n·r. Each Aᵢ
starts as ``nn.Linear``'s init over its slice (U(±1/√(k/n))), each Bᵢ at 0 (ΔW = 0). ΔW is the
low-rank product B′A′ with B′ = blockdiag(Bᵢ) (d × n·r) and A′ = blockdiag(Aᵢ) (n·r × k), exported to
PEFT LoRA at rank n·r; the forward runs the n slices as one batched product, never the zero blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..checks import integer
from ..rng import kaiming_uniform_, layer_generator
from .base import AdapterLayer, AlphaScale
from .init import InitContext
from .registry import MethodSpec, register


@dataclass
class MELoRAConfig(AlphaScale):
    """MELoRA hyper-parameters: ``r`` the rank of each mini LoRA, ``n`` their number (it must divide
    both dimensions of every adapted layer), ``alpha`` the LoRA α of each (None: r; scale α/r)."""

    n: int = 4
    alpha: float | None = None

    def validate(self) -> None:
        super().validate()
        integer("n", self.n, 1)


class MELoRALayer(AdapterLayer):
    """Trainable ``melora_A`` (n, r, k/n) and ``melora_B`` (n, d/n, r): the n mini LoRAs."""

    method = "melora"

    def __init__(self, base_layer: nn.Module, config: MELoRAConfig, ctx: InitContext) -> None:
        super().__init__(base_layer, config)
        n, r = config.n, config.r
        if self.in_features % n or self.out_features % n:
            raise ValueError(
                f"n={n} must divide in_features={self.in_features} and out_features={self.out_features} of "
                f"'{ctx.name or 'the layer'}' (MELoRA splits both into n equal slices); choose n among their "
                "common divisors"
            )
        self.scale = config.scale
        device, dtype = self.base_weight.device, self.adapter_dtype
        a = torch.zeros(n, r, self.in_features // n)
        g = layer_generator(config.seed, ctx.name)
        for block in a:
            kaiming_uniform_(block, generator=g)
        self.melora_A = nn.Parameter(a.to(device=device, dtype=dtype))
        self.melora_B = nn.Parameter(torch.zeros(n, self.out_features // n, r, dtype=dtype, device=device))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """B′ = blockdiag(Bᵢ) (d × n·r), A′ = blockdiag(Aᵢ) (n·r × k): ΔW = s·B′A′."""
        return torch.block_diag(*self.melora_B.unbind(0)), torch.block_diag(*self.melora_A.unbind(0)), self.scale

    def delta_weight(self) -> torch.Tensor:
        return torch.block_diag(*(self.melora_B @ self.melora_A).unbind(0)) * self.scale

    def delta_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Slice i of the output = s·Bᵢ(Aᵢ xᵢ), all n slices in one batched product."""
        xs = x.unflatten(-1, (self.config.n, -1))
        h = torch.einsum("...nk,nrk->...nr", xs, self.melora_A)
        return torch.einsum("...nr,ndr->...nd", h, self.melora_B).flatten(-2) * self.scale

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """No dense-factor kernel: the block-diagonal factors are mostly zeros (``delta_forward`` runs the slices)."""
        return None

    def trainable_count(self) -> int:
        return self.config.r * (self.in_features + self.out_features)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", n={self.config.n}, scale={self.scale:g}"


register(
    MethodSpec(
        "melora",
        "adapter",
        "Ren et al. 2024, Mini-Ensemble Low-Rank Adapters for Parameter-Efficient Fine-Tuning",
        MELoRAConfig,
        MELoRALayer,
        summary="ΔW = (α/r)·blockdiag(B₁A₁, …, BₙAₙ): n rank-r mini LoRAs on disjoint input / output slices "
                "(r(d+k) parameters, rank up to n·r)",
    )
)
