"""ECoFLaP: the forward-only gradient estimate, the global budget shared by score, and exact local
Wanda pruning at each block's sparsity."""

from __future__ import annotations

import math

import pytest
import torch

import rankwise as rw
from rankwise.compress.ecoflap import kept_per_group, zeroth_order_gradients

from ..conftest import lm_batches, make_tiny_llama


def test_zeroth_order_estimate_is_forward_only_and_tracks_the_gradient_norm():
    """E|zᵀ∇L| = √(2/π)·‖∇L‖ for z ~ N(0, I): the estimate, with no backward, matches the true norm."""
    model = make_tiny_llama(0).double()
    batch = lm_batches(1)[0]
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    weights = {n: model.get_submodule(n).weight for n in names}
    before = {n: w.detach().clone() for n, w in weights.items()}
    noise = 100  # eps well above the float32 round-off of LlamaRMSNorm, well below the curvature scale
    estimate = zeroth_order_gradients(model, weights, [batch], noise=noise, eps=1e-2)
    assert all(p.grad is None for p in model.parameters())  # no backpropagation
    assert all(torch.equal(weights[n], before[n]) for n in names)  # restored bit for bit
    model(**batch).loss.backward()
    for n in names:
        true = math.sqrt(2 / math.pi) * float(weights[n].grad.norm())
        assert estimate[n] / noise == pytest.approx(true, rel=0.25)


def test_budget_is_shared_by_score_and_kept_exactly():
    sizes = {f"b{i}": 1000 for i in range(5)}
    scores = {f"b{i}": float(i + 1) for i in range(5)}
    kept = kept_per_group(scores, sizes, 2500, max_sparsity=0.8)
    assert sum(kept.values()) == 2500
    fractions = [kept[f"b{i}"] / 1000 for i in range(5)]
    assert fractions == sorted(fractions) and fractions[0] < fractions[-1]  # more important, less pruned
    assert all(200 <= k <= 1000 for k in kept.values())  # at least 1 − max_sparsity kept, never more than all
    # beyond the floor, the shares follow the scores (up to one weight of rounding)
    extra = [k - 200 for k in kept.values()]
    assert all(abs(e - 1500 * s / 15) <= 1 for e, s in zip(extra, scores.values(), strict=True))
    capped = kept_per_group({"a": 100.0, "b": 1.0}, {"a": 100, "b": 1000}, 600, max_sparsity=0.9)
    assert capped["a"] == 100 and sum(capped.values()) == 600  # a full group passes its share on


def test_compress_block_sparsities_average_to_the_target_and_rows_are_exact():
    model = make_tiny_llama(0)
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    rw.compress(model, "ecoflap", ratio=0.5, data=lm_batches(2), noise=2)
    state = model.rankwise_compress
    assert all(p.grad is None for p in model.parameters())
    sparsity = state.details["sparsity"]
    assert set(sparsity) == {"model.layers.0", "model.layers.1"}
    assert sparsity["model.layers.0"] != sparsity["model.layers.1"]
    sizes = {g: sum(dense[n].numel() for n in state.targets if n.startswith(g + ".")) for g in sparsity}
    grads = state.details["gradients"]
    for g, score in state.details["scores"].items():  # block score: mean of (W_ij·g_W)² over the block
        members = [n for n in state.targets if n.startswith(g + ".")]
        assert score == pytest.approx(sum(float((dense[n].double() * grads[n]).pow(2).sum()) for n in members)
                                      / sizes[g], rel=1e-9)
    mean = sum(sparsity[g] * sizes[g] for g in sizes) / sum(sizes.values())
    assert mean == pytest.approx(0.5, abs=1e-9)
    for name in state.targets:
        w = model.get_submodule(name).weight
        block = ".".join(name.split(".")[:3])
        zeros = (w == 0).sum(1)
        assert torch.equal(zeros, torch.full_like(zeros, int(w.shape[1] * sparsity[block])))
        torch.testing.assert_close(w[w != 0], dense[name][w != 0], rtol=0, atol=0)
    assert state.kept_fraction == pytest.approx(0.5, abs=0.02)


def test_bad_input():
    with pytest.raises(ValueError, match="ecoflap needs data"):
        rw.compress(make_tiny_llama(0), "ecoflap", ratio=0.5)
    with pytest.raises(ValueError, match="max_sparsity=0.3 is below the target sparsity"):
        rw.compress(make_tiny_llama(0), "ecoflap", ratio=0.5, data=lm_batches(1), max_sparsity=0.3)
    with pytest.raises(ValueError, match="noise=0"):
        rw.compress(make_tiny_llama(0), "ecoflap", ratio=0.5, data=lm_batches(1), noise=0)


def test_the_zeroth_order_stage_shows_progress(capsys):
    """Its forwards (2·batches·noise per tensor: minutes on SmolLM2) run under a bar when progress is on, silent
    when it is off."""
    rw.compress(make_tiny_llama(0), "ecoflap", ratio=0.5, data=lm_batches(1), progress=True)
    assert "zeroth-order gradients" in capsys.readouterr().err
    rw.compress(make_tiny_llama(0), "ecoflap", ratio=0.5, data=lm_batches(1), progress=False)
    assert "zeroth-order gradients" not in capsys.readouterr().err
