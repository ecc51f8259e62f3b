"""Optimizers that survive ``copy.deepcopy``, ``pickle`` and ``torch.save`` as torch's own do.

``torch.optim.Optimizer.__getstate__`` keeps only ``defaults``, ``state`` and ``param_groups``, so the
attributes a subclass sets in ``__init__`` (projector caches and seeds, FRUGAL's selector, a sampler's
inner optimizer and units) are missing from a copy, whose first ``step()`` then raises. Keeping every
instance attribute except torch's hook tables (dropped by torch too; ``__setstate__`` recreates them
empty) makes the copy an equal, independent optimizer.
"""

from __future__ import annotations

from typing import Any

from torch.optim import Optimizer

__all__ = ["CopyableOptimizer"]


def _torch_managed(name: str, value: Any) -> bool:
    """Attributes torch's ``__setstate__`` rebuilds (the hook tables, the profiler's step name) and
    what an LR scheduler patches onto the instance: its ``step`` wrapper (which calls the *original*
    optimizer through a weak reference, and cannot be pickled) and the ``_opt_called`` flag."""
    return (
        (name.startswith("_optimizer_") and name.endswith("_hooks"))
        or name in ("_zero_grad_profile_name", "_opt_called")
        or (name == "step" and getattr(value, "_wrapped_by_lr_sched", False))
    )


class CopyableOptimizer(Optimizer):
    """An ``Optimizer`` whose pickled state is all of its attributes (hooks and a scheduler's patch excepted)."""

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not _torch_managed(k, v)}
