"""Memory accounting in one place: parameter counts, gradient and optimizer-state bytes, peak memory.

The bytes of a tensor are ``numel · element_size``. Parameters are counted once even when shared
(tied embeddings). Optimizer-state bytes are exact: the bytes of every tensor reachable from
``optimizer.state`` (through dicts, lists and tuples). Peak memory is CUDA ``max_memory_allocated``
on a GPU and the process peak RSS (``getrusage``) on CPU, measured from :func:`reset_peak_memory`.
"""

from __future__ import annotations

import gc
import resource
import sys
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

__all__ = [
    "count_params", "gradient_bytes", "optimizer_state_bytes", "peak_memory", "reset_peak_memory",
    "tensor_bytes", "total_params", "unique_parameters",
]


def tensor_bytes(t: torch.Tensor) -> int:
    """``numel · element_size``: the bytes of one tensor's elements."""
    return t.numel() * t.element_size()


def unique_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``model``, each once (shared parameters are not repeated)."""
    return list({id(p): p for p in model.parameters()}.values())


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) numbers of unique parameter entries."""
    params = unique_parameters(model)
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def total_params(model: nn.Module) -> int:
    """All unique parameter entries of ``model``, trainable or not."""
    return count_params(model)[1]


def gradient_bytes(params: Iterable[torch.Tensor]) -> int:
    """Σ bytes of the ``.grad`` tensors that exist now (parameters without a gradient count 0)."""
    return sum(tensor_bytes(p.grad) for p in params if p.grad is not None)


def _nested_bytes(obj: Any) -> int:
    if torch.is_tensor(obj):
        return tensor_bytes(obj)
    if isinstance(obj, dict):
        return sum(_nested_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_nested_bytes(v) for v in obj)
    return 0


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Exact bytes of the optimizer state: the optimizer's own ``state_bytes()`` when it has one (every
    rankwise optimizer: it also counts caches kept outside ``state``, each storage once), else
    Σ numel·element_size over every tensor in ``optimizer.state``."""
    own = getattr(optimizer, "state_bytes", None)
    if callable(own):
        return int(own())
    return sum(_nested_bytes(s) for s in optimizer.state.values())


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window (CUDA allocator stats; on Linux also the process RSS peak)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    gc.collect()
    try:  # give freed heap back to the OS first, so the window starts from what is really in use
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:  # Linux: writing 5 to clear_refs resets the RSS high-water mark of this process
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, kind): CUDA ``max_memory_allocated`` or the CPU process peak RSS (getrusage)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "cpu_peak_rss"
