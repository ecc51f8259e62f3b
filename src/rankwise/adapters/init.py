"""Initializations of LoRA-shaped factors: pure functions of the weight (and, for data-driven
inits, of an estimated full gradient).

Each init is ``fn(weight, r, scale, ctx) -> (B, A)`` with ``weight`` the fp32 W₀ (out × in).
``moves_base=True`` means the init takes s·B·A out of the frozen base (W_base = W₀ − s·B·A) so that
the adapted model starts equal to the base model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class InitContext:
    """What an init may need beyond the weight: the layer name, an estimated gradient, a generator."""

    name: str = ""
    grad: torch.Tensor | None = None
    skip: bool = False  # build shapes only (tensors come from a checkpoint)
    generator: torch.Generator | None = None
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Init:
    fn: Callable[[torch.Tensor, int, float, InitContext], tuple[torch.Tensor, torch.Tensor]] | None
    moves_base: bool
    needs_grad: bool = False


def _default(weight: torch.Tensor, r: int, scale: float, ctx: InitContext):
    raise AssertionError("the default init is done by the layer itself")


INITS: dict[str, Init] = {
    "default": Init(_default, moves_base=False),
}
