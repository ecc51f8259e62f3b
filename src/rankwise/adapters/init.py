"""Initializations of LoRA-shaped factors: pure functions of the weight (and, for data-driven
inits, of an estimated full gradient).

Each init is ``fn(weight, r, scale, ctx) -> (B, A)`` with ``weight`` the fp32 W₀ (out × in).
``moves_base=True`` means the init takes s·B·A out of the frozen base (W_base = W₀ − s·B·A) so that
the adapted model starts equal to the base model. ``ctx.config`` is the layer's config (None when
an init is called by hand): inits read their own options from it (``init_iters``, ``stable_gamma``).

Registered here: ``pissa`` (Meng et al. 2024), ``olora`` (Büyükakyüz 2024), ``lora_ga`` (Wang et
al. 2024). Their truncated SVDs come from :mod:`rankwise.linalg`; the LDU decomposition, which the
core-matrix methods in ``core.py`` use, is a plain function here too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..linalg import truncated_svd
from ..rng import layer_generator


@dataclass
class InitContext:
    """What an init may need beyond the weight: the layer name, an estimated gradient, a generator,
    and the layer's config (set by ``adapt``; None when an init is called directly)."""

    name: str = ""
    grad: torch.Tensor | None = None
    skip: bool = False  # build shapes only (tensors come from a checkpoint)
    generator: torch.Generator | None = None
    extra: dict = field(default_factory=dict)
    config: Any = None


@dataclass(frozen=True)
class Init:
    fn: Callable[[torch.Tensor, int, float, InitContext], tuple[torch.Tensor, torch.Tensor]] | None
    moves_base: bool
    needs_grad: bool = False


# ---------------------------------------------------------------------- shared helpers
def context_generator(ctx: InitContext) -> torch.Generator:
    """``ctx.generator``, else a generator seeded from the config's seed and the layer name."""
    if ctx.generator is not None:
        return ctx.generator
    return layer_generator(int(getattr(ctx.config, "seed", 0)), ctx.name)


def ldu(w: torch.Tensor, r: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """LDU with partial pivoting: W = P·L·diag(d)·U, L unit lower-trapezoidal (out × k), U unit
    upper-trapezoidal (k × in), k = min(out, in). Returns ``(row_perm, L[:, :r], d[:r], U[:r])``
    (all k when ``r`` is None) with ``P·M == M[row_perm]``, the row permutation as indices."""
    p, lower, upper = torch.linalg.lu(w)
    k = lower.shape[1] if r is None else r
    d = torch.diagonal(upper)[:k].clone()
    if bool((d == 0).any()):
        raise ValueError(
            f"the weight has a zero LU pivot among its first {k}: its LDU factors are undefined there; "
            "choose a smaller r"
        )
    return p.argmax(dim=1), lower[:, :k], d, upper[:k] / d[:, None]


# ---------------------------------------------------------------------- LoRA-shaped inits
def pissa_init(weight: torch.Tensor, r: int, scale: float, ctx: InitContext) -> tuple[torch.Tensor, torch.Tensor]:
    """PiSSA (Meng et al. 2024, arXiv 2404.02948, Sec. 3): W₀ = U S Vᵀ; B = U_r (S_r/s)^{1/2},
    A = (S_r/s)^{1/2} V_rᵀ so s·B·A = U_r S_r V_rᵀ (the principal part); W_res = W₀ − s·B·A.
    Same factors as PEFT's ``pissa_init``; ``init_iters=k`` uses a randomized SVD (Sec. 4.4)."""
    iters = int(getattr(ctx.config, "init_iters", 0))
    u, s, vh = truncated_svd(weight, r, iters, context_generator(ctx) if iters else None)
    root = torch.sqrt(s / scale)
    return u * root, root[:, None] * vh


def olora_init(weight: torch.Tensor, r: int, scale: float, ctx: InitContext) -> tuple[torch.Tensor, torch.Tensor]:
    """OLoRA (Büyükakyüz 2024, arXiv 2406.01775, Sec. 3): W₀ = QR (reduced QR of the out × in
    weight); B = Q[:, :r] (orthonormal columns, BᵀB = I_r), A = R[:r, :]; W_base = W₀ − s·B·A.
    As PEFT's ``olora_init``: no division by the scale."""
    q, rr = torch.linalg.qr(weight)
    return q[:, :r], rr[:r, :]


def lora_ga_init(weight: torch.Tensor, r: int, scale: float, ctx: InitContext) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-GA (Wang et al. 2024, arXiv 2407.05000, Sec. 3.2 Thm 3.1 and Sec. 3.3 Thm 3.2): from
    the SVD G = U S Vᵀ of the estimated full gradient, A₀ = ζ·V[:, :r]ᵀ, B₀ = ζ·U[:, r:2r] with the
    stable scale ζ = d_out^{1/4}/√γ; W_base = W₀ − s·B₀A₀. Then the first LoRA step
    s(B₀ g_A + g_B A₀) = s²ζ² · (best rank-2r approximation of G). This is the paper's rule and the
    official code's default (direction "ArB2r", scale "stable"); PEFT 0.21.2's ``lora_ga`` differs
    (it folds S into B and scales only B), so there is no PEFT parity for this init."""
    if ctx.grad is None:
        raise ValueError("init='lora_ga' needs the estimated gradient (pass init_data to rw.adapt)")
    out_features, in_features = weight.shape
    if 2 * r > min(out_features, in_features):
        raise ValueError(
            f"r={r} is too large for LoRA-GA on '{ctx.name}' ({out_features}x{in_features}): "
            f"it uses 2r singular vectors; choose r <= {min(out_features, in_features) // 2}"
        )
    gamma = float(getattr(ctx.config, "stable_gamma", 16.0))
    iters = int(getattr(ctx.config, "init_iters", 0))
    grad = ctx.grad.to(device=weight.device, dtype=torch.float32)
    u, _, vh = truncated_svd(grad, 2 * r, iters, context_generator(ctx) if iters else None)
    zeta = out_features**0.25 / math.sqrt(gamma)
    return zeta * u[:, r : 2 * r], zeta * vh[:r]


def _default(weight: torch.Tensor, r: int, scale: float, ctx: InitContext):
    raise AssertionError("the default init is done by the layer itself")


INITS: dict[str, Init] = {
    "default": Init(_default, moves_base=False),
    "pissa": Init(pissa_init, moves_base=True),
    "olora": Init(olora_init, moves_base=True),
    "lora_ga": Init(lora_ga_init, moves_base=True, needs_grad=True),
}
