"""LoRA-Mini: the outer B_out, A_out stay bit-identical while training, only the inner B_in, A_in train
(the model trains exactly L·r·(a + b)), ΔW = s·B_out·B_in·A_in·A_out, and the PEFT export is that product."""

from __future__ import annotations

import pytest
import torch

import rankwise as rw
from rankwise.adapters.lora_mini import LoRAMiniConfig
from rankwise.train import TrainConfig, train

from ..conftest import lm_batches, make_tiny_llama

TARGETS = ["q_proj", "v_proj", "up_proj"]


def _adapted(**options):
    model = make_tiny_llama()
    rw.adapt(model, "lora_mini", TARGETS, r=2, a=5, b=7, **options)
    return model, [layer for _, layer in rw.adapter_layers(model)]


def test_only_the_inner_matrices_train_and_the_outer_ones_do_not_move():
    model, layers = _adapted()
    outer = [(layer.mini_B_out.clone(), layer.mini_A_out.clone()) for layer in layers]
    inner = [(layer.mini_B_in.clone(), layer.mini_A_in.clone()) for layer in layers]
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"mini_B_in", "mini_A_in"}
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == len(layers) * 2 * (5 + 7)
    assert layers[0].mini_B_in.shape == (7, 2) and layers[0].mini_A_in.shape == (2, 5)
    train(model, lm_batches(n=3), config=TrainConfig.plain(3))
    for layer, (b_out, a_out), (b_in, a_in) in zip(layers, outer, inner, strict=True):
        assert torch.equal(layer.mini_B_out, b_out) and torch.equal(layer.mini_A_out, a_out)
        assert not torch.equal(layer.mini_B_in, b_in) and not torch.equal(layer.mini_A_in, a_in)


def test_delta_is_the_four_matrix_product_in_order():
    _, layers = _adapted(alpha=4.0)
    layer = layers[-1]  # up_proj: 64 × 32, so a wrong order cannot even multiply
    with torch.no_grad():
        layer.mini_B_in.normal_()
    assert layer.mini_B_out.shape == (64, 7) and layer.mini_A_out.shape == (5, 32)
    delta = 2.0 * layer.mini_B_out @ layer.mini_B_in @ layer.mini_A_in @ layer.mini_A_out
    torch.testing.assert_close(layer.delta_weight(), delta)
    assert torch.linalg.matrix_rank(delta) <= 2
    b, a, s = layer.factors()
    torch.testing.assert_close(b @ a * s, delta)
    x = torch.randn(3, 32)
    torch.testing.assert_close(layer(x), x @ (layer.base_weight + delta).t(), atol=1e-5, rtol=1e-5)


def test_starts_at_the_base_and_outer_matrices_are_regenerated_on_load(tmp_path):
    model, layers = _adapted()
    assert all(torch.count_nonzero(layer.delta_weight()) == 0 for layer in layers)
    train(model, lm_batches(n=2), config=TrainConfig.plain(2))
    rw.save_adapter(model, tmp_path / "a")
    fresh = make_tiny_llama()
    rw.load_adapter(fresh, tmp_path / "a")
    for a, b in zip(layers, [layer for _, layer in rw.adapter_layers(fresh)], strict=True):
        assert torch.equal(a.mini_A_out, b.mini_A_out)
        torch.testing.assert_close(a.delta_weight(), b.delta_weight())


@pytest.mark.parametrize("bad", [{"a": 0}, {"b": -1}, {"alpha": 0}, {"r": 0}])
def test_bad_options_name_the_parameter(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        LoRAMiniConfig(**bad)
