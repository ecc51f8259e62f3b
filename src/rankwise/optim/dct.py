"""SVD-free DCT projection (Modoranu et al. 2025, "SVD-Free Low-Rank Adaptive Gradient Optimization
for Large Language Models", dynamic column selection).

A fixed orthonormal DCT-II basis D (N×N, N = the projected side) is built once and shared by all
layers; every T steps each layer keeps the r columns with the largest alignment ‖G·D[:, k]‖_p
(one matmul + top-k; p = ``dct_norm``, 1 in the official code) and only their int64 indices are
stored. The inner optimizer is AdamW on R = G·D[:, idx] (or D[:, idx]ᵀG), as in GaLore.
State bytes per m×n matrix (right side): 4·2·m·r + 8·r (plus one shared N×N float basis per size).
"""

from __future__ import annotations

from typing import Any

from ..checks import choice
from .named import ADAMW_ARGS, NamedProjected


class DCTGaLore(NamedProjected):
    """GaLore-style AdamW with DCT column selection instead of SVD (no SVD call anywhere)."""

    takes = {
        **ADAMW_ARGS, "update_gap": 200, "scale": 0.25, "proj_side": "std", "dct_norm": 1.0,
        "reproject_moments": False, "seed": 0,
    }
    fixed = {"projector": "dct", "residual": "none"}

    def _engine_args(self, args: dict[str, Any]) -> dict[str, Any]:
        choice("dct_norm", args["dct_norm"], (1, 2))
        return {**args, "dct_norm": float(args["dct_norm"])}
