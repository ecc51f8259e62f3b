"""Fast Forward (Rahamim et al. 2024): after every T-th step, repeat it while the tiny-validation loss falls."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.adapters.fast_forward import FastForward
from rankwise.train import TrainConfig, train

from ..conftest import cls_batches, make_tiny_bert


def _regression(seed: int = 0):
    """A LoRA'd linear regression whose target is reachable by ΔW: many repeats of a small step help."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 4))
    rw.adapt(model, "fast_forward", targets=["0"], r=2, trainable=None)
    with torch.no_grad():
        model[0].lora_B.normal_(std=0.1)
    g = torch.Generator().manual_seed(seed + 1)
    target = nn.Linear(6, 4)
    x = torch.randn(64, 6, generator=g)
    with torch.no_grad():
        target.weight.copy_(model[0].base_weight + torch.randn(4, 2, generator=g) @ torch.randn(2, 6, generator=g))
        target.bias.copy_(model[0].base_layer.bias)
        y = target(x)
    return model, [{"x": x[:32], "y": y[:32]}], [{"x": x[32:], "y": y[32:]}]


def _mse(model, batch):
    return (model(batch["x"]) - batch["y"]).pow(2).mean()


def _params(model):
    return [p.detach().clone() for p in model.parameters() if p.requires_grad]


def _loss_at(model, params, val):
    with torch.no_grad():
        saved = _params(model)
        for p, v in zip([p for p in model.parameters() if p.requires_grad], params, strict=True):
            p.copy_(v)
        loss = float(_mse(model, val[0]))
        for p, v in zip([p for p in model.parameters() if p.requires_grad], saved, strict=True):
            p.copy_(v)
    return loss


def _one_step_and_stage(model, train_b, val, lr=0.02, **kw):
    ff = FastForward(model, every=1, val_data=val, loss_fn=_mse, **kw)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    _mse(model, train_b[0]).backward()
    before = _params(model)
    ff.before_step()
    opt.step()
    after_step = _params(model)
    repeats = ff.after_step()
    return ff, before, after_step, repeats


def test_stage_repeats_the_last_step_and_stops_at_the_first_non_improving_repeat():
    model, train_b, val = _regression()
    _, before, stepped, k = _one_step_and_stage(model, train_b, val)
    assert k >= 2  # the small step is worth repeating here
    delta = [a - b for a, b in zip(stepped, before, strict=True)]
    final = _params(model)
    # each kept repeat moved the parameters by exactly the last optimizer step: θ_t + k·Δ
    for f, s, d in zip(final, stepped, delta, strict=True):
        assert torch.equal(f, s + k * d)
    # an independent line search: losses fall for repeats 1..k, the (k+1)-th does not improve (and was undone)
    losses = [_loss_at(model, [s + j * d for s, d in zip(stepped, delta, strict=True)], val) for j in range(k + 2)]
    assert all(losses[j + 1] < losses[j] for j in range(k))
    assert losses[k + 1] >= losses[k]


def test_no_improvement_leaves_the_step_as_taken():
    """A step whose repetition does not help (lr far too large): zero repeats, θ = θ_t exactly."""
    model, train_b, val = _regression()
    _, _, stepped, k = _one_step_and_stage(model, train_b, val, lr=5.0)
    assert k == 0
    for f, s in zip(_params(model), stepped, strict=True):
        assert torch.equal(f, s)


def test_max_repeats_caps_a_stage():
    model, train_b, val = _regression()
    _, _, _, k = _one_step_and_stage(model, train_b, val, max_repeats=1)
    assert k == 1


def test_stages_every_t_steps_in_the_loop():
    """rw.adapt + train: the loop attaches Fast Forward by itself, a stage after steps T, 2T, ... only."""
    model = make_tiny_bert()
    rw.adapt(model, "fast_forward", r=2, ff_every=2, ff_val_batches=1)
    result = train(model, cls_batches(n=5), cls_batches(n=2, seed=3),
                   config=TrainConfig(max_steps=5, lr=1e-2, progress=False, measure_memory=False))
    staged = [h["step"] for h in result.history if "ff_repeats" in h]
    assert staged == [2, 4]
    with pytest.raises(ValueError, match="tiny validation set"):
        m = make_tiny_bert()
        rw.adapt(m, "fast_forward", r=2)
        train(m, cls_batches(n=2), config=TrainConfig(max_steps=2, progress=False, measure_memory=False))


def test_the_tiny_validation_set_comes_from_val_loader_not_eval_loader():
    """A runner reports on eval_loader (the CLI: the test split); the stopping rule reads val_loader."""
    model = make_tiny_bert()
    rw.adapt(model, "fast_forward", r=2, ff_every=2, ff_val_batches=1)
    ff = FastForward(model, every=2, val_batches=1)
    val, test = cls_batches(n=2, seed=3), cls_batches(n=2, seed=4)
    train(model, cls_batches(n=4), test, callbacks=[ff], val_loader=val,
          config=TrainConfig(max_steps=4, lr=1e-2, progress=False, measure_memory=False))
    assert len(ff.val) == 1 and ff.val[0] is val[0]


def test_a_passed_fast_forward_replaces_the_automatic_one():
    model = make_tiny_bert()
    rw.adapt(model, "fast_forward", r=2, ff_every=100)
    ff = FastForward(model, every=2, val_data=cls_batches(n=1, seed=3))
    result = train(model, cls_batches(n=4), callbacks=[ff],
                   config=TrainConfig(max_steps=4, lr=1e-2, progress=False, measure_memory=False))
    assert [s for s, _ in ff.history] == [2, 4]
    assert [h["step"] for h in result.history if "ff_repeats" in h] == [2, 4]
    for bad in ({"ff_every": 0}, {"ff_val_batches": 0}, {"ff_max_repeats": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            rw.adapt(nn.Sequential(nn.Linear(4, 4)), "fast_forward", targets=["0"], r=2, **bad)


def test_a_repeat_that_does_not_lower_the_loss_is_not_kept():
    """Strictly lower: an unchanged validation loss ends the stage at zero repeats (not the cap)."""
    model, train_b, val = _regression()
    ff = FastForward(model, every=1, val_data=val, loss_fn=lambda m, b: torch.tensor(1.0), max_repeats=5)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.02)
    _mse(model, train_b[0]).backward()
    ff.before_step()
    opt.step()
    stepped = _params(model)
    assert ff.after_step() == 0
    assert all(torch.equal(f, s) for f, s in zip(_params(model), stepped, strict=True))
