"""COAP (Xiao et al. 2025): the projection moves by one clipped gradient step of the correlation-aware
loss between recomputations, is recomputed by a range finder started from the previous P, never by an
SVD of G, and consecutive projections stay correlated."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import rankwise as rw

F64 = torch.float64


def _grads(shape, n, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(shape, generator=g, dtype=F64) for _ in range(n)]


def _coap(W, rank=4, **kwargs):
    return rw.optim.COAP([{"params": [W], "rank": rank}], lr=1e-2, **kwargs)


def _step(opt, W, G):
    W.grad = G.clone()
    opt.step()


def _expected_step(P, M, G, side, lr=0.1):
    """The paper's Eq. 5 written out here: L = mean((proj_P(G) − G)²)·(1 − mean_i cos(back(M)_i, G_i)),
    P ← P − lr·clip₁(∂L/∂P)."""
    P = P.detach().clone().requires_grad_(True)
    if side == "right":
        recon, back = G @ P.t() @ P, M @ P
    else:
        recon, back = P @ P.t() @ G, P @ M
    cos = (back * G).sum(1) / (back.norm(dim=1) * G.norm(dim=1))
    loss = ((recon - G) ** 2).sum() / G.numel() * (1 - cos.mean())
    (grad,) = torch.autograd.grad(loss, P)
    return P.detach() - lr * grad * min(1.0, 1.0 / (float(grad.norm()) + 1e-6))


@pytest.mark.parametrize("grad_scale", [1.0, 30.0])  # 30: the gradient of the loss is clipped to norm 1
@pytest.mark.parametrize("shape,side", [((24, 40), "left"), ((40, 24), "right")])
def test_between_recomputations_p_takes_one_clipped_step_of_the_correlation_aware_loss(shape, side, grad_scale):
    W = nn.Parameter(torch.zeros(shape, dtype=F64))
    opt = _coap(W, update_gap=2, reproject_factor=3)
    grads = _grads(shape, 5, scale=grad_scale)
    for t, G in enumerate(grads[:4]):
        P_before = opt.state[W]["P"].clone() if "P" in opt.state[W] else None
        M_before = opt.state[W]["exp_avg"].clone() if "exp_avg" in opt.state[W] else None
        _step(opt, W, G)
        P = opt.state[W]["P"]
        if t in (1, 3):  # no refresh: P unchanged
            assert torch.equal(P, P_before)
        if t == 2:  # a projection update (the recomputations are at steps 0 and 6)
            expected = _expected_step(P_before, M_before, G, side)
            torch.testing.assert_close(P, expected, rtol=1e-10, atol=1e-12)
            assert not torch.allclose(P, P_before)
    assert opt.state[W]["proj_version"] == 2
    # the state is GaLore's: P and the moments of the r-dimensional projection, nothing of W's size
    (m, n), r = shape, 4
    assert tuple(opt.state[W]["exp_avg"].shape) == ((r, n) if side == "left" else (m, r))
    basis, moments = (m, n) if side == "left" else (n, m)  # P is basis×r, R is moments×r
    assert sum(v.numel() for v in opt.state[W].values() if torch.is_tensor(v)) == r * basis + 2 * r * moments


def test_the_loss_falls_by_the_step_and_needs_the_first_moment():
    """The step lowers the correlation-aware loss; a projection update without a first moment (8-bit
    moments) is refused with the option named."""
    G = _grads((40, 24), 1)[0]
    P = torch.linalg.qr(torch.randn(24, 4, dtype=F64)).Q.t()
    M = G @ P.t() + 0.5 * torch.randn(40, 4, dtype=F64)
    before = rw.optim.projectors.coap_loss(P, M, G, "right")
    after = rw.optim.projectors.coap_loss(_expected_step(P, M, G, "right"), M, G, "right")
    assert after < before
    W = nn.Parameter(torch.zeros(300, 64))
    opt = _coap(W, update_gap=1, inner="adamw8bit", min_8bit_size=1)
    _step(opt, W, torch.randn(300, 64))
    with pytest.raises(ValueError, match="exp_avg"):
        _step(opt, W, torch.randn(300, 64))


@pytest.mark.parametrize("shape,side", [((24, 40), "left"), ((40, 24), "right")])
def test_recomputation_is_a_range_finder_started_from_the_previous_p_with_no_svd_of_g(monkeypatch, shape, side):
    W = nn.Parameter(torch.zeros(shape, dtype=F64))
    opt = _coap(W, update_gap=1, reproject_factor=3)  # recomputed at steps 0, 3; gradient steps at 1, 2
    shapes = []
    svd = torch.linalg.svd

    def recording_svd(A, *args, **kwargs):
        shapes.append(tuple(A.shape))
        return svd(A, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", recording_svd)
    grads = _grads(shape, 4, seed=3)
    for G in grads[:3]:
        _step(opt, W, G)
    P_prev = opt.state[W]["P"].clone()
    _step(opt, W, grads[3])
    assert shapes and all(min(s) == 4 for s in shapes), shapes  # only the r×n sketch is decomposed
    # Eq. 6 computed here with numpy: Q = qr(A·Ω), Ω the previous P, new P = top right singular vectors of QᵀA
    A = grads[3].numpy() if side == "right" else grads[3].numpy().T
    omega = P_prev.numpy().T if side == "right" else P_prev.numpy()
    Q = np.linalg.qr(A @ omega)[0]
    Vh = np.linalg.svd(Q.T @ A, full_matrices=False)[2]
    P = opt.state[W]["P"].numpy()
    rows = P if side == "right" else P.T
    np.testing.assert_allclose(np.abs((rows * Vh).sum(1)), np.ones(4), atol=1e-10)  # the same vectors up to sign


def test_consecutive_projections_stay_correlated_unlike_independent_svd_refreshes():
    """‖P_t P_{t−1}ᵀ‖_F/√r for noisy gradients: near 1 for COAP's updates, far lower for GaLore's SVDs."""

    def overlaps(opt, W):
        out, prev = [], None
        for G in _grads((64, 32), 8, seed=5):
            _step(opt, W, G)
            P = opt.projector(W).matrix(opt.state[W])
            P = P / P.norm(dim=1, keepdim=True)  # rows of a right projector
            if prev is not None:
                out.append(float(torch.linalg.matrix_norm(P @ prev.t()) / 2.0))
            prev = P
        return out

    W = nn.Parameter(torch.zeros(64, 32, dtype=F64))
    coap = overlaps(_coap(W, update_gap=1, reproject_factor=100), W)
    V = nn.Parameter(torch.zeros(64, 32, dtype=F64))
    galore = overlaps(rw.optim.GaLoreAdamW([{"params": [V], "rank": 4}], lr=1e-2, update_gap=1, projector="svd"), V)
    assert min(coap) > 0.95 and max(galore) < 0.8, (coap, galore)
