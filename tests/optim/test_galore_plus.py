"""GaLore+: the refresh never runs an SVD (randomized subspace iteration only), all heads of a weight share
one basis found from one head's gradient block, and the sparse residual code keeps AdamW moments of
G − back(R) on the ⌈ρ·m·n⌉ entries with the largest warm-up |G − back(R)|, whose update is added to GaLore's."""

from __future__ import annotations

import math

import pytest
import torch

import rankwise as rw
from rankwise.optim.residual import sparse_code

HEADS, HEAD_DIM, WIDTH, RANK = 4, 8, 16, 3


def _heads_gradient(seed: int, side: str = "right") -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A gradient whose head blocks are exactly rank RANK, each with its own subspace on the shared side:
    rows are heads for a right projection ((H·d) × n), columns for a left one (m × (H·d)). Returns G and the
    orthonormal basis of each head's shared-side subspace."""
    g = torch.Generator().manual_seed(seed)
    blocks, bases = [], []
    for _ in range(HEADS):
        q = torch.linalg.qr(torch.randn(WIDTH, RANK, generator=g)).Q  # the shared side (WIDTH)
        coef = torch.randn(HEAD_DIM, RANK, generator=g) * torch.tensor([4.0, 2.0, 1.0])
        blocks.append(coef @ q.t())  # HEAD_DIM × WIDTH
        bases.append(q)
    G = torch.cat(blocks, dim=0)
    return (G, bases) if side == "right" else (G.t().contiguous(), bases)


def _opt(W, **kwargs):
    options = {"lr": 1e-2, "update_gap": 100, "head_dim": HEAD_DIM, "residual_warmup": 1, **kwargs}
    return rw.optim.GaLorePlus([{"params": [W], "rank": RANK}], **options)


def _no_svd(*args, **kwargs):
    raise AssertionError("GaLore+ refreshes without an SVD")


@pytest.mark.parametrize("side", ["right", "left"])
def test_one_basis_for_every_head_from_one_heads_gradient_and_no_svd(side, monkeypatch):
    G, bases = _heads_gradient(0, side)
    W = torch.nn.Parameter(torch.zeros_like(G))
    opt = _opt(W, update_gap=2)
    for name in ("svd", "svdvals"):
        monkeypatch.setattr(torch.linalg, name, _no_svd)
    monkeypatch.setattr(torch, "svd", _no_svd)
    heads = set()
    for step in range(6):  # refreshes at steps 0, 2, 4
        W.grad = _heads_gradient(step // 2, side)[0] if step else G
        opt.step()
        st = opt.state[W]
        P = opt.projector(W).matrix(st)
        assert opt.projector(W).side == side
        assert P.shape == ((RANK, WIDTH) if side == "right" else (WIDTH, RANK))  # one P, not one per head
        if step % 2 == 0:
            j = st["head"]
            heads.add(j)
            q = _heads_gradient(step // 2, side)[1][j]
            basis = P.t() if side == "right" else P
            # P spans exactly head j's subspace (and so not the other heads')
            torch.testing.assert_close(basis - q @ (q.t() @ basis), torch.zeros_like(basis), atol=1e-4, rtol=0)
            others = [k for k in range(HEADS) if k != j]
            q_other = _heads_gradient(step // 2, side)[1][others[0]]
            assert torch.linalg.matrix_norm(basis - q_other @ (q_other.t() @ basis)) > 0.1
    assert "svd_fallbacks" not in opt.state[W]
    assert len(heads) > 1  # the head is drawn again at each refresh
    # every head's block is projected by the same P: the first moment is (1 − β₁)^… of G·Pᵀ (or PᵀG) at once
    W2 = torch.nn.Parameter(torch.zeros_like(G))
    opt2 = _opt(W2)
    W2.grad = G
    opt2.step()
    P = opt2.projector(W2).matrix(opt2.state[W2])
    R = G @ P.t() if side == "right" else P.t() @ G
    torch.testing.assert_close(opt2.state[W2]["exp_avg"], 0.1 * R)


def test_sparse_residual_code_on_the_largest_warmup_entries_and_its_update():
    torch.manual_seed(0)
    W0 = torch.randn(32, WIDTH)
    grads = [torch.randn(32, WIDTH) for _ in range(4)]
    density, warmup = 0.05, 2
    s = math.ceil(density * W0.numel())

    def run(residual: bool):
        W = torch.nn.Parameter(W0.clone())
        opt = _opt(W, residual_density=density, residual_warmup=warmup)
        if not residual:
            opt.param_groups[0]["residual"] = "none"
        snaps = []
        for G in grads:
            W.grad = G.clone()
            opt.step()
            snaps.append(W.detach().clone())
        return opt, W, snaps

    opt, W, with_res = run(True)
    _, _, without = run(False)
    st = opt.state[W]
    P = opt.projector(W).matrix(st)
    resid = [G - G @ P.t() @ P for G in grads]  # update_gap=100: one basis throughout
    index = st["res_index"]
    assert index.shape == (s,) and st["res_m"].shape == (s,)
    expected = torch.topk((resid[0].abs() + resid[1].abs()).reshape(-1), s).indices.sort().values
    assert torch.equal(index, expected)
    for D in resid:
        code = sparse_code(D.reshape(-1)[index], index, tuple(D.shape))
        assert int(torch.count_nonzero(code)) == s
        assert torch.linalg.matrix_norm(D - code) < torch.linalg.matrix_norm(D)
    # the first warm-up step is GaLore's; from the step that fixes Ω on, the difference is the sparse AdamW
    torch.testing.assert_close(with_res[0], without[0], atol=0, rtol=0)
    m = torch.zeros(s)
    v = torch.zeros(s)
    correction = torch.zeros(W0.numel())
    for t, D in enumerate(resid[1:], start=1):
        d = D.reshape(-1)[index]
        m = 0.9 * m + 0.1 * d
        v = 0.999 * v + 0.001 * d * d
        ct = math.sqrt(1 - 0.999**t) / (1 - 0.9**t)
        correction[index] -= 1e-2 * 0.25 * ct * m / (v.sqrt() + 1e-6)
        diff = (with_res[t] - without[t]).reshape(-1)
        assert int(torch.count_nonzero(diff)) <= s
        torch.testing.assert_close(diff, correction, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(st["res_m"], m)


def test_bad_options_name_the_parameter():
    W = torch.nn.Parameter(torch.zeros(32, WIDTH))
    with pytest.raises(ValueError, match="head_dim=5"):
        _opt(W, head_dim=5)  # does not divide the 32 rows
    with pytest.raises(ValueError, match="head_dim=2 must .* at least rank=3"):
        _opt(W, head_dim=2)
    with pytest.raises(ValueError, match="residual_density"):
        _opt(W, residual_density=0.0)
    with pytest.raises(ValueError, match="residual_warmup"):
        _opt(W, residual_warmup=0)
