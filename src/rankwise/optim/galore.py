"""GaLore (Zhao et al. 2024, "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection").

For each projected W ∈ R^{m×n} (Alg. 2 "Adam with GaLore"): every T steps P ← top-r singular vectors
of G (left U[:, :r] or right Vh[:r] per ``proj_side``), R = PᵀG (or G·Pᵀ), the optimizer runs on R, and
W ← W − lr·α·P·N(R). Optimizer state is r×n (or m×r) per matrix plus P. The singular vectors come from
the warm-started randomized range finder by default (``projector="rsvd"``: one power round from the
previous basis, ≥ 0.99 of the exact top-r energy, ``state["proj_energy"]`` records it);
``projector="svd"`` is the exact SVD, galore-torch's numerics.
State bytes per m×n matrix (right side, fp32): AdamW 4·(2·m·r + r·n); 8-bit 2·m·r + 8·⌈m·r/256⌉ + 4·r·n;
Adafactor 4·(m + r + r·n) (+4·m·r with β₁).

``GaLoreAdamW``, ``GaLoreAdafactor`` and ``GaLoreAdamW8bit`` mirror galore-torch's three optimizers;
defaults follow the paper (α = 0.25, T = 200). Non-2-D parameters in a projected group raise ValueError.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ..checks import fraction
from .projected import ProjectedOptimizer


class GaLoreAdamW(ProjectedOptimizer):
    """GaLore with AdamW in the subspace (galore-torch ``GaLoreAdamW`` numerics)."""

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
        reproject_moments: bool = False,
        seed: int = 0,
        **options: Any,
    ):
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias,
            update_gap=update_gap, scale=scale, proj_side=proj_side, projector=projector,
            inner=options.pop("inner", "adamw"), residual="none", reproject_moments=reproject_moments,
            seed=seed, **options,
        )


class GaLoreAdamW8bit(GaLoreAdamW):
    """GaLore with 8-bit blockwise-quantized Adam moments (256-element blocks, absmax scales)."""

    def __init__(self, params, lr: float = 1e-3, eps: float = 1e-8, **kwargs: Any):
        super().__init__(params, lr=lr, eps=eps, inner="adamw8bit", **kwargs)


class GaLoreAdafactor(ProjectedOptimizer):
    """GaLore with Adafactor (factored second moment, update clipping, optional β₁) in the subspace.

    ``lr`` is explicit (no relative step); ``scale_parameter=True`` multiplies it by max(ε₂, RMS(W)).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        beta1: float | None = None,
        decay_rate: float = -0.8,
        clip_threshold: float = 1.0,
        adafactor_eps: tuple[float, float] = (1e-30, 1e-3),
        scale_parameter: bool = False,
        weight_decay: float = 0.0,
        update_gap: int = 200,
        scale: float = 0.25,
        proj_side: str = "std",
        projector: str = "rsvd",
        seed: int = 0,
        **options: Any,
    ):
        fraction("beta1", beta1, allow_zero=True, allow_one=False, optional=True)
        super().__init__(
            params, lr=lr, weight_decay=weight_decay, update_gap=update_gap, scale=scale, proj_side=proj_side,
            projector=projector, inner="adafactor", residual="none", seed=seed, beta1=beta1,
            decay_rate=decay_rate, clip_threshold=clip_threshold, adafactor_eps=tuple(adafactor_eps),
            scale_parameter=scale_parameter, **options,
        )
