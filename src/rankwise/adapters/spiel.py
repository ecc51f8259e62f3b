"""SpIEL — Ansell et al. 2024, "Scaling Sparse Fine-Tuning to Large Language Models" (arXiv 2401.16405;
official code github.com/AlanAnsell/peft, ``tuners/sft``), Sec. 3, the accumulated-gradient variant SpIEL-AG.

Each adapted matrix keeps k indices and their deltas relative to W₀ (:mod:`.sparse_delta`; k = density ×
size, constant). Training iterates (a) update the active deltas; every ``regrow_every`` steps (b) drop the
n = ⌊p·k⌋ active indices whose deltas have the smallest magnitude |δ| (the least change from the
pretrained value) and (c) regrow n indices: the candidates are the k entries with the largest |∂L/∂W| at
the first of ``regrow_steps`` accumulation steps, scored by |Σ ∂L/∂W| over those steps, and the best
candidates not active after the drop come in with δ = 0. A dropped index that is also chosen again stays
(with its δ). The rate is p = 1 at the first update (step ``regrow_steps``: the random initial indices
are replaced by gradient-chosen ones) and p = ζ·(1 − t/T) afterwards (ζ = ``regrow_rate``, T the run's
steps). :class:`SpIELController` does (b) and (c); every training loop attaches it.

Departure: the paper's optimizer starts a regrown index's Adam moments from the accumulated gradient
with a per-entry step count; here the moments of a changed slot are reset to 0 (torch's AdamW keeps one
step count per tensor). The SM3-momentum regrowth variant (SpIEL-MA) is not implemented.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..callbacks import TrainState
from ..checks import fraction, integer
from ..rng import layer_generator
from ..shards import editing, mesh_of, sum_over_ranks_
from .init import InitContext
from .rank_control import MethodController
from .registry import MethodSpec, adapter_layers, register
from .sparse_delta import SparseDeltaConfig, SparseDeltaLayer


@dataclass
class SpIELConfig(SparseDeltaConfig):
    """``regrow_every`` (steps between index updates, S), ``regrow_steps`` (steps whose gradients score
    the candidates before each update, γ < S), ``regrow_rate`` (ζ: fraction of indices changed at the
    first update after the initial one, decaying linearly to 0 over the run)."""

    regrow_every: int = 100
    regrow_steps: int = 5
    regrow_rate: float = 0.2

    def validate(self) -> None:
        super().validate()
        integer("regrow_every", self.regrow_every, 2)
        integer("regrow_steps", self.regrow_steps, 1, self.regrow_every - 1,
                what=f"an integer in [1, regrow_every - 1 = {self.regrow_every - 1}]")
        fraction("regrow_rate", self.regrow_rate)


class SpIELLayer(SparseDeltaLayer):
    """The sparse delta, starting on k uniformly random positions; while ``grad_sink`` is set, the dense
    gradient ∂L/∂W of every backward is handed to it (the controller's candidate scores)."""

    method = "spiel"

    def __init__(self, base_layer: nn.Module, config: SpIELConfig, ctx: InitContext) -> None:
        self.grad_sink: Callable[[torch.Tensor], None] | None = None
        super().__init__(base_layer, config, ctx)

    def initial_index(self, ctx: InitContext, k: int) -> torch.Tensor:
        gen = layer_generator(self.config.seed, ctx.name)
        return torch.randperm(self.out_features * self.in_features, generator=gen)[:k]

    def delta_forward(self, x: torch.Tensor) -> torch.Tensor:
        dense = self.delta_weight()
        if self.grad_sink is not None and dense.requires_grad:
            dense.register_hook(self.grad_sink)  # ∂L/∂(W₀ + S) = ∂L/∂S, the full dense gradient
        return self.base_map(x, dense)


@torch.no_grad()
def regrow(layer: SpIELLayer, candidates: torch.Tensor, scores: torch.Tensor, p: float) -> torch.Tensor:
    """Drop the ⌊p·k⌋ smallest |δ|, regrow the best-scored candidates not active after the drop (δ = 0);
    returns the slots whose index changed (their optimizer moments must be reset). Under FSDP2 on the
    gathered δ, of which this rank keeps its slots."""
    with editing(layer.sparse_values) as values:
        return _regrow(layer, values, candidates, scores, p)


def _regrow(layer: SpIELLayer, values: torch.Tensor, candidates: torch.Tensor, scores: torch.Tensor,
            p: float) -> torch.Tensor:
    k, numel = values.numel(), layer.out_features * layer.in_features
    n = int(k * p)
    if n == 0:
        return candidates.new_zeros(0)
    index = layer.sparse_index
    drop = values.abs().topk(n, largest=False).indices
    outgoing = torch.zeros(numel, dtype=torch.bool, device=index.device)
    outgoing[index[drop]] = True
    remaining = torch.zeros_like(outgoing)
    remaining[index] = True
    remaining &= ~outgoing
    free = ~remaining[candidates]
    candidates, scores = candidates[free], scores[free]
    incoming = candidates[scores.topk(min(n, candidates.numel())).indices]
    chosen = torch.zeros_like(outgoing)
    chosen[incoming] = True
    drop = drop[~chosen[index[drop]]]  # dropped and chosen again: stays, with its δ
    incoming = incoming[~outgoing[incoming]]
    drop = drop[: incoming.numel()]
    index[drop] = incoming[: drop.numel()]
    values[drop] = 0.0
    return drop


class SpIELController(MethodController):
    """Drop and regrow every adapted matrix's indices on SpIEL's schedule (module doc). Gradients are
    collected during the ``regrow_steps`` steps that end at an update: at steps t with t mod S < γ
    (counting from 0), the update after step t with t mod S = γ. ``step()`` after each ``optimizer.step()``
    in a hand-written loop; ``optimizer=None``: the loop's, read at train begin."""

    def __init__(self, model: nn.Module, adapter_name: str, optimizer: torch.optim.Optimizer | None,
                 total_steps: int) -> None:
        super().__init__(model, adapter_name)
        self.config: SpIELConfig = self.adapter_config(SpIELConfig)
        self.optimizer = optimizer
        self.total_steps = integer("total_steps", total_steps, 1)
        self.layers = [(n, m) for n, m in adapter_layers(model, adapter_name) if isinstance(m, SpIELLayer)]
        self.steps = 0
        self.scores: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # layer: (candidates, Σ gradient)
        self._collect(True)

    def schedule(self) -> str:
        return f"regrow_every={self.config.regrow_every}, regrow_steps={self.config.regrow_steps}"

    def allocates_at(self, step: int) -> bool:
        """SpIEL drops and regrows at the end of each window: steps ≡ ``regrow_steps`` (mod ``regrow_every``)."""
        return step % self.config.regrow_every == self.config.regrow_steps

    def _sink(self, name: str, k: int, mesh: Any) -> Callable[[torch.Tensor], None]:
        """Under FSDP2 (``mesh``) the dense gradient of this rank's batch is averaged over the ranks first."""
        def sink(grad: torch.Tensor) -> None:
            flat = grad.detach().flatten()
            if mesh is not None:
                flat = sum_over_ranks_(flat.clone(), mesh).div_(mesh.size())
            flat = flat.float()
            if name not in self.scores:  # candidates: the k largest |gradient| of the first step
                candidates = flat.abs().topk(k).indices
                self.scores[name] = (candidates, flat[candidates].clone())
            else:
                candidates, sums = self.scores[name]
                sums += flat[candidates]
        return sink

    def _collect(self, on: bool) -> None:
        for name, layer in self.layers:
            values = layer.sparse_values
            layer.grad_sink = self._sink(name, values.numel(), mesh_of(values)) if on else None

    def rate(self) -> float:
        """p for the update after the current step: 1 at the first, ζ·(1 − t/T) later."""
        if self.steps == self.config.regrow_steps:
            return 1.0
        return self.config.regrow_rate * max(0.0, 1.0 - self.steps / self.total_steps)

    def on_train_begin(self, state: TrainState) -> None:
        if self.optimizer is None:
            self.optimizer = state.optimizer

    def step(self) -> None:
        """Count one optimizer step; drop and regrow when it ends an accumulation window."""
        self.steps += 1
        if self.allocates_at(self.steps):
            self.update(self.rate())
        self._collect(self.steps % self.config.regrow_every < self.config.regrow_steps)

    @torch.no_grad()
    def update(self, p: float) -> None:
        """Drop and regrow at rate ``p`` in every layer, with the gradients collected since the last update."""
        for name, layer in self.layers:
            if name not in self.scores:
                continue
            candidates, sums = self.scores[name]
            changed = regrow(layer, candidates, sums.abs(), p)
            if self.optimizer is not None:
                for value in self.optimizer.state.get(layer.sparse_values, {}).values():
                    if isinstance(value, torch.Tensor) and value.shape == layer.sparse_values.shape:
                        with editing(value) as v:
                            v[changed] = 0
        self.scores = {}
        self.allocations += 1

    def state_dict(self) -> dict[str, Any]:
        """The step count and the gradients collected so far (the indices are buffers: checkpointed with the
        trained tensors)."""
        return {"steps": self.steps, "allocations": self.allocations,
                "scores": {n: (c.clone(), s.clone()) for n, (c, s) in self.scores.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps, self.allocations = int(state["steps"]), int(state["allocations"])
        self.scores = {n: (c.clone(), s.clone()) for n, (c, s) in state["scores"].items()}
        self._collect(self.steps % self.config.regrow_every < self.config.regrow_steps)


def _controller(model: nn.Module, name: str, optimizer: Any, total_steps: int) -> SpIELController:
    return SpIELController(model, name, optimizer, total_steps)


register(
    MethodSpec(
        "spiel",
        "sparse-finetuning",
        "Ansell et al. 2024, Scaling Sparse Fine-Tuning to Large Language Models",
        SpIELConfig,
        SpIELLayer,
        export="none",
        summary="k indices + deltas per matrix; every S steps drop the smallest |δ|, regrow by accumulated "
                "|gradient| of candidates (SpIEL-AG)",
        controller=_controller,
    )
)
