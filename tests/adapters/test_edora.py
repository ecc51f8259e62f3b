"""EDoRA: B, A are the frozen truncated SVD of W₀ (B = U_r, A = Σ_r V_rᵀ), only the r×r R and the magnitude
train, the forward is m ⊙ (W₀ + sBRA)/‖W₀ + sBRA‖_c with the norm constant in backward, and after
training B, A are unchanged while the merged weight's row norms equal the learned magnitude."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.adapters.edora import EDoRAConfig, EDoRALayer
from rankwise.adapters.init import InitContext
from rankwise.train import TrainConfig, train

from ..conftest import lm_batches, make_tiny_llama


def _layer(**config) -> tuple[nn.Linear, EDoRALayer]:
    torch.manual_seed(0)
    base = nn.Linear(24, 16, bias=True)
    return base, EDoRALayer(base, EDoRAConfig(**config), InitContext(name="q"))


def test_frozen_svd_factors_and_trainable_set():
    base, layer = _layer(r=3, alpha=6.0)
    w0 = base.weight.detach()
    u, s, vh = torch.linalg.svd(w0, full_matrices=False)
    best = u[:, :3] @ torch.diag(s[:3]) @ vh[:3]
    torch.testing.assert_close(layer.frozen_B @ layer.frozen_A, best, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.frozen_B.t() @ layer.frozen_B, torch.eye(3), atol=1e-5, rtol=0)
    assert sorted(n for n, p in layer.named_parameters() if p.requires_grad) == ["core", "magnitude"]
    assert layer.trainable_count() == 9 + 16 == sum(p.numel() for p in layer.parameters() if p.requires_grad)


def test_forward_and_gradient_are_dora_over_b_r_a():
    base, layer = _layer(r=3, alpha=6.0)
    with torch.no_grad():
        layer.core.normal_()
        layer.magnitude.mul_(torch.linspace(0.5, 1.5, 16))
    x = torch.randn(7, 24)
    layer(x).square().sum().backward()
    core = layer.core.detach().clone().requires_grad_(True)
    m = layer.magnitude.detach().clone().requires_grad_(True)
    v = base.weight.detach() + 2.0 * layer.frozen_B @ core @ layer.frozen_A
    w = m.unsqueeze(1) * v / v.norm(dim=1, keepdim=True).detach()  # the row norm is a constant in backward
    ref = x @ w.t() + base.bias.detach()
    ref.square().sum().backward()
    torch.testing.assert_close(layer(x), ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(layer.core.grad, core.grad, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(layer.magnitude.grad, m.grad, atol=1e-3, rtol=1e-4)


def test_after_training_factors_are_unchanged_and_row_norms_are_the_magnitude():
    model = make_tiny_llama()
    rw.adapt(model, "edora", r=2, trainable=None)
    layers = [layer for _, layer in rw.adapter_layers(model)]
    before = [(layer.frozen_B.clone(), layer.frozen_A.clone(), layer.core.detach().clone(),
               layer.magnitude.detach().clone()) for layer in layers]
    train(model, lm_batches(n=6), config=TrainConfig.plain(6), optimizer=torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-2))
    for layer, (b, a, core, m) in zip(layers, before, strict=True):
        assert torch.equal(layer.frozen_B, b) and torch.equal(layer.frozen_A, a)
        assert not torch.equal(layer.core, core) and not torch.equal(layer.magnitude, m)
        merged = layer.base_weight + layer.delta_weight()
        torch.testing.assert_close(merged.norm(dim=1), layer.magnitude.detach(), atol=1e-5, rtol=1e-5)
        layer.merge()
        torch.testing.assert_close(layer.base_weight.norm(dim=1), layer.magnitude.detach(), atol=1e-5, rtol=1e-5)
        layer.unmerge()



@pytest.mark.parametrize("bad", [{"alpha": -1.0}, {"init_std": -1.0}])
def test_bad_options_name_the_parameter(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        EDoRAConfig(**bad)
