"""RoseLoRA — Wang et al. 2024, "RoseLoRA: Row and Column-wise Sparse Low-rank Adaptation of
Pre-trained Language Model for Knowledge Editing and Fine-tuning" (EMNLP 2024, arXiv 2406.10777).

ΔW = s·B A = s·Σᵢ B[:, i] A[i, :]. The sparsity constraint on the product is turned into a sparsity
constraint per rank component: every column B[:, i] keeps at most k_B = ⌈τ·out⌉ entries and every
row A[i, :] at most k_A = ⌈τ·in⌉, so ΔW changes at most
``min(r·k_B·k_A, min(out, r·k_B)·min(in, r·k_A))`` entries of W (density ≤ r·τ², the paper's
lower bound on the sparsity of BA).

Which entries stay is chosen by sensitivity, I = |w·∂L/∂w|, smoothed over steps by an exponential
moving average Ī ← β·Ī + (1−β)·I (the first step sets Ī = I). The kept fraction follows the paper's
cubic schedule: dense (rate 1) until step t_i, then ``τ + (1−τ)·(1 − (t−t_i)/(t_f−t_i))³`` until
t_f, then τ. After each optimizer step the entries outside the top-k of their column of B / row of
A are set to 0 (they may grow again at the next step and are pruned again, as in the paper's
iterative pruning).

The layer is ``LoRALayer``; the pruning is :class:`RoseLoRAPrune`, a loop callback that
``rankwise.train.train`` attaches by itself (``config.training_callbacks``); in a hand-written loop
call ``accumulate()`` after ``backward()`` and ``prune(step, total_steps)`` after
``optimizer.step()``. The update is a rank-r product of sparse factors (PEFT LoRA export).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from ..callbacks import Callback, TrainState
from ..checks import fraction
from ..shards import editing, full
from .lora import LoRAConfig, LoRALayer
from .registry import MethodSpec, adapter_layers, register


@dataclass
class RoseLoRAConfig(LoRAConfig):
    """LoRA plus ``density`` τ (kept fraction of every column of B and row of A at the end),
    ``beta`` (EMA factor of the sensitivity), and the schedule's ``start`` / ``end`` (t_i, t_f as
    fractions of the run's steps: dense before ``start``, τ from ``end`` on)."""

    density: float = 0.05
    beta: float = 0.8
    start: float = 0.1
    end: float = 0.8

    def validate(self) -> None:
        super().validate()
        fraction("density", self.density)
        fraction("beta", self.beta, allow_zero=True, allow_one=False)
        fraction("start", self.start, allow_zero=True)
        fraction("end", self.end)
        if self.end <= self.start:
            raise ValueError(f"end={self.end!r} must be greater than start={self.start!r}")

    def training_callbacks(self, model: nn.Module, adapter_name: str, optimizer: Any = None) -> list[Callback]:
        """What ``rankwise.train.train`` runs with this adapter: the sensitivity-based pruning."""
        return [RoseLoRAPrune(model, adapter_name)]


def keep_rate(step: int, total_steps: int, density: float, start: float, end: float) -> float:
    """The paper's cubic schedule: 1 before t_i, τ + (1−τ)(1 − (t−t_i)/(t_f−t_i))³ up to t_f, then τ."""
    t_i, t_f = start * total_steps, end * total_steps
    if step < t_i:
        return 1.0
    if step >= t_f:
        return density
    return density + (1 - density) * (1 - (step - t_i) / (t_f - t_i)) ** 3


def kept(length: int, rate: float) -> int:
    """How many entries of a column of B / row of A of ``length`` stay at keep-rate ``rate`` (≥ 1)."""
    return max(1, min(length, math.ceil(rate * length - 1e-9)))


def change_bound(out_features: int, in_features: int, r: int, density: float) -> int:
    """Most entries of W that ΔW = B A changes when each column of B keeps k_B and each row of A k_A."""
    k_b, k_a = kept(out_features, density), kept(in_features, density)
    return min(r * k_b * k_a, min(out_features, r * k_b) * min(in_features, r * k_a))


@torch.no_grad()
def top_mask(importance: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """Boolean mask of the ``k`` most important entries along ``dim`` (per column for dim=0)."""
    index = importance.topk(k, dim=dim).indices
    return torch.zeros_like(importance, dtype=torch.bool).scatter_(dim, index, True)


class RoseLoRAPrune(Callback):
    """Tracks Ī = EMA of |w·g| for every ``lora_B`` / ``lora_A`` and keeps the top-k entries of each
    column of B and each row of A after every optimizer step (see module doc)."""

    def __init__(self, model: nn.Module, adapter_name: str | None = None) -> None:
        layers = [layer for _, layer in adapter_layers(model, adapter_name) if isinstance(layer, LoRALayer)]
        if not layers:
            raise ValueError("model has no LoRA layers to prune with RoseLoRA (rw.adapt(model, 'roselora') first)")
        # (parameter, the axis its top-k runs along, config): B's columns (dim 0), A's rows (dim 1)
        self.factors = [(p, dim, cast(RoseLoRAConfig, layer.config))
                        for layer in layers for p, dim in ((layer.lora_B, 0), (layer.lora_A, 1))]
        self.importance: list[torch.Tensor | None] = [None] * len(self.factors)

    @torch.no_grad()
    def accumulate(self) -> None:
        """Ī ← β·Ī + (1−β)·|w·g| for every factor with a gradient (Ī = |w·g| the first time)."""
        for j, (p, _, config) in enumerate(self.factors):
            if p.grad is None:
                continue
            score = (full(p.detach()) * full(p.grad)).abs().float()  # whole columns / rows under FSDP2
            old = self.importance[j]
            self.importance[j] = score if old is None else config.beta * old + (1 - config.beta) * score

    @torch.no_grad()
    def prune(self, step: int, total_steps: int) -> None:
        """Zero every entry outside the top-k (by Ī) of its column of B / row of A at ``step``."""
        for (p, dim, config), score in zip(self.factors, self.importance, strict=True):
            rate = keep_rate(step, total_steps, config.density, config.start, config.end)
            if rate >= 1 or score is None:
                continue
            mask = top_mask(score, kept(p.shape[dim], rate), dim)
            with editing(p) as v:  # FSDP2: each rank keeps its rows
                v.masked_fill_(~mask, 0)

    def on_after_backward(self, state: TrainState) -> None:
        self.accumulate()

    def on_step_end(self, state: TrainState) -> None:
        self.prune(state.step - 1, state.total_steps)  # the index of the step just taken

    def state_dict(self) -> dict[str, Any]:
        return {"importance": list(self.importance)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.importance = list(state["importance"])


register(
    MethodSpec(
        "roselora",
        "sparse+low-rank",
        "Wang et al. 2024, RoseLoRA: Row and Column-wise Sparse Low-rank Adaptation of Pre-trained Language "
        "Model for Knowledge Editing and Fine-tuning",
        RoseLoRAConfig,
        LoRALayer,
        summary="LoRA whose columns of B and rows of A keep their top-τ entries by EMA sensitivity |w·g| "
                "(cubic schedule), so ΔW changes ≤ r·τ²·out·in entries (the loop prunes: RoseLoRAPrune)",
    )
)
