"""PST (Li et al. 2022): W' = W₀ + βUV pruned by S = |W'| + α₁AB + α₂(R⊕C), straight-through mask, cubic schedule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.adapters.pst import pst_sparsity
from rankwise.train import TrainConfig, train

from ..conftest import cls_batches, make_tiny_bert


def _layer(out_f: int = 6, in_f: int = 8, sparsity: float = 0.5):
    model = nn.Sequential(nn.Linear(in_f, out_f))
    rw.adapt(model, "pst", targets=["0"], r=2, mask_rank=2, alpha1=0.7, alpha2=0.3)
    layer = rw.adapter_layers(model)[0][1]
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in (layer.weight_V, layer.score_B, layer.score_R, layer.score_C):
            p.copy_(torch.randn(p.shape, generator=g))
    layer.set_sparsity(sparsity)
    return model, layer


def _expected_mask(layer) -> torch.Tensor:
    c = layer.config
    with torch.no_grad():
        w = layer.base_weight + c.beta * layer.weight_U @ layer.weight_V
        rows_cols = layer.score_R[:, None] + layer.score_C[None]
        s = w.abs() + c.alpha1 * layer.score_A @ layer.score_B + c.alpha2 * rows_cols
    keep = torch.ones_like(s, dtype=torch.bool)
    keep.view(-1)[s.flatten().argsort()[: int(s.numel() * layer.sparsity)]] = False
    return keep, w


def test_mask_keeps_exactly_the_density_by_the_combined_score():
    """Merged weight = M ⊙ W' with exactly ⌊s·numel⌋ zeros, the lowest of |W'| + α₁AB + α₂(R⊕C)."""
    model, layer = _layer()
    keep, w = _expected_mask(layer)
    x = torch.randn(3, 8)
    torch.testing.assert_close(model(x), x @ (w * keep).t() + layer.bias)
    rw.merge(model)
    assert int((layer.base_weight == 0).sum()) == 24
    assert torch.equal(layer.base_weight != 0, keep)
    # the data-driven part matters: the magnitude alone picks another mask here
    by_magnitude = torch.ones_like(keep)
    by_magnitude.view(-1)[w.abs().flatten().argsort()[:24]] = False
    assert not torch.equal(keep, by_magnitude)


def test_score_factors_learn_through_the_straight_through_mask():
    """∂L/∂S = ∂L/∂(M⊙W') ⊙ W' reaches B, R, C: ∂B = α₁·Aᵀ(G ⊙ W'), ∂R = α₂·Σ_cols(G ⊙ W')."""
    model, layer = _layer()
    x, g = torch.randn(4, 8), torch.randn(4, 6)
    model(x).backward(g)
    keep, w = _expected_mask(layer)
    grad_masked = g.t() @ x  # ∂L/∂(M⊙W')
    grad_s = grad_masked * w
    c = layer.config
    torch.testing.assert_close(layer.score_B.grad, c.alpha1 * layer.score_A.detach().t() @ grad_s)
    torch.testing.assert_close(layer.score_R.grad, c.alpha2 * grad_s.sum(1))
    torch.testing.assert_close(layer.score_C.grad, c.alpha2 * grad_s.sum(0))


def test_only_small_factors_train():
    model = nn.Sequential(nn.Linear(256, 256))
    rw.adapt(model, "pst", targets=["0"], r=2, mask_rank=2)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dim() == 1 or min(p.shape) == 2 for p in trainable)
    assert sum(p.numel() for p in trainable) == 4 * 512 + 512 < 0.05 * 256 * 256


def test_cubic_schedule():
    cfg = rw.get_method("pst").make_config(r=2, sparsity=0.8, initial_warmup=0.1, final_warmup=0.3)
    assert pst_sparsity(10, 100, cfg) == 0.0
    assert pst_sparsity(40, 100, cfg) == pytest.approx(0.8 - 0.8 * 0.5**3)  # (1 − 30/60)³
    assert pst_sparsity(71, 100, cfg) == pytest.approx(0.8)


def test_training_reaches_the_final_sparsity():
    model = make_tiny_bert(0)
    rw.adapt(model, "pst", r=2, sparsity=0.6, initial_warmup=0.0, final_warmup=0.5, targets=["query"])
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    train(model, cls_batches(n=4), config=TrainConfig.plain(4), optimizer=opt)
    rw.merge(model)
    for _, layer in rw.adapter_layers(model):
        assert int((layer.base_weight == 0).sum()) == int(0.6 * layer.base_weight.numel())


@pytest.mark.parametrize("bad", [{"sparsity": 1.0}, {"mask_rank": 0}, {"initial_warmup": 0.6, "final_warmup": 0.5}])
def test_bad_options(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        rw.adapt(make_tiny_bert(0), "pst", r=2, **bad)


def test_mask_drops_exactly_the_count_with_ties_and_without():
    """The mask keeps the scores above the ⌊s·numel⌋-th smallest; with ties at that value (an all-equal
    stretch of scores) it still drops exactly ⌊s·numel⌋ entries, all of them among the lowest."""
    from rankwise.adapters.pst import _Binarize

    g = torch.Generator().manual_seed(0)
    distinct = torch.randn(16, 12, generator=g)
    tied = distinct.clone()
    tied.view(-1)[:100] = 0.0  # 100 equal scores straddle the 96th-smallest
    tied.view(-1)[100:] = tied.view(-1)[100:].abs() + 1
    for scores in (distinct, tied):
        mask = _Binarize.apply(scores, 0.5)
        assert int((mask == 0).sum()) == 96
        assert scores[mask == 0].max() <= scores[mask == 1].min()
