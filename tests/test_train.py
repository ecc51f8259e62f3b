"""Tests for rankwise.train: exact resume, measurements, schedules, evaluation, callbacks."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

import rankwise as rw
from rankwise import catalogue
from rankwise.train import (
    TrainConfig,
    build_optimizer,
    evaluate,
    find_checkpoint,
    lr_factor,
    optimizer_state_bytes,
    train,
)

VOCAB, SEQ = 50, 12



def dropout_bert(seed: int = 0) -> BertForSequenceClassification:
    """Tiny BERT with dropout on, so the RNG state matters for the training trajectory."""
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, num_labels=3, hidden_dropout_prob=0.1,
                     attention_probs_dropout_prob=0.1, max_position_embeddings=64)
    torch.manual_seed(seed)
    return BertForSequenceClassification(cfg)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def cls_examples(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Learnable toy task: the label is the first token mod 3."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, SEQ), generator=g)
    return [{"input_ids": ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long),
             "labels": ids[i, 0] % 3} for i in range(n)]


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def cls_loader(n: int = 16, batch: int = 4, seed: int = 0, generator: bool = True, shuffle: bool = True):
    gen = torch.Generator().manual_seed(seed) if generator else None
    return DataLoader(cls_examples(n, seed), batch_size=batch, shuffle=shuffle, generator=gen, collate_fn=collate)


class Crash(Exception):
    pass


class CrashAt:
    """Simulates a crash right after optimizer step ``step`` (before that step's checkpoint)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, state) -> None:
        if state.step == self.step:
            raise Crash


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        assert torch.equal(v, b[k]), f"{k} differs"


def make(method: str, seed: int = 0) -> torch.nn.Module:
    model = dropout_bert(seed)
    if method == "lora":
        rw.adapt(model, "lora", r=4, dropout=0.2)
    return model


@pytest.mark.parametrize("method,generator", [("full", True), ("lora", False)])
def test_resume_is_bit_identical(tmp_path, method, generator):
    """11 steps straight == 5 steps, crash at 7, resume from the step-5 checkpoint, 6 more steps.

    4 batches per epoch: the checkpoint at step 5 is mid-way through the second epoch (so the
    sampler's epoch-start state differs from its seed) and the resumed run crosses another epoch
    boundary; dropout is on (model and adapter), so every RNG state must be restored.
    """
    cfg = {"lr": 1e-2, "max_steps": 11, "warmup_steps": 2, "schedule": "cosine", "progress": False, "seed": 3}
    straight = make(method)
    ref = train(straight, cls_loader(generator=generator), config=TrainConfig(**cfg))

    out = tmp_path / "run"
    ccfg = TrainConfig(**cfg, checkpoint_every=5, output_dir=str(out))
    with pytest.raises(Crash):
        train(make(method), cls_loader(generator=generator), config=ccfg, callbacks=[CrashAt(7)])
    assert find_checkpoint(out).name == "checkpoint-5"

    resumed = make(method)
    res = train(resumed, cls_loader(generator=generator), config=ccfg, resume_from=out)
    assert_bit_identical(snapshot(straight), snapshot(resumed))
    assert [h["loss"] for h in res.history] == [h["loss"] for h in ref.history]
    assert res.steps == 11 and len(res.history) == 11

    # the test is sensitive to the RNG: another seed (same data, same init) ends elsewhere
    other = make(method)
    train(other, cls_loader(generator=generator), config=TrainConfig(**{**cfg, "seed": 4}))
    pairs = zip(snapshot(other).values(), snapshot(straight).values(), strict=True)
    assert any(not torch.equal(a, b) for a, b in pairs)


def test_resume_from_finished_run_is_noop(tmp_path):
    cfg = TrainConfig(lr=1e-2, max_steps=4, checkpoint_every=4, output_dir=str(tmp_path), progress=False)
    model = make("full")
    train(model, cls_loader(), config=cfg)
    before = snapshot(model)
    res = train(model, cls_loader(), config=cfg, resume_from=tmp_path)
    assert_bit_identical(before, snapshot(model))
    assert res.steps == 4


def test_checkpoints_are_pruned_and_complete(tmp_path):
    cfg = TrainConfig(lr=1e-2, max_steps=6, checkpoint_every=2, keep_checkpoints=2,
                      output_dir=str(tmp_path), progress=False)
    train(make("lora"), cls_loader(), config=cfg)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["checkpoint-4", "checkpoint-6"]  # no temporary directories left behind
    files = sorted(p.name for p in (tmp_path / "checkpoints" / "checkpoint-6").iterdir())
    assert files == ["trained_tensors.safetensors", "trainer_state.json", "trainer_state.pt"]


def test_resume_with_other_model_fails_clearly(tmp_path):
    cfg = TrainConfig(lr=1e-2, max_steps=2, checkpoint_every=2, output_dir=str(tmp_path), progress=False)
    train(make("lora"), cls_loader(), config=cfg)
    with pytest.raises(ValueError, match="checkpoint does not match"):
        train(make("full"), cls_loader(), config=cfg, resume_from=tmp_path)
    with pytest.raises(FileNotFoundError):
        train(make("full"), cls_loader(), config=cfg, resume_from=tmp_path / "nothing")


def test_optimizer_state_bytes_is_exact():
    model = make("lora")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    assert optimizer_state_bytes(opt) == 0
    model(**next(iter(cls_loader()))).loss.backward()
    opt.step()
    params = [p for p in model.parameters() if p.requires_grad]
    # AdamW: exp_avg and exp_avg_sq like the parameter (fp32) + a float32 scalar step, per parameter
    assert optimizer_state_bytes(opt) == sum(2 * 4 * p.numel() + 4 for p in params)


def test_train_learns_and_reports_measurements():
    model = make("full")
    loader = cls_loader(n=64, batch=8)
    before = evaluate(model, cls_loader(n=64, batch=16, shuffle=False))
    res = train(model, loader, eval_loader=cls_loader(n=64, batch=16, shuffle=False),
                config=TrainConfig(lr=3e-3, epochs=6, eval_every=16, progress=False, warmup_steps=4))
    assert res.steps == 6 * 8
    assert res.metrics["accuracy"] > max(0.6, before["accuracy"] + 0.2)
    assert [e["step"] for e in res.evals] == [16, 32, 48]
    trainable = sum(p.numel() for p in model.parameters())
    assert res.trainable_params == res.total_params == trainable
    assert res.optimizer_state_bytes == sum(8 * p.numel() + 4 for p in model.parameters())
    assert res.peak_memory_kind == "cpu_peak_rss" and res.peak_memory_bytes > 10 * 2**20
    assert res.device == "cpu" and res.wall_time_s >= res.train_time_s > 0
    assert res.history[0]["lr"] == pytest.approx(3e-3 / 4)  # first warmup step


def test_lora_training_touches_only_adapters():
    model = make("lora")
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k and "classifier" not in k}
    res = train(model, cls_loader(), config=TrainConfig(max_steps=3, progress=False))
    now = model.state_dict()
    assert all(torch.equal(v, now[k]) for k, v in frozen.items())
    assert res.trainable_params == rw.summary(model).trainable < res.total_params


