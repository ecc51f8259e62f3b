"""One wrapper that adds step-level safety and precision options to any ``torch.optim.Optimizer``.

``guard(optimizer, skip_nonfinite=..., master_weights=..., bf16_rounding=...)`` (and
``rw.optim.make(name, model, ...)`` with the same keywords) returns a :class:`GuardedOptimizer` that
shares the wrapped optimizer's ``param_groups`` and ``state`` (so LR schedulers, ``zero_grad`` and
``state_bytes`` see the same objects) and changes only what ``step()`` does:

* ``skip_nonfinite=True`` — if any gradient holds a NaN or ±inf, the step is skipped: no parameter,
  no optimizer state (moments, projectors, a sampler's clock and RNG) changes, and ``skipped_steps``
  counts it (saved in ``state_dict()["guard"]``, so a resumed run keeps the count). Huge but finite
  gradients are not skipped (see ``tests/optim/test_numerics.py``).
* ``master_weights=True`` — every bf16 / fp16 parameter the optimizer updates gets an fp32 master
  copy (kept in the optimizer state under ``"master_weight"``, so it is counted by ``state_bytes``,
  saved in ``state_dict`` and dropped with a sampler's state when its block goes to sleep). For the
  step the parameter's storage is switched to the master and its gradient to fp32, so the optimizer
  and every state tensor it creates work in fp32; afterwards the parameter gets the master rounded
  back to its dtype. Updates far below the bf16 spacing (lr·update ≪ 2⁻⁸·|w|) accumulate in the
  master instead of being rounded away. A weight changed outside the optimizer (a loaded checkpoint,
  a merge) is noticed elementwise (master no longer rounds to it) and its master restarts from it.
* ``bf16_rounding="stochastic"`` — the fp32 result is rounded to bf16 stochastically (up with
  probability equal to the dropped fraction, so E[round(x)] = x): with ``master_weights`` for the
  copy back, without it (no extra memory) the step runs on a temporary fp32 copy and the rounding
  keeps small updates in expectation. The generator state is saved in ``state_dict()["guard"]``.
  fp16 parameters always round to nearest.

The wrapper is loaded from a state_dict saved without it (or with other options) too: missing masters
start from the current weights, a missing count from 0. Attributes it does not define (``state_bytes``,
``svd_fallbacks``, ``awake_parameters``, ...) are the wrapped optimizer's.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer

from ..checks import choice
from .copyable import CopyableOptimizer, saved_params

__all__ = ["GUARD_OPTIONS", "GuardedOptimizer", "ROUNDINGS", "guard", "stochastic_round_bf16"]

ROUNDINGS = ("nearest", "stochastic")
#: the keywords ``make`` hands to :func:`guard`
GUARD_OPTIONS = ("skip_nonfinite", "master_weights", "bf16_rounding")
MASTER_KEY = "master_weight"
_LOW = (torch.bfloat16, torch.float16)


def stochastic_round_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """fp32 ``x`` rounded to bf16 stochastically: a uniform 16-bit integer is added to the low half of
    the float32 bit pattern and the low half cleared, so |x| rounds up with probability equal to the
    dropped fraction (unbiased; ±inf stay ±inf, NaN stays NaN)."""
    bits = x.float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, x.shape, generator=generator, device=x.device, dtype=torch.int32)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


def _rounds_to(master: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Elementwise: ``weight`` is a rounding of ``master`` (for bf16 either neighbour, as stochastic
    rounding may pick; for fp16 the nearest)."""
    if weight.dtype != torch.bfloat16:
        return master.to(weight.dtype) == weight
    low = master.view(torch.int32) & -65536
    bits = weight.float().view(torch.int32)
    return (bits == low) | (bits == low + 65536)


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} must be True or False")
    return value


