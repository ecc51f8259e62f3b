"""Natural GaLore (Das 2024): AdamW runs on the low-rank gradient preconditioned by the inverse
empirical Fisher (λI + HᵀH)⁻¹ of the last s low-rank gradients; checked against a dense inverse."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.optim.inner import natural_gradient

F64 = torch.float64


def _dense(history: list[torch.Tensor], damping: float) -> torch.Tensor:
    """(λI + Σ_i h_i h_iᵀ)⁻¹ g by a dense solve, g the last h_i (the paper's F̂ with the Tikhonov term)."""
    H = torch.stack([h.reshape(-1) for h in history])
    F = damping * torch.eye(H.shape[1], dtype=F64) + H.t() @ H
    return torch.linalg.solve(F, H[-1])


@pytest.mark.parametrize("damping", [1e-3, 0.5])
def test_woodbury_direction_equals_the_dense_inverse_fisher_times_g(damping):
    gen = torch.Generator().manual_seed(0)
    history = [torch.randn(6, 5, generator=gen, dtype=F64) * 0.1 for _ in range(4)]
    got = natural_gradient(torch.stack([h.reshape(-1) for h in history]), damping)
    want = _dense(history, damping)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(got, history[-1].reshape(-1), rtol=1e-3)  # a real preconditioning


@pytest.mark.parametrize("shape,side", [((24, 40), "left"), ((40, 24), "right")])
def test_inner_update_is_adamw_on_the_preconditioned_low_rank_gradient(shape, side):
    """Four steps with history s = 3 (the oldest gradient leaves the window at step 4): the moments and the
    weight update equal AdamW run here on (λI + HᵀH)⁻¹R, R = the projection of G by the fixed basis."""
    s, lam, lr, scale, b1, b2, eps = 3, 1e-2, 1e-2, 0.25, 0.9, 0.999, 1e-6
    W = nn.Parameter(torch.zeros(shape, dtype=F64))
    opt = rw.optim.NaturalGaLore([{"params": [W], "rank": 4}], lr=lr, update_gap=100, scale=scale,
                                 natural_history=s, natural_damping=lam)
    gen = torch.Generator().manual_seed(1)
    m = v = None
    history: list[torch.Tensor] = []
    for t in range(1, 5):
        G = torch.randn(shape, generator=gen, dtype=F64) * 0.1
        before = W.detach().clone()
        W.grad = G.clone()
        opt.step()
        P = opt.state[W]["P"]
        R = P.t() @ G if side == "left" else G @ P.t()
        history = (history + [R])[-s:]
        g = _dense(history, lam).reshape(R.shape)
        m = (1 - b1) * g if m is None else b1 * m + (1 - b1) * g
        v = (1 - b2) * g * g if v is None else b2 * v + (1 - b2) * g * g
        N = m / (v.sqrt() + eps)
        back = P @ N if side == "left" else N @ P
        step = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
        torch.testing.assert_close(opt.state[W]["exp_avg"], m, rtol=1e-9, atol=1e-14)
        torch.testing.assert_close(W.detach() - before, -step * scale * back, rtol=1e-9, atol=1e-14)
    assert opt.state[W]["history_count"] == 4 and tuple(opt.state[W]["grad_history"].shape) == (s, R.numel())


def test_dropping_the_preconditioner_changes_the_update_and_plain_groups_use_adamw():
    """GaLore (no preconditioner) on the same gradients and basis moves W differently from step 2 on (at
    step 1 Adam's normalisation hides the scalar 1/(λ + ‖g‖²)); the unprojected bias gets plain AdamW."""
    def run(cls, **kw):
        torch.manual_seed(0)
        layer = nn.Linear(24, 40).double()
        groups = [{"params": [layer.weight], "rank": 4}, {"params": [layer.bias]}]
        opt = cls(groups, lr=1e-2, update_gap=100, scale=0.25, projector="svd", **kw)
        gen = torch.Generator().manual_seed(2)
        for _ in range(3):
            layer.weight.grad = torch.randn(40, 24, generator=gen, dtype=F64)
            layer.bias.grad = torch.randn(40, generator=gen, dtype=F64)
            opt.step()
        return layer, opt

    natural, opt = run(rw.optim.NaturalGaLore)
    plain, _ = run(rw.optim.GaLoreAdamW)
    assert not torch.allclose(natural.weight, plain.weight, rtol=1e-6)
    torch.testing.assert_close(natural.bias, plain.bias, rtol=0, atol=0)
    assert "grad_history" not in opt.state[natural.bias]


def test_state_bytes_add_only_the_r_dimensional_history():
    W = nn.Parameter(torch.zeros(40, 24))
    opt = rw.optim.NaturalGaLore([{"params": [W], "rank": 4}], natural_history=5)
    W.grad = torch.randn(40, 24)
    opt.step()
    galore = rw.optim.GaLoreAdamW([{"params": [W], "rank": 4}])
    galore.step()
    assert opt.state_bytes() - galore.state_bytes() == 4 * 5 * 40 * 4  # s·m·r floats