def test_the_parameter_counts_are_what_the_run_leaves():
    """A growing adapter (IncreLoRA) ends with more trainable parameters than it starts with: the result
    counts them when training ends, as the saved adapter holds them."""
    from .conftest import cls_batches, make_tiny_bert

    model = rw.adapt(make_tiny_bert(0), "increlora", r=2, target_r=4, init_warmup=2, incre_interval=1, top_h=4)
    start = rw.summary(model).trainable
    res = train(model, cls_batches(n=4), config=TrainConfig(max_steps=20, lr=1e-2, progress=False,
                                                            measure_memory=False))
    assert res.trainable_params == rw.summary(model).trainable > start


def test_evaluate_classification_matches_manual():
    model = make("full")
    loader = cls_loader(n=10, batch=4, shuffle=False)  # uneven last batch: example-weighted mean
    got = evaluate(model, loader)
    model.eval()
    with torch.no_grad():
        batch = collate(cls_examples(10))
        logits = model(**batch).logits
    assert got["examples"] == 10
    assert got["accuracy"] == pytest.approx((logits.argmax(-1) == batch["labels"]).float().mean().item())
    assert got["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, batch["labels"]).item(), rel=1e-5)
    assert model.training is False


def test_evaluate_lm_perplexity_is_token_weighted():
    model = tiny_llama()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (5, SEQ), generator=g)
    items = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r.clone()} for r in ids]
    items[4]["labels"][: SEQ // 2] = -100  # fewer predicted tokens in the last example
    got = evaluate(model, DataLoader(items, batch_size=2, collate_fn=collate))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    labels = torch.stack([it["labels"] for it in items])
    manual = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1),
                                               ignore_index=-100)
    assert got["tokens"] == int((labels[:, 1:] != -100).sum())
    assert got["loss"] == pytest.approx(manual.item(), rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(manual.item()), rel=1e-5)


def test_lm_training_lowers_perplexity():
    model = tiny_llama()
    rows = torch.arange(SEQ).repeat(8, 1) % 7 + 3  # a periodic sequence: easy to learn
    items = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r.clone()} for r in rows]
    loader = DataLoader(items, batch_size=4, collate_fn=collate)
    before = evaluate(model, loader)["perplexity"]
    res = train(model, loader, loader, TrainConfig(lr=1e-2, max_steps=20, progress=False))
    assert res.metrics["perplexity"] < before / 4


