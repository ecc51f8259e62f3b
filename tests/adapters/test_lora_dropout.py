"""LoRA Dropout (Lin et al. 2024): masks on rows of B and columns of A in training; none in eval; test-time ensemble."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.adapters.lora_dropout import LoRADropoutLayer, dropout_ensemble, masks_on

from ..conftest import cls_batches, make_tiny_bert


def _layer(p: float = 0.5, seed: int = 0) -> LoRADropoutLayer:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5))
    rw.adapt(model, "lora_dropout", targets=["0"], r=3, param_dropout=p, alpha=6)
    layer = rw.adapter_layers(model)[0][1]
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


def test_training_masks_whole_rows_of_b_and_columns_of_a():
    """The training delta is exactly s·(m_B ⊙ B)(A ⊙ m_A)/(1−p)²: found by matching the output with the masks
    recovered from the realised ΔW, dropped entries of A/B contribute nothing (zero gradient), input dropout is off."""
    p = 0.5
    layer = _layer(p).train()
    eye = torch.eye(6)  # one input per column: the output minus the base is ΔWᵀ
    torch.manual_seed(5)
    delta = (layer(eye) - layer.base_layer(eye)).T  # (out, in)
    rows = delta.abs().sum(1) > 0
    cols = delta.abs().sum(0) > 0
    assert 0 < int(rows.sum()) < 5 and 0 < int(cols.sum()) < 6  # with this seed both masks drop something
    expected = layer.scale * (layer.lora_B * rows[:, None]) @ (layer.lora_A * cols[None, :]) / (1 - p) ** 2
    torch.testing.assert_close(delta, expected.detach(), rtol=1e-5, atol=1e-6)
    # masked entries get no gradient: rows of B, columns of A
    torch.manual_seed(5)
    layer(eye).sum().backward()
    assert bool((layer.lora_B.grad[~rows] == 0).all()) and bool((layer.lora_B.grad[rows] != 0).any())
    assert bool((layer.lora_A.grad[:, ~cols] == 0).all()) and bool((layer.lora_A.grad[:, cols] != 0).any())
    assert isinstance(layer.dropout, nn.Identity)


def test_masks_are_fresh_each_forward_and_off_in_eval():
    layer = _layer(0.5).train()
    x = torch.randn(4, 6)
    outs = [layer(x) for _ in range(4)]
    assert any(not torch.allclose(outs[0], o) for o in outs[1:])
    layer.eval()
    dense = layer.base_layer(x) + layer.scale * x @ (layer.lora_B @ layer.lora_A).T
    torch.testing.assert_close(layer(x), dense.detach())
    torch.testing.assert_close(layer(x), layer(x))


def test_unbiased_in_expectation():
    """E[ΔW̃] = ΔW with 1/(1−p) per mask."""
    layer = _layer(0.3).train()
    eye = torch.eye(6)
    torch.manual_seed(0)
    mean = torch.stack([(layer(eye) - layer.base_layer(eye)).T for _ in range(3000)]).mean(0)
    torch.testing.assert_close(mean, layer.delta_weight().detach(), rtol=0.1, atol=0.05)


def test_options_and_ensemble():
    with pytest.raises(ValueError, match="dropout"):
        rw.adapt(nn.Sequential(nn.Linear(4, 4)), "lora_dropout", targets=["0"], r=2, dropout=0.1)
    with pytest.raises(ValueError, match="param_dropout"):
        rw.adapt(nn.Sequential(nn.Linear(4, 4)), "lora_dropout", targets=["0"], r=2, param_dropout=1.0)
    model = make_tiny_bert()
    rw.adapt(model, "lora_dropout", r=2, param_dropout=0.5)
    for _, layer in rw.adapter_layers(model):
        with torch.no_grad():
            layer.lora_B.normal_()
    batch = {k: v for k, v in cls_batches(n=1)[0].items() if k != "labels"}
    torch.manual_seed(0)
    probs = dropout_ensemble(model, batch, samples=4)
    torch.manual_seed(0)
    with masks_on(model):
        manual = torch.stack([model(**batch).logits.softmax(-1) for _ in range(4)]).mean(0)
    torch.testing.assert_close(probs, manual)
    assert not torch.allclose(probs, model(**batch).logits.softmax(-1))  # eval without masks differs
    assert not model.training and not any(layer.force_masks for _, layer in rw.adapter_layers(model))
