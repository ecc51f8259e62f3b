"""Optimizers that survive ``copy.deepcopy``, ``pickle`` and ``torch.save`` as torch's own do.

``torch.optim.Optimizer.__getstate__`` keeps only ``defaults``, ``state`` and ``param_groups``, so the
attributes a subclass sets in ``__init__`` (projector caches and seeds, FRUGAL's selector, a sampler's
inner optimizer and units) are missing from a copy, whose first ``step()`` then raises. Keeping every
instance attribute except torch's hook tables (dropped by torch too; ``__setstate__`` recreates them
empty) makes the copy an equal, independent optimizer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim import Optimizer

__all__ = ["CopyableOptimizer", "restore_state_dtypes", "saved_params"]


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


def saved_params(optimizer: Optimizer, state_dict: dict[str, Any]) -> dict[Any, Any]:
    """The key of each saved per-parameter state -> the optimizer's parameter it loads into.

    The keys are positional ids (``Optimizer.state_dict``) or parameter names
    (``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict``, as DCP saves them); either
    way they pair with the current parameters by position in the param groups, the rule torch's
    ``Optimizer.load_state_dict`` uses. A state dict with more parameters than the optimizer is left
    for torch's loader to reject.
    """
    keys = [k for g in state_dict.get("param_groups", []) for k in g["params"]]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    return dict(zip(keys, params, strict=False))  # a length mismatch: torch's loader raises


def restore_state_dtypes(optimizer: Optimizer, state_dict: dict[str, Any]) -> None:
    """After ``Optimizer.load_state_dict``: give back the dtype of saved state tensors that torch cast
    to the parameter's dtype (integer indices, packed codes, seeds), on the parameter's device."""
    params = saved_params(optimizer, state_dict)
    for key, saved in state_dict["state"].items():
        p = params[key]
        for name, value in saved.items():
            if torch.is_tensor(value) and optimizer.state[p][name].dtype != value.dtype:
                optimizer.state[p][name] = value.to(p.device)
