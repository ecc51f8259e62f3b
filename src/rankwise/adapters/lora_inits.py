"""LoRA-shaped methods that reuse ``LoRALayer`` unchanged: three initializations (the math lives in
``adapters.init``) and one optimizer recipe.

* ``pissa``  — PiSSA (Meng et al. 2024): principal singular part of W₀ as the trainable factors.
* ``olora``  — OLoRA (Büyükakyüz 2024): QR of W₀, orthonormal B.
* ``lora_ga`` — LoRA-GA (Wang et al. 2024): factors from the SVD of the estimated full gradient,
  stable scale ζ = d_out^{1/4}/√γ (``stable_gamma``).
* ``lora_one`` — LoRA-One (Zhang, Liu & Chen 2025): B₀, A₀ from the top-r SVD of −G (the one-step full
  gradient), B₀A₀ = U_r S_r V_rᵀ/(γ·s₁) (``stable_gamma``), base not offset.
* ``loftq`` — LoftQ (Li et al. 2023): alternating 4-bit quantization and SVD; the base becomes Q_T,
  the factors the best rank-r part of W₀ − Q_T (``loftq_iter`` = T).
* ``loraplus`` — LoRA+ (Hayou et al. 2024): plain LoRA trained with lr_B = λ·lr_A; the recipe is
  ``rankwise.optim.loraplus_groups(model, lr, ratio=λ)``.
* ``flora_batched`` — FLoRA's setting (Wen & Chaudhuri 2024): plain LoRA adapters, one per request,
  served together: ``model(..., adapter_names=[...])`` computes every example's own adapter in one
  vectorised pass (``adapters.batched``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..checks import positive
from ..param_groups import loraplus_groups
from .lora import LoRAConfig, LoRALayer, QLoRAConfig
from .registry import MethodSpec, register


@dataclass
class LoRAGAConfig(LoRAConfig):
    """LoRA options plus LoRA-GA's γ of the stable scale ζ = d_out^{1/4}/√γ (paper default 16)."""

    stable_gamma: float = 16.0

    def validate(self) -> None:
        super().validate()
        positive("stable_gamma", self.stable_gamma)


@dataclass
class LoRAOneConfig(LoRAConfig):
    """LoRA options plus LoRA-One's γ of the stable scale B₀A₀ = U_r S_r V_rᵀ/(γ·s₁) (official default 128)."""

    init: str = "lora_one"
    stable_gamma: float = 128.0

    def validate(self) -> None:
        super().validate()
        positive("stable_gamma", self.stable_gamma)


register(
    MethodSpec(
        "pissa",
        "init",
        "Meng et al. 2024, PiSSA: Principal Singular Values and Singular Vectors Adaptation of Large Language Models",
        LoRAConfig,
        LoRALayer,
        defaults={"init": "pissa"},
        summary="B·A = top-r SVD part of W₀, base keeps the residual; init_iters=k for randomized SVD",
    )
)
register(
    MethodSpec(
        "olora",
        "init",
        "Büyükakyüz 2024, OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models",
        LoRAConfig,
        LoRALayer,
        defaults={"init": "olora"},
        summary="B, A = first r columns / rows of the QR of W₀, base offset by −s·B·A",
    )
)
register(
    MethodSpec(
        "lora_ga",
        "init",
        "Wang et al. 2024, LoRA-GA: Low-Rank Adaptation with Gradient Approximation",
        LoRAGAConfig,
        LoRALayer,
        defaults={"init": "lora_ga"},
        summary="A₀, B₀ from the SVD of the estimated gradient (needs init_data), stable scale, base offset",
    )
)
register(
    MethodSpec(
        "lora_one",
        "init",
        "Zhang, Liu & Chen 2025, LoRA-One: One-Step Full Gradient Could Suffice for Fine-Tuning Large Language "
        "Models, Provably and Efficiently",
        LoRAOneConfig,
        LoRALayer,
        defaults={"init": "lora_one"},
        summary="B₀A₀ = top-r SVD of −G (one-step full gradient, needs init_data) / (γ·s₁); base not offset",
    )
)
register(
    MethodSpec(
        "loftq",
        "quantization",
        "Li et al. 2023, LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models",
        QLoRAConfig,
        LoRALayer,
        defaults={"init": "loftq"},
        summary="base Q_T, s·B·A = top-r SVD of W₀ − Q_T, alternating T = loftq_iter times; starts ≈ W₀",
    )
)
@dataclass
class LoRAPlusConfig(LoRAConfig):
    """Plain LoRA trained with η_B = ``ratio``·η_A (LoRA+, Hayou et al. 2024, Sec. 3; λ = 2⁴ recommended)."""

    ratio: float = 16.0

    def validate(self) -> None:
        super().validate()
        positive("ratio", self.ratio)

    def training_optimizer(self, model: nn.Module, adapter_name: str, lr: float, weight_decay: float = 0.0,
                           **kwargs: Any) -> torch.optim.Optimizer:
        """What ``rankwise.train.train`` trains this adapter with: AdamW over ``loraplus_groups`` (``lora_B`` at
        ``ratio``·lr, every other trainable parameter at lr)."""
        groups = loraplus_groups(model, lr, ratio=self.ratio, weight_decay=weight_decay)
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, **kwargs)

register(
    MethodSpec(
        "loraplus",
        "training-dynamics",
        "Hayou et al. 2024, LoRA+: Efficient Low Rank Adaptation of Large Models",
        LoRAPlusConfig,
        LoRALayer,
        summary="plain LoRA trained by the loop with lr_B = ratio·lr_A (ratio 16; rankwise.optim.loraplus_groups)",
    )
)
register(
    MethodSpec(
        "flora_batched",
        "multi-adapter",
        "Wen & Chaudhuri 2024, Batched Low-Rank Adaptation of Foundation Models",
        LoRAConfig,
        LoRALayer,
        summary="plain LoRA adapters served per example: model(..., adapter_names=[...]) runs every example's "
                "own adapter in one vectorised pass (two bmm per layer, ranks padded)",
    )
)
