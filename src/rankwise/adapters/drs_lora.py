"""DRS-LoRA, Dynamic Rank-Selective LoRA (Lu et al. 2024, "Adaptive Rank, Reduced Forgetting: Knowledge
Retention in Continual Learning Vision-Language Models with Dynamic Rank-Selective LoRA", arXiv 2412.01004;
the authors call it CoDyRA).

Continual learning as a sequence of LoRA tasks. Within a task, ΔW = s·B·diag(g)·A (g: per-rank importance
weights, trained with A and B by the optimizer); a sparsity-promoting ℓ1 term is applied as a soft threshold
after each optimizer step, g ← sign(g)·max(|g| − κ(t), 0), so each module keeps the ranks the current
data needs (the rank criterion is the learned |gᵢ| against κ). At the end of a task the zero-weight ranks
are removed and, at the start of the next (:func:`next_task`), the task's s·B·diag(g)·A is merged into the
frozen weight and a fresh adapter of the initial rank starts: the model keeps the base architecture and
its inference cost.

Read from the paper's abstract and the released code (github.com/Artificer-AI-Lab/CoDyRA): g starts at
N(0, 1), A as ``nn.Linear``, B = 0, s = 1 (α = r); no threshold during the first ``dense_fraction`` of the
steps; then κ rises in ``kappa_steps`` equal stages to ``max_kappa`` (the code's staircase, 50 stages to
7e-4 from half of the run); κ is applied as it is, not multiplied by the learning rate (as the code).

The merged tasks stay recoverable: the layer keeps their factors as frozen buffers (``prev_A``, ``prev_B``,
ranks per task in ``task_ranks``) and declares them as a negative base offset (the frozen base holds
W₀ + Σ previous ΔW), so ``rw.unload`` gives W₀, ``rw.merge_and_unload`` the continually updated model,
``rw.export_peft`` a LoRA of every task's ranks relative to W₀ and ``rw.save_adapter`` /
``rw.load_adapter`` the whole sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ..callbacks import TrainState
from ..checks import fraction, integer, non_negative
from ..rng import kaiming_uniform_, layer_generator
from ..shards import full, require_resharding
from .base import AlphaConfig
from .init import InitContext
from .registry import MethodSpec, adapter_layers, adapter_state, register
from .sora import GateController, GatedLoRALayer, prune_zero_gates, soft_threshold

__all__ = ["DRSLoRAConfig", "DRSLoRAController", "DRSLoRALayer", "kappa_schedule", "next_task", "rank_pattern",
           "task_ranks"]


@dataclass
class DRSLoRAConfig(AlphaConfig):
    """``r`` the rank every task starts with, ``alpha`` (None: α = r, s = 1 as the code), ``max_kappa`` the
    final soft threshold κ, ``kappa_steps`` its stages, ``dense_fraction`` the share of a task's steps
    before any threshold. ``task_ranks`` is per-layer state (the ranks merged by each finished task)."""

    r: int = 16
    max_kappa: float = 7e-4
    kappa_steps: int = 50
    dense_fraction: float = 0.5
    task_ranks: list[int] = field(default_factory=list)

    def validate(self) -> None:
        super().validate()
        non_negative("max_kappa", self.max_kappa)
        integer("kappa_steps", self.kappa_steps, 1)
        fraction("dense_fraction", self.dense_fraction, allow_zero=True, allow_one=False, what="in [0, 1)")
        self.task_ranks = [integer("task_ranks", k, 0) for k in self.task_ranks]


class DRSLoRALayer(GatedLoRALayer):
    """The current task's ``s·B(g ⊙ (A x))`` over a base holding W₀ + the merged tasks; ``prev_A``
    (R×in), ``prev_B`` (out×R) are the merged tasks' factors (R = Σ ``task_ranks``, scale folded into B)."""

    method = "drs_lora"

    def __init__(self, base_layer: nn.Module, config: DRSLoRAConfig, ctx: InitContext) -> None:
        super().__init__(base_layer, config, ctx, config.scale)
        merged, dtype, device = sum(config.task_ranks), self.adapter_dtype, self.base_weight.device
        self.register_buffer("prev_A", torch.zeros(merged, self.in_features, dtype=dtype, device=device))
        self.register_buffer("prev_B", torch.zeros(self.out_features, merged, dtype=dtype, device=device))
        if not ctx.skip:
            self.reset_task(layer_generator(config.seed, ctx.name))

    @torch.no_grad()
    def reset_task(self, generator: torch.Generator, r: int | None = None) -> None:
        """A fresh adapter of rank ``r`` (default: the current): A as ``nn.Linear``, B = 0, g ~ N(0, 1)."""
        r = self.gate.numel() if r is None else r
        self.lora_A.data = kaiming_uniform_(self.lora_A.data.new_empty(r, self.in_features), generator=generator)
        self.lora_B.data = self.lora_B.data.new_zeros(self.out_features, r)
        self.gate.data = torch.randn(r, generator=generator).to(self.gate.data)
        self.lora_A.grad = self.lora_B.grad = self.gate.grad = None

    def base_offset_factors(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """The merged tasks as −ΔW_prev (the frozen base holds W₀ + ΔW_prev), or None before any merge."""
        return (-self.prev_B, self.prev_A, 1.0) if self.prev_A.shape[0] else None

    @torch.no_grad()
    def merge_task(self) -> int:
        """Fold the current s·B·diag(g)·A (its ranks with g ≠ 0) into the frozen base (unless the base is
        shared, where the offset carries it) and append it to ``prev_A`` / ``prev_B``; returns its rank."""
        keep = torch.nonzero(self.gate).view(-1)
        k = int(keep.numel())
        if k:
            b, a = (self.lora_B * self.gate)[:, keep] * self.scale, self.lora_A[keep]
            if not self.shares_base:
                w = self.base_weight
                self._set_base_weight(w + (b @ a).to(w.dtype))
            self.prev_A = torch.cat([self.prev_A, a])
            self.prev_B = torch.cat([self.prev_B, b], dim=1)
        self.config = replace(self.config, task_ranks=[*self.config.task_ranks, k])
        return k


def kappa_schedule(step: int, total_steps: int, config: DRSLoRAConfig) -> float:
    """κ after optimizer step ``step`` (1-based) of a ``total_steps`` task: 0 during the first
    D = ⌊dense_fraction·T⌋ steps, then max_kappa·min(n, ⌈(t − D)/L⌉)/n with n = ``kappa_steps`` stages
    of L = max(1, ⌊(T − D)/n⌋) steps."""
    dense = math.floor(config.dense_fraction * total_steps)
    if step <= dense:
        return 0.0
    n = config.kappa_steps
    stage = max(1, (total_steps - dense) // n)
    return config.max_kappa * min(n, math.ceil((step - dense) / stage)) / n


def rank_pattern(model: nn.Module, name: str | None = None) -> dict[str, int]:
    """``{layer: rank}`` of the current task: the importance weights gᵢ ≠ 0."""
    return {n: int((m.gate != 0).sum()) for n, m in adapter_layers(model, name) if isinstance(m, DRSLoRALayer)}


def task_ranks(model: nn.Module, name: str | None = None) -> dict[str, list[int]]:
    """``{layer: [rank merged by task 1, task 2, ...]}`` of the finished tasks."""
    return {n: list(m.config.task_ranks) for n, m in adapter_layers(model, name) if isinstance(m, DRSLoRALayer)}


def next_task(model: nn.Module, name: str | None = None) -> dict[str, int]:
    """End the current task and start the next: in every layer, drop the zero-weight ranks, merge the task's
    s·B·diag(g)·A into the frozen weight, and start a fresh adapter of the initial rank ``r`` (A as
    ``nn.Linear``, B = 0, g ~ N(0, 1), drawn from the seed, the layer and the task number), so the model's
    output is unchanged. Build a new optimizer for the next task (``rw.train`` does). Returns ``{layer:
    rank merged}``."""
    state = adapter_state(model, name)
    layers = [(n, m) for n, m in adapter_layers(model, state.name) if isinstance(m, DRSLoRALayer)]
    if any(m.merged for _, m in layers):
        raise ValueError(f"adapter {state.name!r} is merged (rw.merge); call rw.unmerge(model) before next_task")
    prune_zero_gates(model, state.name, layers, None)
    merged = {}
    for n, m in layers:
        merged[n] = m.merge_task()
        task = len(m.config.task_ranks)
        m.reset_task(layer_generator(state.config.seed, f"{n}#task{task}"), r=state.config.r)
        m.config = replace(m.config, r=state.config.r, alpha=state.config.alpha)
        m.scale = m.config.scale
        overrides = state.overrides.setdefault(n, {})
        overrides.pop("r", None)
        overrides.pop("alpha", None)
        overrides["task_ranks"] = list(m.config.task_ranks)
    return merged


class DRSLoRAController(GateController):
    """One task of DRS-LoRA: after every optimizer step past the dense phase, g ← S_κ(t)(g) in every layer
    (:func:`kappa_schedule`); at the end of the run the zero-weight ranks are removed (the task's rank
    allocation, logged per step as ``drs_lora_rank``). Hand-written loop: :meth:`step` after
    ``optimizer.step()``, :meth:`prune` at the end; then :func:`next_task` before the next task's data."""

    def __init__(self, model: nn.Module, name: str = "default", optimizer: torch.optim.Optimizer | None = None,
                 total_steps: int | None = None) -> None:
        super().__init__(model, name)
        self.config = cfg = self.adapter_config(DRSLoRAConfig)
        if total_steps is None:
            raise ValueError("DRS-LoRA's threshold schedule needs the task's total_steps")
        if math.floor(cfg.dense_fraction * total_steps) >= total_steps:
            raise ValueError(f"DRS-LoRA's dense phase dense_fraction={cfg.dense_fraction} of {total_steps} steps "
                             "leaves no step for rank selection; lower dense_fraction or train longer")
        self.optimizer, self.total_steps, self.t = optimizer, total_steps, 0
        self.layers = [(n, m) for n, m in adapter_layers(model, name) if isinstance(m, DRSLoRALayer)]
        require_resharding(model, "drs_lora")  # its pruning at the end re-shards the factors

    def schedule(self) -> str:
        c = self.config
        return (f"dense_fraction={c.dense_fraction}, kappa_steps={c.kappa_steps}, max_kappa={c.max_kappa}, "
                f"total_steps={self.total_steps}")

    @torch.no_grad()
    def step(self) -> float:
        """Soft-threshold every g with κ(t) after optimizer step t; returns κ(t)."""
        self.t += 1
        kappa = kappa_schedule(self.t, self.total_steps, self.config)
        if kappa > 0:
            for _, m in self.layers:
                m.gate.copy_(soft_threshold(m.gate, kappa))
        return kappa

    def on_step_end(self, state: TrainState) -> None:
        self.t = state.step - 1
        state.log["drs_lora_kappa"] = self.step()
        state.log["drs_lora_rank"] = sum(int((full(m.gate.detach()) != 0).sum()) for _, m in self.layers)

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t, "allocations": self.allocations}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.t, self.allocations = state["t"], state["allocations"]


def _controller(model: nn.Module, name: str, optimizer: Any, total_steps: int) -> DRSLoRAController:
    return DRSLoRAController(model, name, optimizer, total_steps)


register(
    MethodSpec(
        "drs_lora",
        "rank-allocation",
        "Lu et al. 2024, Adaptive Rank, Reduced Forgetting: Knowledge Retention in Continual Learning "
        "Vision-Language Models with Dynamic Rank-Selective LoRA",
        DRSLoRAConfig,
        DRSLoRALayer,
        summary="per task ΔW = B·diag(g)·A with g soft-thresholded by a rising κ; zero ranks removed, the task "
                "merged into W and a fresh adapter started (next_task)",
        controller=_controller,
    )
)
