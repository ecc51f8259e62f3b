"""Natural GaLore (Das 2024, "Natural GaLore: Accelerating GaLore for memory-efficient LLM Training and
Fine-tuning", Sec. 3).

GaLore (R = PᵀG or G·Pᵀ, P refreshed every T steps, W ← W − lr·c·α·back(N)) whose low-rank gradient is
preconditioned by the inverse empirical Fisher before AdamW: g̃ = (λI + HᵀH)⁻¹g with H the last
s = ``natural_history`` low-rank gradients (g included), applied through Woodbury's identity with an
s×s Cholesky solve (the ``natural_adamw`` inner update, ``inner.py``); AdamW's moments then run on g̃.
Parameters outside the projected groups get plain AdamW, as in the official ``SubSpaceAdamW``.
Defaults follow the official scripts (s = 20, λ = 1e-3, α = 0.25, T = 200). The history is kept across
refreshes, as in the official code. State bytes per m×n matrix (right side, fp32): 4·(2·m·r + r·n + s·m·r).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ..checks import integer, number
from .projected import ProjectedOptimizer


class NaturalGaLore(ProjectedOptimizer):
    """Natural GaLore-AdamW. ``natural_history``: gradients s in the empirical Fisher;
    ``natural_damping``: its Tikhonov term λ."""

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
        natural_history: int = 20,
        natural_damping: float = 1e-3,
        reproject_moments: bool = False,
        seed: int = 0,
        **options: Any,
    ):
        integer("natural_history", natural_history, 1)
        number("natural_damping", natural_damping, 0.0, low_open=True)
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias,
            update_gap=update_gap, scale=scale, proj_side=proj_side, projector=projector,
            inner="natural_adamw", residual="none", reproject_moments=reproject_moments, seed=seed,
            natural_history=natural_history, natural_damping=natural_damping, **options,
        )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Groups without ``rank`` (embeddings, norms, biases, heads) use plain AdamW."""
        group = dict(param_group)
        if "rank" not in group:
            group.setdefault("inner", "adamw")
        super().add_param_group(group)
