"""DSnoT: the prune-and-grow cycles against a row-by-row reference, the reconstruction error they
remove on calibration inputs, exact per-row sparsity and untouched weight values."""

from __future__ import annotations

import copy

import pytest
import torch

import rankwise as rw
from rankwise.compress.dsnot import initial_mask, mean_error, refine_mask
from rankwise.compress.layerwise import InputStats

from ..conftest import lm_batches, make_tiny_llama


def _layer(seed: int = 0, rows: int = 12, cols: int = 48, tokens: int = 400):
    """A weight and calibration inputs whose columns have non-zero means and spread variances."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=g)
    means = torch.randn(cols, generator=g)
    scales = torch.logspace(-1, 0.5, cols)[torch.randperm(cols, generator=g)]
    x = means + scales * torch.randn(tokens, cols, generator=g)
    stats = InputStats(cols, torch.device("cpu"))
    stats.add(x)
    return weight, x, stats


def _reference(weight, stats, pruned, max_cycles, threshold, power, same_sign):
    """DSnoT one row at a time, with plain Python lists (the paper's criteria, written out)."""
    out = pruned.clone()
    mean, var = stats.mean, stats.var
    norm = stats.sum_sq.sqrt()
    for i in range(weight.shape[0]):
        c = [float(weight[i, j]) * float(mean[j]) for j in range(weight.shape[1])]
        grow_key = [c[j] / float(var[j]) ** power for j in range(weight.shape[1])]
        wanda = [abs(float(weight[i, j])) * float(norm[j]) for j in range(weight.shape[1])]
        p_set = [j for j in range(weight.shape[1]) if pruned[i, j]]
        k_set = [j for j in range(weight.shape[1]) if not pruned[i, j]]
        grow_up = sorted((j for j in p_set if c[j] > 0), key=lambda j: -grow_key[j])
        grow_down = sorted((j for j in p_set if c[j] < 0), key=lambda j: grow_key[j])
        prune_up = sorted((j for j in k_set if c[j] < 0), key=lambda j: wanda[j])  # used while ε > 0
        prune_down = sorted((j for j in k_set if c[j] > 0), key=lambda j: wanda[j])
        eps = sum(c[j] for j in p_set)
        for _ in range(max_cycles):
            grow, prune = (grow_up, prune_up) if eps > 0 else (grow_down, prune_down)
            if abs(eps) <= threshold or not grow or not prune:
                break
            g, p = grow.pop(0), prune.pop(0)
            if same_sign and (eps + c[p] - c[g] > 0) != (eps > 0):
                break
            out[i, g], out[i, p] = False, True
            eps += c[p] - c[g]
    return out


@pytest.mark.parametrize("initial", ["wanda", "magnitude"])
def test_refined_mask_matches_row_by_row_reference(initial):
    weight, _, stats = _layer(0)
    start = initial_mask(weight, stats, 0.6, initial)
    for cycles, threshold, power, same_sign in ((50, 0.1, 1.0, True), (3, 0.0, 0.5, True), (50, 0.0, 2.0, True),
                                                (50, 0.1, 1.0, False)):
        mask, swaps = refine_mask(weight, stats, start, cycles, threshold, power, same_sign)
        assert torch.equal(mask, _reference(weight, stats, start, cycles, threshold, power, same_sign))
        assert swaps == int((mask & ~start).sum())


def test_refinement_lowers_the_reconstruction_error_and_keeps_the_sparsity():
    for seed in range(4):
        weight, x, stats = _layer(seed)
        start = initial_mask(weight, stats, 0.5, "wanda")
        mask, swaps = refine_mask(weight, stats, start, threshold=0.0)
        assert swaps > 0
        assert torch.equal(mask.sum(1), start.sum(1))  # the same count pruned in every row
        eps = [mean_error(weight, m, stats.mean) for m in (start, mask)]
        assert (eps[1].abs() <= eps[0].abs()).all()  # per row, the expected error never grows
        assert float(eps[1].pow(2).sum()) < 0.75 * float(eps[0].pow(2).sum())
        full = [float(((weight * m) @ x.T).pow(2).sum()) for m in (start, mask)]  # ‖(W − W̃)X‖² on the inputs
        assert full[1] < 0.95 * full[0]


def test_compress_prunes_rows_exactly_and_keeps_the_values():
    model = make_tiny_llama(0)
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    rw.compress(model, "dsnot", ratio=0.5, data=lm_batches(2), skip=None, threshold=0.0)
    state = model.rankwise_compress
    assert state.details["swaps"] > 0
    assert len(state.targets) == 14 and "lm_head" not in state.targets
    for name in state.targets:
        w = model.get_submodule(name).weight
        zeros = (w == 0).sum(1)
        assert torch.equal(zeros, torch.full_like(zeros, w.shape[1] // 2))
        torch.testing.assert_close(w[w != 0], dense[name][w != 0], rtol=0, atol=0)
    assert state.kept_fraction == pytest.approx(0.5)
    before, after = zip(*state.details["mean_error"].values(), strict=True)
    assert sum(after) < sum(before)
    skipped = rw.compress(make_tiny_llama(0), "dsnot", ratio=0.5, data=lm_batches(2))  # default: MLP not refined
    for name, (b, a) in skipped.rankwise_compress.details["mean_error"].items():
        assert (a == b) if ".mlp." in name else True


def test_bad_input():
    with pytest.raises(ValueError, match="dsnot needs data"):
        rw.compress(make_tiny_llama(0), "dsnot", ratio=0.5)
    with pytest.raises(ValueError, match="initial='sparsegpt' is not allowed"):
        rw.compress(make_tiny_llama(0), "dsnot", ratio=0.5, data=lm_batches(1), initial="sparsegpt")
    with pytest.raises(ValueError, match="max_cycles=-1"):
        rw.compress(copy.deepcopy(make_tiny_llama(0)), "dsnot", data=lm_batches(1), max_cycles=-1)
    with pytest.raises(ValueError, match="one-shot: steps must be 0"):
        rw.compress(make_tiny_llama(0), "dsnot", data=lm_batches(1), steps=2)
