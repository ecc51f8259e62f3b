"""Rank-selection policies for compression: which inner rank each weight matrix keeps.

Every policy works on *weight-matrix entries* (biases are never compressed): a dense ``out×in``
matrix holds ``out·in`` weights, its rank-r factorization ``r·(out + in)``. ``ratio`` is the kept
fraction of the targeted weights, summed over all targeted matrices.

* :func:`uniform_ratio_rank` — the SVD baseline (and PELA's rule, ``rank = out·in // (c·(out+in))``
  with ``c = 1/ratio``): every matrix keeps ``ratio`` of its own weights.
* :func:`rank_fraction_ranks` — LoRD's rule: every matrix keeps the same *fraction of its rank*
  κ·min(out, in) (the paper reports compression as a rank-reduction percentage); a matrix is
  factorized only when the factors are smaller than the dense matrix, ``r < out·in/(out+in)``.
* :func:`welore_ranks` — WeLore's heavy-tail rule (Jaiswal et al. 2024, Sec. 4 / Alg. 1; official
  ``adaptive_rank_pruning``): min-max normalize each matrix's singular values to [0, 1], count the
  ones below one *global* threshold τ — that is the matrix's rank reduction; the matrices that can
  express themselves in low rank become LRCs (two factors), the rest N-LRCs (kept dense, untouched).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ..checks import fraction

Shape = tuple[int, int]  # (out_features, in_features)


def factor_count(shape: Shape, rank: int) -> int:
    """Weights of a rank-r factorization of an ``out×in`` matrix: ``r·(out + in)``."""
    return rank * (shape[0] + shape[1])


def saves_weights(shape: Shape, rank: int) -> bool:
    """Whether rank-r factors hold fewer weights than the dense matrix, ``r·(out+in) < out·in``."""
    return factor_count(shape, rank) < shape[0] * shape[1]


def uniform_ratio_rank(shape: Shape, ratio: float) -> int:
    """``max(1, ⌊ratio·out·in/(out+in)⌋)``: the rank whose factors keep ``ratio`` of the matrix's weights."""
    out_f, in_f = shape
    return max(1, math.floor(fraction("ratio", ratio) * out_f * in_f / (out_f + in_f)))


def uniform_ranks(shapes: Mapping[str, Shape], ratio: float) -> dict[str, int]:
    """:func:`uniform_ratio_rank` for every matrix (SVD baseline, PELA)."""
    return {name: uniform_ratio_rank(shape, ratio) for name, shape in shapes.items()}


def kept_weights(shapes: Mapping[str, Shape], ranks: Mapping[str, int | None]) -> int:
    """Weights after compression: ``r·(out+in)`` for a factorized matrix, ``out·in`` for ``None`` (dense)."""
    return sum(
        shape[0] * shape[1] if ranks.get(name) is None else factor_count(shape, ranks[name])
        for name, shape in shapes.items()
    )


def total_weights(shapes: Mapping[str, Shape]) -> int:
    return sum(s[0] * s[1] for s in shapes.values())


def _fraction_ranks(shapes: Mapping[str, Shape], kappa: float) -> dict[str, int | None]:
    ranks: dict[str, int | None] = {}
    for name, shape in shapes.items():
        r = max(1, math.floor(kappa * min(shape)))
        ranks[name] = r if saves_weights(shape, r) else None
    return ranks


def rank_fraction_ranks(shapes: Mapping[str, Shape], ratio: float, tol: float = 1e-6) -> dict[str, int | None]:
    """LoRD: keep the same fraction κ of every matrix's rank, ``r = ⌊κ·min(out, in)⌋``; κ is the
    largest value whose kept weights fit ``ratio`` (bisection; kept weights grow with κ). Matrices
    whose factors would not be smaller stay dense (``None``)."""
    ratio = fraction("ratio", ratio)
    budget = ratio * total_weights(shapes)
    if kept_weights(shapes, _fraction_ranks(shapes, 1.0)) <= budget:
        return _fraction_ranks(shapes, 1.0)  # nothing needs factorizing (ratio = 1)
    lo, hi = 0.0, 1.0
    if kept_weights(shapes, _fraction_ranks(shapes, lo)) > budget:
        raise ValueError(f"ratio={ratio} is below what rank-1 factors of every matrix keep; choose a larger ratio")
    while hi - lo > tol:
        mid = (lo + hi) / 2
        if kept_weights(shapes, _fraction_ranks(shapes, mid)) <= budget:
            lo = mid
        else:
            hi = mid
    return _fraction_ranks(shapes, lo)


