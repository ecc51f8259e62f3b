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

from typing import Any

from ..checks import integer, number
from .named import ADAMW_ARGS, NamedProjected


class COAP(NamedProjected):
    """COAP-AdamW. ``reproject_factor``: recompute P every that many projection updates;
    ``proj_lr``: step size of the correlation-aware update of P."""

    takes = {
        **ADAMW_ARGS, "update_gap": 32, "reproject_factor": 5, "proj_lr": 0.1, "scale": 1.0, "proj_side": "std",
        "reproject_moments": False, "seed": 0,
    }
    fixed = {"projector": "coap", "residual": "none"}

    def _engine_args(self, args: dict[str, Any]) -> dict[str, Any]:
        integer("reproject_factor", args["reproject_factor"], 1)
        number("proj_lr", args["proj_lr"], 0.0, low_open=True)
        return args
