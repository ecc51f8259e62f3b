"""COAP (Xiao et al. 2025, "COAP: Memory-Efficient Training with Correlation-Aware Gradient Projection").

GaLore's low-rank AdamW (R = G·Pᵀ or PᵀG, moments in R's shape, W ← W − lr·c·α·back(N)) whose
projection P is kept correlated across updates instead of being recomputed from scratch: every
T_u = ``update_gap`` steps P takes one gradient step (size ``proj_lr``, gradient norm clipped to 1)
on mean((proj_P(G) − G)²)·(1 − mean cos(back(M), G)), M the first moment (Eq. 5), and every
``reproject_factor``·T_u steps it is recomputed by a one-pass randomized range finder started from the
previous P (Eq. 6): only an r×n SVD, never one of G (the ``coap`` projector, ``projectors.py``).
Defaults follow the official ``coap_torch.AdamW`` (T_u = 32, factor 5, step 0.1, α = 1, moments not
carried over at a refresh). State bytes per m×n matrix (right side, fp32): 4·(2·m·r + r·n).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ..checks import integer, number
from .projected import ProjectedOptimizer


class COAP(ProjectedOptimizer):
    """COAP-AdamW. ``reproject_factor``: recompute P every that many projection updates;
    ``proj_lr``: step size of the correlation-aware update of P."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        update_gap: int = 32,
        reproject_factor: int = 5,
        proj_lr: float = 0.1,
        scale: float = 1.0,
        proj_side: str = "std",
        reproject_moments: bool = False,
        seed: int = 0,
        **options: Any,
    ):
        integer("reproject_factor", reproject_factor, 1)
        number("proj_lr", proj_lr, 0.0, low_open=True)
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias,
            update_gap=update_gap, scale=scale, proj_side=proj_side, projector="coap",
            inner=options.pop("inner", "adamw"), residual="none", reproject_moments=reproject_moments,
            seed=seed, reproject_factor=reproject_factor, proj_lr=proj_lr, **options,
        )
