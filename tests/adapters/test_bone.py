"""Bone: the block-affine update depends on W₀, parity with PEFT 0.21.2 (MiSS, init "bat")."""

from __future__ import annotations

import peft
import pytest
import torch

import rankwise as rw
from rankwise.adapters.bone import bone_delta

from ..conftest import lm_batches, make_tiny_llama
from .peft_pairs import TARGETS, _close, _loss_and_grads, _pair, _peft_layer, _train


def test_bone_delta_depends_on_w0_and_counts_block_times_out():
    r = 4
    model = rw.adapt(make_tiny_llama(0), "bone", r=r, targets=TARGETS, trainable=None)
    base = make_tiny_llama(0)
    batch = lm_batches()[0]
    _close(model(**batch).logits, base(**batch).logits, atol=1e-6)  # b = 0 at init
    for _, layer in rw.adapter_layers(model):
        assert layer.bone_block.shape == (layer.out_features // r, r, r)
        assert layer.trainable_count() == layer.out_features * r
    _train(model, steps=2)
    layer = rw.adapter_layers(model)[0][1]
    block = layer.bone_block.detach()
    w0 = layer.base_layer.weight.detach()
    w1 = w0 + torch.randn_like(w0)
    d0, d1 = bone_delta(w0, block), bone_delta(w1, block)
    assert not torch.allclose(d0, d1, atol=1e-3)
    # ΔW is affine in W₀: ΔW(W₁) − ΔW(W₀) = (W₁ − W₀) blockwise times b_a (the "Weight Guide")
    _close(d1 - d0, bone_delta(w1 - w0, block) - bone_delta(torch.zeros_like(w0), block), atol=1e-5)
    # block (a, c) explicitly
    a, c = 1, 2
    rows, cols = slice(a * r, (a + 1) * r), slice(c * r, (c + 1) * r)
    _close(d0[rows, cols], w0[rows, cols] @ block[a] + block[a], atol=1e-6)


def test_bone_matches_peft_miss_bat():
    cfg = peft.MissConfig(r=4, target_modules=TARGETS, init_weights="bat")
    pm, mine = _pair(cfg, "bone", r=4)
    g = torch.Generator().manual_seed(1)
    pairs = []
    with torch.no_grad():
        for name, layer in rw.adapter_layers(mine):
            pb = _peft_layer(pm, name).miss_block["default"]
            pb.copy_(torch.randn(pb.shape, generator=g) * 0.1)
            layer.bone_block.copy_(pb)
            pairs.append((layer.bone_block, pb))
    batch = lm_batches()[3]
    loss_p, grads_p = _loss_and_grads(pm, batch, [p for _, p in pairs])
    loss_m, grads_m = _loss_and_grads(mine, batch, [p for p, _ in pairs])
    _close(loss_m, loss_p, atol=1e-5)
    for gm, gp in zip(grads_m, grads_p, strict=True):
        _close(gm, gp, atol=1e-6)
    pm.merge_adapter()
    rw.merge(mine)
    for name, layer in rw.adapter_layers(mine):
        _close(layer.base_layer.weight, _peft_layer(pm, name).get_base_layer().weight, atol=1e-6)


def test_bone_block_size_must_divide_the_layer():
    with pytest.raises(ValueError, match="r=5 must divide in_features=32 and out_features=32"):
        rw.adapt(make_tiny_llama(0), "bone", r=5)
