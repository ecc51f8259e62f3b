"""DoRA: the faithful property (magnitude = row norm, detached norm in backward), parity with PEFT 0.21.2."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
import torch.nn.functional as F

import rankwise as rw

from ..conftest import lm_batches, make_tiny_llama
from .peft_pairs import TARGETS, _close, _loss_and_grads, _pair, _peft_layer, _train


def test_dora_init_magnitude_is_row_norm_and_output_is_base():
    base = make_tiny_llama(0)
    model = rw.adapt(copy.deepcopy(base), "dora", r=4)
    batch = lm_batches()[0]
    for _, layer in rw.adapter_layers(model):
        _close(layer.magnitude, torch.linalg.norm(layer.base_layer.weight, dim=1), atol=1e-6, rtol=0)
        assert layer.factors() is None
        assert layer.trainable_count() == 4 * (layer.in_features + layer.out_features) + layer.out_features
    _close(model(**batch).logits, base(**batch).logits, atol=1e-5)


def test_dora_merged_row_norms_equal_magnitude_after_training():
    model = rw.adapt(make_tiny_llama(0), "dora", r=4, alpha=8)
    frozen = {n: l.base_layer.weight.clone() for n, l in rw.adapter_layers(model)}
    _train(model, steps=4)
    assert any(l.lora_B.abs().max() > 0 for _, l in rw.adapter_layers(model))
    batch = lm_batches(seed=5)[0]
    expected = model(**batch).logits
    rw.merge(model)
    for name, layer in rw.adapter_layers(model):
        merged = layer.base_layer.weight
        assert not torch.allclose(layer.magnitude, torch.linalg.norm(frozen[name], dim=1), atol=1e-4)
        _close(torch.linalg.norm(merged, dim=1), layer.magnitude.detach(), atol=1e-5, rtol=0)
    _close(model(**batch).logits, expected, atol=1e-4)
    rw.unmerge(model)
    for name, layer in rw.adapter_layers(model):
        _close(layer.base_layer.weight, frozen[name], atol=1e-5)


def test_dora_norm_is_detached_in_backward():
    """Gradients equal those of m/n·(W₀+sBA)x with n a constant, and differ from a differentiated norm."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(24, 16)
    model = torch.nn.Sequential(lin)
    rw.adapt(model, "dora", targets=["0"], r=4, alpha=8, trainable=None)
    layer = model[0]
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)
        layer.magnitude.mul_(1.5)
        layer.magnitude[3] = 0.0  # a zero magnitude: its gradient cannot come from the (zero) output row
    x = torch.randn(5, 7, 24, requires_grad=True)
    weight_out = torch.randn(5, 7, 16)
    (layer(x) * weight_out).sum().backward()
    ours = [layer.lora_A.grad, layer.lora_B.grad, layer.magnitude.grad, x.grad]

    def reference(detach: bool):
        a = layer.lora_A.detach().clone().requires_grad_(True)
        b = layer.lora_B.detach().clone().requires_grad_(True)
        m = layer.magnitude.detach().clone().requires_grad_(True)
        xr = x.detach().clone().requires_grad_(True)
        v = lin.weight + layer.scale * b @ a
        n = torch.linalg.norm(v, dim=1)
        n = n.detach() if detach else n
        y = F.linear(xr, (m / n).unsqueeze(1) * v, lin.bias)
        (y * weight_out).sum().backward()
        return [a.grad, b.grad, m.grad, xr.grad]

    for got, want in zip(ours, reference(detach=True), strict=True):
        _close(got, want, atol=1e-5)
    differentiated = reference(detach=False)
    assert not torch.allclose(ours[0], differentiated[0], atol=1e-4)  # the property is discriminating


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_dora_matches_peft_outputs_and_gradients(dropout):
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True, lora_dropout=dropout)
    pm, mine = _pair(cfg, "dora", r=4, alpha=8, dropout=dropout)
    g = torch.Generator().manual_seed(3)
    pairs = []
    with torch.no_grad():
        for name, layer in rw.adapter_layers(mine):
            pl = _peft_layer(pm, name)
            pa, pb = pl.lora_A["default"].weight, pl.lora_B["default"].weight
            pmag = pl.lora_magnitude_vector["default"].weight
            pb.copy_(torch.randn(pb.shape, generator=g) * 0.1)
            pmag.mul_(1 + 0.1 * torch.randn(pmag.shape, generator=g))
            layer.lora_A.copy_(pa)
            layer.lora_B.copy_(pb)
            layer.magnitude.copy_(pmag)
            pairs += [(layer.lora_A, pa), (layer.lora_B, pb), (layer.magnitude, pmag)]
    batch = lm_batches()[0]
    if dropout:
        pm.train(), mine.train()
    torch.manual_seed(11)
    loss_p, grads_p = _loss_and_grads(pm, batch, [p for _, p in pairs])
    torch.manual_seed(11)
    loss_m, grads_m = _loss_and_grads(mine, batch, [p for p, _ in pairs])
    _close(loss_m, loss_p, atol=1e-5)
    for gm, gp in zip(grads_m, grads_p, strict=True):
        _close(gm, gp, atol=1e-6)
    pm.eval(), mine.eval()
    _close(mine(**batch).logits, pm(**batch).logits, atol=1e-5)
