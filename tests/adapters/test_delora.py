"""DeLoRA: normalised rank-1 terms scaled by λ·‖W₀‖, so ‖ΔW‖ is bounded whatever B and A; parity with PEFT 0.21.2."""

from __future__ import annotations

import peft
import pytest
import torch

import rankwise as rw

from ..conftest import lm_batches, make_tiny_llama
from .peft_pairs import TARGETS, _close, _pair, _peft_layer, _train, check_peft_parity


def test_delora_norm_is_bounded_by_lambda_and_w0_whatever_b_and_a():
    r = 4
    model = rw.adapt(make_tiny_llama(0), "delora", r=r, delora_lambda=2.0)
    batch = lm_batches()[0]
    _close(model(**batch).logits, make_tiny_llama(0)(**batch).logits, atol=1e-6)  # B = 0 at init
    _train(model, steps=3)
    g = torch.Generator().manual_seed(0)
    for _, layer in rw.adapter_layers(model):
        w0 = layer.base_weight.detach()
        assert torch.equal(layer.delora_w_norm, w0.norm(dim=0))
        lam = float(layer.delora_lambda)
        assert lam != 2.0  # λ trains
        before = layer.delta_weight().detach()
        assert before.norm() > 1e-4
        with torch.no_grad():
            layer.delora_B.mul_(100.0)  # the strength of a direction is λ's business, not B's
            layer.delora_A[0].mul_(1e3)
        _close(layer.delta_weight().detach(), before, atol=1e-6)
        with torch.no_grad():  # any B, A: the bound holds, and is reached by aligned rank-1 terms
            layer.delora_B.copy_(torch.randn(layer.delora_B.shape, generator=g) * 1e3)
            layer.delora_A.copy_(torch.randn(layer.delora_A.shape, generator=g) * 1e-2)
            bound = abs(lam) * layer.delora_w_norm.max()
            assert layer.delta_weight().norm() <= bound * (1 + 1e-6)
            assert layer.delta_weight().norm() <= abs(lam) * w0.norm()
            j = int(layer.delora_w_norm.argmax())
            layer.delora_A.zero_()
            layer.delora_A[:, j] = 1.0
            layer.delora_B.copy_(torch.randn(layer.out_features, 1, generator=g).expand(-1, r))
            _close(layer.delta_weight().norm(), bound, atol=1e-5)
        b, a, s = layer.factors()
        assert b.shape == (layer.out_features, r) and a.shape == (r, layer.in_features)
        _close(b @ a * s, layer.delta_weight(), atol=1e-6)


def test_delora_matches_peft():
    cfg = peft.DeloraConfig(r=4, delora_lambda=3.0, target_modules=TARGETS)
    pm, mine = _pair(cfg, "delora", r=4, delora_lambda=3.0)
    g = torch.Generator().manual_seed(2)
    pairs = []
    with torch.no_grad():
        for name, layer in rw.adapter_layers(mine):
            pl = _peft_layer(pm, name)
            assert torch.equal(layer.delora_w_norm, pl.delora_w_norm["default"])
            for mine_p, key in [(layer.delora_A, "delora_A"), (layer.delora_B, "delora_B"),
                                (layer.delora_lambda, "delora_lambda")]:
                pp = getattr(pl, key)["default"]
                pp.add_(torch.randn(pp.shape, generator=g) * 0.1)
                mine_p.copy_(pp)
                pairs.append((mine_p, pp))
            _close(layer.delta_weight(), pl.get_delta_weight("default"), atol=1e-6)
    batch = lm_batches()[3]
    check_peft_parity(pm, mine, pairs, batch, grad_atol=1e-5)


def test_delora_bad_lambda():
    with pytest.raises(ValueError, match="delora_lambda=0 must be a positive number"):
        rw.adapt(make_tiny_llama(0), "delora", delora_lambda=0)
