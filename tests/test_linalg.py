"""rankwise.linalg: the truncated SVD and the energy rule behind the SVD-based inits, DEIM skeletons and the
MPO helpers."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rankwise import linalg
from rankwise.linalg import (
    deim_indices,
    energy_rank,
    factor_shape,
    mpo_apply,
    mpo_contract,
    mpo_decompose,
    mpo_linear,
    truncated_svd,
)


def _rank_r(w: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0.0, 100.0), min_size=1, max_size=30), st.floats(0.01, 1.0))
def test_energy_rank_is_the_smallest_sufficient_rank(values, energy):
    s = torch.tensor(sorted(values, reverse=True), dtype=torch.float64)
    k = energy_rank(s, energy)
    total = float((s**2).sum())
    assert 1 <= k <= len(values)
    if total > 0:
        assert float((s[:k] ** 2).sum()) >= energy * total * (1 - 1e-9)
        assert k == 1 or float((s[: k - 1] ** 2).sum()) < energy * total


def test_truncated_svd_exact_path():
    w = torch.randn(10, 7, generator=torch.Generator().manual_seed(0))
    u, s, vh = truncated_svd(w, 3)
    assert torch.allclose((u * s) @ vh, _rank_r(w, 3), atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 5000), st.integers(1, 5))
def test_factor_shape_multiplies_back_and_is_sorted(n, parts):
    shape = factor_shape(n, parts)
    assert len(shape) == parts and list(shape) == sorted(shape) and int(torch.tensor(shape).prod()) == n


def test_factor_shape_is_balanced():
    assert factor_shape(4096, 4) == (8, 8, 8, 8) and factor_shape(64, 3) == (4, 4, 4)
    assert factor_shape(11008, 4) == (4, 8, 8, 43) and factor_shape(7, 3) == (1, 1, 7)


def test_deim_picks_distinct_indices_where_the_basis_is_interpolable():
    """DEIM's indices are distinct, the selected rows of the basis are nonsingular, and a basis that is a
    permuted identity block is read back exactly."""
    u, _, _ = torch.linalg.svd(torch.randn(40, 40, generator=torch.Generator().manual_seed(1)))
    picked = deim_indices(u[:, :6])
    assert len(set(picked.tolist())) == 6
    assert float(torch.linalg.svdvals(u[picked, :6]).min()) > 1e-3
    eye = torch.eye(10)[:, [7, 2, 5]]
    assert deim_indices(eye).tolist() == [7, 2, 5]


def test_mpo_round_trip_of_given_cores():
    g = torch.Generator().manual_seed(2)
    cores = [torch.randn(shape, generator=g) for shape in ((1, 2, 3, 2), (2, 4, 2, 3), (3, 2, 2, 1))]
    w = mpo_contract(cores)
    assert w.shape == (16, 12)
    again, bound = mpo_decompose(w, (2, 4, 2), (3, 2, 2))
    assert bound == 0.0 and torch.allclose(mpo_contract(again), w, atol=1e-4)
    # row 5 = (o₁, o₂, o₃) = (0, 2, 1), column 7 = (i₁, i₂, i₃) = (1, 1, 1), row-major over the factors
    entry = torch.einsum("a,ab,b->", cores[0][0, 0, 1], cores[1][:, 2, 1, :], cores[2][:, 1, 1, 0])
    assert torch.isclose(w[5, 7], entry, atol=1e-6)


def test_mpo_apply_is_the_contracted_matrix_times_x():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 32, generator=g)
    x = torch.randn(2, 5, 32, generator=g)
    for out_shape, in_shape, bond in (((4, 4, 4), (2, 4, 4), 3), ((8, 8), (4, 8), None), ((1, 8, 8), (2, 2, 8), 5)):
        cores, _ = mpo_decompose(w, out_shape, in_shape, bond)
        assert torch.allclose(mpo_apply(cores, x), x @ mpo_contract(cores).T, atol=1e-4)


@pytest.mark.parametrize("dense", [False, True])
def test_mpo_linear_values_and_gradients(dense, monkeypatch):
    """``mpo_linear`` is x·MPO(cores)ᵀ with the gradients of that expression (gradcheck in float64, both
    routes), and the dense route keeps only x and the cores for backward (no out × in tensor saved)."""
    g = torch.Generator().manual_seed(4)
    cores, _ = mpo_decompose(torch.randn(64, 32, generator=g, dtype=torch.float64), (4, 4, 4), (2, 4, 4), 3)
    cores = [c.clone().requires_grad_(True) for c in cores]
    x = torch.randn(40, 32, generator=g, dtype=torch.float64, requires_grad=True)
    monkeypatch.setattr(linalg, "MPO_DENSE_ROWS", 8192 if dense else 0)  # 0: always core by core
    assert torch.allclose(mpo_linear(x, cores), x @ mpo_contract(cores).T, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x, *c: mpo_linear(x, list(c)), (x, *cores))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        mpo_linear(x, cores)
    if dense:
        assert (64, 32) not in saved and (32, 64) not in saved and sorted(map(tuple, saved)) == sorted(
            [tuple(x.shape), *(tuple(c.shape) for c in cores)])


def test_kth_smallest_is_kthvalue():
    """Exactly ``kthvalue`` for random, row-structured, sorted (a strided sample of it is biased) and tied
    values, at the ends and in the middle; the bracket path and the fallback both taken."""
    g = torch.Generator().manual_seed(5)
    cases = {
        "random": torch.randn(300, 200, generator=g),
        "rows": torch.randn(300, 200, generator=g).abs() + torch.arange(300.0).unsqueeze(1),
        "sorted": torch.arange(60000.0).flip(0),
        "ties": torch.randint(0, 5, (300, 200), generator=g).float(),
    }
    for name, values in cases.items():
        n = values.numel()
        for k in (1, 2, n // 3, n // 2, n - 1, n):
            assert linalg.kth_smallest(values, k) == values.flatten().kthvalue(k).values, (name, k)
