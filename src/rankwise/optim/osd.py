"""Online Subspace Descent (Liang et al. 2024, "Memory-Efficient LLM Training with Online Subspace Descent").

GaLore-style projected optimizer (AdamW or Lion in the subspace) whose projection P is never
recomputed by SVD: after every step P takes one AdamW step on the online-PCA objective
‖Ĝ − proj_P(Ĝ)‖²_F, Ĝ = G/‖G‖, with step size ``proj_lr`` (default 1/update_gap, as
the official code). P starts from a seeded random orthonormal matrix (QR, no SVD); ``osd_init='svd'``
starts from the first gradient's SVD like the official code.
State bytes per m×n matrix (right side, fp32): 4·(2·m·r + 3·r·n) (Adam moments of R, P and P's moments).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ..checks import choice, number
from .projected import ProjectedOptimizer


class OnlineSubspaceDescent(ProjectedOptimizer):
    """OSD with ``inner='adamw'`` (default) or ``'lion'`` (betas default to (0.9, 0.99) for Lion)."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] | None = None,
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        update_gap: int = 200,
        scale: float = 0.25,
        proj_side: str = "std",
        inner: str = "adamw",
        proj_lr: float | None = None,
        proj_weight_decay: float = 0.01,
        osd_init: str = "random",
        seed: int = 0,
        **options: Any,
    ):
        choice("inner", inner, ("adamw", "lion"))
        choice("osd_init", osd_init, ("random", "svd"))
        number("proj_lr", proj_lr, 0.0, low_open=True, optional=True)
        if betas is None:
            betas = (0.9, 0.99) if inner == "lion" else (0.9, 0.999)
        extra = {} if proj_lr is None else {"proj_lr": float(proj_lr)}
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias,
            update_gap=update_gap, scale=scale, proj_side=proj_side, projector="online", inner=inner,
            residual="none", seed=seed, proj_weight_decay=proj_weight_decay, osd_init=osd_init,
            **extra, **options,
        )
