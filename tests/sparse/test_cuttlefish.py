"""Cuttlefish: the stable-rank detector, the scaled-stable-rank switch and a resume across it."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.sparse import Cuttlefish, FactorizedLinear, densify, stable_rank
from rankwise.sparse.cuttlefish import is_stable
from rankwise.train import TrainConfig, train

from ..conftest import lm_batches, make_tiny_llama


def spectrum_weight(singular_values: list[float], out: int, inp: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out, out, generator=g))
    v, _ = torch.linalg.qr(torch.randn(inp, inp, generator=g))
    k = len(singular_values)
    return u[:, :k] @ torch.diag(torch.tensor(singular_values)) @ v[:, :k].T


def numpy_detector(history: list[int], window: int, tail: int, tol: float) -> bool:
    """The reference's rule written with numpy: EMA (weight 2/(window+1)), np.gradient, mean of the tail."""
    if len(history) <= window:
        return False
    w = 2 / (window + 1)
    smooth = [history[0]]
    for h in history[1:]:
        smooth.append(w * h + (1 - w) * smooth[-1])
    return float(np.mean(np.abs(np.gradient(np.array(smooth)))[-tail:])) <= tol


def test_stable_rank_is_frobenius_over_spectral_squared_floored():
    w = spectrum_weight([3.0, 2.0, 2.0, 2.0], 12, 10)
    assert stable_rank(w) == math.floor((9 + 4 + 4 + 4) / 9)  # 2
    assert stable_rank(spectrum_weight([1.0] * 7 + [0.2], 12, 10)) == 7
    assert stable_rank(torch.zeros(4, 4)) == 1


