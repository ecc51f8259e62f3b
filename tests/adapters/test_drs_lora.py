"""DRS-LoRA (CoDyRA): the importance weights are soft-thresholded by the rising κ after each optimizer step,
each task keeps its own per-module ranks (the weights that survive), and ``next_task`` merges the task
into the frozen weight: the outputs do not move, the model unloads to plain layers with equal outputs,
and the whole task sequence exports to PEFT (per-layer ranks) and reloads."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import rankwise as rw
from rankwise.adapters.drs_lora import DRSLoRAConfig, DRSLoRAController, kappa_schedule, next_task, rank_pattern
from rankwise.adapters.drs_lora import task_ranks as merged_ranks
from rankwise.adapters.sora import soft_threshold
from rankwise.train import TrainConfig, train

from ..conftest import lm_batches, make_tiny_bert, make_tiny_llama
from .peft_pairs import check_exports, train_with_trainer

OPTS = {"r": 4, "alpha": 8.0, "max_kappa": 0.3, "kappa_steps": 3, "dense_fraction": 0.25}


def _drs(**kw):
    return rw.adapt(make_tiny_llama(0), "drs_lora", **{**OPTS, **kw})


def _run(model, steps=8, seed=0):
    cfg = TrainConfig(max_steps=steps, progress=False, lr=0.05, schedule="constant")
    return train(model, lm_batches(4, seed=seed), config=cfg)


def test_the_threshold_schedule_is_dense_then_a_staircase_to_max_kappa():
    cfg = DRSLoRAConfig(r=4, max_kappa=0.3, kappa_steps=3, dense_fraction=0.25)
    # T = 8: D = 2 dense steps, then 3 stages of max(1, 6 // 3) = 2 steps
    got = [kappa_schedule(t, 8, cfg) for t in range(1, 9)]
    assert got == pytest.approx([0, 0, 0.1, 0.1, 0.2, 0.2, 0.3, 0.3])
    with pytest.raises(ValueError, match="dense_fraction"):
        rw.adapt(make_tiny_llama(0), "drs_lora", dense_fraction=1.0)


def test_each_step_soft_thresholds_the_importance_weights_after_the_optimizer():
    model = _drs()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    ctl = DRSLoRAController(model, optimizer=opt, total_steps=8)
    layers = [m for _, m in rw.adapter_layers(model)]
    model.train()
    for t, batch in enumerate(lm_batches(4) * 2, start=1):
        model(**batch).loss.backward()
        opt.step()
        stepped = [m.gate.detach().clone() for m in layers]
        kappa = ctl.step()
        opt.zero_grad()
        assert kappa == kappa_schedule(t, 8, ctl.config)
        for m, g in zip(layers, stepped, strict=True):  # the test's own S_κ(g) = sign(g)·max(|g| − κ, 0)
            assert torch.equal(m.gate.detach(), torch.sign(g) * torch.clamp(g.abs() - kappa, min=0))
    torch.testing.assert_close(soft_threshold(torch.tensor([-0.5, 0.05, 0.4]), 0.1), torch.tensor([-0.4, 0.0, 0.3]))


def test_two_tasks_select_different_ranks_and_each_merge_keeps_the_outputs(tmp_path):
    model = _drs()
    w0 = {n: m.base_weight.detach().clone() for n, m in rw.adapter_layers(model)}
    batch = lm_batches(1, seed=9)[0]
    res = _run(model, seed=0)
    first = rank_pattern(model)
    # the run ended by removing the zero-weight ranks: every layer holds exactly its selected ranks
    for n, m in rw.adapter_layers(model):
        assert m.gate.numel() == max(first[n], 1) and (first[n] == 0 or bool((m.gate != 0).all()))
    assert res.history[-1]["drs_lora_rank"] == sum(first.values()) < 4 * 14
    assert len(set(first.values())) > 1  # ranks differ across modules
    deltas = {n: m.delta_weight().detach().clone() for n, m in rw.adapter_layers(model)}
    with torch.no_grad():
        before = model.eval()(**batch).logits
    assert next_task(model) == first
    for n, m in rw.adapter_layers(model):  # the task is in the frozen weight; a fresh rank-4 adapter starts
        torch.testing.assert_close(m.base_weight, w0[n] + deltas[n], atol=1e-6, rtol=0)
        assert m.gate.numel() == 4 and bool((m.lora_B == 0).all())
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, before, atol=1e-6, rtol=0)
    _run(model, seed=3)
    second = rank_pattern(model)
    assert second != first and len(set(second.values())) > 1  # ranks differ across tasks too
    assert merged_ranks(model) == {n: [k] for n, k in first.items()}
    # the task sequence relative to W0: PEFT (per-layer ranks = both tasks' ranks) and the rankwise format
    both = {n: r + max(second[n], 1) for n, r in first.items()}
    check_exports(model, lambda: make_tiny_llama(0), batch, tmp_path, both)
    assert merged_ranks(rw.load_adapter(make_tiny_llama(0), tmp_path / "rankwise")) == merged_ranks(model)
    with torch.no_grad():
        logits = model(**batch).logits
    # deployed: no extra modules, the same outputs; unload still gives the untouched W0
    original = copy.deepcopy(model)
    plain = rw.merge_and_unload(model)
    assert not rw.adapter_layers(plain)
    assert all(type(m) is torch.nn.Linear for n, m in plain.named_modules() if n.endswith("_proj"))
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, logits, atol=1e-5, rtol=0)
    base = rw.unload(original)
    for n, w in w0.items():
        torch.testing.assert_close(base.get_submodule(n).weight, w, atol=1e-6, rtol=0)


def test_bad_options_name_the_parameter():
    for bad in ({"max_kappa": -1.0}, {"kappa_steps": 0}, {"dense_fraction": 1.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            _drs(**bad)
    model = _drs()
    rw.merge(model)
    with pytest.raises(ValueError, match="unmerge"):
        next_task(model)


def test_rankwise_trainer_thresholds_and_prunes(tmp_path):
    model = rw.adapt(make_tiny_bert(0), "drs_lora", r=4, max_kappa=0.5, dense_fraction=0.0, kappa_steps=1)
    train_with_trainer(model, tmp_path, 4, lr_scheduler_type="constant")
    ranks = rank_pattern(model)  # |g| ~ N(0, 1) thresholded by 0.5 at every step: some ranks are gone
    assert sum(ranks.values()) < 4 * len(ranks)
    assert all(m.gate.numel() == max(ranks[n], 1) for n, m in rw.adapter_layers(model))


@pytest.mark.slow
def test_two_real_tasks_on_minilm_bbc_then_drug_reviews():
    """The paper's setting in small: a pretrained encoder learns two text tasks in sequence (BBC topics, then
    drug-review sentiment, one shared 5-way head); each task selects its own ranks per module, and the
    merged model keeps the base architecture with the same outputs."""
    from rankwise.data import classification_loader, load_classification
    from rankwise.models import load_model

    torch.manual_seed(0)
    model, tok = load_model("minilm-l6", task="seq-cls", num_labels=5)
    rw.adapt(model, "drs_lora", targets=["query", "value"], r=8, max_kappa=0.02, kappa_steps=4, dense_fraction=0.3)
    patterns = []
    for name in ("bbc", "drug-reviews"):
        data = classification_loader(load_classification(name, limit=96), tok, batch_size=8, max_length=48)
        train(model, data, config=TrainConfig(max_steps=12, progress=False, lr=5e-3, schedule="constant"))
        patterns.append(rank_pattern(model))
        if name == "bbc":
            next_task(model)
    assert patterns[0] != patterns[1]
    assert all(len(set(p.values())) > 1 for p in patterns)
    batch = next(iter(classification_loader(load_classification("bbc", "test", limit=8), tok, batch_size=8)))
    with torch.no_grad():
        logits = model.eval()(**batch).logits
        plain = rw.merge_and_unload(model)
        assert not rw.adapter_layers(plain)
        torch.testing.assert_close(plain(**batch).logits, logits, atol=1e-4, rtol=0)
    assert math.isfinite(float(logits.sum()))
