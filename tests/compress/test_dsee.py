"""DSEE: the update is low rank plus sparse on a support read off W₀, the final model hits the sparsity with
exact zeros, save/load; and the structured (attention-head) final sparsity."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import rankwise as rw
from rankwise.compress import DSEEConfig, DSEELayer, attention_blocks, dsee_finetune, dsee_prune, dsee_support

from ..conftest import VOCAB, cls_batches, lm_batches, make_tiny_bert, make_tiny_llama


def test_dsee_update_is_low_rank_plus_sparse_with_set_nnz():
    model = make_tiny_llama(0)
    rw.adapt(model, "dsee", r=2, nnz=10, alpha=4)
    # give the adapters a few real training steps, no pruning yet (prune_at=1 → prune at the end)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for batch in lm_batches(3):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    for _name, layer in rw.adapter_layers(model):
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


# ---------------------------------------------------------------------------------------- DSEE heads
def _mha_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


@torch.no_grad()
def _plant(model: nn.Module, head_scales: list[list[float]], kv_updates: bool = True,
           weight_boost: float = 1.0) -> None:
    """Give each block's q/o (and k/v) updates per-head ℓ1 mass proportional to ``head_scales[block]``;
    multiply W₀ of the low-update half of the heads by ``weight_boost`` (so |W₀| ranks them the other way)."""
    g = torch.Generator().manual_seed(3)
    for block, scales in zip(attention_blocks(model), head_scales, strict=True):
        d = block.head_dim
        c = torch.tensor(scales).repeat_interleave(d)
        low = torch.tensor(scales).argsort()[: len(scales) // 2]
        boost = torch.ones(len(scales)).index_fill(0, low, weight_boost).repeat_interleave(d)
        for layer in (block.q, block.k, block.v, block.o):
            layer.sparse_values.zero_()
            layer.lora_A.copy_(torch.rand(layer.lora_A.shape, generator=g) + 0.5)
            layer.lora_B.copy_(0.01 * (torch.rand(layer.lora_B.shape, generator=g) + 0.5))
        for layer in (block.q, block.k, block.v):
            if layer is block.q or kv_updates:
                layer.lora_B.mul_(c[: layer.out_features, None])
            else:
                layer.lora_B.zero_()
            layer.base_layer.weight.mul_(boost[: layer.out_features, None])
        block.o.lora_A.mul_(c[None, :])
        block.o.base_layer.weight.mul_(boost[None, :])


def _zero_heads(model: nn.Module, prefix: str, heads: int, d: int, kind: str) -> set[int]:
    """Heads whose slice of the merged module ``kind`` (q/k/v rows or o columns) is all exactly 0."""
    names = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj"}
    w = model.get_submodule(prefix + names[kind]).weight
    w = w.T if kind == "o" else w
    return {h for h in range(w.shape[0] // d) if torch.all(w[h * d : (h + 1) * d] == 0)}


def test_dsee_heads_prunes_the_least_important_whole_heads():
    model = _mha_llama(0)
    rw.adapt(model, "dsee", r=2, nnz=4, structure="heads")
    scales = [[3.0, 0.1, 2.0, 0.5], [0.2, 4.0, 0.3, 1.0]]  # least important: {1, 3} and {0, 2}
    _plant(model, scales, weight_boost=20.0)  # |W₀| is largest exactly on those heads
    other = copy.deepcopy(model)
    for _, layer in rw.adapter_layers(other):
        layer.config = DSEEConfig(r=2, nnz=4, structure="heads", head_score="weight_update")
    mlp_before = model.model.layers[0].mlp.up_proj.base_layer.weight.clone()
    assert dsee_prune(model, 0.5) == 4  # round(0.5·4) heads in each of the 2 blocks
    assert dsee_prune(other, 0.5) == 4
    rw.merge_and_unload(model)
    rw.merge_and_unload(other)
    for i, expected in enumerate([{1, 3}, {0, 2}]):
        prefix = f"model.layers.{i}."
        for kind in "qkvo":  # whole heads: q, k, v rows and o columns exactly 0, nothing else
            assert _zero_heads(model, prefix, 4, 8, kind) == expected
        # the |W₀| + |ΔW| score keeps the heavy-weight heads and prunes the others instead
        assert _zero_heads(other, prefix, 4, 8, "q") == {0, 1, 2, 3} - expected
    torch.testing.assert_close(model.model.layers[0].mlp.up_proj.weight, mlp_before)  # MLP untouched


def test_dsee_heads_with_grouped_query_attention():
    model = make_tiny_llama(0)  # 4 query heads, 2 key-value heads
    rw.adapt(model, "dsee", r=2, nnz=4, structure="heads")
    _plant(model, [[0.1, 0.2, 3.0, 2.0], [0.1, 3.0, 0.2, 2.0]], kv_updates=False)
    assert dsee_prune(model, 0.5) == 4
    rw.merge_and_unload(model)
    # block 0 pruned a whole group {0, 1}: its key-value head 0 goes too; block 1 pruned {0, 2}: none
    assert _zero_heads(model, "model.layers.0.", 4, 8, "q") == {0, 1}
    assert _zero_heads(model, "model.layers.0.", 4, 8, "k") == {0}
    assert _zero_heads(model, "model.layers.0.", 4, 8, "v") == {0}
    assert _zero_heads(model, "model.layers.1.", 4, 8, "o") == {0, 2}
    assert _zero_heads(model, "model.layers.1.", 4, 8, "k") == set()


def test_dsee_heads_finetune_save_load_and_compress(tmp_path):
    model = _mha_llama(0)
    rw.adapt(model, "dsee", r=2, nnz=4, structure="heads")
    dsee_finetune(model, lm_batches(2), steps=2, sparsity=0.25, prune_at=0.5, lr=1e-2)
    for block in attention_blocks(model):
        assert int((~block.q.keep_mask.all(1)).view(4, 8).all(1).sum()) == 1  # round(0.25·4) heads
    batch = lm_batches(1, seed=5)[0]
    expected = model(**batch).logits
    rw.save_adapter(model, tmp_path / "dsee_heads")
    fresh = rw.load_adapter(_mha_llama(0), tmp_path / "dsee_heads")
    torch.testing.assert_close(fresh(**batch).logits, expected, atol=1e-5, rtol=1e-5)
    # through rw.compress (the option passes through as a DSEEConfig field); BERT-style blocks
    bert = rw.compress(make_tiny_bert(0), "dsee", ratio=0.5, data=cls_batches(1), steps=1, r=2, nnz=4,
                       structure="heads")
    for i in range(2):
        q = bert.bert.encoder.layer[i].attention.self.query.weight
        assert sum(bool(torch.all(q[h * 8 : (h + 1) * 8] == 0)) for h in range(4)) == 2


def test_dsee_structure_bad_values():
    with pytest.raises(ValueError, match="structure='rows' is not allowed"):
        DSEEConfig(structure="rows")
    with pytest.raises(ValueError, match="head_score='grad' is not allowed"):
        DSEEConfig(head_score="grad")
    model = _mha_llama(0)
    rw.adapt(model, "dsee", targets=["q_proj", "v_proj"], r=2, nnz=4, structure="heads")
    with pytest.raises(ValueError, match="k_proj' has none"):
        dsee_prune(model, 0.5)
