"""Weight refactorization + momentum reset (Glentis et al. 2025) on low-rank layers trained from scratch."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import rankwise as rw
from rankwise.linalg import rebalanced_factors
from rankwise.sparse import FactorizedLinear, RefactorReset, SparseLowRankLinear
from rankwise.train import TrainConfig, train

from ..conftest import lm_batches, make_tiny_llama


def setup(rank: int = 4, lr: float = 1e-2, **kwargs):
    model = rw.sparsify(make_tiny_llama(), "refactor_reset", rank=rank)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    return model, opt, RefactorReset(model, opt, **kwargs)


def adam_steps(model, opt, n: int, ctl=None) -> list:
    done = []
    for batch in lm_batches(n=n, batch=2, seq=8):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
        if ctl is not None:
            done.append(ctl.step())
    return done


def test_rebalanced_factors_keep_the_product_and_split_sigma_evenly():
    g = torch.Generator().manual_seed(0)
    b, a = torch.randn(12, 3, generator=g, dtype=torch.float64) * 7, torch.randn(3, 9, generator=g, dtype=torch.float64)
    nb, na = rebalanced_factors(b, a)
    torch.testing.assert_close(nb @ na, b @ a)
    s = torch.linalg.svdvals(b @ a)[:3]
    torch.testing.assert_close(nb.norm(dim=0), s.sqrt())  # column i of B and row i of A: √σ_i each
    torch.testing.assert_close(na.norm(dim=1), s.sqrt())
    torch.testing.assert_close(nb.T @ nb, torch.diag(s))  # B = U√Σ: orthogonal columns


def test_refactorization_keeps_the_function_and_balances_the_factors():
    model, opt, ctl = setup(refactor_every=1000)
    adam_steps(model, opt, 2)
    layers = [m for m in model.modules() if isinstance(m, FactorizedLinear)]
    assert len(layers) == 14
    with torch.no_grad():
        for m in layers:  # an unbalanced factorization of the same product
            m.U.mul_(4.0)
            m.V.div_(4.0)
    products = [m.dense_weight().detach().clone() for m in layers]
    ids = torch.randint(1, 100, (2, 8))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    assert all(float(m.U.detach().norm()) > 2 * float(m.V.detach().norm()) for m in layers)
    ctl.refactorize()
    for m, w in zip(layers, products, strict=True):
        torch.testing.assert_close(m.dense_weight(), w, atol=1e-5, rtol=1e-5)  # B·A unchanged
        torch.testing.assert_close(m.U.norm(), m.V.norm(), atol=0, rtol=1e-5)  # ‖B‖_F = ‖A‖_F
        torch.testing.assert_close(m.U.norm(dim=0), m.V.norm(dim=1), atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, atol=1e-5, rtol=1e-5)


def test_reset_zeroes_the_factor_moments_and_nothing_else():
    model, opt, ctl = setup(refactor_every=1000)
    adam_steps(model, opt, 3)
    factors = {id(p) for m in model.modules() if isinstance(m, FactorizedLinear) for p in (m.U, m.V)}
    others = [p for p in model.parameters() if id(p) not in factors]
    assert len(factors) == 28 and others
    snapshot = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in others}
    ctl.reset()
    for p in model.parameters():
        state = opt.state[p]
        if id(p) in factors:
            assert torch.count_nonzero(state["exp_avg"]) == 0 and torch.count_nonzero(state["exp_avg_sq"]) == 0
            assert float(state["step"]) == 0
        else:
            assert all(torch.equal(v, snapshot[id(p)][k]) for k, v in state.items())
            assert torch.count_nonzero(state["exp_avg"]) > 0
    # the next update of a factor is a first Adam step: the same as with a fresh optimizer state
    layer = next(m for m in model.modules() if isinstance(m, FactorizedLinear))
    fresh = torch.optim.AdamW([layer.U.detach().clone().requires_grad_()], lr=1e-2)
    batch = lm_batches(n=1, batch=2, seq=8, seed=5)[0]
    model(**batch).loss.backward()
    fresh.param_groups[0]["params"][0].grad = layer.U.grad.clone()
    opt.step()
    fresh.step()
    torch.testing.assert_close(layer.U.detach(), fresh.param_groups[0]["params"][0].detach())


def test_intervals_are_honoured():
    model, opt, ctl = setup(refactor_every=3, reset_every=2)
    layer = next(m for m in model.modules() if isinstance(m, FactorizedLinear))
    norms = []
    moments = []

    class Spy:
        def step(self):
            done = ctl.step()
            norms.append(float(layer.U.detach().norm() - layer.V.detach().norm()))
            moments.append(int(torch.count_nonzero(opt.state[layer.U]["exp_avg"])))
            return done

    done = adam_steps(model, opt, 6, Spy())
    assert done == [(False, False), (False, True), (True, False), (False, True), (False, False), (True, True)]
    assert (ctl.steps, ctl.refactors, ctl.resets) == (6, 2, 3)
    assert [m == 0 for m in moments] == [False, True, False, True, False, True]
    assert abs(norms[2]) < 1e-5 and abs(norms[5]) < 1e-5  # balanced right after a refactorization ...
    assert abs(norms[4]) > 1e-5  # ... and drifting in between
    assert RefactorReset(model, opt).reset_every == 200  # reset_every follows refactor_every by default


def test_resume_is_bit_exact(tmp_path):
    def run(steps: int, out, resume=None):
        torch.manual_seed(0)
        model = rw.sparsify(make_tiny_llama(), "refactor_reset", rank=4)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        ctl = RefactorReset(model, opt, refactor_every=3, reset_every=2)
        cfg = dataclasses.replace(TrainConfig.plain(steps), checkpoint_every=2, output_dir=str(out))
        train(model, lm_batches(n=6, batch=2, seq=8), config=cfg, optimizer=opt, callbacks=[ctl], resume_from=resume)
        return model, ctl

    full, ctl_full = run(6, tmp_path / "a")
    run(4, tmp_path / "b")
    resumed, ctl_res = run(6, tmp_path / "c", resume=tmp_path / "b")
    assert ctl_res.state_dict() == ctl_full.state_dict() == {"steps": 6, "refactors": 2, "resets": 3}
    for (n, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), n


def test_works_on_sltrain_factors_and_leaves_the_sparse_part():
    model = rw.sparsify(make_tiny_llama(), "sltrain", rank=4, density=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ctl = RefactorReset(model, opt, refactor_every=1)
    layer = next(m for m in model.modules() if isinstance(m, SparseLowRankLinear))
    adam_steps(model, opt, 2)
    values = layer.values.detach().clone()
    weight = layer.dense_weight()
    ctl.refactorize()
    torch.testing.assert_close(layer.dense_weight(), weight, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.B.norm(), layer.A.norm(), atol=0, rtol=1e-5)
    assert torch.equal(layer.values.detach(), values)


def test_bad_input():
    model, opt, _ = setup()
    with pytest.raises(ValueError, match="refactor_every=0 must be an integer >= 1"):
        RefactorReset(model, opt, refactor_every=0)
    with pytest.raises(ValueError, match="reset_every=0 must be an integer >= 1"):
        RefactorReset(model, opt, reset_every=0)
    with pytest.raises(ValueError, match="no low-rank factorized layers"):
        RefactorReset(make_tiny_llama(), opt)
    with pytest.raises(ValueError, match="optimizer must hold every factor"):
        RefactorReset(model, torch.optim.AdamW([model.get_submodule("model.embed_tokens").weight]))
    with pytest.raises(ValueError, match="rank=40 is larger than min"):
        rw.sparsify(make_tiny_llama(), "refactor_reset", rank=40)
