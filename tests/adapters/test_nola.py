"""NOLA: the trainable count is the number of coefficients, the bases regenerate from the seed (a saved
adapter holds only the coefficients), gradients reach only the coefficients, and A, B are the
linear combinations of the paper."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import rankwise as rw
from rankwise.adapters.init import InitContext
from rankwise.adapters.nola import NOLAConfig, NOLALayer, nola_bases

from ..conftest import lm_batches, make_tiny_llama


def _layer(k: int = 24, d: int = 40, **config) -> NOLALayer:
    return NOLALayer(nn.Linear(k, d, bias=False), NOLAConfig(**config), InitContext(name="blocks.0.q"))


@pytest.mark.parametrize("shape", [(24, 40, 2), (64, 16, 8), (128, 128, 1)])
def test_trainable_count_is_the_number_of_coefficients(shape):
    k, d, r = shape
    layer = _layer(k, d, r=r, num_basis_A=37, num_basis_B=11)
    trainable = {n: p for n, p in layer.named_parameters() if p.requires_grad}
    assert sorted(trainable) == ["nola_alpha", "nola_beta"]
    assert layer.trainable_count() == 48 == sum(p.numel() for p in trainable.values())


def test_a_and_b_are_linear_combinations_of_the_seeded_bases():
    layer = _layer(r=3, num_basis_A=5, num_basis_B=7, alpha=6.0, seed=4)
    a0, basis_a, basis_b = nola_bases(4, "blocks.0.q", 3, 24, 40, 5, 7)
    assert torch.equal(layer.nola_A0, a0) and torch.equal(layer.nola_basis_A, basis_a)
    assert torch.equal(layer.nola_basis_B, basis_b)
    for basis, count in ((basis_a, 5), (basis_b, 7)):  # entries U(−1, 1)/√(number of bases)
        assert 0.9 / count**0.5 < basis.abs().max() <= 1 / count**0.5
    with torch.no_grad():
        layer.nola_alpha.normal_()
        layer.nola_beta.normal_()
    a = a0 + sum(layer.nola_alpha[i] * basis_a[i] for i in range(5))
    b = sum(layer.nola_beta[j] * basis_b[j] for j in range(7))
    torch.testing.assert_close(layer.delta_weight(), (b @ a) * 2.0, atol=1e-6, rtol=1e-6)
    x = torch.randn(4, 24)
    torch.testing.assert_close(layer(x), x @ (layer.base_weight + layer.delta_weight()).t(), atol=1e-5, rtol=1e-5)


def test_gradient_reaches_only_the_coefficients_and_is_the_projection_on_the_bases():
    layer = _layer(r=2, num_basis_A=6, num_basis_B=4)
    with torch.no_grad():
        layer.nola_beta.normal_()
    x = torch.randn(8, 24)
    layer(x).square().sum().backward()
    assert [n for n, p in layer.named_parameters() if p.grad is not None] == ["nola_alpha", "nola_beta"]
    assert all(not t.requires_grad for t in layer.buffers())
    # dL/dαᵢ = ⟨dL/dA, Aᵢ⟩ and dL/dβⱼ = ⟨dL/dB, Bⱼ⟩, from a dense copy of the factors
    b, a, s = (t.detach().clone().requires_grad_(True) if torch.is_tensor(t) else t for t in layer.factors())
    (x @ (layer.base_weight + s * b @ a).t()).square().sum().backward()
    torch.testing.assert_close(layer.nola_alpha.grad, torch.einsum("ri,kri->k", a.grad, layer.nola_basis_A),
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.nola_beta.grad, torch.einsum("or,lor->l", b.grad, layer.nola_basis_B),
                               rtol=1e-4, atol=1e-5)


def test_at_init_delta_is_zero_and_b_coefficients_get_a_gradient():
    layer = _layer(r=2, num_basis_A=6, num_basis_B=4)
    assert torch.count_nonzero(layer.delta_weight()) == 0
    layer(torch.randn(8, 24)).sum().backward()
    assert layer.nola_beta.grad.abs().max() > 0  # through the frozen A₀, so training starts
    assert torch.count_nonzero(layer.nola_alpha.grad) == 0  # B = 0


def test_save_holds_only_coefficients_and_the_seed_and_bases_regenerate(tmp_path):
    model = rw.adapt(make_tiny_llama(0), "nola", r=4, num_basis_A=16, num_basis_B=8, seed=3)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for batch in lm_batches(n=2):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    batch = lm_batches(seed=7)[0]
    expected = model(**batch).logits
    rw.save_adapter(model, tmp_path / "nola")
    tensors = load_file(tmp_path / "nola" / "rankwise_adapter.safetensors")
    assert {k.rsplit(".", 1)[-1] for k in tensors} == {"nola_alpha", "nola_beta"}
    assert json.loads((tmp_path / "nola" / "rankwise_adapter.json").read_text())["config"]["seed"] == 3
    fresh = rw.load_adapter(make_tiny_llama(0), tmp_path / "nola")
    torch.testing.assert_close(fresh(**batch).logits, expected, atol=1e-6, rtol=0)
    for (name, a), (_, b) in zip(rw.adapter_layers(model), rw.adapter_layers(fresh), strict=True):
        for t in ("nola_A0", "nola_basis_A", "nola_basis_B"):  # bit for bit
            assert torch.equal(getattr(a, t), getattr(b, t)), (name, t)
    layers = dict(rw.adapter_layers(model))
    q0, q1 = layers["model.layers.0.self_attn.q_proj"], layers["model.layers.1.self_attn.q_proj"]
    assert not torch.equal(q0.nola_basis_A, q1.nola_basis_A)  # each layer its own bases
    other = dict(rw.adapter_layers(rw.adapt(make_tiny_llama(0), "nola", r=4, num_basis_A=16, num_basis_B=8, seed=4)))
    assert not torch.equal(other["model.layers.0.self_attn.q_proj"].nola_basis_A, q0.nola_basis_A)
