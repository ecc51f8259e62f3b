"""Fira (Chen et al. 2024, "Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank Constraint?").

GaLore's low-rank Adam on R = PᵀG plus the full-rank residual, scaled column-wise:
W ← W − lr·c·[α·P·N + φ ⊙ (G − P·R)], φⱼ = ‖Nⱼ‖/‖Rⱼ‖ per un-projected channel (the paper's norm-based scaling), with the
norm-growth limiter on the residual term: if ‖Sₜ‖ > γ‖Sₜ₋₁‖ it is rescaled to γ‖Sₜ₋₁‖ (γ = 1.01).
The update is full rank while the state stays r×n (+ one scalar for the limiter).
State bytes per m×n matrix (right side, fp32): 4·(2·m·r + r·n) + 4.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ..checks import number
from .projected import ProjectedOptimizer


class Fira(ProjectedOptimizer):
    """Fira-AdamW. ``limiter_gamma`` = γ of the norm-growth limiter (None disables it)."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        update_gap: int = 200,
        scale: float = 0.25,
        proj_side: str = "std",
        projector: str = "rsvd",
        limiter_gamma: float | None = 1.01,
        reproject_moments: bool = False,
        seed: int = 0,
        **options: Any,
    ):
        number("limiter_gamma", limiter_gamma, 1.0, optional=True)
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias,
            update_gap=update_gap, scale=scale, proj_side=proj_side, projector=projector,
            inner=options.pop("inner", "adamw"), residual="fira", reproject_moments=reproject_moments,
            seed=seed, limiter_gamma=limiter_gamma, **options,
        )
