"""LoRA-Pro (Wang & Liang 2024): adjusted g_A, g_B whose equivalent gradient best approximates the full gradient."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.adapters.lora_pro import (
    LoRAProAdamW,
    equivalent_gradient,
    lora_pro_gradients,
    lora_pro_optimizer,
    solve_sylvester,
)
from rankwise.train import TrainConfig, train

from ..conftest import cls_batches, make_tiny_bert

M, N, R, S = 7, 5, 2, 0.5


def _setup(seed: int = 0):
    """Factors, their LoRA gradients and the full gradient G of the merged weight, all by autograd."""
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(M, N, generator=g, dtype=torch.float64)
    a = torch.randn(R, N, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(M, R, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(9, N, generator=g, dtype=torch.float64)
    target = torch.randn(9, M, generator=g, dtype=torch.float64)

    def loss(w):
        return (torch.tanh(x @ w.T) - target).pow(2).sum()

    loss(w0 + S * b @ a).backward()
    w = (w0 + S * b @ a).detach().requires_grad_(True)
    loss(w).backward()
    return a.detach(), b.detach(), a.grad, b.grad, w.grad


def _projection(a, b, full):
    p_b = b @ torch.linalg.pinv(b)
    p_a = torch.linalg.pinv(a) @ a
    return p_b @ full + (torch.eye(M, dtype=full.dtype) - p_b) @ full @ p_a


def test_equivalent_gradient_is_the_projection_of_the_full_gradient():
    a, b, ga, gb, full = _setup()
    torch.testing.assert_close(ga, S * b.T @ full)  # the LoRA gradients the formula starts from
    pa, pb = lora_pro_gradients(a, b, ga, gb, S, eps=0.0)
    pro = equivalent_gradient(a, b, pa, pb, S)
    torch.testing.assert_close(pro, _projection(a, b, full), rtol=1e-9, atol=1e-9)
    lora = equivalent_gradient(a, b, ga, gb, S)
    assert (pro - full).norm() < (lora - full).norm()
    # least squares over the whole LoRA gradient space: no other (g_A, g_B) gets closer to G
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        da, db = torch.randn(a.shape, generator=g, dtype=a.dtype), torch.randn(b.shape, generator=g, dtype=b.dtype)
        other = equivalent_gradient(a, b, pa + 0.1 * da, pb + 0.1 * db, S)
        assert (other - full).norm() >= (pro - full).norm() - 1e-12


def test_x_keeps_the_adjusted_gradients_closest_to_lora_s():
    """Every (g_A + Y·A, g_B − B·Y) has the same equivalent gradient; the Sylvester X is the closest to LoRA's."""
    a, b, ga, gb, _ = _setup(1)
    pa, pb = lora_pro_gradients(a, b, ga, gb, S, eps=0.0)
    best = (pa - ga).norm() ** 2 + (pb - gb).norm() ** 2
    g = torch.Generator().manual_seed(4)
    for _ in range(5):
        y = 0.05 * torch.randn(R, R, generator=g, dtype=a.dtype)
        qa, qb = pa + y @ a, pb - b @ y
        torch.testing.assert_close(equivalent_gradient(a, b, qa, qb, S), equivalent_gradient(a, b, pa, pb, S))
        assert (qa - ga).norm() ** 2 + (qb - gb).norm() ** 2 > best


def test_sylvester_solver():
    g = torch.Generator().manual_seed(0)
    p, q = (lambda m: m @ m.T)(torch.randn(3, 3, generator=g, dtype=torch.float64)), torch.eye(3, dtype=torch.float64)
    c = torch.randn(3, 3, generator=g, dtype=torch.float64)
    x = solve_sylvester(p, q, c)
    torch.testing.assert_close(p @ x + x @ q, c)


def test_adamw_step_moves_w_along_the_projected_adam_direction():
    """First step: Adam's direction D of the projected gradient, mapped back to the factors by the same closed form,
    so to first order W moves by −lr·(P_B D + (I − P_B) D P_A)."""
    a, b, ga, gb, full = _setup(2)
    pa_, pb_ = nn.Parameter(a.clone()), nn.Parameter(b.clone())
    pa_.grad, pb_.grad = ga.clone(), gb.clone()
    lr = 1e-6
    opt = LoRAProAdamW([pa_, pb_], [(pa_, pb_, S)], lr=lr, eps=1e-12, pro_eps=0.0)
    opt.step()
    proj = _projection(a, b, full)
    d = proj / (proj.abs() + 1e-12)  # m̂/(√v̂+ε) at step 1
    moved = (S * pb_.detach() @ pa_.detach() - S * b @ a) / lr
    torch.testing.assert_close(moved, -_projection(a, b, d), rtol=1e-4, atol=1e-4)
    assert opt.state[pa_]["exp_avg"].shape == (M, N)  # the paper's full-size moments


def test_the_loop_builds_the_lora_pro_optimizer():
    model = make_tiny_bert()
    rw.adapt(model, "lora_pro", r=2)
    result = train(model, cls_batches(n=2), config=TrainConfig(max_steps=2, progress=False, measure_memory=False))
    assert result.steps == 2
    opt = lora_pro_optimizer(model, lr=1e-3)
    assert isinstance(opt, LoRAProAdamW)
    assert any(not g["lora_pro"] for g in opt.param_groups)  # the classifier head trains with plain AdamW
    with pytest.raises(ValueError, match="optimizer='galore'"):
        train(model, cls_batches(n=1), config=TrainConfig(max_steps=1, optimizer="galore", progress=False))
    with pytest.raises(ValueError, match="pro_eps"):
        rw.adapt(make_tiny_bert(), "lora_pro", r=2, pro_eps=-1.0)
