"""RiemannLoRA (Bogachev et al. 2025, "RiemannLoRA: A Unified Riemannian Framework for Ambiguity-Free
LoRA Optimization", arXiv 2507.12142).

The update X = s·B·A is a point of the manifold M_r of rank-r m×n matrices; training moves X, not the
over-parametrized pair (B, A). With X = U·S·Vᵀ (U = Q_B, V = Q_A from QRs of B and Aᵀ) and G the
Euclidean gradient of the loss in X, one step is

    ξ = P_T(G) = UUᵀG + GVVᵀ − UUᵀGVVᵀ          (Riemannian gradient: projection on the tangent space)
    d = β·P_T(d_prev) + ξ                          (heavy-ball momentum, transported by projection)
    X ← R(X − η·d),  R = best rank-r approximation (truncated SVD)

UᵀG and GV come from the LoRA gradients alone (g_A = s·BᵀG, g_B = s·G·Aᵀ), so G is never formed: X − η·d
is written as [U Q_u]·K·[V Q_v]ᵀ with a 2r×2r core K, and the retraction is the SVD of K. After each
step B = U'·Σ/s and A = V'ᵀ (A with orthonormal rows); the trajectory of X does not depend on how
(B, A) represent it. Init (``init="riemannlora"``, ``adapters.init.riemannlora_init``): X₀ ∈ M_r whose
tangent space holds the best rank-2r approximation of the estimated gradient (B₀ ∝ U_G[:, :r],
A₀ ∝ V_G[:, r:2r]ᵀ), taken out of the base so the model starts at W₀.

:class:`RiemannLoRASGD` is the optimizer (``config.training_optimizer``, so ``rankwise.train.train``
builds it; ``riemannlora_optimizer(model, lr=...)`` elsewhere); other trainable parameters (a head)
take plain AdamW steps. The learned update is a rank-r product (PEFT LoRA export).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..checks import choice, fraction, positive
from .init import INITS, lora_inits
from .lora import LoRAConfig, LoRALayer
from .lora_pro import PairOptimizer, lora_layers_and_params, pair_groups, paired_step
from .registry import MethodSpec, register

__all__ = ["RiemannLoRAConfig", "RiemannLoRASGD", "retract", "riemannlora_optimizer", "tangent"]

Tangent = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (M, U_p, V_p): U·M·Vᵀ + U_p·Vᵀ + U·V_pᵀ


def point(b: torch.Tensor, a: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                    torch.Tensor, torch.Tensor]:
    """X = s·B·A as U·S·Vᵀ with orthonormal U (m×r), V (n×r): returns (U, S, V, R_B, R_A), B = U·R_B, Aᵀ = V·R_A."""
    u, r_b = torch.linalg.qr(b)
    v, r_a = torch.linalg.qr(a.T)
    return u, scale * r_b @ r_a.T, v, r_b, r_a


def tangent(ut_z: torch.Tensor, z_v: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> Tangent:
    """P_T(Z) at the point with factors U, V, from UᵀZ (r×n) and Z·V (m×r) only:
    M = UᵀZV, U_p = ZV − U·M, V_p = (UᵀZ)ᵀ − V·Mᵀ (so P_T(Z) = U·M·Vᵀ + U_p·Vᵀ + U·V_pᵀ)."""
    m = ut_z @ v
    return m, z_v - u @ m, ut_z.T - v @ m.T


def riemannian_gradient(b: torch.Tensor, a: torch.Tensor, grad_b: torch.Tensor, grad_a: torch.Tensor,
                        scale: float, u: torch.Tensor, v: torch.Tensor, r_b: torch.Tensor,
                        r_a: torch.Tensor) -> Tangent:
    """P_T(G) from the LoRA gradients: UᵀG = R_B⁻ᵀ·g_A/s (g_A = s·BᵀG) and G·V = g_B·R_A⁻¹/s (g_B = s·G·Aᵀ)."""
    ut_g = torch.linalg.solve_triangular(r_b.T, grad_a, upper=False) / scale
    g_v = torch.linalg.solve_triangular(r_a, grad_b, upper=True, left=False) / scale
    return tangent(ut_g, g_v, u, v)


def transport(left: torch.Tensor, right: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> Tangent:
    """P_T(Z) at (U, V) of a tangent vector of an earlier point stored as Z = L·Rᵀ (rank ≤ 2r)."""
    return tangent((u.T @ left) @ right.T, left @ (right.T @ v), u, v)


def retract(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, d: Tangent, lr: float
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """R(X − η·d) for X = U·S·Vᵀ: X − η·d = [U Q_u]·K·[V Q_v]ᵀ with U_p = Q_u·R_u, V_p = Q_v·R_v and
    K = [[S − ηM, −ηR_vᵀ], [−ηR_u, 0]]; the truncated SVD of K gives the rank-r point (U', Σ, V')."""
    m, u_p, v_p = d
    q_u, r_u = torch.linalg.qr(u_p)
    q_v, r_v = torch.linalg.qr(v_p)
    k = torch.cat([torch.cat([s - lr * m, -lr * r_v.T], 1), torch.cat([-lr * r_u, torch.zeros_like(m)], 1)], 0)
    p, sigma, qh = torch.linalg.svd(k)
    r = s.shape[0]
    return torch.cat([u, q_u], 1) @ p[:, :r], sigma[:r], torch.cat([v, q_v], 1) @ qh[:r].T


class RiemannLoRASGD(PairOptimizer):
    """Riemannian SGD with heavy-ball momentum on the fixed-rank manifold (module doc). ``pairs``: the
    ``(A, B, s)`` of every LoRA layer, also listed in ``params``; the other parameters take AdamW steps
    (``betas``, ``eps``). ``momentum`` β; ``weight_decay`` λ shrinks X by (1 − ηλ) (and the other
    parameters, decoupled). State per pair: the momentum as L (m×2r), R (n×2r) with d = L·Rᵀ."""

    def __init__(self, params: Iterable[torch.Tensor], pairs: Sequence[tuple[nn.Parameter, nn.Parameter, float]],
                 lr: float = 1e-2, momentum: float = 0.9, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        fraction("momentum", momentum, allow_zero=True, allow_one=False)
        paired, rest = pair_groups(params, pairs, "RiemannLoRA", lr, betas, eps, weight_decay)
        groups: list[dict[str, Any]] = [{"params": paired, "scales": [float(s) for _, _, s in pairs],
                                         "manifold": True}]
        if rest:
            groups.append({"params": rest, "scales": [], "manifold": False})
        super().__init__(groups, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                                  "betas": tuple(betas), "eps": eps})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        return paired_step(self, closure, "manifold", self._pair_group)

    def _pair_group(self, group: dict[str, Any]) -> None:
        for i, s in enumerate(group["scales"]):
            self._pair_step(group["params"][2 * i], group["params"][2 * i + 1], s, group)

    def _pair_step(self, a: torch.Tensor, b: torch.Tensor, scale: float, group: dict[str, Any]) -> None:
        if a.grad is None or b.grad is None:
            return
        af, bf = a.detach().float(), b.detach().float()
        u, s, v, r_b, r_a = point(bf, af, scale)
        d = riemannian_gradient(bf, af, b.grad.float(), a.grad.float(), scale, u, v, r_b, r_a)
        state, beta = self.state[a], group["momentum"]
        if beta and state:
            prev = transport(state["momentum_left"], state["momentum_right"], u, v)
            d = tuple(beta * p + g for p, g in zip(prev, d, strict=True))  # type: ignore[assignment]
        lr = group["lr"]
        if group["weight_decay"]:
            s = s * (1 - lr * group["weight_decay"])
        u_new, sigma, v_new = retract(u, s, v, d, lr)
        if beta:
            m, u_p, v_p = d
            state["momentum_left"] = torch.cat([u @ m + u_p, u], 1)  # d = (U·M + U_p)·Vᵀ + U·V_pᵀ
            state["momentum_right"] = torch.cat([v, v_p], 1)
        b.copy_((u_new * sigma / scale).to(b.dtype))
        a.copy_(v_new.T.to(a.dtype))


@dataclass
class RiemannLoRAConfig(LoRAConfig):
    """LoRA options with ``init="riemannlora"`` (the locally optimal point, needs ``init_data``;
    ``init_scale``: its singular values) and the optimizer's ``momentum`` β (heavy ball)."""

    init: str = "riemannlora"
    init_scale: float = 1e-3
    momentum: float = 0.9

    def validate(self) -> None:
        super().validate()
        # X₀ must be a rank-r point (B = 0 is not on the manifold): the inits that take s·B₀A₀ out of the base
        choice("init", self.init, [n for n in lora_inits() if INITS[n].moves_base and not INITS[n].quantizes])
        positive("init_scale", self.init_scale)
        fraction("momentum", self.momentum, allow_zero=True, allow_one=False)
        if self.target_parameters:
            raise ValueError("target_parameters: RiemannLoRA adapts 2-D layers only; leave it None")

    def training_optimizer(self, model: nn.Module, adapter_name: str, lr: float, weight_decay: float = 0.0,
                           **kwargs: Any) -> torch.optim.Optimizer:
        """What ``rankwise.train.train`` trains this adapter with: :func:`riemannlora_optimizer`."""
        return riemannlora_optimizer(model, lr=lr, weight_decay=weight_decay, adapter_name=adapter_name,
                                     **{"momentum": self.momentum, **kwargs})


