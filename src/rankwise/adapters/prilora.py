"""PRILoRA (Benedek & Wolf 2024, "PRILoRA: Pruned and Rank-Increasing Low-Rank Adaptation", EACL Findings).

Two mechanisms on top of LoRA (ΔW = s·B·A):

* Rank increasing with depth: the adapters of transformer layer l (0-based, of L) get rank
  r_l = round(r_start + l·(r_end − r_start)/(L − 1)) (:func:`linear_ranks`); modules outside the layer list
  get r_start before it and r_end after it.
* Ongoing pruning of A by weight magnitude and accumulated input statistics: every layer keeps an
  exponential moving average of its inputs' per-feature L2 norms, x̄_j ← β·x̄_j + (1 − β)·‖X_{:,j}‖₂ (every
  training forward), and every ``prune_interval`` steps the entries of each row of A with the lowest score
  S_ij = |A_ij|·x̄_j (Wanda's criterion) are pruned until the row's pruned fraction reaches
  ``sparsity``·t/T (t the step, T the run's steps). A pruned entry stays exactly zero (a mask M, applied
  in the forward as A ⊙ M and to the stored A after every step).

Only the abstract was available: the linear rank rule, the pruned matrix (A) and the criterion (current
weight magnitude × accumulated input statistics) are the paper's; the comparison group (each row of A, as
Wanda's per-output groups), the linear ramp of the pruned fraction, that a pruned entry never returns,
and the defaults are rankwise's choices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..callbacks import TrainState
from ..checks import fraction, integer
from ..layout import layer_list
from ..shards import editing, full, mesh_of, sum_over_ranks_
from .init import InitContext
from .lora import LoRAConfig, LoRALayer
from .rank_control import MethodController
from .registry import MethodSpec, adapter_layers, register

__all__ = ["PRILoRAConfig", "PRILoRAController", "PRILoRALayer", "linear_ranks", "prune_rows", "rank_pattern"]


@dataclass
class PRILoRAConfig(LoRAConfig):
    """LoRA options plus PRILoRA's: ``r_start`` / ``r_end`` the ranks of the first / last transformer layer
    (``r`` is set per layer from them), ``sparsity`` the fraction of each row of A pruned by the end of the
    run, ``prune_interval`` steps between pruning, ``beta`` the EMA rate of the input norms."""

    r_start: int = 4
    r_end: int = 12
    sparsity: float = 0.5
    prune_interval: int = 10
    beta: float = 0.9

    def validate(self) -> None:
        super().validate()
        if self.init != "default":
            raise ValueError(f"init={self.init!r} is not allowed for method 'prilora'; choose 'default'")
        integer("r_start", self.r_start, 1)
        integer("r_end", self.r_end, 1)
        fraction("sparsity", self.sparsity, allow_zero=True, allow_one=False, what="in [0, 1)")
        integer("prune_interval", self.prune_interval, 1)
        fraction("beta", self.beta, allow_zero=True, allow_one=False, what="in [0, 1)")


class PRILoRALayer(LoRALayer):
    """LoRA with ΔW = s·B·(A ⊙ M): ``mask`` M (r×in, 1 kept / 0 pruned) and ``input_norm`` x̄ (in) are buffers."""

    method = "prilora"
    base_kinds = ("linear",)
    running_statistics = ("input_norm",)

    def __init__(self, base_layer: nn.Module, config: PRILoRAConfig, ctx: InitContext) -> None:
        super().__init__(base_layer, config, ctx)
        self.register_buffer("mask", torch.ones_like(self.lora_A))
        self.register_buffer("input_norm", torch.zeros(self.in_features, dtype=self.lora_A.dtype,
                                                       device=self.lora_A.device))
        self.mesh: Any = None  # under FSDP2 (set by the controller): the column norms are summed over its ranks

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self.lora_B, self.lora_A * self.mask, self.scale

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ (self.lora_A * self.mask)) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.updates_statistics and self.enabled and not self.merged:  # once per batch (not in a recompute)
            self.accumulate(x)
        return super().forward(x)

    @torch.no_grad()
    def accumulate(self, x: torch.Tensor) -> None:
        """x̄ ← β·x̄ + (1 − β)·‖X_{:,j}‖₂ over the rows (tokens) of this input (under FSDP2 of every rank's
        input: the squared norms are summed over the ranks)."""
        rows = x.detach().reshape(-1, x.shape[-1]).to(self.input_norm.dtype)
        norms = rows.norm(dim=0) if self.mesh is None else sum_over_ranks_(rows.pow(2).sum(0), self.mesh).sqrt()
        self.input_norm.mul_(self.config.beta).add_(norms, alpha=1 - self.config.beta)

    def scores(self) -> torch.Tensor:
        """S_ij = |A_ij|·x̄_j."""
        return full(self.lora_A.detach()).abs() * self.input_norm[None, :]

    @torch.no_grad()
    def apply_mask(self) -> None:
        """Zero the stored A at the pruned entries (the forward already ignores them)."""
        with editing(self.lora_A) as a:
            a.mul_(self.mask)


def prune_rows(scores: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """The new mask: in every row the ``k`` entries pruned are the ones pruned already plus the lowest-scoring
    live entries (a pruned entry never returns; k below the pruned count keeps the mask)."""
    ranked = scores.masked_fill(mask == 0, -math.inf)
    lowest = torch.topk(ranked, k, dim=1, largest=False).indices
    new = torch.ones_like(mask)
    new.scatter_(1, lowest, 0.0)
    return torch.minimum(new, mask)


def linear_ranks(names: list[str], model: nn.Module, r_start: int, r_end: int) -> dict[str, int]:
    """r_l = round(r_start + l·(r_end − r_start)/(L − 1)) for a module in transformer layer l of L;
    a module before the layer list gets r_start, one after it r_end."""
    prefix, layers = layer_list(model)
    count = len(layers)
    order = [n for n, _ in model.named_modules()]
    first = order.index(f"{prefix}.0")
    out = {}
    for name in names:
        rest = name.removeprefix(prefix + ".") if name.startswith(prefix + ".") else None
        if rest is not None and rest.split(".")[0].isdigit():
            depth = int(rest.split(".")[0])
            out[name] = round(r_start + depth * (r_end - r_start) / max(count - 1, 1))
        else:
            out[name] = r_start if order.index(name) < first else r_end
    return out


def _plan(model: nn.Module, layer_cfgs: dict[str, Any], init_data: Any, init_batches: int
          ) -> dict[str, tuple[dict[str, Any], Any]]:
    """``MethodSpec.plan``: each layer's rank from its depth (no data pass)."""
    cfg = next(iter(layer_cfgs.values()))
    ranks = linear_ranks(list(layer_cfgs), model, cfg.r_start, cfg.r_end)
    return {n: ({"r": ranks[n]} if ranks[n] != layer_cfgs[n].r else {}, None) for n in layer_cfgs}


