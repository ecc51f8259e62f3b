"""ALLoRA (Huang & Balestriero 2025): per-row step scaling c_i = 1/sqrt(‖w_i‖² + 1/η²), no α, no dropout."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.adapters.allora import ALLoRAStep, row_coefficients
from rankwise.train import TrainConfig, train

from ..conftest import cls_batches, make_tiny_bert


def _tiny(seed: int = 0, eta: float = 2.0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    rw.adapt(model, "allora", targets=["0", "2"], r=2, eta=eta, trainable=None)
    with torch.no_grad():
        for _, layer in rw.adapter_layers(model):
            layer.lora_B[1:].normal_()  # row 0 of every B stays zero: the fastest row
    return model


def _grads(model, x):
    model.zero_grad()
    model(x).pow(2).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_applied_row_step_is_the_formula():
    """SGD: Δw_i = −lr·g_i/sqrt(‖w_i‖² + 1/η²) with the norm of the row before the step."""
    eta, lr = 2.0, 0.1
    model = _tiny(eta=eta)
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    grads = _grads(model, x)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    step = ALLoRAStep(model)
    step.before_step()
    opt.step()
    step.after_step()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        w = before[n]
        expected = w - lr * grads[n] / torch.sqrt((w**2).sum(dim=1, keepdim=True) + 1 / eta**2)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-7)
        plain = w - lr * grads[n]
        assert not torch.allclose(p.detach(), plain, atol=1e-6)  # the step is not plain LoRA's


def test_zero_rows_take_the_largest_step():
    """A zero row (B at init) moves η× its plain step; any grown row moves less."""
    eta = 3.0
    model = _tiny(eta=eta)
    layer = rw.adapter_layers(model)[0][1]
    c = row_coefficients(layer.lora_B, eta).squeeze(1)
    assert c[0] == pytest.approx(eta)
    assert bool((c[1:] < eta).all())
    assert torch.argmax(c) == 0
    # over columns instead of rows the coefficients differ (B is 5×2: 2 column norms)
    assert c.shape[0] == layer.lora_B.shape[0]


def test_no_scaling_and_no_dropout():
    model = _tiny()
    for _, layer in rw.adapter_layers(model):
        assert layer.scale == 1.0
        assert isinstance(layer.dropout, nn.Identity)
        torch.testing.assert_close(layer.delta_weight(), layer.lora_B @ layer.lora_A)
    for bad in ({"alpha": 16}, {"dropout": 0.1}, {"eta": 0}, {"use_rslora": True}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            rw.adapt(nn.Sequential(nn.Linear(4, 4)), "allora", targets=["0"], r=2, **bad)


def test_the_loop_attaches_the_scaling():
    """rw.adapt(model, 'allora') + train: each row's step equals the SGD formula without passing a callback."""
    model = make_tiny_bert()
    rw.adapt(model, "allora", r=2, eta=1.5, trainable=None)
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0  # the same gradient in train mode as below
    data = cls_batches(n=1)
    layer = rw.adapter_layers(model)[-1][1]
    b0 = layer.lora_B.detach().clone()  # zero at init: A gets no gradient in step 1, B does
    model.train()
    model.zero_grad()
    model(**data[0]).loss.backward()
    g = layer.lora_B.grad.clone()
    assert g.abs().sum() > 0
    model.zero_grad()
    cfg = TrainConfig.plain(1)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    train(model, data, config=cfg, optimizer=opt)
    expected = b0 - 0.5 * g / torch.sqrt((b0**2).sum(1, keepdim=True) + 1 / 1.5**2)  # = −0.5·1.5·g
    assert g.abs().max() > 1e-3
    torch.testing.assert_close(layer.lora_B.detach(), expected, rtol=1e-4, atol=1e-7)
