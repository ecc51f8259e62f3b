"""LoRAM / QLoRAM: LoRA trained on a pruned copy, recovered to the original shapes, used on the original."""

from __future__ import annotations

import copy

import pytest
import torch

import rankwise as rw
from rankwise import catalogue
from rankwise.compress.finetune import finetune
from rankwise.compress.loram import Kept, choose_units, prune_copy, recover_factors, taylor_scores
from rankwise.compress.loraprune import LoRAPruneState, remove_pruned_units
from rankwise.layout import find_blocks

from ..conftest import cls_batches, lm_batches, make_tiny_bert, make_tiny_llama

DATA = lm_batches(n=3, batch=2, seq=8)
OPTIONS = {"ratio": 0.5, "steps": 3, "r": 2, "lr": 1e-2, "seed": 1}


def trained_pruned(model):
    """LoRAM's steps one by one: random units (seed 1), the pruned copy, LoRA trained on it."""
    blocks = find_blocks(model)
    units = choose_units(model, blocks, 0.5, "random", seed=1)
    pruned, kept = prune_copy(model, blocks, units)
    rw.adapt(pruned, "lora", r=2, alpha=16.0, name="loram", seed=1)
    finetune(pruned, [p for p in pruned.parameters() if p.requires_grad], DATA, 3, 1e-2)
    return pruned, kept, blocks, units


@pytest.fixture(scope="module")
def recovered():
    model = rw.compression.loram(make_tiny_llama(), DATA, **OPTIONS)
    return model, *trained_pruned(make_tiny_llama())


def test_recover_factors_zero_rows_of_b_or_columns_of_a():
    g = torch.Generator().manual_seed(0)
    b, a = torch.randn(3, 2, generator=g), torch.randn(2, 5, generator=g)
    full_b, full_a = recover_factors(b, a, Kept((6, 5), False, torch.tensor([0, 2, 5])))
    assert full_b.shape == (6, 2) and torch.equal(full_b[[0, 2, 5]], b) and not full_b[[1, 3, 4]].any()
    assert torch.equal(full_a, a)
    b, a = torch.randn(6, 2, generator=g), torch.randn(2, 3, generator=g)
    full_b, full_a = recover_factors(b, a, Kept((6, 5), True, torch.tensor([1, 3, 4])))
    assert full_a.shape == (2, 5) and torch.equal(full_a[:, [1, 3, 4]], a) and not full_a[:, [0, 2]].any()
    assert torch.equal(full_b, b)
    with pytest.raises(ValueError, match="kept output rows"):
        recover_factors(torch.randn(4, 2), a, Kept((6, 3), False, torch.tensor([1, 3, 4])))


def test_recovered_factors_have_the_original_shapes_zeros_at_pruned_positions_and_the_trained_values(recovered):
    model, pruned, kept, _, _ = recovered
    state = model.rankwise_loram["loram"]
    original = make_tiny_llama()
    assert len(state.layers) == 14 and state.params_pruned < 0.6 * state.params_original
    trained = dict(rw.adapter_layers(pruned, "loram"))
    for name, layer in rw.adapter_layers(model, "loram"):
        out_f, in_f = original.get_submodule(name).weight.shape
        b, a = layer.lora_B.detach(), layer.lora_A.detach()
        tb, ta = trained[name].lora_B.detach(), trained[name].lora_A.detach()
        assert b.shape == (out_f, 2) and a.shape == (2, in_f)
        k = state.kept[name]
        assert torch.equal(k.index, kept[name].index) and k.input_side == kept[name].input_side
        full = torch.ones(in_f if k.input_side else out_f, dtype=torch.bool)
        full[k.index] = False  # the pruned positions
        assert 0 < int(full.sum()) < full.numel()
        if k.input_side:  # o, down: columns of A
            assert torch.equal(a[:, k.index], ta) and torch.equal(b, tb) and not a[:, full].any()
            assert bool(ta.abs().sum(0).gt(0).all())  # every kept column was trained
        else:  # q, k, v, gate, up: rows of B
            assert torch.equal(b[k.index], tb) and torch.equal(a, ta) and not b[full].any()
            assert bool(tb.abs().sum(1).gt(0).all())


