"""The sparse delta of sparse fine-tuning (LT-SFT, SpIEL): a frozen W₀ plus k trained entries.

``W = W₀ + scatter(values at flat indices)``: the layer holds ``sparse_index`` (k flat positions of the
(out, in) matrix, a buffer) and ``sparse_values`` (the k deltas relative to W₀, trained, 0 at the start);
every other entry of the adapted weight is W₀'s. Its memory (parameters, optimizer state, indices) is
∝ k; the forward forms the dense ΔW transiently. How the indices are chosen is the method's
(:mod:`.lt_sft`: top-k of a phase-1 fine-tune's change; :mod:`.spiel`: dropped and regrown while
training). The delta is not a low-rank product, so it merges but does not export to PEFT.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..checks import fraction, integer
from .base import AdapterConfig, AdapterLayer
from .init import InitContext


@dataclass
class SparseDeltaConfig(AdapterConfig):
    """``density``: trained fraction of each matrix's entries; None (default): as many entries as a
    rank-r LoRA of the matrix has parameters, r·(in + out). ``nnz``: the count for one layer, set per
    layer by a method that allocates counts across layers (LT-SFT's global top-k); None: from density / r."""

    density: float | None = None
    nnz: int | None = None

    def validate(self) -> None:
        super().validate()
        fraction("density", self.density, optional=True)
        integer("nnz", self.nnz, 0, optional=True)

    def count(self, out_features: int, in_features: int) -> int:
        """Entries trained in an (out, in) matrix: ``nnz``, else ⌊density·out·in⌋, else r·(in + out), at most out·in."""
        if self.nnz is not None:
            k = self.nnz
        elif self.density is not None:
            k = int(self.density * out_features * in_features)
        else:
            k = self.r * (in_features + out_features)
        return min(k, out_features * in_features)


def scatter_dense(values: torch.Tensor, index: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The (out, in) matrix with ``values`` at the flat positions ``index``, 0 elsewhere (differentiable in values)."""
    flat = values.new_zeros(shape[0] * shape[1])
    return flat.index_add(0, index, values).view(shape)


class SparseDeltaLayer(AdapterLayer):
    """``y = (W₀ + S) x + b``, S = ``scatter_dense(sparse_values, sparse_index)``; subclasses choose the
    initial indices (:meth:`initial_index`)."""

    stackable = True  # W₀ is never written: several sparse deltas compose by addition

    def __init__(self, base_layer: nn.Module, config: SparseDeltaConfig, ctx: InitContext) -> None:
        super().__init__(base_layer, config)
        k = config.count(self.out_features, self.in_features)
        device = self.base_weight.device
        self.sparse_values = nn.Parameter(torch.zeros(k, dtype=self.adapter_dtype, device=device))
        self.register_buffer("sparse_index", torch.zeros(k, dtype=torch.long, device=device))
        if not ctx.skip:
            index = self.initial_index(ctx, k)
            if index.numel() != k or index.unique().numel() != k:
                raise ValueError(f"'{ctx.name}': the initial support must be {k} distinct positions")
            self.sparse_index.copy_(index.to(device))

    def initial_index(self, ctx: InitContext, k: int) -> torch.Tensor:
        """The k distinct flat positions trained first."""
        raise NotImplementedError

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def delta_weight(self) -> torch.Tensor:
        return scatter_dense(self.sparse_values, self.sparse_index, self.shape)

    def trainable_count(self) -> int:
        return int(self.sparse_index.numel())

    def extra_repr(self) -> str:
        return super().extra_repr() + f", nnz={self.trainable_count()}"
