"""Structured layers: FactorizedLinear (W = U V) and SparseLowRankLinear (W = s·B A + S)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rankwise.sparse.layers import (
    FactorizedLinear,
    SparseLowRankLinear,
    random_support,
    support_size,
)


def dense_reference(layer: SparseLowRankLinear) -> torch.Tensor:
    """s·B A + scatter(S) written out by hand."""
    s = torch.zeros(layer.out_features * layer.in_features, dtype=layer.values.dtype)
    s[layer.index] = layer.values
    return layer.scale * layer.B @ layer.A + s.view(layer.out_features, layer.in_features)


# ---------------------------------------------------------------------------- FactorizedLinear
def test_factorized_full_rank_is_exact_and_truncation_is_eckart_young():
    torch.manual_seed(0)
    lin = nn.Linear(12, 9).double()
    x = torch.randn(5, 12, dtype=torch.double)
    full = FactorizedLinear.from_linear(lin)
    assert full.rank == 9
    torch.testing.assert_close(full(x), lin(x))
    s = torch.linalg.svdvals(lin.weight.detach())
    for k in (1, 3, 6):
        err = torch.linalg.matrix_norm(FactorizedLinear.from_linear(lin, k).dense_weight() - lin.weight)
        torch.testing.assert_close(err, s[k:].square().sum().sqrt())


def test_factorized_dense_factorized_round_trip_and_balance():
    torch.manual_seed(1)
    f = FactorizedLinear(10, 7, 7)
    dense = f.to_linear()
    assert isinstance(dense, nn.Linear) and dense.weight.shape == (7, 10)
    again = FactorizedLinear.from_linear(dense)  # full rank: exact up to rounding
    torch.testing.assert_close(again.dense_weight(), f.dense_weight(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again.bias, f.bias)
    # √σ split: both factors carry the same singular values
    torch.testing.assert_close(torch.linalg.svdvals(again.U), torch.linalg.svdvals(again.V), atol=1e-5, rtol=1e-5)


def test_factorized_state_dict_round_trip_and_count():
    torch.manual_seed(2)
    f = FactorizedLinear(8, 6, 3)
    g = FactorizedLinear(8, 6, 3)
    g.load_state_dict(f.state_dict())
    x = torch.randn(4, 8)
    torch.testing.assert_close(g(x), f(x))
    assert f.trainable_count() == sum(p.numel() for p in f.parameters()) == 3 * (8 + 6) + 6


# ---------------------------------------------------------------------------- SparseLowRankLinear
def test_random_support_has_exact_size_is_sorted_and_seeded():
    g = torch.Generator().manual_seed(0)
    idx = random_support(32, 64, 0.25, g)
    assert idx.numel() == support_size(32, 64, 0.25) == 512
    assert bool((idx[1:] > idx[:-1]).all()) and int(idx.min()) >= 0 and int(idx.max()) < 32 * 64
    again = random_support(32, 64, 0.25, torch.Generator().manual_seed(0))
    other = random_support(32, 64, 0.25, torch.Generator().manual_seed(1))
    assert torch.equal(idx, again) and not torch.equal(idx, other)


@pytest.mark.parametrize("kernel", ["sparse", "dense"])
def test_kernels_match_dense_formula_forward_and_backward(kernel):
    torch.manual_seed(3)
    idx = random_support(9, 13, 0.3, torch.Generator().manual_seed(0))
    layer = SparseLowRankLinear(13, 9, 3, idx, bias=True, scale=0.7, kernel=kernel, dtype=torch.double)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    x = torch.randn(2, 5, 13, dtype=torch.double, requires_grad=True)
    y = layer(x)
    ref = nn.functional.linear(x, dense_reference(layer), layer.bias)
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    params = [x, layer.B, layer.A, layer.values, layer.bias]
    for a, b in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(ref, params, g), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kernel", ["sparse", "dense"])
def test_kernels_train_under_bf16_autocast(kernel):
    """Mixed precision (the pre-training benchmark's setting): bf16 activations in, fp32 parameter
    gradients out, close to the fp32 gradients."""
    torch.manual_seed(4)
    idx = random_support(24, 32, 0.1, torch.Generator().manual_seed(0))
    layer = SparseLowRankLinear(32, 24, 4, idx, bias=True, kernel=kernel)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    x = torch.randn(3, 7, 32)
    params = [layer.B, layer.A, layer.values, layer.bias]
    exact = torch.autograd.grad(layer(x).square().mean(), params)
    x_bf16 = x.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = layer(x_bf16).float().square().mean()
    grads = torch.autograd.grad(loss, [x_bf16, *params])
    assert grads[0].dtype == torch.bfloat16
    for got, want in zip(grads[1:], exact, strict=True):
        assert got.dtype == torch.float32
        assert (got - want).norm() <= 0.05 * want.norm()


@pytest.mark.parametrize("kernel", ["sparse", "dense"])
def test_no_dense_weight_is_stored_or_saved_for_backward(kernel):
    m, n = 48, 40
    layer = SparseLowRankLinear(n, m, 4, random_support(m, n, 0.05), kernel=kernel)
    tensors = list(layer.parameters()) + list(layer.buffers())
    assert all(t.numel() < m * n for t in tensors)
    saved = []
    x = torch.randn(3, n, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        y = layer(x)
    y.sum().backward()
    assert saved and all(shape != (m, n) for shape in saved)


@pytest.mark.parametrize("kernel", ["sparse", "dense"])
def test_sparse_low_rank_from_linear_and_back_is_exact_at_full_rank(kernel):
    torch.manual_seed(4)
    lin = nn.Linear(7, 5).double()
    layer = SparseLowRankLinear.from_linear(lin, 5, 0.2, scale=0.5, kernel=kernel)
    x = torch.randn(3, 7, dtype=torch.double)
    torch.testing.assert_close(layer(x), lin(x))
    dense = layer.to_linear()
    torch.testing.assert_close(dense.weight, lin.weight)
    # low rank: the values of S hold exactly the residual W − s·BA on the support
    low = SparseLowRankLinear.from_linear(lin, 2, 0.4)
    residual = (lin.weight - low.scale * low.B @ low.A).detach().reshape(-1)[low.index]
    torch.testing.assert_close(low.values.detach(), residual)


def test_sparse_low_rank_state_dict_round_trip_rebuilds_structure():
    torch.manual_seed(5)
    a = SparseLowRankLinear(16, 12, 3, random_support(12, 16, 0.1, torch.Generator().manual_seed(0)))
    with torch.no_grad():
        for p in a.parameters():
            p.normal_()
    b = SparseLowRankLinear(16, 12, 3, random_support(12, 16, 0.1, torch.Generator().manual_seed(9)))
    assert not torch.equal(a.index, b.index)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.index, b.index) and set(a.state_dict()) == {"B", "A", "values", "bias", "index"}
    x = torch.randn(4, 16)
    torch.testing.assert_close(b(x), a(x))  # CSR buffers were rebuilt from the loaded index


def test_sparse_low_rank_count():
    layer = SparseLowRankLinear(20, 10, 2, random_support(10, 20, 0.15))
    assert layer.nnz == 30
    assert layer.trainable_count() == sum(p.numel() for p in layer.parameters()) == 2 * 30 + 30 + 10


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: FactorizedLinear(8, 6, 7), "rank=7 is larger than min(out_features, in_features)=6"),
        (lambda: FactorizedLinear(8, 6, 0), "rank=0 must be a positive integer"),
        (lambda: FactorizedLinear.from_linear(nn.Conv1d(2, 2, 1), 1), "linear must be an nn.Linear"),
        (lambda: random_support(4, 4, 0.0), "density=0.0 must be a number in (0, 1]"),
        (lambda: random_support(4, 4, 1.5), "density=1.5 must be a number in (0, 1]"),
        (lambda: SparseLowRankLinear(4, 4, 1, torch.tensor([0, 1]), kernel="cuda"), "kernel='cuda' is not allowed"),
        (lambda: SparseLowRankLinear(4, 4, 1, torch.tensor([3, 1])), "strictly increasing flat indices"),
        (lambda: SparseLowRankLinear(4, 4, 1, torch.tensor([0, 16])), "strictly increasing flat indices"),
        (lambda: SparseLowRankLinear.from_linear(nn.Linear(4, 4), 2, 2.0), "density=2.0"),
    ],
)
def test_bad_input_errors(build, message):
    with pytest.raises(ValueError) as err:
        build()
    assert message in str(err.value)
