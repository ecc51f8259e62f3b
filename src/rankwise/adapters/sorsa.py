"""SORSA (Cao 2024, "SORSA: Singular Values and Orthonormal Regularized Singular Vectors Adaptation of
Large Language Models", arXiv 2409.00055).

W = W_res + s·U_p·diag(σ_p)·V_pᵀ: the SVD W₀ = U Σ Vᵀ splits into the principal part (top r) and the
frozen residual W_res = W₀ − s·U_p diag(σ_p) V_pᵀ (``adapters.init.sorsa_init``); U_p (``sorsa_B``,
out × r), σ_p (``sorsa_S``, r) and V_pᵀ (``sorsa_A``, r × in) are all trained, and the model starts
at W₀. Training adds the orthonormal regulariser's gradient to the factors' gradients (Sec. 3.2):

    L_reg = ‖U_pᵀU_p − I‖_F + ‖V_pᵀV_p − I‖_F,   W_{t+1} = W_t − η_t ∇L_train − γ_t ∇L_reg,

averaged over the adapted layers' 2·L factor matrices as the official code's ``calc_ortho`` does
(the norms are not squared; its gradient is ∇_U ‖UᵀU − I‖_F = 2·U(UᵀU − I)/‖UᵀU − I‖_F, zero where
U is orthonormal). The official trainer backpropagates γ·L_reg after the task loss, before the
optimizer step, so the optimizer (AdamW) sees g_train + γ·∇L_reg; ``gamma`` defaults to its 4e-4.
``SORSARegularizer`` does that as a loop callback (``rankwise.train.train`` attaches it from
``config.training_callbacks``); in a hand-written loop call ``regularize()`` after ``backward()``, or
add ``gamma * orthonormal_loss(model)`` to the loss. The paper writes the regulariser's step as γ_t = (η_t/η_d)·γ beside
the task step; the code (followed here) lets the optimizer take both. The learned update is a low-rank
product, ``factors()`` = (U_p·diag(σ_p), V_pᵀ, s), exported to PEFT as LoRA at rank 2r (with the init
offset, like PiSSA).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ..callbacks import Callback, TrainState
from ..checks import integer, non_negative
from ..shards import backward_full
from .base import AdapterLayer, AlphaConfig
from .init import INITS, InitContext
from .registry import MethodSpec, adapter_layers, register


@dataclass
class SORSAConfig(AlphaConfig):
    """SORSA: scale s = α/r (``alpha=None``: s = 1, the official code's default), the regulariser's
    coefficient ``gamma`` (0: no regulariser, plain PiSSA-like training of U, σ, V) and ``init_iters``
    (power iterations of a randomized SVD, 0 = exact)."""

    gamma: float = 4e-4
    init_iters: int = 0

    def validate(self) -> None:
        super().validate()
        non_negative("gamma", self.gamma)
        integer("init_iters", self.init_iters, 0)

    def training_callbacks(self, model: nn.Module, adapter_name: str, optimizer: Any = None) -> list[Callback]:
        """What ``rankwise.train.train`` runs with this adapter: the orthonormal regulariser's gradient."""
        return [SORSARegularizer(model, adapter_name)] if self.gamma > 0 else []


class SORSALayer(AdapterLayer):
    """``y = W_res x + s·U_p diag(σ_p) V_pᵀ x``; trainable ``sorsa_B`` (U_p), ``sorsa_S`` (σ_p),
    ``sorsa_A`` (V_pᵀ); buffers ``init_B``, ``init_S``, ``init_A`` keep the factors moved out of W₀."""

    method = "sorsa"

    def __init__(self, base_layer: nn.Module, config: SORSAConfig, ctx: InitContext) -> None:
        super().__init__(base_layer, config)
        r, dtype, device = config.r, self.adapter_dtype, self.base_weight.device
        self.scale = config.scale
        self.sorsa_A = nn.Parameter(torch.zeros(r, self.in_features, dtype=dtype, device=device))
        self.sorsa_S = nn.Parameter(torch.zeros(r, dtype=dtype, device=device))
        self.sorsa_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=dtype, device=device))
        for name in ("A", "S", "B"):
            self.register_buffer(f"init_{name}", torch.zeros_like(getattr(self, f"sorsa_{name}")))
        if ctx.skip:
            return
        with torch.no_grad():
            f = INITS["sorsa"].fn(self.base_weight.detach().float(), replace(ctx, config=config, r=r, scale=self.scale))
            assert f.core is not None
            for name, t in (("A", f.right), ("S", f.core), ("B", f.left)):
                getattr(self, f"sorsa_{name}").copy_(t)
                getattr(self, f"init_{name}").copy_(t)
        self.after_load()

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self.sorsa_B * self.sorsa_S, self.sorsa_A, self.scale

    def base_offset_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self.init_B * self.init_S, self.init_A, self.scale

    def delta_weight(self) -> torch.Tensor:
        b, a, s = self.factors()
        return (b @ a) * s

    def orthonormal_loss(self) -> torch.Tensor:
        """‖U_pᵀU_p − I‖_F + ‖V_pᵀV_p − I‖_F of this layer (V_pᵀV_p = A·Aᵀ with A = V_pᵀ)."""
        return orthonormality(self.sorsa_B, self.sorsa_A)

    def trainable_count(self) -> int:
        return self.config.r * (self.in_features + self.out_features + 1)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", scale={self.scale:g}"


