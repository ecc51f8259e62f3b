"""Online Subspace Descent (Liang et al. 2024, "Memory-Efficient LLM Training with Online Subspace Descent").

GaLore-style projected optimizer (AdamW or Lion in the subspace) whose projection P is never
recomputed by SVD: after every step P takes one AdamW step on the online-PCA objective
‖Ĝ − proj_P(Ĝ)‖²_F, Ĝ = G/‖G‖, with step size ``proj_lr`` (default 1/update_gap, as
the official code). P starts from a seeded random orthonormal matrix (QR, no SVD); ``osd_init='svd'``
starts from the first gradient's SVD like the official code.
State bytes per m×n matrix (right side, fp32): 4·(2·m·r + 3·r·n) (Adam moments of R, P and P's moments).
"""

from __future__ import annotations

from typing import Any

from ..checks import choice, number
from .named import ADAMW_ARGS, NamedProjected


class OnlineSubspaceDescent(NamedProjected):
    """OSD with ``inner='adamw'`` (default) or ``'lion'`` (betas default to (0.9, 0.99) for Lion)."""

    takes = {
        **ADAMW_ARGS, "betas": None, "update_gap": 200, "scale": 0.25, "proj_side": "std", "inner": "adamw",
        "proj_lr": None, "proj_weight_decay": 0.01, "osd_init": "random", "seed": 0,
    }
    fixed = {"projector": "online", "residual": "none"}

    def _engine_args(self, args: dict[str, Any]) -> dict[str, Any]:
        proj_lr = args.pop("proj_lr")
        choice("inner", args["inner"], ("adamw", "lion"))
        choice("osd_init", args["osd_init"], ("random", "svd"))
        number("proj_lr", proj_lr, 0.0, low_open=True, optional=True)
        if args["betas"] is None:
            args["betas"] = (0.9, 0.99) if args["inner"] == "lion" else (0.9, 0.999)
        return args if proj_lr is None else {**args, "proj_lr": float(proj_lr)}
