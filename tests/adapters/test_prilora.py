"""PRILoRA: ranks rise linearly with depth, the input statistics are an EMA of per-feature input norms,
each pruning step removes the lowest |A_ij|·x̄_j live entries of every row of A up to the scheduled
fraction, pruned entries stay exactly zero, and the adapter exports to PEFT with per-layer ranks."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import rankwise as rw
from rankwise.adapters.prilora import PRILoRAController, prune_rows, rank_pattern
from rankwise.train import TrainConfig, train

from ..conftest import VOCAB, lm_batches, make_tiny_bert, make_tiny_llama
from .peft_pairs import check_exports

OPTS = {"r_start": 2, "r_end": 6, "prune_interval": 2, "sparsity": 0.6, "beta": 0.8}


def _llama(layers: int = 4, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def test_ranks_rise_linearly_with_depth():
    model = rw.adapt(_llama(4), "prilora", **OPTS)
    ranks = rank_pattern(model)
    for name, r in ranks.items():
        layer = int(name.split(".")[2])
        assert r == round(2 + layer * (6 - 2) / 3)  # 2, 3, 5, 6
    assert sorted(set(ranks.values())) == [2, 3, 5, 6]
    bert = rw.adapt(make_tiny_bert(0), "prilora", r_start=3, r_end=5)
    got = rank_pattern(bert)
    assert got["bert.encoder.layer.0.attention.self.query"] == 3 and got["bert.encoder.layer.1.output.dense"] == 5
    assert got["bert.pooler.dense"] == 5  # after the layer list: r_end


def test_pruning_removes_the_lowest_weight_times_input_norm_and_pruned_entries_stay_zero():
    model = rw.adapt(make_tiny_llama(0), "prilora", targets=["q_proj", "down_proj"], **OPTS)
    layers = [m for _, m in rw.adapter_layers(model)]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05, weight_decay=0.1)
    steps = 6
    ctl = PRILoRAController(model, total_steps=steps)
    ema = [torch.zeros(m.in_features) for m in layers]
    seen: list[torch.Tensor | None] = [None] * len(layers)
    hooks = [m.register_forward_pre_hook(lambda mod, args, i=i: seen.__setitem__(i, args[0].detach()))
             for i, m in enumerate(layers)]
    model.train()
    pruned_before = [torch.zeros_like(m.mask, dtype=torch.bool) for m in layers]
    for t, batch in enumerate(lm_batches(3) * 2, start=1):
        model(**batch).loss.backward()
        for i, x in enumerate(seen):  # the test's own EMA of per-feature L2 norms over the tokens
            ema[i] = 0.8 * ema[i] + 0.2 * x.reshape(-1, x.shape[-1]).norm(dim=0)
        opt.step()
        scores = [m.lora_A.detach().abs() * ema[i] for i, m in enumerate(layers)]
        ctl.step()
        opt.zero_grad()
        for i, m in enumerate(layers):
            torch.testing.assert_close(m.input_norm, ema[i], rtol=1e-5, atol=1e-6)
            pruned = m.mask == 0
            assert bool((m.lora_A[pruned] == 0).all())  # stored A is zero where pruned, after every step
            assert bool(pruned_before[i][pruned_before[i]].eq(pruned[pruned_before[i]]).all())  # never revived
            if t % 2 == 0 or t == steps:
                k = math.floor(0.6 * t / steps * m.in_features)
                assert bool((pruned.sum(dim=1) == k).all())
                for row in range(m.mask.shape[0]):  # newly pruned = the lowest scores among the live entries
                    new = pruned[row] & ~pruned_before[i][row]
                    live_kept = ~pruned[row]
                    if new.any() and live_kept.any():
                        assert scores[i][row][new].max() <= scores[i][row][live_kept].min()
            pruned_before[i] = pruned.clone()
    for h in hooks:
        h.remove()
    assert all(bool((m.mask == 0).any()) for m in layers)
    torch.testing.assert_close(prune_rows(torch.tensor([[3.0, 1.0, 2.0, 5.0]]), torch.tensor([[1.0, 1, 0, 1]]), 2),
                               torch.tensor([[1.0, 0, 0, 1]]))


def test_the_trained_adapter_exports_to_peft_with_rank_pattern(tmp_path):
    model = rw.adapt(make_tiny_llama(0), "prilora", **OPTS)
    train(model, lm_batches(3), config=TrainConfig(max_steps=6, progress=False, lr=1e-2))
    batch = lm_batches(1, seed=5)[0]
    with torch.no_grad():
        logits = model.eval()(**batch).logits
        assert not torch.allclose(logits, make_tiny_llama(0)(**batch).logits, atol=1e-4)
    check_exports(model, lambda: make_tiny_llama(0), batch, tmp_path, rank_pattern(model))
    assert rank_pattern(rw.load_adapter(make_tiny_llama(0), tmp_path / "rankwise")) == rank_pattern(model)


def test_bad_options_and_a_run_without_pruning_are_errors():
    for bad in ({"sparsity": 1.0}, {"prune_interval": 0}, {"r_start": 0}, {"beta": 1.0}, {"init": "pissa"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            rw.adapt(make_tiny_llama(0), "prilora", **bad)
    model = rw.adapt(make_tiny_llama(0), "prilora", prune_interval=100)

    class Stop:
        def on_step_end(self, state):
            state.should_stop = True

    with pytest.raises(RuntimeError, match="prune_interval=100"):
        train(model, lm_batches(2), config=TrainConfig(max_steps=4, progress=False), callbacks=[Stop()])
