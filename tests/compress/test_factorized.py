"""Factorized layers: dense -> factorized -> dense round trips, for one layer and a compressed model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.compress import FactorizedLinear, densify, factorized_layers
from rankwise.compress.factorized import factorized_from_factors
from rankwise.compress.svd import thin_svd

from ..conftest import lm_batches, make_tiny_llama


def test_factorized_dense_factorized_round_trip():
    lin = nn.Linear(24, 16)
    full = FactorizedLinear.from_linear(lin)  # full rank: exact
    torch.testing.assert_close(full.to_linear().weight, lin.weight, atol=1e-5, rtol=1e-5)
    svd = thin_svd(lin.weight)
    up, down = svd.factors(5)
    fac = factorized_from_factors(up, down, lin.bias)
    dense = fac.to_linear()
    again = FactorizedLinear.from_linear(dense, 5)  # rank-5 matrix → rank-5 factors reproduce it
    torch.testing.assert_close(again.dense_weight(), fac.dense_weight(), atol=1e-5, rtol=1e-4)
    x = torch.randn(3, 24)
    torch.testing.assert_close(again(x), fac(x), atol=1e-5, rtol=1e-4)
    model = make_tiny_llama(0)
    rw.compress(model, "svd", ratio=0.5)
    batch = lm_batches(1)[0]
    expected = model(**batch).logits
    densify(model)
    assert not factorized_layers(model)
    torch.testing.assert_close(model(**batch).logits, expected, atol=1e-4, rtol=1e-4)


def test_a_base_moving_init_over_a_factorized_base_names_the_init():
    """PiSSA is LoRA with init pissa, which moves the principal part out of W₀: over U·V the error names both."""
    model = rw.compress(make_tiny_llama(0), "svd", ratio=0.6)
    with pytest.raises(ValueError, match=r"\(lora, init pissa\) would write the base weight"):
        rw.adapt(model, "pissa", r=2)
