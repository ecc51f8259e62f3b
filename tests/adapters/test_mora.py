"""MoRA: r̂ from LoRA's budget, the compress / decompress operators exactly as the paper defines them
(each ΔW rebuilt entry by entry from the definition), a rank above r at LoRA's parameter count."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.adapters.init import InitContext
from rankwise.adapters.mora import COMPRESSIONS, MoRAConfig, MoRALayer

from ..conftest import lm_batches, make_tiny_llama


def _layer(k: int, d: int, r: int, compress: str, seed: int = 0) -> MoRALayer:
    torch.manual_seed(seed)
    layer = MoRALayer(nn.Linear(k, d, bias=False), MoRAConfig(r=r, compress=compress), InitContext(name="w"))
    with torch.no_grad():
        layer.mora_M.copy_(torch.randn(layer.r_hat, layer.r_hat, generator=torch.Generator().manual_seed(seed)))
    return layer


def _rope(r_hat: int, b: int) -> torch.Tensor:
    """R_b: the RoPE rotation of chunk b, each pair (j, j + r̂/2) turned by b·10000^(−2j/r̂)."""
    rot = torch.zeros(r_hat, r_hat, dtype=torch.float64)
    half = r_hat // 2
    for j in range(half):
        t = b * 10000.0 ** (-2 * j / r_hat)
        c, s = math.cos(t), math.sin(t)
        rot[j, j], rot[j, j + half] = c, -s
        rot[j + half, j], rot[j + half, j + half] = s, c
    return rot


def _expected_delta(layer: MoRALayer) -> torch.Tensor:
    """ΔW written from the paper's operators: the input padded cyclically (x_{p mod k}), the output
    cut (or tiled) to d."""
    k, d, r_hat, mode = layer.in_features, layer.out_features, layer.r_hat, layer.config.compress
    m = layer.mora_M.detach().double()
    n = -(-k // r_hat)
    w = torch.zeros(d, k, dtype=torch.float64)
    if mode == "truncation":
        w[:r_hat, :r_hat] = m
        return w
    if mode == "sharing":  # group g = {p : p mod r̂ = g}; output row i reads h_{i mod r̂}
        for i in range(d):
            for p in range(n * r_hat):
                w[i, p % k] += m[i % r_hat, p % r_hat]
        return w
    blocks = [m @ _rope(r_hat, b) if mode == "rotation" else m for b in range(n)]
    width = n * r_hat  # the concatenated chunk outputs, tiled when shorter than d
    for i in range(d):
        row = i % width
        b, q = divmod(row, r_hat)
        for c in range(r_hat):
            w[i, (b * r_hat + c) % k] += blocks[b][q, c]
    return w


@pytest.mark.parametrize("compress", COMPRESSIONS)
@pytest.mark.parametrize("shape", [(64, 64, 2), (48, 80, 4), (80, 40, 3)], ids=["square", "wide-out", "wide-in"])
def test_delta_is_the_papers_operators(compress, shape):
    k, d, r = shape
    layer = _layer(k, d, r, compress)
    torch.testing.assert_close(layer.delta_weight().double(), _expected_delta(layer), atol=1e-5, rtol=1e-5)
    x = torch.randn(3, 5, k)  # the forward runs the same map without forming ΔW
    torch.testing.assert_close(layer(x), x @ (layer.base_weight + layer.delta_weight()).t(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("compress", COMPRESSIONS)
def test_square_size_uses_loras_budget(compress):
    for k, d, r in [(64, 64, 8), (48, 80, 4), (576, 1536, 8)]:
        layer = MoRALayer(nn.Linear(k, d), MoRAConfig(r=r, compress=compress), InitContext(name="w"))
        r_hat = math.isqrt((d + k) * r)  # ⌊√((d + k)·r)⌋
        assert layer.r_hat == (r_hat - r_hat % 2 if compress == "rotation" else r_hat)
        assert layer.trainable_count() == layer.r_hat**2 <= r * (d + k) < (layer.r_hat + 2) ** 2
        assert torch.count_nonzero(layer.mora_M) == 0  # M = 0: ΔW = 0 at init


@pytest.mark.parametrize("compress", ["rotation", "decouple", "sharing"])
def test_rank_exceeds_r_at_loras_parameter_count(compress):
    k = d = 64
    r = 2
    layer = _layer(k, d, r, compress)
    assert layer.trainable_count() <= r * (d + k)
    rank = int(torch.linalg.matrix_rank(layer.delta_weight().double()))
    # r̂ = 16 divides 64: sharing gives rank r̂ (tiled rows, summed columns of M); decouple
    # blockdiag(M, M, M, M) and rotation blockdiag(M·R₀, …, M·R₃) are full rank
    assert rank == (layer.r_hat if compress == "sharing" else 64) and rank > 4 * r


def test_truncation_refuses_r_hat_beyond_the_layer():
    with pytest.raises(ValueError, match="compress='truncation'.*min\\(in_features, out_features\\)=8"):
        MoRALayer(nn.Linear(8, 64), MoRAConfig(r=4, compress="truncation"), InitContext(name="w"))
    with pytest.raises(ValueError, match="r̂=0"):
        MoRALayer(nn.Linear(1, 1), MoRAConfig(r=1), InitContext(name="w"))
    with pytest.raises(ValueError, match="compress='nope' is not allowed"):
        MoRAConfig(compress="nope")


def test_trained_mora_merges_and_reloads(tmp_path):
    model = rw.adapt(make_tiny_llama(0), "mora", r=4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for batch in lm_batches(n=3):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    batch = lm_batches(seed=7)[0]
    model.eval()
    expected = model(**batch).logits
    assert not torch.allclose(expected, make_tiny_llama(0)(**batch).logits, atol=1e-4)
    rw.save_adapter(model, tmp_path / "mora")
    fresh = rw.load_adapter(make_tiny_llama(0), tmp_path / "mora")
    torch.testing.assert_close(fresh(**batch).logits, expected, atol=1e-6, rtol=0)
    rw.merge(model)
    torch.testing.assert_close(model(**batch).logits, expected, atol=1e-4, rtol=0)
