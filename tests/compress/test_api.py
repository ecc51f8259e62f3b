"""rankwise.compress: one faithful test per method (svd, lord, welore, pela, loraprune, dsee), round
trips, and bad-input errors. Tiny random Llama / BERT from configs; real-model runs are slow."""

from __future__ import annotations

import argparse
import copy
import math

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.compress import (
    COMPRESS_METHODS,
    FactorizedLinear,
    cubic_sparsity,
    densify,
    dsee_finetune,
    dsee_support,
    factorized_layers,
    find_blocks,
    load_compressed,
    pela_distill,
    pela_losses,
    perplexity,
    recover,
    save_compressed,
    weight_perturbation,
    welore_finetune_params,
    welore_ranks,
)
from rankwise.compress.dsee import DSEELayer
from rankwise.compress.factorized import factorized_from_factors
from rankwise.compress.loraprune import first_final_step, kept_per_group
from rankwise.compress.rank import (
    kept_weights,
    normalized_spectrum,
    rank_fraction_ranks,
    uniform_ratio_rank,
    welore_ranks_at,
)
from rankwise.compress.svd import thin_svd

from ..conftest import cls_batches, lm_batches, make_tiny_bert, make_tiny_llama


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in rw.compression.api.find_targets(model, "all-linear")}


def _truncated(weight: torch.Tensor, r: int) -> torch.Tensor:
    """Independent reference: the rank-r truncated SVD via torch.linalg.svd."""
    u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    return ((u[:, :r] * s[:r]) @ vh[:r]).float()


