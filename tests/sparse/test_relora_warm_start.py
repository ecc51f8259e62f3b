"""ReLoRA's whole recipe in the one loop (``ReLoRAWarmStart``): dense warm start, the switch that puts A and B in
the target weights' place in the optimizer, evenly spaced merges, and the jagged lr re-warm after each."""

from __future__ import annotations

import pytest
import torch

from rankwise.adapters import adapter_layers
from rankwise.sparse import ReLoRAWarmStart
from rankwise.train import TrainConfig, train

from ..conftest import lm_batches, make_tiny_llama

STEPS, WARM, RESTARTS, REWARM, RANK = 22, 0.1, 3, 2, 2  # switch after step 2, then merges every 5 steps


def run(lr=1e-2, **overrides):
    model = make_tiny_llama(seed=0).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    kwargs = {"warm_start": WARM, "restarts": RESTARTS, "rank": RANK, "alpha": 4.0, "restart_warmup": REWARM}
    controller = ReLoRAWarmStart(model, opt, STEPS, **{**kwargs, **overrides})
    log = []
    q_name = "model.layers.0.self_attn.q_proj"

    class Spy:
        def on_step_end(self, state):
            q = model.get_submodule(q_name)
            w = q.base_layer.weight if hasattr(q, "base_layer") else q.weight
            log.append({"lr": [g["lr"] for g in opt.param_groups], "w": w.detach().clone(),
                        "embed_state": opt.state[model.model.embed_tokens.weight]["exp_avg"].clone()})

    cfg = TrainConfig(lr=lr, max_steps=STEPS, warmup_steps=0, schedule="constant", seed=0, progress=False, task="lm")
    train(model, lm_batches(n=STEPS, batch=2, seq=8), None, cfg, optimizer=opt, callbacks=[controller, Spy()])
    return model, opt, controller, log


def test_dense_warm_start_then_lora_in_the_target_weights_place():
    model, opt, controller, log = run()
    assert controller.switch_at == 2 and controller.merge_every == 5
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    layers = dict(adapter_layers(model))
    assert len(layers) == 14  # every linear of the 2 blocks (7 each); the head is not a target
    for layer in layers.values():
        assert id(layer.base_layer.weight) not in held and not layer.base_layer.weight.requires_grad
        assert layer.base_layer.weight not in opt.state  # the dense moments are freed
        assert id(layer.lora_A) in held and id(layer.lora_B) in held
    # the dense warm start trained the target weight at steps 1 and 2; after the switch only merges move it
    moved = [not torch.equal(a["w"], b["w"]) for a, b in zip(log, log[1:], strict=False)]
    assert moved[0]  # step 1 -> 2: dense training
    merge_steps = [i + 2 for i, m in enumerate(moved) if m and i >= 1]  # the step whose end changed W
    assert merge_steps == [7, 12, 17, 22]  # switch at 2, then every merge_every = 5 steps
    assert controller.relora.merges == RESTARTS + 1
    # the embedding (not a target) keeps its Adam state across the switch: its moment is never reset
    assert not torch.equal(log[2]["embed_state"], torch.zeros_like(log[2]["embed_state"]))


def test_lr_rewarms_from_zero_after_the_switch_and_every_merge():
    _, _, _, log = run(lr=1e-2)
    lrs = [entry["lr"][0] for entry in log]  # the lr set for the next step, constant schedule
    rewarm = [1e-2 * k / REWARM for k in range(1, REWARM)]
    for restart in (2, 7, 12, 17):  # after the switch and each merge: 1/REWARM of the lr, then full
        assert lrs[restart - 1: restart - 1 + REWARM - 1] == pytest.approx(rewarm)
        assert lrs[restart - 1 + REWARM - 1] == pytest.approx(1e-2)
    assert lrs[0] == pytest.approx(1e-2)  # no re-warm during the dense warm start


def test_merged_update_exceeds_the_lora_rank():
    """ReLoRA's point: K restarts of rank-r updates give W_T - W_switch of rank up to (K+1)·r."""
    _, _, _, log = run(lr=3e-2)
    delta = (log[-1]["w"] - log[2]["w"]).double()
    s = torch.linalg.svdvals(delta)
    assert int((s > 1e-6 * s[0]).sum()) > RANK


def test_bad_settings_name_the_parameter():
    model = make_tiny_llama()
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="restart_warmup=5 must be < the 4 steps between merges"):
        ReLoRAWarmStart(model, opt, 20, warm_start=0.2, restarts=3, restart_warmup=5)
    with pytest.raises(ValueError, match="warm_start"):
        ReLoRAWarmStart(model, opt, 20, warm_start=1.5)
    other = torch.optim.AdamW([model.lm_head.weight])
    with pytest.raises(ValueError, match=r"does not hold the target weights of \['model.layers.0.self_attn.q_proj'"):
        ReLoRAWarmStart(model, other, 20, warm_start=0.0, restart_warmup=1)
    assert not list(adapter_layers(model))  # refused before touching the model


@pytest.mark.parametrize("stop", [1, 9])  # before the switch (after step 2) and between the merges at 7 and 12
def test_resume_across_the_switch_and_a_merge_is_bit_exact(tmp_path, stop):
    import dataclasses

    def go(steps, out, resume=None):
        torch.manual_seed(0)
        model = make_tiny_llama(seed=0).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        controller = ReLoRAWarmStart(model, opt, STEPS, warm_start=WARM, restarts=RESTARTS, rank=RANK, alpha=4.0,
                                     restart_warmup=REWARM)
        cfg = dataclasses.replace(TrainConfig.plain(steps), lr=1e-2, checkpoint_every=1, output_dir=str(out))
        train(model, lm_batches(n=STEPS, batch=2, seq=8), config=cfg, optimizer=opt, callbacks=[controller],
              resume_from=resume)
        return model, controller

    full, c_full = go(12, tmp_path / "a")
    go(stop, tmp_path / "b")
    resumed, c_res = go(12, tmp_path / "c", resume=tmp_path / "b")
    assert c_res.relora.merges == c_full.relora.merges == 2
    for (n, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
