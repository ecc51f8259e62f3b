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

Tied weights (an embedding shared with the output head) are one parameter with one hook: it fires
once both uses' gradients are summed, so the parameter is stepped once per step with the summed
gradient (as the normal optimizer does) and its gradient is freed right after. The head's part is
computed first in backward and must be kept until the embedding's part arrives at the end: one
gradient of that size lives through the whole backward, which no ordering can avoid without changing
the update. Left to autograd, the end of backward then holds three copies (the head's part, a
transposed view that autograd cannot add into in place; the embedding's dense part; their sum);
:class:`TiedGradients` (on when the optimizer is given the model) keeps the head's part itself and
adds it in place into the embedding's part when that arrives, so two copies exist for one add and
one afterwards. Same bits (a + b = b + a; three or more parts are summed in autograd's order).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils._pytree import tree_leaves

from ..checks import integer
from ..memory import gradient_bytes, tensor_bytes
from .accounting import state_bytes
from .inner import grad_workspace
from .prealloc import InitReport, init_state

__all__ = ["GradBytesTracker", "LayerwiseOptimizer", "TiedGradients", "layerwise"]

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
    optimizers' state now (:meth:`init_state`) rather than in the first backward. ``model``: the model
    the parameters belong to, when ``params`` are parameters or groups (e.g. ``param_groups(model)``);
    with it (or with ``params`` a model) tied weights are summed by :class:`TiedGradients`.
    """

    def __init__(
        self,
        params: nn.Module | Iterable[Any],
        optimizer_factory: OptimizerFactory,
        accumulate: int = 1,
        preallocate: bool = True,
        model: nn.Module | None = None,
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
        model = params if isinstance(params, nn.Module) else model
        self.tied = TiedGradients(model, list(self._optimizers), self._deliver) if model is not None else None

    def _deliver(self, p: torch.Tensor, grad: torch.Tensor) -> None:
        """A tied weight's summed gradient that autograd did not get to accumulate (see TiedGradients)."""
        p.grad = grad if p.grad is None else p.grad + grad
        self._on_grad(p)

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
        if self.tied is not None:
            self.tied.remove()


class TiedGradients:
    """Sum the gradient parts of a weight shared by several modules (a tied embedding / output head)
    as they arrive in backward, instead of leaving it to autograd.

    Every forward of an owning module registers a hook on the autograd node that sends the weight's
    part to its accumulator. Every part but the last is kept here (autograd gets None); the last
    one gets the kept sum added, in place when it is a fresh tensor, and goes on to the accumulator,
    so the post-accumulate-grad hook (the layer-wise step) fires once with the full gradient. Parts
    are summed in arrival order, as autograd's input buffer does, so the result is bit-identical.
    If a backward ends with a part still kept (a forward whose graph was never backpropagated, or
    a backward that skipped a use), ``deliver(p, kept_sum)`` gets it at the end of that backward.
    Meant for ``loss.backward()``: ``torch.autograd.grad`` w.r.t. a tied weight would miss the kept
    parts. Costs one graph walk of a few nodes per forward of an owning module.
    """

    def __init__(self, model: nn.Module, params: list[torch.Tensor],
                 deliver: Callable[[torch.Tensor, torch.Tensor], None]):
        ours = {id(p) for p in params}
        owners: dict[int, tuple[torch.Tensor, list[nn.Module]]] = {}
        for module in model.modules():
            for _, p in module.named_parameters(recurse=False):
                if id(p) in ours:
                    owners.setdefault(id(p), (p, []))[1].append(module)
        self.params = [p for p, modules in owners.values() if len(modules) > 1]
        self._deliver = deliver
        self._expected: dict[int, int] = {}
        self._arrived: dict[int, int] = {}
        self._kept: dict[int, tuple[torch.Tensor, bool]] = {}  # (partial sum, owned by us)
        self._handles = [
            module.register_forward_hook(functools.partial(self._on_forward, p))
            for p, modules in owners.values() if len(modules) > 1 for module in modules
        ]
        self._callback_queued = False

    def _on_forward(self, p: torch.Tensor, module: nn.Module, inputs: Any, output: Any) -> None:
        if not torch.is_grad_enabled() or not p.requires_grad:
            return
        accumulator = p.view_as(p).grad_fn.next_functions[0][0]  # type: ignore[union-attr]
        stop = {t.grad_fn for t in tree_leaves(inputs) if isinstance(t, torch.Tensor) and t.grad_fn is not None}
        todo = [t.grad_fn for t in tree_leaves(output) if isinstance(t, torch.Tensor) and t.grad_fn is not None]
        seen: set[Any] = set()
        while todo:
            node = todo.pop()
            if node in seen or node in stop:
                continue
            seen.add(node)
            for slot, (nxt, _) in enumerate(node.next_functions):
                if nxt is accumulator:
                    node.register_hook(functools.partial(self._on_part, p, slot))
                    self._expected[id(p)] = self._expected.get(id(p), 0) + 1
                elif nxt is not None:
                    todo.append(nxt)

    def _on_part(self, p: torch.Tensor, slot: int, grad_inputs: tuple[Any, ...], grad_outputs: tuple[Any, ...]):
        key = id(p)
        if not self._callback_queued:
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)  # type: ignore[attr-defined]
            self._callback_queued = True
        self._arrived[key] = self._arrived.get(key, 0) + 1
        part = grad_inputs[slot]
        if part is None:
            return None
        kept = self._kept.pop(key, None)
        last = self._arrived[key] >= self._expected.get(key, 0)
        if kept is not None:
            total, owned = kept
            if owned:
                part = total.add_(part)
            elif last and self._fresh(part, grad_outputs):
                part = part.add_(total)  # total + part, bit for bit (addition commutes)
            else:
                part = total + part
            owned = True
        else:
            owned = False
        if last:
            self._arrived[key] = self._expected[key] = 0
            return tuple(part if i == slot else g for i, g in enumerate(grad_inputs))
        self._kept[key] = (part, owned)
        return tuple(None if i == slot else g for i, g in enumerate(grad_inputs))

    @staticmethod
    def _fresh(t: torch.Tensor, grad_outputs: tuple[Any, ...]) -> bool:
        """Made by the node's backward (not a view, not sharing memory with the incoming gradients)."""
        if t._is_view():
            return False
        ptr = t.untyped_storage().data_ptr()
        return all(g is None or g.untyped_storage().data_ptr() != ptr for g in grad_outputs)

    def _end_of_backward(self) -> None:
        self._callback_queued = False
        pending = [(p, self._kept.pop(id(p))[0]) for p in self.params if id(p) in self._kept]
        self._expected.clear()
        self._arrived.clear()
        for p, grad in pending:
            with torch.no_grad():
                self._deliver(p, grad)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def layerwise(
    model: nn.Module | Iterable[Any], optimizer_factory: OptimizerFactory, accumulate: int = 1,
    preallocate: bool = True, owner: nn.Module | None = None,
) -> LayerwiseOptimizer:
    """``LayerwiseOptimizer(model, optimizer_factory, accumulate, preallocate, model=owner)``; e.g.
    ``layerwise(model, lambda groups: torch.optim.AdamW(groups, lr=1e-3, fused=True))`` or
    ``layerwise(param_groups(model, rank=128), galore_factory, owner=model)``."""
    return LayerwiseOptimizer(model, optimizer_factory, accumulate, preallocate, model=owner)


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
