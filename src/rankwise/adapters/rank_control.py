"""Callbacks that come with an adapter method, attached by every training loop without the user's help.

A rank-allocation method (AdaLoRA, SoRA) is only correct when its controller runs at every step;
PEFT leaves that to the user (``update_and_allocate``), who can forget it and then trains a fixed
rank without any error. The same holds for training-dynamics methods whose update rule is a
per-step action (ALLoRA's per-row step sizes, COLA's merge-and-restart). Here a method's
``MethodSpec.controller`` builds its controller and its config's ``training_callbacks(model,
adapter_name, optimizer)`` returns its per-step callbacks; ``rankwise.train.train``, ``rankwise
train`` and ``RankwiseTrainer`` attach them for every active adapter through
:func:`with_method_controllers` — one mechanism for both.

Each controller is a :class:`MethodController`: a ``RankController`` that counts its
re-allocations and raises at the end of a run in which none happened (the run was shorter than
the schedule's first allocation, or it stopped early), naming the schedule parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..callbacks import Callback, RankController, TrainState, call
from .registry import adapter_state, adapter_states, get_method

__all__ = ["MethodController", "MethodControllers", "checkpoint_tensor", "param_lr", "rank_at_least_one",
           "scaled_update", "with_method_controllers"]

#: ``controller(model, adapter_name, optimizer, total_steps)`` (optimizer None: read it at train begin)
ControllerFactory = Callable[[nn.Module, str, "torch.optim.Optimizer | None", int], RankController]


class MethodController(RankController):
    """A controller that belongs to one adapter (``adapter_name``) of ``model``.

    Subclasses increment ``allocations`` whenever they change rank structure and describe their
    schedule in :meth:`schedule`; :meth:`on_train_end` raises when a run ended with none."""

    def __init__(self, model: nn.Module, adapter_name: str) -> None:
        self.model = model
        self.adapter_name = adapter_name
        self.allocations = 0

    def adapter_config(self, config_cls: type) -> Any:
        """The adapter's config, checked to be a ``config_cls`` (else a ValueError naming its method)."""
        state = adapter_state(self.model, self.adapter_name)
        if not isinstance(state.config, config_cls):
            raise ValueError(f"adapter {self.adapter_name!r} has method {state.method!r}; "
                             f"{type(self).__name__} needs a {config_cls.__name__}")
        return state.config

    def schedule(self) -> str:
        """The schedule parameters, for error messages."""
        return ""

    def allocates_at(self, step: int) -> bool | None:
        """Whether the schedule changes the rank structure at ``step`` (1-based), when that is known before
        the run (None: it depends on the run). Lets :meth:`check_fits` refuse a run too short for it."""
        return None

    def check_fits(self, total_steps: int) -> None:
        """A ValueError before training when the schedule is known and has no re-allocation in steps
        1..``total_steps`` (the end-of-run check of :meth:`on_train_end` would only say so afterwards)."""
        if self.allocates_at(1) is None:
            return
        if not any(self.allocates_at(step) for step in range(1, total_steps + 1)):
            raise ValueError(
                f"{type(self).__name__} (adapter {self.adapter_name!r}; {self.schedule()}) makes no scheduled "
                f"re-allocation within the run's {total_steps} steps; train for more steps or move the "
                "schedule earlier"
            )

    def on_train_end(self, state: TrainState) -> None:
        if self.allocations == 0:
            raise RuntimeError(
                f"the run ended at step {state.step} without a single rank re-allocation by "
                f"{type(self).__name__} (adapter {self.adapter_name!r}; {self.schedule()}): the rank never changed. "
                "Train for more steps or move the schedule earlier"
            )


def _owned(callbacks: Sequence[Any], model: nn.Module) -> set[str]:
    """Adapters of ``model`` whose controller the caller passed already."""
    return {cb.adapter_name for cb in callbacks if isinstance(cb, MethodController) and cb.model is model}


