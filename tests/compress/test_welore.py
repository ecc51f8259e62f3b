"""WeLore: ranks from the normalized spectrum, non-uniform across matrices, N-LRCs untouched while fine-tuning;
on the real SmolLM2 (slow) it beats the uniform SVD baseline at the same ratio."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.compress import factorized_layers, perplexity, welore_finetune_params, welore_ranks
from rankwise.compress.rank import kept_weights, normalized_spectrum, welore_ranks_at
from rankwise.compress.svd import thin_svd

from ..conftest import lm_batches, make_tiny_llama
from .factor_checks import _assert_factor_pairs_are_truncated_svd, _linears


def _heavy_tail_llama() -> tuple[nn.Module, set[str], set[str]]:
    """Tiny Llama whose attention projections are rank 3 plus tiny noise (a heavy-tailed spectrum)
    and whose MLP matrices have evenly spread singular values (no tail)."""
    model = make_tiny_llama(0)
    g = torch.Generator().manual_seed(3)
    low, flat = set(), set()
    with torch.no_grad():
        for name, lin in _linears(model).items():
            out_f, in_f = lin.weight.shape
            if ".self_attn." in name:
                w = torch.randn(out_f, 3, generator=g) @ torch.randn(3, in_f, generator=g) / 3
                lin.weight.copy_(w + 1e-3 * torch.randn(out_f, in_f, generator=g))
                low.add(name)
            else:
                k = min(out_f, in_f)
                u, _ = torch.linalg.qr(torch.randn(out_f, k, generator=g))
                v, _ = torch.linalg.qr(torch.randn(in_f, k, generator=g))
                lin.weight.copy_((u * torch.linspace(0.4, 0.2, k)) @ v.T)
                flat.add(name)
    return model, low, flat


def test_welore_rank_is_a_deterministic_function_of_the_spectrum():
    model, low, flat = _heavy_tail_llama()
    twin = copy.deepcopy(model)
    spectra = {n: thin_svd(m.weight).s for n, m in _linears(model).items()}
    shapes = {n: tuple(m.weight.shape) for n, m in _linears(model).items()}
    original = {n: m.weight.detach().clone() for n, m in _linears(model).items()}
    rw.compress(model, "welore", ratio=0.75)  # no data anywhere
    rw.compress(twin, "welore", ratio=0.75)
    state = model.rankwise_compress
    assert state.ranks == twin.rankwise_compress.ranks
    assert state.details["threshold"] == twin.rankwise_compress.details["threshold"]
    plan = welore_ranks(spectra, shapes, 0.75)  # from the singular values alone
    assert plan.ranks == state.ranks
    # heavy-tailed matrices become LRCs (rank 3 + noise drops nearly the whole tail), flat ones N-LRCs
    assert set(plan.lrc) == low and set(plan.nlrc) == flat
    assert all(state.ranks[n] <= 4 for n in low)
    # the rank is the count of normalized singular values at or above τ
    for name in low:
        kept = int((normalized_spectrum(spectra[name]) >= state.details["threshold"]).sum())
        assert state.ranks[name] == kept
    _assert_factor_pairs_are_truncated_svd(model, original)
    # minimality of τ: the next lower candidate threshold does not meet the budget
    values = torch.unique(torch.cat([normalized_spectrum(s) for s in spectra.values()]))
    lower = [float(v) for v in values if math.nextafter(float(v), math.inf) < state.details["threshold"]]
    if lower:
        tau = math.nextafter(max(lower), math.inf)
        ranks = welore_ranks_at(spectra, shapes, tau).ranks
        assert kept_weights(shapes, ranks) > 0.75 * sum(a * b for a, b in shapes.values())


def test_welore_nonuniform_and_flat_spectrum_is_never_low_rank():
    spectra = {"heavy": torch.tensor([10.0, 5.0, 0.3, 0.2, 0.1, 0.1, 0.1, 0.1]), "flat": torch.ones(8)}
    shapes = {"heavy": (8, 32), "flat": (8, 32)}
    plan = welore_ranks(spectra, shapes, 0.8)  # budget 409.6 weights: "heavy" must get to <= 153
    # normalized heavy spectrum: [1, .49, .02, .01, 0, 0, 0, 0]; the least τ that fits drops 5 → rank 3
    assert plan.ranks["flat"] is None and plan.ranks["heavy"] == 3
    assert plan.reductions["flat"] == 0.0


def test_welore_nlrc_bit_identical_during_finetuning():
    model, low, flat = _heavy_tail_llama()
    rw.compress(model, "welore", ratio=0.75)
    nlrc = {n: model.get_submodule(n).weight.detach().clone() for n in model.rankwise_compress.details["nlrc"]}
    others = {n: p.detach().clone() for n, p in model.named_parameters() if ".U" not in n and ".V" not in n}
    lrc_before = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith((".U", ".V"))}
    assert nlrc and lrc_before
    params = welore_finetune_params(model)
    layers = [layer for _, layer in factorized_layers(model)]
    factor_ids = {id(l.U) for l in layers} | {id(l.V) for l in layers}
    assert {id(p) for p in params} == factor_ids | {id(l.bias) for l in layers if l.bias is not None}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)  # even given everything
    for batch in lm_batches(3):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    for name, w in nlrc.items():
        assert torch.equal(model.get_submodule(name).weight, w)
        assert model.get_submodule(name).weight.grad is None
    for name, p in model.named_parameters():
        if name in others:
            assert torch.equal(p, others[name]), name
    assert any(not torch.equal(dict(model.named_parameters())[n], v) for n, v in lrc_before.items())


@pytest.mark.slow
def test_smollm2_welore_keeps_ratio_and_beats_uniform_svd():
    """Real model: both methods keep 90% of the weights; WeLore's non-uniform ranks hurt held-out
    perplexity far less than the uniform SVD baseline (one-shot, no recovery)."""
    from rankwise.compress import SVDCache, eval_blocks
    from rankwise.models import load_model

    base, tok = load_model("smollm2-135m")
    blocks = eval_blocks(tok, "bbc", n_blocks=4, block_size=64)
    base_ppl = perplexity(base, blocks)
    cache = SVDCache()
    ppl = {}
    for method in ("svd", "welore"):
        model = rw.compress(copy.deepcopy(base), method, ratio=0.9, cache=cache)
        assert 0.89 <= model.rankwise_compress.kept_fraction <= 0.9
        ppl[method] = perplexity(model, blocks)
        assert math.isfinite(ppl[method]) and ppl[method] > base_ppl
    assert ppl["welore"] < ppl["svd"]
