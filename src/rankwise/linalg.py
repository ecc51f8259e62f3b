"""Matrix decompositions shared by every package: truncated SVD (exact or randomized), balanced
low-rank factors, and the energy rule that picks a rank from a spectrum.

By Eckart–Young the truncated SVD ``U_r Σ_r V_rᵀ`` is the best rank-r approximation in Frobenius and
spectral norm. LAPACK needs fp32/fp64 input: :func:`svd_precision` casts half precisions up.
"""

from __future__ import annotations

import torch

from .checks import fraction

__all__ = ["balanced_svd_factors", "energy_rank", "randomized_svd", "svd_precision", "truncated_svd"]


def svd_precision(t: torch.Tensor) -> torch.Tensor:
    """``t`` detached, in fp32 unless it already is fp32/fp64 (LAPACK needs one of those)."""
    t = t.detach()
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def randomized_svd(
    w: torch.Tensor, r: int, iters: int, generator: torch.Generator, oversample: int = 10
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-r SVD ``(U_r, S_r, Vh_r)`` by randomized subspace iteration (Halko, Martinsson & Tropp
    2011, "Finding Structure with Randomness", Alg. 4.4 + 5.1): a Gaussian range finder with
    ``r + oversample`` columns, ``iters`` power iterations re-orthonormalized by QR, then the exact
    SVD of the small projected matrix Qᵀ W."""
    if iters < 1:
        raise ValueError(f"iters={iters!r} must be >= 1 for the randomized SVD (0 means exact SVD)")
    m, n = w.shape
    q = min(r + oversample, m, n)
    omega = torch.randn(n, q, generator=generator, dtype=w.dtype).to(w.device)
    basis, _ = torch.linalg.qr(w @ omega)
    for _ in range(iters):
        z, _ = torch.linalg.qr(w.T @ basis)
        basis, _ = torch.linalg.qr(w @ z)
    u_small, s, vh = torch.linalg.svd(basis.T @ w, full_matrices=False)
    return (basis @ u_small)[:, :r], s[:r], vh[:r]


def truncated_svd(
    w: torch.Tensor, r: int, iters: int = 0, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-r singular triplets of ``w``: exact (``iters=0``, LAPACK) or randomized (``iters≥1``)."""
    if iters == 0:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return u[:, :r], s[:r], vh[:r]
    return randomized_svd(w, r, iters, generator if generator is not None else torch.Generator().manual_seed(0))


def balanced_svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U_r √Σ_r, √Σ_r V_rᵀ)`` from the exact SVD of ``weight``: the best rank-r product."""
    u, s, vh = torch.linalg.svd(svd_precision(weight), full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest k with Σ_{i≤k} σᵢ² ≥ energy · Σ σᵢ² (the share of ‖W‖_F² kept by the top-k part)."""
    fraction("energy", energy, what="in (0, 1]")
    power = singular_values.double() ** 2
    total = float(power.sum())
    if total == 0.0:
        return 1
    cumulative = torch.cumsum(power, 0) / total
    hits = torch.nonzero(cumulative >= energy - 1e-12)
    return int(hits[0]) + 1 if len(hits) else len(singular_values)