def test_the_recovered_update_restricted_to_the_kept_units_is_the_trained_one(recovered):
    """Merging the recovered adapter into the original and then removing the pruned units gives the
    pruned model with its trained adapter merged (same weights, same logits)."""
    model, pruned, _, blocks, units = recovered
    merged = rw.merge_and_unload(copy.deepcopy(model))
    remove_pruned_units(merged, LoRAPruneState(blocks, units))
    small = rw.merge_and_unload(copy.deepcopy(pruned))
    for name in (n for b in blocks for n in b.names):
        torch.testing.assert_close(merged.get_submodule(name).weight, small.get_submodule(name).weight,
                                   atol=1e-6, rtol=1e-6)
    ids = torch.randint(1, 100, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, small(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_recovered_adapter_is_a_plain_lora_that_exports_to_peft(recovered, tmp_path):
    model, *_ = recovered
    ids = torch.randint(1, 100, (2, 8))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        assert not torch.allclose(want, make_tiny_llama()(input_ids=ids).logits)  # the adapter changes f
    assert rw.adapter_state(model, "loram").method == "lora"
    rw.export_peft(model, tmp_path / "peft", name="loram")
    imported = rw.import_peft(make_tiny_llama(), tmp_path / "peft", name="loram")
    with torch.no_grad():
        torch.testing.assert_close(imported(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
    for (_, a), (_, b) in zip(rw.adapter_layers(model, "loram"), rw.adapter_layers(imported, "loram"), strict=True):
        torch.testing.assert_close(b.delta_weight(), a.delta_weight(), atol=1e-6, rtol=1e-6)


def test_taylor_criterion_prunes_the_units_without_importance():
    """A key-value group and an MLP channel whose weights are zero have |W ⊙ ∂L/∂W| = 0: pruned first."""
    model = make_tiny_llama()
    block = find_blocks(model)[0]
    with torch.no_grad():
        d = block.head_dim
        for name in (block.k, block.v):
            model.get_submodule(name).weight[d:2 * d].zero_()  # key-value head 1 ...
        model.get_submodule(block.q).weight[2 * d:4 * d].zero_()  # ... and its query heads 2, 3
        model.get_submodule(block.o).weight[:, 2 * d:4 * d].zero_()
        for name in block.mlp_out:
            model.get_submodule(name).weight[7].zero_()
        model.get_submodule(block.mlp_in[0]).weight[:, 7].zero_()
    units = choose_units(model, [block], 0.5, "taylor", data=DATA, batches=2)
    assert units[0].heads == {2, 3} and units[0].pruned_kv(block) == [1]
    units = choose_units(model, [block], 63 / 64, "taylor", data=DATA, batches=2)
    assert units[0].channels == {7}
    assert all(p.grad is None for p in model.parameters())  # gradients cleaned up
    # the element score is LLM-Pruner's first-order |W ⊙ ∂L/∂W|, the gradient summed over the batches
    weight = model.get_submodule(block.q).weight
    grad = sum(torch.autograd.grad(model(**batch).loss, weight)[0] for batch in DATA[:2])
    torch.testing.assert_close(taylor_scores(model, [block], DATA, 2)[block.q], (weight.detach() * grad).abs())


def test_loram_on_bert_copies_the_trained_head_and_qloram_trains_on_4bit():
    model = make_tiny_bert()
    head = model.classifier.weight.detach().clone()
    rw.compression.loram(model, cls_batches(n=2), ratio=0.5, steps=2, r=2, lr=1e-2, criterion="taylor")
    assert rw.adapter_state(model, "loram").trainable_modules == ["classifier"]
    assert not torch.equal(model.classifier.weight, head)  # trained on the pruned copy, carried over
    plain = rw.compression.loram(make_tiny_llama(), DATA, **OPTIONS)
    quant = rw.compression.loram(make_tiny_llama(), DATA, **OPTIONS, quantize="nf4")
    losses = [[h["loss"] for h in m.rankwise_loram["loram"].history] for m in (plain, quant)]
    assert quant.rankwise_loram["loram"].quantize == "nf4" and losses[0] != losses[1]  # a 4-bit base trained
    aligned = rw.compression.loram(make_tiny_llama(), DATA, **OPTIONS, align_data=lm_batches(n=2, seed=3),
                                   align_steps=2)
    assert len(aligned.rankwise_loram["loram"].align_history) == 2
    assert [h["loss"] for h in aligned.rankwise_loram["loram"].history] != losses[0]


def test_loram_is_catalogued_and_refuses_bad_input():
    record = catalogue.get("loram")
    assert record.status == "done" and record.api == "train-pruned" and record.exports == "peft-lora"
    for kwargs, message in (
        ({"ratio": 0.0}, "ratio=0.0 must be a number in (0, 1]"),
        ({"criterion": "magnitude"}, "criterion='magnitude' is not allowed"),
        ({"align_steps": 2}, "align_steps=2 needs align_data"),
        ({"blocks": [5]}, "blocks=5 must be block indices in [0, 1]"),
        ({"quantize": "int3"}, "scheme='int3' is not allowed"),
    ):
        with pytest.raises(ValueError) as err:
            rw.compression.loram(make_tiny_llama(), DATA, **{**OPTIONS, **kwargs})
        assert message in str(err.value)
    with pytest.raises(ValueError, match="model has rankwise adapters"):
        rw.compression.loram(rw.adapt(make_tiny_llama(), "lora", r=2), DATA)
