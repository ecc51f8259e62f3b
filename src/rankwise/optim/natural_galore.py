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

from typing import Any

from ..checks import integer, number
from .named import ADAMW_ARGS, NamedProjected


class NaturalGaLore(NamedProjected):
    """Natural GaLore-AdamW. ``natural_history``: gradients s in the empirical Fisher;
    ``natural_damping``: its Tikhonov term λ."""

    takes = {
        **ADAMW_ARGS, "update_gap": 200, "scale": 0.25, "proj_side": "std", "projector": "rsvd", "natural_history": 20,
        "natural_damping": 1e-3, "reproject_moments": False, "seed": 0,
    }
    fixed = {"inner": "natural_adamw", "residual": "none"}

    def _engine_args(self, args: dict[str, Any]) -> dict[str, Any]:
        integer("natural_history", args["natural_history"], 1)
        number("natural_damping", args["natural_damping"], 0.0, low_open=True)
        return args

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Groups without ``rank`` (embeddings, norms, biases, heads) use plain AdamW."""
        group = dict(param_group)
        if "rank" not in group:
            group.setdefault("inner", "adamw")
        super().add_param_group(group)
