"""LoRAPrune: the faithful test (importance from LoRA alone, the cubic schedule), recovery on the shrunk model;
and the physical removal of the pruned heads and channels: the shrunk model computes exactly what the zeroed
(or masked) dense model computes, holds exactly the kept weights, keeps grouped-query attention standard, and
round-trips through save_compressed / load_compressed."""

from __future__ import annotations

import copy
import itertools
import json
import random

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.compress import cubic_sparsity, find_blocks, load_compressed, recover, save_compressed
from rankwise.compress.loraprune import (
    Block,
    BlockState,
    LoRAPruneState,
    first_final_step,
    grow_heads,
    kept_per_group,
    remove_pruned_units,
)

from ..conftest import cls_batches, lm_batches, make_tiny_bert, make_tiny_llama


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
    for block, info in zip(blocks, cstate.details["blocks"], strict=True):
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
    assert all(a >= b for a, b in itertools.pairwise(kept))
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
    assert all(a <= b for a, b in itertools.pairwise(vals))
    assert vals[50] == pytest.approx(0.6 * (1 - (1 - 40 / 80) ** 3))


# ---------------------------------------------------------------------------------------- shrink
def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _state(model: nn.Module, heads: list[set[int]], channels: list[set[int]]) -> LoRAPruneState:
    blocks = find_blocks(model)
    return LoRAPruneState(blocks, [BlockState(h, c) for h, c in zip(heads, channels, strict=True)])


def _input_side(state: LoRAPruneState) -> set[str]:
    return {n for b in state.blocks for n in (b.o, *b.mlp_in)}


@torch.no_grad()
def _zero_pruned(model: nn.Module, state: LoRAPruneState) -> None:
    """The dense reference: pruned output rows (and their bias) / input columns set to 0."""
    for name, keep in state.row_masks().items():
        lin = model.get_submodule(name)
        if name in _input_side(state):
            lin.weight[:, ~keep] = 0
        else:
            lin.weight[~keep] = 0
            if lin.bias is not None:
                lin.bias[~keep] = 0


def _pruned_bias_entries(model: nn.Module, state: LoRAPruneState) -> int:
    return sum(int((~keep).sum()) for name, keep in state.row_masks().items()
               if name not in _input_side(state) and model.get_submodule(name).bias is not None)


# layer 0: a whole key-value group goes (heads 2, 3 → kv head 1); layer 1: one query head of every group
LLAMA_HEADS = [{2, 3}, {0, 2}]


BERT_HEADS = [{1}, {0, 2, 3}]


@pytest.mark.parametrize("kind,attn", [("llama", "sdpa"), ("llama", "eager"), ("bert", "sdpa"), ("bert", "eager")])
def test_shrunk_model_equals_zeroed_dense_model(kind, attn):
    make, batches, heads = {"llama": (make_tiny_llama, lm_batches, LLAMA_HEADS),
                            "bert": (make_tiny_bert, cls_batches, BERT_HEADS)}[kind]
    dense = make(0)
    dense.set_attn_implementation(attn)
    if kind == "bert":  # BERT's biases start at 0; make them matter
        with torch.no_grad():
            for p in dense.parameters():
                if p.ndim == 1:
                    p.normal_(0, 0.1)
    rng = random.Random(0)
    state = _state(dense, heads, [set(rng.sample(range(64), 20)), set(rng.sample(range(64), 45))])
    _zero_pruned(dense, state)
    shrunk = copy.deepcopy(dense)
    layout = remove_pruned_units(shrunk, state)
    batch = batches(1, seed=3)[0]
    with torch.no_grad():
        torch.testing.assert_close(shrunk(**batch).logits, dense(**batch).logits, atol=1e-5, rtol=1e-5)
    # exactly the pruned weights (state accounting) and the pruned rows' bias entries are gone
    pruned = sum(u.pruned_weights(b) for b, u in zip(state.blocks, state.units, strict=True))
    assert _params(dense) - _params(shrunk) == pruned + _pruned_bias_entries(dense, state)
    if kind == "llama":
        assert layout["attributes"]["model.layers.0.self_attn"] == {"num_key_value_groups": 2}
        assert layout["attributes"]["model.layers.1.self_attn"] == {"num_key_value_groups": 1}
        assert shrunk.model.layers[0].self_attn.k_proj.out_features == 8  # one of two kv heads left
        assert shrunk.model.layers[1].self_attn.k_proj.out_features == 16  # both kv heads still used
    else:
        assert layout["attributes"]["bert.encoder.layer.1.attention.self"] == {"num_attention_heads": 1,
                                                                                "all_head_size": 8}


