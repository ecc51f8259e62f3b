"""Fira (Chen et al. 2024, "Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank Constraint?").

GaLore's low-rank Adam on R = PᵀG plus the full-rank residual, scaled column-wise:
W ← W − lr·c·[α·P·N + φ ⊙ (G − P·R)], φⱼ = ‖Nⱼ‖/‖Rⱼ‖ per un-projected channel (the paper's norm-based scaling), with the
norm-growth limiter on the residual term: if ‖Sₜ‖ > γ‖Sₜ₋₁‖ it is rescaled to γ‖Sₜ₋₁‖ (γ = 1.01).
The update is full rank while the state stays r×n (+ one scalar for the limiter).
State bytes per m×n matrix (right side, fp32): 4·(2·m·r + r·n) + 4.
"""

from __future__ import annotations

from typing import Any

from ..checks import number
from .named import ADAMW_ARGS, NamedProjected


class Fira(NamedProjected):
    """Fira-AdamW. ``limiter_gamma`` = γ of the norm-growth limiter (None disables it)."""

    takes = {
        **ADAMW_ARGS, "update_gap": 200, "scale": 0.25, "proj_side": "std", "projector": "rsvd", "limiter_gamma": 1.01,
        "reproject_moments": False, "seed": 0,
    }
    fixed = {"residual": "fira"}

    def _engine_args(self, args: dict[str, Any]) -> dict[str, Any]:
        number("limiter_gamma", args["limiter_gamma"], 1.0, optional=True)
        return args
