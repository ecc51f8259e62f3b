"""GoRA: per-layer ranks from mean|W ⊙ G| share LoRA's parameter budget (never above it, ordered by
importance among layers of one shape), B starts as the least-squares solution of B·A = −(γ/α)·G (a
compressed gradient-descent step), and the trained adapter exports to PEFT with per-layer ranks."""

from __future__ import annotations

import copy

import pytest
import torch

import rankwise as rw
from rankwise.adapters.gora import allocate_ranks, importance
from rankwise.train import TrainConfig, train

from ..conftest import lm_batches, make_tiny_llama
from .peft_pairs import check_exports

TARGETS = ["q_proj", "o_proj", "gate_proj", "up_proj"]  # 32x32 twice and 64x32 twice per block


def _grads(model, names, batches):
    """The test's own mean gradient of each weight over the batches."""
    weights = [model.get_submodule(n).weight for n in names]
    for w in weights:
        w.requires_grad_(True)
    sums = [torch.zeros_like(w) for w in weights]
    for batch in batches:
        for s, g in zip(sums, torch.autograd.grad(model(**batch).loss, weights), strict=True):
            s += g
    return {n: s / len(batches) for n, s in zip(names, sums, strict=True)}


def _gora(**kw):
    base = make_tiny_llama(0)
    names = [n for n, _ in base.named_modules() if n.endswith(tuple(TARGETS))]
    grads = _grads(copy.deepcopy(base), names, lm_batches(3))
    weights = {n: base.get_submodule(n).weight.detach().clone() for n in names}
    model = rw.adapt(base, "gora", targets=TARGETS, init_data=lm_batches(3), init_batches=3, **{"r": 4, **kw})
    return model, grads, weights


def test_ranks_share_the_lora_budget_by_gradient_importance():
    model, grads, weights = _gora(min_r=1, max_r=16)
    scores = {n: float((weights[n] * grads[n]).abs().mean()) for n in grads}
    total, budget = sum(scores.values()), sum(4 * sum(w.shape) for w in weights.values())
    expected = {n: min(max(round(budget * s / total) // sum(weights[n].shape), 1), 16) for n, s in scores.items()}
    ranks = {n: m.config.r for n, m in rw.adapter_layers(model)}
    assert ranks == expected and len(set(ranks.values())) > 1
    unclamped = allocate_ranks(scores, {n: tuple(w.shape) for n, w in weights.items()}, 4)
    used = sum(unclamped[n] * sum(weights[n].shape) for n in weights)
    assert budget - len(weights) * 96 < used <= budget  # the budget, up to one rank per layer (m + n ≤ 96)
    for shape in ((32, 32), (64, 32)):  # among layers of one shape, rank follows importance
        same = sorted((scores[n], unclamped[n]) for n in weights if tuple(weights[n].shape) == shape)
        assert [r for _, r in same] == sorted(r for _, r in same)
    # scale α/r with the reference r in every layer: α_l = α·r_l/r
    assert all(m.scale == pytest.approx(1.0) for _, m in rw.adapter_layers(model))
    w, g = torch.tensor([[2.0, -1.0], [0.5, 4.0]]), torch.tensor([[1.0, 3.0], [-2.0, 0.25]])
    assert importance(w, g) == pytest.approx((2 + 3 + 1 + 1) / 4)  # mean|W ⊙ G|, not of G alone


def test_b_starts_as_the_least_squares_compressed_gradient_step():
    model, grads, _ = _gora(min_r=2, max_r=8, alpha=8.0, init_gamma=4.0)
    for name, m in rw.adapter_layers(model):
        a, dw, g = m.lora_A.detach(), m.delta_weight().detach(), grads[name]
        target = -(4.0 / 4) * g  # s·B·A ≈ −(γ/r)·G with r the reference rank
        # the normal equations of min_B ‖s·B·A − target‖: the residual is orthogonal to A's rows
        torch.testing.assert_close((dw - target) @ a.T, torch.zeros(g.shape[0], a.shape[0]), atol=1e-6, rtol=0)
        # so ΔW = target·P_A: the part of −(γ/r)·G in A's row space, a descent direction
        proj = a.T @ torch.linalg.solve(a @ a.T, a)
        torch.testing.assert_close(dw, target @ proj, atol=1e-6, rtol=1e-4)
        assert float((dw * g).sum()) < 0


def test_trained_gora_exports_to_peft_with_rank_and_alpha_patterns(tmp_path):
    model, _, _ = _gora(min_r=1, max_r=8, alpha=8.0)
    train(model, lm_batches(3), config=TrainConfig(max_steps=3, progress=False, lr=1e-2))
    ranks = {n: m.config.r for n, m in rw.adapter_layers(model)}
    check_exports(model, lambda: make_tiny_llama(0), lm_batches(1, seed=5)[0], tmp_path, ranks)


def test_bad_options_name_the_parameter():
    for bad in ({"init_gamma": 0.0}, {"min_r": 0}, {"init": "pissa"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            rw.adapt(make_tiny_llama(0), "gora", init_data=lm_batches(1), **bad)
    with pytest.raises(ValueError, match="min_r=4 must not exceed max_r=2"):
        rw.adapt(make_tiny_llama(0), "gora", init_data=lm_batches(1), min_r=4, max_r=2)
    with pytest.raises(ValueError, match="init_data"):
        rw.adapt(make_tiny_llama(0), "gora")
