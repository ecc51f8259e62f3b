"""SingLoRA (Bensaïd et al. 2025, "SingLoRA: Low Rank Adaptation Using a Single Matrix").

One trainable matrix A ∈ ℝ^{n × r}, n = max(d, k), and its transpose (paper Eq. 3 and Sec. 4.3):

    ΔW = (α/r) · u(t) · A A*ᵀ,    u(t) = min(t/T, 1)

For a square layer A* = A and ΔW is symmetric with rank ≤ r; for a non-square (d × k) layer A* keeps
the first min(d, k) rows of A, so ΔW is the top-left d × k block of A Aᵀ. The ramp u(t) makes the
adapted model start at the base model whatever A's init (U(±1/√n), ``nn.Linear``'s init of the map
x ↦ Aᵀx) and brings the update in over T = ``ramp_steps`` steps. t is the layer's count of
training-mode passes through its delta (``singlora_step``, saved with the adapter; an activation-
checkpointing recompute of a pass does not count), advanced before the pass uses it, so the first
training step already has u = 1/T and any training loop drives the ramp. The trainable count is n·r
(about half of LoRA's). ΔW is the rank-r product B′A′ with B′ = (α/r)·u·A[:d], A′ = A[:k]ᵀ (PEFT LoRA
export of the current state).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..checks import integer
from ..rng import kaiming_uniform_, layer_generator
from .base import AdapterLayer, AlphaConfig
from .init import InitContext
from .registry import MethodSpec, register


@dataclass
class SingLoRAConfig(AlphaConfig):
    """SingLoRA hyper-parameters: ``alpha`` (None: r; scale α/r) and ``ramp_steps`` T of u(t) = min(t/T, 1),
    counted in training-mode forward passes (with k-step gradient accumulation, use k·T)."""

    ramp_steps: int = 100

    def validate(self) -> None:
        super().validate()
        integer("ramp_steps", self.ramp_steps, 1)


class SingLoRALayer(AdapterLayer):
    """Trainable ``singlora_A`` (max(d, k) × r); ``singlora_step`` counts the training forward passes."""

    method = "singlora"
    running_statistics = ("singlora_step",)

    def __init__(self, base_layer: nn.Module, config: SingLoRAConfig, ctx: InitContext) -> None:
        super().__init__(base_layer, config)
        device, dtype = self.base_weight.device, self.adapter_dtype
        n = max(self.in_features, self.out_features)
        a = kaiming_uniform_(torch.empty(config.r, n), generator=layer_generator(config.seed, ctx.name)).t()
        self.singlora_A = nn.Parameter(a.to(device=device, dtype=dtype).contiguous())
        self.register_buffer("singlora_step", torch.zeros((), dtype=torch.long, device=device))
        self.scale = config.scale
        self.train(base_layer.training)  # a new module trains by default: count passes only in the model's mode

    def ramp(self) -> torch.Tensor:
        """u(t) = min(t/T, 1) for the current step count t (a 0-d tensor, so the forward stays traceable)."""
        return (self.singlora_step.float() / self.config.ramp_steps).clamp(max=1.0)

    def finish_warmup(self) -> None:
        """Put the ramp at its end (t = T, u = 1): ΔW = (α/r)·A A*ᵀ."""
        self.singlora_step.fill_(self.config.ramp_steps)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(B′, A′, 1) with B′ = (α/r)·u(t)·A[:d] and A′ = A[:k]ᵀ."""
        a = self.singlora_A
        u = self.ramp().to(a.dtype)
        return a[: self.out_features] * (u * self.scale), a[: self.in_features].t(), 1.0

    def delta_weight(self) -> torch.Tensor:
        b, a, _ = self.factors()
        return b @ a

    def delta_output(self, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """ΔW·dropout(x) at u(t), t advanced first in training mode (every path that applies the delta
        comes here: the layer's forward, a stack of named adapters, a mixed batch), once per batch: not again
        when activation checkpointing recomputes the forward (it then uses the same t)."""
        if self.updates_statistics:
            with torch.no_grad():
                self.singlora_step.add_(1)
        return super().delta_output(x, out_dtype)

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """No fused kernel: the delta goes through ``delta_output``, which advances t."""
        return None

    def trainable_count(self) -> int:
        return max(self.in_features, self.out_features) * self.config.r

    def extra_repr(self) -> str:
        return super().extra_repr() + f", scale={self.scale:g}, ramp_steps={self.config.ramp_steps}"


register(
    MethodSpec(
        "singlora",
        "adapter",
        "Bensaïd et al. 2025, SingLoRA: Low Rank Adaptation Using a Single Matrix",
        SingLoRAConfig,
        SingLoRALayer,
        summary="ΔW = (α/r)·u(t)·A A*ᵀ with one A (max(d,k) × r; A* its first min(d,k) rows), "
                "u(t) = min(t/T, 1) over the training forward passes",
    )
)
