"""VeRA: shared random projections regenerated from the seed, only the scalings train, parity with PEFT 0.21.2."""

from __future__ import annotations

import peft
import pytest
import torch

import rankwise as rw
from rankwise.adapters.vera import vera_projections

from ..conftest import lm_batches, make_tiny_llama
from .peft_pairs import TARGETS, _close, _loss_and_grads, _pair, _peft_layer, _train


def test_vera_projections_equal_peft_bit_for_bit_and_outputs_match():
    cfg = peft.VeraConfig(r=4, target_modules=TARGETS, projection_prng_key=7, d_initial=0.1)
    pm, mine = _pair(cfg, "vera", r=4, seed=7)
    layers = rw.adapter_layers(mine)
    peft_a = next(iter(_peft_layer(pm, layers[0][0]).vera_A.values()))
    peft_b = next(iter(_peft_layer(pm, layers[0][0]).vera_B.values()))
    assert torch.equal(layers[0][1].vera_A, peft_a) and torch.equal(layers[0][1].vera_B, peft_b)
    g = torch.Generator().manual_seed(0)
    pairs = []
    with torch.no_grad():
        for name, layer in layers:
            pl = _peft_layer(pm, name)
            lb, ld = pl.vera_lambda_b["default"], pl.vera_lambda_d["default"]
            lb.copy_(torch.randn(lb.shape, generator=g) * 0.1)
            ld.copy_(torch.randn(ld.shape, generator=g))
            layer.vera_lambda_b.copy_(lb)
            layer.vera_lambda_d.copy_(ld)
            pairs += [(layer.vera_lambda_b, lb), (layer.vera_lambda_d, ld)]
            _close(layer.delta_weight(), pl.get_delta_weight("default"), atol=1e-6)
    batch = lm_batches()[1]
    loss_p, grads_p = _loss_and_grads(pm, batch, [p for _, p in pairs])
    loss_m, grads_m = _loss_and_grads(mine, batch, [p for p, _ in pairs])
    _close(loss_m, loss_p, atol=1e-5)
    for gm, gp in zip(grads_m, grads_p, strict=True):
        _close(gm, gp, atol=1e-6)


def test_vera_only_scalings_train_and_shared_bases_regenerate_from_seed(tmp_path):
    model = rw.adapt(make_tiny_llama(0), "vera", r=8, seed=3, d_initial=0.5)
    layers = rw.adapter_layers(model)
    a0, b0 = layers[0][1].vera_A, layers[0][1].vera_B
    a_copy, b_copy = a0.clone(), b0.clone()
    assert all(l.vera_A is a0 and l.vera_B is b0 for _, l in layers)  # one pair, shared by all layers
    assert a0.shape == (8, 64) and b0.shape == (64, 8)  # k_max = 64 (down_proj), d_max = 64 (gate/up)
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"vera_lambda_b", "vera_lambda_d"}
    assert rw.summary(model).trainable == sum(l.out_features + 8 for _, l in layers)
    assert all(torch.all(l.vera_lambda_b == 0) and torch.all(l.vera_lambda_d == 0.5) for _, l in layers)
    _train(model, steps=3)
    assert torch.equal(a0, a_copy) and torch.equal(b0, b_copy) and not a0.requires_grad
    assert any(l.vera_lambda_b.abs().max() > 0 for _, l in layers)
    # factors give the same ΔW, and the export shape is LoRA's
    for _, layer in layers:
        b, a, s = layer.factors()
        _close(b @ a * s, layer.delta_weight(), atol=1e-6)
    batch = lm_batches(seed=9)[0]
    expected = model(**batch).logits
    rw.save_adapter(model, tmp_path / "vera")
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "vera" / "rankwise_adapter.safetensors"))
    assert not any("vera_A" in k or "vera_B" in k for k in saved)
    fresh = rw.load_adapter(make_tiny_llama(0), tmp_path / "vera")
    f_layer = rw.adapter_layers(fresh)[0][1]
    assert torch.equal(f_layer.vera_A, a0) and torch.equal(f_layer.vera_B, b0)
    assert torch.equal(fresh(**batch).logits, expected)
    other_a, _ = vera_projections(4, 8, 64, 64)
    assert not torch.equal(other_a, a0)  # a different seed gives different bases


def test_vera_bad_d_initial():
    with pytest.raises(ValueError, match="d_initial=0 must be a positive number"):
        rw.adapt(make_tiny_llama(0), "vera", r=4, d_initial=0)


@pytest.mark.parametrize("method", ["vera", "randlora"])
def test_shared_bases_refuse_a_per_layer_rank(method):
    with pytest.raises(ValueError, match="per-layer r overrides are not supported"):
        rw.adapt(make_tiny_llama(0), method, r=4, overrides={"model.layers.0.self_attn.q_proj": {"r": 8}})