def orthonormality(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """‖BᵀB − I‖_F + ‖AAᵀ − I‖_F of one pair of factors (B out×r, A r×in)."""
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    return torch.linalg.matrix_norm(b.T @ b - eye) + torch.linalg.matrix_norm(a @ a.T - eye)


def sorsa_layers(model: nn.Module, adapter_name: str | None = None) -> list[SORSALayer]:
    """The model's SORSA layers (of adapter ``adapter_name`` only, if given)."""
    return [layer for _, layer in adapter_layers(model, adapter_name) if isinstance(layer, SORSALayer)]


def orthonormal_loss(model: nn.Module, adapter_name: str | None = None) -> torch.Tensor:
    """L_reg of the official code: Σ_layers (‖U_pᵀU_p − I‖_F + ‖V_pᵀV_p − I‖_F) / (2·L)."""
    layers = sorsa_layers(model, adapter_name)
    if not layers:
        raise ValueError("model has no SORSA layers (rw.adapt(model, 'sorsa') first)")
    return torch.stack([layer.orthonormal_loss() for layer in layers]).sum() / (2 * len(layers))


class SORSARegularizer(Callback):
    """After ``backward()``, before the optimizer step: grad += γ·∇L_reg for every SORSA factor."""

    def __init__(self, model: nn.Module, adapter_name: str | None = None) -> None:
        self.model, self.adapter_name = model, adapter_name
        layers = sorsa_layers(model, adapter_name)
        if not layers:
            raise ValueError("model has no SORSA layers (rw.adapt(model, 'sorsa') first)")
        self.gamma = float(layers[0].config.gamma)

    def regularize(self) -> float:
        """Add γ·∇L_reg to the factors' ``.grad`` (of the gathered factors under FSDP2); returns L_reg."""
        params = [p for layer in sorsa_layers(self.model, self.adapter_name) for p in (layer.sorsa_B, layer.sorsa_A)]

        def reg(*factors: torch.Tensor) -> torch.Tensor:  # orthonormal_loss of these factors
            pairs = zip(factors[::2], factors[1::2], strict=True)
            return torch.stack([orthonormality(b, a) for b, a in pairs]).sum() / len(factors)

        with torch.enable_grad():
            return float(backward_full(reg, params, self.gamma))

    def on_after_backward(self, state: TrainState) -> None:
        self.regularize()


register(
    MethodSpec(
        "sorsa",
        "init",
        "Cao 2024, SORSA: Singular Values and Orthonormal Regularized Singular Vectors Adaptation of Large "
        "Language Models",
        SORSAConfig,
        SORSALayer,
        summary="W₀ = W_res + s·U_p diag(σ_p) V_pᵀ (top-r SVD), U, σ, V trained with the orthonormal "
                "regulariser γ·(‖UᵀU−I‖_F + ‖VᵀV−I‖_F) added to the gradient",
    )
)
