"""LoRA-GGPO (Chang et al. 2025): training forwards run at W' + ε, ε_i = (σ‖W'_i‖ + β‖G_i‖²)/√n · z_i."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.adapters.lora_ggpo import GGPOPerturbation, draw_perturbation, row_std, step_generator
from rankwise.train import TrainConfig, train

from ..conftest import cls_batches, make_tiny_bert


def _tiny(method: str = "lora_ggpo", **options):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    rw.adapt(model, method, targets=["0", "2"], r=2, trainable=None, **options)
    with torch.no_grad():
        for _, layer in rw.adapter_layers(model):
            layer.lora_B.normal_()  # a non-zero ΔW, so W' ≠ W₀
    return model


def _lora_params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _run(method: str, steps: int = 3, **options):
    model = make_tiny_bert()
    rw.adapt(model, method, r=2, **options)
    train(model, cls_batches(n=steps), config=TrainConfig(max_steps=steps, lr=1e-2, progress=False,
                                                         measure_memory=False))
    return model


def test_scale_zero_is_lora_step_for_step():
    ggpo = _run("lora_ggpo", ggpo_sigma=0.0, ggpo_beta=0.0)
    lora = _run("lora")
    for (n, a), (_, b) in zip(rw.adapter_layers(ggpo), rw.adapter_layers(lora), strict=True):
        assert torch.equal(a.lora_A, b.lora_A) and torch.equal(a.lora_B, b.lora_B), n
    # σ > 0 trains differently, through the callback the loop attached by itself
    moved = _run("lora_ggpo", ggpo_sigma=0.5, ggpo_beta=0.5)
    assert any(not torch.equal(a.lora_B, b.lora_B)
               for (_, a), (_, b) in zip(rw.adapter_layers(moved), rw.adapter_layers(lora), strict=True))


def test_row_std_is_the_formula():
    """std_i = (σ‖W'_i‖ + β‖G_i‖²)/√n: the weight norm enters linearly, the gradient norm squared, both with +."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 9, generator=g)
    grad_sq = torch.rand(4, generator=g) * 5
    sigma, beta = 0.3, 2.0
    expected = (sigma * w.norm(dim=1) + beta * grad_sq) / 3
    torch.testing.assert_close(row_std(w, grad_sq, sigma, beta), expected)
    # ×3 weight rows (no gradient term): ×3 std; ×2 gradient (grad_sq ×4, no weight term): ×4 std
    torch.testing.assert_close(row_std(3 * w, grad_sq, sigma, 0.0), 3 * row_std(w, grad_sq, sigma, 0.0))
    torch.testing.assert_close(row_std(w, 4 * grad_sq, 0.0, beta), 4 * row_std(w, grad_sq, 0.0, beta))
    # ε = std ⊙ z, z standard normal from the generator
    eps = draw_perturbation(w, grad_sq, sigma, beta, torch.Generator().manual_seed(5))
    z = torch.randn(w.shape, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(eps, expected[:, None] * z)


def test_perturbation_uses_the_layers_weight_and_gradient():
    """The callback's ε is built from W' = W₀ + sBA and G = s(g_B·A + B·g_A) of the last backward."""
    model = _tiny(ggpo_sigma=0.2, ggpo_beta=3.0)
    cb = GGPOPerturbation(model)
    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(1))
    model(x).pow(2).sum().backward()
    cb.record()
    cb.perturb()
    for name, layer in rw.adapter_layers(model):
        w = layer.base_weight.detach() + layer.scale * layer.lora_B.detach() @ layer.lora_A.detach()
        g = layer.scale * (layer.lora_B.grad @ layer.lora_A.detach() + layer.lora_B.detach() @ layer.lora_A.grad)
        std = (0.2 * w.norm(dim=1) + 3.0 * (g**2).sum(1)) / w.shape[1] ** 0.5
        z = torch.randn(w.shape, generator=step_generator(layer.config.seed, 0, name))
        torch.testing.assert_close(layer.perturbation, std[:, None] * z)


def test_gradient_at_the_perturbed_point_and_parameters_restored():
    """One SGD step: the factors' gradient is the one at W' + ε, the stored factors after the step are the
    unperturbed ones minus lr·that gradient (ε never enters a parameter), and eval runs without ε."""
    lr = 0.1
    model = _tiny(ggpo_sigma=0.3, ggpo_beta=0.1)
    cb = GGPOPerturbation(model)
    cb.perturb()
    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(2))
    before = _lora_params(model)
    eps = {n: layer.perturbation.clone() for n, layer in rw.adapter_layers(model)}

    # reference: plain LoRA whose frozen bases are W₀ + ε
    ref = _tiny("lora")
    with torch.no_grad():
        for (n, layer), (_, mine) in zip(rw.adapter_layers(ref), rw.adapter_layers(model), strict=True):
            layer.lora_A.copy_(mine.lora_A)
            layer.lora_B.copy_(mine.lora_B)
            layer._set_base_weight(mine.base_weight + eps[n])
    ref(x).pow(2).sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters() if p.requires_grad}

    model.train()
    loss = model(x).pow(2).sum()
    loss.backward()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, ref_grads[n])
    opt.step()
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.detach(), before[n] - lr * ref_grads[n])
    for _, layer in rw.adapter_layers(model):
        assert torch.equal(layer.base_weight, _tiny("lora").get_submodule(_).base_weight)
    model.eval()
    plain = _tiny("lora")
    with torch.no_grad():
        for (_, layer), (_, mine) in zip(rw.adapter_layers(plain), rw.adapter_layers(model), strict=True):
            layer.lora_A.copy_(mine.lora_A)
            layer.lora_B.copy_(mine.lora_B)
    torch.testing.assert_close(model(x), plain.eval()(x))


def test_options_are_checked():
    for bad in ({"ggpo_sigma": -1}, {"ggpo_beta": float("nan")}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            rw.adapt(nn.Sequential(nn.Linear(4, 4)), "lora_ggpo", targets=["0"], r=2, **bad)
    with pytest.raises(ValueError, match="LoRA-GGPO"):
        GGPOPerturbation(_tiny("lora"))
