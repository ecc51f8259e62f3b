"""GradNormLoRP (Huang et al. 2024, "Gradient Weight-normalized Low-rank Projection for Efficient LLM
Training"; official code ``LowRankWeightNormAdamW``).

Each projected weight is re-parameterised by weight normalisation (Salimans & Kingma 2016),
W = g ⊙ V/‖V‖_c, with the magnitude g holding the norm of every output unit's weight vector (the
paper's column norm ‖·‖_c; a row of torch's (out, in) layout). The gradients of the two factors are
(Salimans & Kingma Eq. 3, with the representative ‖V‖_c = 1 kept after every step)
∇g = ⟨∇W, V⟩_row,  ∇V = g ⊙ (∇W − ∇g ⊙ V)  (the direction gradient is orthogonal to V, which is the
better-conditioned gradient the paper relies on). ∇V is then optimized GaLore-style: projected on a
rank-r subspace refreshed every T steps, AdamW (or 8-bit AdamW) in the subspace, projected back; so the
accumulated direction update between refreshes is the low-rank product W₀ + I·J of the paper with
I = P. The magnitude has its own (small) AdamW. After each step the weight is folded back,
W ← g ⊙ V/‖V‖_c, so the model keeps a plain dense ``nn.Linear`` (same inference graph, no extra cost).
Weight decay is applied to g (equivalent to decaying W, which is g-homogeneous).
State bytes per m×n matrix (right side, fp32): 4·(2·m·r + r·n) + 4·3·m.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..checks import choice
from .inner import get_inner
from .named import ADAMW_ARGS, NamedProjected


def weight_norm_grads(V: torch.Tensor, g: torch.Tensor, grad_W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(∇g, ∇V) of W = g ⊙ V/‖V‖_row at a row-normalised V (‖Vᵢ‖ = 1): Salimans & Kingma 2016, Eq. 3.

    ∇gᵢ = ⟨∇Wᵢ, Vᵢ⟩ and ∇Vᵢ = gᵢ·(∇Wᵢ − ∇gᵢ·Vᵢ) (orthogonal to Vᵢ).
    """
    grad_g = (grad_W * V).sum(dim=1)
    return grad_g, g.unsqueeze(1) * (grad_W - grad_g.unsqueeze(1) * V)


class GradNormLoRP(NamedProjected):
    """Weight-normalised low-rank projected AdamW (``inner='adamw8bit'`` is the 8-bit variant)."""

    takes = {
        **ADAMW_ARGS, "update_gap": 200, "scale": 1.0, "proj_side": "std", "projector": "rsvd", "inner": "adamw",
        "seed": 0,
    }
    fixed = {"residual": "none"}

    def _engine_args(self, args: dict[str, Any]) -> dict[str, Any]:
        choice("inner", args["inner"], ("adamw", "adamw8bit"))
        return args

    def _projected_step(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        lr, (b1, b2) = group["lr"], group["betas"]
        W = p.detach()
        if "magnitude" not in state:
            state["magnitude"] = torch.linalg.vector_norm(W.float(), dim=1).to(W.dtype)
            state["mag_exp_avg"] = torch.zeros_like(state["magnitude"])
            state["mag_exp_avg_sq"] = torch.zeros_like(state["magnitude"])
        g = state["magnitude"]
        V = W / torch.linalg.vector_norm(W, dim=1, keepdim=True).clamp_min(1e-12)
        grad_g, grad_V = weight_norm_grads(V, g, p.grad)

        # direction: GaLore-projected inner optimizer
        step = int(state.get("step", 0))
        proj = self._projector_for(p, group)
        if self._refresh_due(proj, group, state, step):
            self._refresh(p, grad_V, group, state, proj)
        R = proj.project(grad_V, state)
        N, c = get_inner(group["inner"]).update(R, state, group, p)
        state["step"] = t = step + 1
        V = V.add_(proj.back(N, state).mul_(group["scale"]), alpha=-lr * c)

        # magnitude: plain AdamW (same numerics as the inner AdamW)
        m, v = state["mag_exp_avg"], state["mag_exp_avg_sq"]
        m.mul_(b1).add_(grad_g, alpha=1.0 - b1)
        v.mul_(b2).addcmul_(grad_g, grad_g, value=1.0 - b2)
        c_g = math.sqrt(1.0 - b2**t) / (1.0 - b1**t) if group["correct_bias"] else 1.0
        g.addcdiv_(m, v.sqrt().add_(group["eps"]), value=-lr * c_g)
        if group["weight_decay"] > 0.0:
            g.mul_(1.0 - lr * group["weight_decay"])

        # fold back: W = g ⊙ V/‖V‖
        V.div_(torch.linalg.vector_norm(V, dim=1, keepdim=True).clamp_min(1e-12))
        p.copy_(g.unsqueeze(1) * V)

    def magnitude(self, p: torch.Tensor) -> torch.Tensor:
        """The magnitude vector g of parameter ``p`` (row norms of the folded weight)."""
        return self.state[p]["magnitude"]
