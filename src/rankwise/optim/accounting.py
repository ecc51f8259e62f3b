"""Honest optimizer-state bytes: every tensor an optimizer keeps between steps, each storage once.

``state_bytes()`` of the rankwise optimizers is the sum of ``untyped_storage().nbytes()`` over the
distinct storages of (a) every tensor in ``optimizer.state``, (b) every tensor option in
``param_groups`` / ``defaults`` (a tensor ``lr``), and (c) the tensors the optimizer keeps outside
``state``: projector caches (APOLLO's / Flora's regenerated Gaussian matrix), shared bases (the DCT
matrix), a sampler's probabilities. Counting storages, not ``numel``, makes a view count as the
whole buffer it keeps alive (a basis sliced from a full SVD factor would hold all of it), and a
tensor shared by two entries count once. The parameters themselves (and anything sharing their
storage) are not optimizer state and are never counted.

``tests/optim/test_state_bytes.py`` checks, for every name of ``rw.optim.make``, that this equals
the bytes of every distinct tensor reachable from the optimizer object, so a cache left out of
:meth:`resident_tensors` fails there.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .sharding import local_tensor

__all__ = ["optimizer_bytes", "state_bytes", "storage_bytes", "tensors_in"]


def tensors_in(obj: Any) -> Iterable[torch.Tensor]:
    """Every tensor inside ``obj`` (nested dicts' values, lists, tuples, sets)."""
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from tensors_in(value)
    elif isinstance(obj, list | tuple | set | frozenset):
        for value in obj:
            yield from tensors_in(value)


def _key(t: torch.Tensor) -> tuple[str, int]:
    t = local_tensor(t)
    return str(t.device), t.untyped_storage().data_ptr()


def storage_bytes(tensors: Iterable[torch.Tensor], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Σ ``nbytes`` of the distinct storages of ``tensors``, skipping storages of ``exclude``."""
    seen = {_key(t) for t in exclude}
    total = 0
    for t in tensors:
        key = _key(t)
        if key not in seen:
            seen.add(key)
            total += local_tensor(t).untyped_storage().nbytes()
    return total


def optimizer_bytes(optimizer: torch.optim.Optimizer, extra: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of ``optimizer.state``, tensor options of its groups / defaults, and ``extra`` (caches),
    each storage once, parameters excluded."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    options = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    roots = [optimizer.state, options, optimizer.defaults, list(extra)]
    return storage_bytes(tensors_in(roots), exclude=params)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """``optimizer.state_bytes()`` when it has one (every rankwise optimizer), else
    :func:`optimizer_bytes` (a plain ``torch.optim`` optimizer keeps everything in its state)."""
    method = getattr(optimizer, "state_bytes", None)
    return int(method()) if callable(method) else optimizer_bytes(optimizer)
