"""The SVD baseline: every targeted matrix becomes its truncated SVD and keeps ``ratio`` of its own weights."""

from __future__ import annotations

import math

import pytest

import rankwise as rw

from ..conftest import make_tiny_bert, make_tiny_llama
from .factor_checks import _assert_factor_pairs_are_truncated_svd, _linears


@pytest.mark.parametrize("make", [make_tiny_llama, make_tiny_bert])
def test_svd_factors_are_truncated_svd_and_keep_ratio_per_matrix(make):
    model = make(0)
    original = {n: m.weight.detach().clone() for n, m in _linears(model).items()}
    rw.compress(model, "svd", ratio=0.5)
    state = model.rankwise_compress
    _assert_factor_pairs_are_truncated_svd(model, original)
    for name, w in original.items():
        out_f, in_f = w.shape
        r = state.ranks[name]
        assert r == math.floor(0.5 * out_f * in_f / (out_f + in_f))
        assert r * (out_f + in_f) <= 0.5 * out_f * in_f < (r + 1) * (out_f + in_f)  # every matrix drops to ratio
    assert state.weights_before == sum(w.numel() for w in original.values())
    assert state.kept_fraction <= 0.5
