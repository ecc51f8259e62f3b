"""Seeded randomness for initializers: a per-layer generator and ``nn.Linear``'s default init.

A layer's generator is seeded from a run seed and the layer's name, so the same layer gets the same
draws across runs, processes and ranks, whatever else the model holds.
"""

from __future__ import annotations

import math
import zlib

import torch

__all__ = ["kaiming_uniform_", "layer_generator"]


def layer_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and the layer ``name`` (stable across runs and processes)."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    return g


def kaiming_uniform_(t: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``nn.Linear``'s default init, U(−1/√fan_in, 1/√fan_in) (kaiming_uniform with a=√5)."""
    bound = 1.0 / math.sqrt(t.shape[1])
    with torch.no_grad():
        return t.uniform_(-bound, bound, generator=generator)
