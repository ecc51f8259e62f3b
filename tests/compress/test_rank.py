"""Rank-selection policies: the uniform ratio rank and the one rank fraction κ that fits the budget."""

from __future__ import annotations

import math

from rankwise.compress.rank import kept_weights, rank_fraction_ranks, uniform_ratio_rank


def test_rank_policies():
    assert uniform_ratio_rank((64, 32), 0.5) == math.floor(0.5 * 64 * 32 / 96)
    assert uniform_ratio_rank((4, 4), 0.01) == 1
    shapes = {"a": (64, 64), "b": (64, 256), "c": (32, 256)}
    ranks = rank_fraction_ranks(shapes, 0.5)
    total = sum(a * b for a, b in shapes.values())
    assert kept_weights(shapes, ranks) <= 0.5 * total
    bigger = {n: (r + 1 if r is not None else None) for n, r in ranks.items()}
    assert kept_weights(shapes, bigger) > 0.5 * total  # κ is (close to) the largest that fits
    assert all(v is None for v in rank_fraction_ranks(shapes, 1.0).values())
