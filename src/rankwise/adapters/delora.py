"""DeLoRA (Bini, Girrbach & Akata 2025, "Decoupling Angles and Strength in Low-rank Adaptation",
ICLR 2025).

Each rank-1 component of B·A is normalised, and a learnable strength λ bounds the whole update
relative to the base weight (paper Eq. 5, with the authors' per-input-channel ‖W₀‖ of their PEFT
0.21.2 integration):

    ΔW = (λ / r) · B · Ξ · A · diag(‖W₀[:, j]‖) ,   Ξ = diag(1 / (‖bᵢ‖·‖aᵢ‖))

so every term is a unit-norm direction and ‖ΔW‖_F ≤ |λ|·maxⱼ‖W₀[:, j]‖ ≤ |λ|·‖W₀‖_F whatever B and A:
the angle (B, A) is learned apart from the strength (λ). The column norms of W₀ are taken once, at
init, and kept as a buffer. As PEFT, the norms in Ξ are clamped at 1e-4 and B starts at 0 (A
Kaiming-uniform, λ = ``delora_lambda``), so the model starts at the base. ΔW is a rank-r product:
it exports to PEFT LoRA with the normalisation and λ folded into B′ = B·(λ/r)·Ξ, A′ = A·diag(‖W₀[:, j]‖).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..checks import positive
from ..rng import kaiming_uniform_, layer_generator
from .base import AdapterConfig, AdapterLayer
from .init import InitContext
from .registry import MethodSpec, register

NORM_FLOOR = 1e-4  # the clamp on ‖aᵢ‖ and ‖bᵢ‖ (PEFT's)


@dataclass
class DeLoRAConfig(AdapterConfig):
    """DeLoRA hyper-parameters: ``delora_lambda`` is the initial strength λ (trainable), the bound
    of ‖ΔW‖ relative to the column norms of W₀."""

    delora_lambda: float = 15.0

    def validate(self) -> None:
        super().validate()
        positive("delora_lambda", self.delora_lambda)


class DeLoRALayer(AdapterLayer):
    """Trainable ``delora_A`` (r × in), ``delora_B`` (out × r) and ``delora_lambda`` (1,); buffer
    ``delora_w_norm`` (in,), the column norms of W₀."""

    method = "delora"

    def __init__(self, base_layer: nn.Module, config: DeLoRAConfig, ctx: InitContext) -> None:
        super().__init__(base_layer, config)
        w, dtype, r = self.base_weight, self.adapter_dtype, config.r
        a = kaiming_uniform_(torch.empty(r, self.in_features), generator=layer_generator(config.seed, ctx.name))
        self.delora_A = nn.Parameter(a.to(device=w.device, dtype=dtype))
        self.delora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=dtype, device=w.device))
        self.delora_lambda = nn.Parameter(torch.full((1,), float(config.delora_lambda), dtype=dtype, device=w.device))
        self.register_buffer("delora_w_norm", w.detach().to(dtype).norm(dim=0))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """B′ = B·(λ/r)·Ξ, A′ = A·diag(‖W₀[:, j]‖): ΔW = B′A′."""
        a, b = self.delora_A, self.delora_B
        xi = self.delora_lambda / self.config.r / (
            a.norm(dim=1).clamp(min=NORM_FLOOR) * b.norm(dim=0).clamp(min=NORM_FLOOR))
        return b * xi, a * self.delora_w_norm, 1.0

    def delta_weight(self) -> torch.Tensor:
        b, a, _ = self.factors()
        return b @ a

    def trainable_count(self) -> int:
        return self.config.r * (self.in_features + self.out_features) + 1


register(
    MethodSpec(
        "delora",
        "adapter",
        "Bini, Girrbach & Akata 2025, Decoupling Angles and Strength in Low-rank Adaptation",
        DeLoRAConfig,
        DeLoRALayer,
        export="lora",
        summary="ΔW = (λ/r)·B·Ξ·A·diag(‖W₀ columns‖), rank-1 terms normalised (Ξ), so ‖ΔW‖ ≤ λ‖W₀‖; λ trainable",
    )
)