def test_shrink_refuses_layouts_it_cannot_represent():
    model = make_tiny_llama(0)
    with pytest.raises(ValueError, match="keep different numbers of query heads"):
        remove_pruned_units(model, _state(model, [{0}, set()], [set(), set()]))  # groups keep 1 and 2 heads
    with pytest.raises(ValueError, match="at least one must be kept"):
        remove_pruned_units(model, _state(model, [{0, 1, 2, 3}, set()], [set(), set()]))
    with pytest.raises(ValueError, match="every MLP channel"):
        remove_pruned_units(model, _state(model, [set(), set()], [set(range(64)), set()]))
    assert model.model.layers[0].self_attn.q_proj.out_features == 32  # nothing was changed
    state = _state(model, [{0, 1}, set()], [set(), set()])
    rw.adapt(model, "lora", targets=["q_proj"], r=2)
    with pytest.raises(ValueError, match="merge LoRA first"):
        remove_pruned_units(model, state)


def _uniform_supersets(block: Block, pruned: set[int]):
    """Every pruned-head set ⊇ ``pruned`` whose surviving key-value groups keep equal head counts."""
    for size in range(len(pruned), block.heads):
        for extra in itertools.combinations(sorted(set(range(block.heads)) - pruned), size - len(pruned)):
            cand = pruned | set(extra)
            try:
                kept_per_group(block, cand)
            except ValueError:
                continue
            yield cand


@pytest.mark.parametrize("heads,kv", [(6, 2), (9, 3), (8, 4), (4, 4)])
def test_grow_heads_is_the_cheapest_uniform_superset(heads, kv):
    """Against brute force, from every state of a growing schedule and for every larger head count:
    the pruned heads only grow, every surviving key-value group keeps the same number of query
    heads, as many heads as allowed are pruned, and no other such superset has less newly pruned
    importance (multi-head attention: simply the least important heads)."""
    block = Block("q", "k", "v", "o", (), (), heads=heads, kv_heads=kv, head_dim=1, channels=1)
    imp = torch.rand(heads, generator=torch.Generator().manual_seed(1))
    units = BlockState(head_importance=imp)
    for step_count in range(heads):
        for count in range(len(units.heads), heads):
            new = grow_heads(block, units, count)
            options = [c for c in _uniform_supersets(block, units.heads) if len(c) <= count]
            most = max(len(c) for c in options)
            cost = min(float(imp[sorted(c - units.heads)].sum()) for c in options if len(c) == most)
            assert new >= units.heads and len(new) == most
            kept_per_group(block, new)
            assert float(imp[sorted(new - units.heads)].sum()) == pytest.approx(cost)
            if kv == heads:
                assert new == units.heads | set(torch.argsort(imp).tolist()[: count])
        units.heads = grow_heads(block, units, step_count)


