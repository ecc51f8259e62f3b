"""LoRA-GGPO (Chang et al. 2025, "LoRA-GGPO: Mitigating Double Descent in LoRA Fine-Tuning via
Gradient-Guided Perturbation Optimization", arXiv 2502.14538v1).

Sharpness-aware LoRA in the full weight space: every training forward runs at the perturbed
effective weight W' + ε (W' = W₀ + s·B·A), so each optimizer step takes the gradient of the LoRA
factors at the perturbed point; ε is never written into a parameter (the stored factors after a
step are the unperturbed ones minus the optimizer's update, and evaluation runs without ε). Row i
of ε (one output feature, n = in_features entries) is Gaussian with a scale built from the row's
weight norm and gradient norm:

    ε_i = (σ·‖W'_i‖ + β·‖G_i‖²) / √n · z_i,    z_i ~ N(0, I_n),

with G = s(g_B·A + B·g_A), the weight-space gradient the LoRA factors' gradients give, taken from
the previous step's backward (the cached estimate: one forward/backward per step; the first step
has G = 0). σ = β = 0 is plain LoRA, step for step.

What is and is not the paper's: the abstract says only that the perturbation is built from
gradient and weight norms. The paper's method section was not available offline and the official
repository (github.com/llm172/LoRA-GGPO) now holds its successor, LoRA-MGPO (momentum-guided, a
different rule). The row-wise Gaussian form above, its 1/√n factor, the combination
σ‖W'_i‖ + β‖G_i‖² and the previous-step G follow the one public implementation we could read
(kohya-ss sd-scripts' ``ggpo_sigma`` / ``ggpo_beta``, third-party; its defaults 0.03 / 0.01 are
ours too); they are not checked against the paper.

The layer is ``LoRALayer`` plus the perturbation term; :class:`GGPOPerturbation` is the loop
callback (attached by ``rankwise.train.train`` through ``config.training_callbacks``); in a
hand-written loop call ``record()`` after ``backward()`` and ``perturb()`` after ``optimizer.step()``.
The learned update is a plain rank-r product (PEFT LoRA export).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..callbacks import Callback, TrainState
from ..checks import non_negative
from ..shards import full
from .lora import LoRAConfig, LoRALayer
from .registry import MethodSpec, adapter_layers, register


@dataclass
class LoRAGGPOConfig(LoRAConfig):
    """LoRA options plus the perturbation's weights of the weight-norm term (``ggpo_sigma``, σ) and of
    the gradient-norm term (``ggpo_beta``, β); both 0 = plain LoRA."""

    ggpo_sigma: float = 0.03
    ggpo_beta: float = 0.01

    def validate(self) -> None:
        super().validate()
        for name in ("ggpo_sigma", "ggpo_beta"):
            non_negative(name, getattr(self, name))

    def training_callbacks(self, model: nn.Module, adapter_name: str, optimizer: Any = None) -> list[Callback]:
        """What ``rankwise.train.train`` runs with this adapter: the per-step perturbation."""
        return [GGPOPerturbation(model, adapter_name)]


class LoRAGGPOLayer(LoRALayer):
    """``LoRALayer`` whose training forward adds ε·x (``perturbation``, set by :class:`GGPOPerturbation`)."""

    method = "lora_ggpo"

    def __init__(self, base_layer: nn.Module, config: LoRAGGPOConfig, ctx: Any) -> None:
        super().__init__(base_layer, config, ctx)
        self.perturbation: torch.Tensor | None = None  # (out, in); not a parameter, never saved

    @property
    def perturbed(self) -> bool:
        return self.training and self.perturbation is not None

    def delta_forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().delta_forward(x)
        if self.perturbed:
            assert self.perturbation is not None
            out = out + self.base_map(x, self.perturbation.to(x.dtype if x.is_floating_point() else out.dtype))
        return out

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        return None if self.perturbed else super()._fused_forward(x)

    def effective_weight(self) -> torch.Tensor:
        """W' = W₀ + s·B·A in fp32 (the weight ε perturbs)."""
        b, a = full(self.lora_B.detach()), full(self.lora_A.detach())  # gathered under FSDP2
        return full(self.base_weight.detach()).float() + ((b @ a) * self.scale).float()

    def weight_space_gradient(self) -> torch.Tensor | None:
        """G = s(g_B·A + B·g_A) from the factors' current gradients (None without gradients)."""
        ga, gb = self.lora_A.grad, self.lora_B.grad
        if ga is None or gb is None:
            return None
        ga, gb = full(ga), full(gb)  # FSDP2's reduced gradients, gathered
        a, b = full(self.lora_A.detach()).float(), full(self.lora_B.detach()).float()
        return self.scale * (gb.float() @ a + b @ ga.float())


