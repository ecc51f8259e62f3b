"""Truncated SVD of weight matrices, a reusable SVD cache, and the uniform SVD baseline.

By Eckart–Young, ``W_r = U_r Σ_r V_rᵀ`` is the best rank-r approximation of W in Frobenius and
spectral norm. Compression stores it as two dense factors with the singular values split evenly,
``up = U_r √Σ_r`` (out×r) and ``down = √Σ_r V_rᵀ`` (r×in), as the WeLore and PELA reference code do.

The baseline (``method="svd"``) gives every targeted matrix the rank that keeps ``ratio`` of its own
weights (:func:`rank.uniform_ratio_rank`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import checks
from ..targets import Targets, find_targets, replace_module
from .factorized import factorized_from_factors
from .rank import Shape, uniform_ranks


@dataclass(frozen=True)
class ThinSVD:
    """``W = U diag(S) Vh`` (fp32, thin) of one weight matrix."""

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Balanced rank-r factors ``(U_r √S_r, √S_r Vh_r)``; their product is the truncated SVD."""
        root = self.s[:rank].sqrt()
        return self.u[:, :rank] * root, root[:, None] * self.vh[:rank]

    def truncation(self, rank: int) -> torch.Tensor:
        """The rank-r truncated SVD ``U_r diag(S_r) Vh_r`` (out×in)."""
        return (self.u[:, :rank] * self.s[:rank]) @ self.vh[:rank]


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run LAPACK single-threaded: for transformer-sized matrices (≤ a few thousand) the threaded SVD
    gains little and slows down by 10-100× when the cores are shared with other processes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def thin_svd(weight: torch.Tensor) -> ThinSVD:
    """Exact thin SVD (LAPACK, fp32) of a weight matrix."""
    w = weight.detach().float()
    if w.is_cuda:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
    else:
        with _one_thread():
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return ThinSVD(u, s, vh)


class SVDCache:
    """Thin SVDs by module name, reused across compressions of the same weights (e.g. a ratio sweep).

    An entry is reused only if the weight is unchanged (same shape and same float64 checksum)."""

    def __init__(self) -> None:
        self._store: dict[str, tuple[tuple, ThinSVD]] = {}

    @staticmethod
    def _key(weight: torch.Tensor) -> tuple:
        w = weight.detach()
        return tuple(w.shape), float(w.double().sum()), float(w.double().abs().sum())

    def get(self, name: str, weight: torch.Tensor) -> ThinSVD:
        key = self._key(weight)
        hit = self._store.get(name)
        if hit is not None and hit[0] == key:
            return hit[1]
        svd = thin_svd(weight)
        self._store[name] = (key, svd)
        return svd

    def __len__(self) -> int:
        return len(self._store)


def target_linears(model: nn.Module, targets: Targets) -> list[tuple[str, nn.Linear]]:
    """The targeted ``nn.Linear`` modules (ValueError when one is not an ``nn.Linear`` or none match)."""
    return find_targets(model, targets, conv1d=False)


def shapes_of(found: Iterable[tuple[str, nn.Linear]]) -> dict[str, Shape]:
    return {name: (lin.out_features, lin.in_features) for name, lin in found}


def spectra(
    found: Iterable[tuple[str, nn.Linear]], cache: SVDCache | None = None, progress: bool = False
) -> dict[str, torch.Tensor]:
    """Singular values (descending, fp32) of each module's weight."""
    cache = cache if cache is not None else SVDCache()
    found = list(found)
    return {
        name: cache.get(name, lin.weight).s
        for name, lin in tqdm(found, desc="singular values", disable=not progress, leave=False)
    }


def factorize_layers(
    model: nn.Module,
    ranks: Mapping[str, int | None],
    cache: SVDCache | None = None,
    progress: bool = False,
) -> dict[str, int]:
    """Replace each module ``name`` with ``ranks[name]`` not None by its rank-r truncated-SVD
    :class:`~rankwise.sparse.layers.FactorizedLinear` (two dense factors, bias kept). Returns the
    ranks used. A rank above ``min(out, in)`` raises a ValueError naming the module."""
    cache = cache if cache is not None else SVDCache()
    chosen = {n: r for n, r in ranks.items() if r is not None}
    for name, rank in tqdm(chosen.items(), desc="factorizing", disable=not progress, leave=False):
        lin = model.get_submodule(name)
        if not isinstance(lin, nn.Linear):
            raise ValueError(f"module '{name}' is a {type(lin).__name__}; only nn.Linear can be factorized")
        checks.rank("rank", rank, min(lin.out_features, lin.in_features), where=name)
        up, down = cache.get(name, lin.weight).factors(rank)
        replace_module(model, name, factorized_from_factors(up, down, lin.bias, dtype=lin.weight.dtype))
    return chosen


def svd_ranks(shapes: dict[str, Shape], ratio: float, rank: int | None = None) -> dict[str, int]:
    """The baseline's ranks: a fixed ``rank`` for every matrix, else :func:`uniform_ranks`."""
    if rank is None:
        return uniform_ranks(shapes, ratio)
    for name, shape in shapes.items():
        checks.rank("rank", rank, min(shape), where=name)
    return {name: rank for name in shapes}
