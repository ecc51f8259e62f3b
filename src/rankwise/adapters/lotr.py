"""LoTR (Bershatsky et al. 2024, "LoTR: Low Tensor Rank Weight Adaptation").

The updates of a sequence of layers form a tensor in Tucker-2 form: the left and right factors are
shared by the layers and each layer has only its own small core (paper Sec. 3):

    ΔW_l = s · U · G_l · V ,    U ∈ ℝ^{out×r}, V ∈ ℝ^{r×in} shared,  G_l ∈ ℝ^{r×r} per layer,  s = α/r

All three train. The adapted layers with the same (out, in) shape share one (U, V) pair, one
``nn.Parameter`` each registered in every such layer (so a step sums the gradients of all of them),
as the authors' code shares one LoTR container among the layers it replaces. As there, U and V start
~ N(0, 1) and G_l at 0 (ΔW = 0), drawn from ``seed``. ΔW_l is the rank-r product (U·G_l)·V: PEFT LoRA
export.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..targets import linear_shape, linear_weight
from .base import AdapterLayer, AlphaConfig
from .init import InitContext
from .registry import MethodSpec, register

Shared = dict[tuple[int, int], tuple[nn.Parameter, nn.Parameter]]


@dataclass
class LoTRConfig(AlphaConfig):
    """LoTR: ``r`` the Tucker rank (core r×r), ``alpha`` the scale numerator (s = α/r; authors' default 1)."""

    alpha: float = 1.0
    alpha_optional: ClassVar[bool] = False


def lotr_factors(seed: int, r: int, shapes: list[tuple[int, int]], like: torch.Tensor, dtype: torch.dtype) -> Shared:
    """One trainable (U: out×r, V: r×in) pair ~ N(0, 1) per distinct (out, in) shape, drawn from ``seed``
    in the order of first appearance."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    out: Shared = {}
    for out_f, in_f in dict.fromkeys(shapes):
        u, v = torch.randn(out_f, r, generator=g), torch.randn(r, in_f, generator=g)
        out[(out_f, in_f)] = (nn.Parameter(u.to(device=like.device, dtype=dtype)),
                              nn.Parameter(v.to(device=like.device, dtype=dtype)))
    return out


class LoTRLayer(AdapterLayer):
    """Shared trainable ``lotr_U`` (out×r) and ``lotr_V`` (r×in), this layer's trainable core ``lotr_G`` (r×r)."""

    method = "lotr"
    crosses_layers = True  # see AdapterLayer.crosses_layers (FSDP2 groups)

    @classmethod
    def build_shared(cls, config: LoTRConfig, layers: list[nn.Module]) -> Shared:
        w = linear_weight(layers[0])
        return lotr_factors(config.seed, config.r, [linear_shape(lin) for lin in layers], w,
                            config.dtype_for(w.dtype))

    def __init__(self, base_layer: nn.Module, config: LoTRConfig, ctx: InitContext) -> None:
        super().__init__(base_layer, config)
        shared = ctx.extra.get("shared") or self.build_shared(config, [base_layer])
        u, v = shared[(self.out_features, self.in_features)]
        if u.shape[1] != config.r:
            raise ValueError(
                f"r={config.r} differs from the r={u.shape[1]} of the factors shared by all LoTR layers; "
                "per-layer r overrides are not supported by lotr"
            )
        self.lotr_U, self.lotr_V = u, v  # the same Parameter objects in every layer of this shape
        self.lotr_G = nn.Parameter(torch.zeros(config.r, config.r, device=u.device, dtype=u.dtype))
        self.scale = config.scale

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self.lotr_U @ self.lotr_G, self.lotr_V, self.scale

    def delta_weight(self) -> torch.Tensor:
        return (self.lotr_U @ self.lotr_G @ self.lotr_V) * self.scale

    def trainable_count(self) -> int:
        """The parameters this layer trains: its core plus the shared U, V (each counted in every layer)."""
        r = self.config.r
        return r * r + r * (self.out_features + self.in_features)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", scale={self.scale:g}"


register(
    MethodSpec(
        "lotr",
        "adapter",
        "Bershatsky et al. 2024, LoTR: Low Tensor Rank Weight Adaptation",
        LoTRConfig,
        LoTRLayer,
        summary="ΔW_l = (α/r)·U·G_l·V: U, V trained and shared by all adapted layers of one shape, "
                "a per-layer r×r core G_l (0 at init)",
    )
)
