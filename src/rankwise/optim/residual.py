"""Residual rules: what a projected optimizer does with the gradient outside the subspace, G − back(R).

Each rule performs the parameter update for one projected matrix (the engine adds weight decay
afterwards). Notation: G the full gradient, R = proj(G), N the inner direction for R, c the inner
step factor (Adam bias correction), α = ``scale``, lr the group learning rate.

* ``none`` — GaLore (Zhao et al. 2024, Alg. 2): W ← W − lr·c·α·back(N); the residual is dropped.
* ``fira`` — Fira (Chen et al. 2024, norm-based scaling + norm-growth limiter):
  W ← W − lr·c·[α·back(N) + φ ⊙ (G − back(R))] with the column-wise scaling φ = ‖N‖/‖R‖ taken over
  the projected axis (one factor per un-projected channel), and the norm-growth limiter on the
  residual term: if ‖Sₜ‖/‖Sₜ₋₁‖ > γ then Sₜ ← Sₜ·γ‖Sₜ₋₁‖/‖Sₜ‖, γ = ``limiter_gamma`` (1.01).
  (The official code subtracts α·PPᵀG; this follows the paper's G − PR; the two agree for α = 1.)
* ``sgd`` / ``sign_sgd`` — FRUGAL (Zmushko et al. 2024, gradient splitting): the subspace part as
  GaLore, and the state-free rule on the rest, W ← W − lr·α·s·(G − back(R)) or
  W ← W − lr·α·s·sign(G − back(R)), s = ``inactive_lr_scale``.
* ``apollo_channel`` / ``apollo_tensor`` — APOLLO (Zhu et al. 2024): the low-rank direction is
  only used to estimate scaling factors s = ‖N‖/‖R‖ per channel (or for the whole tensor) and the
  raw gradient is applied, W ← W − lr·c·√α·NL(G ⊙ s), NL = Fira's norm-growth limiter (on by default,
  ``limiter_gamma``), √α as in apollo-torch.
* ``sparse_code`` — GaLore+ (Liao et al. 2024, sparsely coded residuals): the subspace part as GaLore,
  plus AdamW moments of the residual Δ = G − back(R) kept on a fixed set Ω of s = ⌈ρ·m·n⌉ entries
  (ρ = ``residual_density``), the s largest of Σ|Δ| over the first ``residual_warmup`` steps:
  m_Ω ← β₁m_Ω + (1−β₁)Δ_Ω, v_Ω ← β₂v_Ω + (1−β₂)Δ_Ω², W_Ω ← W_Ω − lr·α·c_t·m_Ω/(√v_Ω + ε); until Ω is
  fixed the rule is GaLore's.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..checks import choice
from . import fused
from .projectors import Projector
from .sharding import full, is_dtensor, like, placed_like, replicated

State = dict[str, Any]


def limit_norm_growth(
    x: torch.Tensor, state: State, gamma: float | None, key: str = "limiter_norm", inplace: bool = False
) -> torch.Tensor:
    """Fira's norm-growth limiter: cap ‖xₜ‖ at γ·‖xₜ₋₁‖ (the stored, already-limited previous norm);
    ``inplace`` rescales x itself instead of a copy."""
    if not gamma:
        return x
    norm = replicated(torch.linalg.vector_norm(x))  # under FSDP2: reduced over the shards, kept replicated
    if key in state:
        limiter = torch.clamp(norm / (state[key] + 1e-8), min=gamma) / gamma
        x = x.div_(limiter) if inplace else x / limiter
        state[key] = norm / limiter
    else:
        state[key] = norm
    return x


def channel_scale(N: torch.Tensor, R: torch.Tensor, side: str, tensorwise: bool = False) -> torch.Tensor:
    """‖N‖/‖R‖ per un-projected channel (rows of G for a right projector, columns for left), or tensor-wise."""
    if tensorwise:
        return torch.linalg.vector_norm(N) / (torch.linalg.vector_norm(R) + 1e-8)
    dim = 0 if side == "left" else 1
    s = torch.linalg.vector_norm(N, dim=dim) / (torch.linalg.vector_norm(R, dim=dim) + 1e-8)
    return s.unsqueeze(0) if side == "left" else s.unsqueeze(1)


class Residual:
    name = "base"
    options: tuple[str, ...] = ()  # the group keys this rule reads besides lr and scale

    def apply(
        self, p: torch.Tensor, G: torch.Tensor, R: torch.Tensor, N: torch.Tensor,
        proj: Projector, state: State, group: dict, c: float,
    ) -> None:
        raise NotImplementedError  # pragma: no cover

    def fused_apply(
        self, p: torch.Tensor, G: torch.Tensor, R: torch.Tensor, N: torch.Tensor,
        proj: Projector, state: State, group: dict, c: float, decay: float | None,
    ) -> bool:
        """``apply`` followed by the weight decay p ← p + decay·p (when ``decay`` is given), a block of
        rows at a time (``fused.py``, bit-identical), returning True; or False, nothing done, when
        the rule or the tensors do not allow it (the engine then calls ``apply``)."""
        return False


def _dense(p: torch.Tensor, proj: Projector, state: State, *others: torch.Tensor) -> torch.Tensor | None:
    """The projector's dense P when p, P and ``others`` can be updated in row blocks, else None."""
    P = proj.dense(state)
    return P if P is not None and fused.chunkable(p, P, *others) else None


