"""IncreLoRA: the total rank follows the growth schedule up to the budget, new components go to the
top-scored modules (the score is Σ|ΔW ⊙ ∇ΔW|/√n smoothed as AdaLoRA's), a growth leaves ΔW unchanged
but for the new reserve, the reserve stays frozen and new entries warm up, resume across a growth is
exact, and the grown adapter exports to PEFT with per-layer ranks."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from peft import PeftModel

import rankwise as rw
from rankwise.adapters.adalora import smooth_importance_
from rankwise.adapters.increlora import (
    RESERVE_LAMBDA,
    IncreLoRAController,
    grow_to_match,
    growth_steps,
    rank_pattern,
)
from rankwise.callbacks import Callback
from rankwise.checkpoint import checkpoints, read_checkpoint
from rankwise.hf_trainer import RankwiseTrainer
from rankwise.train import TrainConfig, train

from ..conftest import VOCAB, lm_batches, make_tiny_bert, make_tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]  # 6 layers of different shapes
OPTS = {"r": 1, "target_r": 3, "incre_interval": 2, "top_h": 2, "incre_rank_num": 1, "alpha": 2.0}


def _increlora(**kw):
    return rw.adapt(make_tiny_llama(0), "increlora", targets=TARGETS, **{**OPTS, **kw})


def _layers(model):
    return [m for _, m in rw.adapter_layers(model)]


def _hand_loop(model, steps, lr=1e-2, batches=None, ctl=None):
    batches = batches or lm_batches(3)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.1)
    ctl = ctl or IncreLoRAController(model, optimizer=opt)
    model.train()
    for i in range(steps):
        model(**batches[i % len(batches)]).loss.backward()
        ctl.after_backward()
        opt.step()
        ctl.step()
        opt.zero_grad()
    return ctl, opt


def test_total_rank_follows_the_growth_schedule_up_to_the_budget():
    model = _increlora()
    seen = []

    class Probe(Callback):
        def on_step_end(self, state):
            seen.append(rank_pattern(state.model))

    res = train(model, lm_batches(3), config=TrainConfig(max_steps=14, progress=False, lr=1e-2), callbacks=[Probe()])
    budget, layers = 3 * 6, 6
    steps = growth_steps(rw.adapter_state(model).config, layers)
    assert steps == [2, 4, 6, 8, 10, 12]  # (18 − 6) / (top_h·1) = 6 rounds, every 2 steps
    expected, total = [], layers
    for t in range(1, 15):
        if t in steps:
            total = min(budget, total + 2)
        expected.append(total)
    assert [sum(p.values()) for p in seen] == expected
    assert [h["increlora_rank"] for h in res.history] == expected
    for before, after in zip(seen, seen[1:], strict=False):  # per layer non-decreasing, +1 at most
        assert all(0 <= after[n] - before[n] <= 1 for n in before)
    assert len({v for v in seen[-1].values()}) > 1  # unequal allocation
    for m in _layers(model):  # the budget is spent: no reserve left, scoring stopped
        assert m.rows == m.rank and not m.tracking


def test_the_score_is_the_smoothed_delta_times_gradient_sensitivity():
    model = _increlora()
    layer = _layers(model)[0]
    with torch.no_grad():
        layer.lora_E.normal_()
    base_w = layer.base_layer.weight
    base_w.requires_grad_(True)  # ∂L/∂W_base = ∂L/∂ΔW (W_eff = W + ΔW)
    ctl = IncreLoRAController(model)
    model(**lm_batches(1)[0]).loss.backward()
    dw = layer.delta_weight().detach()
    expected = (dw * base_w.grad).abs().sum() / math.sqrt(dw.numel())
    ctl.update_importance()
    b1, b2 = 0.85, 0.85
    ipt = (1 - b1) * expected
    unc = (1 - b2) * (expected - ipt).abs()
    torch.testing.assert_close(ctl.ipt[0], ipt, rtol=1e-5, atol=0)
    torch.testing.assert_close(ctl.scores()[0], ipt * unc, rtol=1e-5, atol=0)
    ipt, unc = torch.tensor(1.0), torch.tensor(0.0)  # the shared smoothing, below the average
    smooth_importance_(ipt, unc, torch.tensor(0.2), 0.85, 0.7)
    torch.testing.assert_close(ipt, torch.tensor(0.85 + 0.15 * 0.2))
    torch.testing.assert_close(unc, torch.tensor(0.3 * abs(0.2 - 0.88)))


def test_the_total_never_exceeds_the_budget():
    model = _increlora(r=1, target_r=2, top_h=1, incre_rank_num=4)  # 6 more: 4, then 2
    assert growth_steps(rw.adapter_state(model).config, 6) == [2, 4]
    ctl, _ = _hand_loop(model, 6)
    assert sorted(rank_pattern(model).values(), reverse=True)[:2] in ([5, 3], [7, 1], [5, 1])
    assert sum(rank_pattern(model).values()) == 12 and ctl.done


def test_new_components_go_to_the_top_scored_modules():
    model = _increlora(incre_interval=50, top_h=2)
    ctl, _ = _hand_loop(model, 3)  # importance from 3 steps, no growth yet
    scores = ctl.scores().clone()
    names = [n for n, _ in ctl.layers]
    before = rank_pattern(model)
    added = ctl.grow(ctl.t)
    top = [names[i] for i in sorted(range(len(names)), key=lambda i: -float(scores[i]))[:2]]
    assert len(set(scores.tolist())) == len(names)  # distinct scores: the choice is decided by them
    assert sorted(added) == sorted(top)
    after = rank_pattern(model)
    assert {n for n in names if after[n] > before[n]} == set(top)


@pytest.mark.parametrize("advance", [True, False])
def test_a_growth_leaves_the_delta_unchanged_but_for_the_new_reserve(advance):
    model = _increlora(incre_interval=50, advance_learn=advance)
    ctl, _ = _hand_loop(model, 3)
    batch = lm_batches(1, seed=4)[0]
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits
    deltas = [m.delta_weight().detach().clone() for m in _layers(model)]
    added = ctl.grow(ctl.t)
    assert added
    for (name, m), dw in zip(ctl.layers, deltas, strict=True):
        if name not in added:
            assert torch.equal(m.delta_weight(), dw)
            continue
        new = m.lora_B[:, -1:] @ (m.lora_A[-1:] * m.lora_E[-1:]) * m.scale  # the appended reserve's term
        assert float(m.lora_E[-1].detach()) == pytest.approx(RESERVE_LAMBDA if advance else 0.0, rel=1e-6, abs=0)
        torch.testing.assert_close(m.delta_weight().detach(), dw + new.detach(), atol=1e-7, rtol=0)
        assert m.lora_E.shape[0] == m.rank + 1  # the reserve is refilled
    if not advance:  # the added components start at λ = 0: the model is exactly unchanged
        with torch.no_grad():
            assert torch.equal(model(**batch).logits, logits)


def test_the_reserve_stays_frozen_and_new_entries_warm_up():
    model = _increlora(incre_interval=2, advance_learn=False, restart_warmup=4)
    ctl, opt = _hand_loop(model, 1)  # AdamW with weight decay: a frozen entry would still move
    reserve = [(m.lora_A[1:].detach().clone(), m.lora_B[:, 1:].detach().clone(), m.lora_E[1:].detach().clone())
               for m in _layers(model)]
    _hand_loop(model, 1, ctl=ctl)  # step 2: growth at its end; the reserve did not move in steps 1, 2
    for m, (a, b, e) in zip(_layers(model), reserve, strict=True):
        assert torch.equal(m.lora_A[1:2], a) and torch.equal(m.lora_B[:, 1:2], b) and torch.equal(m.lora_E[1:2], e)
    i = next(i for i, (n, _) in enumerate(ctl.layers) if rank_pattern(model)[n] == 2)
    g = ctl.layers[i][1]
    # the first step after the growth has factor 0 for the new λ, p, q; the factors then rise by 1/W
    assert ctl.factor(ctl.born_e[i], 3)[1] == 0 and ctl.factor(ctl.born_e[i], 5)[1] == 0.5
    assert ctl.factor(ctl.born_e[i], 9)[1] == 1 and ctl.factor(ctl.born_e[i], 3)[0] == 1
    assert ctl.factor(ctl.born_e[i], 3)[2] == 0  # the new reserve's λ: frozen
    new = (g.lora_A[1].detach().clone(), g.lora_E[1].detach().clone())
    _, opt2 = _hand_loop(model, 1, ctl=ctl)
    assert torch.equal(g.lora_A[1], new[0]) and torch.equal(g.lora_E[1], new[1])
    assert not torch.equal(g.lora_A[0], new[0])
    # the optimizer state follows the new shapes
    for p in (g.lora_A, g.lora_E, g.lora_B):
        st = opt2.state.get(p, {})
        assert not st or st["exp_avg"].shape == p.shape


def test_resume_across_a_growth_step_is_exact(tmp_path):
    batches, steps = lm_batches(3), 12
    full = _increlora(restart_warmup=2)
    ctl_full = IncreLoRAController(full)  # passed by hand (replaces the automatic one), to read its state
    train(full, batches, config=TrainConfig(max_steps=steps, progress=False, lr=1e-2), callbacks=[ctl_full])
    part, resumed = _increlora(restart_warmup=2), _increlora(restart_warmup=2)
    cfg = TrainConfig(max_steps=steps, progress=False, lr=1e-2, checkpoint_every=5, output_dir=str(tmp_path))

    class Stop(Callback):
        def on_step_end(self, state):
            state.should_stop = state.step == 5

    train(part, batches, config=cfg, callbacks=[IncreLoRAController(part), Stop()])
    payload, tensors, _ = read_checkpoint(checkpoints(tmp_path)[0])
    assert payload["step"] == 5 and payload["callbacks"][0]["t"] == 5
    ctl = IncreLoRAController(resumed)  # built at the initial rank: the resume grows it to the checkpoint's
    train(resumed, batches, config=cfg, resume_from=str(tmp_path), callbacks=[ctl])
    assert torch.equal(ctl.ipt, ctl_full.ipt) and torch.equal(ctl.unc, ctl_full.unc) and bool(ctl.ipt.all())
    assert rank_pattern(resumed) == rank_pattern(full)
    for a, b in zip(_layers(full), _layers(resumed), strict=True):
        for p in ("lora_A", "lora_E", "lora_B"):
            torch.testing.assert_close(getattr(a, p), getattr(b, p), atol=0, rtol=0)
    # the controller the loop attaches by itself resumes the same way
    auto_cfg = TrainConfig(max_steps=steps, progress=False, lr=1e-2, checkpoint_every=5,
                           output_dir=str(tmp_path / "auto"))
    train(_increlora(restart_warmup=2), batches, config=auto_cfg, callbacks=[Stop()])
    auto = _increlora(restart_warmup=2)
    train(auto, batches, config=auto_cfg, resume_from=str(tmp_path / "auto"))
    assert rank_pattern(auto) == rank_pattern(full)
    for a, b in zip(_layers(full), _layers(auto), strict=True):
        torch.testing.assert_close(a.lora_B, b.lora_B, atol=0, rtol=0)
    grown = _increlora(restart_warmup=2)
    grow_to_match(grown, tensors)  # by hand (a hand-written loop)
    assert rank_pattern(grown) != rank_pattern(_increlora(restart_warmup=2))


def test_peft_export_with_rank_pattern_and_save_load_give_equal_logits(tmp_path):
    model = _increlora()
    train(model, lm_batches(3), config=TrainConfig(max_steps=12, progress=False, lr=1e-2))
    ranks = rank_pattern(model)
    assert sum(ranks.values()) == 18 and len(set(ranks.values())) > 1
    batch = lm_batches(1, seed=5)[0]
    with torch.no_grad():
        logits = model.eval()(**batch).logits
    rw.export_peft(model, tmp_path / "peft")
    loaded = PeftModel.from_pretrained(make_tiny_llama(0), tmp_path / "peft").eval()
    assert loaded.peft_config["default"].rank_pattern
    for name, r in ranks.items():
        assert loaded.base_model.model.get_submodule(name).lora_A["default"].weight.shape[0] == r
    rw.save_adapter(model, tmp_path / "rw")
    again = rw.load_adapter(make_tiny_llama(0), tmp_path / "rw").eval()
    assert rank_pattern(again) == ranks
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(again(**batch).logits, logits, atol=1e-6, rtol=1e-6)


def test_bad_options_and_a_schedule_that_cannot_fit_are_errors():
    for bad, match in (({"target_r": 0}, "target_r"), ({"top_h": 0}, "top_h"), ({"incre_interval": 0},
                       "incre_interval"), ({"beta1": 1.0}, "beta1"), ({"restart_warmup": -1}, "restart_warmup"),
                       ({"advance_learn": 1}, "advance_learn")):
        with pytest.raises(ValueError, match=match):
            _increlora(**bad)
    with pytest.raises(ValueError, match="target_r=1 .*not above"):
        train(_increlora(target_r=1), lm_batches(2), config=TrainConfig(max_steps=4, progress=False))
    model = _increlora()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="up to step 12, after the run's 8 steps"):
        train(model, lm_batches(2), config=TrainConfig(max_steps=8, progress=False))
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters(), strict=True))


def test_rankwise_trainer_grows_the_rank(tmp_path):
    model = rw.adapt(make_tiny_bert(0), "increlora", r=1, target_r=2, incre_interval=1, top_h=4, restart_warmup=1)
    n = len(rw.adapter_layers(model))
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(1, VOCAB, (10,), generator=g), "labels": i % 3} for i in range(24)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=math.ceil(n / 4) + 1, per_device_train_batch_size=4, learning_rate=1e-2,
        report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no", logging_steps=1)
    RankwiseTrainer(model=model, args=args, train_dataset=data).train()
    assert sum(rank_pattern(model).values()) == 2 * n
    assert all(m.rows == m.rank for m in _layers(model))


def test_a_run_that_stops_before_the_first_growth_is_an_error():
    class Stop(Callback):
        def on_step_end(self, state):
            state.should_stop = state.step >= 1

    with pytest.raises(RuntimeError, match="without a single rank re-allocation.*incre_interval=2"):
        train(_increlora(), lm_batches(2), config=TrainConfig(max_steps=12, progress=False), callbacks=[Stop()])


def test_hand_written_loop_equals_the_train_loop():
    batches = lm_batches(3)
    a, b = _increlora(top_h=4, restart_warmup=2), _increlora(top_h=4, restart_warmup=2)  # growth at 2, 4, 6
    opt_a = torch.optim.AdamW([p for p in a.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    train(a, batches, config=TrainConfig.plain(7), optimizer=opt_a)
    _hand_loop(b, 7, batches=batches)
    assert rank_pattern(a) == rank_pattern(b)
    for la, lb in zip(_layers(a), _layers(b), strict=True):
        for p in ("lora_A", "lora_E", "lora_B"):
            torch.testing.assert_close(getattr(la, p), getattr(lb, p), atol=1e-6, rtol=1e-5)
