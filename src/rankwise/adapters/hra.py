"""HRA (Yuan et al. 2024, "Bridging The Gap between Low-rank and Orthogonal Adaptation via Householder
Reflection Adaptation", NeurIPS 2024).

The weight is multiplied on the input side by a chain of r Householder reflections (paper Eq. 4):

    W′ = W₀ · H ,   H = Π_{i=1..r} (I − 2 uᵢuᵢᵀ / ‖uᵢ‖²) ,   u₁…u_r ∈ ℝ^in trainable (``hra_u``, in × r)

H is orthogonal, so W′ keeps W₀'s singular values. With the unit vectors V = [ûᵢ] the chain has the
compact WY form H = I − V M Vᵀ, M = (striu(VᵀV) + ½I)⁻¹ (upper triangular, r × r; Joffrain et al.
2006), so ΔW = W′ − W₀ = −(W₀ V M) Vᵀ is a rank-r product: the forward never forms H, and the update
exports to PEFT LoRA as B = −W₀VM, A = Vᵀ.

``apply_GS``: the paper's strictly orthogonal variant (its λ → ∞ limit): the uᵢ are orthonormalised
by Gram-Schmidt first (Q, the reduced QR), then H = I − 2QQᵀ (the reflections commute). As PEFT
0.21.2 (``HRAConfig(init_weights=True)``), ``symmetric_init`` draws r/2 vectors U(±1/√(r/2)) and
repeats each one (u₁ = u₂, u₃ = u₄, …): equal neighbouring reflections cancel, so H = I at init.
With ``apply_GS`` H = I − 2QQᵀ is never I (it flips span(Q)), so the vectors are drawn independently
there (PEFT draws pairs and Gram-Schmidt then normalises rounding noise): the model starts away from
the base.
The paper's soft orthogonality regulariser λ‖I − UᵀU‖²_F is not offered (PEFT has none either).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..rng import kaiming_uniform_, layer_generator
from .base import AdapterConfig, AdapterLayer
from .init import InitContext
from .registry import MethodSpec, register


@dataclass
class HRAConfig(AdapterConfig):
    """HRA hyper-parameters: ``r`` reflections; ``apply_GS`` orthonormalises them (Gram-Schmidt);
    ``symmetric_init`` starts from pairs of equal vectors (H = I, needs an even r), else from
    independent U(±1/√r) vectors (the model then starts away from the base, as PEFT's
    ``init_weights=False``, and always with ``apply_GS``)."""

    apply_GS: bool = False
    symmetric_init: bool = True

    def validate(self) -> None:
        super().validate()
        if self.symmetric_init and not self.apply_GS and self.r % 2:
            raise ValueError(
                f"r={self.r} must be even with symmetric_init=True (pairs of equal reflections give H = I at "
                "init); choose an even r or symmetric_init=False"
            )


def householder_wy(u: torch.Tensor, apply_gs: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(V, M) with I − V M Vᵀ = Π_i (I − 2 ûᵢûᵢᵀ) for the columns uᵢ of ``u`` (in × r), or
    I − 2QQᵀ with Q the Gram-Schmidt basis of the uᵢ (``apply_gs``); computed in float32 at least
    (the factorizations have no half-precision kernels), returned in ``u``'s dtype."""
    r, dtype = u.shape[1], u.dtype
    u = u.to(torch.promote_types(dtype, torch.float32))
    eye = torch.eye(r, dtype=u.dtype, device=u.device)
    if apply_gs:
        return torch.linalg.qr(u, mode="reduced").Q.to(dtype), (2.0 * eye).to(dtype)
    v = u / u.norm(dim=0)
    t = torch.triu(v.t() @ v, diagonal=1) + 0.5 * eye
    return v.to(dtype), torch.linalg.solve_triangular(t, eye, upper=True).to(dtype)


class HRALayer(AdapterLayer):
    """Trainable ``hra_u`` (in × r): the reflection vectors (PEFT's layout)."""

    method = "hra"

    def __init__(self, base_layer: nn.Module, config: HRAConfig, ctx: InitContext) -> None:
        super().__init__(base_layer, config)
        self.identity_at_init = config.symmetric_init and not config.apply_GS
        r, w = config.r, self.base_weight
        g = layer_generator(config.seed, ctx.name)
        if self.identity_at_init:
            u = kaiming_uniform_(torch.empty(self.in_features, r // 2), generator=g).repeat_interleave(2, dim=1)
        else:
            u = kaiming_uniform_(torch.empty(self.in_features, r), generator=g)
        self.hra_u = nn.Parameter(u.to(device=w.device, dtype=self.adapter_dtype))

    def reflections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(V, M): H = I − V M Vᵀ."""
        return householder_wy(self.hra_u, self.config.apply_GS)

    @torch.no_grad()
    def frozen_weight(self) -> torch.Tensor:
        """W₀, recovered from the merged W′ = W₀H as W′Hᵀ = W′ − (W′V)MᵀVᵀ (H is orthogonal)."""
        if not self.merged or self._merge_stash is not None:
            return super().frozen_weight()
        w = self.base_weight
        v, m = self.reflections()
        return w - ((w.to(v.dtype) @ v) @ m.t() @ v.t()).to(w.dtype)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """B = −W₀VM (out × r), A = Vᵀ: ΔW = W₀(H − I) = B·A."""
        v, m = self.reflections()
        w0 = self.frozen_weight().to(v.dtype)
        return -(w0 @ v) @ m, v.t(), 1.0

    def delta_weight(self) -> torch.Tensor:
        b, a, _ = self.factors()
        return b @ a

    def trainable_count(self) -> int:
        return self.in_features * self.config.r

    def extra_repr(self) -> str:
        return super().extra_repr() + f", apply_GS={self.config.apply_GS}"


register(
    MethodSpec(
        "hra",
        "adapter",
        "Yuan et al. 2024, Bridging The Gap between Low-rank and Orthogonal Adaptation via Householder "
        "Reflection Adaptation",
        HRAConfig,
        HRALayer,
        export="lora",
        summary="W′ = W₀·Π(I − 2uᵢuᵢᵀ/‖uᵢ‖²), r trainable reflections (ΔW = −W₀VMVᵀ, rank r); optional Gram-Schmidt",
    )
)
