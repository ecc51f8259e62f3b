"""ARD-LoRA (Shinwari & Usama 2025, "ARD-LoRA: Dynamic Rank Allocation for Parameter-Efficient Fine-Tuning of
Foundation Models with Heterogeneous Adaptation Needs", arXiv 2506.18267).

Every attention head h of a layer has its own LoRA pair (Bₕ: d_h×r₀, Aₕ: r₀×in) and a learnable scaling
factor αₕ ∈ [0, 1] that sets its rank continuously, rₕ = r₀·αₕ: component i of the head is weighted by
mₕᵢ = clamp(r₀·αₕ − i, 0, 1), so the first ⌊r₀αₕ⌋ components are fully on, the next one fractionally, the
rest off; ΔWₕ = s·Bₕ·diag(mₕ)·Aₕ (s = α/r₀) and the loss is differentiable in αₕ. The factors are trained on
the meta-objective L_task + λ‖α‖₁ + β·TV(α), TV(α) = Σₜ|α(t) − α(t−1)| over training steps: the optimizer
steps α on L_task, then the controller applies the exact proximal map of ηλ‖·‖₁ + ηβ|· − α(t−1)| and the
projection on [0, 1] (η the optimizer's learning rate). ℓ1 drives unneeded heads' ranks to exactly 0,
TV suppresses small back-and-forth rank changes. The components with mₕᵢ = 0 carry no weight: the compact
LoRA keeps Σₕ ⌈r₀αₕ⌉ ranks per layer (``peft_factors``, PEFT export with ``rank_pattern``).

Heads: the query/key/value projections of a recognised (Llama- or BERT-style) block split their output in
the model's (key-value) heads; every other layer is one group (one α for the whole layer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..callbacks import TrainState
from ..checks import integer, non_negative
from ..layout import STYLES, attention_layout
from ..rng import kaiming_uniform_, layer_generator
from ..shards import editing, full
from .base import AdapterLayer, AlphaConfig
from .init import InitContext
from .rank_control import MethodController, param_lr, rank_at_least_one
from .registry import MethodSpec, adapter_layers, register

__all__ = ["ARDLoRAConfig", "ARDLoRAController", "ARDLoRALayer", "component_mask", "head_counts", "head_ranks",
           "prox_l1_tv", "rank_pattern"]


@dataclass
class ARDLoRAConfig(AlphaConfig):
    """``r`` the rank r₀ of every head (its maximum), ``alpha`` (None: α = r₀) with s = α/r₀, ``l1`` λ of the
    sparsity term, ``tv`` β of the Total-Variation term, ``heads`` the heads of a layer (None: from the model's
    attention layout, set per layer by ``adapt``; an int: that many equal output groups in every layer)."""

    l1: float = 0.5
    tv: float = 0.25
    heads: int | None = None

    def validate(self) -> None:
        super().validate()
        non_negative("l1", self.l1)
        non_negative("tv", self.tv)
        if self.heads is not None:
            integer("heads", self.heads, 1)


def component_mask(scales: torch.Tensor, r: int) -> torch.Tensor:
    """mₕᵢ = clamp(r·αₕ − i, 0, 1) (heads × r): head h's rank r·αₕ as weights of its r components."""
    return torch.clamp(scales[:, None] * r - torch.arange(r, dtype=scales.dtype, device=scales.device), 0.0, 1.0)


