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

from typing import Any

from ..checks import fraction
from .named import ADAFACTOR_ARGS, ADAMW_ARGS, NamedProjected


class GaLoreAdamW(NamedProjected):
    """GaLore with AdamW in the subspace (galore-torch ``GaLoreAdamW`` numerics)."""

    takes = {
        **ADAMW_ARGS, "update_gap": 200, "scale": 0.25, "proj_side": "std", "projector": "rsvd",
        "reproject_moments": False, "seed": 0,
    }
    fixed = {"residual": "none"}


class GaLoreAdamW8bit(GaLoreAdamW):
    """GaLore with 8-bit blockwise-quantized Adam moments (256-element blocks, absmax scales)."""

    def __init__(self, params, lr: float = 1e-3, eps: float = 1e-8, **kwargs: Any):
        super().__init__(params, lr=lr, eps=eps, inner="adamw8bit", **kwargs)


class GaLoreAdafactor(NamedProjected):
    """GaLore with Adafactor (factored second moment, update clipping, optional β₁) in the subspace.

    ``lr`` is explicit (no relative step); ``scale_parameter=True`` multiplies it by max(ε₂, RMS(W)).
    """

    takes = {
        "lr": 1e-3, "beta1": None, **ADAFACTOR_ARGS, "weight_decay": 0.0, "update_gap": 200, "scale": 0.25,
        "proj_side": "std", "projector": "rsvd", "seed": 0,
    }
    fixed = {"inner": "adafactor", "residual": "none"}

    def _engine_args(self, args: dict[str, Any]) -> dict[str, Any]:
        fraction("beta1", args["beta1"], allow_zero=True, allow_one=False, optional=True)
        return {**args, "adafactor_eps": tuple(args["adafactor_eps"])}
