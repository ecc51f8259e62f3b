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
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

__all__ = [
    "TensorMemoryTracker", "count_params", "enable_activation_checkpointing", "gradient_bytes",
    "optimizer_state_bytes", "peak_memory",
    "reset_peak_memory", "tensor_bytes", "total_params", "unique_parameters",
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


def enable_activation_checkpointing(model: nn.Module, field: str = "gradient_checkpointing") -> None:
    """Hugging Face activation checkpointing (non-reentrant, so frozen embeddings need no input-gradient hook):
    each transformer block keeps only its input for backward and recomputes the rest (Chen et al. 2016), with
    the RNG state of the first forward, so dropout masks and the update are unchanged. A ValueError naming
    ``field`` for a model without ``gradient_checkpointing_enable``."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{field}=True needs a Hugging Face model that supports gradient checkpointing; "
                         f"{type(model).__name__} does not")
    import warnings

    with warnings.catch_warnings():  # transformers' notes on use_cache / reentrancy
        warnings.simplefilter("ignore")
        model.gradient_checkpointing_enable(  # type: ignore[operator]
            gradient_checkpointing_kwargs={"use_reentrant": False})


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


def _storage_ptr(t: torch.Tensor) -> int:
    try:
        return int(t.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):  # sparse or storage-less tensors
        return 0


class TensorMemoryTracker:
    """Exact live-tensor accounting on any device (CPU included), by a ``TorchDispatchMode``.

    Inside ``with tracker:`` every storage an operator creates (forward, backward, optimizer steps,
    factory calls) is recorded with its ``nbytes`` until it is freed (a finalizer on the storage's
    Python object, which torch keeps alive as long as the storage). ``baseline`` bytes (the weights,
    state made before entering) are added to every reading. ``label(tensor, kind)`` files the live
    storage holding ``tensor`` under ``kind`` (e.g. ``"grad"``, ``"state"``); everything unlabelled is
    ``"other"`` (activations, their gradients, temporaries). Labels can be given after the fact (a
    gradient is labelled when a hook sees it, for its whole lifetime), so :meth:`peaks` replays the
    event log: peak of the total and of each kind, over the whole window or one ``mark``-ed interval.

    What it does not see: memory an operator allocates and frees inside its own kernel (scratch
    buffers), allocator caching and fragmentation — the process peak RSS shows those.
    """

    def __init__(self, baseline: int = 0):
        self.baseline = int(baseline)
        self._records: list[list[Any]] = []  # [bytes, alloc_event, free_event | None, kind]
        self._live: dict[int, int] = {}  # data_ptr -> record index
        self._events = 0
        self._marks: dict[str, list[int]] = {}
        self._mode: Any = None

    # -------------------------------------------------------------- recording
    def _track(self, t: torch.Tensor) -> None:
        ptr = _storage_ptr(t)
        if ptr == 0 or ptr in self._live:
            return
        storage = t.untyped_storage()
        if storage.nbytes() == 0:
            return

        self._events += 1
        index = len(self._records)
        self._records.append([storage.nbytes(), self._events, None, "other"])
        self._live[ptr] = index
        weakref.finalize(storage, self._free, ptr, index)

    def _free(self, ptr: int, index: int) -> None:
        self._events += 1
        self._records[index][2] = self._events
        if self._live.get(ptr) == index:
            del self._live[ptr]

    def label(self, t: torch.Tensor, kind: str) -> bool:
        """File the live tracked storage of ``t`` under ``kind``; False when it is not tracked."""
        index = self._live.get(t.untyped_storage().data_ptr())
        if index is None:
            return False
        self._records[index][3] = kind
        return True

    def mark(self, name: str) -> None:
        """Open (first call) or close (second call) the interval ``name`` of the event log."""
        self._marks.setdefault(name, []).append(self._events)

    def __enter__(self) -> TensorMemoryTracker:
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
                out = func(*args, **(kwargs or {}))
                inputs = {_storage_ptr(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
                for leaf in tree_leaves(out):  # new storages only: not views / in-place results of an input
                    if isinstance(leaf, torch.Tensor) and _storage_ptr(leaf) not in inputs:
                        tracker._track(leaf)
                return out

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._mode.__exit__(*exc)
        self._mode = None

    # -------------------------------------------------------------- reading
    def live_bytes(self) -> int:
        """Baseline + bytes of the tracked storages alive now."""
        return self.baseline + sum(self._records[i][0] for i in self._live.values())

    def peaks(self, interval: str | None = None) -> dict[str, int]:
        """Peak bytes over the window (or the ``mark``-ed interval): ``"total"`` (baseline included)
        and, per kind, the peak of that kind alone and its value at the moment of the total peak
        (``"<kind>@total"``)."""
        start, stop = 0, self._events
        if interval is not None:
            marks = self._marks[interval]
            start, stop = marks[0], (marks[1] if len(marks) > 1 else self._events)
        deltas: dict[int, list[tuple[str, int]]] = {}
        kinds = {"other"}
        live: dict[str, int] = {}
        for nbytes, alloc, free, kind in self._records:
            kinds.add(kind)
            if free is not None and free <= start:
                continue
            if alloc <= start:
                live[kind] = live.get(kind, 0) + nbytes
            else:
                deltas.setdefault(alloc, []).append((kind, nbytes))
            if free is not None and free <= stop:
                deltas.setdefault(free, []).append((kind, -nbytes))
        best = {k: live.get(k, 0) for k in kinds}
        total_best, at_total = sum(live.values()), dict(live)
        for event in sorted(deltas):
            if event > stop:
                break
            for kind, change in deltas[event]:
                live[kind] = live.get(kind, 0) + change
                best[kind] = max(best[kind], live[kind])
            total = sum(live.values())
            if total > total_best:
                total_best, at_total = total, dict(live)
        out = {"total": self.baseline + total_best}
        for kind in sorted(kinds):
            out[kind] = best[kind]
            out[f"{kind}@total"] = at_total.get(kind, 0)
        return out
