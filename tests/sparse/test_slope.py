"""SLoPe (Mozaffari et al. 2024): N:M-sparse forward, double-pruned (Wᵀ also N:M) backward, lazy adapters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.sparse import SLoPe, SLoPeLinear, nm_mask
from rankwise.train import TrainConfig, train

from ..conftest import lm_batches, make_tiny_llama


def _layer(seed: int = 0, n: int = 2, m: int = 4) -> SLoPeLinear:
    model = nn.Sequential(nn.Linear(16, 12))
    torch.manual_seed(seed)
    rw.sparsify(model, "slope", targets=["0"], n=n, m=m, rank=2)
    return model[0]


def _groups_nonzero(weight: torch.Tensor, m: int) -> torch.Tensor:
    """Non-zeros of every group of m consecutive entries of each row."""
    return (weight != 0).reshape(weight.shape[0], -1, m).sum(-1)


def test_forward_weight_is_exactly_n_of_m_per_group_of_inputs():
    layer = _layer()
    assert bool((_groups_nonzero(layer.weight * layer.mask, 4) == 2).all())
    x = torch.randn(5, 16)
    torch.testing.assert_close(layer(x), x @ (layer.weight * layer.mask).t() + layer.bias)


def test_backward_uses_a_transposed_weight_that_is_n_of_m_too():
    """∂L/∂x = ∂L/∂y·(W⊙M⊙Mᵦ): (W⊙M⊙Mᵦ)ᵀ has exactly N non-zeros per group of M outputs, and this is
    not the single-pruned gradient ∂L/∂y·(W⊙M)."""
    layer = _layer()
    x = torch.randn(5, 16, requires_grad=True)
    g = torch.randn(5, 12)
    layer(x).backward(g)
    used = layer.weight * layer.mask * layer.back_mask
    assert bool((_groups_nonzero(used.t(), 4) <= 2).all())
    assert bool((_groups_nonzero(used.t(), 4) == 2).any())
    torch.testing.assert_close(x.grad, g @ used)
    assert not torch.allclose(x.grad, g @ (layer.weight * layer.mask))
    assert torch.equal(layer.back_mask, nm_mask((layer.weight * layer.mask).t(), 2, 4).t())


def test_bf16_autocast_backward_gives_each_gradient_its_input_dtype():
    """Under bf16 autocast the forward GEMM runs in bf16; backward takes the bf16 output gradient with the
    fp32 weight and gives x and W gradients in their own dtypes, within bf16 rounding of the fp32 ones."""
    layer = _layer()
    x = torch.randn(5, 16, requires_grad=True)
    g = torch.randn(5, 12)
    layer(x).backward(g)
    ref_x, ref_w = x.grad.clone(), layer.weight.grad.clone()
    x.grad = layer.weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.backward(g.to(y.dtype))
    assert x.grad.dtype == layer.weight.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad, ref_x, atol=0.05, rtol=0.02)
    torch.testing.assert_close(layer.weight.grad, ref_w, atol=0.05, rtol=0.02)
    assert bool((layer.weight.grad[~layer.mask] == 0).all())


def test_pruned_weights_get_no_gradient_and_stay_zero():
    model = rw.sparsify(make_tiny_llama(), "slope", rank=4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    train(model, lm_batches(n=3, batch=2, seq=8), config=TrainConfig.plain(3), optimizer=opt)
    for layer in (m for m in model.modules() if isinstance(m, SLoPeLinear)):
        assert bool((layer.weight[~layer.mask] == 0).all())
        assert bool((_groups_nonzero(layer.weight, 4) == 2).all())


def test_mask_keeps_the_largest_magnitudes():
    w = torch.tensor([[0.1, -3.0, 2.0, 0.5, 1.0, 0.0, -0.2, 4.0]])
    assert nm_mask(w, 2, 4).tolist() == [[False, True, True, False, True, False, False, True]]


def test_adapters_exist_only_after_the_lazy_point():
    """10 steps, lazy_fraction 0.2: no adapter parameter through step 7, adapters (trained) from step 8."""
    model = rw.sparsify(make_tiny_llama(), "slope", rank=4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    controller = SLoPe(model, total_steps=10, optimizer=opt, lazy_fraction=0.2)
    seen = []

    class Count:
        def on_step_end(self, state):
            seen.append(sum(p.numel() for n, p in model.named_parameters() if "lora_" in n))

    train(model, lm_batches(n=10, batch=2, seq=8), config=TrainConfig.plain(10), optimizer=opt,
          callbacks=[controller, Count()])
    assert seen[:7] == [0] * 7 and all(c > 0 for c in seen[7:])
    layer = next(m for m in model.modules() if isinstance(m, SLoPeLinear))
    assert layer.lora_B.abs().sum() > 0  # trained in the lazy phase
    ids = torch.randint(1, 100, (2, 8))
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
        rw.sparse.densify(model)
        torch.testing.assert_close(model(input_ids=ids).logits, before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bad, match", [({"n": 5}, "n="), ({"m": 5}, "m="), ({"alpha": 0}, "alpha")])
def test_bad_options(bad, match):
    with pytest.raises(ValueError, match=match):
        rw.sparsify(make_tiny_llama(), "slope", rank=4, **bad)
