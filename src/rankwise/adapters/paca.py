"""PaCA — Woo et al. 2025, "PaCA: Partial Connection Adaptation for Efficient Fine-Tuning" (official code
github.com/WooSunghyeon/paca), Sec. 3.

PaCA fine-tunes r randomly chosen input connections (columns) of each pretrained weight in place: the
official layer holds P = W₀[:, idx]/s (s = α/r) and runs W with W[:, idx] = s·P, so the selected columns
train with the gradient s·∂L/∂W[:, idx] and no adapter layer sits beside W. Only the r selected input
activations are needed for that gradient, so only x[..., idx] is saved for backward.

Here the same update is a delta beside the frozen base: ΔW[:, idx] = s·D with D (out × r) starting at 0,
i.e. D = P − P₀; its gradient s·(∂L/∂y)ᵀ x[..., idx] is P's, so any optimizer takes the same steps and
W₀ + ΔW is PaCA's weight at every step. The delta merges into W₀'s selected columns; it is not a
low-rank product of PEFT's form, so it does not export to PEFT.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..rng import layer_generator
from .base import AdapterLayer, AlphaConfig
from .init import InitContext
from .registry import MethodSpec, register


@dataclass
class PaCAConfig(AlphaConfig):
    """``r``: connections (input columns) trained per matrix; ``alpha``: scale s = α/r of the trained
    columns (the official ``paca_alpha``; None = r, s = 1)."""


class PaCALayer(AdapterLayer):
    """``y = W₀x + b + s·D x[..., idx]``: ``paca_columns`` (r distinct input columns, uniformly at random per
    layer, a buffer) and ``paca_delta`` D (out × r, trained, 0 at the start)."""

    method = "paca"

    def __init__(self, base_layer: nn.Module, config: PaCAConfig, ctx: InitContext) -> None:
        super().__init__(base_layer, config)
        device = self.base_weight.device
        self.scale = config.scale
        self.paca_delta = nn.Parameter(torch.zeros(self.out_features, config.r, dtype=self.adapter_dtype,
                                                   device=device))
        self.register_buffer("paca_columns", torch.zeros(config.r, dtype=torch.long, device=device))
        if not ctx.skip:
            gen = layer_generator(config.seed, ctx.name)
            self.paca_columns.copy_(torch.randperm(self.in_features, generator=gen)[: config.r])

    def delta_weight(self) -> torch.Tensor:
        zeros = self.paca_delta.new_zeros(self.out_features, self.in_features)
        return zeros.index_add(1, self.paca_columns, self.paca_delta) * self.scale

    def delta_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.index_select(-1, self.paca_columns), self.paca_delta) * self.scale

    def trainable_count(self) -> int:
        return self.out_features * self.config.r

    def extra_repr(self) -> str:
        return super().extra_repr() + f", scale={self.scale:g}"


register(
    MethodSpec(
        "paca",
        "sparse-finetuning",
        "Woo et al. 2025, PaCA: Partial Connection Adaptation for Efficient Fine-Tuning",
        PaCAConfig,
        PaCALayer,
        export="none",
        summary="r random input columns of each weight trained in place (ΔW[:, idx] = (α/r)·D); only "
                "x[..., idx] is saved for backward",
    )
)
