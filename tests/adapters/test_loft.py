"""LoFT (Tastan et al. 2025): AdamW in least-squares coordinates whose moments mean full-weight moments."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.adapters.loft import LoFTAdamW, loft_optimizer
from rankwise.train import TrainConfig, build_optimizer

B1, B2 = 0.9, 0.999


def _layer(m=4, n=5, r=2, seed=0, **options):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(n, m))
    rw.adapt(model, "loft", targets=["0"], r=r, trainable=None, **options)
    with torch.no_grad():
        model[0].lora_B.normal_()
    return model


def _loss(model, x, y):
    return (model(x) - y).pow(2).sum()


def test_a_steps_with_a_square_frozen_b_are_full_adamw_steps():
    """r = out, B invertible and frozen, A stepping every step: W follows full AdamW on W exactly."""
    m, n, lr = 3, 5, 0.05
    model = _layer(m=m, n=n, r=m, damping=1e-12, alternate=False)
    layer = model[0]
    layer.lora_B.requires_grad_(False)
    opt = LoFTAdamW([layer.lora_A], [(layer.lora_A, layer.lora_B)], lr=lr, damping=1e-12, alternate=False)
    bias = layer.base_layer.bias.detach()
    w = (layer.base_weight + layer.lora_B @ layer.lora_A).detach().clone().requires_grad_(True)
    ref = torch.optim.AdamW([w], lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, n, generator=g), torch.randn(16, m, generator=g)
    for _ in range(5):
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step()
        ref.zero_grad()
        (x @ w.T + bias - y).pow(2).sum().backward()
        ref.step()
        torch.testing.assert_close(layer.base_weight + layer.lora_B @ layer.lora_A, w.detach(), rtol=1e-4, atol=1e-5)


def _lstsq_coords(new, old):
    """R with new·R ≈ old in the least-squares sense: (newᵀnew)⁻¹newᵀold."""
    return torch.linalg.lstsq(new, old).solution


def test_moments_are_reprojected_when_the_other_factor_moves():
    """Step 1 moves B (alternating, B first); at step 2 A's moments are re-expressed in B's new coordinates:
    m ← R·m, P_j ← R·P_j·Rᵀ with R = (B₁ᵀB₁)⁻¹B₁ᵀB₀, then the EMA with the new scaled gradient."""
    model = _layer(damping=1e-12)
    layer = model[0]
    opt = loft_optimizer(model, lr=0.05, damping=1e-12)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(8, 5, generator=g), torch.randn(8, 4, generator=g)
    a0 = layer.lora_A.detach().clone()
    b0 = layer.lora_B.detach().clone()
    _loss(model, x, y).backward()
    opt.step()
    assert torch.equal(layer.lora_A, a0) and not torch.equal(layer.lora_B, b0)  # B moved first
    st = opt.state[layer.lora_A]
    m1, p1 = st["exp_avg"].clone(), st["row_products"].clone()
    b1 = layer.lora_B.detach().clone()

    opt.zero_grad()
    _loss(model, x, y).backward()
    ga = torch.linalg.solve(b1.T @ b1, layer.lora_A.grad)  # (B₁ᵀB₁)⁻¹·g_A
    a_before_step2 = layer.lora_A.detach().clone()
    opt.step()
    assert not torch.equal(layer.lora_A, a0)  # now A moved
    r = _lstsq_coords(b1, b0)
    expected_m = B1 * (r @ m1) + (1 - B1) * ga
    expected_p = B2 * (r @ p1 @ r.T) + (1 - B2) * ga.T[:, :, None] * ga.T[:, None, :]
    torch.testing.assert_close(st["exp_avg"], expected_m, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(st["row_products"], expected_p, rtol=1e-4, atol=1e-8)
    # not stale (no re-projection) and not reset
    assert not torch.allclose(st["exp_avg"], B1 * m1 + (1 - B1) * ga, atol=1e-4)
    assert not torch.allclose(st["exp_avg"], (1 - B1) * ga, atol=1e-4)
    # the full-space first moment is the projection of the old one onto B₁'s columns
    proj = b1 @ torch.linalg.pinv(b1)
    torch.testing.assert_close(b1 @ (r @ m1), proj @ (b0 @ m1), rtol=1e-4, atol=1e-6)

    # step 3: A moved at step 2, so B's moments (of rows) are re-expressed: m ← m·R, P_i ← Rᵀ·P_i·R,
    # R = A₁ᵀ-coordinates of A₁ (old) in A₂: Rᵀ = (A₂A₂ᵀ)⁻¹A₂A₁ᵀ
    sb = opt.state[layer.lora_B]
    mb, pb = sb["exp_avg"].clone(), sb["row_products"].clone()
    a1_rows = a_before_step2
    a2 = layer.lora_A.detach().clone()
    opt.zero_grad()
    _loss(model, x, y).backward()
    gb = torch.linalg.solve(a2 @ a2.T, layer.lora_B.grad.T).T  # g_B·(A₂A₂ᵀ)⁻¹
    opt.step()
    rb = _lstsq_coords(a2.T, a1_rows.T).T
    torch.testing.assert_close(sb["exp_avg"], B1 * (mb @ rb) + (1 - B1) * gb, rtol=1e-4, atol=1e-6)
    expected_pb = B2 * (rb.T @ pb @ rb) + (1 - B2) * gb[:, :, None] * gb[:, None, :]
    torch.testing.assert_close(sb["row_products"], expected_pb, rtol=1e-4, atol=1e-8)


def test_no_alpha_and_the_loop_builds_loft():
    model = _layer()
    assert model[0].scale == 1.0
    torch.testing.assert_close(model[0].delta_weight(), model[0].lora_B @ model[0].lora_A)
    for bad in ({"alpha": 16}, {"use_rslora": True}, {"damping": 0}, {"alternate": "yes"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            rw.adapt(nn.Sequential(nn.Linear(4, 4)), "loft", targets=["0"], r=2, **bad)
    opt = build_optimizer(model, TrainConfig(lr=1e-3))
    assert isinstance(opt, LoFTAdamW)
    with pytest.raises(ValueError, match="own AdamW-style optimizer"):
        build_optimizer(model, TrainConfig(lr=1e-3, optimizer="galore"))
