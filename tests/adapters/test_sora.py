"""SoRA: the exact proximal step on the gate, pruning of zero gates keeps the outputs, the optimizer
state stays consistent, and the pruned adapter exports to PEFT and reloads."""

from __future__ import annotations

import pytest
import torch
import transformers
from peft import PeftModel

import rankwise as rw
from rankwise.adapters.sora import SoRAController, soft_threshold
from rankwise.hf_trainer import RankwiseTrainer
from rankwise.train import TrainConfig, train

from ..conftest import VOCAB, lm_batches, make_tiny_bert, make_tiny_llama, straight_and_resumed


def _sora(**kw):
    model = make_tiny_llama(0)
    return rw.adapt(model, "sora", r=4, **{"sparse_lambda": 0.5, **kw})


def test_the_proximal_step_is_the_soft_threshold_of_a_gradient_step():
    model = _sora()
    with torch.no_grad():
        for _, layer in rw.adapter_layers(model):
            layer.lora_B.normal_(0, 0.1)
            layer.gate.copy_(torch.tensor([1.0, -0.02, 0.01, 0.3]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    ctl = SoRAController(model, optimizer=opt)
    model(**lm_batches(1)[0]).loss.backward()
    layers = [m for _, m in rw.adapter_layers(model)]
    before = [(m.gate.detach().clone(), m.gate.grad.clone()) for m in layers]
    ctl.proximal_step()
    lr, lam = 0.05, 0.5
    zeroed = 0
    for m, (g, grad) in zip(layers, before, strict=True):
        z = g - lr * grad
        expected = torch.sign(z) * torch.clamp(z.abs() - lr * lam, min=0)  # the test's own soft threshold
        assert torch.equal(m.gate.detach(), expected)
        assert m.gate.grad is None  # the optimizer leaves the gate alone
        zeroed += int((m.gate == 0).sum())
    assert zeroed > 0
    torch.testing.assert_close(soft_threshold(torch.tensor([-1.0, 0.1, 2.0]), 0.5), torch.tensor([-0.5, 0.0, 1.5]))


def test_training_zeroes_gates_and_pruning_removes_them_with_equal_logits(tmp_path):
    model = _sora(sparse_lambda=2.0)
    with torch.no_grad():  # gates spread over (0, 1): the ones below ~0.6 reach 0 in 6 steps of lr·λ = 0.1
        for _, layer in rw.adapter_layers(model):
            layer.gate.copy_(torch.tensor([0.15, 0.35, 0.9, 1.0]))
    batch = lm_batches(1, seed=7)[0]
    seen = {}

    class Probe:
        def on_step_end(self, state):
            if state.step == state.total_steps:
                state.model.eval()
                with torch.no_grad():
                    seen["logits"] = state.model(**batch).logits.clone()
                seen["ranks"] = [int((m.gate != 0).sum()) for _, m in rw.adapter_layers(state.model)]
                seen["params"] = [m.lora_A for _, m in rw.adapter_layers(state.model)]
                seen["opt"] = state.optimizer
                state.model.train()

    cfg = TrainConfig(max_steps=6, progress=False, lr=0.05, schedule="constant")
    res = train(model, lm_batches(3), config=cfg, callbacks=[Probe()])
    assert res.history[-1]["sora_nonzero_gates"] < 4 * 14
    ranks = [m.gate.numel() for _, m in rw.adapter_layers(model)]
    assert ranks == [max(r, 1) for r in seen["ranks"]] and sum(ranks) < 4 * 14
    assert all(p is q for p, q in zip(seen["params"], [m.lora_A for _, m in rw.adapter_layers(model)], strict=True))
    for _, m in rw.adapter_layers(model):  # shrunk parameters have no stale moments
        for p in (m.lora_A, m.lora_B, m.gate):
            st = seen["opt"].state.get(p, {})
            assert not st or st["exp_avg"].shape == p.shape
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**batch).logits, seen["logits"], atol=1e-6, rtol=1e-6)
    # the pruned adapter: PEFT export with per-layer ranks, and the rankwise format round trip
    rw.export_peft(model, tmp_path / "peft")
    loaded = PeftModel.from_pretrained(make_tiny_llama(0), tmp_path / "peft").eval()
    rw.save_adapter(model, tmp_path / "rw")
    again = rw.load_adapter(make_tiny_llama(0), tmp_path / "rw").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, seen["logits"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(again(**batch).logits, seen["logits"], atol=1e-6, rtol=1e-6)


def test_bad_options_name_the_parameter():
    with pytest.raises(ValueError, match="sparse_lambda"):
        _sora(sparse_lambda=-1.0)


def test_rankwise_trainer_runs_the_proximal_step_and_prunes(tmp_path):
    model = rw.adapt(make_tiny_bert(0), "sora", r=4, sparse_lambda=20.0)
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(1, VOCAB, (10,), generator=g), "labels": i % 3} for i in range(24)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
        use_cpu=True, disable_tqdm=True, save_strategy="no", lr_scheduler_type="constant")
    with torch.no_grad():
        for _, layer in rw.adapter_layers(model):
            layer.gate.copy_(torch.tensor([0.1, 0.5, 2.0, 3.0]))
    RankwiseTrainer(model=model, args=args, train_dataset=data).train()
    # lr·λ = 0.2 per step: the first two gates reach 0 within 3 steps and are pruned at the end
    for _, layer in rw.adapter_layers(model):
        assert layer.gate.numel() == 2 and layer.lora_A.shape[0] == 2
        assert bool(((layer.gate.detach() - torch.tensor([1.2, 2.2])).abs() < 0.05).all())


