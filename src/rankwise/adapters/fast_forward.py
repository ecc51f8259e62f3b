"""Fast Forward (Rahamim, Saphra, Kangaslahti & Belinkov 2024, "Fast Forwarding Low-Rank Training", EMNLP).

Plain LoRA trained by alternating regular optimizer steps with Fast Forward stages. After every
``ff_every``-th optimizer step (the paper's T_interval = 6) the step just taken, Δ = θ_t − θ_{t−1}
over every trainable tensor, is repeated as a line search on a tiny validation set:

    θ ← θ + Δ   while   L_val(θ + Δ) < L_val(θ),   i.e. θ = θ_t + τ·Δ, τ = 1, 2, ...

and the first repeat that does not lower L_val is undone, so the stage ends at θ_t + τ·Δ with the
last improving τ (τ = 0: nothing changes). Optimizer state and the lr schedule are untouched by a
stage (repeats are not optimizer steps).

The tiny validation set is the first ``ff_val_batches`` batches of the run's ``val_loader`` (or
``val_data`` given to :class:`FastForward`); the loss is the run's ``loss_fn`` averaged over those
batches, in eval mode. :class:`FastForward` is the loop callback (``config.training_callbacks``); in a
hand-written loop call ``before_step()`` after ``backward()`` and ``after_step()`` after
``optimizer.step()``. The learned update is a plain rank-r product (PEFT LoRA export).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..batches import LossFn, loss_of, model_device, move_batch
from ..callbacks import Callback, TrainState
from ..checks import integer
from .lora import LoRAConfig, LoRALayer
from .rank_control import MethodController
from .registry import MethodSpec, register


@dataclass
class FastForwardConfig(LoRAConfig):
    """LoRA options plus the Fast Forward schedule: a stage after every ``ff_every`` optimizer steps, on the
    first ``ff_val_batches`` batches of the eval loader, at most ``ff_max_repeats`` repeats (None: no cap)."""

    ff_every: int = 6
    ff_val_batches: int = 1
    ff_max_repeats: int | None = None

    def validate(self) -> None:
        super().validate()
        integer("ff_every", self.ff_every, 1)
        integer("ff_val_batches", self.ff_val_batches, 1)
        integer("ff_max_repeats", self.ff_max_repeats, 1, optional=True)

    def training_callbacks(self, model: nn.Module, adapter_name: str, optimizer: Any = None) -> list[Callback]:
        """What ``rankwise.train.train`` runs with this adapter: the Fast Forward stages."""
        return [FastForward(model, every=self.ff_every, val_batches=self.ff_val_batches,
                            max_repeats=self.ff_max_repeats, adapter_name=adapter_name)]


class FastForward(MethodController):
    """Repeats the last optimizer step while the tiny-validation loss falls (module doc).

    ``val_data``: the tiny validation set (batches); None: the first ``val_batches`` batches of the
    training loop's ``val_loader``. ``history``: one ``(step, repeats)`` per stage. Passed to
    ``train(callbacks=[...])`` it replaces the one the loop would attach for ``adapter_name``."""

    def __init__(self, model: nn.Module, every: int = 6, val_data: Iterable[Any] | None = None,
                 val_batches: int = 1, max_repeats: int | None = None, loss_fn: LossFn | None = None,
                 adapter_name: str = "default") -> None:
        super().__init__(model, adapter_name)
        self.every = integer("every", every, 1)
        self.n_val = integer("val_batches", val_batches, 1)
        self.max_repeats = integer("max_repeats", max_repeats, 1, optional=True)
        self.loss_fn = loss_fn
        self.val: list[Any] | None = None if val_data is None else list(itertools.islice(val_data, self.n_val))
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("FastForward: the model has no trainable parameters")
        self.steps = 0
        self.history: list[tuple[int, int]] = []
        self._before: list[torch.Tensor] | None = None

    # ---- the pieces, for a hand-written loop
    def due(self) -> bool:
        """Whether the optimizer step about to be taken is followed by a stage."""
        return (self.steps + 1) % self.every == 0

    @torch.no_grad()
    def before_step(self) -> None:
        """Keep θ_{t−1} when the coming step ends with a stage."""
        self._before = [p.detach().clone() for p in self.params] if self.due() else None

    def after_step(self) -> int:
        """Count the step; after every ``every``-th, run a stage. Returns its number of kept repeats."""
        self.steps += 1
        if self._before is None:
            return 0
        deltas = [p.detach() - old for p, old in zip(self.params, self._before, strict=True)]
        self._before = None
        repeats = self.stage(deltas)
        self.history.append((self.steps, repeats))
        return repeats

    @torch.no_grad()
    def val_loss(self) -> float:
        """Mean loss over the tiny validation set, in eval mode (the mode is restored)."""
        if not self.val:
            raise ValueError("FastForward has no validation batches: give train() a val_loader or pass val_data")
        was_training = self.model.training
        self.model.eval()
        device = model_device(self.model)
        try:
            losses = [float(loss_of(self.model, move_batch(b, device), self.loss_fn)) for b in self.val]
            return sum(losses) / len(losses)
        finally:
            self.model.train(was_training)

    @torch.no_grad()
    def stage(self, deltas: list[torch.Tensor]) -> int:
        """θ ← θ_t + j·Δ for j = 1, 2, ... while the validation loss falls; the first non-improving j is
        undone (θ = θ_t + (j−1)·Δ, written from θ_t, so no rounding accumulates)."""
        start = [p.detach().clone() for p in self.params]
        best = self.val_loss()
        repeats = 0
        while self.max_repeats is None or repeats < self.max_repeats:
            self._move(start, deltas, repeats + 1)
            loss = self.val_loss()
            if not loss < best:
                self._move(start, deltas, repeats)
                break
            best, repeats = loss, repeats + 1
        return repeats

    def _move(self, start: list[torch.Tensor], deltas: list[torch.Tensor], j: int) -> None:
        for p, s, d in zip(self.params, start, deltas, strict=True):
            p.copy_(s + j * d if j else s)

    # ---- loop hooks
    def on_train_begin(self, state: TrainState) -> None:
        if self.val is None and state.val_loader is not None:
            self.val = list(itertools.islice(state.val_loader, self.n_val))
        if self.loss_fn is None:
            self.loss_fn = state.loss_fn
        if not self.val:
            raise ValueError("fast_forward needs a tiny validation set: pass val_loader to train() (its first "
                             "ff_val_batches batches are used) or a FastForward(model, val_data=...) callback")

    def on_after_backward(self, state: TrainState) -> None:
        self.before_step()

    def on_step_end(self, state: TrainState) -> None:
        if self._before is not None:
            state.log["ff_repeats"] = self.after_step()
        else:
            self.after_step()

    def on_train_end(self, state: TrainState) -> None:
        """A run without a stage is not an error (MethodController's check is for rank changes)."""

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "history": [list(h) for h in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.history = [(int(s), int(r)) for s, r in state["history"]]


register(
    MethodSpec(
        "fast_forward",
        "training-dynamics",
        "Rahamim et al. 2024, Fast Forwarding Low-Rank Training",
        FastForwardConfig,
        LoRALayer,
        summary="plain LoRA; after every ff_every-th optimizer step the step is repeated while the loss on a tiny "
                "validation set (the run's first val batches) falls, the first non-improving repeat undone (the loop "
                "runs it)",
        needs_validation=True,
    )
)