class ARDLoRALayer(AdapterLayer):
    """``y = W x + s·[Bₕ diag(mₕ) Aₕ x]ₕ`` over the layer's heads: trainable ``lora_A`` (heads·r × in; head h's
    Aₕ are rows h·r … h·r + r − 1), ``lora_B`` (out × r; head h's Bₕ are its d_h output rows) and
    ``head_scale`` α (heads). Init: A as ``nn.Linear``, B = 0, α = 1 (every head at rank r; the model starts
    at the base)."""

    method = "ard_lora"

    def __init__(self, base_layer: nn.Module, config: ARDLoRAConfig, ctx: InitContext) -> None:
        super().__init__(base_layer, config)
        heads, r, dtype, device = config.heads or 1, config.r, self.adapter_dtype, self.base_weight.device
        if self.out_features % heads:
            raise ValueError(f"heads={heads} does not divide the {self.out_features} outputs of '{ctx.name}'")
        self.heads, self.scale = heads, config.scale
        self.lora_A = nn.Parameter(torch.zeros(heads * r, self.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=dtype, device=device))
        self.head_scale = nn.Parameter(torch.ones(heads, dtype=dtype, device=device))
        if not ctx.skip:
            kaiming_uniform_(self.lora_A, generator=layer_generator(config.seed, ctx.name))

    def mask(self) -> torch.Tensor:
        """The component weights m (heads × r)."""
        return component_mask(self.head_scale, self.config.r)

    def head_ranks(self) -> torch.Tensor:
        """⌈r·αₕ⌉ per head: the components with mₕᵢ > 0."""
        return (component_mask(full(self.head_scale), self.config.r) > 0).sum(dim=1)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(B′, A, s)``: B′ (out × heads·r) block-diagonal, head h's block Bₕ·diag(mₕ) on its rows and columns."""
        r = self.config.r
        blocks = self.lora_B.view(self.heads, -1, r) * self.mask()[:, None, :]
        return torch.block_diag(*blocks.unbind(0)), self.lora_A, self.scale

    def delta_weight(self) -> torch.Tensor:
        b, a, s = self.factors()
        return b @ a * s

    def peft_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The compact LoRA: :meth:`factors` over the components with m > 0 only (Σₕ ⌈r·αₕ⌉ ranks; one zero
        rank when none is left, as PEFT needs r ≥ 1); same ΔW."""
        b, a, s = self.factors()
        keep = torch.nonzero(self.mask().detach().reshape(-1)).view(-1)
        b, a = rank_at_least_one(b[:, keep], a[keep])
        return b, a, s

    def trainable_count(self) -> int:
        return self.config.r * (self.heads * self.in_features + self.out_features) + self.heads

    def extra_repr(self) -> str:
        return super().extra_repr() + f", heads={self.heads}"


def head_counts(model: nn.Module) -> dict[str, int]:
    """``{module name: heads}`` for the query (attention heads) and key / value projections (key-value heads)
    of the model's Llama- or BERT-style blocks; empty for a model without such blocks."""
    names = [n for n, _ in model.named_modules()]
    if not any(n == s["q"] or n.endswith("." + s["q"]) for s in STYLES.values() for n in names):
        return {}
    counts = {}  # from the config's head counts: the projections may already hold other adapters
    for style, prefix, heads, kv_heads, _ in attention_layout(model, "ard_lora", "attention block"):
        counts.update({prefix + style["q"]: heads, prefix + style["k"]: kv_heads, prefix + style["v"]: kv_heads})
    return counts


def _plan(model: nn.Module, layer_cfgs: dict[str, ARDLoRAConfig], init_data: Any, init_batches: int
          ) -> dict[str, tuple[dict[str, Any], None]]:
    """Each layer's ``heads`` (the config's, else from the model's attention layout, else 1), stored as a
    per-layer override so a saved adapter rebuilds the same heads."""
    counts = head_counts(model)
    return {n: ({"heads": cfg.heads or counts.get(n, 1)}, None) for n, cfg in layer_cfgs.items()}


def prox_l1_tv(v: torch.Tensor, anchor: torch.Tensor, l1: float, tv: float) -> torch.Tensor:
    """argminₓ ½(x − v)² + l1·|x| + tv·|x − anchor|, elementwise and exact: the objective is convex and
    piecewise quadratic, so its minimiser is a kink (0 or the anchor) or the stationary point
    v − l1·s₁ − tv·s₂ of one piece (s₁, s₂ = ±1); the candidate with the least objective is it."""
    signs = ((1.0, 1.0), (1.0, -1.0), (-1.0, 1.0), (-1.0, -1.0))
    cands = torch.stack([anchor, torch.zeros_like(v), *(v - l1 * s1 - tv * s2 for s1, s2 in signs)])
    objective = 0.5 * (cands - v) ** 2 + l1 * cands.abs() + tv * (cands - anchor).abs()
    return cands.gather(0, objective.argmin(dim=0, keepdim=True)).squeeze(0)


