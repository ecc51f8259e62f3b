"""GraLoRA (Jung et al. 2025, "GraLoRA: Granular Low-Rank Adaptation for Parameter-Efficient
Fine-Tuning", arXiv 2505.20355).

W (out × in) is cut into k × k blocks; block (j, n) (output block j, input slice n) gets its own
LoRA of rank s = r/k (paper Sec. 3):

    ΔW_{jn} = (α / (r + h)) · B_{j}^{(n)} A_{n}^{(j)} ,   B_{j}^{(n)}: out/k × s,  A_{n}^{(j)}: s × in/k

The same r·(in + out) parameters as a rank-r LoRA, but ΔW can reach rank k·r, and each block's
adapter sees only its own input slice. Hybrid GraLoRA (``hybrid_r`` = h > 0) adds a plain rank-h
LoRA B_g A_g over the whole matrix, with the same scale. Tensors use PEFT 0.21.2's layout:
``gralora_A`` (k, in/k, r) holds for input slice n the columns [A_{n}^{(1)} … A_{n}^{(k)}]ᵀ, and
``gralora_B`` (k, r, out/k) for output block j the rows [B_{j}^{(1)} … B_{j}^{(k)}]ᵀ; A starts
Kaiming-uniform per slice, B at 0. ΔW is a fixed product of rank k·r + h with block-structured
factors (A′ row (j, n, t) nonzero on slice n only, B′ column (j, n, t) on block j only), which PEFT
LoRA export writes; the forward uses the blocks directly (k times cheaper than the wide factors).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..checks import integer, rank
from ..rng import kaiming_uniform_, layer_generator
from .base import AdapterLayer, AlphaScale
from .init import InitContext
from .registry import MethodSpec, register


@dataclass
class GraLoRAConfig(AlphaScale):
    """GraLoRA hyper-parameters: ``r`` the total rank of the k×k block LoRAs (each block gets r/k),
    ``gralora_k`` the number of blocks per side, ``hybrid_r`` the rank of an extra plain LoRA,
    ``alpha`` (None: α = r + hybrid_r, scale 1; PEFT's default is 64 at r = 32)."""

    gralora_k: int = 2
    hybrid_r: int = 0
    alpha: float | None = None

    def validate(self) -> None:
        super().validate()
        rank("gralora_k", self.gralora_k)
        integer("hybrid_r", self.hybrid_r, 0)
        if self.r % self.gralora_k:
            raise ValueError(f"r={self.r} must be divisible by gralora_k={self.gralora_k} (each block has rank r/k)")

    @property
    def scale(self) -> float:
        total = self.r + self.hybrid_r
        return (total if self.alpha is None else float(self.alpha)) / total


class GraLoRALayer(AdapterLayer):
    """Trainable ``gralora_A`` (k, in/k, r), ``gralora_B`` (k, r, out/k), and with ``hybrid_r`` > 0
    ``gralora_A_general`` (h, in), ``gralora_B_general`` (out, h)."""

    method = "gralora"

    def __init__(self, base_layer: nn.Module, config: GraLoRAConfig, ctx: InitContext) -> None:
        super().__init__(base_layer, config)
        k, r, h = config.gralora_k, config.r, config.hybrid_r
        if self.in_features % k or self.out_features % k:
            raise ValueError(
                f"gralora_k={k} must divide in_features={self.in_features} and out_features={self.out_features} "
                f"of '{ctx.name or 'the layer'}' (GraLoRA cuts W into k×k blocks)"
            )
        w, dtype = self.base_weight, self.adapter_dtype
        g = layer_generator(config.seed, ctx.name)
        a = torch.stack([kaiming_uniform_(torch.empty(r, self.in_features // k), generator=g) for _ in range(k)])
        self.gralora_A = nn.Parameter(a.transpose(1, 2).contiguous().to(device=w.device, dtype=dtype))
        self.gralora_B = nn.Parameter(torch.zeros(k, r, self.out_features // k, dtype=dtype, device=w.device))
        if h > 0:
            a_g = kaiming_uniform_(torch.empty(h, self.in_features), generator=g)
            self.gralora_A_general = nn.Parameter(a_g.to(device=w.device, dtype=dtype))
            self.gralora_B_general = nn.Parameter(torch.zeros(self.out_features, h, dtype=dtype, device=w.device))

    def _hybrid(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return (self.gralora_B_general, self.gralora_A_general) if self.config.hybrid_r > 0 else None

    def block_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B′: out × k·r, A′: k·r × in), block-structured, with ΔW's block part = B′A′ (unscaled)."""
        k = self.config.gralora_k
        s = self.config.r // k
        eye = torch.eye(k, dtype=self.gralora_A.dtype, device=self.gralora_A.device)
        # A[n, i, (j, t)] -> rows (j, n, t) of A′, nonzero on input slice n only
        a = self.gralora_A.reshape(k, -1, k, s).permute(2, 0, 3, 1)  # (j, n, t, i)
        a_wide = (a.unsqueeze(3) * eye.view(1, k, 1, k, 1)).reshape(k * k * s, self.in_features)
        # B[j, (n, t), o] -> column (j, n, t) of B′, nonzero on output block j only
        b = self.gralora_B.reshape(k, k, s, -1).permute(0, 3, 1, 2)  # (j, o, n, t)
        b_wide = (b.unsqueeze(2) * eye.view(k, 1, k, 1, 1)).reshape(self.out_features, k * k * s)
        return b_wide, a_wide

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        b, a = self.block_factors()
        hybrid = self._hybrid()
        if hybrid is not None:
            b, a = torch.cat([b, hybrid[0]], dim=1), torch.cat([a, hybrid[1]], dim=0)
        return b, a, self.config.scale

    def delta_weight(self) -> torch.Tensor:
        b, a, scale = self.factors()
        return (b @ a) * scale

    def delta_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Σ_n B_{j}^{(n)} A_{n}^{(j)} x_n per output block j (+ the hybrid LoRA), scaled."""
        k = self.config.gralora_k
        s = self.config.r // k
        lead = x.shape[:-1]
        h = torch.einsum("...ni,nir->...nr", x.reshape(*lead, k, self.in_features // k), self.gralora_A)
        h = h.reshape(*lead, k, k, s).transpose(-3, -2).reshape(*lead, k, k * s)  # (..., j, (n, t))
        y = torch.einsum("...jr,jro->...jo", h, self.gralora_B).reshape(*lead, self.out_features)
        hybrid = self._hybrid()
        if hybrid is not None:
            y = y + self.factor_map(x, *hybrid)
        return y * self.config.scale

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """None: the block forward is cheaper than the fused kernel over the k·r-wide factors."""
        return None

    def trainable_count(self) -> int:
        return (self.config.r + self.config.hybrid_r) * (self.in_features + self.out_features)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", gralora_k={self.config.gralora_k}, hybrid_r={self.config.hybrid_r}"


register(
    MethodSpec(
        "gralora",
        "adapter",
        "Jung et al. 2025, GraLoRA: Granular Low-Rank Adaptation for Parameter-Efficient Fine-Tuning",
        GraLoRAConfig,
        GraLoRALayer,
        export="lora",
        summary="k×k blocks of W, each with its own rank-r/k LoRA on its input slice (rank up to k·r), + hybrid LoRA",
    )
)
