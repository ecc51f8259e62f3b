"""GoRA (He et al. 2025, "GoRA: Gradient-driven Adaptive Low Rank Adaptation", arXiv 2502.12171).

Before training, the gradient G_l of every target weight W_l is estimated from a few batches (the mean over
``init_batches`` of ``init_data``). Then:

* Ranks: layer importance I_l = mean|W_l ⊙ G_l|, normalised a_l = I_l / Σ_k I_k; the budget is LoRA's
  parameter count at the reference rank r, P = Σ_l r·(m_l + n_l), and layer l gets
  r_l = ⌊round(a_l·P) / (m_l + n_l)⌋ (clamped to [``min_r``, ``max_r``] when both are given, and to
  min(m_l, n_l)); a layer whose rank is 0 is not adapted. So Σ_l r_l·(m_l + n_l) ≤ P, and among layers of
  one shape the ranks follow the importance.
* Init: A as ``nn.Linear`` (random), B = −(γ/α)·G·Aᵀ(A·Aᵀ)⁻¹, so B is the least-squares solution of
  B·A ≈ −(γ/α)·G and s·B·A = −(γ/r)·G·P_A (P_A the projection onto A's row space): the adapter starts
  one compressed gradient-descent step away from the base (s = α/r with the reference rank r in every
  layer). The base is not offset, so the initial output is not the base's (as the released code's default).

Read from the paper and its released code (the "compress" init and the ``union_mean`` importance with the
default options: no softmax or square root of the importance, no feature smoothing, no learning-rate
scaling of γ). The per-layer ranks and α (α_l = α·r_l/r, so α_l/r_l = α/r) are overrides, exported to PEFT
as ``rank_pattern`` / ``alpha_pattern``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..checks import integer, positive
from ..rng import kaiming_uniform_, layer_generator
from ..targets import linear_weight, matrix_shape
from .gradients import estimate_gradients
from .init import Factors, InitContext
from .lora import LoRAConfig, LoRALayer
from .registry import MethodSpec, register

__all__ = ["GoRAConfig", "GoRALayer", "allocate_ranks", "gora_factors", "importance"]


@dataclass
class GoRAConfig(LoRAConfig):
    """LoRA options plus GoRA's: ``r`` the reference rank (budget r·(m + n) per layer), ``init_gamma`` γ of
    B's init, ``min_r`` / ``max_r`` bounds of a layer's rank (applied when both are given)."""

    init_gamma: float = 16.0
    min_r: int | None = None
    max_r: int | None = None

    def validate(self) -> None:
        super().validate()
        if self.init != "default":
            raise ValueError(f"init={self.init!r} is not allowed for method 'gora'; choose 'default'")
        positive("init_gamma", self.init_gamma)
        integer("min_r", self.min_r, 1, optional=True)
        integer("max_r", self.max_r, 1, optional=True)
        if self.min_r is not None and self.max_r is not None and self.min_r > self.max_r:
            raise ValueError(f"min_r={self.min_r} must not exceed max_r={self.max_r}")


def importance(weight: torch.Tensor, grad: torch.Tensor) -> float:
    """I = mean|W ⊙ G| (the released code's ``union_mean``)."""
    return float((weight.float() * grad.float()).abs().mean())


def allocate_ranks(scores: dict[str, float], shapes: dict[str, tuple[int, int]], r: int,
                   min_r: int | None = None, max_r: int | None = None) -> dict[str, int]:
    """r_l = ⌊round(a_l·P)/(m_l + n_l)⌋ with a_l = I_l/Σ I, P = Σ r·(m_l + n_l); clamped to [min_r, max_r]
    when both are given, and to min(m_l, n_l)."""
    total = sum(scores.values())
    if total <= 0:
        raise ValueError("GoRA: every layer's importance mean|W ⊙ G| is 0 (the init_data gave no gradient)")
    budget = sum(r * (m + n) for m, n in shapes.values())
    out = {}
    for name, score in scores.items():
        m, n = shapes[name]
        rank = round(budget * score / total) // (m + n)
        if min_r is not None and max_r is not None:
            rank = min(max(rank, min_r), max_r)
        out[name] = min(rank, m, n)
    return out


def gora_factors(a: torch.Tensor, grad: torch.Tensor, gamma: float, alpha: float) -> torch.Tensor:
    """B = −(γ/α)·G·Aᵀ(A·Aᵀ)⁻¹ (A: r×in, G: out×in): the least-squares B of B·A = −(γ/α)·G."""
    a, g = a.float(), grad.float()
    gram = a @ a.T
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return -(gamma / alpha) * (g @ a.T) @ torch.linalg.pinv(gram + 1e-8 * eye)


def _plan(model: nn.Module, layer_cfgs: dict[str, Any], init_data: Iterable | None, init_batches: int
          ) -> dict[str, tuple[dict[str, Any], Any]]:
    """``MethodSpec.plan``: gradients, importances, ranks; per kept layer ``({r, alpha}, G)``."""
    if init_data is None:
        raise ValueError("method 'gora' allocates ranks and initializes from gradients and needs init_data "
                         "(an iterable of batches, e.g. a DataLoader)")
    grads = estimate_gradients(model, list(layer_cfgs), init_data, max_batches=init_batches)
    cfg = next(iter(layer_cfgs.values()))
    shapes = {n: matrix_shape(model.get_submodule(n)) for n in layer_cfgs}
    scores = {n: importance(linear_weight(model.get_submodule(n)).detach(), grads[n]) for n in layer_cfgs}
    ranks = allocate_ranks(scores, shapes, cfg.r, cfg.min_r, cfg.max_r)
    alpha = float(cfg.r if cfg.alpha is None else cfg.alpha)
    return {n: ({"r": k, "alpha": alpha * k / cfg.r}, {"grad": grads[n], "alpha": alpha})
            for n, k in ranks.items() if k > 0}


class GoRALayer(LoRALayer):
    """LoRA with GoRA's rank (a per-layer override) and init (A random, B from the estimated gradient)."""

    method = "gora"
    base_kinds = ("linear",)
    identity_at_init = False

    @classmethod
    def needs_grad(cls, config: Any) -> bool:
        """True: GoRA needs ``init_data`` (its plan estimates the gradients)."""
        return True

    def __init__(self, base_layer: nn.Module, config: GoRAConfig, ctx: InitContext) -> None:
        super().__init__(base_layer, config, ctx)
        self.identity_at_init = False

    @torch.no_grad()
    def _initialize(self, ctx: InitContext, chosen: Factors | None = None) -> None:
        kaiming_uniform_(self.lora_A, generator=layer_generator(self.config.seed, ctx.name))
        plan = ctx.extra.get("plan")
        if plan is None:
            raise ValueError(f"GoRA: no gradient for layer '{ctx.name}' (adapt it with init_data)")
        # γ/α with the reference α (the layer's own α_l = α·r_l/r keeps s = α/r)
        b = gora_factors(self.lora_A, plan["grad"].to(self.lora_A.device), self.config.init_gamma, plan["alpha"])
        self.lora_B.copy_(b)


register(
    MethodSpec(
        "gora",
        "rank-allocation",
        "He et al. 2025, GoRA: Gradient-driven Adaptive Low Rank Adaptation",
        GoRAConfig,
        GoRALayer,
        summary="per-layer ranks from mean|W ⊙ G| under LoRA's parameter budget; A random, "
                "B = −(γ/α)·G·Aᵀ(AAᵀ)⁻¹ from the accumulated gradient",
        plan=_plan,
    )
)
