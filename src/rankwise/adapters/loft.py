"""LoFT (Tastan et al. 2025, "LoFT: Low-Rank Adaptation That Behaves Like Full Fine-Tuning", ICLR 2026).

ΔW = B·A with no α (scale 1), trained by :class:`LoFTAdamW`, an AdamW whose moments live in the
factors' coordinates but mean full-weight quantities. For the factor A (r×n) with the other factor
B (m×r) held (B's side is the mirror image, with A, rows and right products):

* gradient scaling: g̃ = (BᵀB + δI)⁻¹·g_A, so B·g̃ = P_B·G (G the full gradient, P_B the projection
  onto B's columns): the least-squares coordinates of the projected full gradient;
* first moment m (r×n) of g̃, so B·m is the full-space first moment;
* second moment as one r×r matrix per column j, P_j = EMA(g̃_j g̃_jᵀ), so the full-space second
  moment of entry (i, j) is V_ij = B_i·P_j·B_iᵀ (B_i row i of B) instead of LoRA's elementwise one;
* the step is full AdamW's direction D = (B·m)/(√(V/bc₂) + ε), mapped back to A by least squares,
  A ← A − (lr/bc₁)·(BᵀB + δI)⁻¹BᵀD, so B·ΔA = −(lr/bc₁)·P_B·D;
* when B changes (B_old → B) the stored moments are re-expressed in the new coordinates, not reset:
  R = (BᵀB + δI)⁻¹BᵀB_old, m ← R·m, P_j ← R·P_j·Rᵀ (B·R·m is the projection of B_old·m onto B);
* alternating updates: only one factor moves per step (B first, as B = 0 at init); both factors'
  moments are updated every step.

With B square and invertible and frozen, an A step changes W by exactly full AdamW's step on W
(tests/adapters/test_loft.py). Every other trainable parameter (a head) takes plain AdamW steps.

Read from the official code (github.com/tnurbek/loft) for the formulas; written here independently.
Differences: the official second-moment re-projection applies Rᵀ·P·R for A (R·P·Rᵀ for B), which does
not match its own first-moment transform (R·m); here both use the transform that keeps B·m and V the
projections of the old full-space moments. Weight decay is torch's decoupled lr·λ (the official code
omits lr). The official gradient clipping in the full space is not included (the loop's clipping
acts on the factors' gradients). ``rankwise.train.train`` builds :class:`LoFTAdamW` by itself
(``config.training_optimizer``). The learned update is a plain rank-r product (PEFT LoRA, α = r).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..checks import positive
from .lora import LoRAConfig, LoRALayer
from .lora_pro import PairOptimizer, lora_layers_and_params, pair_groups, paired_step
from .registry import MethodSpec, register


def coordinates(other: torch.Tensor, is_a: bool, damping: float) -> torch.Tensor:
    """S = (BᵀB + δI)⁻¹ for A (``other`` = B), (AAᵀ + δI)⁻¹ for B (``other`` = A): r×r."""
    gram = other.T @ other if is_a else other @ other.T
    return torch.linalg.inv(gram + damping * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device))


def reprojection(other: torch.Tensor, old: torch.Tensor, s: torch.Tensor, is_a: bool) -> torch.Tensor:
    """R taking moments from ``old``'s coordinates to ``other``'s: S·BᵀB_old (A) or A_old·Aᵀ·S (B)."""
    return s @ (other.T @ old) if is_a else (old @ other.T) @ s


def reproject(m: torch.Tensor, p: torch.Tensor, r: torch.Tensor, is_a: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(R·m, R·P_j·Rᵀ) for A (moments of columns); (m·R, Rᵀ·P_i·R) for B (moments of rows)."""
    if is_a:
        return r @ m, r @ p @ r.T
    return m @ r, r.T @ p @ r


def second_moment(other: torch.Tensor, p: torch.Tensor, is_a: bool) -> torch.Tensor:
    """The full-space second moment V (m×n): B_i·P_j·B_iᵀ for A (P: n×r×r), A_jᵀ·P_i·A_j for B (P: m×r×r)."""
    if is_a:
        return torch.einsum("ir,jrs,is->ij", other, p, other).clamp(min=0)
    return torch.einsum("rj,irs,sj->ij", other, p, other).clamp(min=0)


