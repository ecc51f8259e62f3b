"""Per-example adapters in one batch: example i through adapter ``names[i]`` alone.

Two ways to run a mixed batch through one layer, same result (the terms of the forward in which only
that example's adapter is active, ``AdapterLayer.output_term``):

* **vectorised** (FLoRA's setting, Wen & Chaudhuri 2024, "Batched Low-Rank Adaptation of Foundation
  Models": every example has its own low-rank adapter, computed in one batched operation): when
  every adapter of the layer is a low-rank product relative to the base it runs on, the per-example
  factors are gathered into (n, R, in) and (n, out, R) stacks (ranks padded with zeros to the largest
  R, so adapters of different ranks batch together, as S-LoRA's heterogeneous batching does;
  "no adapter" is an all-zero slot) and y_i += B_i (A_i x_i) is two ``bmm`` calls for the whole
  batch, however many distinct adapters it holds;
* **grouped**: otherwise (DoRA, Bone, RandLoRA, embedding / conv bases, adapter dropout in training)
  the rows of each adapter are gathered and run through that adapter, one group at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .base import AdapterLayer

BASE_NAME = "__base__"  # PEFT's name for "no adapter" in ``adapter_names``


def mixed_forward(
    base_layer: nn.Module, layers: dict[str, AdapterLayer], x: torch.Tensor, names: Sequence[str | None],
    merged: bool,
) -> torch.Tensor:
    """``base_layer(x)`` plus, for each example i, what adapter ``names[i]`` alone adds (None /
    "__base__": nothing beyond the original base layer)."""
    if x.shape[0] != len(names):
        raise ValueError(
            f"adapter_names has {len(names)} entries but the batch has {x.shape[0]} examples; give one adapter "
            "name (or None) per example"
        )
    if merged:
        raise ValueError("adapter_names needs unmerged adapters; call rw.unmerge(model) first")
    wanted = [None if n == BASE_NAME else n for n in names]
    out = base_layer(x)
    factors = _low_rank_factors(layers)
    if factors is not None:
        return out + _vectorised(factors, x, wanted, out.dtype)
    return _grouped(layers, x, wanted, out)


def _low_rank_factors(layers: dict[str, AdapterLayer]) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
    """``{name: (s·B, A)}`` of each adapter's update over the base it runs on, when all of them are
    low-rank and none needs the grouped path (an embedding or conv base, adapter dropout active, or
    an init offset an example without that adapter would have to add back); else None."""
    out = {}
    for name, layer in layers.items():
        if layer.base_kind != "linear" or layer.dropout_active or (
            not layer.shares_base and layer.base_offset_factors() is not None
        ):
            return None
        f = layer.factors_from_original() if layer.shares_base else layer.factors()
        if f is None:
            return None
        b, a, s = f
        out[name] = (b * s, a)
    return out


def _vectorised(
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]], x: torch.Tensor, names: list[str | None],
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Σ over examples of B_i (A_i x_i): per-example factor stacks (slot 0 = no adapter, zeros), ranks
    padded to the largest, two ``bmm`` calls."""
    order = list(factors)
    first_b, first_a = factors[order[0]]
    dtype, rank = first_a.dtype, max(a.shape[0] for _, a in factors.values())
    zero_b = first_b.new_zeros(first_b.shape[0], rank, dtype=dtype)
    zero_a = first_a.new_zeros(rank, first_a.shape[1], dtype=dtype)
    bs = [zero_b] + [F.pad(factors[n][0].to(dtype), (0, rank - factors[n][0].shape[1])) for n in order]
    as_ = [zero_a] + [F.pad(factors[n][1].to(dtype), (0, 0, 0, rank - factors[n][1].shape[0])) for n in order]
    slot = {n: k + 1 for k, n in enumerate(order)}
    index = torch.tensor([slot.get(n, 0) for n in names], device=x.device)  # not on this layer: slot 0
    b_sel = torch.stack(bs).index_select(0, index)  # (n, out, R)
    a_sel = torch.stack(as_).index_select(0, index)  # (n, R, in)
    xs = x.to(dtype).reshape(x.shape[0], -1, x.shape[-1])  # (n, tokens, in)
    y = torch.bmm(torch.bmm(xs, a_sel.transpose(1, 2)), b_sel.transpose(1, 2))
    return y.reshape(*x.shape[:-1], first_b.shape[0]).to(out_dtype)


def _grouped(
    layers: dict[str, AdapterLayer], x: torch.Tensor, names: list[str | None], out: torch.Tensor
) -> torch.Tensor:
    """Rows of one adapter gathered and run together, one adapter at a time."""
    groups: dict[str | None, list[int]] = {}
    for i, n in enumerate(names):
        groups.setdefault(n, []).append(i)
    for name, rows in groups.items():
        idx = torch.tensor(rows, device=x.device)
        xs = x.index_select(0, idx)
        extra = None
        for other, layer in layers.items():
            term = layer.output_term(xs, out.dtype, other == name)
            if term is not None:
                extra = term if extra is None else extra + term
        if extra is not None:
            out = out.index_add(0, idx, extra)
    return out