def riemannlora_optimizer(model: nn.Module, lr: float = 1e-2, weight_decay: float = 0.0,
                          adapter_name: str | None = None, **kwargs: Any) -> RiemannLoRASGD:
    """:class:`RiemannLoRASGD` over every trainable parameter of ``model``, the ``(lora_A, lora_B, scale)`` of
    its LoRA layers (of adapter ``adapter_name``) on the manifold. ``kwargs``: ``momentum``, ``betas``, ``eps``."""
    layers, params = lora_layers_and_params(model, adapter_name, "riemannlora", "RiemannLoRA")
    return RiemannLoRASGD(params, [(m.lora_A, m.lora_B, m.scale) for m in layers], lr=lr,
                          weight_decay=weight_decay, **kwargs)


register(
    MethodSpec(
        "riemannlora",
        "training-dynamics",
        "Bogachev et al. 2025, RiemannLoRA: A Unified Riemannian Framework for Ambiguity-Free LoRA Optimization",
        RiemannLoRAConfig,
        LoRALayer,
        defaults={"init": "riemannlora"},
        summary="X = s·B·A on the rank-r manifold: tangent projection of the gradient, heavy-ball momentum, "
                "truncated-SVD retraction (the loop builds the optimizer); init at the point whose tangent "
                "space holds the best rank-2r part of the estimated gradient (needs init_data)",
    )
)
