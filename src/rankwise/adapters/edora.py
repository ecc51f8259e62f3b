"""EDoRA (Nasiri & Garraghan 2025, "EDoRA: Efficient Weight-Decomposed Low-Rank Adaptation via Singular
Value Decomposition").

DoRA's magnitude / direction split whose direction update is LoRA-XS's frozen SVD pair with a small
trainable core between them (paper Sec. 3):

    W′ = m ⊙ (W₀ + s·B·R·A) / ‖W₀ + s·B·R·A‖_c ,    B = U_r,  A = Σ_r V_rᵀ  (truncated SVD of W₀, frozen)

so a layer trains r² + out numbers: R (r×r, ~ N(0, init_std²), σ = 1e-5 as in the authors' code) and
the magnitude m (‖W₀ + s·B·R₀·A‖_c at init, so the model starts at W₀ up to R₀'s noise). The norm is a
constant in backward, as in DoRA. The magnitude makes ΔW full rank (no LoRA export); it is written in
PEFT's DoRA format with lora_B = B·R, lora_A = A.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .core import CoreLayer, LoRAXSConfig
from .dora import WeightDecomposed
from .init import InitContext
from .registry import MethodSpec, register


@dataclass
class EDoRAConfig(LoRAXSConfig):
    """EDoRA: LoRA-XS's options (s = α/r, ``alpha=None``: s = 1; core R ~ N(0, init_std²)) plus the magnitude."""

    init_name: ClassVar[str] = "lora_xs"


class EDoRALayer(WeightDecomposed, CoreLayer):
    """LoRA-XS's frozen ``frozen_B``, ``frozen_A`` and trainable ``core`` R, plus a trainable ``magnitude`` (out,)."""

    method = "edora"

    def __init__(self, base_layer: nn.Module, config: EDoRAConfig, ctx: InitContext) -> None:
        super().__init__(base_layer, config, ctx)
        self.method = "edora"
        self.init_magnitude(ctx)

    def direction_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B·R, A): the direction update is s·B·R·A."""
        return self.frozen_B @ self.core, self.frozen_A

    @property
    def lora_B(self) -> torch.Tensor:
        """B·R, PEFT DoRA's ``lora_B`` (export)."""
        return self.direction_factors()[0]

    @property
    def lora_A(self) -> torch.Tensor:
        """A, PEFT DoRA's ``lora_A`` (export)."""
        return self.frozen_A

    def trainable_count(self) -> int:
        return self.r * self.r + self.out_features


register(
    MethodSpec(
        "edora",
        "adapter",
        "Nasiri & Garraghan 2025, EDoRA: Efficient Weight-Decomposed Low-Rank Adaptation via Singular Value "
        "Decomposition",
        EDoRAConfig,
        EDoRALayer,
        export="dora",
        summary="W′ = m ⊙ (W₀+s·B·R·A)/‖W₀+s·B·R·A‖_c: frozen SVD factors B = U_r, A = Σ_r V_rᵀ; only the r×r R "
                "and the magnitude m trained",
    )
)
