"""RoseLoRA (Wang et al. 2024): per-column top-k of B and per-row top-k of A by EMA sensitivity |w·g|,
cubic schedule, so ΔW = B A changes a bounded set of W's entries."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.adapters.roselora import RoseLoRAPrune, change_bound, keep_rate, kept
from rankwise.train import TrainConfig, train

from ..conftest import cls_batches, make_tiny_bert

DENSITY = 0.25


def _trained(steps: int = 6):
    model = make_tiny_bert(0)
    rw.adapt(model, "roselora", r=2, density=DENSITY, start=0.0, end=0.5, alpha=4)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    train(model, cls_batches(n=steps), config=TrainConfig.plain(steps), optimizer=opt)
    return model


def test_factors_sparse_and_changed_entries_within_bound():
    """Every column of B keeps ≤ k_B = ⌈τ·out⌉ non-zeros, every row of A ≤ k_A, and the merged model
    differs from the base in ≤ min(r·k_B·k_A, min(out, r·k_B)·min(in, r·k_A)) entries of each W."""
    model = _trained()
    layers = rw.adapter_layers(model)
    base = {n: layer.base_weight.detach().clone() for n, layer in layers}
    nonzero_updates = 0
    for name, layer in layers:
        out_f, in_f, r = layer.out_features, layer.in_features, layer.config.r
        assert int((layer.lora_B != 0).sum(0).max()) <= kept(out_f, DENSITY), name
        assert int((layer.lora_A != 0).sum(1).max()) <= kept(in_f, DENSITY), name
        assert change_bound(out_f, in_f, r, DENSITY) < out_f * in_f  # the bound is a real restriction
        nonzero_updates += int(layer.delta_weight().ne(0).sum())
    assert nonzero_updates > 0  # the adapters did learn something
    rw.merge(model)
    for name, layer in layers:
        changed = int((layer.base_weight != base[name]).sum())
        assert changed <= change_bound(layer.out_features, layer.in_features, layer.config.r, DENSITY), name


def test_kept_entries_are_the_most_sensitive_not_the_largest():
    """With |w| and |w·g| ranking entries differently, the kept ones are the top-k by |w·g|."""
    model = nn.Sequential(nn.Linear(8, 6))
    rw.adapt(model, "roselora", targets=["0"], r=2, density=0.5, start=0.0, end=0.0001)
    layer = rw.adapter_layers(model)[0][1]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in (layer.lora_A, layer.lora_B):
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            p.grad = 1.0 / p.detach() ** 2  # |w·g| = 1/|w|: the smallest weights are the most sensitive
    pruner = RoseLoRAPrune(model)
    pruner.accumulate()
    a_before, b_before = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    pruner.prune(step=10, total_steps=10)
    k_a, k_b = kept(8, 0.5), kept(6, 0.5)
    expected_a = a_before.topk(k_a, dim=1, largest=False).indices.sort(1).values
    expected_b = b_before.topk(k_b, dim=0, largest=False).indices.sort(0).values
    assert torch.equal((layer.lora_A != 0).nonzero()[:, 1].view(2, k_a), expected_a)
    assert torch.equal((layer.lora_B != 0).t().nonzero()[:, 1].view(2, k_b), expected_b.t())


def test_importance_is_an_exponential_moving_average():
    model = nn.Sequential(nn.Linear(4, 3))
    rw.adapt(model, "roselora", targets=["0"], r=1, beta=0.8)
    layer = rw.adapter_layers(model)[0][1]
    pruner = RoseLoRAPrune(model)
    scores = []
    for grad in (1.0, 3.0):
        layer.lora_A.grad = torch.full_like(layer.lora_A, grad)
        layer.lora_B.grad = torch.full_like(layer.lora_B, grad)
        pruner.accumulate()
        scores.append((layer.lora_A.detach() * grad).abs())
    torch.testing.assert_close(pruner.importance[1], 0.8 * scores[0] + 0.2 * scores[1])


def test_cubic_schedule():
    """Dense before t_i, τ + (1−τ)(1 − (t−t_i)/(t_f−t_i))³ between, τ from t_f on."""
    assert keep_rate(0, 100, 0.1, 0.1, 0.8) == 1.0
    assert keep_rate(45, 100, 0.1, 0.1, 0.8) == pytest.approx(0.1 + 0.9 * 0.5**3)
    assert keep_rate(80, 100, 0.1, 0.1, 0.8) == pytest.approx(0.1)
    assert keep_rate(99, 100, 0.1, 0.1, 0.8) == pytest.approx(0.1)


def test_dense_before_the_schedule_starts():
    """Before t_i nothing is pruned: plain LoRA steps."""
    model = make_tiny_bert(0)
    rw.adapt(model, "roselora", r=2, density=DENSITY, start=0.9, end=1.0)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    train(model, cls_batches(n=2), config=TrainConfig.plain(2), optimizer=opt)
    layer = rw.adapter_layers(model)[0][1]
    assert bool((layer.lora_A != 0).all())


@pytest.mark.parametrize("bad", [{"density": 0}, {"density": 1.5}, {"beta": 1.0}, {"start": 0.5, "end": 0.5}])
def test_bad_options(bad):
    with pytest.raises(ValueError, match=next(iter(bad)) if "end" not in bad else "end"):
        rw.adapt(make_tiny_bert(0), "roselora", r=2, **bad)