def _outside(G: torch.Tensor, R: torch.Tensor, proj: Projector, state: State) -> torch.Tensor:
    """G − back(R), the gradient outside the subspace (under FSDP2 sharded like G, never gathering G)."""
    return G - placed_like(proj.back(R, state), G)


class Drop(Residual):
    name = "none"

    def apply(self, p, G, R, N, proj, state, group, c):
        p.add_(proj.back(N, state).mul_(group["scale"]), alpha=-group["lr"] * c)

    def fused_apply(self, p, G, R, N, proj, state, group, c, decay):
        P = _dense(p, proj, state, N)
        if P is None:
            return False
        fused.back_add_(p, N, P, proj.side, group["scale"], -group["lr"] * c, decay)
        return True


class FiraResidual(Residual):
    name = "fira"
    options = ("limiter_gamma",)

    def apply(self, p, G, R, N, proj, state, group, c):
        phi = channel_scale(N, R, proj.side)
        resid = _outside(G, R, proj, state) * phi
        resid = limit_norm_growth(resid, state, group.get("limiter_gamma", 1.01))
        update = placed_like(proj.back(N, state), resid).mul_(group["scale"]).add_(resid)
        p.add_(update, alpha=-group["lr"] * c)

    def fused_apply(self, p, G, R, N, proj, state, group, c, decay):
        P = _dense(p, proj, state, G, R, N)
        if P is None:
            return False
        phi = channel_scale(N, R, proj.side)  # m×1 (right) or 1×n (left)
        resid = torch.empty_like(G)  # G − back(R), scaled, then limited: one full-size buffer
        rows = fused.rows_per_chunk(p)
        for s in range(0, p.shape[0], rows):
            e = s + rows
            block = torch.sub(G[s:e], fused.back_block(R, P, proj.side, s, e), out=resid[s:e])
            block.mul_(phi[s:e] if proj.side == "right" else phi)
        resid = limit_norm_growth(resid, state, group.get("limiter_gamma", 1.01), inplace=True)
        scale, alpha = group["scale"], -group["lr"] * c
        for s in range(0, p.shape[0], rows):
            e = s + rows
            u = fused.back_block(N, P, proj.side, s, e).mul_(scale).add_(resid[s:e])
            pc = p[s:e]
            pc.add_(u, alpha=alpha)
            if decay is not None:
                pc.add_(pc, alpha=decay)
        return True


class StateFree(Residual):
    """FRUGAL's state-free update of the complement (``sgd`` or ``sign_sgd``)."""

    options = ("inactive_lr_scale",)

    def __init__(self, name: str):
        self.name = name

    def apply(self, p, G, R, N, proj, state, group, c):
        scale = group["scale"]
        p.add_(proj.back(N, state).mul_(scale), alpha=-group["lr"] * c)
        resid = _outside(G, R, proj, state)
        if self.name == "sign_sgd":
            resid = resid.sign_()
        p.add_(resid, alpha=-group["lr"] * scale * group.get("inactive_lr_scale", 1.0))


