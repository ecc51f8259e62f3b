"""Optimizer state allocated before the first backward (``init_state``).

torch's optimizers and the projected engine create their state lazily, in the first ``step()``. In the
layer-wise mode that first step runs inside backward, while the activations are alive, so the state
is allocated on top of them in step 1. ``init_state(optimizer)`` allocates ahead what the first step
would allocate, with the same shapes, dtypes and (zero) values, so the numerics are unchanged:

* ``torch.optim.Adam`` / ``AdamW`` (and subclasses): torch's own ``_init_group`` (``step``,
  ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq`` with amsgrad), fed a zero-stride zero gradient;
* ``ProjectedOptimizer`` (GaLore, Fira, APOLLO, FRUGAL, OSD, DCT, GradNormLoRP, Q-GaLore, ...): the
  per-parameter seed and the inner update's moments (``Inner.init_state``) at the shape they have —
  the full shape for groups without ``rank``, the low-rank shape of R = proj(G) (r×n or m×r) for
  projected weights; Flora's Adafactor statistics of G and its compressed momentum.

What cannot be allocated ahead, and is created at the first gradient as before:

* the projector's basis (SVD / randomized SVD of G, DCT or coordinate indices of G, the quantized
  basis): it is a function of the first gradient; r·d elements per weight;
* the 8-bit moments of a large tensor (``adamw8bit`` inner: galore_8bit, q_galore): every update
  dequantizes, updates and re-quantizes them, so fresh codes are allocated each step anyway;
* values computed from the weights at the first step (GradNormLoRP's magnitude vector, 3·out
  floats), Fira's / APOLLO's scalar statistics, FRUGAL's block selector (it resets the state of the
  tensors it switches to);
* every other optimizer (SGD's momentum is a copy of the first gradient, not zeros).

The return value says how many bytes were allocated and which parameters keep some lazy state.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

from .accounting import state_bytes
from .inner import get_inner
from .projected import ProjectedOptimizer
from .projectors import resolve_side
from .sharding import is_dtensor

__all__ = ["InitReport", "init_state"]


@dataclass
class InitReport:
    """What ``init_state`` did: ``allocated_bytes`` (the optimizer's ``state_bytes`` growth) and
    ``lazy``, one line per parameter (or optimizer) whose state is still partly created at the first
    step, with the reason."""

    allocated_bytes: int = 0
    lazy: list[str] = field(default_factory=list)


def _sharded(p: torch.Tensor, name: str, report: InitReport) -> bool:
    """True (and noted as lazy) for a sharded (FSDP2 DTensor) parameter: its state is created at the first
    step in the gradient's sharding, not as a plain tensor of the global shape."""
    if is_dtensor(p):
        report.lazy.append(f"{name} {tuple(p.shape)}: sharded (DTensor) parameter, state created at the first step")
        return True
    return False


def _torch_adam(optimizer: torch.optim.Optimizer, report: InitReport) -> None:
    init_group = optimizer._init_group  # type: ignore[attr-defined]
    n_lists = len(inspect.signature(init_group).parameters) - 1  # after ``group``: output lists
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not p.requires_grad or p.grad is not None or optimizer.state.get(p):
                continue
            if _sharded(p, type(optimizer).__name__, report):
                continue
            zero = torch.zeros((), dtype=p.dtype, device=p.device)
            p.grad = zero.expand_as(p)  # no memory: _init_group reads only the grad's presence
            try:
                single = {**group, "params": [p]}
                init_group(single, *([] for _ in range(n_lists)))
            finally:
                p.grad = None


def _projected(optimizer: ProjectedOptimizer, report: InitReport) -> None:
    name = type(optimizer).__name__
    for group in optimizer.param_groups:
        inner = get_inner(group["inner"])
        for p in group["params"]:
            if not p.requires_grad or _sharded(p, name, report):
                continue
            optimizer._ensure_seed(p)
            state = optimizer.state[p]
            if "step" in state:  # already stepped (or loaded): nothing to do
                continue
            shape = tuple(p.shape)
            if "rank" not in group:
                if not inner.init_state(state, shape, group, p.device, p.dtype):
                    report.lazy.append(f"{name} {shape}: {group['inner']} moments are re-created by every update")
                continue
            if getattr(optimizer, "selector", None) == "block":
                report.lazy.append(f"{name} {shape}: the block selector resets the state of the tensors it activates")
                continue
            side = resolve_side(group["proj_side"], p.shape)
            rank = optimizer._rank_for(p, group, side)
            low = (rank, shape[1]) if side == "left" else (shape[0], rank)
            if name == "Flora":  # Adafactor statistics of G itself, momentum in the projected shape
                get_inner("adafactor").init_state(state, shape, {}, p.device, p.dtype)
                state.setdefault("exp_avg", torch.zeros(low, device=p.device, dtype=p.dtype))
                report.lazy.append(f"{name} {shape}: the projection (seeded, drawn at the first step)")
                continue
            if p.dtype != torch.float32:
                report.lazy.append(f"{name} {shape}: {p.dtype} weight (R's dtype is known at the first gradient)")
                continue
            if not inner.init_state(state, low, group, p.device, p.dtype):
                report.lazy.append(f"{name} {shape}: {group['inner']} moments are re-created by every update")
            basis = f"the {group['projector']} basis ({low} projection)"
            report.lazy.append(f"{name} {shape}: {basis} needs the first gradient")


def init_state(optimizer: torch.optim.Optimizer) -> InitReport:
    """Allocate ``optimizer``'s state ahead of its first step where that is possible (see the module
    docstring); parameters that already have state are left alone. Returns an :class:`InitReport`."""
    report = InitReport()
    before = state_bytes(optimizer)
    if isinstance(optimizer, ProjectedOptimizer):
        _projected(optimizer, report)
    elif isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        _torch_adam(optimizer, report)
    else:
        report.lazy.append(f"{type(optimizer).__name__}: no ahead-of-time state (created at its first step)")
    report.allocated_bytes = state_bytes(optimizer) - before
    return report

