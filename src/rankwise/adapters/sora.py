"""SoRA (Ding et al. 2023, "Sparse Low-rank Adaptation of Pre-trained Language Models").

ΔW = s·B·diag(g)·A with a gate g ∈ ℝʳ between the LoRA factors (s = α/r). The gate is not trained by
the optimizer but by a proximal gradient step on L + λ‖g‖₁: g ← S_{η·λ}(g − η·∇g L) with the
soft-threshold S_τ(x) = sign(x)·max(|x| − τ, 0) and η the optimizer's current learning rate
(SoRA's Eq. 5-6). At the end of training the ranks whose gate is exactly zero are removed in place
(``prune``), leaving a LoRA of the surviving rank per layer with the same outputs.

Init: A as ``nn.Linear`` (LoRA's), B = 0, g = 1, so the model starts at the base and the gate
starts as plain LoRA. The sparsifying scheduler (``lambda_schedule``) raises λ in stages over the run, from
``sparse_lambda`` to ``max_lambda`` in ``lambda_num`` values spaced as in the authors' code (linear, log-linear
or exponential-linear), to trace the sparsity / accuracy path. The step is the paper's proximal gradient
step; the authors' code takes an AdamW step on g and then thresholds with λ unscaled, so its λ values do
not carry over.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ..callbacks import TrainState, clear_optimizer_state
from ..checks import choice, integer, non_negative
from ..rng import kaiming_uniform_, layer_generator
from ..shards import full, require_resharding, set_parameter
from .base import AdapterConfig, AdapterLayer, AlphaConfig
from .init import InitContext
from .rank_control import MethodController, param_lr, rank_at_least_one
from .registry import MethodSpec, adapter_layers, adapter_state, register

__all__ = ["LAMBDA_SCHEDULES", "GateController", "GatedLoRALayer", "SoRAConfig", "SoRAController", "SoRALayer",
           "lambda_at", "lambda_values", "prune_zero_gates", "soft_threshold"]

#: spacings of the sparsifying scheduler's λ values (the authors' code's ``lambda_schedule``)
LAMBDA_SCHEDULES = ("linear", "log_linear", "exp_linear")


@dataclass
class SoRAConfig(AlphaConfig):
    """``r`` the initial rank, ``alpha`` (None: α = r) with s = α/r, ``sparse_lambda`` λ of the L1 penalty on g.
    Sparsifying scheduler (``lambda_schedule`` None: λ fixed): ``lambda_num`` stages whose λ goes from
    ``sparse_lambda`` to ``max_lambda`` with the spacing ``lambda_schedule``; each stage after the first lasts
    ``stage_steps`` steps (None: the run split in ``lambda_num`` equal stages), the first takes the rest."""

    sparse_lambda: float = 0.1
    lambda_schedule: str | None = None
    max_lambda: float | None = None
    lambda_num: int = 10
    stage_steps: int | None = None

    def validate(self) -> None:
        super().validate()
        non_negative("sparse_lambda", self.sparse_lambda)
        integer("lambda_num", self.lambda_num, 2)
        integer("stage_steps", self.stage_steps, 1, optional=True)
        if self.lambda_schedule is None:
            return
        choice("lambda_schedule", self.lambda_schedule, LAMBDA_SCHEDULES)
        if self.max_lambda is None or non_negative("max_lambda", self.max_lambda) < self.sparse_lambda:
            raise ValueError(f"max_lambda={self.max_lambda!r}: lambda_schedule needs a max_lambda >= sparse_lambda "
                             f"({self.sparse_lambda})")
        if self.lambda_schedule == "exp_linear" and self.sparse_lambda <= 0:
            raise ValueError("sparse_lambda=0: the exp_linear schedule spaces λ geometrically and needs "
                             "sparse_lambda > 0 (or use lambda_schedule='linear' / 'log_linear')")


def lambda_values(config: SoRAConfig) -> list[float]:
    """The scheduler's ``lambda_num`` values from λ₀ = ``sparse_lambda`` to λ_max = ``max_lambda`` (the authors'
    code): linear λₖ = λ₀ + k·(λ_max − λ₀)/(n − 1); log_linear log of the linear spacing of exp λ; exp_linear
    exp of the linear spacing of log λ (geometric)."""
    n, lo, hi = config.lambda_num, config.sparse_lambda, float(config.max_lambda or 0.0)

    def spaced(a: float, b: float) -> list[float]:
        return [a + k * (b - a) / (n - 1) for k in range(n)]

    if config.lambda_schedule == "log_linear":
        return [math.log(v) for v in spaced(math.exp(lo), math.exp(hi))]
    if config.lambda_schedule == "exp_linear":
        return [math.exp(v) for v in spaced(math.log(lo), math.log(hi))]
    return spaced(lo, hi)


def lambda_at(step: int, total_steps: int, config: SoRAConfig) -> float:
    """λ of optimizer step ``step`` (0-based) of a ``total_steps`` run: ``sparse_lambda`` without a schedule;
    else stage k's value, the stages after the first lasting S = ``stage_steps`` (default ⌊T/n⌋) steps and
    the first F = T − (n − 1)·S (a ValueError when F < 1); after the run's last stage the last value."""
    if config.lambda_schedule is None:
        return config.sparse_lambda
    n = config.lambda_num
    stage = config.stage_steps or total_steps // n
    first = total_steps - (n - 1) * stage
    if stage < 1 or first < 1:
        raise ValueError(f"the sparsifying scheduler's lambda_num={n} stages (stage_steps={config.stage_steps}) do "
                         f"not fit in a run of {total_steps} steps: lower lambda_num or stage_steps")
    k = 0 if step < first else min(n - 1, 1 + (step - first) // stage)
    return lambda_values(config)[k]


class GatedLoRALayer(AdapterLayer):
    """``y = W x + s·B(g ⊙ (A x))``: trainable ``lora_A`` (r×in), ``lora_B`` (out×r) and ``gate`` g (r);
    init A as ``nn.Linear``, B = 0, g = 1. The layer of SoRA and DRS-LoRA (CoDyRA), whose controllers
    drive g to exact zeros and remove those ranks (:meth:`prune`). ``scale`` s comes from the config."""

    def __init__(self, base_layer: nn.Module, config: AdapterConfig, ctx: InitContext, scale: float) -> None:
        super().__init__(base_layer, config)
        r, dtype, device = config.r, self.adapter_dtype, self.base_weight.device
        self.scale = scale
        self.lora_A = nn.Parameter(torch.zeros(r, self.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=dtype, device=device))
        self.gate = nn.Parameter(torch.ones(r, dtype=dtype, device=device))
        if not ctx.skip:
            kaiming_uniform_(self.lora_A, generator=layer_generator(config.seed, ctx.name))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self.lora_B * self.gate, self.lora_A, self.scale

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B * self.gate) @ self.lora_A * self.scale

    def peft_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(B·diag(g), A, s)`` over the ranks with g ≠ 0 (B′ = B·diag(g)); same ΔW as :meth:`factors`."""
        keep = torch.nonzero(self.gate.detach()).view(-1)
        b, a = rank_at_least_one((self.lora_B * self.gate)[:, keep], self.lora_A[keep])
        return b, a, self.scale

    @torch.no_grad()
    def prune(self, root: nn.Module | None = None) -> bool:
        """Remove the ranks whose gate is 0, in place (same Parameter objects, smaller tensors; a gradient
        of the old shape is dropped); a layer whose gates are all 0 keeps one rank with g = 0 (ΔW = 0).
        ``root``: the model, when FSDP2 sharded it (the factors are re-sharded at their new size).
        Returns whether the rank changed."""
        a, b, gate = (full(p.detach()) for p in (self.lora_A, self.lora_B, self.gate))
        keep = torch.nonzero(gate).view(-1)
        if keep.numel() == 0:
            keep = keep.new_zeros(1)
        if keep.numel() == gate.numel():
            return False
        for name, value in (("lora_A", a[keep]), ("lora_B", b[:, keep]), ("gate", gate[keep])):
            set_parameter(root or self, self, name, value.clone())
        # the scale s stays as trained: α = s·r for the new r (the config's scale is α/r)
        self.config = replace(self.config, r=int(keep.numel()), alpha=self.scale * int(keep.numel()))
        return True

    def trainable_count(self) -> int:
        return self.gate.numel() * (self.in_features + self.out_features + 1)


class SoRALayer(GatedLoRALayer):
    """``y = W x + s·B(g ⊙ (A x))``: trainable ``lora_A`` (r×in), ``lora_B`` (out×r) and ``gate`` g (r)."""

    method = "sora"

    def __init__(self, base_layer: nn.Module, config: SoRAConfig, ctx: InitContext) -> None:
        super().__init__(base_layer, config, ctx, config.scale)


def prune_zero_gates(model: nn.Module, adapter_name: str, layers: Sequence[tuple[str, GatedLoRALayer]],
                     optimizer: torch.optim.Optimizer | None) -> dict[str, int]:
    """Remove the zero-gate ranks of every layer (their optimizer state cleared); a layer's new rank is
    recorded as its ``r`` override of the adapter, with α = s·r so the scale s stays (``rw.save_adapter``
    / ``rw.load_adapter`` rebuild it). Returns ``{layer: rank}``."""
    state = adapter_state(model, adapter_name)
    ranks = {}
    for name, layer in layers:
        if layer.prune(model) and optimizer is not None:
            clear_optimizer_state(optimizer, [layer.lora_A, layer.lora_B, layer.gate])
        ranks[name] = layer.gate.numel()
        if ranks[name] != state.config.r:
            state.overrides.setdefault(name, {}).update(r=ranks[name], alpha=layer.config.alpha)
    return ranks


def soft_threshold(x: torch.Tensor, tau: float) -> torch.Tensor:
    """S_τ(x) = sign(x)·max(|x| − τ, 0), the proximal map of τ‖x‖₁."""
    return torch.sign(x) * torch.clamp(x.abs() - tau, min=0.0)


class GateController(MethodController):
    """What the controllers of gated layers share (SoRA, DRS-LoRA): ``layers`` of the adapter, the
    optimizer (the loop's, at train begin), and the removal of the zero-gate ranks at the end of a run."""

    optimizer: torch.optim.Optimizer | None
    layers: Sequence[tuple[str, GatedLoRALayer]]

    def prune(self) -> dict[str, int]:
        """Remove zero-gate ranks in every layer (:func:`prune_zero_gates`). Returns ``{layer: rank}``."""
        ranks = prune_zero_gates(self.model, self.adapter_name, self.layers, self.optimizer)
        self.allocations += 1
        return ranks

    def on_train_begin(self, state: TrainState) -> None:
        self.optimizer = self.optimizer or state.optimizer

    def on_train_end(self, state: TrainState) -> None:
        self.prune()
        super().on_train_end(state)


class SoRAController(GateController):
    """SoRA's gate update and pruning. In the loop, ``on_after_backward`` applies the proximal step
    to every gate with the current learning rate and clears the gate's gradient (the optimizer then
    skips it); ``on_train_end`` removes the zero-gate ranks and clears their optimizer state. In a
    hand-written loop call :meth:`proximal_step` between ``backward()`` and ``optimizer.step()``, and
    :meth:`prune` at the end. With the sparsifying scheduler, λ of each step is :func:`lambda_at` of the
    controller's step count (checkpointed in ``state_dict``) over ``total_steps`` (required then)."""

    def __init__(self, model: nn.Module, name: str = "default", optimizer: torch.optim.Optimizer | None = None,
                 total_steps: int | None = None) -> None:
        super().__init__(model, name)
        self.config, self.optimizer = self.adapter_config(SoRAConfig), optimizer
        self.layers = [(n, m) for n, m in adapter_layers(model, name) if isinstance(m, SoRALayer)]
        require_resharding(model, "sora")  # its pruning at the end re-shards the factors
        self.total_steps, self.steps = total_steps, 0
        if self.config.lambda_schedule is not None:
            if total_steps is None:
                raise ValueError("total_steps=None: SoRA's sparsifying scheduler (lambda_schedule="
                                 f"{self.config.lambda_schedule!r}) needs the run's number of steps")
            lambda_at(0, total_steps, self.config)  # the stages fit, before training

    def schedule(self) -> str:
        return f"sparse_lambda={self.config.sparse_lambda}, pruning at the end of training"

    def current_lambda(self, layer: SoRALayer) -> float:
        """λ of the step being taken: the scheduler's, else the layer's ``sparse_lambda``."""
        if self.config.lambda_schedule is None:
            return layer.config.sparse_lambda
        return lambda_at(self.steps, int(self.total_steps or 0), self.config)

    @torch.no_grad()
    def proximal_step(self) -> None:
        """g ← S_{η·λ}(g − η·∇g) for every gate, then ∇g cleared so the optimizer leaves g alone."""
        for _, layer in self.layers:
            g = layer.gate
            if g.grad is None:
                continue
            lr = param_lr(self.optimizer, g, "SoRA's gate")
            g.copy_(soft_threshold(g - lr * g.grad, lr * self.current_lambda(layer)))
            g.grad = None
        self.steps += 1

    step = proximal_step

    def on_after_backward(self, state: TrainState) -> None:
        if self.config.lambda_schedule is not None:
            state.log["sora_lambda"] = lambda_at(self.steps, int(self.total_steps or 0), self.config)
        self.proximal_step()
        state.log["sora_nonzero_gates"] = sum(int((full(m.gate.detach()) != 0).sum()) for _, m in self.layers)

    def on_step_end(self, state: TrainState) -> None:
        """Nothing after the optimizer step: the gates moved in ``on_after_backward``."""

    def state_dict(self) -> dict[str, Any]:
        return {"allocations": self.allocations, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.allocations, self.steps = state["allocations"], state.get("steps", 0)


def _controller(model: nn.Module, name: str, optimizer: Any, total_steps: int) -> SoRAController:
    return SoRAController(model, name, optimizer, total_steps)


register(
    MethodSpec(
        "sora",
        "rank-allocation",
        "Ding et al. 2023, Sparse Low-rank Adaptation of Pre-trained Language Models",
        SoRAConfig,
        SoRALayer,
        summary="ΔW = B·diag(g)·A, g by proximal L1 steps (λ fixed or raised in stages); zero-gate ranks removed "
                "at the end",
        controller=_controller,
    )
)
