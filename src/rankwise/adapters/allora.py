"""ALLoRA (Huang & Balestriero 2025, "ALLoRA: Adaptive Learning Rate Mitigates LoRA Fatal Flaws").

A dropout-free, scaling-free LoRA (ΔW = B·A, no α, no dropout) whose every factor row takes a step
scaled by an adaptive learning rate inversely proportional to the row's ℓ2 norm:

    w_i ← w_i + c_i·Δ_i,    c_i = 1 / sqrt(‖w_i‖² + 1/η²)

where Δ_i is the step the optimizer takes for row i (−lr·g_i for SGD), w_i a row of ``lora_A``
(one rank component, r rows of length in) or of ``lora_B`` (one output, out rows of length r), and
η the largest multiplier (a zero row, e.g. a row of B at init, moves η× faster than plain LoRA; the
multiplier falls as 1/‖w_i‖ once the row has grown). The norms are read before the step.

The layer is ``LoRALayer`` with scale 1; the coefficient is applied by :class:`ALLoRAStep`, a loop
callback that ``rankwise.train.train`` attaches by itself (``config.training_callbacks``); in a
hand-written loop call ``before_step()`` after ``backward()`` and ``after_step()`` after
``optimizer.step()``. The learned update is a plain rank-r product (PEFT LoRA export, α = r).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..callbacks import Callback, TrainState
from ..checks import positive
from .lora import LoRAConfig, LoRALayer
from .registry import MethodSpec, adapter_layers, register


@dataclass
class ALLoRAConfig(LoRAConfig):
    """LoRA without α or dropout, plus η (``eta``): the per-row multiplier 1/sqrt(‖w_i‖² + 1/η²) is at most η."""

    eta: float = 1.0

    def validate(self) -> None:
        super().validate()
        positive("eta", self.eta)
        if self.alpha is not None or self.use_rslora:
            raise ValueError(f"alpha={self.alpha!r}, use_rslora={self.use_rslora!r}: ALLoRA has no scaling factor "
                             "(ΔW = B·A); leave alpha=None and use_rslora=False")
        if self.dropout != 0:
            raise ValueError(f"dropout={self.dropout!r}: ALLoRA is dropout-free; leave dropout=0")

    @property
    def scale(self) -> float:
        return 1.0

    def training_callbacks(self, model: nn.Module, adapter_name: str, optimizer: Any = None) -> list[Callback]:
        """What ``rankwise.train.train`` runs with this adapter: the per-row step scaling."""
        return [ALLoRAStep(model, adapter_name)]


def row_coefficients(weight: torch.Tensor, eta: float) -> torch.Tensor:
    """c_i = 1/sqrt(‖w_i‖² + 1/η²) for every row i of ``weight`` (shape (rows, 1), fp32)."""
    sq = weight.detach().float().pow(2).sum(dim=1, keepdim=True)
    return torch.rsqrt(sq + 1.0 / eta**2)


class ALLoRAStep(Callback):
    """Scales each optimizer step of every ``lora_A`` / ``lora_B`` row by ALLoRA's coefficient (see module doc)."""

    def __init__(self, model: nn.Module, adapter_name: str | None = None) -> None:
        layers = [layer for _, layer in adapter_layers(model, adapter_name) if isinstance(layer, LoRALayer)]
        if not layers:
            raise ValueError("model has no LoRA layers to train with ALLoRA (rw.adapt(model, 'allora') first)")
        self.params: list[tuple[nn.Parameter, float]] = [
            (p, float(getattr(layer.config, "eta", 1.0))) for layer in layers for p in (layer.lora_A, layer.lora_B)
        ]
        self._before: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    @torch.no_grad()
    def before_step(self) -> None:
        """Keep each factor and its rows' coefficients as they are before the optimizer step."""
        self._before = [(p.detach().clone(), row_coefficients(p, eta)) for p, eta in self.params]

    @torch.no_grad()
    def after_step(self) -> None:
        """w ← w_before + c·(w − w_before): the optimizer's step, row i scaled by c_i."""
        if self._before is None:
            raise ValueError("ALLoRAStep.after_step() needs before_step() after backward, before optimizer.step()")
        for (p, _), (old, c) in zip(self.params, self._before, strict=True):
            p.copy_(old + c.to(p.dtype) * (p - old))
        self._before = None

    def on_after_backward(self, state: TrainState) -> None:
        self.before_step()

    def on_step_end(self, state: TrainState) -> None:
        self.after_step()


register(
    MethodSpec(
        "allora",
        "training-dynamics",
        "Huang & Balestriero 2025, ALLoRA: Adaptive Learning Rate Mitigates LoRA Fatal Flaws",
        ALLoRAConfig,
        LoRALayer,
        summary="LoRA without α and dropout; each row of A and B steps with lr·1/sqrt(‖row‖² + 1/η²) "
                "(the loop applies it: ALLoRAStep)",
    )
)