class ApolloScaling(Residual):
    """APOLLO's channel-wise (or tensor-wise) scaling of the raw gradient."""

    options = ("limiter_gamma", "scale_front")

    def __init__(self, name: str):
        self.name = name

    def apply(self, p, G, R, N, proj, state, group, c):
        s = channel_scale(N, R, proj.side, tensorwise=self.name == "apollo_tensor")
        update = G * s
        root = math.sqrt(group["scale"])
        if group.get("scale_front", False):
            update.mul_(root)
        update = limit_norm_growth(update, state, group.get("limiter_gamma", 1.01))
        if not group.get("scale_front", False):
            update.mul_(root)
        p.add_(update, alpha=-group["lr"] * c)

    def fused_apply(self, p, G, R, N, proj, state, group, c, decay):
        if not fused.chunkable(p, G):
            return False
        front = group.get("scale_front", False)
        update = G * channel_scale(N, R, proj.side, tensorwise=self.name == "apollo_tensor")
        root = math.sqrt(group["scale"])
        if front:
            update.mul_(root)
        update = limit_norm_growth(update, state, group.get("limiter_gamma", 1.01), inplace=True)
        alpha = -group["lr"] * c
        rows = fused.rows_per_chunk(p)
        for s in range(0, p.shape[0], rows):
            e = s + rows
            u, pc = update[s:e], p[s:e]
            if not front:
                u.mul_(root)
            pc.add_(u, alpha=alpha)
            if decay is not None:
                pc.add_(pc, alpha=decay)
        return True


def sparse_code(values: torch.Tensor, index: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The dense matrix of ``shape`` holding ``values`` at the flat positions ``index``, zeros elsewhere."""
    out = torch.zeros(math.prod(shape), device=values.device, dtype=values.dtype)
    return out.index_copy_(0, index, values).view(shape)


def residual_index(resid: torch.Tensor, state: State, group: dict) -> torch.Tensor | None:
    """Ω, the flat positions of the sparse residual code: the ⌈ρ·m·n⌉ largest entries of Σ|Δ| over the
    first ``residual_warmup`` steps (None while they run); fixing Ω also creates its zero moments."""
    if "res_index" in state:
        return state["res_index"]
    score = resid.abs().float()
    state["res_score"] = score if "res_score" not in state else state["res_score"].add_(score)
    state["res_seen"] = int(state.get("res_seen", 0)) + 1
    if state["res_seen"] < int(group.get("residual_warmup", 1)):
        return None
    count = max(1, math.ceil(float(group.get("residual_density", 0.01)) * resid.numel()))
    index = torch.topk(state.pop("res_score").reshape(-1), count).indices.sort().values
    del state["res_seen"]
    state["res_index"], state["res_step"] = index, 0
    state["res_m"] = torch.zeros(count, device=resid.device, dtype=torch.float32)
    state["res_v"] = torch.zeros_like(state["res_m"])
    return index


class SparseCodedResidual(Residual):
    """GaLore+'s sparsely coded residual (see the module docstring)."""

    name = "sparse_code"
    options = ("residual_density", "residual_warmup")

    def apply(self, p, G, R, N, proj, state, group, c):
        p.add_(proj.back(N, state).mul_(group["scale"]), alpha=-group["lr"] * c)
        resid = full(_outside(G, R, proj, state))  # FSDP2: gathered, so every rank codes the same Ω
        index = residual_index(resid, state, group)
        if index is None:
            return
        d = resid.reshape(-1)[index].float()
        (b1, b2), t = group["betas"], int(state["res_step"]) + 1
        state["res_step"] = t
        m, v = state["res_m"], state["res_v"]
        m.mul_(b1).add_(d, alpha=1.0 - b1)
        v.mul_(b2).addcmul_(d, d, value=1.0 - b2)
        ct = math.sqrt(1.0 - b2**t) / (1.0 - b1**t) if group.get("correct_bias", True) else 1.0
        update = (m / (v.sqrt() + group["eps"])).to(p.dtype)
        alpha = -group["lr"] * group["scale"] * ct
        if is_dtensor(p):
            p.add_(placed_like(like(sparse_code(update, index, tuple(p.shape)), p), p), alpha=alpha)
        else:
            p.view(-1).index_add_(0, index, update, alpha=alpha)


_RULES: dict[str, Residual] = {rule.name: rule for rule in (
    Drop(), FiraResidual(), StateFree("sgd"), StateFree("sign_sgd"), ApolloScaling("apollo_channel"),
    ApolloScaling("apollo_tensor"), SparseCodedResidual(),
)}
#: The residual-rule names.
RESIDUALS = tuple(_RULES)
#: Every option some residual rule reads.
RESIDUAL_OPTIONS = tuple(sorted({o for rule in _RULES.values() for o in rule.options}))


def get_residual(name: str) -> Residual:
    """The residual rule ``name`` (one of ``RESIDUALS``)."""
    return _RULES[choice("residual", name, RESIDUALS)]
