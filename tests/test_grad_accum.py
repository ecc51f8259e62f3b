"""Gradient accumulation in rankwise.train: k batches per optimizer step, their mean gradient."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DataLoader
from transformers import BertConfig, BertForSequenceClassification

import rankwise as rw
from rankwise.train import TrainConfig, train

from .test_train import Crash, CrashAt, assert_bit_identical, cls_examples, cls_loader, collate, snapshot


def still_bert(seed: int = 0) -> BertForSequenceClassification:
    """Tiny BERT in float64 without dropout: k small batches and one large one see the same function."""
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     max_position_embeddings=64)
    torch.manual_seed(seed)
    return BertForSequenceClassification(cfg).double()


def fixed_loader(n: int, batch: int) -> DataLoader:
    return DataLoader(cls_examples(n), batch_size=batch, shuffle=False, collate_fn=collate)


def run(model, loader, **cfg) -> object:
    base = {"lr": 1e-2, "schedule": "constant", "max_grad_norm": None, "progress": False, "measure_memory": False}
    return train(model, loader, config=TrainConfig(**{**base, **cfg}))


@pytest.mark.parametrize("k", [2, 4])
def test_k_batches_step_as_one_batch_k_times_larger(k):
    """AdamW with clipping at a norm the gradient exceeds (so the gradient's scale matters, not only its
    direction): 3 steps of k accumulated batches of 8/k rows == 3 steps of one batch of 8 rows."""
    large, small = still_bert(), still_bert()
    ref = run(large, fixed_loader(24, 8), max_steps=3, max_grad_norm=0.05)
    res = run(small, fixed_loader(24, 8 // k), max_steps=3, max_grad_norm=0.05, grad_accum=k)
    assert res.steps == 3
    for (name, a), b in zip(large.named_parameters(), small.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-10, msg=name)
    # the recorded loss of a step is the mean of its batches' losses: the large batch's loss
    assert [h["loss"] for h in res.history] == pytest.approx([h["loss"] for h in ref.history], rel=1e-12)
    # and the steps moved the weights (the comparison is not between two untouched models)
    assert not torch.equal(large.classifier.weight, still_bert().classifier.weight)


def test_the_last_step_of_an_epoch_takes_the_batches_left():
    """5 batches, k = 2, one epoch: 3 steps, of 2, 2 and 1 batches, each the mean of its batches' gradients
    (plain SGD, so an error of scale shows in the weights): as a hand-written loop."""
    model, reference = still_bert(), still_bert()
    res = train(model, fixed_loader(20, 4), optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
                config=TrainConfig(epochs=1, grad_accum=2, schedule="constant", max_grad_norm=None, progress=False,
                                   measure_memory=False))
    assert res.steps == 3 and len(res.history) == 3

    sgd = torch.optim.SGD(reference.parameters(), lr=0.5)
    batches = list(fixed_loader(20, 4))
    for group in (batches[0:2], batches[2:4], batches[4:5]):
        for batch in group:
            (reference(**batch).loss / len(group)).backward()
        sgd.step()
        sgd.zero_grad()
    for (name, a), b in zip(reference.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-10, msg=name)


def test_resume_with_accumulation_is_bit_identical(tmp_path):
    """k = 2 over an epoch of 4 batches (dropout on, shuffled): 5 steps straight == stopped after step 3
    (checkpoint at 2) and resumed; a resume with another k is refused naming grad_accum, and a checkpoint
    written before grad_accum existed resumes as k = 1."""
    cfg = {"lr": 1e-2, "max_steps": 5, "progress": False, "seed": 3, "grad_accum": 2}
    straight = rw.adapt(still_bert().float(), "lora", r=4, dropout=0.2)
    ref = train(straight, cls_loader(), config=TrainConfig(**cfg))

    out = tmp_path / "run"
    ccfg = TrainConfig(**cfg, checkpoint_every=2, output_dir=str(out))
    with pytest.raises(Crash):
        train(rw.adapt(still_bert().float(), "lora", r=4, dropout=0.2), cls_loader(), config=ccfg,
              callbacks=[CrashAt(3)])
    resumed = rw.adapt(still_bert().float(), "lora", r=4, dropout=0.2)
    with pytest.raises(ValueError, match="grad_accum: 2 -> 4"):
        train(resumed, cls_loader(), config=TrainConfig(**{**cfg, "grad_accum": 4}, checkpoint_every=2,
                                                         output_dir=str(out)), resume_from=out)
    res = train(resumed, cls_loader(), config=ccfg, resume_from=out)
    assert_bit_identical(snapshot(straight), snapshot(resumed))
    assert [h["loss"] for h in res.history] == [h["loss"] for h in ref.history]

    # a checkpoint of a run from before grad_accum (its config lacks the key) resumes at the default k = 1
    old = tmp_path / "old"
    one = {**cfg, "grad_accum": 1, "max_steps": 2}
    train(still_bert().float(), cls_loader(), config=TrainConfig(**one, checkpoint_every=2, output_dir=str(old)))
    info = old / "checkpoints" / "checkpoint-2" / "trainer_state.json"
    record = json.loads(info.read_text())
    del record["config"]["grad_accum"]
    info.write_text(json.dumps(record))
    train(still_bert().float(), cls_loader(), config=TrainConfig(**{**one, "max_steps": 3}, checkpoint_every=2,
                                                                 output_dir=str(old)), resume_from=old)


def test_a_layerwise_optimizer_is_refused_with_accumulation():
    model = still_bert()
    optimizer = rw.optim.layerwise(model, lambda groups: torch.optim.AdamW(groups, lr=1e-3))
    with pytest.raises(ValueError, match="grad_accum=2.*LayerwiseOptimizer"):
        train(model, fixed_loader(8, 4), optimizer=optimizer, config=TrainConfig(
            max_steps=2, grad_accum=2, progress=False, device=None, seed=None))
    with pytest.raises(ValueError, match="grad_accum"):
        TrainConfig(grad_accum=0)


def test_padded_lm_batches_weigh_by_their_predicted_tokens():
    """Causal LM batches with different numbers of ignored (-100) labels: the accumulated step averages over
    every predicted token of the step, as one batch of all the rows does (Hugging Face's token-mean loss), not
    over the batches' means (plain SGD, float64 tiny Llama: the scale shows in the weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def llama() -> LlamaForCausalLM:
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=4, num_key_value_heads=2)).double()

    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 50, (4, 12), generator=g)
    labels = ids.clone()
    labels[0, 3:] = -100  # batch 1: 2 + 11 predicted tokens; batch 2: 11 + 11
    batches = [{"input_ids": ids[:2], "labels": labels[:2]}, {"input_ids": ids[2:], "labels": labels[2:]}]
    whole = {"input_ids": ids, "labels": labels}
    accumulated, reference = llama(), llama()
    plain_cfg = {"max_steps": 1, "schedule": "constant", "max_grad_norm": None, "progress": False,
                 "measure_memory": False, "seed": None, "device": None}
    train(accumulated, batches, optimizer=torch.optim.SGD(accumulated.parameters(), lr=1.0),
          config=TrainConfig(**plain_cfg, grad_accum=2))
    train(reference, [whole], optimizer=torch.optim.SGD(reference.parameters(), lr=1.0),
          config=TrainConfig(**plain_cfg))
    for (name, a), b in zip(reference.named_parameters(), accumulated.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-10, msg=name)
