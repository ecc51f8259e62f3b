"""SVD-free DCT projection (Modoranu et al. 2025, "SVD-Free Low-Rank Adaptive Gradient Optimization
for Large Language Models", dynamic column selection).

A fixed orthonormal DCT-II basis D (N×N, N = the projected side) is built once and shared by all
layers; every T steps each layer keeps the r columns with the largest alignment ‖G·D[:, k]‖_p
(one matmul + top-k; p = ``dct_norm``, 1 in the official code) and only their int64 indices are
stored. The inner optimizer is AdamW on R = G·D[:, idx] (or D[:, idx]ᵀG), as in GaLore.
State bytes per m×n matrix (right side): 4·2·m·r + 8·r (plus one shared N×N float basis per size).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ..checks import choice
from .projected import ProjectedOptimizer


class DCTGaLore(ProjectedOptimizer):
    """GaLore-style AdamW with DCT column selection instead of SVD (no SVD call anywhere)."""

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
        dct_norm: float = 1.0,
        reproject_moments: bool = False,
        seed: int = 0,
        **options: Any,
    ):
        choice("dct_norm", dct_norm, (1, 2))
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias,
            update_gap=update_gap, scale=scale, proj_side=proj_side, projector="dct",
            inner=options.pop("inner", "adamw"), residual="none", reproject_moments=reproject_moments,
            seed=seed, dct_norm=float(dct_norm), **options,
        )
