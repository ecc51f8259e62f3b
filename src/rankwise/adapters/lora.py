"""LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models") and rsLoRA.

ΔW = s·B·A with A ∈ ℝ^{r×k}, B ∈ ℝ^{d×r}; s = α/r (LoRA) or α/√r (rsLoRA, Kalajdzievski 2023,
"A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA"). Default init: A ~ U(±1/√k)
(``nn.Linear``'s), B = 0, so the adapted model starts equal to the base. Other initializations
(PiSSA, OLoRA, LoRA-GA, ...) are functions in ``adapters.init`` selected by ``init``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..checks import choice, integer, positive
from ..rng import kaiming_uniform_, layer_generator
from .base import AdapterConfig, AdapterLayer
from .init import INITS, InitContext, lora_inits
from .registry import MethodSpec, register


@dataclass
class LoRAConfig(AdapterConfig):
    """LoRA hyper-parameters. ``alpha=None`` means α = r (scale 1 for plain LoRA)."""

    alpha: float | None = None
    use_rslora: bool = False
    init: str = "default"
    init_iters: int = 0  # power iterations for randomized SVD inits (0 = exact SVD)

    def validate(self) -> None:
        super().validate()
        choice("init", self.init, lora_inits())
        positive("alpha", self.alpha, optional=True)
        integer("init_iters", self.init_iters, 0)

    @property
    def scale(self) -> float:
        alpha = float(self.r if self.alpha is None else self.alpha)
        return alpha / math.sqrt(self.r) if self.use_rslora else alpha / self.r


class LoRALayer(AdapterLayer):
    """``y = W x + s·B(A x)``; trainable ``lora_A`` (r×in) and ``lora_B`` (out×r)."""

    method = "lora"

    @classmethod
    def needs_grad(cls, config: LoRAConfig) -> bool:
        return INITS[config.init].needs_grad

    def __init__(self, base_layer: nn.Module, config: LoRAConfig, ctx: InitContext) -> None:
        super().__init__(base_layer, config)
        r, dtype, device = config.r, self.adapter_dtype, self.base_weight.device
        self.scale = config.scale
        self.lora_A = nn.Parameter(torch.zeros(r, self.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=dtype, device=device))
        self.moves_base = INITS[config.init].moves_base
        if self.moves_base:
            # initial factors, kept to recover W₀ = W_base + s·B₀A₀ (export, unload, reload)
            self.register_buffer("init_A", torch.zeros_like(self.lora_A))
            self.register_buffer("init_B", torch.zeros_like(self.lora_B))
        if ctx.skip:
            return
        self._initialize(ctx)

    @torch.no_grad()
    def _initialize(self, ctx: InitContext) -> None:
        cfg: LoRAConfig = self.config
        if cfg.init == "default":
            kaiming_uniform_(self.lora_A, generator=layer_generator(cfg.seed, ctx.name))
            return
        w = self.base_weight.detach().float()
        f = INITS[cfg.init].fn(w, replace(ctx, config=cfg, r=cfg.r, scale=self.scale))
        b, a = f.left, f.right
        self.lora_B.copy_(b)
        self.lora_A.copy_(a)
        if self.moves_base:
            self.init_A.copy_(a)
            self.init_B.copy_(b)
            self.after_load()

    def base_offset_factors(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        return (self.init_B, self.init_A, self.scale) if self.moves_base else None

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self.lora_B, self.lora_A, self.scale

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scale

    def trainable_count(self) -> int:
        return self.config.r * (self.in_features + self.out_features)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", scale={self.scale:g}, init={self.config.init}"


register(
    MethodSpec(
        "lora",
        "adapter",
        "Hu et al. 2021, LoRA: Low-Rank Adaptation of Large Language Models",
        LoRAConfig,
        LoRALayer,
        summary="ΔW = (α/r)·B·A, B = 0 at init",
    )
)
register(
    MethodSpec(
        "rslora",
        "training-dynamics",
        "Kalajdzievski 2023, A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA",
        LoRAConfig,
        LoRALayer,
        defaults={"use_rslora": True},
        summary="LoRA with scale α/√r",
    )
)
