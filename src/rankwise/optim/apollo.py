"""APOLLO and APOLLO-Mini (Zhu et al. 2024, "APOLLO: SGD-like Memory, AdamW-level Performance").

Per projected W ∈ R^{m×n}: a random projection P with N(0, 1/r) entries, regenerated from a seed every
T steps (no SVD), gives R = PᵀG (or G·Pᵀ); AdamW moments are kept only for R and yield N. The
channel-wise scaling factors sⱼ = ‖Nⱼ‖/‖Rⱼ‖ (one per un-projected channel; or one for the whole
tensor) are applied to the *raw* gradient: W ← W − lr·c·√α·NL(G ⊙ s), NL = Fira's norm-growth
limiter (γ = 1.01). APOLLO-Mini: rank 1 with tensor-wise scaling (and α = 128 by default).

Seeds and RNG use follow apollo-torch so that results match it: parameter k (counted from 1 over all
groups) starts its seed chain at ``seed + k`` (``seed=0`` default), the matrix for seed s is
``randn(shape, generator=Generator(device).manual_seed(s)) / √r`` and each refresh advances the chain
with ``advance_seed``. The scale α enters as √α, as in apollo-torch.
State bytes per m×n matrix (right side, fp32): 4·2·m·r + 4 (limiter) + the int seed.
"""

from __future__ import annotations

from typing import Any

from ..checks import choice
from .named import ADAMW_ARGS, NamedProjected

_PROJ_ALIASES = {"random": "gaussian", "svd": "svd", "gaussian": "gaussian"}
SCALE_TYPES = ("channel", "tensor")


class APOLLO(NamedProjected):
    """APOLLO-AdamW. ``scale_type``: ``'channel'`` (default) or ``'tensor'``; ``limiter_gamma=None`` disables NL.

    Group keys of apollo-torch are accepted too: ``proj`` ('random' | 'svd'), ``scale_type``,
    ``update_proj_gap``, ``proj_type``.
    """

    _forced_rank: int | None = None
    takes = {
        **ADAMW_ARGS, "update_gap": 200, "scale": 1.0, "proj_side": "std", "scale_type": "channel",
        "projector": "gaussian", "limiter_gamma": 1.01, "scale_front": False, "seed": 0,
    }

    def _engine_args(self, args: dict[str, Any]) -> dict[str, Any]:
        scale_type = choice("scale_type", args.pop("scale_type"), SCALE_TYPES)
        return {**args, "projector": _PROJ_ALIASES.get(args["projector"], args["projector"]),
                "residual": f"apollo_{scale_type}"}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group = dict(param_group)
        if "proj" in group:
            group["projector"] = _PROJ_ALIASES[choice("proj", group.pop("proj"), _PROJ_ALIASES)]
        if "scale_type" in group:
            group["residual"] = f"apollo_{choice('scale_type', group.pop('scale_type'), SCALE_TYPES)}"
        if self._forced_rank is not None and "rank" in group:
            group["rank"] = self._forced_rank
        super().add_param_group(group)


class APOLLOMini(APOLLO):
    """APOLLO-Mini: rank 1 (forced on every projected group), tensor-wise scaling, α = 128."""

    _forced_rank = 1

    def __init__(self, params, lr: float = 1e-3, scale: float = 128.0, **kwargs: Any):
        if kwargs.pop("scale_type", "tensor") != "tensor":
            raise ValueError("APOLLOMini always uses scale_type='tensor'; use APOLLO for channel-wise scaling")
        super().__init__(params, lr=lr, scale=scale, scale_type="tensor", **kwargs)
