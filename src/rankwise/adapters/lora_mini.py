"""LoRA-Mini (Singh, Aher & Garg 2024, "LoRA-Mini: Adaptation Matrices Decomposition and Selective
Training", AAAI CoLoRAI workshop).

Each LoRA factor is split into an outer frozen matrix and an inner trainable one, four matrices:

    ΔW = (α/r) · B_out · B_in · A_in · A_out ,
    B_out ∈ ℝ^{out×b}, A_out ∈ ℝ^{a×in} frozen;  B_in ∈ ℝ^{b×r}, A_in ∈ ℝ^{r×a} trained

so a layer trains r·(a + b) numbers, independent of its (out, in) shape. The outer matrices and A_in
start as ``nn.Linear``'s init (U(±1/√fan_in)), B_in at 0 (ΔW = 0, as LoRA's B); the outer pair is drawn
from a per-layer generator (``seed`` and the layer name) and regenerated on load. The initialisation
is not given in the abstract nor in the authors' public README (their code was not reachable): this
is the LoRA reading, outer ones random. ΔW is the rank-≤r product (B_out·B_in)·(A_in·A_out): PEFT LoRA
export.
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
class LoRAMiniConfig(AlphaScale):
    """LoRA-Mini: ``r`` the inner rank, ``a`` / ``b`` the widths of the frozen outer A_out (a × in) and
    B_out (out × b), ``alpha`` the LoRA α (None: r; scale α/r)."""

    a: int = 64
    b: int = 64
    alpha: float | None = None

    def validate(self) -> None:
        super().validate()
        integer("a", self.a, 1)
        integer("b", self.b, 1)


def outer_matrices(seed: int, name: str, config: LoRAMiniConfig, out_features: int, in_features: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen fp32 pair (B_out: out × b, A_out: a × in), a pure function of the arguments."""
    g = layer_generator(seed, name)
    a_out = kaiming_uniform_(torch.empty(config.a, in_features), generator=g)
    b_out = kaiming_uniform_(torch.empty(out_features, config.b), generator=g)
    return b_out, a_out


class LoRAMiniLayer(AdapterLayer):
    """Trainable ``mini_B_in`` (b × r) and ``mini_A_in`` (r × a); frozen, unsaved ``mini_B_out`` / ``mini_A_out``."""

    method = "lora_mini"

    def __init__(self, base_layer: nn.Module, config: LoRAMiniConfig, ctx: InitContext) -> None:
        super().__init__(base_layer, config)
        device, dtype = self.base_weight.device, self.adapter_dtype
        b_out, a_out = outer_matrices(config.seed, ctx.name, config, self.out_features, self.in_features)
        self.register_buffer("mini_B_out", b_out.to(device=device, dtype=dtype), persistent=False)
        self.register_buffer("mini_A_out", a_out.to(device=device, dtype=dtype), persistent=False)
        a_in = kaiming_uniform_(torch.empty(config.r, config.a), generator=layer_generator(config.seed + 1, ctx.name))
        self.mini_A_in = nn.Parameter(a_in.to(device=device, dtype=dtype))
        self.mini_B_in = nn.Parameter(torch.zeros(config.b, config.r, device=device, dtype=dtype))
        self.scale = config.scale

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(B_out·B_in, A_in·A_out, α/r)."""
        return self.mini_B_out @ self.mini_B_in, self.mini_A_in @ self.mini_A_out, self.scale

    def delta_weight(self) -> torch.Tensor:
        b, a, s = self.factors()
        return (b @ a) * s

    def trainable_count(self) -> int:
        c = self.config
        return c.r * (c.a + c.b)

    def extra_repr(self) -> str:
        c = self.config
        return super().extra_repr() + f", a={c.a}, b={c.b}, scale={self.scale:g}"


register(
    MethodSpec(
        "lora_mini",
        "adapter",
        "Singh et al. 2024, LoRA-Mini: Adaptation Matrices Decomposition and Selective Training",
        LoRAMiniConfig,
        LoRAMiniLayer,
        summary="ΔW = (α/r)·B_out B_in A_in A_out: frozen seeded outer B_out (out×b), A_out (a×in); only the "
                "inner B_in (b×r, 0 at init) and A_in (r×a) train (init not in the paper's abstract: LoRA's)",
    )
)
