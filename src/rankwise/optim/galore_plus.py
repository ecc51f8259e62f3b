"""GaLore+ (Liao et al. 2024, "GaLore+: Boosting Low-Rank Adaptation for LLMs with Cross-Head Projection").

GaLore's low-rank AdamW (R = G·Pᵀ or PᵀG, moments in R's shape, W ← W − lr·c·α·back(N)) with
(1) cross-head projection: for an attention weight whose heads lie on the un-projected side
(``head_dim`` set on its group), one basis P, found from a single randomly drawn head's gradient
block, projects every head (the ``cross_head`` projector, ``projectors.py``); (2) the basis from
randomized subspace iteration (warm-started range finder with power iterations and a Rayleigh-Ritz
step), never a full SVD; (3) sparsely coded residuals: AdamW moments of G − back(R) on a fixed set of
⌈ρ·m·n⌉ entries chosen over a warm-up, whose update corrects the low-rank one (the ``sparse_code``
residual rule, ``residual.py``). Groups without ``head_dim`` use (2) and (3) on the whole G; groups
without ``rank`` get plain AdamW. State bytes per m×n matrix (right side, fp32): 4·(2·m·r + r·n) +
16·s (s indices (int64) and two moments), plus a transient m×n score during the warm-up.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ..checks import fraction, integer
from .projected import ProjectedOptimizer
from .projectors import head_blocks, resolve_side


class GaLorePlus(ProjectedOptimizer):
    """GaLore+-AdamW. ``head_dim``: head width of the attention weights in the group (None: no
    cross-head sharing); ``residual_density``: share ρ of a matrix's entries in the sparse residual code;
    ``residual_warmup``: steps whose residuals choose the coded entries."""

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
        head_dim: int | None = None,
        residual_density: float = 0.01,
        residual_warmup: int = 10,
        reproject_moments: bool = False,
        seed: int = 0,
        **options: Any,
    ):
        fraction("residual_density", residual_density, allow_one=True, what="in (0, 1]")
        integer("residual_warmup", residual_warmup, 1)
        super().__init__(
            params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias,
            update_gap=update_gap, scale=scale, proj_side=proj_side, projector="cross_head",
            inner=options.pop("inner", "adamw"), residual="sparse_code", reproject_moments=reproject_moments,
            seed=seed, head_dim=head_dim, residual_density=residual_density, residual_warmup=residual_warmup,
            **options,
        )

    def _validate_group(self, group: dict[str, Any]) -> None:
        """The engine's checks, then ``head_dim`` against every weight of a projected group."""
        super()._validate_group(group)
        if "rank" in group and group.get("head_dim") is not None:
            head_dim = integer("head_dim", group["head_dim"], 1)
            for p in group["params"]:
                head_blocks(tuple(p.shape), resolve_side(group["proj_side"], p.shape), int(group["rank"]), head_dim)
