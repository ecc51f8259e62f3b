"""GraLoRA: k×k blocks, each a rank-r/k LoRA of its own input slice (rank up to k·r); parity with PEFT 0.21.2."""

from __future__ import annotations

import peft
import pytest
import torch

import rankwise as rw

from ..conftest import lm_batches, make_tiny_llama
from .peft_pairs import TARGETS, _close, _pair, _peft_layer, check_peft_parity


def _randomized(r: int = 4, k: int = 2, hybrid_r: int = 0):
    model = rw.adapt(make_tiny_llama(0), "gralora", r=r, gralora_k=k, hybrid_r=hybrid_r)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in rw.adapter_layers(model):
            for p in layer.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


@pytest.mark.parametrize("k", [2, 4])
def test_gralora_block_adapters_see_only_their_input_slice(k):
    r = 4
    layer = rw.adapter_layers(_randomized(r, k))[0][1]  # q_proj, 32 x 32
    s, width = r // k, layer.in_features // k
    x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(1))
    for n in range(k):
        xz = x.clone()
        xz[:, n * width:(n + 1) * width] = 0  # input slice n off: block (j, n)'s adapters get no gradient
        layer.zero_grad()
        layer.delta_forward(xz).pow(2).sum().backward()
        assert torch.all(layer.gralora_A.grad[n] == 0)
        assert torch.all(layer.gralora_B.grad[:, n * s:(n + 1) * s] == 0)
        others = [m for m in range(k) if m != n]
        assert all(layer.gralora_A.grad[m].abs().max() > 0 for m in others)
        # and block (j, n) of ΔW is the product of exactly those two pieces
        delta = layer.delta_weight().detach()
        rows, cols = slice(0, layer.out_features // k), slice(n * width, (n + 1) * width)
        j = 0
        expected = layer.gralora_B[j, n * s:(n + 1) * s].t() @ layer.gralora_A[n][:, j * s:(j + 1) * s].t()
        _close(delta[rows, cols], expected.detach() * layer.config.scale, atol=1e-6)


def test_gralora_rank_exceeds_r_with_a_rank_r_parameter_count():
    r, k = 4, 2
    model = _randomized(r, k)
    for _, layer in rw.adapter_layers(model):
        assert layer.trainable_count() == r * (layer.in_features + layer.out_features)  # a rank-r LoRA's count
        rank = int(torch.linalg.matrix_rank(layer.delta_weight().detach()))
        assert r < rank == min(k * r, layer.in_features, layer.out_features)
        b, a, s = layer.factors()
        assert b.shape[1] == a.shape[0] == k * r
        _close(b @ a * s, layer.delta_weight(), atol=1e-6)
        x = torch.randn(2, 3, layer.in_features)
        _close(layer.delta_forward(x), x @ layer.delta_weight().t(), atol=1e-5)
    hybrid = rw.adapter_layers(_randomized(r, k, hybrid_r=2))[0][1]
    b, a, _ = hybrid.factors()
    assert b.shape[1] == k * r + 2
    part = hybrid.gralora_B_general @ hybrid.gralora_A_general * hybrid.config.scale
    bb, aa = hybrid.block_factors()
    _close(hybrid.delta_weight() - part, bb @ aa * hybrid.config.scale, atol=1e-5)


@pytest.mark.parametrize("hybrid_r", [0, 2])
def test_gralora_matches_peft(hybrid_r):
    cfg = peft.GraloraConfig(r=4, alpha=12, gralora_k=2, hybrid_r=hybrid_r, target_modules=TARGETS)
    pm, mine = _pair(cfg, "gralora", r=4, alpha=12, gralora_k=2, hybrid_r=hybrid_r)
    g = torch.Generator().manual_seed(2)
    pairs = []
    with torch.no_grad():
        for name, layer in rw.adapter_layers(mine):
            pl = _peft_layer(pm, name)
            peft_tensors = [pl.gralora_A["default"], pl.gralora_B["default"]]
            mine_tensors = [layer.gralora_A, layer.gralora_B]
            if hybrid_r:
                peft_tensors += [pl.gralora_A_general["default"].weight, pl.gralora_B_general["default"].weight]
                mine_tensors += [layer.gralora_A_general, layer.gralora_B_general]
            for mp, pp in zip(mine_tensors, peft_tensors, strict=True):
                pp.add_(torch.randn(pp.shape, generator=g) * 0.2)
                mp.copy_(pp)
                pairs.append((mp, pp))
            _close(layer.delta_weight(), pl.get_delta_weight("default"), atol=1e-6)
    batch = lm_batches()[1]
    check_peft_parity(pm, mine, pairs, batch)


def test_gralora_bad_input():
    with pytest.raises(ValueError, match="r=6 must be divisible by gralora_k=4"):
        rw.adapt(make_tiny_llama(0), "gralora", r=6, gralora_k=4)
    with pytest.raises(ValueError, match="gralora_k=3 must divide in_features=32"):
        rw.adapt(make_tiny_llama(0), "gralora", r=6, gralora_k=3)
    with pytest.raises(ValueError, match="hybrid_r=-1"):
        rw.adapt(make_tiny_llama(0), "gralora", r=4, hybrid_r=-1)
