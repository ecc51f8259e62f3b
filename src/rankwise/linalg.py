"""Matrix decompositions shared by every package: truncated SVD (exact or randomized), balanced
low-rank factors, the energy rule that picks a rank from a spectrum, DEIM skeleton selection (CUR) and
matrix product operators (tensor-train SVD of a reshaped matrix).

By Eckart–Young the truncated SVD ``U_r Σ_r V_rᵀ`` is the best rank-r approximation in Frobenius and
spectral norm. LAPACK needs fp32/fp64 input: :func:`svd_precision` casts half precisions up.
"""

from __future__ import annotations

import math

import torch

from .checks import fraction

__all__ = [
    "balanced_svd_factors", "deim_indices", "energy_rank", "factor_shape", "kth_smallest", "mpo_apply", "mpo_bond_dims",
    "mpo_contract", "mpo_decompose", "mpo_linear", "randomized_svd", "rebalanced_factors", "svd_precision",
    "truncated_svd",
]


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


def rebalanced_factors(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U √Σ, √Σ Vᵀ)`` with ``U Σ Vᵀ`` the thin SVD of ``b @ a`` (b: m×r, a: r×n, r ≤ m, n), found
    without forming the product: ``b = Q_b R_b``, ``aᵀ = Q_a R_a``, SVD of the r×r core ``R_b R_aᵀ``
    (cost O((m + n)·r²)). The product is unchanged and both factors hold √σ_i per direction, so
    ‖B‖_F² = ‖A‖_F² = Σσ_i. Returned in fp32 (fp64 for fp64 input), like :func:`svd_precision`."""
    qb, rb = torch.linalg.qr(svd_precision(b))
    qa, ra = torch.linalg.qr(svd_precision(a).T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    root = s.sqrt()
    return (qb @ u) * root, root[:, None] * (vh @ qa.T)


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


# ---------------------------------------------------------------------- skeletons (CUR / Nyström)
def deim_indices(basis: torch.Tensor) -> torch.Tensor:
    """DEIM (Chaturantabut & Sorensen 2010, Alg. 1): for a basis V (n × k, orthonormal columns), the k
    indices p_j = argmax |v_j − V_{:j}·(V[p, :j])⁻¹·v_j[p]|: each new index is where the next basis
    vector is worst interpolated from the rows chosen so far (so V[p] is nonsingular). Applied to the
    left / right singular vectors of W it selects W's skeleton rows / columns (DEIM-CUR, Sorensen &
    Embree 2016)."""
    v = svd_precision(basis)
    picked = [int(torch.argmax(v[:, 0].abs()))]
    for j in range(1, v.shape[1]):
        p = torch.tensor(picked, device=v.device)
        coeff = torch.linalg.solve(v[p, :j], v[p, j])
        residual = v[:, j] - v[:, :j] @ coeff
        picked.append(int(torch.argmax(residual.abs())))
    return torch.tensor(picked, dtype=torch.long, device=basis.device)


# ---------------------------------------------------------------------- order statistics
def kth_smallest(values: torch.Tensor, k: int, sample: int = 4096) -> torch.Tensor:
    """The k-th smallest entry (1-based) of ``values``, equal to ``values.flatten().kthvalue(k).values``: the
    selection runs over the entries between two order statistics of a strided sample of ``sample`` entries,
    bracketing position k by ±(2√m + 2) sample positions (4σ of a random sample's rank error), and falls back to
    the full ``kthvalue`` when the bracket misses (3x faster than kthvalue, 12x than topk, at 590k entries)."""
    flat = values.flatten()
    n = flat.numel()
    if n <= 4 * sample:
        return flat.kthvalue(k).values
    probe = flat[:: n // sample].sort().values
    m = probe.numel()
    at, margin = k / n * m, 2 * math.sqrt(m) + 2
    lo, hi = probe[max(0, int(at - margin))], probe[min(m - 1, int(at + margin) + 1)]
    below = int((flat < lo).sum())
    inside = flat[(flat >= lo) & (flat <= hi)]
    if below < k <= below + inside.numel():
        return inside.kthvalue(k - below).values
    return flat.kthvalue(k).values


# ---------------------------------------------------------------------- matrix product operators
def factor_shape(n: int, parts: int) -> tuple[int, ...]:
    """``n`` as a product of ``parts`` factors, as balanced as the prime factors allow (largest prime
    first onto the smallest factor; ascending; 1s when n has fewer prime factors than ``parts``)."""
    primes, m, p = [], n, 2
    while p * p <= m:
        while m % p == 0:
            primes.append(p)
            m //= p
        p += 1
    if m > 1:
        primes.append(m)
    out = [1] * parts
    for q in sorted(primes, reverse=True):
        out[out.index(min(out))] *= q
    return tuple(sorted(out))


def mpo_bond_dims(out_shape: tuple[int, ...], in_shape: tuple[int, ...], bond_dim: int | None) -> list[int]:
    """Bond dimensions D_0 = 1, D_1..D_{n−1}, D_n = 1 of :func:`mpo_decompose`: D_k = min(D, D_{k−1}·o_k·i_k,
    Π_{l>k} o_l·i_l) (the rank of the k-th unfolding is at most the smaller of its sides)."""
    sites = [o * i for o, i in zip(out_shape, in_shape, strict=True)]
    dims = [1]
    for k in range(len(sites) - 1):
        right = 1
        for s in sites[k + 1:]:
            right *= s
        full = min(dims[-1] * sites[k], right)
        dims.append(full if bond_dim is None else min(bond_dim, full))
    return [*dims, 1]


def mpo_decompose(
    w: torch.Tensor, out_shape: tuple[int, ...], in_shape: tuple[int, ...], bond_dim: int | None = None
) -> tuple[list[torch.Tensor], float]:
    """Matrix product operator of W (out × in, out = Π o_k, in = Π i_k) by TT-SVD (Oseledets 2011, Alg. 1;
    the MPO of Gao et al. 2020): W[(o₁..o_n), (i₁..i_n)] = T₁[o₁,i₁]·T₂[o₂,i₂]···T_n[o_n,i_n] with cores
    T_k of shape (D_{k−1}, o_k, i_k, D_k), each from a truncated SVD of the current unfolding (left cores
    orthonormal, the singular values carried right). Returns the cores and the bound
    √(Σ discarded σ²) ≥ ‖W − contract(cores)‖_F (Oseledets 2011, Thm 2.2); 0 (exact) when
    ``bond_dim`` is None or at least every unfolding's rank."""
    n = len(out_shape)
    if len(in_shape) != n:
        raise ValueError(f"out_shape={out_shape} and in_shape={in_shape} must have the same number of cores")
    dims = mpo_bond_dims(out_shape, in_shape, bond_dim)
    t = svd_precision(w).reshape(*out_shape, *in_shape).permute(*[x for k in range(n) for x in (k, n + k)])
    rest, cores, discarded = t.reshape(1, -1), [], 0.0
    for k in range(n - 1):
        u, s, vh = torch.linalg.svd(rest.reshape(dims[k] * out_shape[k] * in_shape[k], -1), full_matrices=False)
        d = dims[k + 1]
        discarded += float((s[d:] ** 2).sum())
        cores.append(u[:, :d].reshape(dims[k], out_shape[k], in_shape[k], d))
        rest = s[:d, None] * vh[:d]
    cores.append(rest.reshape(dims[n - 1], out_shape[-1], in_shape[-1], 1))
    return cores, discarded**0.5


def mpo_contract(cores: list[torch.Tensor]) -> torch.Tensor:
    """The (Π o_k) × (Π i_k) matrix of MPO ``cores`` (each (D_{k−1}, o_k, i_k, D_k)): the inverse of
    :func:`mpo_decompose`'s reshaping, exact for any cores."""
    return _mpo_matrix(_mpo_chain(cores)[-1], cores)


def _mpo_chain(cores: list[torch.Tensor]) -> list[torch.Tensor]:
    """The running products of the cores, T_k = (T_{k−1} · C_k) as (Π_{j≤k} o_j i_j) × D_k, a matmul per bond
    (autocast casts both sides alike)."""
    chain = [cores[0].reshape(-1, cores[0].shape[-1])]
    for core in cores[1:]:
        chain.append((chain[-1] @ core.reshape(core.shape[0], -1)).reshape(-1, core.shape[-1]))
    return chain


def _mpo_sites(cores: list[torch.Tensor]) -> tuple[list[int], list[int], int]:
    """(the 2n site sizes o₁, i₁, …, o_n, i_n; the permutation to (o₁…o_n, i₁…i_n); Π o_k)."""
    n = len(cores)
    out = 1
    for c in cores:
        out *= c.shape[1]
    return [d for c in cores for d in c.shape[1:3]], [*range(0, 2 * n, 2), *range(1, 2 * n, 2)], out


def _mpo_matrix(last: torch.Tensor, cores: list[torch.Tensor]) -> torch.Tensor:
    sites, order, out = _mpo_sites(cores)
    return last.reshape(sites).permute(*order).reshape(out, -1)


def _mpo_contract_backward(cores: list[torch.Tensor], chain: list[torch.Tensor], grad_m: torch.Tensor
                           ) -> list[torch.Tensor]:
    """∂L/∂C_k for L with ∂L/∂M = ``grad_m``, M = mpo_contract(cores) and ``chain`` its :func:`_mpo_chain`: the
    chain's matmuls run backwards (∂C_k = T_{k−1}ᵀ G_k, ∂T_{k−1} = G_k C_kᵀ), with no autograd (so
    ``torch.compile`` traces it)."""
    sites, order, _ = _mpo_sites(cores)
    inverse = sorted(range(len(order)), key=order.__getitem__)
    g = grad_m.reshape([sites[k] for k in order]).permute(*inverse)
    grads: list[torch.Tensor] = [grad_m] * len(cores)
    for k in range(len(cores) - 1, 0, -1):
        core = cores[k].reshape(cores[k].shape[0], -1)
        g = g.reshape(chain[k - 1].shape[0], -1)
        grads[k] = (chain[k - 1].t() @ g).reshape(cores[k].shape)
        g = g @ core.t()
    grads[0] = g.reshape(cores[0].shape)
    return grads


def mpo_apply(cores: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``x @ mpo_contract(cores).T`` without forming the matrix: x (…, Π i_k) is reshaped to its input
    sites and the cores are contracted into it one at a time (an MPO–vector product), so the memory is
    that of the activations times the bond dimension, not out × in."""
    lead, n = x.shape[:-1], len(cores)
    in_shape = [c.shape[2] for c in cores]
    t = x.reshape(-1, 1, 1, in_shape[0], x.shape[-1] // in_shape[0])  # (batch, outputs so far, D_0, i_1, rest)
    for k, core in enumerate(cores):
        t = torch.einsum("bpdir,doie->bpoer", t, core)
        batch, done, o, bond, rest = t.shape
        nxt = in_shape[k + 1] if k + 1 < n else 1
        t = t.reshape(batch, done * o, bond, nxt, rest // nxt)
    return t.reshape(*lead, -1)


#: ``mpo_linear`` forms the dense matrix when rows · MPO_DENSE_ROWS ≥ out · in: measured on CPU (one thread),
#: the core-by-core product is faster below about 16 rows for a 384 × 384 matrix and 110 for 1536 × 576
#: (bond 8, 4 cores), and 8–12× slower at training's thousands of rows (its einsums permute the activations).
MPO_DENSE_ROWS = 8192


def mpo_linear(x: torch.Tensor, cores: list[torch.Tensor]) -> torch.Tensor:
    """``x @ mpo_contract(cores).T`` by the faster route for x's number of rows: few rows (decoding) core by
    core (:func:`mpo_apply`); many rows through the dense matrix, which is formed in forward and formed again in
    backward but never kept (only x and the cores are saved), so the memory is the core-by-core route's."""
    rows, inn = x.numel() // max(1, x.shape[-1]), x.shape[-1]
    if rows * MPO_DENSE_ROWS < _mpo_sites(cores)[2] * inn:
        return mpo_apply(cores, x)
    return _MPOLinear.apply(x, *cores)


class _MPOLinear(torch.autograd.Function):
    """y = x·Mᵀ, M = mpo_contract(cores); backward: ∂x = g·M, ∂M = gᵀx, then ∂cores back through the
    recomputed contraction (:func:`_mpo_contract_backward`). Under autocast the forward's matmuls take
    autocast's dtype; the backward computes in the output gradient's dtype and returns each gradient in its
    input's dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, *cores: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, *cores)
        return x @ mpo_contract(list(cores)).t()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, *cores = ctx.saved_tensors
        chain = _mpo_chain(cores)  # formed again (not kept from forward) and used twice: M and ∂cores
        m = _mpo_matrix(chain[-1], cores)
        g = grad.reshape(-1, grad.shape[-1])
        grad_x = (g @ m.to(g.dtype)).to(x.dtype).reshape(x.shape) if ctx.needs_input_grad[0] else None
        if not any(ctx.needs_input_grad[1:]):
            return grad_x, *(None for _ in cores)
        grad_m = (g.t() @ x.reshape(-1, x.shape[-1]).to(g.dtype)).to(m.dtype)
        grad_cores = _mpo_contract_backward(cores, chain, grad_m)
        return grad_x, *(gc.to(c.dtype) for gc, c in zip(grad_cores, cores, strict=True))