def test_detector_waits_for_the_window_then_follows_the_smoothed_slope():
    rising = list(range(10, 40))  # slope 1 per measurement: never stable
    assert not any(is_stable(rising[:n], 5, 3, 0.1) for n in range(1, 31))
    settling = [40 - int(30 * 0.6**i) for i in range(30)]  # settles geometrically
    got = [is_stable(settling[:n], 5, 3, 0.1) for n in range(1, 31)]
    want = [numpy_detector(settling[:n], 5, 3, 0.1) for n in range(1, 31)]
    assert got == want
    first = got.index(True)
    assert 5 < first < 29  # not before the window, and it does settle
    # the raw (unsmoothed) sequence is flat earlier than its EMA: the smoothing delays the switch
    raw_first = next(n for n in range(6, 31) if np.mean(np.abs(np.gradient(np.array(settling[:n], float)))[-3:]) <= 0.1)
    assert raw_first - 1 < first
    g = torch.Generator().manual_seed(0)
    for _ in range(200):  # noisy settling sequences: same verdict as the numpy rule at every length
        seq = (20 + torch.randint(-1, 2, (25,), generator=g).cumsum(0) // 3).tolist()
        for n in range(1, 26):
            assert is_stable(seq[:n], 5, 3, 0.2) == numpy_detector(seq[:n], 5, 3, 0.2), (seq[:n])
    flat = [20] * 10
    assert not is_stable(flat[:5], 5, 3, 0.1) and is_stable(flat[:6], 5, 3, 0.1)


def one_layer_model(w0: torch.Tensor) -> nn.Module:
    model = nn.Sequential(nn.Linear(w0.shape[1], w0.shape[0]))
    with torch.no_grad():
        model[0].weight.copy_(w0)
    return model


def test_switch_rank_is_the_scaled_stable_rank_and_the_optimizer_gets_the_factors():
    """ξ = full / sr(W_init) from the start; at the switch k = min(full, ⌈sr(W)·ξ⌉), W ≈ U V by SVD."""
    w_init = spectrum_weight([4.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], 16, 12)  # sr = ⌊25/16⌋ = 1
    model = rw.sparsify(one_layer_model(w_init), "cuttlefish", targets=["0"])
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    cf = Cuttlefish(model, opt, interval=1, window=2, tail=2, tolerance=0.5)
    assert cf.scale["0"] == pytest.approx(12 / 1)  # full rank min(16, 12) over sr 1
    with torch.no_grad():
        model[0].weight.copy_(spectrum_weight([2.0, 2.0, 1.0], 16, 12, seed=1))  # sr = ⌊9/4⌋ = 2
    weight = model[0].weight
    switched = [cf.step() for _ in range(4)]
    assert switched.index(True) == 2  # 3 measurements > window 2, all equal: slope 0
    assert isinstance(model[0], FactorizedLinear)
    assert model[0].rank == 12  # min(12, ⌈2·12⌉)
    cf2_model = rw.sparsify(one_layer_model(w_init), "cuttlefish", targets=["0"])
    cf2 = Cuttlefish(cf2_model, torch.optim.SGD(cf2_model.parameters(), lr=0.0), interval=1, window=2, tail=2,
                     tolerance=0.5, scaled=False)
    with torch.no_grad():
        cf2_model[0].weight.copy_(spectrum_weight([2.0, 2.0, 1.0], 16, 12, seed=1))
    for _ in range(3):
        cf2.step()
    assert cf2_model[0].rank == 2  # the vanilla stable rank
    torch.testing.assert_close(cf2_model[0].dense_weight(),
                               torch.linalg.svd(spectrum_weight([2.0, 2.0, 1.0], 16, 12, seed=1))[0][:, :2]
                               @ torch.diag(torch.tensor([2.0, 2.0]))
                               @ torch.linalg.svd(spectrum_weight([2.0, 2.0, 1.0], 16, 12, seed=1))[2][:2],
                               atol=1e-5, rtol=1e-5)
    params = [p for g in opt.param_groups for p in g["params"]]
    assert all(p is not weight for p in params)
    assert any(p is model[0].U for p in params) and any(p is model[0].V for p in params)
    assert any(p is model[0].bias for p in params)


def test_scale_comes_from_the_initial_weights():
    """A layer whose sr grows from 1 to 3 during training gets ⌈3 · full/1⌉ capped at full, not 3."""
    w_init = spectrum_weight([5.0, 1.0, 1.0], 24, 20)  # sr = ⌊27/25⌋ = 1, ξ = 20
    model = rw.sparsify(one_layer_model(w_init), "cuttlefish", targets=["0"])
    cf = Cuttlefish(model, torch.optim.SGD(model.parameters(), lr=0.0), interval=1, window=1, tail=1, tolerance=0.5)
    with torch.no_grad():
        model[0].weight.copy_(spectrum_weight([1.0] * 3 + [0.1], 24, 20, seed=2) * 2)  # sr = ⌊3.01⌋ = 3
    assert stable_rank(model[0].weight) == 3
    cf.step(), cf.step()
    assert model[0].rank == 20  # min(20, 3·20)
    # and with a mid-sized ξ: init sr 6 on a 20-wide layer (ξ = 10/3), now sr 4 → ⌈13.3⌉ = 14
    model = rw.sparsify(one_layer_model(spectrum_weight([1.0] * 6 + [0.5], 24, 20)), "cuttlefish", targets=["0"])
    cf = Cuttlefish(model, torch.optim.SGD(model.parameters(), lr=0.0), interval=1, window=1, tail=1, tolerance=0.5)
    with torch.no_grad():
        model[0].weight.copy_(spectrum_weight([1.0] * 4 + [0.3], 24, 20, seed=2))
    cf.step(), cf.step()
    assert model[0].rank == 14


def test_training_switches_once_every_layer_is_stable_and_keeps_the_function_at_full_rank():
    torch.manual_seed(0)
    model = rw.sparsify(make_tiny_llama(), "cuttlefish")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cf = Cuttlefish(model, opt, interval=1, window=3, tail=2, tolerance=0.5)
    for i, batch in enumerate(lm_batches(n=12, batch=2, seq=8)):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
        before = {n: model.get_submodule(n).weight.detach().clone() for n in cf.names} if cf.switch_step is None else {}
        if cf.step():
            assert all(cf.stable.values()) and cf.switch_step == i + 1
            for n in cf.names:
                layer = model.get_submodule(n)
                assert layer.rank == cf.target_rank(n)
                if layer.rank == min(layer.in_features, layer.out_features):
                    torch.testing.assert_close(layer.dense_weight(), before[n], atol=1e-5, rtol=1e-5)
    assert cf.switch_step is not None
    u_before = model.get_submodule(cf.names[0]).U.detach().clone()
    batch = next(iter(lm_batches(n=1, batch=2, seq=8)))
    model(**batch).loss.backward()
    opt.step()
    assert not torch.equal(model.get_submodule(cf.names[0]).U, u_before)  # the factors train
    densify(model)
    assert isinstance(model.get_submodule(cf.names[0]), nn.Linear)


def test_resume_across_the_switch_is_bit_exact(tmp_path):
    def run(steps: int, out, resume=None):
        torch.manual_seed(0)
        model = rw.sparsify(make_tiny_llama(), "cuttlefish")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        cf = Cuttlefish(model, opt, interval=1, window=2, tail=2, tolerance=10.0)
        cfg = dataclasses.replace(TrainConfig.plain(steps), checkpoint_every=2, output_dir=str(out))
        train(model, list(lm_batches(n=6, batch=2, seq=8)), config=cfg, optimizer=opt, callbacks=[cf],
              resume_from=resume)
        return model, cf

    full, cf_full = run(6, tmp_path / "a")
    assert cf_full.switch_step == 3
    _, cf_half = run(4, tmp_path / "b")
    resumed, cf_res = run(6, tmp_path / "c", resume=tmp_path / "b")
    assert cf_res.ranks == cf_full.ranks and cf_res.switch_step == 3
    for (n, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), n


def test_bad_input():
    model = make_tiny_llama()
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="rw.sparsify"):
        Cuttlefish(model, opt)
    model = rw.sparsify(model, "cuttlefish")
    with pytest.raises(ValueError, match="interval"):
        Cuttlefish(model, opt, interval=0)
    with pytest.raises(ValueError, match="scaled"):
        Cuttlefish(model, opt, scaled="yes")
    with pytest.raises(ValueError, match="optimizer must hold"):
        Cuttlefish(model, torch.optim.AdamW([model.get_submodule("model.embed_tokens").weight]))