class MethodControllers(Callback):
    """The controllers and training callbacks of ``model``'s active adapters' methods, as one loop callback.

    Built by :meth:`build` once the optimizer and the number of steps are known (the training loop
    builds them before it starts; inside a transformers ``Trainer`` they are built at
    ``on_train_begin``). Hooks and ``state_dict`` are forwarded to each controller in order; a state
    loaded before they are built is applied when they are."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.model, self.names = model, names
        self.controllers: list[Any] | None = None
        self._pending: list[Any] | None = None

    def build(self, optimizer: torch.optim.Optimizer | None, total_steps: int) -> list[Any]:
        if self.controllers is None:
            states = adapter_states(self.model)
            built: list[Any] = []
            for n in self.names:
                factory = get_method(states[n].method).controller
                if factory is not None:
                    controller = factory(self.model, n, optimizer, total_steps)
                    if isinstance(controller, MethodController):
                        controller.check_fits(total_steps)
                    built.append(controller)
                hook = getattr(states[n].config, "training_callbacks", None)
                if hook is not None:
                    built.extend(hook(self.model, n, optimizer))
            self.controllers = built
            if self._pending is not None:
                self.load_state_dict(self._pending)
                self._pending = None
        return self.controllers

    def _call(self, hook: str, *args: Any) -> None:
        call(self.controllers or [], hook, *args)

    def on_train_begin(self, state: TrainState) -> None:
        self.build(state.optimizer, state.total_steps)
        self._call("on_train_begin", state)

    def before_load(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Before a resume loads the checkpoint's ``tensors``: controllers that reshape their adapter
        resize it to the checkpoint's shapes."""
        self._call("before_load", model, tensors)

    def on_after_backward(self, state: TrainState) -> None:
        self._call("on_after_backward", state)

    def on_step_end(self, state: TrainState) -> None:
        self._call("on_step_end", state)

    def on_evaluate(self, state: TrainState, metrics: dict[str, float]) -> None:
        self._call("on_evaluate", state, metrics)

    def on_save(self, state: TrainState, path: Any) -> None:
        self._call("on_save", state, path)

    def on_train_end(self, state: TrainState) -> None:
        self._call("on_train_end", state)

    def state_dict(self) -> list[Any]:
        if self.controllers is None:
            return list(self._pending or [])
        return [c.state_dict() if hasattr(c, "state_dict") else None for c in self.controllers]

    def load_state_dict(self, states: list[Any]) -> None:
        if self.controllers is None:
            self._pending = list(states)
            return
        for c, s in zip(self.controllers, states, strict=False):
            if s is not None and hasattr(c, "load_state_dict"):
                c.load_state_dict(s)


def with_method_controllers(
    model: nn.Module,
    callbacks: Sequence[Any],
    optimizer: torch.optim.Optimizer | None = None,
    total_steps: int | None = None,
) -> list[Any]:
    """A :class:`MethodControllers` for ``model``'s active adapters whose method comes with a controller
    or training callbacks (and whose controller was not passed in ``callbacks``), then ``callbacks``.
    It goes first, so its checkpointed state keeps position 0 when a resumed run passes other callbacks.
    With ``optimizer`` and ``total_steps`` the controllers are built now, so a schedule that cannot fit
    is an error before training."""
    owned = _owned(callbacks, model)
    if total_steps is not None:  # the controllers passed in: their schedules must fit the run too
        for cb in callbacks:
            if isinstance(cb, MethodController) and cb.model is model:
                cb.check_fits(total_steps)
    names = [
        n for n, s in adapter_states(model).items()
        if s.active and n not in owned
        and (get_method(s.method).controller is not None or hasattr(s.config, "training_callbacks"))
    ]
    if not names:
        return list(callbacks)
    auto = MethodControllers(model, names)
    if total_steps is not None:
        auto.build(optimizer, total_steps)
    return [auto, *callbacks]


def rank_at_least_one(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` unchanged, or one zero rank when no rank is left (PEFT's LoRA needs r ≥ 1): same ΔW."""
    if a.shape[0] > 0:
        return b, a
    return b.new_zeros(b.shape[0], 1), a.new_zeros(1, a.shape[1])


def scaled_update(after: torch.Tensor, before: torch.Tensor, factor: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """θ_before + f·(θ_after − θ_before) with one factor f per slice along ``dim``: an exact per-component
    learning-rate factor for an optimizer whose step is proportional to its lr (f = 0 keeps a slice as it
    was, f = 1 takes the step exactly). Used by IncreLoRA (frozen reserve, restart warmup) and DyLoRA
    (only the sampled rank's components move)."""
    shape = [1] * after.dim()
    shape[dim] = -1
    f = factor.to(device=after.device, dtype=after.dtype).view(shape)
    return torch.where(f == 1, after, before + f * (after - before))


def checkpoint_tensor(tensors: dict[str, torch.Tensor], layer_name: str, adapter_name: str, key: str) -> torch.Tensor:
    """Tensor ``key`` of the adapter layer at ``layer_name`` in a checkpoint's ``tensors`` (a state dict by the
    model's names: ``<layer>.<key>``, or ``<layer>.<adapter>.<key>`` when the layer holds several adapters);
    a ValueError naming the key when it is missing. Used by the controllers that reshape their layers to a
    checkpoint's ranks before a resume loads it (IncreLoRA, ElaLoRA)."""
    for full in (f"{layer_name}.{key}", f"{layer_name}.{adapter_name}.{key}"):
        if full in tensors:
            return tensors[full]
    raise ValueError(f"tensors: no '{layer_name}.{key}' for the adapter layer {layer_name!r} "
                     f"(adapter {adapter_name!r})")


def param_lr(optimizer: torch.optim.Optimizer | None, p: torch.Tensor, what: str) -> float:
    """The current learning rate η of the optimizer group holding ``p`` (the step size of a proximal step
    on ``what``); a ValueError when ``p`` is in no group. Used by SoRA (gate) and ARD-LoRA (head scales)."""
    if optimizer is not None:
        for group in optimizer.param_groups:
            if any(q is p for q in group["params"]):
                return float(group["lr"])
    raise ValueError(f"{what} is not in the optimizer: build the optimizer over every trainable parameter "
                     "(the controller's proximal step uses the optimizer's learning rate for it)")
