"""Bone (Kang 2024, "Bone: Block Affine Transformation as Parameter Efficient Fine-tuning Methods
for Large Language Models", arXiv 2409.15371 v2/v3).

"Weight Guide": W₀ (out × in) is cut into r × r blocks W_{a,c} (a: row block, c: column block) and
each row block a owns one trainable r × r matrix b_a that transforms every block of that row (the
block-affine update of Sec. 3; the official code's ``rearrange(W, '(a r1) (b r2) -> b a r1 r2') @
bone + bone``):

    ΔW_{a,c} = W_{a,c} · b_a + b_a ,    i.e.  W′_{a,c} = W_{a,c} (I + b_a) + b_a

b = 0 at init (no special initialisation), so the model starts equal to the base; the trainable
count is out·r (block size × one weight dimension). ΔW depends on W₀, so there are no low-rank
factors and no PEFT LoRA export. This is exactly PEFT 0.21.2's MiSS with ``init_weights='bat'``
(``peft/tuners/miss``; parameter ``miss_block`` of shape (out/r, r, r)). Unmerge inverts the affine
map blockwise: W_{a,c} = (W′_{a,c} − b_a)(I + b_a)⁻¹.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import AdapterConfig, AdapterLayer
from .init import InitContext
from .registry import MethodSpec, register


def _blocks(weight: torch.Tensor, r: int) -> torch.Tensor:
    """(out, in) → (in/r, out/r, r, r): ``[c, a]`` is the block W_{a,c}."""
    out, inp = weight.shape
    return weight.reshape(out // r, r, inp // r, r).permute(2, 0, 1, 3)


def _unblocks(blocks: torch.Tensor) -> torch.Tensor:
    """Inverse of ``_blocks``."""
    nc, na, r, _ = blocks.shape
    return blocks.permute(1, 2, 0, 3).reshape(na * r, nc * r)


def bone_delta(weight: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """ΔW with ΔW_{a,c} = W_{a,c}·b_a + b_a for ``block`` = (b_a) of shape (out/r, r, r)."""
    w = _blocks(weight, block.shape[-1])
    return _unblocks(w @ block + block)


def bone_inverse(merged: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """W₀ from W′ = W₀ + ΔW(W₀): W_{a,c} = (W′_{a,c} − b_a)(I + b_a)⁻¹ (solved, not inverted)."""
    r = block.shape[-1]
    w = _blocks(merged, r).float()
    b = block.float()
    eye = torch.eye(r, dtype=b.dtype, device=b.device)
    # X (I + b) = W′ − b  ⇔  (I + b)ᵀ Xᵀ = (W′ − b)ᵀ
    xt = torch.linalg.solve((eye + b).transpose(-1, -2), (w - b).transpose(-1, -2))
    return _unblocks(xt.transpose(-1, -2)).to(merged.dtype)


@dataclass
class BoneConfig(AdapterConfig):
    """Bone hyper-parameters: ``r`` is the block size; it must divide both dimensions of every layer."""


class BoneLayer(AdapterLayer):
    """Trainable ``bone_block`` (out/r, r, r), zero at init; the block size is ``r``."""

    method = "bone"

    def __init__(self, base_layer: nn.Module, config: BoneConfig, ctx: InitContext) -> None:
        super().__init__(base_layer, config)
        r = config.r
        if self.in_features % r or self.out_features % r:
            raise ValueError(
                f"r={r} must divide in_features={self.in_features} and out_features={self.out_features} "
                f"of '{ctx.name or 'the layer'}' (Bone splits W into r×r blocks); choose r among the "
                f"common divisors of {self.in_features} and {self.out_features}"
            )
        w = self.base_weight
        self.bone_block = nn.Parameter(
            torch.zeros(self.out_features // r, r, r, dtype=self.adapter_dtype, device=w.device)
        )

    @torch.no_grad()
    def frozen_weight(self) -> torch.Tensor:
        """W₀ (the base weight), recovered from the merged weight by the blockwise inverse if merged:
        W₀ = blockwise (W′ − b)(I + b)⁻¹, exact up to rounding while I + b_a is invertible."""
        w = self.base_weight
        return bone_inverse(w, self.bone_block) if self.merged else w

    def delta_weight(self) -> torch.Tensor:
        """ΔW(W₀) in the adapter dtype (W₀ upcast to it when the base is narrower)."""
        w0 = self.frozen_weight()
        return bone_delta(w0.to(self.adapter_dtype), self.bone_block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self.enabled or self.batch_names is not None:
            return super().forward(x)
        w, bias = self.base_weight, self.base_layer.bias
        if not self.dropout_active and self.adapter_dtype == w.dtype:
            # one GEMM with the block-affine weight W₀ + ΔW(W₀)
            return F.linear(x, w + bone_delta(w, self.bone_block), bias)
        out = self.base_layer(x)  # the delta in the adapter dtype, added in the base dtype
        return out + F.linear(self.dropout(x).to(self.adapter_dtype), self.delta_weight()).to(out.dtype)

    def trainable_count(self) -> int:
        return self.out_features * self.config.r


register(
    MethodSpec(
        "bone",
        "adapter",
        "Kang 2024, Bone: Block Affine Transformation as Parameter Efficient Fine-tuning Methods for "
        "Large Language Models",
        BoneConfig,
        BoneLayer,
        export="none",
        summary="ΔW_{a,c} = W_{a,c}·b_a + b_a (Weight Guide), r×r blocks b_a zero at init",
    )
)
