"""AutoLoRA (Zhang et al. 2024, "AutoLoRA: Automatically Tuning Matrix Ranks in Low-Rank Adaptation Based on
Meta Learning", NAACL).

Each rank-1 component of ΔW = s·Σᵢ wᵢ·bᵢaᵢᵀ has a selection variable αᵢ, with w = softmax(α) over the layer's
r components (as the authors' code: ``lora_B * softmax(alpha)``; α = 0 at init, so w = 1/r). Training is
bi-level:

    lower level:  A, B ← step on L_train(A, B, α)        (the loop's training batches)
    upper level:  α    ← step on L_val(A, B, α)          (batches of the validation set: the loop's val_loader)

so α never sees the training loss and the factors never see the validation loss. The levels are solved by
first-order alternation (α's gradient at the current A, B; the authors' code uses Betty's one-step-unrolled
DARTS hypergradient, not reproduced here). At the end of training a layer's rank is the number of
components with wᵢ ≥ λ (``threshold``, default 1/r as in the code), and the others are removed in place; the
kept components keep their contribution exactly (wᵢ is folded into bᵢ). The learned update is then a
rank-kᵢ product per layer (PEFT LoRA export with ``rank_pattern``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ..batches import LossFn, loss_of, model_device, move_batch
from ..callbacks import TrainState
from ..checks import fraction
from ..shards import full, gradients, require_resharding, set_parameter
from .base import AlphaConfig
from .init import InitContext
from .registry import MethodSpec, adapter_layers, register
from .sora import GateController, GatedLoRALayer

__all__ = ["AutoLoRAConfig", "AutoLoRAController", "AutoLoRALayer", "rank_pattern"]


@dataclass
class AutoLoRAConfig(AlphaConfig):
    """``r`` the searched rank, ``alpha`` (None: α = r; s = α/r), ``threshold`` λ: a component is kept when its
    weight softmax(α)ᵢ ≥ λ (None: 1/r, the uniform weight)."""

    threshold: float | None = None

    def validate(self) -> None:
        super().validate()
        fraction("threshold", self.threshold, optional=True)

    @property
    def keep_threshold(self) -> float:
        return 1.0 / self.r if self.threshold is None else float(self.threshold)


class AutoLoRALayer(GatedLoRALayer):
    """``y = W x + s·B(softmax(α) ⊙ (A x))``: trainable ``lora_A`` (r×in), ``lora_B`` (out×r) and the selection
    variables α (``gate``, r; 0 at init); A as ``nn.Linear``, B = 0."""

    method = "autolora"

    def __init__(self, base_layer: nn.Module, config: AutoLoRAConfig, ctx: InitContext) -> None:
        super().__init__(base_layer, config, ctx, config.scale)
        with torch.no_grad():
            self.gate.zero_()

    def weights(self) -> torch.Tensor:
        """wᵢ = softmax(α)ᵢ, the components' selection weights."""
        return torch.softmax(self.gate, dim=0)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self.lora_B * self.weights(), self.lora_A, self.scale

    def delta_weight(self) -> torch.Tensor:
        b, a, s = self.factors()
        return b @ a * s

    def peft_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self.factors()

    def kept(self) -> torch.Tensor:
        """Indices of the components with wᵢ ≥ λ (at least the largest one)."""
        w = torch.softmax(full(self.gate.detach()), dim=0)
        keep = torch.nonzero(w >= self.config.keep_threshold).view(-1)
        return keep if keep.numel() else w.argmax().view(1)

    @torch.no_grad()
    def prune(self, root: nn.Module | None = None) -> bool:
        """Remove the components with wᵢ < λ in place: bᵢ ← k·wᵢ·bᵢ for the k kept ones and α = 0 (their new
        weights are 1/k), so the kept components' contribution is unchanged. ``root``: the model, when FSDP2
        sharded it (the factors are re-sharded at their new size). Returns whether the rank changed."""
        keep = self.kept()
        if keep.numel() == self.gate.numel():
            return False
        k = int(keep.numel())
        a, b, gate = (full(p.detach()) for p in (self.lora_A, self.lora_B, self.gate))
        for name, value in (("lora_B", b[:, keep] * (k * torch.softmax(gate, dim=0)[keep])), ("lora_A", a[keep]),
                            ("gate", gate.new_zeros(k))):
            set_parameter(root or self, self, name, value.clone())
        self.config = replace(self.config, r=k, alpha=self.scale * k)
        return True


