"""MELoRA: ΔW block-diagonal (mini LoRA i maps input slice i to output slice i, nothing else), rank up to
n·r at LoRA's parameter count, the same model in PEFT as a rank-n·r LoRA."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.adapters.init import InitContext
from rankwise.adapters.melora import MELoRAConfig, MELoRALayer

from ..conftest import make_tiny_llama


def _layer(k: int, d: int, r: int, n: int, alpha: float | None = None) -> MELoRALayer:
    layer = MELoRALayer(nn.Linear(k, d, bias=False), MELoRAConfig(r=r, n=n, alpha=alpha), InitContext(name="w"))
    with torch.no_grad():
        layer.melora_B.copy_(torch.randn(layer.melora_B.shape, generator=torch.Generator().manual_seed(3)))
    return layer


@pytest.mark.parametrize("shape", [(64, 64), (48, 96), (96, 32)])
def test_delta_is_block_diagonal_with_mini_loras_on_disjoint_slices(shape):
    k, d = shape
    n, r = 4, 2
    layer = _layer(k, d, r, n, alpha=6.0)
    delta = layer.delta_weight()
    bk, bd = k // n, d // n
    for i in range(n):
        for j in range(n):
            block = delta[i * bd:(i + 1) * bd, j * bk:(j + 1) * bk]
            if i == j:  # mini LoRA i: (α/r)·Bᵢ·Aᵢ on output slice i, input slice i
                expected = layer.melora_B[i] @ layer.melora_A[i] * (6.0 / r)
                torch.testing.assert_close(block, expected, atol=1e-6, rtol=1e-6)
            else:
                assert torch.count_nonzero(block) == 0
    x = torch.randn(2, 5, k)
    torch.testing.assert_close(layer(x), x @ (layer.base_weight + delta).t(), atol=1e-5, rtol=1e-5)
    b, a, s = layer.factors()  # the rank-n·r product exported to PEFT
    assert b.shape == (d, n * r) and a.shape == (n * r, k)
    torch.testing.assert_close(b @ a * s, delta, atol=1e-6, rtol=1e-6)


def test_rank_reaches_n_times_r_at_the_parameter_count_of_one_rank_r_lora():
    k = d = 64
    n, r = 8, 2
    layer = _layer(k, d, r, n)
    assert layer.trainable_count() == r * (k + d) == sum(p.numel() for p in layer.parameters() if p.requires_grad)
    assert int(torch.linalg.matrix_rank(layer.delta_weight())) == n * r


def test_init_is_linear_default_per_slice_and_zero_b():
    layer = MELoRALayer(nn.Linear(64, 32), MELoRAConfig(r=4, n=4), InitContext(name="w"))
    assert torch.count_nonzero(layer.melora_B) == 0
    bound = 1 / 16**0.5  # U(±1/√(k/n))
    assert layer.melora_A.abs().max() <= bound and layer.melora_A.abs().max() > 0.8 * bound


def test_n_must_divide_both_dimensions():
    with pytest.raises(ValueError, match="n=3 must divide in_features=64 and out_features=32 of 'w'"):
        MELoRALayer(nn.Linear(64, 32), MELoRAConfig(r=2, n=3), InitContext(name="w"))
    with pytest.raises(ValueError, match="n=0"):
        MELoRAConfig(n=0)


def test_peft_export_is_the_block_diagonal_lora(tmp_path):
    from peft import PeftModel

    base = make_tiny_llama(0)
    model = rw.adapt(copy.deepcopy(base), "melora", r=2, n=4, alpha=8)
    with torch.no_grad():
        for _, layer in rw.adapter_layers(model):
            layer.melora_B.normal_(0, 0.1)
    ids = torch.randint(1, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    expected = model(input_ids=ids).logits
    rw.export_peft(model, tmp_path / "peft")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    assert loaded.peft_config["default"].r == 8  # n·r
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
