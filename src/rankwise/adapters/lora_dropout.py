"""LoRA Dropout (Lin et al. 2024, "LoRA Dropout as a Sparsity Regularizer for Overfitting Control").

Dropout on the LoRA *parameter matrices*, not on the layer input (PEFT's ``lora_dropout`` field drops
the input; this method leaves ``dropout`` at 0). In every training forward, fresh Bernoulli masks drop
whole rows of B (output features) and whole columns of A (input features), each with probability p:

    ΔW̃ = s·(diag(m_B)·B)·(A·diag(m_A)) / (1 − p)²,    m_B ∈ {0,1}^out, m_A ∈ {0,1}^in,

so an entry ΔW_ij is dropped with probability 1 − (1 − p)² = 2p − p² (the sparsity of the paper's
bound), and 1/(1 − p) per mask keeps E[ΔW̃] = ΔW (torch's inverted-dropout convention). Evaluation
uses ΔW unmasked. The test-time ensemble (:func:`dropout_ensemble`) averages the predicted
probabilities of several forwards with masks drawn as in training. The learned ΔW = s·B·A exports as
PEFT LoRA.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..checks import fraction, integer
from .lora import LoRAConfig, LoRALayer
from .registry import MethodSpec, adapter_layers, register


@dataclass
class LoRADropoutConfig(LoRAConfig):
    """LoRA options plus ``param_dropout`` = p, the drop probability of each row of B and each column of A."""

    param_dropout: float = 0.1

    def validate(self) -> None:
        super().validate()
        fraction("param_dropout", self.param_dropout, allow_zero=True, allow_one=False, what="in [0, 1)")
        if self.dropout != 0:
            raise ValueError(f"dropout={self.dropout!r}: LoRA Dropout drops parameter rows / columns "
                             "(param_dropout), not the layer input; leave dropout=0")


class LoRADropoutLayer(LoRALayer):
    """``LoRALayer`` whose delta, in training (or inside :func:`masks_on`), uses freshly masked factors."""

    method = "lora_dropout"

    def __init__(self, base_layer: nn.Module, config: LoRADropoutConfig, ctx: Any) -> None:
        super().__init__(base_layer, config, ctx)
        self.param_dropout = float(config.param_dropout)
        self.force_masks = False  # masks outside training: the test-time ensemble
        self.train(base_layer.training)  # a new module trains by default; an eval-mode model stays unmasked

    @property
    def masks_active(self) -> bool:
        return (self.training or self.force_masks) and self.param_dropout > 0

    def masked_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(diag(m_B)·B/(1−p), A·diag(m_A)/(1−p)) with fresh masks: B's rows, A's columns."""
        keep = 1.0 - self.param_dropout
        b, a = self.lora_B, self.lora_A
        m_b = torch.bernoulli(torch.full((b.shape[0], 1), keep, dtype=b.dtype, device=b.device))
        m_a = torch.bernoulli(torch.full((1, a.shape[1]), keep, dtype=a.dtype, device=a.device))
        return b * m_b / keep, a * m_a / keep

    def delta_forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.masks_active:
            return super().delta_forward(x)
        b, a = self.masked_factors()
        return self.factor_map(x, b, a) * self.scale

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        return None if self.masks_active else super()._fused_forward(x)


@contextmanager
def masks_on(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every LoRA Dropout layer draws masks in eval mode too (the test-time ensemble)."""
    layers = [layer for _, layer in adapter_layers(model) if isinstance(layer, LoRADropoutLayer)]
    if not layers:
        raise ValueError("model has no LoRA Dropout layers (rw.adapt(model, 'lora_dropout') first)")
    for layer in layers:
        layer.force_masks = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.force_masks = False


@torch.no_grad()
def dropout_ensemble(model: nn.Module, inputs: dict[str, Any], samples: int = 8) -> torch.Tensor:
    """The test-time ensemble: the mean of softmax(logits) over ``samples`` forwards, each with fresh masks."""
    integer("samples", samples, 1)
    with masks_on(model):
        probs = [model(**inputs).logits.float().softmax(-1) for _ in range(samples)]
    return torch.stack(probs).mean(0)


register(
    MethodSpec(
        "lora_dropout",
        "training-dynamics",
        "Lin et al. 2024, LoRA Dropout as a Sparsity Regularizer for Overfitting Control",
        LoRADropoutConfig,
        LoRADropoutLayer,
        summary="LoRA whose training forward drops rows of B and columns of A (p = param_dropout, fresh masks "
                "each forward; no input dropout); dropout_ensemble averages masked forwards at test time",
    )
)
