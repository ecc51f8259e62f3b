"""torch.optim conventions shared by every rankwise optimizer and sampler.

A learning rate may be a float or, as ``torch.optim.AdamW`` accepts, a one-element floating tensor
(``lr=torch.tensor(1e-3)``, which an LR scheduler updates in place). ``check_lr`` validates either and
returns it unchanged (a tensor stays the same object, so in-place updates reach the optimizer);
``float_lr`` gives the group a float ``lr`` for the arithmetic of one step. ``svd_fallbacks`` counts the
projector refreshes whose SVD failed over to the next method.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..checks import number

__all__ = ["check_lr", "float_lr", "svd_fallbacks"]


def check_lr(value: Any, *, low_open: bool = False) -> Any:
    """``value`` if it is a finite number ≥ 0 (> 0 with ``low_open``) or a one-element floating tensor
    holding one; else a ValueError naming ``lr``."""
    if not torch.is_tensor(value):
        return number("lr", value, 0.0, low_open=low_open)
    ok = value.numel() == 1 and value.is_floating_point()
    if ok:
        x = float(value)
        ok = math.isfinite(x) and (x > 0.0 if low_open else x >= 0.0)
    if not ok:
        bound = "> 0.0" if low_open else ">= 0.0"
        raise ValueError(f"lr={value!r} must be a finite number {bound} (a float or a one-element floating tensor)")
    return value


def float_lr(group: dict[str, Any]) -> dict[str, Any]:
    """``group`` itself when its ``lr`` is a float, else a shallow copy with ``float(lr)`` (read once per step)."""
    lr = group["lr"]
    return {**group, "lr": float(lr)} if torch.is_tensor(lr) else group


def svd_fallbacks(optimizer: torch.optim.Optimizer) -> int:
    """How many projector refreshes of ``optimizer`` could not use their first SVD method (exact for
    ``svd``, randomized for ``rsvd``) and fell back (see ``Projector.robust_basis``); kept in the
    per-parameter state, so it survives ``state_dict`` round trips (and is reset with a sampler's
    dropped state)."""
    return sum(int(st.get("svd_fallbacks", 0)) for st in optimizer.state.values())
