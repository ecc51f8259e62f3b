"""The fused LoRA and DoRA kernels in both layouts of their skinny GEMMs (``kernels.down_project``): the
r×N product for a small x, the N×r one above ``TRANSPOSED_PRODUCT_MAX_BYTES``; each against plain autograd
of the paper's formula."""

from __future__ import annotations

import pytest
import torch

from rankwise.adapters import kernels
from rankwise.adapters.dora import _DoRALinear

LAYOUTS = {"r×N": 1 << 40, "N×r": 0}


@pytest.fixture(params=list(LAYOUTS))
def layout(request, monkeypatch):
    monkeypatch.setattr(kernels, "TRANSPOSED_PRODUCT_MAX_BYTES", LAYOUTS[request.param])
    return request.param


def _tensors(seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 7, 16, generator=g, dtype=torch.float64)
    w, bias = torch.randn(12, 16, generator=g, dtype=torch.float64), torch.randn(12, generator=g, dtype=torch.float64)
    a, b = torch.randn(3, 16, generator=g, dtype=torch.float64), torch.randn(12, 3, generator=g, dtype=torch.float64)
    return x, w, bias, a, b


def _grads(out: torch.Tensor, *leaves: torch.Tensor) -> tuple[torch.Tensor, ...]:
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    return torch.autograd.grad((out * weights).sum(), leaves)


def test_down_project_is_x_a_transposed_in_both_layouts(layout):
    x, _, _, a, _ = _tensors(0)
    x2 = x.reshape(-1, 16)
    xa = kernels.down_project(x2, a)
    assert xa.shape == (14, 3) and xa.is_contiguous() == (layout == "N×r")
    torch.testing.assert_close(xa, x2 @ a.t(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dropout_input", [False, True])
def test_lora_kernel_matches_the_formula_in_both_layouts(layout, dropout_input):
    """y = x Wᵀ + b + s·(x_d Aᵀ)Bᵀ and its gradients for x, x_d, A, B (W, b frozen)."""
    x, w, bias, a, b = _tensors(1)
    x, a, b = x.requires_grad_(), a.requires_grad_(), b.requires_grad_()
    x_d = (0.5 * x.detach()).requires_grad_() if dropout_input else None
    out = kernels.low_rank_linear(x, x_d, w, bias, a, b, 0.7)
    xd_ref = x if x_d is None else x_d
    ref = x @ w.t() + bias + 0.7 * (xd_ref @ a.t()) @ b.t()
    torch.testing.assert_close(out, ref)
    leaves = (x, a, b) if x_d is None else (x, x_d, a, b)
    for got, want in zip(_grads(out, *leaves), _grads(ref, *leaves), strict=True):
        torch.testing.assert_close(got, want)


def test_dora_kernel_matches_the_formula_in_both_layouts(layout):
    """y = m ⊙ (W + s·BA)x / ‖W + s·BA‖_c + b with the norm a constant (DoRA Sec. 4.3)."""
    x, w, bias, a, b = _tensors(2)
    m = torch.linspace(0.5, 2.0, 12, dtype=torch.float64)
    x, a, b, m = x.requires_grad_(), a.requires_grad_(), b.requires_grad_(), m.requires_grad_()
    out = _DoRALinear.apply(x, w, bias, a, b, m, 0.7)
    v = w + 0.7 * b @ a
    ref = (x @ v.t()) * (m / torch.linalg.vector_norm(v, dim=1).detach()) + bias
    torch.testing.assert_close(out, ref)
    for got, want in zip(_grads(out, x, a, b, m), _grads(ref, x, a, b, m), strict=True):
        torch.testing.assert_close(got, want)
