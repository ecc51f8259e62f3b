"""SORSA (Cao 2024): trainable U_p, σ_p, V_pᵀ of the top-r SVD of W₀ over the frozen residual, with the
orthonormal regulariser γ·(‖U_pᵀU_p − I‖_F + ‖V_pᵀV_p − I‖_F) added to the gradient."""

from __future__ import annotations

import copy

import pytest
import torch

import rankwise as rw
from rankwise.adapters.sorsa import SORSARegularizer, orthonormal_loss, sorsa_layers
from rankwise.targets import find_targets
from rankwise.train import TrainConfig, train

from ..conftest import lm_batches, make_tiny_llama


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in find_targets(model, "all-linear")}


def test_init_is_the_svd_split_and_starts_at_the_base():
    base, data = make_tiny_llama(), lm_batches(n=1)
    w0 = _weights(base)
    model = rw.adapt(copy.deepcopy(base), "sorsa", r=4, alpha=8)
    for name, layer in rw.adapter_layers(model):
        u, s, vh = torch.linalg.svd(w0[name], full_matrices=False)
        torch.testing.assert_close(layer.sorsa_S.detach(), s[:4])
        torch.testing.assert_close((layer.sorsa_B.T @ u[:, :4]).abs(), torch.eye(4), atol=1e-5, rtol=0)
        torch.testing.assert_close((layer.sorsa_A @ vh[:4].T).abs(), torch.eye(4), atol=1e-5, rtol=0)
        # W_res = W₀ − s·U_p diag(σ_p) V_pᵀ (s = α/r = 2)
        torch.testing.assert_close(layer.base_layer.weight, w0[name] - 2.0 * (u[:, :4] * s[:4]) @ vh[:4], atol=1e-5,
                                   rtol=0)
        assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"sorsa_A", "sorsa_S", "sorsa_B"}
    with torch.no_grad():
        torch.testing.assert_close(model(**data[0]).logits, base(**data[0]).logits, atol=1e-5, rtol=0)


def test_regularizer_gradient_is_exact():
    """γ·∇L_reg added to the grads equals the closed form γ·2·U(UᵀU − I)/‖UᵀU − I‖_F / (2L) (and for A)."""
    model = rw.adapt(make_tiny_llama(), "sorsa", r=3, gamma=0.5)
    layers = sorsa_layers(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in layers:
            layer.sorsa_A.add_(torch.randn(layer.sorsa_A.shape, generator=g) * 0.1)
            layer.sorsa_B.add_(torch.randn(layer.sorsa_B.shape, generator=g) * 0.1)
    loss = SORSARegularizer(model).regularize()
    eye = torch.eye(3)
    expected_loss = 0.0
    for layer in layers:
        b, a = layer.sorsa_B.detach(), layer.sorsa_A.detach()
        eb, ea = b.T @ b - eye, a @ a.T - eye
        expected_loss += float(eb.norm() + ea.norm())
        torch.testing.assert_close(layer.sorsa_B.grad, 0.5 * 2 * b @ eb / eb.norm() / (2 * len(layers)))
        torch.testing.assert_close(layer.sorsa_A.grad, 0.5 * 2 * ea @ a / ea.norm() / (2 * len(layers)))
        assert layer.sorsa_S.grad is None  # σ_p is not regularised
    assert loss == pytest.approx(expected_loss / (2 * len(layers)), rel=1e-5)
    assert float(orthonormal_loss(model)) == pytest.approx(loss, rel=1e-6)


def _drift(gamma: float, steps: int = 40) -> float:
    torch.manual_seed(0)
    base, data = make_tiny_llama(), lm_batches(n=4)
    model = rw.adapt(base, "sorsa", r=4, gamma=gamma)
    cfg = TrainConfig(lr=3e-2, max_steps=steps, device=None, progress=False, measure_memory=False,
                         max_grad_norm=None, seed=0)
    train(model, data, config=cfg)
    return float(orthonormal_loss(model))


def test_orthonormality_is_kept_by_the_regularizer_and_drifts_without():
    free, kept = _drift(0.0), _drift(0.5)
    assert free > 0.02  # training the factors alone moves them off the Stiefel manifold
    assert kept < 0.5 * free


def test_round_trip_merge_and_peft_export(tmp_path):
    from peft import PeftModel

    base, data = make_tiny_llama(), lm_batches(n=2)
    model = rw.adapt(copy.deepcopy(base), "sorsa", r=2, alpha=4)
    with torch.no_grad():
        for layer in sorsa_layers(model):
            layer.sorsa_S.mul_(1.5)
            layer.sorsa_A.add_(0.05)
        expected = model(**data[0]).logits
    rw.save_adapter(model, tmp_path / "a")
    fresh = rw.load_adapter(copy.deepcopy(base), tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(fresh(**data[0]).logits, expected, atol=1e-5, rtol=0)
    rw.export_peft(model, tmp_path / "peft")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**data[0]).logits, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize(("options", "message"), [
    ({"gamma": -1.0}, "gamma=-1.0 must be a number >= 0"),
    ({"alpha": 0}, "alpha=0 must be a positive number"),
])
def test_bad_options(options, message):
    with pytest.raises(ValueError) as err:
        rw.adapt(make_tiny_llama(), "sorsa", r=2, **options)
    assert message in str(err.value)
