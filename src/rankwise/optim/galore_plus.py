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

from typing import Any

from ..checks import fraction, integer
from .named import ADAMW_ARGS, NamedProjected
from .projectors import head_blocks, resolve_side


class GaLorePlus(NamedProjected):
    """GaLore+-AdamW. ``head_dim``: head width of the attention weights in the group (None: no
    cross-head sharing); ``residual_density``: share ρ of a matrix's entries in the sparse residual code;
    ``residual_warmup``: steps whose residuals choose the coded entries."""

    takes = {
        **ADAMW_ARGS, "update_gap": 200, "scale": 0.25, "proj_side": "std", "head_dim": None,
        "residual_density": 0.01, "residual_warmup": 10, "reproject_moments": False, "seed": 0,
    }
    fixed = {"projector": "cross_head", "residual": "sparse_code"}

    def _engine_args(self, args: dict[str, Any]) -> dict[str, Any]:
        fraction("residual_density", args["residual_density"], allow_one=True, what="in (0, 1]")
        integer("residual_warmup", args["residual_warmup"], 1)
        return args

    def _validate_group(self, group: dict[str, Any]) -> None:
        """The engine's checks, then ``head_dim`` against every weight of a projected group."""
        super()._validate_group(group)
        if "rank" in group and group.get("head_dim") is not None:
            head_dim = integer("head_dim", group["head_dim"], 1)
            for p in group["params"]:
                head_blocks(tuple(p.shape), resolve_side(group["proj_side"], p.shape), int(group["rank"]), head_dim)