def test_lr_schedules():
    assert [lr_factor(s, 10, 2, "constant") for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    assert lr_factor(2, 10, 2, "linear") == 1.0 and lr_factor(10, 10, 2, "linear") == 0.0
    assert lr_factor(6, 10, 2, "linear") == pytest.approx(0.5)
    assert lr_factor(6, 10, 2, "cosine") == pytest.approx(0.5)
    assert lr_factor(10, 10, 2, "cosine") == pytest.approx(0.0)


def test_callbacks_run_after_step_and_can_stop():
    seen = []

    class Watch:
        def on_train_begin(self, state):
            self.start = snapshot(state.model)

        def on_step_end(self, state):
            # called after optimizer.step: the weights have already moved
            moved = any(not torch.equal(v, state.model.state_dict()[k]) for k, v in self.start.items())
            seen.append((state.step, moved))
            state.should_stop = state.step == 3

    res = train(make("full"), cls_loader(), config=TrainConfig(max_steps=10, progress=False), callbacks=[Watch()])
    assert res.steps == 3 and seen == [(1, True), (2, True), (3, True)]


def test_optimizer_factory_is_extensible(monkeypatch):
    """An optimizer registered in the catalogue is one the loop can build by name."""
    monkeypatch.setattr(catalogue, "_RECORDS", {**catalogue._RECORDS})  # the registration ends with the test
    catalogue.register(catalogue.MethodRecord(
        "sgd-test", "optimizer", "test", "plain SGD", api="optim", config=torch.optim.SGD,
        builder=lambda model, **kw: rw.optim.make("sgd-test", model, **kw)))
    opt = build_optimizer(make("full"), TrainConfig(optimizer="sgd-test", weight_decay=0.1))
    assert isinstance(opt, torch.optim.SGD)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]  # matrices decay, vectors do not


@pytest.mark.parametrize("kwargs,field", [
    ({"schedule": "step"}, "schedule"), ({"optimizer": "lion"}, "optimizer"), ({"lr": 0}, "lr"),
    ({"max_steps": 0}, "max_steps"), ({"checkpoint_every": 5}, "output_dir"), ({"device": "tpu"}, "device"),
    ({"task": "qa"}, "task"), ({"max_grad_norm": -1.0}, "max_grad_norm"), ({"lr": float("inf")}, "lr"),
    ({"weight_decay": float("nan")}, "weight_decay"), ({"max_grad_norm": 0.0}, "max_grad_norm"),
])
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**kwargs)


def test_no_trainable_parameters_is_an_error():
    model = make("full")
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(model, cls_loader(), config=TrainConfig(max_steps=1, progress=False))


def test_iterable_without_len_needs_max_steps_and_batches():
    batches = [collate(cls_examples(4))] * 3
    res = train(make("full"), batches, config=TrainConfig(max_steps=5, progress=False))
    assert res.steps == 5 and res.metrics["train_loss"] > 0
    with pytest.raises(ValueError, match="empty"):
        train(make("full"), [], config=TrainConfig(max_steps=2, progress=False))

    class Nothing:  # iterable without len() that yields nothing: an error, not an endless loop
        def __iter__(self):
            return iter(())

    with pytest.raises(ValueError, match="no batches"):
        train(make("full"), Nothing(), config=TrainConfig(max_steps=2, progress=False))
    with pytest.raises(ValueError, match="max_steps"):
        train(make("full"), Nothing(), config=TrainConfig(progress=False))


@pytest.mark.parametrize("optimizer", ["adamw", "galore"])
def test_skip_nonfinite_skips_a_poisoned_step_and_counts_it(optimizer):
    """One batch whose loss is NaN: with skip_nonfinite the step is skipped (weights stay finite, the
    history counts it); without it the weights are NaN for good."""
    def loss_fn(model, batch):
        loss = model(**batch).loss
        return loss * float("nan") if calls.append(1) or len(calls) == 2 else loss

    for skip in (True, False):
        calls: list[int] = []
        model = make("full")
        cfg = TrainConfig(max_steps=4, optimizer=optimizer, skip_nonfinite=skip, max_grad_norm=None, progress=False,
                          **({"optimizer_kwargs": {"rank": 4}} if optimizer == "galore" else {}))
        res = train(model, cls_loader(), config=cfg, loss_fn=loss_fn)
        finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
        assert finite == skip
        if skip:
            assert [h["skipped_steps"] for h in res.history] == [0, 1, 1, 1]
        else:
            assert "skipped_steps" not in res.history[0]
