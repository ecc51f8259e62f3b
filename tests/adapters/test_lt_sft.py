"""LT-SFT (Ansell et al. 2022): the mask is the global top-K of a phase-1 full fine-tune's change |θ₁ − θ₀|,
phase 2 starts from θ₀ and changes only masked entries, and sparse fine-tunings compose by addition."""

from __future__ import annotations

import pytest
import torch

import rankwise as rw
from rankwise.adapters.sparse_delta import scatter_dense
from rankwise.train import TrainConfig, train

from ..conftest import lm_batches, make_tiny_llama

STEPS, LR = 4, 1e-2


def _phase1_reference(data):
    """Phase 1 written out: AdamW on every parameter of the tiny Llama (no dropout), cycling the batches."""
    model = make_tiny_llama(0).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    for i in range(STEPS):
        model(**data[i % len(data)]).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model


def _adapted(data, r=1):
    return rw.adapt(make_tiny_llama(0), "lt_sft", r=r, init_data=data, phase1_steps=STEPS, phase1_lr=LR)


def test_mask_is_the_global_top_k_of_the_phase1_change():
    data = lm_batches(seed=3)
    model = _adapted(data)
    base, tuned = make_tiny_llama(0), _phase1_reference(data)
    layers = rw.adapter_layers(model)
    names = [n for n, _ in layers]
    k = sum(m.in_features + m.out_features for _, m in layers)  # r = 1: a rank-1 LoRA's count per matrix
    assert sum(m.trainable_count() for _, m in layers) == k
    change = torch.cat([(tuned.get_submodule(n).weight - base.get_submodule(n).weight).abs().flatten()
                        for n in names])
    threshold = change.topk(k).values[-1]
    offset = 0
    for name, layer in layers:
        numel = layer.out_features * layer.in_features
        expected = (change[offset: offset + numel] >= threshold).nonzero().flatten()
        assert torch.equal(layer.sparse_index.sort().values, expected), name
        offset += numel
    # layers the top-K left without an entry are not adapted; every adapted layer has some
    assert all(m.trainable_count() > 0 for _, m in layers)


def test_phase2_starts_at_theta0_and_changes_only_the_masked_entries():
    data = lm_batches(seed=3)
    model = _adapted(data)
    base = make_tiny_llama(0)
    batch = lm_batches(seed=9)[0]
    torch.testing.assert_close(model(**batch).logits, base(**batch).logits, atol=0, rtol=0)  # reset to θ₀
    masks = {n: m.sparse_index.clone() for n, m in rw.adapter_layers(model)}
    train(model, data, config=TrainConfig(max_steps=3, lr=LR, progress=False, measure_memory=False))
    plain = rw.merge_and_unload(model)
    before, after = dict(base.named_parameters()), dict(plain.named_parameters())
    for name, p in after.items():
        module = name.removesuffix(".weight")
        if module not in masks:
            assert torch.equal(p, before[name]), name
            continue
        changed = (p != before[name]).flatten().nonzero().flatten()
        assert changed.numel() > 0, name
        assert torch.isin(changed, masks[module]).all(), name


def test_sparse_fine_tunings_compose_by_addition(tmp_path):
    """W₀ + φ_task + φ_lang element-wise: two LT-SFT adapters loaded side by side."""
    paths = {}
    for name, seed in (("task", 3), ("lang", 4)):
        data = lm_batches(seed=seed)
        model = _adapted(data)
        train(model, data, config=TrainConfig(max_steps=2, lr=LR, progress=False, measure_memory=False))
        paths[name] = rw.save_adapter(model, tmp_path / name)
    composed = rw.load_adapter(make_tiny_llama(0), paths["task"])
    rw.load_adapter(composed, paths["lang"], name="lang")
    by_hand = make_tiny_llama(0)
    with torch.no_grad():
        for name, layer in rw.adapter_layers(composed):
            by_hand.get_submodule(name).weight += scatter_dense(layer.sparse_values, layer.sparse_index, layer.shape)
    batch = lm_batches(seed=9)[0]
    torch.testing.assert_close(composed(**batch).logits, by_hand(**batch).logits, atol=1e-5, rtol=0)
    merged = rw.merge_and_unload(composed)  # the architecture is unchanged: the same parameters as the base
    assert [(n, p.shape) for n, p in merged.named_parameters()] == [(n, p.shape) for n, p in by_hand.named_parameters()]
    torch.testing.assert_close(merged(**batch).logits, by_hand(**batch).logits, atol=1e-5, rtol=0)


def test_lt_sft_needs_init_data_and_checks_its_options():
    with pytest.raises(ValueError, match="lt_sft.*init_data"):
        rw.adapt(make_tiny_llama(0), "lt_sft", r=1)
    with pytest.raises(ValueError, match="phase1_steps"):
        rw.adapt(make_tiny_llama(0), "lt_sft", r=1, phase1_steps=0, init_data=lm_batches())
    with pytest.raises(ValueError, match="density"):
        rw.adapt(make_tiny_llama(0), "lt_sft", density=1.5, init_data=lm_batches())


def test_a_4bit_base_is_refused_before_phase_1():
    """Phase 1 fine-tunes the target weights, which 4-bit codes cannot take: a clear error, the model unchanged
    (it was a load_state_dict error after phase 1)."""
    pytest.importorskip("bitsandbytes")
    model = rw.quantize(make_tiny_llama(0))
    before = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    with pytest.raises(ValueError, match="method 'lt_sft' fine-tunes the target weights .* 4-bit quantized"):
        rw.adapt(model, "lt_sft", r=2, init_data=lm_batches(2))
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