class GuardedOptimizer(CopyableOptimizer):
    """Wraps ``optimizer``; see the module docstring. ``skipped_steps`` counts skipped steps."""

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        skip_nonfinite: bool = False,
        master_weights: bool = False,
        bf16_rounding: str = "nearest",
        seed: int = 0,
    ):
        if not isinstance(optimizer, Optimizer):
            raise ValueError(f"guard() wraps a torch.optim.Optimizer, not {type(optimizer).__name__}")
        if isinstance(optimizer, GuardedOptimizer):
            raise ValueError("the optimizer is already guarded; pass every option to one guard()")
        self.optimizer = optimizer
        self.skip_nonfinite = _bool("skip_nonfinite", skip_nonfinite)
        self.master_weights = _bool("master_weights", master_weights)
        self.bf16_rounding = choice("bf16_rounding", bf16_rounding, ROUNDINGS)
        self.skipped_steps = 0
        self._seed = int(seed)
        self._generators: dict[str, torch.Generator] = {}
        # what torch's Optimizer.__init__ sets up, without building groups of its own
        torch._C._log_api_usage_once("python.optimizer")
        for name in ("step_pre", "step_post", "state_dict_pre", "state_dict_post", "load_state_dict_pre",
                     "load_state_dict_post"):
            setattr(self, f"_optimizer_{name}_hooks", OrderedDict())
        self._patch_step_function()
        self._warned_capturable_if_run_uncaptured = True

    # ------------------------------------------------------------------ the wrapped optimizer's objects

    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property  # type: ignore[override]
    def state(self) -> Any:
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property  # type: ignore[override]
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def __getattr__(self, name: str) -> Any:
        inner = self.__dict__.get("optimizer")
        if inner is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(inner, name)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    # ------------------------------------------------------------------ step

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def grads_finite(self) -> bool:
        """Whether every gradient is finite (one device sync per device)."""
        flags: dict[torch.device, list[torch.Tensor]] = {}
        for p in self._params():
            g = p.grad
            if g is None:
                continue
            values = g._values() if g.is_sparse else g
            flags.setdefault(values.device, []).append(torch.isfinite(values).all())
        return all(bool(torch.stack(f).all()) for f in flags.values())

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self._seed)
        return self._generators[key]

    def _round(self, master: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if dtype == torch.bfloat16 and self.bf16_rounding == "stochastic":
            return stochastic_round_bf16(master, self._generator(master.device))
        return master.to(dtype)

    def _to_fp32(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Point every low-precision parameter with a gradient at its fp32 master (or a temporary fp32
        copy) and give it an fp32 gradient; returns what to undo (parameter, gradient, weight tensor)."""
        swapped = []
        for p in self._params():
            if p.grad is None or p.dtype not in _LOW:
                continue
            st = self.state.get(p)
            master = st.get(MASTER_KEY) if st and self.master_weights else None
            if master is None:
                master = p.detach().float()
            else:  # restart from the weight where it was changed outside the optimizer
                master = torch.where(_rounds_to(master, p.detach()), master, p.detach().float())
            grad, weight = p.grad, p.data
            p.grad = None
            p.data = master
            p.grad = grad.float()
            swapped.append((p, grad, weight))
        return swapped

    def _from_fp32(self, swapped: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        for p, grad, weight in swapped:
            master = p.data
            keep_grad = p.grad is not None  # a sampler drops the gradients of the blocks it puts to sleep
            p.grad = None
            weight.copy_(self._round(master, weight.dtype))  # the weight keeps its storage
            p.data = weight
            if keep_grad:
                p.grad = grad
            st = self.state.get(p)
            if self.master_weights and st:  # only where the optimizer keeps state (e.g. awake blocks)
                st[MASTER_KEY] = master

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.skip_nonfinite and not self.grads_finite():
            self.skipped_steps += 1
            return loss
        if not (self.master_weights or self.bf16_rounding == "stochastic"):
            self.optimizer.step()
            return loss
        swapped = self._to_fp32()
        try:
            self.optimizer.step()
        finally:
            self._from_fp32(swapped)
        return loss

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The wrapped optimizer's state dict plus ``"guard"``: ``skipped_steps`` and the stochastic
        rounding generators' states (fp32 masters are in the per-parameter state)."""
        out = dict(self.optimizer.state_dict())
        out["guard"] = {
            "skipped_steps": self.skipped_steps,
            "rng": {key: gen.get_state() for key, gen in self._generators.items()},
        }
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        state_dict = dict(state_dict)
        saved = state_dict.pop("guard", {})
        # saved keys are positions or parameter names (torch.distributed.checkpoint)
        params = saved_params(self.optimizer, state_dict)
        # load with the low-precision parameters in fp32 (their masters where saved): torch casts the
        # floating state to the parameter's dtype, which must stay fp32 for the masters and moments
        swapped = []
        for index, st in state_dict.get("state", {}).items():
            p = params.get(index)
            if p is None:
                continue  # more saved parameters than this optimizer has: torch's loader rejects it
            if p.dtype in _LOW and (self.master_weights or self.bf16_rounding == "stochastic"):
                master = st.get(MASTER_KEY)
                swapped.append((p, p.data))
                p.data = master.to(p.device, torch.float32) if master is not None else p.detach().float()
        try:
            self.optimizer.load_state_dict(state_dict)
        finally:
            for p, weight in swapped:
                p.data = weight
        self.skipped_steps = int(saved.get("skipped_steps", 0))
        for key, rng in saved.get("rng", {}).items():
            self._generator(torch.device(key)).set_state(rng)


def guard(
    optimizer: Optimizer,
    *,
    skip_nonfinite: bool = False,
    master_weights: bool = False,
    bf16_rounding: str = "nearest",
    seed: int = 0,
) -> Optimizer:
    """``optimizer`` wrapped in a :class:`GuardedOptimizer` with these options; unchanged when every
    option is off (so the default costs nothing)."""
    if not (skip_nonfinite or master_weights or bf16_rounding != "nearest"):
        choice("bf16_rounding", bf16_rounding, ROUNDINGS)
        return optimizer
    return GuardedOptimizer(optimizer, skip_nonfinite=skip_nonfinite, master_weights=master_weights,
                            bf16_rounding=bf16_rounding, seed=seed)
