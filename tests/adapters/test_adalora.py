"""AdaLoRA: PEFT parity through the one training loop, the cubic budget, the lowest-score masking,
the orthogonality regulariser, PEFT export of the allocated ranks, and the automatic controller."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import AdaLoraConfig, PeftModel, get_peft_model

import rankwise as rw
from rankwise.adapters.adalora import AdaLoRAController, orthogonal_regularizer, rank_pattern
from rankwise.callbacks import Callback
from rankwise.checkpoint import checkpoints, read_checkpoint
from rankwise.train import TrainConfig, train

from ..cli.cli_helpers import needs_assets, run_cli
from ..conftest import lm_batches, make_tiny_bert, make_tiny_llama
from .peft_pairs import train_with_trainer

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TINY = ["--max-steps", "2", "--batch-size", "4", "--max-length", "24", "--train-limit", "16", "--test-limit", "8",
        "--no-progress"]
OPTS = {"r": 4, "target_r": 2, "tinit": 1, "tfinal": 2, "deltaT": 1, "alpha": 4.0}


def _adalora(**kw):
    model = make_tiny_llama(0)
    rw.adapt(model, "adalora", targets=TARGETS, **{**OPTS, **kw})
    return model


def _kept(model) -> int:
    return sum(rank_pattern(model).values())


@pytest.mark.parametrize(("steps", "tinit", "tfinal", "delta"), [(8, 1, 2, 1), (9, 2, 1, 2)])
def test_parity_with_peft_adalora_through_the_loop(steps, tinit, tfinal, delta):
    """Same init, batches and AdamW: rankwise's loop (controller attached by itself) and PEFT's
    loop with update_and_allocate end with the same parameters and the same masks."""
    batches = lm_batches(4, seed=3)
    ours = _adalora(tinit=tinit, tfinal=tfinal, deltaT=delta)
    cfg = AdaLoraConfig(init_r=4, target_r=2, tinit=tinit, tfinal=tfinal, deltaT=delta, total_step=steps,
                        lora_alpha=4, target_modules=TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM")
    theirs = get_peft_model(make_tiny_llama(0), cfg)
    inner = theirs.base_model.model
    with torch.no_grad():
        for name, layer in rw.adapter_layers(ours):
            peft_layer = inner.get_submodule(name)
            for p in ("lora_A", "lora_E", "lora_B"):
                getattr(peft_layer, p)["default"].copy_(getattr(layer, p))
    opt_ours = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    train(ours, batches, config=TrainConfig.plain(steps), optimizer=opt_ours)
    opt_theirs = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-2)
    theirs.train()
    for step in range(1, steps + 1):
        theirs(**batches[(step - 1) % len(batches)]).loss.backward()  # the loss includes w·R
        opt_theirs.step()
        theirs.base_model.update_and_allocate(step)
        opt_theirs.zero_grad()
    masks = 0
    for name, layer in rw.adapter_layers(ours):
        peft_layer = inner.get_submodule(name)
        for p in ("lora_A", "lora_E", "lora_B"):
            torch.testing.assert_close(getattr(layer, p), getattr(peft_layer, p)["default"], atol=2e-5, rtol=1e-4)
        assert torch.equal(layer.lora_E == 0, peft_layer.lora_E["default"] == 0)
        masks += int((layer.lora_E == 0).sum())
    assert masks == 14 * 4 - 14 * 2  # the target budget: target_r per layer on average


def test_total_rank_follows_the_cubic_schedule_at_every_allocation():
    total, tinit, tfinal, delta = 12, 2, 3, 2
    model = _adalora(tinit=tinit, tfinal=tfinal, deltaT=delta)
    res = train(model, lm_batches(3), config=TrainConfig(max_steps=total, progress=False, lr=1e-2))
    b0, bt = 14 * 4, 14 * 2
    checked = 0
    for rec in res.history:
        t = rec["step"]
        if tinit < t < total - tfinal and t % delta == 0:
            expected = int((b0 - bt) * (1 - (t - tinit) / (total - tfinal - tinit)) ** 3 + bt)
        elif t >= total - tfinal:
            expected = bt
        else:
            continue
        assert rec["adalora_rank"] == expected, (t, rec["adalora_rank"], expected)
        checked += 1
    assert checked == 3 + 4  # steps 4, 6 and 8 on the cubic, then 9..12 at the target
    assert _kept(model) == bt


def test_the_masked_triplets_are_the_lowest_scoring():
    """One importance update from fresh averages: S = Ī·Ū = (1−β₁)(1−β₂)β₁·I², I = |w·∇w|; the test
    scores each triplet by hand and the k lowest must be exactly the ones masked."""
    model = _adalora()
    with torch.no_grad():
        for _, layer in rw.adapter_layers(model):
            layer.lora_E.normal_(0, 0.1)
    ctl = AdaLoRAController(model, total_steps=10)
    model(**lm_batches(1)[0]).loss.backward()
    ctl.update_importance()
    c = 0.15 * 0.15 * 0.85
    scores = []
    for _, layer in rw.adapter_layers(model):
        s = [c * (p * p.grad).abs() ** 2 for p in (layer.lora_A, layer.lora_E, layer.lora_B)]
        scores.append(s[1].view(-1) + s[0].mean(1) + s[2].mean(0))
    flat = torch.cat(scores)
    k = 20
    lowest = set(torch.argsort(flat)[:k].tolist())
    ctl.mask_to_budget(ctl.init_budget - k)
    masked = torch.cat([(layer.lora_E.view(-1) == 0) for _, layer in rw.adapter_layers(model)])
    assert set(torch.nonzero(masked).view(-1).tolist()) == lowest


def test_the_orthogonality_regulariser_adds_its_gradient_in_the_loop():
    model = _adalora(orth_reg_weight=0.7, tinit=0, tfinal=0)
    layers = [m for _, m in rw.adapter_layers(model)]
    ref = copy.deepcopy(model)
    batch = lm_batches(1)[0]
    # the test's own R: mean of ‖QQᵀ − I‖_F and ‖PᵀP − I‖_F over every matrix
    ref_layers = [m for _, m in rw.adapter_layers(ref)]
    norms = [torch.linalg.norm(m.lora_A @ m.lora_A.T - torch.eye(4)) for m in ref_layers]
    norms += [torch.linalg.norm(m.lora_B.T @ m.lora_B - torch.eye(4)) for m in ref_layers]
    (ref(**batch).loss + 0.7 * torch.stack(norms).mean()).backward()
    torch.testing.assert_close(orthogonal_regularizer(layers), torch.stack(norms).mean())

    class Grab(Callback):
        def on_after_backward(self, state):
            self.grads = [p.grad.clone() for m in layers for p in (m.lora_A, m.lora_B)]

    grab = Grab()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    train(model, [batch], config=TrainConfig.plain(1), optimizer=opt, callbacks=[grab])
    # the controller runs before the user's callbacks: Grab sees ∇(loss + w·R)
    expected = [p.grad for m in ref_layers for p in (m.lora_A, m.lora_B)]
    without = copy.deepcopy(ref)
    for p in without.parameters():
        p.grad = None
    without(**batch).loss.backward()
    task_only = [p.grad for _, m in rw.adapter_layers(without) for p in (m.lora_A, m.lora_B)]
    for g_seen, g_task, g_full in zip(grab.grads, task_only, expected, strict=True):
        assert (g_full - g_task).abs().max() > 1e-3  # the regulariser's term is there
        torch.testing.assert_close(g_seen, g_full, atol=1e-6, rtol=1e-5)


def test_peft_export_of_the_allocated_ranks_loads_in_peft_with_equal_logits(tmp_path):
    model = _adalora()
    train(model, lm_batches(3), config=TrainConfig(max_steps=8, progress=False, lr=1e-2))
    ranks = rank_pattern(model)
    assert sum(ranks.values()) == 14 * 2 and len(set(ranks.values())) > 1
    rw.export_peft(model, tmp_path / "peft")
    loaded = PeftModel.from_pretrained(make_tiny_llama(0), tmp_path / "peft").eval()
    cfg = loaded.peft_config["default"]
    for name, r in ranks.items():
        assert loaded.base_model.model.get_submodule(name).lora_A["default"].weight.shape[0] == max(r, 1)
    assert cfg.rank_pattern
    batch = lm_batches(1, seed=5)[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model.eval()(**batch).logits, atol=1e-5, rtol=1e-5)


def test_hand_written_loop_with_step_equals_the_train_loop():
    batches = lm_batches(3)
    a, b = _adalora(), _adalora()
    train(a, batches, config=TrainConfig.plain(6), optimizer=torch.optim.SGD(
        [p for p in a.parameters() if p.requires_grad], lr=0.1))
    ctl = AdaLoRAController(b, total_steps=6)
    opt = torch.optim.SGD([p for p in b.parameters() if p.requires_grad], lr=0.1)
    b.train()
    for i in range(6):
        b(**batches[i % 3]).loss.backward()
        ctl.regularizer_backward()
        opt.step()
        ctl.step()
        opt.zero_grad()
    for (_, la), (_, lb) in zip(rw.adapter_layers(a), rw.adapter_layers(b), strict=True):
        torch.testing.assert_close(la.lora_E, lb.lora_E)
        torch.testing.assert_close(la.lora_A, lb.lora_A)


def test_a_schedule_that_cannot_fit_is_an_error_before_training():
    model = _adalora(total_step=20, tfinal=2)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="total_step - tfinal = 18.*max_steps"):
        train(model, lm_batches(2), config=TrainConfig(max_steps=10, progress=False))
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters(), strict=True))
    with pytest.raises(ValueError, match="tinit=8 >= total_step - tfinal"):
        train(_adalora(tinit=8, tfinal=2), lm_batches(2), config=TrainConfig(max_steps=10, progress=False))
    with pytest.raises(ValueError, match="target_r=4"):
        train(_adalora(target_r=4), lm_batches(2), config=TrainConfig(max_steps=10, progress=False))


def test_a_run_that_ends_before_any_allocation_is_an_error():
    class Stop(Callback):
        def on_step_end(self, state):
            state.should_stop = state.step >= 2

    model = _adalora(tinit=4, tfinal=1)
    with pytest.raises(RuntimeError, match=r"without a single rank re-allocation.*tinit=4, tfinal=1"):
        train(model, lm_batches(2), config=TrainConfig(max_steps=10, progress=False), callbacks=[Stop()])


def test_bad_options_name_the_parameter():
    for bad, match in (({"target_r": 0}, "target_r"), ({"beta1": 1.0}, "beta1"), ({"deltaT": 0}, "deltaT"),
                       ({"orth_reg_weight": -1}, "orth_reg_weight"), ({"init_r": 0}, "init_r")):
        with pytest.raises(ValueError, match=match):
            rw.adapt(make_tiny_llama(0), "adalora", **bad)
    model = rw.adapt(make_tiny_llama(0), "adalora", init_r=6, target_r=2)
    assert rw.adapter_state(model).config.r == 6


def test_checkpoint_resume_keeps_the_controller_state(tmp_path):
    """Stopped at step 4 of 14 and resumed: bit-identical to the run without the stop (the importance
    averages and the step count come back from the checkpoint)."""
    batches, steps = lm_batches(3), 14
    opts = {"tinit": 1, "tfinal": 3, "deltaT": 1}
    full = _adalora(**opts)
    train(full, batches, config=TrainConfig(max_steps=steps, progress=False, lr=1e-2))
    part, resumed = _adalora(**opts), _adalora(**opts)
    cfg = TrainConfig(max_steps=steps, progress=False, lr=1e-2, checkpoint_every=4, output_dir=str(tmp_path))

    class Stop(Callback):
        def on_step_end(self, state):
            state.should_stop = state.step == 4

    with pytest.warns(UserWarning, match="before its final allocation"):
        train(part, batches, config=cfg, callbacks=[Stop()])
    payload, _, _ = read_checkpoint(checkpoints(tmp_path)[0])
    assert payload["callbacks"][0][0]["t"] == 4  # the controllers' state is first, whatever the user passes
    train(resumed, batches, config=cfg, resume_from=str(tmp_path))  # without Stop: the controller's state still fits
    for (_, la), (_, lb) in zip(rw.adapter_layers(full), rw.adapter_layers(resumed), strict=True):
        for p in ("lora_A", "lora_E", "lora_B"):
            torch.testing.assert_close(getattr(la, p), getattr(lb, p), atol=0, rtol=0)


def test_rankwise_trainer_attaches_the_controller(tmp_path):
    model = rw.adapt(make_tiny_bert(0), "adalora", r=4, target_r=2, tinit=1, tfinal=1)
    train_with_trainer(model, tmp_path, 5, logging_steps=1)
    n = len(rw.adapter_layers(model))
    assert _kept(model) == 2 * n


@needs_assets
def test_cli_train_runs_the_controller_and_refuses_a_schedule_that_cannot_fit(tmp_path, capsys):
    out = tmp_path / "run"
    flags = ["train", "--method", "adalora", "--r", "4", "--option", "target_r=2", "--targets", "query,value",
             "--output", str(out), *TINY]
    code, _, err = run_cli(capsys, *flags)
    assert code == 0, err
    history = json.loads((out / "metrics.json").read_text())["result"]["history"]
    assert history[-1]["adalora_rank"] == 2 * 12  # query and value of MiniLM's 6 blocks at target_r = 2
    code, _, err = run_cli(capsys, *flags[:-len(TINY)], "--option", "total_step=50", "--overwrite", *TINY)
    assert code == 2 and "total_step - tfinal = 50" in err and "Traceback" not in err


def test_a_controller_passed_by_the_user_replaces_the_automatic_one():
    from rankwise.adapters.rank_control import MethodControllers, with_method_controllers

    model = _adalora()
    auto = with_method_controllers(model, [])
    assert len(auto) == 1 and isinstance(auto[0], MethodControllers)
    mine = AdaLoRAController(model, total_steps=8)
    assert with_method_controllers(model, [mine]) == [mine]
    res = train(model, lm_batches(3), config=TrainConfig(max_steps=8, progress=False, lr=1e-2), callbacks=[mine])
    assert mine.final_done and res.history[-1]["adalora_rank"] == 14 * 2
    assert with_method_controllers(_adalora(), [AdaLoRAController(model, total_steps=8)])[0].model is not model
