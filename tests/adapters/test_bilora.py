"""BiLoRA (Qiang et al. 2024): ΔW = s·P·Λ·Q, P and Q learn only from split D₁, Λ only from split D₂."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.adapters.adalora import orthogonal_regularizer
from rankwise.adapters.bilora import BiLoRALevels
from rankwise.train import TrainConfig, train

from ..conftest import cls_batches, make_tiny_bert


def _factors(model):
    layers = [m for _, m in rw.adapter_layers(model)]
    pq = [t.detach().clone() for m in layers for t in (m.lora_A, m.lora_B)]
    lam = [m.lora_E.detach().clone() for m in layers]
    return pq, lam


def _muted(split):
    """A loss that is zero on the batches of ``split`` ("d1" or "d2"; batches carry their split)."""

    def loss_fn(model, batch):
        inputs = {k: v for k, v in batch.items() if k != "split"}
        loss = model(**inputs).loss
        return loss * 0 if batch["split"] == split else loss

    return loss_fn


def _stream(n, upper_every=2):
    """Training batches labelled by the split the step falls in (every upper_every-th is D₂)."""
    batches = cls_batches(n=n)
    for i, b in enumerate(batches):
        b["split"] = "d2" if i % upper_every == upper_every - 1 else "d1"
    return batches


def _bilora(**options):
    """A tiny BERT with BiLoRA, λ ≠ 0 (at λ = 0, the init, P and Q have no task gradient yet)."""
    model = make_tiny_bert()
    rw.adapt(model, "bilora", r=2, trainable=None, orth_reg_weight=0.0, **options)
    with torch.no_grad():
        for _, m in rw.adapter_layers(model):
            m.lora_E.fill_(0.1)
    return model


def _train(loss_fn, batches, callbacks=(), **options):
    model = _bilora(**options)
    before = _factors(model)
    train(model, batches, callbacks=callbacks, loss_fn=loss_fn,
          config=TrainConfig(max_steps=len(batches), lr=1e-2, progress=False, measure_memory=False,
                             max_grad_norm=None))
    return before, _factors(model)


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("upper_every", [2, 3])
def test_split_by_step_routes_each_split_to_its_level(upper_every):
    """Zero D₂'s loss: Λ never moves, P and Q do. Zero D₁'s loss: P and Q never move, Λ does."""
    (pq0, lam0), (pq1, lam1) = _train(_muted("d2"), _stream(6, upper_every), upper_every=upper_every)
    assert _same(lam0, lam1) and not _same(pq0, pq1)
    (pq0, lam0), (pq1, lam1) = _train(_muted("d1"), _stream(6, upper_every), upper_every=upper_every)
    assert _same(pq0, pq1) and not _same(lam0, lam1)


def test_second_loader_is_d2():
    """With d2_data every step moves both levels: P, Q from the loop's batch, Λ from the D₂ loader."""
    d1 = cls_batches(n=3)
    for b in d1:
        b["split"] = "d1"
    d2 = cls_batches(n=2, seed=4)
    for b in d2:
        b["split"] = "d2"

    def run(muted):
        model = _bilora()
        cb = BiLoRALevels(model, d2_data=d2)
        before = _factors(model)
        result = train(model, d1, callbacks=[cb], loss_fn=_muted(muted),
                       config=TrainConfig(max_steps=3, lr=1e-2, progress=False, measure_memory=False))
        assert {h["bilora_level"] for h in result.history} == {"both"}
        return before, _factors(model)

    (pq0, lam0), (pq1, lam1) = run("d2")
    assert _same(lam0, lam1) and not _same(pq0, pq1)
    (pq0, lam0), (pq1, lam1) = run("d1")
    assert _same(pq0, pq1) and not _same(lam0, lam1)


def test_lower_level_adds_the_orthogonality_gradient_only_to_p_and_q():
    model = nn.Sequential(nn.Linear(6, 5))
    rw.adapt(model, "bilora", targets=["0"], r=2, trainable=None, orth_reg_weight=0.3, upper_every=2)
    layer = model[0]
    with torch.no_grad():
        layer.lora_E.fill_(0.5)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    cb = BiLoRALevels(model)

    model(x).pow(2).sum().backward()
    task = [layer.lora_A.grad.clone(), layer.lora_B.grad.clone()]
    reg = 0.3 * orthogonal_regularizer([layer])
    ga, gb = torch.autograd.grad(reg, [layer.lora_A, layer.lora_B])
    assert cb.route(0) == "lower"
    torch.testing.assert_close(layer.lora_A.grad, task[0] + ga)
    torch.testing.assert_close(layer.lora_B.grad, task[1] + gb)
    assert layer.lora_E.grad is None

    model.zero_grad()
    model(x).pow(2).sum().backward()
    lam_grad = layer.lora_E.grad.clone()
    assert cb.route(1) == "upper"
    assert layer.lora_A.grad is None and layer.lora_B.grad is None
    assert torch.equal(layer.lora_E.grad, lam_grad)


def test_delta_is_p_lambda_q_and_options_are_checked():
    model = nn.Sequential(nn.Linear(6, 5))
    rw.adapt(model, "bilora", targets=["0"], r=3, alpha=6, trainable=None)
    layer = model[0]
    with torch.no_grad():
        layer.lora_E.normal_()
    expected = 2.0 * layer.lora_B @ torch.diag(layer.lora_E.view(-1)) @ layer.lora_A
    torch.testing.assert_close(layer.delta_weight(), expected)
    for bad in ({"upper_every": 1}, {"orth_reg_weight": -1}, {"alpha": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            rw.adapt(nn.Sequential(nn.Linear(4, 4)), "bilora", targets=["0"], r=2, **bad)
