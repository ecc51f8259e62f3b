"""MoRA (Jiang et al. 2024, "MoRA: High-Rank Updating for Parameter-Efficient Fine-Tuning").

One trainable square matrix M (r̂ × r̂) between a non-parameterised compression f_comp: ℝᵏ → ℝ^r̂
and decompression f_decomp: ℝ^r̂ → ℝᵈ (paper Sec. 4):

    h = W₀x + f_decomp(M · f_comp(x)),    r̂ = ⌊√((d + k)·r)⌋

so M has at most LoRA's r(d + k) parameters at rank r, and ΔW (the composed linear map, merged into
W) has rank up to min(d, k) instead of r. M = 0 at init. ``compress`` picks the operators; an input
not a multiple of r̂ long is padded cyclically (x_{i mod k}) and the output is cut or tiled to d:

* ``truncation`` (Eq. 5): f_comp(x) = x_{1:r̂}, f_decomp(h) = [h; 0].
* ``sharing`` (Eq. 6): input index i joins group i mod r̂ and each group is summed; output row i
  reads h_{i mod r̂} (the paper's choice for large r̂).
* ``decouple`` (Eq. 7–8): x is cut into n = ⌈k/r̂⌉ chunks of r̂, M is applied to each and the results
  are concatenated: ΔW = blockdiag(M, …, M).
* ``rotation`` (Eq. 9, the default, the paper's choice for small r): chunk b is rotated before M
  as in RoPE, ΔW = blockdiag(M·R₀, M·R₁, …): R_b turns the pair (x_j, x_{j+r̂/2}) by the angle
  b·10000^(−2j/r̂), so the blocks differ; r̂ is rounded down to an even number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..checks import choice
from .base import AdapterConfig, AdapterLayer
from .init import InitContext
from .registry import MethodSpec, register

COMPRESSIONS = ("rotation", "decouple", "sharing", "truncation")


@dataclass
class MoRAConfig(AdapterConfig):
    """MoRA hyper-parameters: ``r`` is the LoRA rank whose budget M matches (r̂ = ⌊√((d+k)·r)⌋),
    ``compress`` the compress / decompress operators (see the module doc)."""

    compress: str = "rotation"

    def validate(self) -> None:
        super().validate()
        choice("compress", self.compress, COMPRESSIONS)


def square_size(r: int, in_features: int, out_features: int, compress: str) -> int:
    """r̂ = ⌊√((d + k)·r)⌋, rounded down to an even number for ``rotation`` (pairs of coordinates)."""
    r_hat = math.isqrt((in_features + out_features) * r)
    return r_hat - r_hat % 2 if compress == "rotation" else r_hat


def rotation_tables(chunks: int, r_hat: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the angles b·10000^(−2j/r̂) (chunk b, pair j), each (chunks, r̂), both halves alike."""
    freq = 10000.0 ** (-torch.arange(0, r_hat, 2, dtype=torch.float64) / r_hat)
    angles = torch.outer(torch.arange(chunks, dtype=torch.float64), freq)
    angles = torch.cat([angles, angles], dim=1)
    return angles.cos(), angles.sin()


