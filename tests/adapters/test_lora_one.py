"""LoRA-One (Zhang, Liu & Chen 2025): spectral init from the one-step full gradient."""

from __future__ import annotations

import copy

import pytest
import torch

import rankwise as rw
from rankwise.adapters.gradients import estimate_gradients
from rankwise.adapters.init import InitContext, lora_ga_init, lora_one_init
from rankwise.targets import find_targets

from ..conftest import lm_batches, make_tiny_llama


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in find_targets(model, "all-linear")}


def test_init_is_normalized_best_rank_r_step_of_minus_g():
    """B₀A₀ = U_r S_r V_rᵀ/(γ·s₁) of −G, computed here from the SVD of −G; S split evenly (BᵀB = AAᵀ)."""
    base, data = make_tiny_llama(), lm_batches(n=2)
    names = [n for n, _ in find_targets(base, "all-linear")]
    grads = estimate_gradients(copy.deepcopy(base), names, data)
    w0 = _weights(base)
    model = rw.adapt(copy.deepcopy(base), "lora_one", r=3, init_data=data, stable_gamma=8.0, trainable=None)
    for name, layer in rw.adapter_layers(model):
        u, s, vh = torch.linalg.svd(-grads[name], full_matrices=False)
        expected = (u[:, :3] * s[:3]) @ vh[:3] / (8.0 * s[0])
        torch.testing.assert_close(layer.lora_B @ layer.lora_A, expected, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(layer.lora_B.T @ layer.lora_B, layer.lora_A @ layer.lora_A.T, atol=1e-6, rtol=1e-4)
        # the base is not offset: the model starts one normalized rank-r gradient step from W₀
        torch.testing.assert_close(layer.base_layer.weight, w0[name])
        torch.testing.assert_close(layer.delta_weight(), layer.scale * expected, atol=1e-6, rtol=1e-4)


def test_span_b_is_the_top_left_subspace_of_minus_g_and_differs_from_lora_ga():
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(12, 12, generator=g))
    v, _ = torch.linalg.qr(torch.randn(10, 10, generator=g))
    grad = -(u[:, :10] * torch.arange(10, 0, -1).float()) @ v.T  # −G has singular values 10, 9, ..., 1
    one = lora_one_init(torch.zeros(12, 10), InitContext(name="w", grad=grad, r=2))
    # principal angles 0: span(B) = span(U_{:, :2}) and B₀A₀ points along −G (not +G)
    assert torch.linalg.svdvals(u[:, :2].T @ torch.linalg.qr(one.left)[0]).min() > 1 - 1e-5
    torch.testing.assert_close(one.left @ one.right, (u[:, :2] * torch.tensor([10.0, 9.0])) @ v[:, :2].T / (128 * 10))
    ga = lora_ga_init(torch.zeros(12, 10), InitContext(name="w", grad=grad, r=2))
    assert torch.linalg.svdvals(u[:, :2].T @ ga.left).max() < 1e-5  # LoRA-GA's B lies in U_{:, 2:4}


def test_first_forward_moves_loss_down_and_round_trips(tmp_path):
    base, data = make_tiny_llama(), lm_batches(n=2)
    model = rw.adapt(copy.deepcopy(base), "lora_one", r=2, init_data=data, stable_gamma=1.0, alpha=64)
    with torch.no_grad():
        before = sum(float(base(**b).loss) for b in data)
        after = sum(float(model(**b).loss) for b in data)
    assert after < before  # a step along −G on the init batches lowers their loss
    rw.save_adapter(model, tmp_path / "a")
    fresh = rw.load_adapter(copy.deepcopy(base), tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(fresh(**data[0]).logits, model(**data[0]).logits)


@pytest.mark.parametrize(("options", "message"), [
    ({"stable_gamma": 0}, "stable_gamma=0 must be a positive number"),
])
def test_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        rw.adapt(make_tiny_llama(), "lora_one", r=2, init_data=lm_batches(n=1), **options)


def test_needs_data():
    with pytest.raises(ValueError, match="needs init_data"):
        rw.adapt(make_tiny_llama(), "lora_one", r=2)