class LoFTAdamW(PairOptimizer):
    """LoFT's AdamW (module doc). ``pairs``: ``(A, B)`` of every LoRA layer (scale 1), also listed in
    ``params``; the other parameters take plain AdamW steps. ``damping`` δ, ``alternate``: one factor
    per step (B first)."""

    def __init__(self, params: Iterable[torch.Tensor], pairs: Sequence[tuple[nn.Parameter, nn.Parameter]],
                 lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, damping: float = 1e-6, alternate: bool = True) -> None:
        positive("damping", damping)
        paired, rest = pair_groups(params, pairs, "LoFT", lr, betas, eps, weight_decay)
        groups: list[dict[str, Any]] = [{"params": paired, "loft": True, "update_a": False}]
        if rest:
            groups.append({"params": rest, "loft": False, "update_a": False})
        super().__init__(groups, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                                  "damping": damping, "alternate": bool(alternate)})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        return paired_step(self, closure, "loft", self._pair_group)

    def _pair_group(self, group: dict[str, Any]) -> None:
        ps = group["params"]
        for i in range(0, len(ps), 2):
            self._pair_step(ps[i], ps[i + 1], group)
        if group["alternate"]:
            group["update_a"] = not group["update_a"]

    def _pair_step(self, a: torch.Tensor, b: torch.Tensor, group: dict[str, Any]) -> None:
        af, bf = a.detach().float().clone(), b.detach().float().clone()
        for p, other, is_a in ((a, bf, True), (b, af, False)):
            if p.grad is None:
                continue
            moves = not group["alternate"] or group["update_a"] == is_a
            self._factor_step(p, other, is_a, moves, group)

    def _factor_step(self, p: torch.Tensor, other: torch.Tensor, is_a: bool, moves: bool,
                     group: dict[str, Any]) -> None:
        state = self.state[p]
        rows = p.shape[1] if is_a else p.shape[0]  # columns of A / rows of B: one r×r moment each
        r = p.shape[0] if is_a else p.shape[1]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            state["row_products"] = torch.zeros(rows, r, r, dtype=torch.float32, device=p.device)
        s = coordinates(other, is_a, group["damping"])
        g = p.grad.float()
        g = s @ g if is_a else g @ s
        if "old_other" in state:  # the other factor moved: re-express the moments in its new coordinates
            rmat = reprojection(other, state["old_other"], s, is_a)
            state["exp_avg"], state["row_products"] = reproject(state["exp_avg"], state["row_products"], rmat, is_a)
        state["old_other"] = other.clone()
        b1, b2 = group["betas"]
        state["step"] += 1
        t = float(state["step"])
        state["exp_avg"].mul_(b1).add_(g, alpha=1 - b1)
        vec = g.T if is_a else g
        state["row_products"].mul_(b2).add_(vec[:, :, None] * vec[:, None, :], alpha=1 - b2)
        if not moves:
            return
        m = state["exp_avg"]
        full = other @ m if is_a else m @ other
        denom = (second_moment(other, state["row_products"], is_a) / (1 - b2**t)).sqrt() + group["eps"]
        d = full / denom
        update = s @ (other.T @ d) if is_a else (d @ other.T) @ s
        self._apply(p, update.to(p.dtype), group, group["lr"] / (1 - b1**t))

    @staticmethod
    def _apply(p: torch.Tensor, direction: torch.Tensor, group: dict[str, Any], step_size: float) -> None:
        if group["weight_decay"]:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(direction, alpha=-step_size)


@dataclass
class LoFTConfig(LoRAConfig):
    """LoRA options without α (ΔW = B·A) plus ``damping`` δ of the r×r inverses and ``alternate``."""

    damping: float = 1e-6
    alternate: bool = True

    def validate(self) -> None:
        super().validate()
        positive("damping", self.damping)
        if not isinstance(self.alternate, bool):
            raise ValueError(f"alternate={self.alternate!r} must be True or False")
        if self.alpha is not None or self.use_rslora:
            raise ValueError(f"alpha={self.alpha!r}, use_rslora={self.use_rslora!r}: LoFT has no scaling factor "
                             "(ΔW = B·A); leave alpha=None and use_rslora=False")

    @property
    def scale(self) -> float:
        return 1.0

    def training_optimizer(self, model: nn.Module, adapter_name: str, lr: float, weight_decay: float = 0.0,
                           **kwargs: Any) -> torch.optim.Optimizer:
        """What ``rankwise.train.train`` trains this adapter with: :func:`loft_optimizer`."""
        return loft_optimizer(model, lr=lr, weight_decay=weight_decay, adapter_name=adapter_name,
                              **{"damping": self.damping, "alternate": self.alternate, **kwargs})


def loft_optimizer(model: nn.Module, lr: float = 1e-3, weight_decay: float = 0.0,
                   adapter_name: str | None = None, **kwargs: Any) -> LoFTAdamW:
    """:class:`LoFTAdamW` over every trainable parameter of ``model``, the ``(lora_A, lora_B)`` of its LoRA
    layers (of adapter ``adapter_name``) as the LoFT pairs. ``kwargs``: ``betas``, ``eps``, ``damping``,
    ``alternate``."""
    layers, params = lora_layers_and_params(model, adapter_name, "loft", "LoFT")
    return LoFTAdamW(params, [(layer.lora_A, layer.lora_B) for layer in layers], lr=lr, weight_decay=weight_decay,
                     **kwargs)


register(
    MethodSpec(
        "loft",
        "training-dynamics",
        "Tastan et al. 2025, LoFT: Low-Rank Adaptation That Behaves Like Full Fine-Tuning",
        LoFTConfig,
        LoRALayer,
        summary="ΔW = B·A, no α; AdamW with gradients in least-squares coordinates, r×r second moments per "
                "row/column giving the full-space V, moments re-projected when the other factor moves, "
                "alternating A/B steps (the loop builds it)",
    )
)