@pytest.mark.parametrize("make,batches", [(make_tiny_llama, lm_batches), (make_tiny_bert, cls_batches)])
def test_compress_ends_with_the_masked_model_physically_smaller(make, batches, tmp_path):
    """End to end: the target sparsity is reached on the last step, so the masked LoRA model seen by
    ``on_target`` has the final weights; the merged, shrunk model must compute the same outputs with
    exactly the kept weights, and save / load must reproduce it bit for bit."""
    model = make(0)
    n_before = _params(model)
    batch = batches(1, seed=5)[0]
    seen = {}

    def on_target(m, step):
        with torch.no_grad():
            seen["step"], seen["logits"] = step, m(**batch).logits.clone()

    rw.compress(model, "loraprune", ratio=0.5, data=batches(3), steps=6, prune_every=1, warmup=0.0, cooldown=0.0,
                lr=1e-2, on_target=on_target)
    state = model.rankwise_compress
    assert seen["step"] == 5
    with torch.no_grad():
        logits = model(**batch).logits
    torch.testing.assert_close(logits, seen["logits"], atol=1e-5, rtol=1e-5)
    assert state.kept_fraction == pytest.approx(state.details["kept_fraction"])
    assert state.weights_after == sum(model.get_submodule(n).weight.numel() for n in state.targets)
    bias_rows = 0
    if make is make_tiny_bert:  # q, k, v and intermediate bias entries of the pruned heads / channels go too
        bias_rows = sum(3 * 8 * len(b["pruned_heads"]) + b["pruned_channels"] for b in state.details["blocks"])
    assert n_before - _params(model) == state.weights_before - state.weights_after + bias_rows

    save_compressed(model, tmp_path / "m")
    info = json.loads((tmp_path / "m" / "rankwise_compressed.json").read_text())
    assert set(info["state"]["resized"]["linears"]) == set(state.targets)
    loaded = load_compressed(tmp_path / "m")
    assert {n: p.shape for n, p in loaded.named_parameters()} == {n: p.shape for n, p in model.named_parameters()}
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, logits)
    assert loaded.rankwise_compress.resized == state.resized
    # a loaded model recovers too (no pruning masks needed)
    assert len(recover(loaded, batches(1), steps=1, lr=1e-3)) == 1


def test_importance_is_the_lora_guided_estimate_of_one_sgd_step():
    """Eq. 7–8: Ĝ is minus the change of BA after one unit SGD step on the factors,
    Ĝ = BA − (B − G_B)(A − G_A); a unit's importance is Σ|Ĝ ⊙ (W₀ + s·BA)| over its row (or column)."""
    from rankwise.adapters import InitContext, LoRALayer
    from rankwise.adapters.lora import LoRAConfig
    from rankwise.compress.loraprune import lora_importance

    g = torch.Generator().manual_seed(0)
    layer = LoRALayer(torch.nn.Linear(6, 4), LoRAConfig(r=2, alpha=4), InitContext(name="l"))
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(4, 2, generator=g))
    layer.lora_A.grad, layer.lora_B.grad = torch.randn(2, 6, generator=g), torch.randn(4, 2, generator=g)
    a, b, ga, gb = layer.lora_A.detach(), layer.lora_B.detach(), layer.lora_A.grad, layer.lora_B.grad
    g_hat = b @ a - (b - gb) @ (a - ga)
    score = (g_hat * (layer.base_layer.weight.detach() + layer.scale * b @ a)).abs()
    torch.testing.assert_close(lora_importance(layer, input_side=False), score.sum(1))
    torch.testing.assert_close(lora_importance(layer, input_side=True), score.sum(0))


def test_the_least_important_units_are_pruned():
    from rankwise.compress.loraprune import _least_important

    importance = torch.tensor([3.0, 1.0, 2.0, 0.0, 5.0])
    assert _least_important(importance, set(), 2, 5) == {1, 3}
    assert _least_important(importance, {4}, 3, 5) == {4, 1, 3}  # already-pruned units stay pruned


def test_importance_is_smoothed_by_the_moving_average(monkeypatch):
    """Eq. 10: Ī ← β·Ī + (1 − β)·I at every step (the first step: (1 − β)·I); a non-finite step is skipped."""
    import importlib
    from types import SimpleNamespace

    loraprune = importlib.import_module("rankwise.compress.loraprune")  # the module (the package exports a function)
    steps = iter([(torch.tensor([1.0, 2.0]), torch.tensor([4.0])), (torch.tensor([3.0, 0.0]), torch.tensor([2.0])),
                  (torch.tensor([float("nan"), 0.0]), torch.tensor([1.0]))])
    monkeypatch.setattr(loraprune, "block_importance", lambda model, block: next(steps))
    units = SimpleNamespace(head_importance=None, channel_importance=None)
    state = SimpleNamespace(blocks=[object()], units=[units])
    beta = 0.8
    for _ in range(3):
        loraprune.update_importance(None, state, beta)
    torch.testing.assert_close(units.head_importance, beta * (1 - beta) * torch.tensor([1.0, 2.0])
                               + (1 - beta) * torch.tensor([3.0, 0.0]))
    torch.testing.assert_close(units.channel_importance, torch.tensor([beta * (1 - beta) * 4.0 + (1 - beta) * 2.0]))
