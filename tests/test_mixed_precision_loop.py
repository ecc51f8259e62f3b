"""Mixed precision in rankwise.train: bf16 / fp16 autocast for the forward, a GradScaler for fp16."""

from __future__ import annotations

import pytest
import torch

import rankwise as rw
from rankwise.train import TrainConfig, train

from .test_grad_accum import fixed_loader, still_bert
from .test_train import Crash, CrashAt, assert_bit_identical, snapshot


def fp32_bert(seed: int = 0) -> torch.nn.Module:
    return still_bert(seed).float()


def plain(**cfg) -> TrainConfig:
    return TrainConfig(**{"lr": 1e-2, "schedule": "constant", "progress": False, "measure_memory": False,
                          "seed": None, "device": None, **cfg})


def test_bf16_runs_forward_and_evaluation_under_autocast_and_backward_outside():
    """The loss is computed under bf16 autocast, the gradients outside it (torch's AMP recipe), and the
    evaluation under it too; weights stay fp32 and end near, but not at, the fp32 run's."""
    model, reference = fp32_bert(), fp32_bert()
    seen: dict[str, list] = {"forward": [], "backward": [], "eval": []}

    def loss_fn(m, batch):
        seen["forward"].append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return m(**batch).loss

    hook = model.classifier.weight.register_hook(lambda g: seen["backward"].append(torch.is_autocast_enabled("cpu")))
    model.register_forward_hook(lambda m, i, o: None if m.training else seen["eval"].append(
        torch.is_autocast_enabled("cpu")))
    train(model, fixed_loader(16, 4), fixed_loader(8, 4), config=plain(max_steps=3, precision="bf16"),
          loss_fn=loss_fn)
    hook.remove()
    assert seen["forward"] == [torch.bfloat16] * 3 and seen["backward"] == [False] * 3
    assert seen["eval"] and all(seen["eval"])
    train(reference, fixed_loader(16, 4), config=plain(max_steps=3))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    pairs = zip(model.parameters(), reference.parameters(), strict=True)
    diff = max(float((a - b).detach().abs().max()) for a, b in pairs)
    assert 0 < diff < 0.05


def test_fp16_takes_torch_amp_recipe_steps_bit_for_bit():
    """precision="fp16" == a hand-written AMP loop (autocast forward, scaled backward, unscale_, clip, scaler.step,
    scaler.update), bit for bit, including a step whose gradient is inf: skipped, the scale halved."""
    def poisoned(m, batch):  # the second step's loss is inf: its gradients are inf/NaN
        calls.append(1)
        return m(**batch).loss * (float("inf") if len(calls) == 2 else 1.0)

    calls: list[int] = []
    model = fp32_bert()
    res = train(model, fixed_loader(16, 4), config=plain(max_steps=4, precision="fp16", max_grad_norm=0.5),
                loss_fn=poisoned)
    assert [h["loss_scale"] for h in res.history] == [65536.0, 65536.0, 32768.0, 32768.0]

    calls = []
    reference = fp32_bert()
    opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.0)
    scaler = torch.amp.GradScaler("cpu")
    for batch in fixed_loader(16, 4):
        with torch.autocast("cpu", dtype=torch.float16):
            loss = poisoned(reference, batch)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(list(reference.parameters()), 0.5)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    assert_bit_identical(snapshot(reference), snapshot(model))


def test_fp16_resume_restores_the_loss_scale(tmp_path):
    """The GradScaler's state is in the checkpoint: a run whose scale was halved at step 1 and resumed from its
    step-2 checkpoint logs the same scales and ends at the same weights as the run straight through."""
    def poisoned(m, batch):
        calls.append(1)
        return m(**batch).loss * (float("inf") if len(calls) == 1 else 1.0)

    cfg = {"lr": 1e-2, "max_steps": 5, "progress": False, "seed": 3, "precision": "fp16"}
    calls: list[int] = []
    straight = rw.adapt(fp32_bert(), "lora", r=4)
    ref = train(straight, fixed_loader(16, 4), config=TrainConfig(**cfg), loss_fn=poisoned)
    out = tmp_path / "run"
    calls = []
    with pytest.raises(Crash):
        train(rw.adapt(fp32_bert(), "lora", r=4), fixed_loader(16, 4), callbacks=[CrashAt(3)], loss_fn=poisoned,
              config=TrainConfig(**cfg, checkpoint_every=2, output_dir=str(out)))
    resumed = rw.adapt(fp32_bert(), "lora", r=4)
    res = train(resumed, fixed_loader(16, 4), config=TrainConfig(**cfg, checkpoint_every=2, output_dir=str(out)),
                resume_from=out, loss_fn=poisoned)
    assert [h["loss_scale"] for h in res.history] == [h["loss_scale"] for h in ref.history]
    assert ref.history[-1]["loss_scale"] == 32768.0
    assert_bit_identical(snapshot(straight), snapshot(resumed))


def test_fp16_refuses_fp16_trainable_weights_and_layerwise_optimizers():
    with pytest.raises(ValueError, match=r"precision='fp16'.*fp32 trainable.*bert\.embeddings"):
        train(still_bert().half(), fixed_loader(8, 4), config=plain(max_steps=1, precision="fp16"))
    model = fp32_bert()
    optimizer = rw.optim.layerwise(model, lambda groups: torch.optim.AdamW(groups, lr=1e-3))
    with pytest.raises(ValueError, match=r"precision='fp16'.*LayerwiseOptimizer"):
        train(model, fixed_loader(8, 4), optimizer=optimizer, config=plain(max_steps=1, precision="fp16"))
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp8")
