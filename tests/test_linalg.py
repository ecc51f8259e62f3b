"""rankwise.linalg: the truncated SVD and the energy rule behind the SVD-based inits."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rankwise.linalg import energy_rank, truncated_svd


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