def rank_pattern(model: nn.Module, name: str | None = None) -> dict[str, int]:
    """``{layer: rank}`` of a PRILoRA adapter."""
    return {n: m.config.r for n, m in adapter_layers(model, name) if isinstance(m, PRILoRALayer)}


class PRILoRAController(MethodController):
    """PRILoRA's pruning of A: after every optimizer step the pruned entries of A are zeroed again, and at
    every ``prune_interval``-th step (and the last) each row's pruned fraction is raised to sparsity·t/T by
    pruning the lowest |A_ij|·x̄_j among its live entries. Hand-written loop: :meth:`step` after
    ``optimizer.step()``."""

    def __init__(self, model: nn.Module, name: str = "default", total_steps: int | None = None) -> None:
        super().__init__(model, name)
        self.config = self.adapter_config(PRILoRAConfig)
        if total_steps is None:
            raise ValueError("PRILoRA's pruning schedule needs the run's total_steps")
        self.total_steps, self.t = total_steps, 0
        self.layers = [(n, m) for n, m in adapter_layers(model, name) if isinstance(m, PRILoRALayer)]
        for _, m in self.layers:
            m.mesh = mesh_of(m.lora_A)

    def schedule(self) -> str:
        c = self.config
        return f"prune_interval={c.prune_interval}, sparsity={c.sparsity}, total_steps={self.total_steps}"

    def pruned_fraction(self, step: int) -> float:
        """sparsity·t/T: the fraction of each row of A pruned after step t."""
        return self.config.sparsity * min(1.0, step / self.total_steps)

    @torch.no_grad()
    def prune(self, step: int) -> None:
        """Raise every row's pruned count to ⌊sparsity·t/T·in⌋ (:func:`prune_rows`)."""
        for _, m in self.layers:
            k = math.floor(self.pruned_fraction(step) * m.in_features)
            m.mask.copy_(prune_rows(m.scores(), m.mask, k))
            m.apply_mask()
        self.allocations += 1

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        for _, m in self.layers:
            m.apply_mask()
        if self.t % self.config.prune_interval == 0 or self.t == self.total_steps:
            self.prune(self.t)

    def on_step_end(self, state: TrainState) -> None:
        self.t = state.step - 1
        self.step()
        state.log["prilora_pruned"] = sum(int((m.mask == 0).sum()) for _, m in self.layers)

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t, "allocations": self.allocations}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.t, self.allocations = state["t"], state["allocations"]


def _controller(model: nn.Module, name: str, optimizer: Any, total_steps: int) -> PRILoRAController:
    return PRILoRAController(model, name, total_steps)


register(
    MethodSpec(
        "prilora",
        "rank-allocation",
        "Benedek & Wolf 2024, PRILoRA: Pruned and Rank-Increasing Low-Rank Adaptation",
        PRILoRAConfig,
        PRILoRALayer,
        summary="LoRA with ranks rising linearly with depth; A pruned during training by |A_ij|·EMA(‖x_j‖) per row",
        controller=_controller,
        plan=_plan,
    )
)
