"""ARD-LoRA: per-head ranks r₀·αₕ, the exact ℓ1 + TV proximal step on α, ℓ1 zeroing heads, TV damping the
step-to-step changes of α, and the compact LoRA (zero components dropped) exported to PEFT with equal logits."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

import rankwise as rw
from rankwise.adapters.ard_lora import ARDLoRAController, head_ranks, prox_l1_tv, rank_pattern
from rankwise.callbacks import Callback
from rankwise.train import TrainConfig, train

from ..conftest import lm_batches, make_tiny_llama, straight_and_resumed

R = 4


def _ard(**kw):
    return rw.adapt(make_tiny_llama(0), "ard_lora", r=R, **kw)


def _spread(model, seed: int = 0) -> None:
    """B ≠ 0 (so α has a task gradient from the first step) and head scales spread over (0.3, 0.8)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in rw.adapter_layers(model):
            layer.lora_B.normal_(0, 0.1, generator=g)
            layer.head_scale.uniform_(0.3, 0.8, generator=g)


def _run(model, steps: int = 8, lr: float = 0.05):
    scales = []

    class Probe(Callback):
        def on_step_end(self, state):
            scales.append(torch.cat([m.head_scale.detach().clone() for _, m in rw.adapter_layers(state.model)]))

    cfg = TrainConfig(max_steps=steps, progress=False, lr=lr, schedule="constant", weight_decay=0.0)
    res = train(model, lm_batches(3), config=cfg, callbacks=[Probe()])
    return res, torch.stack(scales)


