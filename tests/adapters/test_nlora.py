"""SLoRA / NLoRA / IntTune (Guo, Chang & Wu 2025): ΔW = s·B·M·A with an r×r intermediate M; NLoRA starts
B, M, A at the Nyström partition of W₀ (C, W₀[I, J] or W₀[I, J]⁺, R); IntTune trains only M."""

from __future__ import annotations

import copy

import pytest
import torch

import rankwise as rw
from rankwise.train import TrainConfig, train

from ..conftest import lm_batches, make_tiny_llama
from .peft_pairs import check_round_trip

LAYER = "model.layers.0.mlp.gate_proj"  # 64 x 32


def _model_with(weight: torch.Tensor | None = None):
    base = make_tiny_llama()
    if weight is not None:
        with torch.no_grad():
            base.get_submodule(LAYER).weight.copy_(weight)
    return base


def _layer(model):
    return model.get_submodule(LAYER)


def test_pinv_core_is_the_nystrom_approximation_and_interpolates_w0():
    w0 = _model_with().get_submodule(LAYER).weight.detach().clone()
    layer = _layer(rw.adapt(_model_with(), "nlora", r=4, alpha=8, core_init="pinv"))  # s = 2
    torch.testing.assert_close(layer.nlora_B, w0[:, :4])
    torch.testing.assert_close(layer.nlora_A, w0[:4, :])
    nystrom = w0[:, :4] @ torch.linalg.pinv(w0[:4, :4]) @ w0[:4, :]
    approx = layer.delta_weight()
    torch.testing.assert_close(approx, nystrom, atol=1e-4, rtol=1e-4)
    # C·W₁₁⁺·R reproduces the sampled columns and rows of W₀ exactly (W₁₁ is invertible here)
    torch.testing.assert_close(approx[:, :4], w0[:, :4], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(approx[:4, :], w0[:4, :], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(layer.base_layer.weight, w0 - nystrom, atol=1e-4, rtol=1e-4)


def test_pinv_core_recovers_a_weight_whose_rank_the_corner_carries_even_when_the_corner_is_singular():
    """rank W₀ = 2 < r = 4: W₀[:4, :4] is singular, its pseudo-inverse still gives C·W₁₁⁺·R = W₀ exactly."""
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(64, 2, generator=g) @ torch.randn(2, 32, generator=g)
    layer = _layer(rw.adapt(_model_with(w0), "nlora", r=4, core_init="pinv", sampling="uniform"))
    torch.testing.assert_close(layer.delta_weight(), w0, atol=1e-4, rtol=1e-4)
    assert float(layer.base_layer.weight.abs().max()) < 1e-4


@pytest.mark.parametrize("sampling", ["first", "uniform"])
def test_factors_are_sampled_columns_and_rows_of_w0(sampling):
    w0 = _model_with().get_submodule(LAYER).weight.detach().clone()
    layer = _layer(rw.adapt(_model_with(), "nlora", r=4, sampling=sampling, seed=3))
    cols = [j for k in range(4) for j in range(32) if torch.equal(layer.nlora_B[:, k], w0[:, j])]
    rows = [i for k in range(4) for i in range(64) if torch.equal(layer.nlora_A[k], w0[i])]
    assert len(set(cols)) == len(set(rows)) == 4 and cols == sorted(cols) and rows == sorted(rows)
    assert (cols == [0, 1, 2, 3]) == (sampling == "first")
    torch.testing.assert_close(layer.nlora_M, w0[rows][:, cols])  # default core_init: the intersection itself


def test_official_code_init_leaves_the_base_and_residual_moves_it_out():
    base, data = make_tiny_llama(), lm_batches(n=1)
    w0 = base.get_submodule(LAYER).weight.detach().clone()
    official = rw.adapt(copy.deepcopy(base), "nlora", r=4, residual=False)
    layer = _layer(official)
    torch.testing.assert_close(layer.base_layer.weight, w0, atol=0, rtol=0)
    torch.testing.assert_close(layer.delta_weight(), w0[:, :4] @ w0[:4, :4] @ w0[:4, :])
    assert not layer.identity_at_init
    residual = rw.adapt(copy.deepcopy(base), "nlora", r=4)
    torch.testing.assert_close(_layer(residual).base_layer.weight, w0 - w0[:, :4] @ w0[:4, :4] @ w0[:4, :])
    with torch.no_grad():
        torch.testing.assert_close(residual(**data[0]).logits, base(**data[0]).logits, atol=1e-5, rtol=0)
        assert (official(**data[0]).logits - base(**data[0]).logits).abs().max() > 1e-4


def test_inttune_trains_only_m():
    base, data = make_tiny_llama(), lm_batches(n=3)
    model = rw.adapt(copy.deepcopy(base), "nlora", r=4, variant="inttune")
    before = {n: layer.state_dict() for n, layer in rw.adapter_layers(model)}
    before = {n: {k: t.clone() for k, t in sd.items() if not k.startswith("base_layer")} for n, sd in before.items()}
    for _, layer in rw.adapter_layers(model):
        assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["nlora_M"]
        assert layer.trainable_count() == 16
    assert rw.summary(model).per_method["nlora"] == 16 * len(rw.adapter_layers(model))
    train(model, data, config=TrainConfig(lr=1e-2, max_steps=3, progress=False, measure_memory=False, seed=0))
    for name, layer in rw.adapter_layers(model):
        torch.testing.assert_close(layer.nlora_B, before[name]["nlora_B"], atol=0, rtol=0)
        torch.testing.assert_close(layer.nlora_A, before[name]["nlora_A"], atol=0, rtol=0)
        assert not torch.equal(layer.nlora_M, before[name]["nlora_M"])


def test_slora_starts_at_the_base_with_b_zero_and_trains_all_three():
    layer = _layer(rw.adapt(_model_with(), "nlora", r=4, variant="slora"))
    assert float(layer.nlora_B.abs().max()) == 0
    assert float(layer.nlora_M.abs().max()) > 0 and float(layer.nlora_A.abs().max()) > 0
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"nlora_A", "nlora_M", "nlora_B"}
    assert layer.trainable_count() == 4 * (64 + 32) + 16


@pytest.mark.parametrize("options", [{}, {"variant": "inttune"}, {"core_init": "pinv"}, {"residual": False}])
def test_round_trip_and_peft_export(options, tmp_path):
    base, data = make_tiny_llama(), lm_batches(n=1)
    model = rw.adapt(copy.deepcopy(base), "nlora", r=4, alpha=8, **options)
    with torch.no_grad():
        for _, layer in rw.adapter_layers(model):
            layer.nlora_M.mul_(1.1)
    check_round_trip(model, base, data[0], tmp_path)


@pytest.mark.parametrize(("options", "message"), [
    ({"variant": "lora"}, "variant='lora' is not allowed; choose one of ['nlora', 'slora', 'inttune']"),
    ({"core_init": "inv"}, "core_init='inv' is not allowed; choose one of ['intersection', 'pinv']"),
    ({"sampling": "leverage"}, "sampling='leverage' is not allowed; choose one of ['first', 'uniform']"),
    ({"residual": "yes"}, "residual='yes' must be True or False"),
])
def test_bad_options(options, message):
    with pytest.raises(ValueError) as err:
        rw.adapt(make_tiny_llama(), "nlora", r=2, **options)
    assert message in str(err.value)
