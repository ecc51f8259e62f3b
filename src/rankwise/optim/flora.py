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

from collections.abc import Iterable
from typing import Any

import torch

from ..checks import fraction
from .inner import adafactor_precondition, rms
from .projected import ProjectedOptimizer


class Flora(ProjectedOptimizer):
    """Flora optimizer: Adafactor with random-projection-compressed momentum resampled every ``update_gap`` steps."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        beta1: float = 0.9,
        update_gap: int = 1000,
        decay_rate: float = -0.8,
        clip_threshold: float = 1.0,
        adafactor_eps: tuple[float, float] = (1e-30, 1e-3),
        scale_parameter: bool = False,
        weight_decay: float = 0.0,
        proj_side: str = "std",
        seed: int = 0,
        **options: Any,
    ):
        fraction("beta1", beta1, allow_one=False)  # not 0: Flora compresses the momentum
        super().__init__(
            params, lr=lr, weight_decay=weight_decay, update_gap=update_gap, proj_side=proj_side,
            projector="gaussian", inner="adafactor", residual="none", seed=seed, beta1=beta1,
            decay_rate=decay_rate, clip_threshold=clip_threshold, adafactor_eps=tuple(adafactor_eps),
            scale_parameter=scale_parameter, **options,
        )

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
