"""DyLoRA: the sampled-rank forward is the truncated (α/b)·B[:, :b]·A[:b], a step trains only the
first b components (only the b-th when frozen), and after training the adapter truncated to any rank
b is that per-rank model, also exported to PEFT at rank b."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from peft import PeftModel

import rankwise as rw
from rankwise.adapters.dylora import DyLoRAController
from rankwise.callbacks import Callback
from rankwise.checkpoint import checkpoints
from rankwise.hf_trainer import RankwiseTrainer
from rankwise.train import TrainConfig, train

from ..conftest import VOCAB, lm_batches, make_tiny_bert, make_tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _dylora(**kw):
    return rw.adapt(make_tiny_llama(0), "dylora", targets=TARGETS, **{"r": 6, "alpha": 12.0, **kw})


def _layers(model):
    return [m for _, m in rw.adapter_layers(model)]


def test_the_sampled_rank_forward_is_the_truncated_formula():
    model = _dylora()
    layer = _layers(model)[0]
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 5, layer.in_features)
    w, bias = layer.base_layer.weight, layer.base_layer.bias
    layer.train()
    for b in (1, 3, 6):
        layer.sampled = b
        expected = x @ w.T + (12.0 / b) * (x @ layer.lora_A[:b].T) @ layer.lora_B[:, :b].T
        if bias is not None:
            expected = expected + bias
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    layer.eval()  # outside training: the full rank
    torch.testing.assert_close(layer(x), x @ w.T + 2.0 * (x @ layer.lora_A.T) @ layer.lora_B.T, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("frozen", [False, True])
def test_a_step_trains_only_its_rank(frozen):
    model = _dylora(frozen=frozen)
    with torch.no_grad():
        for m in _layers(model):
            m.lora_B.normal_(0, 0.1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    ctl = DyLoRAController(model)
    batches = lm_batches(3)
    model.train()
    seen = set()
    for i in range(8):
        b = ctl.b
        seen.add(b)
        model(**batches[i % 3]).loss.backward()
        lo = b - 1 if frozen else 0
        before = [(m.lora_A.detach().clone(), m.lora_B.detach().clone()) for m in _layers(model)]
        for m in _layers(model):
            assert not m.lora_A.grad[b:].any() and not m.lora_B.grad[:, b:].any()
            assert m.lora_A.grad[lo:b].abs().min() > 0
            assert not m.lora_A.grad[:lo].any() and not m.lora_B.grad[:, :lo].any()
        ctl.keep_untrained()
        opt.step()  # momentum and weight decay would move every row
        ctl.step()
        opt.zero_grad()
        for m, (a, bb) in zip(_layers(model), before, strict=True):
            assert torch.equal(m.lora_A[b:], a[b:]) and torch.equal(m.lora_B[:, b:], bb[:, b:])
            assert torch.equal(m.lora_A[:lo], a[:lo])
            assert not torch.equal(m.lora_A[lo:b], a[lo:b])
    assert len(seen) > 2 and seen <= set(range(1, 7))


def test_truncating_the_trained_adapter_gives_each_per_rank_model(tmp_path):
    model = _dylora(r_min=2)
    res = train(model, lm_batches(3), config=TrainConfig(max_steps=8, progress=False, lr=1e-2))
    ranks = [h["dylora_rank"] for h in res.history]
    assert len(set(ranks)) > 1 and min(ranks) >= 2
    batch = lm_batches(1, seed=5)[0]
    for b in (2, 4, 6):
        per_rank = copy.deepcopy(model).train()  # the model the steps with rank b trained (no dropout)
        for m in _layers(per_rank):
            m.sampled = b
        with torch.no_grad():
            expected = per_rank(**batch).logits
        cut = rw.truncate_rank(copy.deepcopy(model), b).eval()
        for m, full in zip(_layers(cut), _layers(model), strict=True):
            assert torch.equal(m.lora_A, full.lora_A[:b]) and torch.equal(m.lora_B, full.lora_B[:, :b])
            assert m.scale == 12.0 / b
        with torch.no_grad():
            torch.testing.assert_close(cut(**batch).logits, expected, atol=1e-5, rtol=1e-5)
        rw.export_peft(cut, tmp_path / f"peft{b}")
        loaded = PeftModel.from_pretrained(make_tiny_llama(0), tmp_path / f"peft{b}").eval()
        assert loaded.peft_config["default"].r == b and loaded.peft_config["default"].lora_alpha == 12
        rw.save_adapter(cut, tmp_path / f"rw{b}")
        again = rw.load_adapter(make_tiny_llama(0), tmp_path / f"rw{b}").eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(**batch).logits, expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(again(**batch).logits, expected, atol=1e-6, rtol=1e-6)


def test_resume_keeps_the_rank_sequence(tmp_path):
    batches, steps = lm_batches(3), 8
    full = _dylora()
    ranks = [h["dylora_rank"] for h in train(full, batches, config=TrainConfig(max_steps=steps, progress=False,
                                                                                 lr=1e-2)).history]
    part, resumed = _dylora(), _dylora()
    cfg = TrainConfig(max_steps=steps, progress=False, lr=1e-2, checkpoint_every=3, output_dir=str(tmp_path))

    class Stop(Callback):
        def on_step_end(self, state):
            state.should_stop = state.step == 3

    train(part, batches, config=cfg, callbacks=[Stop()])
    assert checkpoints(tmp_path)
    res = train(resumed, batches, config=cfg, resume_from=str(tmp_path))
    assert [h["dylora_rank"] for h in res.history] == ranks
    for a, b in zip(_layers(full), _layers(resumed), strict=True):
        torch.testing.assert_close(a.lora_A, b.lora_A, atol=0, rtol=0)
        torch.testing.assert_close(a.lora_B, b.lora_B, atol=0, rtol=0)


def test_bad_options_name_the_parameter():
    with pytest.raises(ValueError, match="r_min"):
        _dylora(r_min=7)
    with pytest.raises(ValueError, match="frozen"):
        _dylora(frozen="yes")
    with pytest.raises(ValueError, match="b=9"):
        rw.truncate_rank(_dylora(), 9)
    with pytest.raises(ValueError, match="no DyLoRA adapter"):
        rw.truncate_rank(rw.adapt(make_tiny_llama(0), "lora", r=2), 1)


def test_rankwise_trainer_samples_the_rank(tmp_path):
    model = rw.adapt(make_tiny_bert(0), "dylora", r=4, frozen=True)
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(1, VOCAB, (10,), generator=g), "labels": i % 3} for i in range(24)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
        use_cpu=True, disable_tqdm=True, save_strategy="no", logging_steps=1)
    before = [m.lora_B.detach().clone() for m in _layers(model)]  # B moves from its first step (A needs B ≠ 0)
    ctl = DyLoRAController(model)  # passed in: it replaces the automatic one
    RankwiseTrainer(model=model, args=args, train_dataset=data, loop_callbacks=[ctl]).train()
    trained = {b - 1 for b in ctl.history}  # frozen: only the b-th column of B moved in each step
    assert len(ctl.history) == 4 and len(trained) < 4
    for m, b0 in zip(_layers(model), before, strict=True):
        moved = {i for i in range(4) if not torch.equal(m.lora_B[:, i], b0[:, i])}
        assert moved == trained and m.sampled is None
