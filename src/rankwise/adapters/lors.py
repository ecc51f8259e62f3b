"""LoRS — Hu et al. 2025, "LoRS: Efficient Low-Rank Adaptation for Sparse Large Language Model"
(arXiv 2501.08582): LoRA for a pruned model that stays sparse after merging.

ΔW = (s·B A) ⊙ M with M = (W ≠ 0), the support of the pruned frozen weight, so ``W + ΔW`` is 0
wherever W was pruned. No mask is stored: M is recomputed from W whenever it is needed (*weight
recompute*), and the forward saves only x, A and B for backward (no out×in tensor: the masked delta
is rebuilt in backward for ∂L/∂x). *Graph rearrangement*: the factor gradients are taken through the
low-rank path, ∂B = s·gᵀ(x Aᵀ), ∂A = s·(g B)ᵀ x, without forming the dense out×in gradient gᵀx
(the authors' code; it leaves the mask out of the factors' gradient, while the forward and ∂L/∂x are
exact). A Kaiming-uniform, B = 0, scale α/r (or α/√r with ``use_rslora``, as the authors' code).

The delta is not a low-rank product (the mask), so it merges — keeping the zeros — but does not
export to PEFT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..rng import kaiming_uniform_, layer_generator
from .base import RsAlphaConfig
from .init import InitContext
from .registry import MethodSpec, register
from .unmerge import KeepsBaseOnMerge


@dataclass
class LoRSConfig(RsAlphaConfig):
    """``alpha`` (None = r) and ``use_rslora`` (scale α/√r, as the authors' code; default False: α/r)."""

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"use_rslora={self.use_rslora!r} must be True or False")


def support(weight: torch.Tensor) -> torch.Tensor:
    """M = (W ≠ 0), recomputed from the weight (never stored)."""
    return weight != 0


class _MaskedLowRank(torch.autograd.Function):
    """x ((s·B A) ⊙ M)ᵀ saving only x, A, B (and a reference to W); see the module doc for backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                scale: float) -> torch.Tensor:
        ctx.save_for_backward(x, weight, a, b)
        ctx.scale = scale
        return F.linear(x, (b @ a) * scale * support(weight))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        # in the output gradient's dtype (bf16 under autocast, where the forward's GEMM ran in bf16), each
        # gradient returned in its input's dtype
        x, weight, a, b = ctx.saved_tensors
        s, dt = ctx.scale, grad.dtype
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ ((b @ a) * s * support(weight)).to(dt)).to(x.dtype)
        g2, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1]).to(dt)
        if ctx.needs_input_grad[2]:
            grad_a = (s * (g2 @ b.to(dt)).t() @ x2).to(a.dtype)
        if ctx.needs_input_grad[3]:
            grad_b = (s * g2.t() @ (x2 @ a.to(dt).t())).to(b.dtype)
        return grad_x, None, grad_a, grad_b, None


class LoRSLayer(KeepsBaseOnMerge):  # a merged entry that rounds to 0 would read as pruned
    """``y = (W + (s·B A) ⊙ (W ≠ 0)) x + b``; trainable ``lora_A`` (r×in), ``lora_B`` (out×r)."""

    method = "lors"

    def __init__(self, base_layer: nn.Module, config: LoRSConfig, ctx: InitContext) -> None:
        super().__init__(base_layer, config)
        r, dtype, device = config.r, self.adapter_dtype, self.base_weight.device
        self.scale = config.scale
        self.lora_A = nn.Parameter(torch.zeros(r, self.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=dtype, device=device))
        if not ctx.skip:
            kaiming_uniform_(self.lora_A, generator=layer_generator(config.seed, ctx.name))

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scale * support(self.base_weight)

    def delta_forward(self, x: torch.Tensor) -> torch.Tensor:
        return _MaskedLowRank.apply(x, self.base_weight.detach(), self.lora_A, self.lora_B, self.scale)

    def trainable_count(self) -> int:
        return self.config.r * (self.in_features + self.out_features)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", r={self.config.r}, scale={self.scale:g}"


register(
    MethodSpec(
        "lors",
        "sparse+low-rank",
        "Hu et al. 2025, LoRS: Efficient Low-Rank Adaptation for Sparse Large Language Model",
        LoRSConfig,
        LoRSLayer,
        export="none",
        summary="ΔW = (s·BA) ⊙ (W ≠ 0): LoRA on a pruned model that stays sparse when merged; the mask is "
                "recomputed from W, no out×in tensor is saved for backward (not the paper's adapter init: "
                "plain LoRA init)",
    )
)