def row_std(weight: torch.Tensor, grad_sq: torch.Tensor, sigma: float, beta: float) -> torch.Tensor:
    """(σ·‖W'_i‖ + β·‖G_i‖²)/√n per row i of ``weight`` (``grad_sq``: ‖G_i‖², shape (out,))."""
    w_norm = weight.float().pow(2).sum(dim=1).sqrt()
    return (sigma * w_norm + beta * grad_sq.float()) / weight.shape[1] ** 0.5


def draw_perturbation(weight: torch.Tensor, grad_sq: torch.Tensor, sigma: float, beta: float,
                      generator: torch.Generator) -> torch.Tensor:
    """ε = row_std ⊙ z with z ~ N(0, 1) drawn from ``generator`` (CPU), shape of ``weight``."""
    z = torch.randn(weight.shape, generator=generator)
    std = row_std(weight.cpu(), grad_sq.cpu(), sigma, beta)
    return (std[:, None] * z).to(weight.device)


def step_generator(seed: int, step: int, name: str) -> torch.Generator:
    """The generator of step ``step``'s noise in layer ``name`` (reproducible, nothing to checkpoint)."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + step * 7_919 + zlib.crc32(name.encode())) % (2**63))
    return g


class GGPOPerturbation(Callback):
    """Sets each LoRA-GGPO layer's ε before every training forward (module doc).

    ``record()`` after ``backward()`` keeps ‖G_i‖² of every layer; ``perturb()`` draws the next ε
    from the current weights and those norms; ``clear()`` removes it."""

    def __init__(self, model: nn.Module, adapter_name: str | None = None) -> None:
        self.layers = [(n, m) for n, m in adapter_layers(model, adapter_name) if isinstance(m, LoRAGGPOLayer)]
        if not self.layers:
            raise ValueError("model has no LoRA-GGPO layers (rw.adapt(model, 'lora_ggpo') first)")
        self.grad_sq: dict[str, torch.Tensor] = {}
        self.steps = 0  # perturbations drawn so far

    @torch.no_grad()
    def record(self) -> None:
        """‖G_i‖² of every layer from the gradients just computed (at the perturbed point)."""
        for name, layer in self.layers:
            g = layer.weight_space_gradient()
            if g is not None:
                self.grad_sq[name] = g.pow(2).sum(dim=1).cpu()

    @torch.no_grad()
    def perturb(self) -> None:
        """Draw ε for the next forward of every layer (σ = β = 0: no perturbation)."""
        for name, layer in self.layers:
            cfg: LoRAGGPOConfig = layer.config
            if cfg.ggpo_sigma == 0 and cfg.ggpo_beta == 0:
                layer.perturbation = None
                continue
            w = layer.effective_weight()
            g_sq = self.grad_sq.get(name, torch.zeros(w.shape[0]))
            gen = step_generator(cfg.seed, self.steps, name)
            eps = draw_perturbation(w, g_sq, cfg.ggpo_sigma, cfg.ggpo_beta, gen)
            layer.perturbation = eps.to(layer.adapter_dtype)
        self.steps += 1

    def clear(self) -> None:
        for _, layer in self.layers:
            layer.perturbation = None

    def on_train_begin(self, state: TrainState) -> None:
        if self.steps:  # resumed: redraw the perturbation of the step about to run
            self.steps -= 1
        self.perturb()

    def on_after_backward(self, state: TrainState) -> None:
        self.record()

    def on_step_end(self, state: TrainState) -> None:
        self.perturb()

    def on_train_end(self, state: TrainState) -> None:
        self.clear()

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "grad_sq": dict(self.grad_sq)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.grad_sq = {str(k): v for k, v in state["grad_sq"].items()}


register(
    MethodSpec(
        "lora_ggpo",
        "training-dynamics",
        "Chang et al. 2025, LoRA-GGPO: Mitigating Double Descent in LoRA Fine-Tuning via Gradient-Guided "
        "Perturbation Optimization",
        LoRAGGPOConfig,
        LoRAGGPOLayer,
        summary="LoRA whose training forward runs at W' + ε, ε_i = (σ‖W'_i‖ + β‖G_i‖²)/√n·z_i, z ~ N(0, I), from "
                "the weight and (previous-step) gradient row norms; σ = β = 0 is LoRA (the loop draws ε)",
    )
)

__all__ = ["GGPOPerturbation", "LoRAGGPOConfig", "LoRAGGPOLayer", "draw_perturbation", "row_std", "step_generator"]
