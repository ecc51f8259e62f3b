"""Layer-wise (per-parameter) optimizer steps inside the backward pass.

One optimizer per parameter, stepped from that parameter's post-accumulate-grad hook, after which the
gradient is freed at once: the full set of gradients never exists at the same time (the per-layer
weight updates of GaLore, Zhao et al. 2024, after LOMO, Lv et al. 2023). Peak gradient memory drops
from Σ|∇W| to max|∇W|.

With gradient accumulation over ``accumulate`` micro-batches, a parameter is stepped on the backward
of the last micro-batch only; until then its summed gradient is kept, so during accumulation the
gradients of all parameters *do* coexist (the saving only applies to the last micro-batch). A global
operation on all gradients (clipping by the total norm) is not possible in this mode.

Peak memory. The per-parameter optimizers' state is allocated at construction (``init_state``,
see ``prealloc.py``: everything but what needs the first gradient, e.g. a projector's basis), so
step 1 does not stack new state on the live activations. Each step runs while its gradient is the
only one alive (apart from a tied weight's, below) and uses that gradient's buffer as workspace
(``inner.grad_workspace``; torch's AdamW needs ``fused=True`` for a step without a parameter-sized
temporary), so the peak is weights + state + activations + the largest gradient
(``benchmarks/layerwise_memory.py`` measures it).

Tied weights (an embedding shared with the output head) are one parameter with one hook: autograd
sums both uses' gradients before the hook fires, so the parameter is stepped once per step with the
summed gradient (as the normal optimizer does) and its gradient is freed right after. The head's
contribution is computed first in backward and must be kept until the embedding's arrives at the
end: that one gradient lives through the whole backward, which no ordering can avoid without
changing the update.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from ..checks import integer
from ..memory import gradient_bytes, tensor_bytes
from .accounting import state_bytes
from .inner import grad_workspace
from .prealloc import InitReport, init_state

__all__ = ["GradBytesTracker", "LayerwiseOptimizer", "layerwise"]

OptimizerFactory = Callable[[list[dict[str, Any]]], Optimizer]


def _as_groups(params: nn.Module | Iterable[Any]) -> list[dict[str, Any]]:
    if isinstance(params, nn.Module):
        return [{"params": [p for p in params.parameters() if p.requires_grad]}]
    if isinstance(params, torch.Tensor):
        raise ValueError("params must be a model, an iterable of parameters or of param-group dicts, not a tensor")
    items = list(params)
    if not items:
        raise ValueError("params is empty: nothing to optimize")
    if all(isinstance(g, dict) for g in items):
        return items
    if all(isinstance(p, torch.Tensor) for p in items):
        return [{"params": items}]
    raise ValueError("params must be a model, an iterable of parameters or of param-group dicts")


class LayerwiseOptimizer(Optimizer):
    """Steps ``optimizer_factory([{"params": [p], **group_options}])`` for each parameter ``p`` inside
    backward, right after p's gradient is complete, then sets ``p.grad = None``.

    ``params``: a model (its trainable parameters), parameters, or param-group dicts whose extra keys
    (e.g. ``rank`` for a projected optimizer) are passed to the factory. ``accumulate``: micro-batches
    per optimizer step. ``step()`` only runs a closure (the updates already happened in backward) and
    ``param_groups`` is the list of the per-parameter optimizers' groups, so any
    ``torch.optim.lr_scheduler`` drives all of them. ``state_dict()`` holds every per-parameter
    optimizer's state dict and the micro-batch counters. ``preallocate`` (default True): allocate the
    optimizers' state now (:meth:`init_state`) rather than in the first backward.
    """

    def __init__(
        self,
        params: nn.Module | Iterable[Any],
        optimizer_factory: OptimizerFactory,
        accumulate: int = 1,
        preallocate: bool = True,
    ):
        if not callable(optimizer_factory):
            raise ValueError("optimizer_factory must be callable: list of one param group -> torch Optimizer")
        integer("accumulate", accumulate, 1)
        self._factory = optimizer_factory
        self.accumulate = accumulate
        self._optimizers: dict[torch.Tensor, Optimizer] = {}
        self._pending: dict[torch.Tensor, int] = {}
        self._handles: list[Any] = []
        super().__init__(_as_groups(params), {})
        self.init_report: InitReport | None = self.init_state() if preallocate else None

    def init_state(self) -> InitReport:
        """Allocate every per-parameter optimizer's state ahead of the first backward where possible
        (``prealloc.init_state``; zeros, numerics unchanged). Returns what was allocated and what stays
        lazy (e.g. a projector's basis, which needs the first gradient)."""
        report = InitReport()
        for optimizer in self._optimizers.values():
            one = init_state(optimizer)
            report.allocated_bytes += one.allocated_bytes
            report.lazy.extend(one.lazy)
        return report

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """One optimizer (and one backward hook) per parameter of ``param_group``."""
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        options = {k: v for k, v in param_group.items() if k != "params"}
        for p in params:
            if not isinstance(p, torch.Tensor) or not p.requires_grad:
                raise ValueError("every parameter given to LayerwiseOptimizer must be a tensor with requires_grad=True")
            if p in self._optimizers:
                raise ValueError("a parameter appears twice in the parameters given to LayerwiseOptimizer")
            optimizer = self._factory([{**options, "params": [p]}])
            if not isinstance(optimizer, Optimizer):
                raise ValueError(f"optimizer_factory returned {type(optimizer).__name__}, not a torch Optimizer")
            owned = [q for g in optimizer.param_groups for q in g["params"]]
            if len(owned) != 1 or owned[0] is not p:
                raise ValueError("optimizer_factory must build an optimizer over exactly the parameter it is given")
            self._optimizers[p] = optimizer
            self._pending[p] = 0
            self._handles.append(p.register_post_accumulate_grad_hook(self._on_grad))
            self.param_groups.extend(optimizer.param_groups)

    @torch.no_grad()
    def _on_grad(self, p: torch.Tensor) -> None:
        self._pending[p] += 1
        if self._pending[p] < self.accumulate:
            return
        self._pending[p] = 0
        with grad_workspace():  # the gradient is dropped right after: its buffer is the step's workspace
            self._optimizers[p].step()
        p.grad = None

    def step(self, closure=None):  # type: ignore[override]
        """Runs ``closure`` (whose backward performs the updates); parameters are updated in backward."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    @property
    def optimizers(self) -> list[Optimizer]:
        """The per-parameter optimizers, in parameter order."""
        return list(self._optimizers.values())

    def state_bytes(self) -> int:
        """Bytes kept between steps: the sum of the per-parameter optimizers' ``state_bytes``
        (``accounting.state_bytes``; this object's own ``state`` stays empty)."""
        return sum(state_bytes(o) for o in self._optimizers.values())

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {
            "optimizers": [o.state_dict() for o in self._optimizers.values()],
            "pending": [self._pending[p] for p in self._optimizers],
            "accumulate": self.accumulate,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        saved = state_dict.get("optimizers")
        if not isinstance(saved, list) or len(saved) != len(self._optimizers):
            raise ValueError(
                f"state_dict holds {len(saved) if isinstance(saved, list) else 'no'} per-parameter optimizers; "
                f"this LayerwiseOptimizer has {len(self._optimizers)}"
            )
        if int(state_dict["accumulate"]) != self.accumulate:
            raise ValueError(
                f"state_dict was saved with accumulate={state_dict['accumulate']}, this one has {self.accumulate}"
            )
        for (p, optimizer), inner, pending in zip(self._optimizers.items(), saved, state_dict["pending"], strict=True):
            optimizer.load_state_dict(inner)
            self._pending[p] = int(pending)
        # load_state_dict gives each optimizer new group dicts: re-expose them
        self.param_groups = [g for o in self._optimizers.values() for g in o.param_groups]

    def remove_hooks(self) -> None:
        """Detach the backward hooks (the parameters then keep their gradients again)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def layerwise(
    model: nn.Module | Iterable[Any], optimizer_factory: OptimizerFactory, accumulate: int = 1,
    preallocate: bool = True,
) -> LayerwiseOptimizer:
    """``LayerwiseOptimizer(model, optimizer_factory, accumulate, preallocate)``; e.g.
    ``layerwise(model, lambda groups: torch.optim.AdamW(groups, lr=1e-3, fused=True))``."""
    return LayerwiseOptimizer(model, optimizer_factory, accumulate, preallocate)


class GradBytesTracker:
    """Peak bytes of ``.grad`` tensors alive at once, observed at every post-accumulate-grad event.

    At the event of parameter p, live bytes = p's gradient + every other tracked gradient not None;
    counting p explicitly makes the result independent of hook order (a layer-wise optimizer may
    already have freed p.grad). Costs O(#params) per event. Use as a context manager or call
    ``remove()``.
    """

    def __init__(self, params: nn.Module | Iterable[torch.Tensor]):
        candidates = params.parameters() if isinstance(params, nn.Module) else params
        self._params = [p for p in candidates if p.requires_grad]
        if not self._params:
            raise ValueError("params has no parameter with requires_grad=True to track")
        self.peak_bytes = 0
        self._handles = [p.register_post_accumulate_grad_hook(self._observe) for p in self._params]

    def _observe(self, p: torch.Tensor) -> None:
        live = tensor_bytes(p.grad if p.grad is not None else p)
        live += gradient_bytes(q for q in self._params if q is not p)
        self.peak_bytes = max(self.peak_bytes, live)

    def reset(self) -> None:
        self.peak_bytes = 0

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> GradBytesTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
