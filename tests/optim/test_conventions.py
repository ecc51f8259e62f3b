"""torch.optim conventions, for every catalogued optimizer and sampler: a ``copy.deepcopy``, a pickle
round trip and a ``torch.save``/``torch.load`` of the optimizer give an independent optimizer that
steps exactly like the original."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

from rankwise import catalogue
from rankwise.optim.projected import ProjectedOptimizer

from ..conftest import lm_batches, make_tiny_llama

NAMES = [r.name for r in catalogue.records(api="optim")]


def _build(name: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    record = catalogue.get(name)
    projected = isinstance(record.config, type) and issubclass(record.config, ProjectedOptimizer)
    options: dict = {"rank": 4} if projected else {}
    if name == "owlore":  # a tiny random model has no outliers: give the layers equal sampling weight
        options = {"rank": 4, "ratios": [1.0, 1.0], "n_layers": 1}
    return record.build(model, lr=1e-2, **options)


def _clone(opt: torch.optim.Optimizer, how: str) -> torch.optim.Optimizer:
    if how == "deepcopy":
        return copy.deepcopy(opt)
    if how == "pickle":
        return pickle.loads(pickle.dumps(opt))
    buffer = io.BytesIO()
    torch.save(opt, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _params(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in opt.param_groups for p in group["params"]]


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
@pytest.mark.parametrize("name", NAMES)
def test_a_copy_steps_exactly_like_the_original(name, how):
    model = make_tiny_llama()
    opt = _build(name, model)
    for batch in lm_batches(2):  # state (moments, projectors, awake blocks) exists before the copy
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    other = _clone(opt, how)
    assert type(other) is type(opt)
    mine, theirs = _params(opt), _params(other)
    assert len(mine) == len(theirs) and all(a is not b for a, b in zip(mine, theirs, strict=True))
    g = torch.Generator().manual_seed(0)
    for a, b in zip(mine, theirs, strict=True):
        grad = torch.randn(a.shape, generator=g) if a.requires_grad else None
        a.grad, b.grad = grad, None if grad is None else grad.clone()
    opt.step()
    other.step()
    for a, b in zip(mine, theirs, strict=True):
        assert torch.equal(a, b)


LR = 2.0**-7  # exact in float32, so float(torch.tensor(LR)) == LR


def _run(opt: torch.optim.Optimizer, model: torch.nn.Module, steps: int = 3) -> None:
    for batch in lm_batches(steps):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()


def _build_lr(name: str, model: torch.nn.Module, lr) -> torch.optim.Optimizer:
    record = catalogue.get(name)
    projected = isinstance(record.config, type) and issubclass(record.config, ProjectedOptimizer)
    options: dict = {"rank": 4, "update_gap": 2} if projected else {}
    if name == "owlore":
        options = {"rank": 4, "ratios": [1.0, 1.0], "n_layers": 1, "update_gap": 2}
    if name in ("badam", "lisa", "owlore"):
        options["switch_every"] = 2
    return record.build(model, lr=lr, **options)


@pytest.mark.parametrize("name", NAMES)
def test_a_tensor_lr_steps_exactly_like_the_float_lr(name):
    """``lr=torch.tensor(x)`` (accepted by torch.optim.AdamW) is accepted by every catalogued optimizer and
    sampler and gives the same weights as ``lr=x``."""
    float_model, tensor_model = make_tiny_llama(), make_tiny_llama()
    float_opt = _build_lr(name, float_model, LR)
    tensor_opt = _build_lr(name, tensor_model, torch.tensor(LR))
    start = [p.detach().clone() for p in float_model.parameters()]
    _run(float_opt, float_model)
    _run(tensor_opt, tensor_model)
    moved = False
    for a, b, s in zip(float_model.parameters(), tensor_model.parameters(), start, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
        moved = moved or not torch.equal(a, s)
    assert moved


@pytest.mark.parametrize("bad", [torch.tensor(-1e-3), torch.tensor(float("nan")), torch.tensor([1e-3, 1e-3])])
@pytest.mark.parametrize("name", ["galore", "badam"])
def test_a_bad_tensor_lr_is_rejected(name, bad):
    with pytest.raises(ValueError, match="lr"):
        _build_lr(name, make_tiny_llama(), bad)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("name", ["galore", "badam"])
def test_a_copy_of_an_optimizer_with_a_scheduler_steps_itself(name, how):
    """An LR scheduler patches ``optimizer.step`` on the instance with a wrapper that calls the original
    optimizer: a copy must not keep it (a deepcopy stepped the original, pickle raised)."""
    model = make_tiny_llama()
    opt = _build(name, model)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    _run(opt, model, 1)
    other = _clone(opt, how)
    mine, theirs = _params(opt), _params(other)
    before = [p.detach().clone() for p in mine]
    for a, b in zip(mine, theirs, strict=True):
        a.grad = None
        b.grad = torch.ones_like(b) if b.requires_grad else None
    other.step()
    assert all(torch.equal(p, q) for p, q in zip(mine, before, strict=True)), "the copy stepped the original"
    assert any(not torch.equal(p, q) for p, q in zip(theirs, before, strict=True))


@pytest.mark.parametrize("name", NAMES)
def test_add_param_group_adds_a_group_that_step_updates(name):
    """torch.optim convention for every catalogued optimizer and sampler: a group added after
    construction is updated by the next step() with its own options."""
    model = make_tiny_llama()
    opt = _build(name, model)
    extra = torch.nn.Parameter(torch.ones(6, 5))
    opt.add_param_group({"params": [extra], "lr": 0.25, "weight_decay": 0.0})
    assert opt.param_groups[-1]["params"][0] is extra
    for batch in lm_batches(3):
        before = extra.detach().clone()
        opt.zero_grad()
        model(**batch).loss.backward()
        extra.grad = torch.ones_like(extra)
        opt.step()
        assert not torch.equal(extra.detach(), before), f"{name}: the added group was not updated"
