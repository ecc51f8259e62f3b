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


def _torch_managed(name: str) -> bool:
    """Attributes torch's ``__setstate__`` rebuilds: the hook tables and the profiler's step name."""
    return (name.startswith("_optimizer_") and name.endswith("_hooks")) or name == "_zero_grad_profile_name"


class CopyableOptimizer(Optimizer):
    """An ``Optimizer`` whose pickled state is all of its attributes (hooks excepted)."""

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not _torch_managed(k)}
