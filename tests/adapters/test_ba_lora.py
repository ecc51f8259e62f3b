"""BA-LoRA (Chang et al. 2024): LoRA + λ₁·consistency + λ₂·diversity + λ₃·SVD regularisers on the output logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

import rankwise as rw
from rankwise.adapters.ba_lora import BALoRARegularizers, consistency, diversity, svd_term
from rankwise.train import TrainConfig, train

from ..conftest import cls_batches, make_tiny_bert

OFF = {"lambda1": 0.0, "lambda2": 0.0, "lambda3": 0.0}


def test_consistency_is_t2_kl_from_the_base_distribution():
    g = torch.Generator().manual_seed(0)
    z, z0 = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    t = 2.0
    p0, p = F.softmax(z0 / t, -1), F.softmax(z / t, -1)
    expected = t**2 * (p0 * (p0.log() - p.log())).sum(-1).mean()  # KL(p_base ‖ p_adapted)
    torch.testing.assert_close(consistency(z, z0, t), expected)
    assert float(consistency(z0, z0, t)) == pytest.approx(0.0, abs=1e-6)


def test_diversity_is_minus_mean_entropy():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(4, 6, generator=g)
    p = F.softmax(z, -1)
    torch.testing.assert_close(diversity(z), (p * p.log()).sum(-1).mean())
    assert float(diversity(torch.zeros(3, 6))) == pytest.approx(-torch.log(torch.tensor(6.0)).item())  # uniform


def test_svd_term_is_minus_top_k_share():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(6, 5, generator=g)
    s = torch.linalg.svdvals(z)
    torch.testing.assert_close(svd_term(z, 2, frobenius=False), -s[:2].sum() / s.sum())
    torch.testing.assert_close(svd_term(z, 2, frobenius=True), -s[:2].sum() / s.pow(2).sum().sqrt())
    rank_one = torch.outer(torch.arange(1.0, 7.0), torch.ones(5))
    assert float(svd_term(rank_one, 1, frobenius=False)) == pytest.approx(-1.0, abs=1e-5)


def _model(**options):
    model = make_tiny_bert()
    rw.adapt(model, "ba_lora", r=2, **options)
    with torch.no_grad():
        for _, layer in rw.adapter_layers(model):
            layer.lora_B.add_(0.05 * torch.randn(layer.lora_B.shape, generator=torch.Generator().manual_seed(3)))
    return model


def test_the_model_loss_gets_the_weighted_terms_on_labelled_rows():
    """Training forward: loss = task + λ₁·L_C(Z, Z₀) + λ₂·L_D(Z) + λ₃·L_S(Z), Z₀ the original model's logits."""
    cfg = {"lambda1": 0.3, "lambda2": 0.2, "lambda3": 0.1, "svd_k": 2, "distill_temp": 2.0, "svd_frob_norm": True}
    model = _model(**cfg)
    batch = cls_batches(n=1)[0]
    batch["labels"][1] = -100  # an unlabelled row is left out
    model.eval()
    with torch.no_grad():
        plain = model(**batch)
        with rw.adapters_disabled(model):
            z0 = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    keep = batch["labels"] != -100
    z = plain.logits[keep]
    expected = (plain.loss + 0.3 * consistency(z, z0[keep], 2.0) + 0.2 * diversity(z)
                + 0.1 * svd_term(z, 2, True))
    reg = BALoRARegularizers(model, rw.adapter_state(model, "default").config)
    reg.install()
    model.train()
    for m in model.modules():  # no dropout: the same forward as the eval-mode reference
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    out = model(**batch)
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    assert set(reg.last) == {"consistency", "diversity", "svd"} and reg.last["consistency"] > 0
    # every term alone has a gradient on the LoRA factors
    for term in (lambda t: consistency(t, z0[keep], 2.0), diversity, lambda t: svd_term(t, 2, True)):
        model.zero_grad()
        term(model(**batch).logits[keep]).backward()
        assert any(float(layer.lora_B.grad.abs().sum()) > 0 for _, layer in rw.adapter_layers(model))
    model.eval()
    assert torch.equal(model(**batch).loss, plain.loss)  # hook installed: eval forwards are never regularised
    reg.remove()


def test_zero_weights_train_as_lora_and_the_loop_attaches_the_hook():
    def run(method, **options):
        model = make_tiny_bert()
        rw.adapt(model, method, r=2, init="pissa", **options)
        result = train(model, cls_batches(n=3), config=TrainConfig(max_steps=3, lr=1e-2, progress=False,
                                                                   measure_memory=False))
        return model, result

    off, _ = run("ba_lora", **OFF)
    lora, _ = run("lora")
    for (n, a), (_, b) in zip(rw.adapter_layers(off), rw.adapter_layers(lora), strict=True):
        assert torch.equal(a.lora_A, b.lora_A) and torch.equal(a.lora_B, b.lora_B), n
    on, result = run("ba_lora", lambda1=0.5, lambda2=0.5, lambda3=0.5, svd_k=1)
    assert all(k in result.history[-1] for k in ("ba_consistency", "ba_diversity", "ba_svd"))
    assert any(not torch.equal(a.lora_B, b.lora_B)
               for (_, a), (_, b) in zip(rw.adapter_layers(on), rw.adapter_layers(lora), strict=True))
    for bad in ({"lambda1": -1}, {"svd_k": 0}, {"distill_temp": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            rw.adapt(nn.Sequential(nn.Linear(4, 4)), "ba_lora", targets=["0"], r=2, **bad)
