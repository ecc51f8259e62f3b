"""The projected-optimizer engine: projectors, inner updates, quantization, validation, state dicts."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.optim import inner as inner_mod
from rankwise.optim import projectors as pj
from rankwise.optim import quant
from rankwise.optim.projected import ProjectedOptimizer

from ..conftest import make_tiny_bert


def _lowrank_plus_noise(m: int, n: int, r: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, r, generator=g)).Q
    V = torch.linalg.qr(torch.randn(n, r, generator=g)).Q
    s = torch.linspace(10.0, 5.0, r)
    return U @ torch.diag(s) @ V.t() + 0.01 * torch.randn(m, n, generator=g)


# ----------------------------------------------------------------------------- sides and projectors


@pytest.mark.parametrize(
    "side,shape,expected",
    [("std", (8, 4), "right"), ("std", (4, 8), "left"), ("reverse_std", (8, 4), "left"),
     ("reverse_std", (4, 8), "right"), ("left", (8, 4), "left"), ("right", (4, 8), "right")],
)
def test_resolve_side_follows_galore_proj_type(side, shape, expected):
    assert pj.resolve_side(side, shape) == expected


def test_resolve_side_rejects_unknown():
    with pytest.raises(ValueError, match="proj_side"):
        pj.resolve_side("full", (4, 4))


@pytest.mark.parametrize("name", pj.PROJECTORS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_every_projector_shapes_and_back_projection(name, side):
    m, n, r = 24, 16, 4
    G = _lowrank_plus_noise(m, n, r)
    proj = pj.make_projector(name, r, side, (m, n), {"update_gap": 10})
    state = {"seed": 3}
    proj.compute(G, state)
    R = proj.project(G, state)
    assert R.shape == ((r, n) if side == "left" else (m, r))
    back = proj.back(R, state)
    assert back.shape == (m, n)
    B = proj.basis(state)
    assert B.shape == ((m if side == "left" else n), r)
    # back(N) always lies in span(B) on the projected side
    X = back if side == "left" else back.t()
    res = X - B @ torch.linalg.lstsq(B, X).solution
    assert res.abs().max() < 1e-4


def test_svd_projector_is_galore_top_singular_vectors():
    G = _lowrank_plus_noise(20, 12, 3)
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    assert torch.allclose(pj.svd_basis(G, 3, "left"), U[:, :3])
    assert torch.allclose(pj.svd_basis(G, 3, "right"), Vh[:3])


def _subspace_error(A: torch.Tensor, B: torch.Tensor) -> float:
    """sin of the largest principal angle between the column spaces of orthonormal A and B."""
    return torch.linalg.matrix_norm(A - B @ (B.t() @ A), ord=2).item()


def test_randomized_svd_finds_the_svd_subspace_and_warm_starts():
    G = _lowrank_plus_noise(64, 48, 6)
    exact = pj.svd_basis(G, 6, "left")
    gen = torch.Generator().manual_seed(0)
    approx, projected = pj.randomized_left_basis(G, 6, oversample=4, power_iters=2, generator=gen)
    assert _subspace_error(exact, approx) < 1e-3
    torch.testing.assert_close(projected, approx.t() @ G, rtol=1e-5, atol=1e-5)  # UᵀA comes for free
    # warm start from the exact basis with no extra random direction and no power iteration stays exact
    warm, _ = pj.randomized_left_basis(G, 6, oversample=0, power_iters=0, start=exact)
    assert _subspace_error(exact, warm) < 1e-4
    # a bfloat16 sketch finds the same subspace; the Rayleigh-Ritz step keeps U orthonormal in float32
    low, low_projected = pj.randomized_left_basis(G, 6, oversample=4, power_iters=2, generator=gen,
                                                  power_dtype=torch.bfloat16)
    assert low.dtype == torch.float32 and _subspace_error(exact, low) < 1e-2
    torch.testing.assert_close(low.t() @ low, torch.eye(6), rtol=0, atol=1e-5)
    torch.testing.assert_close(low_projected, low.t() @ G, rtol=1e-5, atol=1e-5)
    # one power round from a perturbed previous basis moves towards the SVD subspace
    rough = torch.linalg.qr(exact + 0.3 * torch.randn(64, 6, generator=gen)).Q
    better, _ = pj.randomized_left_basis(G, 6, oversample=2, power_iters=1, start=rough, generator=gen)
    assert _subspace_error(exact, better) < 0.1 * _subspace_error(exact, rough)
    # projector keeps a seed chain and reuses the previous basis
    proj = pj.make_projector("rsvd", 6, "right", (64, 48), {"power_dtype": "float32"})
    state = {"seed": 1}
    projected = proj.compute(G, state)
    torch.testing.assert_close(projected, proj.project(G, state), rtol=1e-5, atol=1e-5)
    first_seed = state["proj_seed"]
    proj.compute(G, state)
    assert state["proj_seed"] == pj.advance_seed(first_seed)
    assert _subspace_error(pj.svd_basis(G, 6, "right").t(), state["P"].t()) < 1e-3


def test_rsvd_power_dtype_auto_is_float32_on_every_cpu():
    cpu = torch.device("cpu")
    assert pj.power_dtype("float32", cpu) is None
    assert pj.power_dtype("bfloat16", cpu) is torch.bfloat16
    assert pj.power_dtype("auto", cpu) is None  # the same numerics on AVX2 and AVX-512 machines


def test_gaussian_projector_stores_only_a_seed_and_regenerates_bit_exactly():
    proj = pj.make_projector("gaussian", 4, "right", (10, 30))
    state = {"seed": 7}
    proj.compute(torch.randn(10, 30), state)
    assert [k for k, v in state.items() if torch.is_tensor(v)] == []
    P = proj.matrix(state)
    fresh = pj.make_projector("gaussian", 4, "right", (10, 30))  # e.g. after loading a state dict
    assert torch.equal(fresh.matrix(state), P)
    assert torch.equal(P, pj.seeded_gaussian((4, 30), 7, torch.device("cpu"), torch.float32) / 2.0)


def test_dct_matrix_is_orthonormal_dct_ii():
    N = 12
    Q = pj.dct_matrix(N, dtype=torch.float64)
    assert torch.allclose(Q.t() @ Q, torch.eye(N, dtype=torch.float64), atol=1e-12)
    x = torch.randn(N, dtype=torch.float64)
    # DCT-II written out independently: X_k = c_k Σ_t x_t cos(π k (2t + 1) / 2N)
    X = torch.tensor([
        (math.sqrt(1 / N) if k == 0 else math.sqrt(2 / N))
        * sum(float(x[t]) * math.cos(math.pi * k * (2 * t + 1) / (2 * N)) for t in range(N))
        for k in range(N)
    ], dtype=torch.float64)
    assert torch.allclose(Q.t() @ x, X, atol=1e-12)


def test_coordinate_projectors_select_columns():
    G = torch.randn(6, 10)
    proj = pj.make_projector("coords", 3, "right", (6, 10))
    state = {"seed": 5}
    proj.compute(G, state)
    idx = state["idx"]
    assert idx.dtype == torch.int64 and idx.numel() == 3
    masked = torch.zeros_like(G)
    masked[:, idx] = G[:, idx]
    assert torch.equal(proj.back(proj.project(G, state), state), masked)
    blocks = pj.make_projector("blocks", 4, "right", (6, 10))
    st = {}
    starts = []
    for _ in range(4):
        blocks.compute(G, st)
        starts.append(st["idx"].tolist())
    assert starts[0] == [0, 1, 2, 3] and starts[1] == [4, 5, 6, 7] and starts[2] == [0, 1, 8, 9]


@pytest.mark.parametrize("side", ["left", "right"])
def test_online_pca_gradient_matches_autograd(side):
    G = torch.randn(9, 7, dtype=torch.float64)
    P = torch.randn(*((9, 3) if side == "left" else (3, 7)), dtype=torch.float64, requires_grad=True)
    Gh = G / G.norm()
    proj = P @ P.t() @ Gh if side == "left" else Gh @ P.t() @ P
    loss = ((proj - Gh) ** 2).sum()
    loss.backward()
    val, grad = pj.online_pca_grad(P.detach(), G, side)
    assert torch.allclose(val, loss.detach())
    assert torch.allclose(grad, P.grad)


# ----------------------------------------------------------------------------- quantization


def test_blockwise_8bit_roundtrip_keeps_relative_precision():
    x = torch.randn(1000) * torch.logspace(-3, 0, 1000)
    for signed, data in ((True, x), (False, x * x)):
        q, absmax = quant.quantize_blockwise(data, signed, block=256)
        assert q.dtype == torch.uint8 and q.numel() == data.numel() and absmax.numel() == 4
        back = quant.dequantize_blockwise(q, absmax, signed, data.shape, block=256)
        big = data.abs() > 1e-4 * absmax.repeat_interleave(256)[: data.numel()]
        rel = ((back - data).abs() / data.abs())[big]
        assert rel.max() < 0.06  # geometric codebook: ≤ ~5.6% relative error per value


@pytest.mark.parametrize("signed", [True, False])
def test_code_index_is_the_nearest_level_search(signed):
    """The O(1) geometric code equals a binary search over the thresholds (random values, tiny
    magnitudes down to the zero code, the codebook itself), except within float rounding of a threshold."""
    code, thr = quant.dynamic_code(signed)
    g = torch.Generator().manual_seed(0)
    sign = (torch.randint(0, 2, (50_000,), generator=g) * 2 - 1) if signed else 1
    values = torch.cat([
        (torch.rand(50_000, generator=g) * 2 - 1) if signed else torch.rand(50_000, generator=g),
        sign * (torch.randn(50_000, generator=g) * 4).exp() * 1e-8,
        code, torch.zeros(1),
    ]).clamp(-1.0 if signed else 0.0, 1.0)
    near = ((values.unsqueeze(1) - thr).abs() <= 1e-5 * thr.abs()).any(1)
    assert near.float().mean() < 0.01
    got, want = quant.code_index(values, signed), torch.searchsorted(thr, values)
    assert got.dtype == torch.uint8
    assert torch.equal(got[~near].long(), want[~near])
    assert (got[near].long() - want[near]).abs().max() <= 1


def test_int4_pack_roundtrip_and_error():
    q = torch.randint(0, 16, (37,), dtype=torch.uint8)
    packed = quant.pack_int4(q)
    assert packed.numel() == 19 and packed.dtype == torch.uint8
    assert torch.equal(quant.unpack_int4(packed, 37), q)
    w = torch.randn(40, 8)
    p, s, z = quant.quantize_int4(w, group=64)
    back = quant.dequantize_int4(p, s, z, w.shape, group=64)
    step = s.repeat_interleave(64)[: w.numel()].view(w.shape)
    assert ((back - w).abs() <= 0.5 * step + 1e-6).all()


def test_stochastic_rounding_is_unbiased():
    x = torch.full((200_000,), 0.3) + torch.arange(200_000) % 7
    gen = torch.Generator().manual_seed(0)
    r = quant.stochastic_round(x, gen)
    assert torch.equal(r, r.round())
    assert set((r - x.floor()).unique().tolist()) <= {0.0, 1.0}
    assert abs((r - x).mean().item()) < 5e-3
    # the INT8 quantizer built on it is unbiased too: averaged dequantized weights converge to w
    w = torch.randn(512)
    acc = torch.zeros_like(w)
    for _ in range(400):
        q, s, z = quant.quantize_int8_stochastic(w, 256, gen)
        acc += quant.dequantize_int8(q, s, z, w.shape, 256)
    wg = w.view(2, 256)
    step = ((wg.amax(1) - wg.amin(1)) / 255).unsqueeze(1)
    # Q-GaLore's weights live on a full INT8 grid: 256 levels per group (a 7-bit grid would use 128)
    torch.testing.assert_close(s, step.squeeze(1))
    assert int(q.max()) > 127
    # the group's min/max can sit half a step outside the grid (rounded zero point) and get clamped
    interior = (wg > wg.amin(1, keepdim=True) + step) & (wg < wg.amax(1, keepdim=True) - step)
    err = (acc / 400 - w).abs().view(2, 256)
    assert (err[interior] < 0.2 * step.expand_as(wg)[interior]).all()


# ----------------------------------------------------------------------------- inner updates


def test_adamw8bit_tracks_fp32_adamw():
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(64, 80, generator=g) for _ in range(20)]
    group = {"betas": (0.9, 0.999), "eps": 1e-8, "correct_bias": True, "min_8bit_size": 1}
    s32, s8 = {}, {}
    for G in grads:
        N32, c32 = inner_mod.get_inner("adamw").update(G, s32, group, None)
        N8, c8 = inner_mod.get_inner("adamw8bit").update(G, s8, group, None)
    assert c32 == c8
    assert s8["exp_avg_q"].dtype == torch.uint8 and s8["exp_avg_sq_q"].dtype == torch.uint8
    assert "exp_avg" not in s8
    assert torch.nn.functional.cosine_similarity(N32.flatten(), N8.flatten(), dim=0) > 0.99


def test_ldadam_transition_permutation_is_exact_and_identity_is_noop():
    group = {"betas": (0.9, 0.999), "eps": 1e-6, "correct_bias": True}
    state = {}
    for _ in range(3):
        inner_mod.get_inner("adamw").update(torch.randn(4, 6), state, group, None)
    m, v = state["exp_avg"].clone(), state["exp_avg_sq"].clone()
    inner_mod.get_inner("adamw").transition(state, torch.eye(4), "left", group)
    assert torch.allclose(state["exp_avg"], m) and torch.allclose(state["exp_avg_sq"], v, rtol=1e-5)
    perm = torch.tensor([2, 0, 3, 1])
    T = torch.eye(4)[perm]
    inner_mod.get_inner("adamw").transition(state, T, "left", group)
    assert torch.allclose(state["exp_avg"], m[perm])
    assert torch.allclose(state["exp_avg_sq"], v[perm], rtol=1e-5, atol=1e-12)


# ----------------------------------------------------------------------------- validation


def _w(m=8, n=6):
    return nn.Parameter(torch.randn(m, n))


@pytest.mark.parametrize(
    "kwargs,group,match",
    [
        ({}, {"rank": 7}, "rank=7 is larger than min"),
        ({}, {"rank": 0}, "rank"),
        ({"update_gap": 0}, {"rank": 2}, "update_gap"),
        ({"proj_side": "full"}, {"rank": 2}, "proj_side"),
        ({"projector": "qr"}, {"rank": 2}, "projector"),
        ({"inner": "sgd"}, {"rank": 2}, "inner"),
        ({"residual": "both"}, {"rank": 2}, "residual"),
        ({"bogus": 1}, {"rank": 2}, "unknown option"),
        ({"inner": "adafactor", "reproject_moments": True}, {"rank": 2}, "reproject_moments"),
        ({"lr": -1.0}, {"rank": 2}, "lr"),
        ({"projector": "rsvd", "power_dtype": "float16"}, {"rank": 2}, "power_dtype='float16'.*bfloat16"),
    ],
)
def test_bad_input_raises_value_error_naming_the_parameter(kwargs, group, match):
    with pytest.raises(ValueError, match=match):
        ProjectedOptimizer([{"params": [_w()], **group}], **kwargs)


def test_non_2d_parameter_in_projected_group_raises():
    with pytest.raises(ValueError, match="only 2-D"):
        ProjectedOptimizer([{"params": [_w(), nn.Parameter(torch.randn(5))], "rank": 2}])


def test_make_rejects_unknown_names_and_lists_the_known_ones():
    with pytest.raises(ValueError, match="galore"):
        rw.optim.make("galore2", [_w()])
    with pytest.raises(ValueError, match="rank"):
        rw.optim.make("galore", [_w()], rank=2)


def test_named_optimizer_bad_options():
    W = _w()
    with pytest.raises(ValueError, match="density"):
        rw.optim.FRUGAL([{"params": [W], "rank": 2}], density=0.0)
    with pytest.raises(ValueError, match="selector"):
        rw.optim.FRUGAL([{"params": [W], "rank": 2}], selector="qr")
    with pytest.raises(ValueError, match="inactive_update_rule"):
        rw.optim.FRUGAL([{"params": [W], "rank": 2}], inactive_update_rule="adam")
    with pytest.raises(ValueError, match="scale_type"):
        rw.optim.APOLLO([{"params": [W], "rank": 2}], scale_type="row")
    with pytest.raises(ValueError, match="gamma_proj"):
        rw.optim.QGaLoreAdamW([{"params": [W], "rank": 2}], gamma_proj=0.5)
    with pytest.raises(ValueError, match="dct_norm"):
        rw.optim.DCTGaLore([{"params": [W], "rank": 2}], dct_norm=3)
    with pytest.raises(ValueError, match="inner"):
        rw.optim.OnlineSubspaceDescent([{"params": [W], "rank": 2}], inner="adafactor")
    with pytest.raises(ValueError, match="beta1"):
        rw.optim.Flora([{"params": [W], "rank": 2}], beta1=0.0)


# ----------------------------------------------------------------------------- groups


def test_param_groups_split_linear_weights_from_the_rest():
    model = make_tiny_bert()
    groups = rw.optim.param_groups(model, rank=4, update_gap=10)
    proj, plain = groups
    assert proj["rank"] == 4 and proj["update_gap"] == 10 and "rank" not in plain
    names = {id(p): n for n, p in model.named_parameters()}
    proj_names = {names[id(p)] for p in proj["params"]}
    assert all(n.endswith(".weight") and "classifier" not in n for n in proj_names)
    assert len(proj_names) == 2 * 6 + 1  # q,k,v,o,intermediate,output per layer + pooler
    plain_names = {names[id(p)] for p in plain["params"]}
    assert "classifier.weight" in plain_names and any("LayerNorm" in n for n in plain_names)
    assert any("embeddings" in n for n in plain_names)
    assert len(proj["params"]) + len(plain["params"]) == sum(1 for p in model.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="rank"):
        rw.optim.param_groups(model, rank=64)


# ----------------------------------------------------------------------------- state dicts


def _train(opt, params, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


@pytest.mark.parametrize("projector", ["dct", "svd_int4", "coords", "gaussian", "online"])
def test_state_dict_loads_weights_only_and_keeps_integer_dtypes(projector):
    W, b = _w(12, 10), nn.Parameter(torch.randn(12))
    opt = ProjectedOptimizer([{"params": [W], "rank": 3}, {"params": [b]}], projector=projector, update_gap=2)
    _train(opt, [W, b], 3)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    W2, b2 = nn.Parameter(W.detach().clone()), nn.Parameter(b.detach().clone())
    opt2 = ProjectedOptimizer([{"params": [W2], "rank": 3}, {"params": [b2]}], projector=projector, update_gap=2)
    opt2.load_state_dict(sd)
    for key, value in opt.state[W].items():
        other = opt2.state[W2][key]
        if torch.is_tensor(value):
            assert other.dtype == value.dtype and torch.equal(other, value), key
        else:
            assert other == value, key
    _train(opt, [W, b], 2, seed=1)
    _train(opt2, [W2, b2], 2, seed=1)
    assert torch.equal(W, W2) and torch.equal(b, b2)


def test_state_bytes_counts_every_tensor():
    W = _w(40, 30)
    opt = rw.optim.GaLoreAdamW([{"params": [W], "rank": 5}])
    _train(opt, [W], 1)
    # right projection (40 >= 30): moments 40×5 each, P 5×30
    assert opt.state_bytes() == 4 * (2 * 40 * 5 + 5 * 30)


K, D, RK = 40, 30, 5  # a 40×30 weight is projected on the right: moments K×r, projector r×D


@pytest.mark.parametrize(
    "name,kwargs,expected",
    [
        ("galore", {}, 4 * (2 * RK * K + RK * D)),
        ("fira", {}, 4 * (2 * RK * K + RK * D) + 4),
        ("apollo", {}, 4 * (2 * RK * K + RK * D) + 4),  # + the cached Gaussian P (r×d)
        ("apollo_mini", {}, 4 * (2 * K + D) + 4),
        ("dct_proj", {}, 4 * 2 * RK * K + 8 * RK + 4 * D * D),  # + the shared D×D DCT basis
        ("osd", {}, 4 * (2 * RK * K + 3 * RK * D)),
        ("flora_opt", {}, 4 * (RK * K + K + D + RK * D)),
        ("gradnormlorp", {}, 4 * (2 * RK * K + RK * D) + 4 * 3 * K),
        ("frugal", {"selector": "randk", "density": 0.2}, 4 * 2 * 6 * K + 8 * 6),
        ("galore_adafactor", {}, 4 * (K + RK + RK * D)),
        ("galore_8bit", {"min_8bit_size": 1}, 2 * RK * K + 8 * math.ceil(RK * K / 256) + 4 * RK * D),
        ("q_galore", {"min_8bit_size": 1, "queue_size": 5},
         2 * RK * K + 8 * math.ceil(RK * K / 256) + math.ceil(RK * D / 2) + 8 * math.ceil(RK * D / 256) + 4 * D),
    ],
)
def test_state_bytes_formulas_in_docs(name, kwargs, expected):
    W = _w(K, D)
    opt = rw.optim.make(name, [{"params": [W], "rank": 1 if name == "apollo_mini" else RK}], **kwargs)
    _train(opt, [W], 1)
    assert opt.state_bytes() == expected


def test_reproject_moments_rotates_the_first_moment_into_the_new_basis():
    W = _w(16, 12)
    opt = rw.optim.GaLoreAdamW([{"params": [W], "rank": 3}], update_gap=2, reproject_moments=True)
    _train(opt, [W], 2)
    st = opt.state[W]
    P_old, m_old = st["P"].clone(), st["exp_avg"].clone()
    W.grad = torch.randn(16, 12)
    G = W.grad.clone()
    b1 = 0.9
    opt.step()  # refresh at step 2: moments carried, then updated with the new R
    P_new = st["P"]
    T = P_new @ P_old.t()  # right side: B = Pᵀ, T = B_newᵀ B_old
    expected = b1 * (m_old @ T.t()) + (1 - b1) * (G @ P_new.t())
    assert torch.allclose(st["exp_avg"], expected, atol=1e-6)
