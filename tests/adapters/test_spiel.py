"""SpIEL (Ansell et al. 2024, SpIEL-AG): drop the smallest |δ|, regrow the candidates with the largest
accumulated |∂L/∂W|, the index count constant, every entry off the indices equal to W₀."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.adapters.init import InitContext
from rankwise.adapters.spiel import SpIELConfig, SpIELController, SpIELLayer, regrow
from rankwise.train import TrainConfig, train

from ..conftest import lm_batches, make_tiny_llama
from ..test_train import Crash, CrashAt


def _layer(nnz: int = 6) -> SpIELLayer:
    torch.manual_seed(0)
    return SpIELLayer(nn.Linear(5, 4), SpIELConfig(nnz=nnz), InitContext(name="x"))


def test_regrow_drops_the_smallest_deltas_and_grows_the_best_free_candidates():
    layer = _layer()
    with torch.no_grad():
        layer.sparse_index.copy_(torch.tensor([0, 3, 7, 9, 12, 18]))
        layer.sparse_values.copy_(torch.tensor([-0.9, 0.05, -0.01, 0.5, -0.3, 0.02]))
    # candidates: 9 is active and kept (not a free slot), 7 is dropped but scores high (it stays, with its δ)
    candidates = torch.tensor([1, 7, 9, 15, 16, 19])
    scores = torch.tensor([0.2, 0.8, 5.0, 0.9, 0.1, 0.6])
    changed = regrow(layer, candidates, scores, p=0.5)  # n = 3: drop |δ| 0.01 (7), 0.02 (18), 0.05 (3)
    index = dict(zip(layer.sparse_index.tolist(), layer.sparse_values.tolist(), strict=True))
    assert layer.sparse_index.numel() == 6 and layer.sparse_index.unique().numel() == 6
    assert set(index) == {0, 9, 12, 7, 15, 19}  # 7 re-chosen; 15 and 19 are the best free candidates
    assert index[7] == pytest.approx(-0.01) and index[0] == pytest.approx(-0.9) and index[9] == pytest.approx(0.5)
    assert index[15] == 0.0 and index[19] == 0.0
    assert sorted(changed.tolist()) == [1, 5]  # the slots of 3 and 18


def test_candidates_are_scored_by_the_magnitude_of_their_accumulated_gradient():
    model = rw.adapt(make_tiny_llama(0), "spiel", targets=["model.layers.0.mlp.down_proj"], r=1)
    layer = rw.adapter_layers(model)[0][1]
    controller = SpIELController(model, "default", None, total_steps=100)
    k = layer.sparse_values.numel()
    free = torch.ones(layer.out_features * layer.in_features, dtype=torch.bool)
    free[layer.sparse_index] = False
    candidates = free.nonzero().flatten()[:k]
    sums = torch.where(torch.arange(k) % 2 == 0, -10.0, 0.1)  # large negative sums win by magnitude
    controller.scores = {rw.adapter_layers(model)[0][0]: (candidates, sums)}
    controller.update(0.5)
    assert torch.isin(candidates[::2], layer.sparse_index).all()
    assert not torch.isin(candidates[1::2], layer.sparse_index).any()


def test_gradient_scores_accumulate_the_dense_gradient_of_the_candidates():
    model = rw.adapt(make_tiny_llama(0), "spiel", r=1, regrow_every=4, regrow_steps=2)
    with torch.no_grad():
        for _, layer in rw.adapter_layers(model):
            layer.sparse_values.normal_(0, 0.1)
    controller = SpIELController(model, "default", None, total_steps=8)
    data = lm_batches(seed=2)
    dense = {}
    for batch in data[:2]:
        twin = rw.merge_and_unload(copy.deepcopy(model))  # W₀ + S as plain weights
        for name, _ in rw.adapter_layers(model):
            twin.get_submodule(name).weight.requires_grad_(True)
        twin(**batch).loss.backward()
        for name, _ in rw.adapter_layers(model):
            dense.setdefault(name, []).append(twin.get_submodule(name).weight.grad.flatten())
        model(**batch).loss.backward()
    for name, layer in rw.adapter_layers(model):
        candidates, sums = controller.scores[name]
        first, second = dense[name]
        top = first.abs().topk(layer.sparse_values.numel()).indices
        assert torch.equal(candidates.sort().values, top.sort().values)
        torch.testing.assert_close(sums, first[candidates] + second[candidates], atol=1e-6, rtol=1e-5)


def _run(steps=8, **options):
    model = rw.adapt(make_tiny_llama(0), "spiel", r=1, regrow_every=4, regrow_steps=2, regrow_rate=0.5, **options)
    controller = SpIELController(model, "default", None, total_steps=steps)
    start = {n: m.sparse_index.clone() for n, m in rw.adapter_layers(model)}
    train(model, lm_batches(n=8, seed=4), config=TrainConfig(max_steps=steps, lr=1e-2, progress=False,
                                                             measure_memory=False), callbacks=[controller])
    return model, controller, start


def test_training_keeps_the_index_count_and_every_other_entry_at_w0():
    model, controller, start = _run()
    assert controller.allocations == 2  # after step 2 (p = 1) and step 6 (p = ζ(1 − 6/8))
    base = make_tiny_llama(0)
    moved = 0
    for name, layer in rw.adapter_layers(model):
        k = layer.in_features + layer.out_features
        assert layer.sparse_index.numel() == k and layer.sparse_index.unique().numel() == k
        moved += int((~torch.isin(layer.sparse_index, start[name])).sum())
        w = layer.base_weight + layer.delta_weight()
        off = torch.ones(w.numel(), dtype=torch.bool)
        off[layer.sparse_index] = False
        assert torch.equal(w.flatten()[off], base.get_submodule(name).weight.flatten()[off]), name
    assert moved > 0  # the random start was replaced by gradient-chosen indices


def test_a_run_too_short_for_an_update_is_an_error_before_training():
    with pytest.raises(ValueError, match="regrow_every=4, regrow_steps=2.*within the run's 1 steps"):
        _run(steps=1)


def test_resume_is_bit_identical(tmp_path):
    """8 steps straight == checkpoint at 5 (inside the window 5-6 that scores the update after 6), crash after 6,
    resume: the indices (buffers) and the gradients collected at step 5 come back."""

    def run(out, callbacks=(), resume=None):
        model = rw.adapt(make_tiny_llama(0), "spiel", r=1, regrow_every=4, regrow_steps=2)
        cfg = TrainConfig(max_steps=8, lr=1e-2, progress=False, measure_memory=False, output_dir=str(out),
                          checkpoint_every=5)
        train(model, lm_batches(n=8, seed=4), config=cfg, callbacks=callbacks, resume_from=resume)
        return model

    straight = run(tmp_path / "a")
    with pytest.raises(Crash):
        run(tmp_path / "b", callbacks=[CrashAt(6)])
    resumed = run(tmp_path / "b", resume=tmp_path / "b")
    for (name, a), (_, b) in zip(rw.adapter_layers(straight), rw.adapter_layers(resumed), strict=True):
        assert torch.equal(a.sparse_index, b.sparse_index), name
        assert torch.equal(a.sparse_values, b.sparse_values), name


def test_bad_schedule_names_the_option():
    with pytest.raises(ValueError, match="regrow_steps"):
        rw.adapt(make_tiny_llama(0), "spiel", regrow_every=4, regrow_steps=4)
    with pytest.raises(ValueError, match="regrow_rate"):
        rw.adapt(make_tiny_llama(0), "spiel", regrow_rate=0.0)