def test_heads_follow_the_attention_layout_and_ranks_are_readable():
    model = _ard()
    layers = dict(rw.adapter_layers(model))
    q, k, o = (layers[f"model.layers.0.{n}"] for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj"))
    cfg = model.config
    assert (q.heads, k.heads, o.heads) == (cfg.num_attention_heads, cfg.num_key_value_heads, 1)
    with torch.no_grad():
        q.head_scale.copy_(torch.tensor([1.0, 0.6, 0.25, 0.0]))  # r·α = 4, 2.4, 1, 0
    assert head_ranks(model)["model.layers.0.self_attn.q_proj"] == [4, 3, 1, 0]
    assert rank_pattern(model)["model.layers.0.self_attn.q_proj"] == 8
    torch.testing.assert_close(q.mask()[1], torch.tensor([1.0, 1.0, 0.4, 0.0]))
    # ΔW of head h is s·Bₕ·diag(mₕ)·Aₕ on its own output rows
    with torch.no_grad():
        q.lora_B.normal_()
    d, dw = q.out_features // q.heads, q.delta_weight()
    for h in range(q.heads):
        bh, ah = q.lora_B[h * d:(h + 1) * d], q.lora_A[h * R:(h + 1) * R]
        torch.testing.assert_close(dw[h * d:(h + 1) * d], bh @ torch.diag(q.mask()[h]) @ ah * q.scale)


def test_prox_is_the_exact_minimiser_of_the_l1_tv_objective():
    g = torch.Generator().manual_seed(0)
    v, anchor = torch.randn(200, generator=g, dtype=torch.float64), torch.randn(200, generator=g, dtype=torch.float64)
    grid = torch.linspace(-4, 4, 80001, dtype=torch.float64)  # step 1e-4
    for l1, tv in ((0.3, 0.0), (0.0, 0.3), (0.2, 0.5), (0.7, 0.1)):
        objective = 0.5 * (grid[:, None] - v) ** 2 + l1 * grid[:, None].abs() + tv * (grid[:, None] - anchor).abs()
        expected = grid[objective.argmin(dim=0)]
        assert (prox_l1_tv(v, anchor, l1, tv) - expected).abs().max() < 2e-4


def test_the_controller_step_is_the_clamped_prox_around_the_previous_scales():
    model = _ard(l1=0.4, tv=0.6)
    _spread(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ctl = ARDLoRAController(model, optimizer=opt)
    model(**lm_batches(1)[0]).loss.backward()
    layers = [m for _, m in rw.adapter_layers(model)]
    g = torch.Generator().manual_seed(1)
    for m in layers:  # steps of ±0.5·N(0, 1.5²): some stay within η·β of α(t−1), some leave [0, 1]
        m.head_scale.grad = torch.randn(m.head_scale.shape, generator=g) * 1.5
    before = [m.head_scale.detach().clone() for m in layers]
    ctl.record()
    opt.step()
    stepped = [m.head_scale.detach().clone() for m in layers]
    ctl.step()
    unclamped = []
    for m, a, v in zip(layers, before, stepped, strict=True):
        x = prox_l1_tv(v, a, 0.5 * 0.4, 0.5 * 0.6)
        torch.testing.assert_close(m.head_scale.detach(), x.clamp(0, 1))
        unclamped.append(x)
    x = torch.cat(unclamped)
    assert bool((x < 0).any()) and bool((x > 1).any())  # the projection on [0, 1] acted
    assert bool((torch.cat(before) == torch.cat([m.head_scale.detach() for m in layers])).any())  # TV froze some
    with pytest.raises(ValueError, match="record"):
        ctl.step()


def test_l1_drives_head_scales_to_zero_and_shrinks_the_rank():
    full = sum(rank_pattern(_ard()).values())
    sparse = _ard(l1=2.0, tv=0.0)
    _spread(sparse)
    res, scales = _run(sparse)
    assert int((scales[-1] == 0).sum()) > 0 and res.history[-1]["ard_lora_rank"] < full
    assert sum(rank_pattern(sparse).values()) == res.history[-1]["ard_lora_rank"]
    dense = _ard(l1=0.0, tv=0.0)
    _spread(dense)
    _, scales0 = _run(dense)
    assert int((scales0 == 0).sum()) == 0  # without ℓ1 no head is switched off


def test_tv_makes_the_step_to_step_changes_of_the_scales_smaller():
    changes = {}
    for tv in (0.0, 0.5):
        model = _ard(l1=0.0, tv=tv)
        _spread(model)
        res, scales = _run(model)
        changes[tv] = float((scales[1:] - scales[:-1]).abs().sum())
        assert sum(h["ard_lora_change"] for h in res.history[1:]) == pytest.approx(changes[tv], rel=1e-4, abs=1e-6)
    assert changes[0.5] < 0.8 * changes[0.0]


def test_the_compact_lora_drops_the_zero_components_with_equal_logits(tmp_path):
    model = _ard(l1=2.0, tv=0.1)
    _spread(model, seed=3)
    _run(model)
    ranks = rank_pattern(model)
    assert sum(ranks.values()) < sum(rank_pattern(_ard()).values())
    fractional = [m for _, m in rw.adapter_layers(model) if bool(((m.mask() > 0) & (m.mask() < 1)).any())]
    assert fractional  # a component with 0 < m < 1 is kept with its weight folded into B
    for _, m in rw.adapter_layers(model):
        b, a, s = m.peft_factors()
        assert a.shape[0] == max(1, int(m.head_ranks().sum()))
        torch.testing.assert_close(b @ a * s, m.delta_weight(), atol=1e-6, rtol=0)
    batch = lm_batches(1, seed=7)[0]
    with torch.no_grad():
        logits = model.eval()(**batch).logits
    rw.export_peft(model, tmp_path / "peft")
    loaded = PeftModel.from_pretrained(make_tiny_llama(0), tmp_path / "peft").eval()
    cfg = loaded.peft_config["default"]
    assert {n: cfg.rank_pattern.get(n, cfg.r) for n in ranks} == {n: max(1, k) for n, k in ranks.items()}
    rw.save_adapter(model, tmp_path / "rw")
    again = rw.load_adapter(make_tiny_llama(0), tmp_path / "rw").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(again(**batch).logits, logits, atol=1e-6, rtol=0)
    assert head_ranks(again) == head_ranks(model)


def test_resume_is_exact(tmp_path):
    def make():
        model = _ard(l1=1.0, tv=0.2)
        _spread(model)
        return model

    full, _, resumed, _ = straight_and_resumed(make, lm_batches(3), 6, 3, tmp_path, lr=0.05)
    for (_, a), (_, b) in zip(rw.adapter_layers(full), rw.adapter_layers(resumed), strict=True):
        for p in ("lora_A", "lora_B", "head_scale"):
            torch.testing.assert_close(getattr(a, p), getattr(b, p), atol=0, rtol=0)


def test_bad_options_name_the_parameter():
    with pytest.raises(ValueError, match="l1"):
        _ard(l1=-1.0)
    with pytest.raises(ValueError, match="tv"):
        _ard(tv=-0.5)
    with pytest.raises(ValueError, match="heads"):
        _ard(heads=3)


def test_rankwise_trainer_runs_the_controller(tmp_path):
    import transformers

    from rankwise.hf_trainer import RankwiseTrainer

    from ..conftest import VOCAB, make_tiny_bert

    model = rw.adapt(make_tiny_bert(0), "ard_lora", r=R, l1=20.0, tv=0.0)
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(1, VOCAB, (10,), generator=g), "labels": i % 3} for i in range(24)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
        use_cpu=True, disable_tqdm=True, save_strategy="no", lr_scheduler_type="constant", weight_decay=0.0)
    with torch.no_grad():
        for _, layer in rw.adapter_layers(model):
            layer.head_scale.fill_(0.5)
    RankwiseTrainer(model=model, args=args, train_dataset=data).train()
    # lr·λ = 0.2 per step dominates the task steps (≈ lr): every scale reaches 0 within 4 steps
    assert all(bool((m.head_scale == 0).all()) for _, m in rw.adapter_layers(model))