# ---------------------------------------------------------------------------------------- WeLore
def normalized_spectrum(singular_values: torch.Tensor) -> torch.Tensor:
    """``(σ − σ_min)/(σ_max − σ_min)`` in float64; a flat spectrum (σ_max = σ_min) maps to all ones
    (no singular value is "in the tail", so such a matrix is never low-rank)."""
    s = singular_values.detach().double().flatten()
    span = float(s.max() - s.min())
    if span == 0.0:
        return torch.ones_like(s)
    return (s - s.min()) / span


def rank_reduction(normalized: torch.Tensor, threshold: float) -> int:
    """Number of normalized singular values strictly below ``threshold`` (the ranks WeLore drops)."""
    return int((normalized < threshold).sum())


@dataclass
class WeLorePlan:
    """WeLore's decision: the global threshold τ and, per matrix, the kept rank (``None`` = N-LRC)."""

    threshold: float
    ranks: dict[str, int | None]
    reductions: dict[str, float] = field(default_factory=dict)  # dropped rank / full rank, per matrix

    @property
    def lrc(self) -> list[str]:
        return [n for n, r in self.ranks.items() if r is not None]

    @property
    def nlrc(self) -> list[str]:
        return [n for n, r in self.ranks.items() if r is None]


def welore_ranks_at(
    spectra: Mapping[str, torch.Tensor], shapes: Mapping[str, Shape], threshold: float, min_reduction: float = 0.0
) -> WeLorePlan:
    """Ranks at a given threshold τ. A matrix is an LRC when its rank-reduction ratio exceeds
    ``min_reduction`` (official ``--min_ratio``) *and* its kept-rank factors hold fewer weights than
    the dense matrix; otherwise it is an N-LRC and stays dense."""
    ranks: dict[str, int | None] = {}
    reductions: dict[str, float] = {}
    for name, s in spectra.items():
        full = min(shapes[name])
        dropped = min(rank_reduction(normalized_spectrum(s), threshold), full - 1)
        keep = full - dropped
        reductions[name] = dropped / full
        low_rank = reductions[name] > min_reduction and saves_weights(shapes[name], keep)
        ranks[name] = keep if low_rank else None
    return WeLorePlan(threshold, ranks, reductions)


def welore_ranks(
    spectra: Mapping[str, torch.Tensor], shapes: Mapping[str, Shape], ratio: float, min_reduction: float = 0.0
) -> WeLorePlan:
    """The smallest global threshold τ whose LRC/N-LRC split keeps at most ``ratio`` of the weights.

    Deterministic and data-free: only the singular values enter. Kept weights never increase with τ,
    so the search is a bisection over the finite set of candidate thresholds (just above each
    distinct normalized singular value)."""
    ratio = fraction("ratio", ratio)
    if set(spectra) != set(shapes):
        raise ValueError("spectra and shapes must name the same matrices")
    fraction("min_reduction", min_reduction, allow_zero=True, allow_one=False)
    budget = ratio * total_weights(shapes)
    values = torch.unique(torch.cat([normalized_spectrum(s) for s in spectra.values()]))
    # τ = nextafter(v, +inf) drops exactly the values ≤ v; τ = 0 drops nothing.
    candidates = [0.0] + [math.nextafter(float(v), math.inf) for v in values if float(v) < 1.0]

    def fits(tau: float) -> bool:
        return kept_weights(shapes, welore_ranks_at(spectra, shapes, tau, min_reduction).ranks) <= budget

    if not fits(candidates[-1]):
        least = kept_weights(shapes, welore_ranks_at(spectra, shapes, candidates[-1], min_reduction).ranks)
        raise ValueError(
            f"ratio={ratio} cannot be reached by WeLore on these matrices (the smallest reachable kept fraction "
            f"is {least / total_weights(shapes):.3f}); choose a larger ratio"
        )
    lo, hi = 0, len(candidates) - 1  # fits(candidates[hi]) holds
    if fits(candidates[0]):
        hi = 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(candidates[mid]):
            hi = mid
        else:
            lo = mid
    return welore_ranks_at(spectra, shapes, candidates[hi], min_reduction)
