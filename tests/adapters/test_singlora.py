"""SingLoRA: ΔW = (α/r)·u(t)·A A*ᵀ, symmetric of rank ≤ r on a square layer, the top-left block of A Aᵀ on a
non-square one, and the ramp u(t) = min(t/T, 1) over the training forward passes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.adapters.init import InitContext
from rankwise.adapters.singlora import SingLoRAConfig, SingLoRALayer

from ..conftest import lm_batches, make_tiny_llama


def _layer(k: int, d: int, **config) -> SingLoRALayer:
    return SingLoRALayer(nn.Linear(k, d, bias=False).eval(), SingLoRAConfig(**config), InitContext(name="w"))


def test_square_delta_is_symmetric_of_rank_at_most_r():
    layer = _layer(48, 48, r=4, alpha=8.0, ramp_steps=10)
    layer.finish_warmup()
    delta = layer.delta_weight()
    torch.testing.assert_close(delta, delta.t(), atol=0, rtol=0)
    a = layer.singlora_A
    torch.testing.assert_close(delta, 2.0 * a @ a.t(), atol=1e-6, rtol=1e-6)
    assert int(torch.linalg.matrix_rank(delta)) == 4
    assert layer.trainable_count() == 48 * 4 == sum(p.numel() for p in layer.parameters() if p.requires_grad)
    x = torch.randn(3, 48)
    torch.testing.assert_close(layer(x), x @ (layer.base_weight + delta).t(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(32, 80), (80, 32)], ids=["out>in", "in>out"])
def test_non_square_delta_is_a_times_its_truncation(shape):
    k, d = shape
    layer = _layer(k, d, r=3, ramp_steps=1)
    layer.finish_warmup()
    a = layer.singlora_A  # max(d, k) × r
    assert a.shape == (80, 3) and layer.trainable_count() == 240
    full = a @ a.t()
    torch.testing.assert_close(layer.delta_weight(), full[:d, :k], atol=1e-6, rtol=1e-6)
    short = a[: min(d, k)]  # A*: the first min(d, k) rows
    expected = a @ short.t() if d > k else short @ a.t()
    torch.testing.assert_close(layer.delta_weight(), expected, atol=1e-6, rtol=1e-6)


def test_ramp_follows_min_t_over_T_in_training_forward_passes():
    T = 4
    layer = _layer(16, 16, r=2, alpha=2.0, ramp_steps=T)
    full = layer.singlora_A @ layer.singlora_A.t()
    x = torch.randn(2, 16)
    assert torch.count_nonzero(layer.delta_weight()) == 0  # u(0) = 0: the base model at init
    layer(x)  # eval passes do not advance t
    assert int(layer.singlora_step) == 0
    layer.train()
    for t in range(1, 8):
        out = layer(x)  # t advances before the pass uses it: the first training pass has u = 1/T
        u = min(t / T, 1.0)
        assert int(layer.singlora_step) == t
        torch.testing.assert_close(layer.delta_weight(), u * full, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(out, x @ (layer.base_weight + u * full).t(), atol=1e-5, rtol=1e-5)


def test_first_training_step_trains_and_the_step_count_is_saved(tmp_path):
    model = rw.adapt(make_tiny_llama(0), "singlora", r=4, ramp_steps=3)
    a0 = {n: l.singlora_A.detach().clone() for n, l in rw.adapter_layers(model)}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for batch in lm_batches(n=2):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    for name, layer in rw.adapter_layers(model):
        assert int(layer.singlora_step) == 2 and not torch.equal(layer.singlora_A, a0[name])
    batch = lm_batches(seed=7)[0]
    expected = model(**batch).logits
    rw.save_adapter(model, tmp_path / "sing")
    fresh = rw.load_adapter(make_tiny_llama(0), tmp_path / "sing")
    assert all(int(layer.singlora_step) == 2 for _, layer in rw.adapter_layers(fresh))
    torch.testing.assert_close(fresh(**batch).logits, expected, atol=1e-6, rtol=0)


def test_bad_ramp_steps():
    with pytest.raises(ValueError, match="ramp_steps"):
        SingLoRAConfig(ramp_steps=0)


def test_ramp_advances_beside_another_named_adapter():
    """In a stack of named adapters (the AdapterStack path) the delta still advances t and trains A."""
    model = rw.adapt(make_tiny_llama(0), "lora", r=2, name="a")
    rw.adapt(model, "singlora", r=2, ramp_steps=2, name="b")
    rw.set_active(model, ["a", "b"])
    model.train()
    model(**lm_batches(n=1)[0]).loss.backward()
    for _, layer in rw.adapter_layers(model, "b"):
        assert int(layer.singlora_step) == 1 and layer.singlora_A.grad.abs().max() > 0
