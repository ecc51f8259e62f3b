"""Serving many adapters from a bounded device pool — S-LoRA's memory scheme on one device (Sheng et
al. 2024, "S-LoRA: Serving Thousands of Concurrent LoRA Adapters").

Every registered adapter lives in host memory (CPU tensors, pinned when CUDA is present); only the
adapters the current batches need are resident on the model's device, in a pool of at most
``pool_bytes`` bytes of adapter tensors. A batch names one adapter per example; the adapters it needs
are fetched into the pool (least recently used ones evicted first when it is full) and the batch
runs as one mixed batch (``model(..., adapter_names=...)``: adapters of different ranks are
batched together by zero-padding to the largest rank, ``adapters.batched``). Each example's output
equals running it alone with its adapter, and device memory for adapters never exceeds the pool,
however many adapters the host holds.

What S-LoRA does that this does not: its unified pool also pages the KV cache (here the model's own
attention cache is separate from the pool), its custom CUDA kernels gather weights from
non-contiguous pages (here each resident adapter is an ordinary named adapter: contiguous tensors),
and tensor parallelism across devices.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from . import catalogue, checks
from .adapters import adapter_names, delete_adapter
from .batches import model_device
from .io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_record, adapter_tensors, add_adapter

__all__ = ["AdapterServer", "ServingStats"]


@dataclass
class ServingStats:
    """Pool traffic: fetches into the pool (misses), batches served with the adapter resident (hits),
    evictions, and the largest resident adapter bytes seen."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    peak_resident_bytes: int = 0


def _bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


class AdapterServer:
    """Serve batches that mix any of the registered adapters through ``model`` (the base model, with
    no adapters of its own), keeping at most ``pool_bytes`` of adapter tensors on the device.

    ``register(name, source)``: a directory written by ``rw.save_adapter``, or a model holding
    adapter ``name`` (it is copied to host memory; the model is left as it is). ``serve(adapter_names,
    **inputs)`` returns ``model(**inputs, adapter_names=adapter_names)`` (None / "__base__": the base
    model for that example)."""

    def __init__(self, model: nn.Module, pool_bytes: int) -> None:
        checks.integer("pool_bytes", pool_bytes, 1)
        if adapter_names(model):
            raise ValueError(f"model holds adapters {adapter_names(model)}: give the server the base model and "
                             "register the adapters (they are fetched into the pool as batches need them)")
        self.model, self.pool_bytes = model, int(pool_bytes)
        self.host: dict[str, tuple[dict[str, Any], dict[str, torch.Tensor]]] = {}
        self.resident: OrderedDict[str, int] = OrderedDict()  # name -> bytes, least recently used first
        self.stats = ServingStats()

    # --------------------------------------------------------------------------------- host store
    def register(self, name: str, source: str | Path | nn.Module) -> None:
        """Keep adapter ``name`` in host memory, from a saved adapter directory or a model holding it."""
        if not isinstance(name, str) or not name or name == "__base__":
            raise ValueError(f"name={name!r} must be a non-empty string other than '__base__'")
        if name in self.host:
            raise ValueError(f"adapter name={name!r} is registered already; registered: {sorted(self.host)}")
        if isinstance(source, nn.Module):
            record = adapter_record(source, name)
            tensors = {k: t.detach().to("cpu", copy=True) for k, t in adapter_tensors(source, name).items()}
        else:
            path = Path(source)
            if not (path / ADAPTER_CONFIG).is_file():
                raise FileNotFoundError(f"{path / ADAPTER_CONFIG} not found: source must be a directory written by "
                                        "rw.save_adapter (one adapter) or a model holding the adapter")
            record = json.loads((path / ADAPTER_CONFIG).read_text())
            tensors = load_file(str(path / ADAPTER_WEIGHTS))
        if record.get("trainable_modules"):
            raise ValueError(f"adapter {name!r} trains whole modules beside it ({record['trainable_modules']}): "
                             "they replace base weights for every example, so it cannot share a batch with others")
        if torch.cuda.is_available():
            tensors = {k: t.pin_memory() for k, t in tensors.items()}
        if _bytes(tensors) > self.pool_bytes:
            raise ValueError(f"adapter {name!r} needs {_bytes(tensors)} bytes, more than pool_bytes={self.pool_bytes}")
        self.host[name] = (record, tensors)

    # --------------------------------------------------------------------------------------- pool
    @property
    def resident_bytes(self) -> int:
        """Bytes of adapter tensors on the model now (what the pool holds)."""
        return sum(self.resident.values())

    def _evict(self, name: str) -> None:
        delete_adapter(self.model, name)
        del self.resident[name]
        self.stats.evictions += 1

    def _fetch(self, name: str, keep: set[str]) -> None:
        record, tensors = self.host[name]
        need = _bytes(tensors)
        while self.resident_bytes + need > self.pool_bytes:
            victim = next((n for n in self.resident if n not in keep), None)
            if victim is None:
                raise ValueError(f"the batch's adapters {sorted(keep)} need more than pool_bytes={self.pool_bytes} "
                                 "together: raise pool_bytes or split the batch")
            self._evict(victim)
        device = model_device(self.model)
        add_adapter(self.model, {**record, "trainable_modules": []},
                    {k: t.to(device, non_blocking=True) for k, t in tensors.items()}, name, f"host copy of {name!r}")
        self.resident[name] = need
        self.stats.misses += 1

    def _make_resident(self, names: Sequence[str | None]) -> None:
        wanted = [n for n in dict.fromkeys(names) if n is not None and n != "__base__"]
        unknown = [n for n in wanted if n not in self.host]
        if unknown:
            raise ValueError(f"adapter_names has unregistered adapter(s) {unknown}; registered: {sorted(self.host)}")
        keep = set(wanted)
        for name in wanted:
            if name in self.resident:
                self.resident.move_to_end(name)
                self.stats.hits += 1
            else:
                self._fetch(name, keep)
        self.stats.peak_resident_bytes = max(self.stats.peak_resident_bytes, self.resident_bytes)

    @torch.no_grad()
    def serve(self, adapter_names: Sequence[str | None], **inputs: Any) -> Any:
        """``model(**inputs)`` with example i through adapter ``adapter_names[i]`` (fetched if needed)."""
        if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
            raise ValueError(f"adapter_names={adapter_names!r} must be a list with one adapter name per example")
        self._make_resident(adapter_names)
        self.model.eval()
        return self.model(**inputs, adapter_names=list(adapter_names))


catalogue.register(catalogue.MethodRecord(
    "s_lora", "multi-adapter", "Sheng et al. 2024, S-LoRA: Serving Thousands of Concurrent LoRA Adapters",
    "adapters in host memory, a bounded device pool (LRU) holding the ones the batches need, mixed-rank batches in "
    "one pass; one device (no KV-cache paging, custom kernels or tensor parallelism)",
    api="serve", config=AdapterServer, exports="none", spec=AdapterServer,
    builder=lambda model, **options: AdapterServer(model, **options),
))
