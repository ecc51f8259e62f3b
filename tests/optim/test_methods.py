"""Faithful tests: for each named projected optimizer, a property only the real method has."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import rankwise as rw
from rankwise.optim import projectors as pj
from rankwise.optim.gradnormlorp import weight_norm_grads
from rankwise.optim.residual import channel_scale

from ..conftest import lm_batches, make_tiny_llama


def _grads(shape, n, seed=0, lowrank=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        G = torch.randn(shape, generator=g, dtype=torch.float64)
        if lowrank:
            G = torch.randn(shape[0], lowrank, generator=g, dtype=torch.float64) @ torch.randn(
                lowrank, shape[1], generator=g, dtype=torch.float64)
        out.append(G.to(dtype))
    return out


def _param(shape, dtype=torch.float64, seed=12345):
    """Structural checks run in float64 so ΔW = W_after − W_before carries no rounding noise."""
    return nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype))


F64 = torch.float64


def _step(opt, W, G):
    W.grad = G.clone()
    before = W.detach().clone()
    opt.step()
    return W.detach() - before


def _complement(P: torch.Tensor, X: torch.Tensor, side: str) -> torch.Tensor:
    """(I − PPᵀ)X for a left P (m×r) or X(I − PᵀP) for a right P (r×n)."""
    return X - P @ (P.t() @ X) if side == "left" else X - (X @ P.t()) @ P


# ----------------------------------------------------------------------------- GaLore


@pytest.mark.parametrize("shape,side", [((24, 40), "left"), ((40, 24), "right")])
def test_galore_state_shapes_refresh_period_and_update_in_span(shape, side):
    m, n = shape
    r, T = 4, 3
    W = _param(shape)
    opt = rw.optim.GaLoreAdamW([{"params": [W], "rank": r}], lr=1e-2, update_gap=T, projector="svd")
    Ps = []
    for t, G in enumerate(_grads(shape, 8, dtype=F64)):
        dW = _step(opt, W, G)
        st = opt.state[W]
        P = st["P"].clone()
        Ps.append(P)
        low_shape = (r, n) if side == "left" else (m, r)
        assert st["exp_avg"].shape == low_shape and st["exp_avg_sq"].shape == low_shape
        assert P.shape == ((m, r) if side == "left" else (r, n))
        # each step's ΔW has rank ≤ r and lies in span(P)
        assert torch.linalg.matrix_rank(dW, rtol=1e-9).item() <= r
        assert _complement(P, dW, side).abs().max() < 1e-10 * dW.abs().max()
        if t % T == 0:  # the projector is the SVD of this step's gradient
            assert torch.allclose(P, pj.svd_basis(G, r, side), atol=1e-10)
    for t in range(1, 8):  # identical P between refreshes, a new one at each refresh
        assert torch.equal(Ps[t], Ps[t - 1]) == (t % T != 0)


def test_galore_adafactor_and_8bit_keep_projected_state():
    W = nn.Parameter(torch.randn(64, 96))
    opt = rw.optim.GaLoreAdafactor([{"params": [W], "rank": 8}], lr=1e-2, update_gap=5)
    for G in _grads(W.shape, 3):
        _step(opt, W, G)
    st = opt.state[W]
    assert st["exp_avg_sq_row"].shape == (8,) and st["exp_avg_sq_col"].shape == (96,)  # factored on R (8×96)
    W8 = nn.Parameter(torch.randn(64, 96))
    opt8 = rw.optim.GaLoreAdamW8bit([{"params": [W8], "rank": 8}], lr=1e-2, min_8bit_size=256)
    ref = nn.Parameter(W8.detach().clone())
    opt32 = rw.optim.GaLoreAdamW([{"params": [ref], "rank": 8}], lr=1e-2, eps=1e-8)
    for G in _grads(W8.shape, 5):
        d8, d32 = _step(opt8, W8, G), _step(opt32, ref, G)
    st8 = opt8.state[W8]
    assert st8["exp_avg_q"].dtype == torch.uint8 and st8["exp_avg_q"].numel() == 8 * 96
    assert st8["exp_avg_absmax"].numel() == math.ceil(8 * 96 / 256)
    assert F.cosine_similarity(d8.flatten(), d32.flatten(), dim=0) > 0.98


# ----------------------------------------------------------------------------- Q-GaLore


def test_q_galore_projector_is_packed_int4():
    W = nn.Parameter(torch.randn(48, 32))
    opt = rw.optim.QGaLoreAdamW([{"params": [W], "rank": 8}], lr=1e-3, update_gap=10, projector="svd")
    G = _grads(W.shape, 1)[0]
    _step(opt, W, G)
    st = opt.state[W]
    assert "P" not in st
    assert st["P_q"].dtype == torch.uint8 and st["P_q"].numel() == 8 * 32 // 2  # right side: P is 8×32
    P = opt.projector(W).matrix(st)
    exact = pj.svd_basis(G, 8, "right")
    assert not torch.equal(P, exact)
    groups = exact.flatten().view(-1, 256)
    step = ((groups.amax(1) - groups.amin(1)) / 15).repeat_interleave(256).view_as(exact)
    assert ((P - exact).abs() <= 0.5 * step + 1e-6).all()


def _refresh_steps(opt, W, grads):
    steps = []
    for t, G in enumerate(grads):
        before = opt.state[W].get("svd_count", 0)
        _step(opt, W, G)
        if opt.state[W]["svd_count"] > before:
            steps.append(t)
    return steps


def test_q_galore_svd_count_stops_growing_once_the_subspace_is_stable():
    W = nn.Parameter(torch.randn(20, 16))
    fixed = _grads(W.shape, 1, lowrank=4)[0]
    opt = rw.optim.QGaLoreAdamW([{"params": [W], "rank": 4}], lr=1e-4, update_gap=1, queue_size=2, cos_threshold=0.4)
    # successive projectors identical (cos = 1): after k = 2 similar refreshes the interval doubles each time
    assert _refresh_steps(opt, W, [fixed] * 40) == [0, 1, 2, 4, 8, 16, 32]
    W2 = nn.Parameter(torch.randn(20, 16))
    opt2 = rw.optim.QGaLoreAdamW([{"params": [W2], "rank": 4}], lr=1e-4, update_gap=1, queue_size=2, cos_threshold=0.4)
    # unrelated gradients: similarity stays low, every step refreshes (plain GaLore behaviour)
    assert len(_refresh_steps(opt2, W2, _grads(W2.shape, 12, seed=3))) == 12
    W3 = nn.Parameter(torch.randn(20, 16))
    opt3 = rw.optim.QGaLoreAdamW([{"params": [W3], "rank": 4}], lr=1e-4, update_gap=1, queue_size=2, gamma_proj=None)
    assert _refresh_steps(opt3, W3, [fixed] * 20) == [0, 1, 2]  # frozen after convergence


def test_q_galore_int8_weights_live_on_the_stochastic_rounding_grid():
    W = nn.Parameter(torch.randn(32, 16))
    opt = rw.optim.QGaLoreAdamW([{"params": [W], "rank": 4}], lr=1e-2, weight_quant=True, weight_group_size=64)
    for G in _grads(W.shape, 3):
        _step(opt, W, G)
    for grp in W.detach().flatten().view(-1, 64):
        gaps = grp.unique().diff()  # all values are scale·(q − zero) for integer codes q
        steps = gaps / gaps.min()
        assert torch.allclose(steps, steps.round(), atol=1e-3)
        assert (grp.max() - grp.min()) / gaps.min() <= 255.01


# ----------------------------------------------------------------------------- Fira


def _fira_expected_update(st, G, lr, side, scale, t, b1=0.9, b2=0.999):
    P = st["P"]
    R = P.t() @ G if side == "left" else G @ P.t()
    N = st["exp_avg"] / (st["exp_avg_sq"].sqrt() + 1e-6)
    c = math.sqrt(1 - b2**t) / (1 - b1**t)
    low = (P @ N if side == "left" else N @ P) * scale
    resid = channel_scale(N, R, side) * _complement(P, G, side)
    return -lr * c * low, -lr * c * resid


@pytest.mark.parametrize("shape,side", [((24, 40), "left"), ((40, 24), "right")])
def test_fira_residual_is_phi_times_complement_and_update_is_full_rank(shape, side):
    W = _param(shape)
    opt = rw.optim.Fira([{"params": [W], "rank": 4}], lr=1e-2, update_gap=5)
    G = _grads(shape, 1, dtype=F64)[0]
    dW = _step(opt, W, G)
    st = opt.state[W]
    low, resid = _fira_expected_update(st, G, 1e-2, side, 0.25, 1)
    assert torch.allclose(dW, low + resid, atol=1e-13, rtol=1e-10)
    assert torch.allclose(_complement(st["P"], dW, side), resid, atol=1e-13, rtol=1e-10)
    # φ is one factor per un-projected channel, N/R-norm ratio
    N = st["exp_avg"] / (st["exp_avg_sq"].sqrt() + 1e-6)
    phi = channel_scale(N, st["P"].t() @ G if side == "left" else G @ st["P"].t(), side)
    assert phi.shape == ((1, shape[1]) if side == "left" else (shape[0], 1))
    assert torch.linalg.matrix_rank(dW).item() == min(shape)  # full rank while the state is r×n
    assert st["exp_avg"].numel() == 4 * max(shape)


@pytest.mark.parametrize("gamma,bounded", [(1.01, True), (None, False)])
def test_fira_norm_growth_limiter_caps_a_gradient_spike(gamma, bounded):
    W = _param((30, 20))
    opt = rw.optim.Fira([{"params": [W], "rank": 4}], lr=1e-3, update_gap=100, limiter_gamma=gamma)
    base = _grads(W.shape, 1, seed=1, dtype=F64)[0]
    noise = _grads(W.shape, 4, seed=2, dtype=F64)
    norms = []
    for t in range(4):
        G = base + 0.1 * noise[t]
        if t == 3:  # ×10 spike of the gradient outside the (fixed) subspace
            G = G + 9.0 * _complement(opt.state[W]["P"], G, "right")
        dW = _step(opt, W, G)
        c = math.sqrt(1 - 0.999 ** (t + 1)) / (1 - 0.9 ** (t + 1))
        norms.append(_complement(opt.state[W]["P"], dW, "right").norm().item() / (1e-3 * c))
    growth = norms[-1] / norms[-2]
    assert (growth <= 1.01 + 1e-4) == bounded
    if not bounded:
        assert growth > 5.0


# ----------------------------------------------------------------------------- FRUGAL


def test_frugal_randk_moves_inactive_coordinates_by_exactly_lr_sign_g():
    W = nn.Parameter(torch.randn(16, 40))
    lr, density = 1e-2, 0.25
    opt = rw.optim.FRUGAL([{"params": [W], "rank": 4}], lr=lr, density=density, selector="randk", proj_side="right")
    for G in _grads(W.shape, 3):
        before = W.detach().clone()
        _step(opt, W, G)
        st = opt.state[W]
        idx = st["idx"]
        inactive = torch.ones(40, dtype=torch.bool)
        inactive[idx] = False
        expected = before.add(G.sign(), alpha=-lr)
        assert torch.equal(W.detach()[:, inactive], expected[:, inactive])
        assert not torch.equal(W.detach()[:, ~inactive], expected[:, ~inactive])
        # Adam state covers exactly density × parameters (per moment)
        assert st["exp_avg"].numel() == st["exp_avg_sq"].numel() == round(density * W.numel())


def test_frugal_without_state_free_part_and_reset_is_galore():
    W1 = nn.Parameter(torch.randn(24, 40))
    W2 = nn.Parameter(W1.detach().clone())
    frugal = rw.optim.FRUGAL([{"params": [W1], "rank": 6}], lr=1e-2, eps=1e-6, density=None, update_gap=3,
                             inactive_update_rule="no", reset_statistics=False, scale=0.25)
    galore = rw.optim.GaLoreAdamW([{"params": [W2], "rank": 6}], lr=1e-2, update_gap=3, scale=0.25)
    for G in _grads(W1.shape, 8):
        _step(frugal, W1, G)
        _step(galore, W2, G)
    assert torch.equal(W1, W2)


def test_frugal_resets_statistics_at_each_reselection():
    W = nn.Parameter(torch.randn(24, 40))
    opt = rw.optim.FRUGAL([{"params": [W], "rank": 6}], lr=1e-2, update_gap=3)
    grads = _grads(W.shape, 4)
    for G in grads[:3]:
        _step(opt, W, G)
    assert opt.state[W]["inner_step"] == 3
    _step(opt, W, grads[3])
    assert opt.state[W]["inner_step"] == 1  # bias-correction clock restarted with the new subspace


def test_frugal_block_selector_keeps_state_only_for_active_tensors():
    params = [nn.Parameter(torch.randn(12, 10)) for _ in range(8)]
    opt = rw.optim.FRUGAL([{"params": params, "rank": 2}], lr=1e-2, density=0.25, selector="block",
                          block_order="ascending", update_gap=2)
    g = torch.Generator().manual_seed(0)
    actives = []
    for _ in range(4):
        before = [p.detach().clone() for p in params]
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
        active = [i for i, p in enumerate(params) if opt.state[p]["active"]]
        actives.append(active)
        for i, p in enumerate(params):
            st = opt.state[p]
            if i in active:
                assert st["exp_avg"].shape == p.shape
            else:
                assert "exp_avg" not in st
                assert torch.equal(p.detach(), before[i].add(p.grad.sign(), alpha=-1e-2))
    assert actives == [[0, 1], [0, 1], [2, 3], [2, 3]]


# ----------------------------------------------------------------------------- APOLLO


def _no_svd(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("SVD called")

    monkeypatch.setattr(torch.linalg, "svd", boom)
    monkeypatch.setattr(torch, "svd", boom)


@pytest.mark.parametrize("shape,side", [((24, 40), "left"), ((40, 24), "right")])
def test_apollo_channel_scaling_seeded_projection_and_no_svd(monkeypatch, shape, side):
    _no_svd(monkeypatch)
    r, T = 3, 2
    W = _param(shape)
    opt = rw.optim.APOLLO([{"params": [W], "rank": r}], lr=1e-2, update_gap=T, seed=10)
    seeds = []
    for G in _grads(shape, 5, dtype=F64):
        dW = _step(opt, W, G)
        st = opt.state[W]
        ratio = dW / G
        # update / G is constant within each channel (rows for right projection, columns for left)
        spread = ratio.std(dim=0) if side == "left" else ratio.std(dim=1)
        assert spread.max() < 1e-10 * ratio.abs().max()
        across = ratio.std(dim=1) if side == "left" else ratio.std(dim=0)
        assert across.max() > 1e-3 * ratio.abs().max()  # ... but differs between channels
        tensors = {k: v for k, v in st.items() if torch.is_tensor(v)}
        low = (r, shape[1]) if side == "left" else (shape[0], r)
        assert set(tensors) == {"exp_avg", "exp_avg_sq", "limiter_norm"}
        assert tensors["exp_avg"].shape == low and tensors["limiter_norm"].numel() == 1
        seeds.append(st["proj_seed"])
        P = opt.projector(W).matrix(st)
        pshape = (shape[0], r) if side == "left" else (r, shape[1])
        assert torch.equal(P, pj.seeded_gaussian(pshape, st["proj_seed"], torch.device("cpu"), F64) / math.sqrt(r))
    first = 10 + 1  # seed + parameter index
    second = pj.advance_seed(first)
    assert seeds == [first, first, second, second, pj.advance_seed(second)]


def test_apollo_mini_is_rank_one_tensor_wise(monkeypatch):
    _no_svd(monkeypatch)
    W = _param((40, 24))
    opt = rw.optim.APOLLOMini([{"params": [W], "rank": 8}], lr=1e-3)
    for G in _grads(W.shape, 3, dtype=F64):
        dW = _step(opt, W, G)
        ratio = dW / G
        assert ratio.std() < 1e-10 * ratio.abs().max()  # one scale for the whole tensor
    assert opt.state[W]["exp_avg"].shape == (40, 1)


# ----------------------------------------------------------------------------- GradNormLoRP


def test_weight_norm_gradients_match_autograd():
    V0 = torch.randn(6, 5, dtype=torch.float64)
    V0 = V0 / V0.norm(dim=1, keepdim=True)
    g0 = torch.rand(6, dtype=torch.float64) + 0.5
    gW = torch.randn(6, 5, dtype=torch.float64)
    V = V0.clone().requires_grad_()
    g = g0.clone().requires_grad_()
    W = g.unsqueeze(1) * V / V.norm(dim=1, keepdim=True)
    (W * gW).sum().backward()
    grad_g, grad_V = weight_norm_grads(V0, g0, gW)
    assert torch.allclose(grad_g, g.grad) and torch.allclose(grad_V, V.grad)
    assert torch.allclose((grad_V * V0).sum(1), torch.zeros(6, dtype=torch.float64), atol=1e-12)


def test_gradnormlorp_magnitude_equals_row_norms_and_model_stays_dense():
    model = make_tiny_llama().train()
    opt = rw.optim.make("gradnormlorp", model, rank=4, lr=1e-2, update_gap=2, weight_decay=0.01)
    batch = lm_batches(n=1)[0]
    for _ in range(4):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    q = model.model.layers[0].self_attn.q_proj
    assert type(q) is nn.Linear  # same inference graph: plain dense weights
    for group in opt.param_groups:
        if "rank" not in group:
            continue
        for p in group["params"]:
            st = opt.state[p]
            assert torch.allclose(p.detach().norm(dim=1), st["magnitude"], rtol=1e-5)
            assert 4 in st["exp_avg"].shape and st["exp_avg"].numel() == 4 * max(p.shape)
    x = torch.randn(3, 32)
    assert torch.equal(q(x), F.linear(x, q.weight))


def test_gradnormlorp_direction_update_is_low_rank_before_normalisation():
    W = _param((20, 12))
    opt = rw.optim.GradNormLoRP([{"params": [W], "rank": 2}], lr=1e-2, update_gap=100)
    G = _grads(W.shape, 1, dtype=F64)[0]
    V0 = W.detach() / W.detach().norm(dim=1, keepdim=True)
    _step(opt, W, G)
    st = opt.state[W]
    V1 = W.detach() / st["magnitude"].unsqueeze(1)
    assert torch.allclose(V1.norm(dim=1), torch.ones(20, dtype=F64))
    # each new direction row is (V0 − δ)/‖V0 − δ‖ with δ in the row space of P (right projector, 2×12):
    # undo the per-row normalisation with the scalar that cancels the out-of-subspace part
    P = st["P"]
    comp = lambda X: X - (X @ P.t()) @ P  # noqa: E731
    s = (comp(V0) * comp(V1)).sum(1, keepdim=True) / (comp(V1) ** 2).sum(1, keepdim=True)
    delta = V0 - s * V1
    assert comp(delta).abs().max() < 1e-10
    assert torch.linalg.matrix_rank(delta, rtol=1e-9).item() <= 2
    assert delta.abs().max() > 1e-4


# ----------------------------------------------------------------------------- Flora


def test_flora_state_seeds_transfer_and_high_rank_accumulation():
    m, n, r, T = 30, 20, 2, 3
    W = nn.Parameter(torch.randn(m, n))
    W0 = W.detach().clone()
    opt = rw.optim.Flora([{"params": [W], "rank": r}], lr=1e-2, update_gap=T, beta1=0.9)
    grads = _grads((m, n), 9, lowrank=1)
    momenta, seeds = [], []
    for _t, G in enumerate(grads):
        _step(opt, W, G)
        st = opt.state[W]
        # only compressed (m×r) momentum, factored second moment (m + n) and ints are stored
        assert {k: tuple(v.shape) for k, v in st.items() if torch.is_tensor(v)} == {
            "exp_avg": (m, r), "exp_avg_sq_row": (m,), "exp_avg_sq_col": (n,)}
        seeds.append(st["proj_seed"])
        M = opt.momentum(W)
        assert torch.linalg.matrix_rank(M).item() <= r
        momenta.append(M)
    assert st["resamples"] == 3 and len(set(seeds)) == 4
    proj = opt.projector(W)
    assert torch.equal(proj.regenerate(seeds[-1]), proj.regenerate(seeds[-1]))
    # the momentum of each window lives in a different random subspace: together they exceed rank r
    window_sum = sum(momenta[i] for i in (1, 4, 7))
    assert torch.linalg.matrix_rank(window_sum).item() > r
    assert torch.linalg.matrix_rank(W.detach() - W0).item() > r


def test_flora_resample_transfers_momentum_to_the_new_projection():
    m, n, r = 30, 20, 3
    W = nn.Parameter(torch.randn(m, n))
    opt = rw.optim.Flora([{"params": [W], "rank": r}], lr=1e-2, update_gap=2, beta1=0.9)
    _step(opt, W, torch.randn(m, n))
    st = opt.state[W]
    proj = opt.projector(W)
    old = proj.back(st["exp_avg"], st).clone()
    _step(opt, W, torch.zeros(m, n))  # step 2 resamples; a zero gradient adds nothing new
    assert st["resamples"] == 1
    expected = 0.9 * proj.project(old, st)  # C ← β·down_new(up_old(C))
    assert torch.allclose(st["exp_avg"], expected, atol=1e-6)


# ----------------------------------------------------------------------------- Online Subspace Descent


def test_osd_never_calls_svd_and_moves_p_a_little_every_step(monkeypatch):
    _no_svd(monkeypatch)
    W = nn.Parameter(torch.randn(32, 20))
    opt = rw.optim.OnlineSubspaceDescent([{"params": [W], "rank": 4}], lr=1e-3, update_gap=100)
    prev = None
    for G in _grads(W.shape, 5):
        _step(opt, W, G)
        P = opt.state[W]["P"].clone()
        if prev is not None:
            rel = ((P - prev).norm() / prev.norm()).item()
            assert 0.0 < rel < 0.1  # a small online step, not a replacement
        prev = P
    assert opt.state[W]["P_step"] == 5


def test_osd_online_pca_reduces_the_projection_residual_for_a_fixed_gradient():
    G = _grads((32, 20), 1, lowrank=4)[0] + 0.01 * torch.randn(32, 20)
    proj = pj.make_projector("online", 4, "right", (32, 20), {"proj_lr": 0.05})
    state = {"seed": 0}
    proj.compute(G, state)

    def residual():
        P = state["P"]
        return (G - G @ P.t() @ P).norm().item()

    values = [residual()]
    for _ in range(150):
        proj.post_update(G, state)
        values.append(residual())
    assert values[-1] < 0.2 * values[0]
    assert all(b <= a * 1.05 for a, b in zip(values[::10], values[10::10], strict=False))


# ----------------------------------------------------------------------------- DCT


@pytest.mark.parametrize("norm", [1.0, 2.0])
@pytest.mark.parametrize("shape,side", [((24, 40), "left"), ((40, 24), "right")])
def test_dct_projector_stores_indices_of_the_top_r_dct_columns(monkeypatch, norm, shape, side):
    _no_svd(monkeypatch)
    r = 5
    W = nn.Parameter(torch.randn(shape))
    opt = rw.optim.DCTGaLore([{"params": [W], "rank": r}], lr=1e-2, update_gap=2, dct_norm=norm)
    for G in _grads(shape, 3):
        before = opt.state[W].get("idx")
        _step(opt, W, G)
        st = opt.state[W]
        assert {k for k, v in st.items() if torch.is_tensor(v) and v.is_floating_point()} == {"exp_avg", "exp_avg_sq"}
        idx = st["idx"]
        assert idx.dtype == torch.int64 and idx.shape == (r,)
        D = pj.dct_matrix(min(shape), dtype=torch.float64)
        scores = (D.t() @ G.double()).norm(p=norm, dim=1) if side == "left" else (G.double() @ D).norm(p=norm, dim=0)
        if before is None or not torch.equal(idx, before):  # refreshed on this gradient
            assert set(idx.tolist()) == set(torch.topk(scores, r).indices.tolist())
