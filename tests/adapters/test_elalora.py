"""ElaLoRA: each component's score is AdaLoRA's smoothed sensitivity, every adjustment removes the lowest-
scoring components and adds one to each top-scoring layer (ΔW loses exactly the removed components), so in
one run some layers grow while others shrink at a fixed total, and the result exports to PEFT."""

from __future__ import annotations

import pytest
import torch

import rankwise as rw
from rankwise.adapters.elalora import ElaLoRAController, rank_pattern
from rankwise.callbacks import Callback
from rankwise.train import TrainConfig, train

from ..conftest import lm_batches, make_tiny_llama
from .peft_pairs import check_exports

TARGETS = ["q_proj", "v_proj", "down_proj"]
OPTS = {"r": 3, "warmup": 2, "adjust_interval": 2, "adjust_k": 2, "beta1": 0.7, "beta2": 0.6, "alpha": 6.0}


def _elalora(**kw):
    return rw.adapt(make_tiny_llama(0), "elalora", targets=TARGETS, **{**OPTS, **kw})


def test_adjustments_remove_the_lowest_scores_and_grow_the_top_layers():
    model = _elalora()
    layers = [(n, m) for n, m in rw.adapter_layers(model)]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.02)
    ctl = ElaLoRAController(model, optimizer=opt, total_steps=12)
    ipt = [torch.zeros(3) for _ in layers]
    unc = [torch.zeros(3) for _ in layers]
    model.train()
    for t, batch in enumerate(lm_batches(3) * 4, start=1):
        model(**batch).loss.backward()
        opt.step()
        for i, (_, m) in enumerate(layers):  # the test's own smoothed sensitivity
            sens = ((m.lora_E * m.lora_E.grad).abs().view(-1) + (m.lora_A * m.lora_A.grad).abs().mean(1)
                    + (m.lora_B * m.lora_B.grad).abs().mean(0)).detach()
            ipt[i] = 0.7 * ipt[i] + 0.3 * sens
            unc[i] = 0.6 * unc[i] + 0.4 * (sens - ipt[i]).abs()
        before = [(m.rank, m.delta_weight().detach().clone(), m.lora_B.detach().clone(), m.lora_E.detach().clone(),
                   m.lora_A.detach().clone()) for _, m in layers]
        ctl.step()
        opt.zero_grad()
        if t % 2:
            for i in range(len(layers)):
                torch.testing.assert_close(ctl.ipt[i], ipt[i], rtol=1e-5, atol=1e-12)
                torch.testing.assert_close(ctl.unc[i], unc[i], rtol=1e-5, atol=1e-12)
            continue
        scores = [i * u for i, u in zip(ipt, unc, strict=True)]
        flat = sorted((float(s), li, j) for li, sc in enumerate(scores) for j, s in enumerate(sc))
        left, lowest = [b[0] for b in before], set()
        for _, li, j in flat:  # the two lowest, a layer keeping at least one component
            if len(lowest) < 2 and left[li] > 1:
                lowest.add((li, j))
                left[li] -= 1
        top = set(torch.argsort(torch.stack([s.mean() for s in scores]), descending=True)[:2].tolist())
        for li, (_, m) in enumerate(layers):
            rank, dw, b, e, a = before[li]
            gone = [j for j in range(rank) if (li, j) in lowest]
            assert m.rank == rank - len(gone) + (li in top)
            removed = sum(((b[:, j:j + 1] * e[j]) @ a[j:j + 1]) * m.scale for j in gone) if gone else 0
            torch.testing.assert_close(m.delta_weight().detach(), dw - removed, atol=1e-7, rtol=1e-5)
            if li in top:
                assert float(m.lora_E[-1]) == 0.0  # the new component starts with λ = 0
            # the next scores restart from the kept components' values (new ones at 0)
            keep = [j for j in range(rank) if j not in gone]
            ipt[li] = torch.cat([ipt[li][keep], torch.zeros(int(li in top))])
            unc[li] = torch.cat([unc[li][keep], torch.zeros(int(li in top))])
    ranks = rank_pattern(model)
    assert sum(ranks.values()) == 3 * len(layers)
    assert max(ranks.values()) > 3 > min(ranks.values())  # some layers grew, others shrank


def test_trained_elalora_exports_to_peft_with_rank_pattern(tmp_path):
    model = _elalora()
    res = train(model, lm_batches(3), config=TrainConfig(max_steps=10, progress=False, lr=1e-2))
    assert res.history[-1]["elalora_ranks"] == 18
    ranks = rank_pattern(model)
    assert len(set(ranks.values())) > 1
    check_exports(model, lambda: make_tiny_llama(0), lm_batches(1, seed=5)[0], tmp_path, ranks)
    assert rank_pattern(rw.load_adapter(make_tiny_llama(0), tmp_path / "rankwise")) == ranks


def test_bad_options_and_a_run_before_the_first_adjustment_are_errors():
    for bad in ({"adjust_interval": 0}, {"adjust_k": 0}, {"beta1": 1.0}, {"warmup": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            _elalora(**bad)
    with pytest.raises(ValueError, match="adjust_k=7"):
        train(_elalora(adjust_k=7), lm_batches(1), config=TrainConfig(max_steps=2, progress=False))
    # a schedule with no adjustment in the run's steps: refused before training, the model untouched
    model = _elalora(warmup=20)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"warmup=20.*no scheduled re-allocation within the run's 3 steps"):
        train(model, lm_batches(1), config=TrainConfig(max_steps=3, progress=False))
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters(), strict=True))

    class Stop(Callback):  # a run that stops before the first adjustment its schedule has: an error at its end
        def on_step_end(self, state):
            state.should_stop = state.step >= 1

    with pytest.raises(RuntimeError, match="without a single rank re-allocation.*warmup=2"):
        train(_elalora(), lm_batches(1), config=TrainConfig(max_steps=6, progress=False), callbacks=[Stop()])


def test_resume_across_an_adjustment_is_exact(tmp_path):
    from rankwise.callbacks import Callback

    batches, steps = lm_batches(3), 8
    full = _elalora()
    train(full, batches, config=TrainConfig(max_steps=steps, progress=False, lr=1e-2))
    cfg = TrainConfig(max_steps=steps, progress=False, lr=1e-2, checkpoint_every=5, output_dir=str(tmp_path))

    class Stop(Callback):
        def on_step_end(self, state):
            state.should_stop = state.step == 5

    train(_elalora(), batches, config=cfg, callbacks=[Stop()])
    resumed = _elalora()  # built at the initial ranks: the resume reshapes it to the checkpoint's
    train(resumed, batches, config=cfg, resume_from=str(tmp_path))
    assert rank_pattern(resumed) == rank_pattern(full) != rank_pattern(_elalora())
    for (_, a), (_, b) in zip(rw.adapter_layers(full), rw.adapter_layers(resumed), strict=True):
        for p in ("lora_A", "lora_E", "lora_B"):
            torch.testing.assert_close(getattr(a, p), getattr(b, p), atol=0, rtol=0)