def head_ranks(model: nn.Module, name: str | None = None) -> dict[str, list[int]]:
    """``{layer: [⌈r·αₕ⌉ per head]}``."""
    return {n: m.head_ranks().tolist() for n, m in adapter_layers(model, name) if isinstance(m, ARDLoRALayer)}


def rank_pattern(model: nn.Module, name: str | None = None) -> dict[str, int]:
    """``{layer: rank of the compact LoRA}``: Σₕ ⌈r·αₕ⌉."""
    return {n: sum(ranks) for n, ranks in head_ranks(model, name).items()}


class ARDLoRAController(MethodController):
    """ARD-LoRA's regularised update of the head scales α, after every optimizer step.

    ``on_after_backward`` (or :meth:`record` in a hand-written loop, before ``optimizer.step()``) keeps
    α(t−1); ``on_step_end`` (or :meth:`step`, after it) replaces the optimizer's α̃ by
    clamp(prox_{ηλ‖·‖₁ + ηβ|· − α(t−1)|}(α̃), 0, 1) with η the learning rate of α's group. Logs the
    compact rank Σ ⌈r·αₕ⌉ as ``ard_lora_rank`` and Σ|α(t) − α(t−1)| as ``ard_lora_change``. It keeps no state
    across steps (α(t−1) is taken anew before each step), so a resumed run needs none from the checkpoint."""

    def __init__(self, model: nn.Module, name: str = "default", optimizer: torch.optim.Optimizer | None = None
                 ) -> None:
        super().__init__(model, name)
        self.config, self.optimizer = self.adapter_config(ARDLoRAConfig), optimizer
        self.layers = [m for _, m in adapter_layers(model, name) if isinstance(m, ARDLoRALayer)]
        self.anchors: list[torch.Tensor] | None = None
        self.change = 0.0

    def schedule(self) -> str:
        return f"l1={self.config.l1}, tv={self.config.tv}, every step"

    def on_train_begin(self, state: TrainState) -> None:
        self.optimizer = self.optimizer or state.optimizer

    def record(self) -> None:
        """Keep α(t−1), the head scales before this optimizer step."""
        self.anchors = [full(m.head_scale.detach()).clone() for m in self.layers]  # whole under FSDP2

    @torch.no_grad()
    def step(self) -> None:
        """α ← clamp(prox(α̃), 0, 1) in every layer, around the α(t−1) kept by :meth:`record`."""
        if self.anchors is None:
            raise ValueError("ARDLoRAController.step: call record() before optimizer.step()")
        self.change = 0.0
        for layer, anchor in zip(self.layers, self.anchors, strict=True):
            p, cfg = layer.head_scale, layer.config
            lr = param_lr(self.optimizer, p, "ARD-LoRA's head_scale")
            with editing(p) as a:
                a.copy_(prox_l1_tv(a, anchor, lr * cfg.l1, lr * cfg.tv).clamp_(0.0, 1.0))
                self.change += float((a - anchor).abs().sum())
        self.anchors = None
        self.allocations += 1

    def on_after_backward(self, state: TrainState) -> None:
        self.record()

    def on_step_end(self, state: TrainState) -> None:
        self.step()
        state.log["ard_lora_rank"] = sum(int(m.head_ranks().sum()) for m in self.layers)
        state.log["ard_lora_change"] = self.change


def _controller(model: nn.Module, name: str, optimizer: Any, total_steps: int) -> ARDLoRAController:
    return ARDLoRAController(model, name, optimizer)


register(
    MethodSpec(
        "ard_lora",
        "rank-allocation",
        "Shinwari & Usama 2025, ARD-LoRA: Dynamic Rank Allocation for Parameter-Efficient Fine-Tuning of "
        "Foundation Models with Heterogeneous Adaptation Needs",
        ARDLoRAConfig,
        ARDLoRALayer,
        summary="per-head LoRA whose rank r₀·αₕ is a learned scale; ℓ1 + TV proximal steps on α; compact export",
        controller=_controller,
        plan=_plan,
    )
)
