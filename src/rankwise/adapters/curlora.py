"""CURLoRA (Fawi 2024, "CURLoRA: Stable LLM Continual Fine-Tuning and Catastrophic Forgetting
Mitigation").

A CUR decomposition of W₀ (d × k) with inverted sampling probabilities (paper Sec. 3):

    p_j = ‖W₀[:, j]‖² / ‖W₀‖²_F,    p̃_j = (1/p_j) / Σₘ (1/p_m)         (rows alike)
    ΔW = α · C U R,    C = W₀[:, J] (d × r),  R = W₀[I, :] (r × k),  U (r × r) = 0 at init

r column indices J and r row indices I are drawn with replacement from p̃ (columns first) with the
per-layer generator (``seed`` and the layer name), so low-norm columns and rows are picked more
often; C and R are frozen and rebuilt from W₀ on load, only U is trained. ``eps`` > 0 uses
1/(p_j + eps) instead of 1/p_j (the authors' code adds 0.001). ΔW is the rank-r product (C U)·R
(PEFT LoRA export, B′ = C·U, A′ = R).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..checks import non_negative, positive
from ..rng import layer_generator
from .base import AdapterConfig, AdapterLayer
from .init import InitContext
from .registry import MethodSpec, register


@dataclass
class CURLoRAConfig(AdapterConfig):
    """CURLoRA hyper-parameters: ``r`` columns and rows of W₀, ``alpha`` the scale of ΔW = α·CUR
    (the authors' code uses 1), ``eps`` added to each probability before it is inverted."""

    alpha: float = 1.0
    eps: float = 0.0

    def validate(self) -> None:
        super().validate()
        positive("alpha", self.alpha)
        non_negative("eps", self.eps)


def inverted_probabilities(weight: torch.Tensor, dim: int, eps: float = 0.0) -> torch.Tensor:
    """p̃ ∝ 1/(p + eps) with p the squared norms of W's columns (``dim=0``) or rows (``dim=1``) over
    ‖W‖²_F (fp64; a zero column gets the largest finite weight instead of 1/0)."""
    sq = weight.double().pow(2)
    p = sq.sum(dim=dim) / sq.sum()
    p = p + eps if eps > 0 else p.clamp_min(torch.finfo(torch.float64).tiny)
    inv = 1.0 / p
    inv = inv.clamp_max(torch.finfo(torch.float64).max / inv.numel())
    return inv / inv.sum()


def cur_indices(
    weight: torch.Tensor, r: int, generator: torch.Generator, eps: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(column indices J, row indices I), r each, drawn with replacement from the inverted probabilities."""
    cols = torch.multinomial(inverted_probabilities(weight, 0, eps).cpu(), r, replacement=True, generator=generator)
    rows = torch.multinomial(inverted_probabilities(weight, 1, eps).cpu(), r, replacement=True, generator=generator)
    return cols, rows


class CURLoRALayer(AdapterLayer):
    """Trainable ``cur_U`` (r × r), zero at init; frozen ``cur_C`` (d × r) and ``cur_R`` (r × k) from W₀."""

    method = "curlora"

    def __init__(self, base_layer: nn.Module, config: CURLoRAConfig, ctx: InitContext) -> None:
        super().__init__(base_layer, config)
        w = self.base_weight.detach()
        if w.is_meta:  # rw.plan builds on the meta device: no values to draw from, and the shapes do not need them
            cols = rows = torch.zeros(config.r, dtype=torch.long)
        else:
            cols, rows = cur_indices(w, config.r, layer_generator(config.seed, ctx.name), config.eps)
        dtype = self.adapter_dtype
        self.register_buffer("cur_C", w[:, cols.to(w.device)].to(dtype).contiguous(), persistent=False)
        self.register_buffer("cur_R", w[rows.to(w.device), :].to(dtype).contiguous(), persistent=False)
        self.cur_U = nn.Parameter(torch.zeros(config.r, config.r, dtype=dtype, device=w.device))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self.cur_C @ self.cur_U, self.cur_R, float(self.config.alpha)

    def delta_weight(self) -> torch.Tensor:
        return (self.cur_C @ self.cur_U @ self.cur_R) * float(self.config.alpha)

    def trainable_count(self) -> int:
        return self.config.r * self.config.r

    def extra_repr(self) -> str:
        return super().extra_repr() + f", alpha={self.config.alpha:g}, eps={self.config.eps:g}"


register(
    MethodSpec(
        "curlora",
        "adapter",
        "Fawi 2024, CURLoRA: Stable LLM Continual Fine-Tuning and Catastrophic Forgetting Mitigation",
        CURLoRAConfig,
        CURLoRALayer,
        summary="ΔW = α·C U R: C, R columns / rows of W₀ drawn with inverted norm probabilities (frozen), "
                "only U (r × r, 0 at init) trained",
    )
)
