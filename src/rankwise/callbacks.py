"""The callback protocol of the training loop (:func:`rankwise.train.train`).

One optimizer step of the loop, and where each hook runs::

    on_train_begin(state)                        once, before the first step
    loss = loss_fn(model, batch); loss.backward()
    on_after_backward(state)                     gradients present, weights not yet updated
    clip; optimizer.step(); scheduler.step()
    on_step_end(state)                           weights updated (state.step counts this step)
    optimizer.zero_grad()
    on_evaluate(state, metrics)                  after each evaluation
    on_save(state, path)                         after each checkpoint is written
    on_train_end(state)                          once, after the final evaluation

A callback is any object with some of these methods (duck typing); :class:`Callback` is the base
with every hook a no-op. A callback may set ``state.should_stop = True`` and may add fields to this
step's history record through ``state.log``. Callbacks with ``state_dict()`` / ``load_state_dict()``
are saved with every checkpoint and restored on resume.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from .train import TrainConfig

__all__ = ["Callback", "RankController", "TrainState", "call", "clear_optimizer_state"]


@dataclass
class TrainState:
    """What callbacks see: the live objects and the position in training.

    ``step`` counts finished optimizer steps (so in ``on_after_backward`` it is the 0-based index of
    the step being taken); ``batch_in_epoch`` counts the loader batches consumed in this epoch (with
    ``grad_accum`` = k, k per step); ``log`` holds extra fields for the current step's history record.
    ``eval_loader`` and ``loss_fn`` are the run's (None when it has none / uses ``model(**batch).loss``).
    ``val_loader`` is the held-out data a method fits its own choices on while training (AutoLoRA's
    selection variables, Fast Forward's stopping rule): ``train``'s ``val_loader``, else its ``eval_loader``.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    config: TrainConfig
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    total_steps: int = 0
    loss: float | None = None
    should_stop: bool = False
    log: dict[str, Any] = field(default_factory=dict)
    eval_loader: Any = None
    loss_fn: Any = None
    val_loader: Any = None
    scaler: Any = None  # the run's torch.amp.GradScaler under precision="fp16", else None


class Callback:
    """Base class of loop callbacks: every hook is a no-op; override the ones you need."""

    def before_load(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """A resume is about to load the checkpoint's trained ``tensors`` into ``model``: a callback
        that reshapes the model while training (IncreLoRA's rank growth) resizes it to fit them. For a
        checkpoint written under ``torch.distributed`` the parameters come as ``meta`` tensors (shape
        and dtype) and the buffers with their values (:func:`rankwise.checkpoint.sharded_tensors`);
        under FSDP2 it runs before ``fully_shard`` (:func:`rankwise.train.reshape_for_resume`)."""

    def on_train_begin(self, state: TrainState) -> None:
        """Once, before the first step (after a resume: after the state is restored)."""

    def on_after_backward(self, state: TrainState) -> None:
        """After ``loss.backward()``, before clipping and the optimizer step: read gradients here."""

    def on_step_end(self, state: TrainState) -> None:
        """After ``optimizer.step()`` and the scheduler step, gradients still present: change structure here."""

    def on_evaluate(self, state: TrainState, metrics: dict[str, float]) -> None:
        """After each evaluation (periodic and final) with its metrics."""

    def on_save(self, state: TrainState, path: Path) -> None:
        """After a checkpoint has been written to ``path``."""

    def on_train_end(self, state: TrainState) -> None:
        """Once, after the final evaluation."""


def call(callbacks: Sequence[Any], hook: str, *args: Any) -> None:
    """Run ``hook(*args)`` on every callback that has it, in order."""
    for cb in callbacks:
        fn = getattr(cb, hook, None)
        if fn is not None:
            fn(*args)


class RankController(Callback):
    """A callback that changes the rank structure of a model while it trains.

    Contract: it acts in :meth:`on_step_end`, i.e. after ``optimizer.step()`` (gradient-based
    importance, if it needs one, is read in :meth:`on_after_backward`). It prunes, grows or
    re-allocates rank *in place* — the model keeps the same ``nn.Parameter`` objects unless stated
    otherwise — and leaves the optimizer state consistent with what the parameters now mean:

    * a parameter that keeps its shape but whose entries now mean something else (re-initialized,
      re-sampled or merged factors) must have its state cleared (:func:`clear_optimizer_state`; the
      optimizer re-creates it at the next step) or reset deliberately (e.g. ReLoRA's pruning);
    * a parameter that changes shape must have its state cleared *before* the next step (moments
      of the old shape do not fit), and a parameter replaced by a new tensor must also be swapped
      in ``optimizer.param_groups`` (the state is keyed by the parameter object).

    A controller defines ``step()``, its action after one optimizer step, for users who write their
    own loop; in the loop, :meth:`on_step_end` calls it.
    """

    step: Callable[[], Any]  # each controller's action after one optimizer step

    def on_step_end(self, state: TrainState) -> None:
        self.step()


def replace_in_optimizer(optimizer: torch.optim.Optimizer, replacements: dict[torch.Tensor, list[torch.Tensor]]
                         ) -> None:
    """Put the tensors ``replacements[p]`` in parameter ``p``'s place in ``optimizer.param_groups`` (its group,
    its position) and drop ``p``'s state: the contract for a parameter replaced by new tensors (Cuttlefish's
    W → U, V; ReLoRA's W → A, B after its warm start)."""
    for group in optimizer.param_groups:
        kept: list[torch.Tensor] = []
        for p in group["params"]:
            if p in replacements:  # tensors hash by identity
                optimizer.state.pop(p, None)
                kept += replacements[p]
            else:
                kept.append(p)
        group["params"] = kept


def clear_optimizer_state(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor]) -> None:
    """Forget the optimizer state of ``params`` (it is re-created, at the current shape, at the next step)."""
    for p in params:
        if p in optimizer.state:
            optimizer.state[p].clear()