def test_pruning_keeps_the_scale_through_save_and_load(tmp_path):
    model = _sora(alpha=8.0)  # s = α/r = 2; after pruning to 2 ranks the saved α is 4, so s stays 2
    with torch.no_grad():
        for _, layer in rw.adapter_layers(model):
            layer.lora_B.normal_(0, 0.1)
            layer.gate.copy_(torch.tensor([0.0, 0.5, 0.0, -1.0]))
    SoRAController(model).prune()
    batch = lm_batches(1, seed=3)[0]
    with torch.no_grad():
        logits = model.eval()(**batch).logits
    rw.save_adapter(model, tmp_path / "rw")
    again = rw.load_adapter(make_tiny_llama(0), tmp_path / "rw").eval()
    assert all(m.gate.numel() == 2 and m.scale == 2.0 for _, m in rw.adapter_layers(again))
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, logits, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- the sparsifying scheduler
def test_the_scheduler_values_and_stages_are_the_authors_spacings():
    import numpy as np

    from rankwise.adapters.sora import SoRAConfig, lambda_at, lambda_values

    lo, hi, n = 0.05, 3.0, 5
    expected = {  # the authors' code: np.linspace / log of linspace of exp / exp of linspace of log
        "linear": np.linspace(lo, hi, n),
        "log_linear": np.log(np.linspace(np.exp(lo), np.exp(hi), n)),
        "exp_linear": np.exp(np.linspace(np.log(lo), np.log(hi), n)),
    }
    for form, values in expected.items():
        cfg = SoRAConfig(r=4, sparse_lambda=lo, lambda_schedule=form, max_lambda=hi, lambda_num=n)
        np.testing.assert_allclose(lambda_values(cfg), values, rtol=1e-12)
    cfg = SoRAConfig(r=4, sparse_lambda=0.0, lambda_schedule="linear", max_lambda=3.0, lambda_num=4)
    # T = 10, n = 4: later stages ⌊10/4⌋ = 2 steps, the first 10 − 3·2 = 4
    assert [lambda_at(t, 10, cfg) for t in range(12)] == [0.0] * 4 + [1.0] * 2 + [2.0] * 2 + [3.0] * 4
    cfg = SoRAConfig(r=4, sparse_lambda=0.0, lambda_schedule="linear", max_lambda=2.0, lambda_num=3, stage_steps=3)
    assert [lambda_at(t, 12, cfg) for t in range(12)] == [0.0] * 6 + [1.0] * 3 + [2.0] * 3
    assert lambda_at(7, 12, SoRAConfig(r=4, sparse_lambda=0.3)) == 0.3  # no schedule: λ fixed


def _scheduled(**kw):
    model = _sora(**{"sparse_lambda": 0.0, "lambda_schedule": "linear", "max_lambda": 3.0, "lambda_num": 4, **kw})
    with torch.no_grad():  # gates spread over (0, 1): the stages' thresholds lr·λ reach more of them as λ rises
        for _, layer in rw.adapter_layers(model):
            layer.lora_B.normal_(0, 0.1)
            layer.gate.copy_(torch.tensor([0.1, 0.3, 0.6, 1.0]))
    return model


def test_gate_sparsity_grows_stage_by_stage_as_lambda_rises():
    steps = 16  # 4 stages of 4 steps, λ = 0, 1, 2, 3
    zeros = {}

    class Probe:
        def on_step_end(self, state):
            zeros[state.step] = sum(int((m.gate == 0).sum()) for _, m in rw.adapter_layers(state.model))

    cfg = TrainConfig(max_steps=steps, progress=False, lr=0.05, schedule="constant")
    res = train(_scheduled(), lm_batches(3), config=cfg, callbacks=[Probe()])
    assert [h["sora_lambda"] for h in res.history] == [0.0] * 4 + [1.0] * 4 + [2.0] * 4 + [3.0] * 4
    at_stage_ends = [zeros[t] for t in (4, 8, 12, 16)]
    assert at_stage_ends[0] == 0  # λ = 0: no gate reaches 0
    assert all(a < b for a, b in zip(at_stage_ends, at_stage_ends[1:], strict=False)), at_stage_ends


def test_the_schedule_resumes_exactly_from_a_checkpoint(tmp_path):
    full, straight, resumed, res = straight_and_resumed(_scheduled, lm_batches(3), 12, 5, tmp_path, lr=0.05)
    assert [h["sora_lambda"] for h in res.history[-7:]] == [h["sora_lambda"] for h in straight.history[-7:]]
    for (_, a), (_, b) in zip(rw.adapter_layers(full), rw.adapter_layers(resumed), strict=True):
        for p in ("lora_A", "lora_B", "gate"):
            torch.testing.assert_close(getattr(a, p), getattr(b, p), atol=0, rtol=0)


def test_bad_scheduler_options_name_the_parameter():
    with pytest.raises(ValueError, match="lambda_schedule"):
        _sora(lambda_schedule="cubic", max_lambda=1.0)
    with pytest.raises(ValueError, match="max_lambda"):
        _sora(lambda_schedule="linear")
    with pytest.raises(ValueError, match="sparse_lambda"):
        _sora(lambda_schedule="exp_linear", sparse_lambda=0.0, max_lambda=1.0)
    with pytest.raises(ValueError, match="lambda_num"):  # 5 stages do not fit in 3 steps, before training
        train(_scheduled(lambda_num=5), lm_batches(3), config=TrainConfig(max_steps=3, progress=False))
    with pytest.raises(ValueError, match="total_steps"):
        SoRAController(_scheduled())