def _assert_factor_pairs_are_truncated_svd(model: nn.Module, original: dict[str, torch.Tensor]) -> None:
    state = model.rankwise_compress
    for name, r in state.ranks.items():
        if r is None:
            continue
        layer = model.get_submodule(name)
        assert isinstance(layer, FactorizedLinear)
        params = dict(layer.named_parameters())
        w = original[name]
        # exactly two dense factors with inner dimension r (plus the kept bias)
        assert set(params) <= {"U", "V", "bias"} and {"U", "V"} <= set(params)
        assert layer.U.shape == (w.shape[0], r) and layer.V.shape == (r, w.shape[1])
        torch.testing.assert_close(layer.U @ layer.V, _truncated(w, r), atol=2e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------- svd / lord
@pytest.mark.parametrize("make", [make_tiny_llama, make_tiny_bert])
def test_svd_factors_are_truncated_svd_and_keep_ratio_per_matrix(make):
    model = make(0)
    original = {n: m.weight.detach().clone() for n, m in _linears(model).items()}
    rw.compress(model, "svd", ratio=0.5)
    state = model.rankwise_compress
    _assert_factor_pairs_are_truncated_svd(model, original)
    for name, w in original.items():
        out_f, in_f = w.shape
        r = state.ranks[name]
        assert r == math.floor(0.5 * out_f * in_f / (out_f + in_f))
        assert r * (out_f + in_f) <= 0.5 * out_f * in_f < (r + 1) * (out_f + in_f)  # every matrix drops to ratio
    assert state.weights_before == sum(w.numel() for w in original.values())
    assert state.kept_fraction <= 0.5


def test_lord_same_rank_fraction_trainable_and_exact_factors():
    model = make_tiny_llama(0)
    for p in model.parameters():
        p.requires_grad_(False)
    original = {n: m.weight.detach().clone() for n, m in _linears(model).items()}
    rw.compress(model, "lord", ratio=0.6)
    state = model.rankwise_compress
    _assert_factor_pairs_are_truncated_svd(model, original)
    assert 0.5 < state.kept_fraction <= 0.6
    # one rank fraction κ for all factorized matrices: r = floor(κ·min(out, in))
    fractions = {name: (r, min(original[name].shape)) for name, r in state.ranks.items() if r is not None}
    kappa_lo = max(r / m for r, m in fractions.values())
    kappa_hi = min((r + 1) / m for r, m in fractions.values())
    assert kappa_lo < kappa_hi
    # fully trainable factors: one backward gives every factor a gradient
    for _, layer in factorized_layers(model):
        assert layer.U.requires_grad and layer.V.requires_grad
    batch = lm_batches(1)[0]
    model(**batch).loss.backward()
    assert all(layer.U.grad is not None and layer.V.grad is not None for _, layer in factorized_layers(model))


def test_rank_policies():
    assert uniform_ratio_rank((64, 32), 0.5) == math.floor(0.5 * 64 * 32 / 96)
    assert uniform_ratio_rank((4, 4), 0.01) == 1
    shapes = {"a": (64, 64), "b": (64, 256), "c": (32, 256)}
    ranks = rank_fraction_ranks(shapes, 0.5)
    total = sum(a * b for a, b in shapes.values())
    assert kept_weights(shapes, ranks) <= 0.5 * total
    bigger = {n: (r + 1 if r is not None else None) for n, r in ranks.items()}
    assert kept_weights(shapes, bigger) > 0.5 * total  # κ is (close to) the largest that fits
    assert all(v is None for v in rank_fraction_ranks(shapes, 1.0).values())


# ---------------------------------------------------------------------------------------- WeLore
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
    assert {id(p) for p in params} == {id(l.U) for _, l in factorized_layers(model)} | {
        id(l.V) for _, l in factorized_layers(model)} | {id(l.bias) for _, l in factorized_layers(model) if l.bias is not None}
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


# ---------------------------------------------------------------------------------------- PELA
def test_pela_student_init_teacher_frozen_and_distillation_term():
    teacher = make_tiny_llama(0)
    originals = {n: m.weight.detach().clone() for n, m in _linears(teacher).items()}
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = rw.compress(copy.deepcopy(teacher), "pela", ratio=0.5)
    _assert_factor_pairs_are_truncated_svd(student, originals)  # student init = SVD truncation of teacher
    for name, r in student.rankwise_compress.ranks.items():
        out_f, in_f = originals[name].shape
        assert r == out_f * in_f // (2 * (out_f + in_f))  # PELA's rank rule with c = 1/ratio = 2

    batch = lm_batches(1, seed=5)[0]
    parts = pela_losses(student, teacher, batch, kd_alpha=2.0, kd_beta=3.0, wpr_weight=0.5)
    assert parts["feature"].item() > 0 and parts["logits"].item() > 0
    expected = parts["task"] + 2.0 * parts["feature"] + 3.0 * parts["logits"] + 0.5 * parts["wpr"]
    torch.testing.assert_close(parts["total"], expected)
    # feature term: mean over blocks of MSE(student hidden, teacher hidden)
    hs = student(**batch, output_hidden_states=True).hidden_states[1:]
    ht = teacher(**batch, output_hidden_states=True).hidden_states[1:]
    manual = torch.stack([torch.mean((a - b) ** 2) for a, b in zip(hs, ht)]).mean()
    torch.testing.assert_close(parts["feature"], manual)
    # weight-perturbation regularizer: mean (max|UV − W_t| − ε)²
    gaps = [((l.U @ l.V - originals[n]).abs().max() - 1e-3) ** 2 for n, l in factorized_layers(student)]
    torch.testing.assert_close(weight_perturbation(student, teacher, 1e-3), torch.stack(gaps).mean())

    history = pela_distill(student, teacher, lm_batches(2), steps=3, lr=1e-3, kd_alpha=1.0, kd_beta=1.0, wpr_weight=1.0)
    assert len(history) == 3
    for rec in history:
        assert rec["feature"] > 0
        assert rec["total"] == pytest.approx(rec["task"] + rec["feature"] + rec["logits"] + rec["wpr"], rel=1e-5)
    for k, v in teacher.state_dict().items():  # teacher bit-identical
        assert torch.equal(v, teacher_state[k]), k
    assert all(p.grad is None for p in teacher.parameters())


def test_pela_through_compress_runs_distillation():
    model = make_tiny_llama(0)
    rw.compress(model, "pela", ratio=0.5, data=lm_batches(2), steps=2, lr=1e-3)
    hist = model.rankwise_compress.details["distill"]
    assert len(hist) == 2 and all(h["feature"] > 0 for h in hist)


# ---------------------------------------------------------------------------------------- LoRAPrune
def _loraprune_run(make, batches, ratio=0.5, steps=12, **kw):
    model = make(0)
    base_shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    seen = []

    def loss_fn(m, batch):
        # before this step's backward: LoRA has last step's gradients, W₀ must have none
        lora = [l for _, l in rw.adapter_layers(m)]
        seen.append(all(l.base_layer.weight.grad is None and not l.base_layer.weight.requires_grad for l in lora))
        return m(**batch).loss

    state = {}

    def on_target(m, step):
        state["step"] = step
        state["all_lora_grads"] = all(l.lora_A.grad is not None for _, l in rw.adapter_layers(m))

    model = rw.compress(model, "loraprune", ratio=ratio, data=batches(3), steps=steps, loss_fn=loss_fn,
                        prune_every=2, warmup=0.1, cooldown=0.25, on_target=on_target, **kw)
    return model, base_shapes, seen, state


@pytest.mark.parametrize("make,batches", [(make_tiny_llama, lm_batches), (make_tiny_bert, cls_batches)])
def test_loraprune_faithful(make, batches):
    steps = 12
    blocks = find_blocks(make(0))
    model, base_shapes, seen, reached = _loraprune_run(make, batches, ratio=0.5, steps=steps)
    cstate = model.rankwise_compress
    # 1. the frozen W₀ never gets a .grad (importance comes from LoRA's weights and gradients only)
    assert len(seen) == steps and all(seen)
    assert reached["all_lora_grads"]
    # 2. removed units are whole heads / channels: each block linear lost exactly those rows / columns,
    #    every other tensor keeps its shape; grouped-query attention keeps equal groups
    assert not rw.adapter_layers(model)
    block_names = {n for b in blocks for n in b.names}
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert {n: s for n, s in shapes.items() if n.rpartition(".")[0] not in block_names} == {
        n: s for n, s in base_shapes.items() if n.rpartition(".")[0] not in block_names}
    for block, info in zip(blocks, cstate.details["blocks"]):
        pruned, g, d = set(info["pruned_heads"]), block.group, block.head_dim
        heads, chans = len(pruned), info["pruned_channels"]
        kv = sum(pruned >= set(range(j * g, (j + 1) * g)) for j in range(block.kv_heads))
        kept_per_group(block, pruned)  # raises unless every surviving key-value group keeps as many query heads
        assert heads >= 1 and chans >= 1 and heads < block.heads
        assert model.get_submodule(block.q).weight.shape[0] == (block.heads - heads) * d
        assert model.get_submodule(block.o).weight.shape[1] == (block.heads - heads) * d
        for name in (block.k, block.v):
            assert model.get_submodule(name).weight.shape[0] == (block.kv_heads - kv) * d
        for name in block.mlp_out:
            assert model.get_submodule(name).weight.shape[0] == block.channels - chans
        for name in block.mlp_in:
            assert model.get_submodule(name).weight.shape[1] == block.channels - chans
    # 3. the schedule: cubic, monotone, and the target is reached at the scheduled step and held,
    #    at most one channel's weights below the ratio
    hist = cstate.details["history"]
    final = first_final_step(steps, 0.25)
    assert reached["step"] == final
    kept = [h["kept_fraction"] for h in hist]
    assert all(a >= b for a, b in zip(kept, kept[1:]))
    for h in hist:
        assert h["target_sparsity"] == pytest.approx(cubic_sparsity(h["step"], steps, 0.5, 0.1, 0.25))
    assert kept[0] == 1.0
    slack = max(b.channel_weights / b.total for b in blocks)
    assert all(0.5 - slack <= k <= 0.5 + 1e-9 for k in kept[final:])
    # 4. weights_after counts the weights the shrunk matrices really hold
    assert cstate.weights_after == sum(model.get_submodule(n).weight.numel() for n in block_names)
    assert cstate.weights_after == round(kept[-1] * cstate.weights_before)


def test_loraprune_recover_trains_lora_on_the_shrunk_model():
    model = make_tiny_llama(0)
    rw.compress(model, "loraprune", ratio=0.6, data=lm_batches(2), steps=5, prune_every=1, warmup=0.0,
                cooldown=0.2)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    targets = model.rankwise_compress.targets
    before = {n: model.get_submodule(n).weight.detach().clone() for n in targets}
    embed = model.model.embed_tokens.weight.detach().clone()
    hist = recover(model, lm_batches(1), steps=2, lr=1e-2, r=4)
    assert len(hist) == 2
    # LoRA was merged into the (smaller) block linears: same shapes, new weights, no adapter left
    assert not rw.adapter_layers(model)
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == shapes
    assert all(not torch.equal(model.get_submodule(n).weight, before[n]) for n in targets)
    assert torch.equal(model.model.embed_tokens.weight, embed)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['prune_every'\]"):
        recover(model, lm_batches(1), steps=1, prune_every=2)


def test_cubic_schedule_shape():
    vals = [cubic_sparsity(t, 100, 0.6, 0.1, 0.1) for t in range(100)]
    assert vals[:11] == [0.0] * 11 and vals[90:] == [0.6] * 10
    assert all(a <= b for a, b in zip(vals, vals[1:]))
    assert vals[50] == pytest.approx(0.6 * (1 - (1 - 40 / 80) ** 3))


# ---------------------------------------------------------------------------------------- DSEE
def test_dsee_update_is_low_rank_plus_sparse_with_set_nnz():
    model = make_tiny_llama(0)
    rw.adapt(model, "dsee", r=2, nnz=10, alpha=4)
    # give the adapters a few real training steps, no pruning yet (prune_at=1 → prune at the end)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for batch in lm_batches(3):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    for name, layer in rw.adapter_layers(model):
        assert isinstance(layer, DSEELayer)
        delta = layer.delta_weight().detach()
        low = (layer.lora_B @ layer.lora_A).detach() * layer.scale
        assert torch.linalg.matrix_rank(layer.lora_B.detach().double() @ layer.lora_A.detach().double()) <= 2
        sparse = delta - low
        support = set(torch.nonzero(sparse.flatten().abs() > 1e-7).flatten().tolist())
        assert support == set(layer.sparse_index.tolist()) and len(support) == 10
        assert layer.trainable_count() == 2 * (layer.in_features + layer.out_features) + 10


def test_dsee_support_recovers_planted_sparse_entries():
    """W₀ = large rank-2 part + 15 moderate spikes: the largest |W₀| entries belong to the low-rank
    part, yet the decomposition W₀ ≈ L + S puts Ω exactly on the spikes."""
    g = torch.Generator().manual_seed(0)
    low = 2 * torch.randn(40, 2, generator=g) @ torch.randn(2, 30, generator=g)
    planted = torch.randperm(1200, generator=g)[:15]
    w = low.flatten().clone()
    w[planted] += 3.0 * torch.sign(torch.randn(15, generator=g))
    w = w.view(40, 30)
    idx = dsee_support(w, nnz=15, support="decomposition", rank=2, iters=3)
    assert set(idx.tolist()) == set(planted.tolist())
    assert not set(w.abs().flatten().topk(15).indices.tolist()) & set(planted.tolist())  # magnitude would miss them
    rnd = dsee_support(w, nnz=15, support="random", generator=torch.Generator().manual_seed(1))
    assert len(set(rnd.tolist())) == 15


def test_dsee_final_model_hits_sparsity_with_exact_zeros():
    model = make_tiny_llama(0)
    rw.adapt(model, "dsee", r=2, nnz=8)
    dsee_finetune(model, lm_batches(2), steps=4, sparsity=0.4, prune_at=0.5, lr=1e-2)
    masks = {n: l.keep_mask.clone() for n, l in rw.adapter_layers(model)}
    expected = model(**lm_batches(1, seed=4)[0]).logits.detach()
    total = sum(m.numel() for m in masks.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.4 * total)
    rw.merge_and_unload(model)
    for name, keep in masks.items():
        w = model.get_submodule(name).weight
        assert torch.all(w[~keep] == 0)  # exactly zero, not small
    torch.testing.assert_close(model(**lm_batches(1, seed=4)[0]).logits, expected, atol=1e-4, rtol=1e-4)
    # through rw.compress: kept fraction = non-zero fraction of the targeted weights
    m2 = rw.compress(make_tiny_bert(0), "dsee", ratio=0.7, data=cls_batches(2), steps=2, r=2, nnz=4)
    assert m2.rankwise_compress.kept_fraction == pytest.approx(0.7, abs=1e-3)


def test_dsee_pruned_adapter_save_load_round_trip(tmp_path):
    model = make_tiny_llama(0)
    rw.adapt(model, "dsee", r=2, nnz=6)
    dsee_finetune(model, lm_batches(2), steps=2, sparsity=0.3, prune_at=0.5, lr=1e-2)
    batch = lm_batches(1, seed=7)[0]
    expected = model(**batch).logits
    rw.save_adapter(model, tmp_path / "dsee")
    fresh = rw.load_adapter(make_tiny_llama(0), tmp_path / "dsee")
    torch.testing.assert_close(fresh(**batch).logits, expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------- round trips
def test_factorized_dense_factorized_round_trip():
    lin = nn.Linear(24, 16)
    full = FactorizedLinear.from_linear(lin)  # full rank: exact
    torch.testing.assert_close(full.to_linear().weight, lin.weight, atol=1e-5, rtol=1e-5)
    svd = thin_svd(lin.weight)
    up, down = svd.factors(5)
    fac = factorized_from_factors(up, down, lin.bias)
    dense = fac.to_linear()
    again = FactorizedLinear.from_linear(dense, 5)  # rank-5 matrix → rank-5 factors reproduce it
    torch.testing.assert_close(again.dense_weight(), fac.dense_weight(), atol=1e-5, rtol=1e-4)
    x = torch.randn(3, 24)
    torch.testing.assert_close(again(x), fac(x), atol=1e-5, rtol=1e-4)
    model = make_tiny_llama(0)
    rw.compress(model, "svd", ratio=0.5)
    batch = lm_batches(1)[0]
    expected = model(**batch).logits
    densify(model)
    assert not factorized_layers(model)
    torch.testing.assert_close(model(**batch).logits, expected, atol=1e-4, rtol=1e-4)


#: Settings for the methods that train while compressing; every catalogued method is round-tripped.
TRAINING_SETTINGS = {"loraprune": {"steps": 2}}


@pytest.mark.parametrize("method", list(COMPRESS_METHODS))
def test_save_load_compressed_round_trip(tmp_path, method):
    """Generic, for every catalogued compression method: save, load, same logits and ranks."""
    model = make_tiny_llama(0)
    settings = TRAINING_SETTINGS.get(method, {})
    rw.compress(model, method, ratio=0.6, data=lm_batches(2) if settings else None, **settings)
    batch = lm_batches(1)[0]
    expected = model(**batch).logits
    save_compressed(model, tmp_path / "m")
    loaded = load_compressed(tmp_path / "m")
    torch.testing.assert_close(loaded(**batch).logits, expected)
    assert loaded.rankwise_compress.ranks == model.rankwise_compress.ranks
    assert [n for n, _ in factorized_layers(loaded)] == [n for n, _ in factorized_layers(model)]


def test_recover_trains_only_the_method_part():
    model = make_tiny_llama(0)
    rw.compress(model, "svd", ratio=0.5)
    embed = model.model.embed_tokens.weight.detach().clone()
    before = {n: l.U.detach().clone() for n, l in factorized_layers(model)}
    hist = recover(model, lm_batches(2), steps=2, lr=1e-2)
    assert len(hist) == 2
    assert torch.equal(model.model.embed_tokens.weight, embed)
    assert model.model.embed_tokens.weight.requires_grad  # flags restored
    assert any(not torch.equal(l.U, before[n]) for n, l in factorized_layers(model))


def test_perplexity_matches_manual_loss():
    model = make_tiny_llama(0)
    blocks = torch.randint(1, 100, (5, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        losses = [model(input_ids=b[None], labels=b[None]).loss for b in blocks]
    assert perplexity(model, blocks, batch_size=2) == pytest.approx(math.exp(float(torch.stack(losses).mean())), rel=1e-5)


# ---------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("ratio", [0, 0.0, -0.1, 1.5, "half", True, None])
def test_bad_ratio(ratio):
    with pytest.raises(ValueError, match=r"ratio=.*\(0, 1\]"):
        rw.compress(make_tiny_llama(0), "svd", ratio=ratio)


def test_bad_inputs():
    with pytest.raises(ValueError, match="method='nope' is not allowed"):
        rw.compress(make_tiny_llama(0), "nope")
    with pytest.raises(ValueError, match=r"rank=64 is larger than min\(out_features, in_features\)=32"):
        rw.compress(make_tiny_llama(0), "svd", rank=64)
    with pytest.raises(ValueError, match=r"rank=64 is larger"):
        rw.compress(make_tiny_llama(0), "lord", rank=64)
    with pytest.raises(ValueError, match="only nn.Linear"):
        rw.compress(make_tiny_llama(0), "svd", targets=["embed_tokens"])
    with pytest.raises(ValueError, match="only nn.Linear"):
        rw.compress(make_tiny_llama(0), "welore", targets=r"model\.layers\.0\.mlp")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['rnak'\]"):
        rw.compress(make_tiny_llama(0), "svd", rnak=3)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['alpha'\] for method 'pela'"):
        rw.compress(make_tiny_llama(0), "pela", alpha=3)
    with pytest.raises(ValueError, match="trainable='some' is not allowed"):
        rw.compress(make_tiny_llama(0), "pela", trainable="some")
    with pytest.raises(ValueError, match="one-shot: steps must be 0"):
        rw.compress(make_tiny_llama(0), "svd", steps=3)
    with pytest.raises(ValueError, match="needs data=..."):
        rw.compress(make_tiny_llama(0), "pela", steps=3)
    with pytest.raises(ValueError, match="loraprune needs data"):
        rw.compress(make_tiny_llama(0), "loraprune", ratio=0.5)
    with pytest.raises(ValueError, match="targets must be 'all-linear' for loraprune"):
        rw.compress(make_tiny_llama(0), "loraprune", targets=["q_proj"], data=lm_batches(1), steps=2)
    with pytest.raises(ValueError, match="warmup \\+ cooldown"):
        rw.compress(make_tiny_llama(0), "loraprune", data=lm_batches(1), steps=2, warmup=0.5, cooldown=0.5)
    with pytest.raises(ValueError, match="support='dense' is not allowed"):
        rw.compress(make_tiny_llama(0), "dsee", support="dense")
    with pytest.raises(ValueError, match="nnz=5000 exceeds"):
        rw.adapt(make_tiny_llama(0), "dsee", r=2, nnz=5000)
    with pytest.raises(ValueError, match="cannot be reached by WeLore"):
        welore_ranks({"a": torch.tensor([1.0, 0.5])}, {"a": (2, 2)}, 0.1)
    compressed = rw.compress(make_tiny_llama(0), "svd", ratio=0.5)
    with pytest.raises(ValueError, match="already compressed"):
        rw.compress(compressed, "svd")
    with pytest.raises(ValueError, match="not compressed with rw.compress\\(model, 'welore'"):
        welore_finetune_params(compressed)
    sparse = rw.compress(make_tiny_llama(0), "dsee", ratio=0.8)
    with pytest.raises(ValueError, match="dsee recovers during its own fine-tuning"):
        recover(sparse, lm_batches(1), steps=1)
    with pytest.raises(ValueError, match="no Llama-style"):
        find_blocks(nn.Sequential(nn.Linear(4, 4)))


# ---------------------------------------------------------------------------------------- CLI / slow
def _smollm2_available() -> bool:
    try:
        from rankwise.models import smollm2_cache_path

        return (smollm2_cache_path() / "tokenizer.json").exists()
    except Exception:  # noqa: BLE001
        return False


@pytest.mark.skipif(not _smollm2_available(), reason="needs the cached SmolLM2 tokenizer")
def test_cli_on_tiny_model(tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from rankwise.cli import compress as cli
    from rankwise.models import smollm2_cache_path

    tok = AutoTokenizer.from_pretrained(str(smollm2_cache_path()), local_files_only=True)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["compress", "--model", str(tmp_path / "tiny"), "--method", "welore", "--ratio", "0.8",
                              "--eval-blocks", "2", "--block-size", "32", "--recover-steps", "1",
                              "--output", str(tmp_path / "out"), "--no-progress"])
    assert cli.run(args) == 0
    import json

    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert set(report["after"]["perplexity"]) == {"bbc", "stdlib-code"}
    assert report["after"]["kept_fraction"] <= 0.8
    targeted = 2 * (4 * 32 * 32 - 2 * 32 * 16 + 3 * 32 * 64)  # q, o (32x32), k, v (16x32), gate, up, down per block
    assert report["before"]["targeted_weights"] == targeted
    assert abs(report["after"]["targeted_weights"] / targeted - report["after"]["kept_fraction"]) < 1e-4
    assert (tmp_path / "out" / "report.md").read_text().startswith("# rankwise compress")
    loaded = load_compressed(tmp_path / "out" / "model")
    assert loaded.rankwise_compress.method == "welore"
    # data-aware LoRD only when asked for, and only for lord
    base = ["compress", "--model", str(tmp_path / "tiny"), "--ratio", "0.8", "--eval-blocks", "1", "--block-size", "32",
            "--no-progress", "--no-save"]
    args = parser.parse_args([*base, "--method", "lord", "--calibration-batches", "1", "--recover-steps", "1",
                              "--output", str(tmp_path / "lord")])
    assert cli.run(args) == 0
    lord_report = json.loads((tmp_path / "lord" / "report.json").read_text())
    assert lord_report["calibration_batches"] == 1 and lord_report["details"]["decomposition"] == "output-covariance"
    with pytest.raises(ValueError, match="--calibration-batches=1 needs --method lord"):
        cli.run(parser.parse_args([*base, "--method", "svd", "--calibration-batches", "1"]))


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