class MoRALayer(AdapterLayer):
    """Trainable ``mora_M`` (r̂ × r̂), zero at init; the operators are fixed index maps (and rotations)."""

    method = "mora"

    def __init__(self, base_layer: nn.Module, config: MoRAConfig, ctx: InitContext) -> None:
        super().__init__(base_layer, config)
        k, d = self.in_features, self.out_features
        self.r_hat = r_hat = square_size(config.r, k, d, config.compress)
        if r_hat == 0:
            raise ValueError(
                f"r={config.r} gives r̂=0 on '{ctx.name or 'the layer'}' ({k} → {d}) with compress='rotation' "
                "(r̂ is rounded down to an even number); choose a larger r or another compress"
            )
        if config.compress == "truncation" and r_hat > min(k, d):
            raise ValueError(
                f"compress='truncation' keeps r̂={r_hat} coordinates, more than min(in_features, out_features)="
                f"{min(k, d)} of '{ctx.name or 'the layer'}'; choose a smaller r or another compress "
                f"({', '.join(c for c in COMPRESSIONS if c != 'truncation')})"
            )
        self.chunks = -(-k // r_hat)  # n = ⌈k / r̂⌉
        device, dtype = self.base_weight.device, self.adapter_dtype
        if config.compress == "rotation":
            cos, sin = rotation_tables(self.chunks, r_hat)
            self.register_buffer("rot_cos", cos.to(device=device, dtype=dtype), persistent=False)
            self.register_buffer("rot_sin", sin.to(device=device, dtype=dtype), persistent=False)
        self.mora_M = nn.Parameter(torch.zeros(r_hat, r_hat, dtype=dtype, device=device))

    def compress(self, x: torch.Tensor) -> torch.Tensor:
        """f_comp(x): (..., k) → (..., r̂) (truncation, sharing) or (..., n, r̂) (decouple, rotation)."""
        mode, r_hat = self.config.compress, self.r_hat
        if mode == "truncation":
            return x[..., :r_hat]
        chunks = self._padded(x).unflatten(-1, (self.chunks, r_hat))
        if mode == "sharing":
            return chunks.sum(dim=-2)
        if mode == "rotation":  # R_b x = x ⊙ cos_b + [−x₂; x₁] ⊙ sin_b
            x1, x2 = chunks[..., : r_hat // 2], chunks[..., r_hat // 2:]
            return chunks * self.rot_cos + torch.cat([-x2, x1], dim=-1) * self.rot_sin
        return chunks

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        """x cyclically extended to n·r̂ coordinates (x_{i mod k}) by slicing and concatenation: a gather by an
        index tensor costs a scatter over the whole input in backward (MoRA's step was 1.8x LoRA's with it)."""
        k, total = x.shape[-1], self.chunks * self.r_hat
        if total == k:
            return x
        return torch.cat([x] * (total // k) + [x[..., : total % k]], dim=-1)

    def decompress(self, h: torch.Tensor) -> torch.Tensor:
        """f_decomp(h): to (..., d): zero-padded (truncation), h_{i mod r̂} (sharing), or the chunks
        concatenated, cut or tiled to d (decouple, rotation)."""
        d, mode = self.out_features, self.config.compress
        if mode == "truncation":
            return torch.cat([h, h.new_zeros(*h.shape[:-1], d - self.r_hat)], dim=-1)
        flat = h.flatten(-2) if mode in ("decouple", "rotation") else h
        width = flat.shape[-1]
        if width >= d:
            return flat[..., :d]
        return flat.repeat(*(1,) * (flat.dim() - 1), -(-d // width))[..., :d]

    def delta_forward(self, x: torch.Tensor) -> torch.Tensor:
        """f_decomp(M f_comp(x)), never forming ΔW."""
        return self.decompress(self.compress(x) @ self.mora_M.t())

    def delta_weight(self) -> torch.Tensor:
        """ΔW (d × k): the composed map applied to the k unit vectors."""
        eye = torch.eye(self.in_features, dtype=self.mora_M.dtype, device=self.mora_M.device)
        return self.delta_forward(eye).t()

    def trainable_count(self) -> int:
        return self.r_hat * self.r_hat

    def extra_repr(self) -> str:
        return super().extra_repr() + f", r_hat={self.r_hat}, compress={self.config.compress}"


register(
    MethodSpec(
        "mora",
        "adapter",
        "Jiang et al. 2024, MoRA: High-Rank Updating for Parameter-Efficient Fine-Tuning",
        MoRAConfig,
        MoRALayer,
        export="none",
        summary="ΔW x = f_decomp(M f_comp(x)): one square M (r̂² ≤ r(d+k), zero at init) between fixed "
                "compress / decompress operators (rotation, decouple, sharing, truncation); rank up to min(d, k)",
    )
)