def rank_pattern(model: nn.Module, name: str | None = None) -> dict[str, int]:
    """``{layer: rank}``: the components with softmax(α)ᵢ ≥ λ (after pruning: the layer's rank)."""
    return {n: int(m.kept().numel()) for n, m in adapter_layers(model, name) if isinstance(m, AutoLoRALayer)}


class AutoLoRAController(GateController):
    """The two levels (module doc). ``on_after_backward`` (after the training batch's backward) replaces α's
    gradient by ∂L_val/∂α on the next validation batch (``val_data``, else the loop's ``val_loader``,
    cycled); the factors keep the training gradient. ``on_train_end`` prunes. In a hand-written loop call
    :meth:`upper_gradient` between ``backward()`` and ``optimizer.step()`` and :meth:`prune` at the end."""

    def __init__(self, model: nn.Module, name: str = "default", optimizer: torch.optim.Optimizer | None = None,
                 val_data: Iterable[Any] | None = None, loss_fn: LossFn | None = None) -> None:
        super().__init__(model, name)
        self.config, self.optimizer = self.adapter_config(AutoLoRAConfig), optimizer
        self.layers = [(n, m) for n, m in adapter_layers(model, name) if isinstance(m, AutoLoRALayer)]
        require_resharding(model, "autolora")  # its pruning at the end re-shards the factors
        self.val_data, self.loss_fn = val_data, loss_fn
        self.val_seen = 0
        self._val: Iterator[Any] | None = None

    def schedule(self) -> str:
        return f"threshold={self.config.keep_threshold:g}, pruning at the end of training"

    def selection(self) -> list[nn.Parameter]:
        return [m.gate for _, m in self.layers]

    def _next_val(self) -> Any:
        if self.val_data is None:
            raise ValueError("autolora needs validation data for its selection variables: pass val_loader to "
                             "train() or an AutoLoRAController(model, val_data=...) callback")
        if self._val is None:  # (re)start, skipping what a resumed run has seen of this pass
            length = len(self.val_data) if hasattr(self.val_data, "__len__") else None
            skip = self.val_seen % length if length else self.val_seen
            self._val = itertools.islice(iter(self.val_data), skip, None)
        try:
            batch = next(self._val)
        except StopIteration:
            self._val = iter(self.val_data)
            batch = next(self._val)
        self.val_seen += 1
        return batch

    def upper_gradient(self) -> None:
        """α.grad ← ∂L_val/∂α on the next validation batch (the training batch's α gradient is discarded).
        Under FSDP2 (whose gradients reach the sharded parameters through its own backward hooks, not
        autograd) by a second backward with the other gradients set aside; every rank takes the same
        validation batch, so FSDP2's mean over the ranks is its gradient."""
        batch = move_batch(self._next_val(), model_device(self.model))
        selection = self.selection()
        for p, g in zip(selection, gradients(loss_of(self.model, batch, self.loss_fn), selection, self.model),
                        strict=True):
            p.grad = g

    def on_train_begin(self, state: TrainState) -> None:
        super().on_train_begin(state)
        if self.val_data is None:
            self.val_data = state.val_loader
        if self.loss_fn is None:
            self.loss_fn = state.loss_fn
        if self.val_data is None:
            self._next_val()  # the error naming what to pass, before the first step

    def on_after_backward(self, state: TrainState) -> None:
        self.upper_gradient()
        state.log["autolora_rank"] = sum(rank_pattern(self.model, self.adapter_name).values())

    def on_step_end(self, state: TrainState) -> None:
        """Nothing after the step: the levels were routed before it."""

    def state_dict(self) -> dict[str, Any]:
        return {"allocations": self.allocations, "val_seen": self.val_seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.allocations, self.val_seen = int(state["allocations"]), int(state["val_seen"])
        self._val = None


def _controller(model: nn.Module, name: str, optimizer: Any, total_steps: int) -> AutoLoRAController:
    return AutoLoRAController(model, name, optimizer)


register(
    MethodSpec(
        "autolora",
        "rank-allocation",
        "Zhang et al. 2024, AutoLoRA: Automatically Tuning Matrix Ranks in Low-Rank Adaptation Based on Meta Learning",
        AutoLoRAConfig,
        AutoLoRALayer,
        summary="ΔW = s·B·diag(softmax(α))·A; A, B step on training batches, α on validation batches (the loop's "
                "val_loader); components with softmax(α)ᵢ < threshold removed at the end",
        controller=_controller,
        needs_validation=True,
    )
)
