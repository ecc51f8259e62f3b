"""Flora (Hao, Cao & Mou 2024, "Flora: Low-Rank Adapters Are Secretly Gradient Compressors": momentum
compression with periodic resampling), in the Adafactor form of the official PyTorch implementation.

LoRA's dynamics are a random projection of the gradient; Flora keeps the *momentum* of each projected
matrix compressed by a seeded Gaussian projection A (entries N(0, 1/r), so E[AAᵀ] = I) and resamples A
every κ = ``update_gap`` steps, so the accumulated update is high-rank while the state is r×n:

    u   = Adafactor-normalised G (factored second moment: m + n floats)
    Δ   = (1 − β₁)·u + β₁·up(C)                 (decompressed momentum, C = compressed state)
    if t mod κ = 0:  C ← down_new(up_old(C))     (momentum transferred to the new projection)
    C   ← β₁·C + (1 − β₁)·down(u)
    W   ← W − lr·clip(Δ)

up/down are back/project of a ``gaussian`` projector (left: C = AᵀG-side r×n; right: m×r); only the
int seed is stored, the matrix is regenerated bit-exactly. Groups without ``rank`` use full Adafactor
with an uncompressed first moment. State bytes per m×n matrix (right side, fp32): 4·(m·r + m + n) + seed.
Not implemented: Flora's compressed gradient *accumulation* (the paper's other use, the accelerator wrapper).
"""

from __future__ import annotations

from typing import Any

import torch

from ..checks import fraction
from .inner import adafactor_precondition, rms
from .named import ADAFACTOR_ARGS, NamedProjected


class Flora(NamedProjected):
    """Flora optimizer: Adafactor with random-projection-compressed momentum resampled every ``update_gap`` steps."""

    takes = {
        "lr": 1e-3, "beta1": 0.9, "update_gap": 1000, **ADAFACTOR_ARGS, "weight_decay": 0.0, "proj_side": "std",
        "seed": 0,
    }
    fixed = {"projector": "gaussian", "inner": "adafactor", "residual": "none"}

    def _engine_args(self, args: dict[str, Any]) -> dict[str, Any]:
        fraction("beta1", args["beta1"], allow_one=False)  # not 0: Flora compresses the momentum
        return {**args, "adafactor_eps": tuple(args["adafactor_eps"])}

    def _projected_step(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        G, b1 = p.grad, group["beta1"]
        eps1, eps2 = group["adafactor_eps"]
        proj = self._projector_for(p, group)
        if not proj.has_basis(state):
            proj.compute(G, state)
        state["step"] = t = int(state.get("step", 0)) + 1
        u = adafactor_precondition(G, state, t, group["decay_rate"], eps1)
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(proj.project(G, state))
        C = state["exp_avg"]
        up_old = proj.back(C, state)
        update = u * (1.0 - b1) + up_old * b1
        if t % int(group["update_gap"]) == 0:  # resample A and carry the momentum over
            proj.compute(G, state)
            C.copy_(proj.project(up_old, state))
            state["resamples"] = int(state.get("resamples", 0)) + 1
        C.mul_(b1).add_(proj.project(u, state), alpha=1.0 - b1)
        update.div_((rms(update) / group["clip_threshold"]).clamp_(min=1.0))
        lr = group["lr"]
        if group["scale_parameter"]:
            lr = lr * max(eps2, float(rms(p.detach().float())))
        if group["weight_decay"] > 0.0:
            p.add_(p, alpha=-group["weight_decay"] * lr)
        p.add_(update, alpha=-lr)

    def momentum(self, p: torch.Tensor) -> torch.Tensor:
        """The decompressed momentum up(C) of a projected parameter (rank ≤ r)."""
        return self.projector(p).back(self.state[p]["exp_avg"], self.state[p])
