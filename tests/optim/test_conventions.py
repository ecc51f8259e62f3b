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


def _build(name: str, model: torch.nn.Module, lr: float | None = 1e-2) -> torch.optim.Optimizer:
    """``name`` on ``model`` (a tiny Llama) at ``lr`` (None: the optimizer's default)."""
    record = catalogue.get(name)
    projected = isinstance(record.config, type) and issubclass(record.config, ProjectedOptimizer)
    options: dict = {"rank": 4} if projected else {}
    if name == "owlore":  # a tiny random model has no outliers: give the layers equal sampling weight
        options = {"rank": 4, "ratios": [1.0, 1.0], "n_layers": 1}
    return record.build(model, **options) if lr is None else record.build(model, lr=lr, **options)


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


@pytest.mark.parametrize("name", NAMES)
def test_grad_scaler_steps_exactly_and_skips_an_inf_step(name):
    """``torch.amp.GradScaler`` with every catalogued optimizer and sampler (fp32 weights, as AMP keeps them): a
    scaled step (loss × 2¹⁶, unscaled by the scaler) ends at the same weights as the unscaled step, over steps that
    refresh subspaces and switch blocks; a step whose gradients hold inf is skipped (weights and optimizer state
    untouched) and the scale halved."""
    plain_model, scaled_model = make_tiny_llama(), make_tiny_llama()
    plain, scaled = _build_lr(name, plain_model, LR), _build_lr(name, scaled_model, LR)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    _run(plain, plain_model, 3)
    for batch in lm_batches(3):
        scaled.zero_grad()
        scaler.scale(scaled_model(**batch).loss).backward()
        scaler.step(scaled)
        scaler.update()
    for a, b in zip(plain_model.parameters(), scaled_model.parameters(), strict=True):
        assert torch.equal(a, b)
    before = [p.detach().clone() for p in scaled_model.parameters()]
    state = copy.deepcopy(scaled.state_dict())
    scaled.zero_grad()
    scaler.scale(scaled_model(**lm_batches(1)[0]).loss * float("inf")).backward()
    scaler.step(scaled)
    scaler.update()
    assert scaler.get_scale() == 2.0**15
    assert all(torch.equal(p, q) for p, q in zip(scaled_model.parameters(), before, strict=True))
    _assert_same_state(scaled.state_dict(), state)


@pytest.mark.parametrize("name", NAMES)
def test_step_runs_a_closure_and_returns_its_loss(name):
    """``step(closure)``, as PyTorch Lightning's automatic optimization calls it, for every catalogued optimizer and
    sampler: the closure (zero_grad, forward, backward) runs in grad mode even when ``step`` is called under
    ``torch.no_grad()``, its loss comes back, and the run ends at the weights of the plain loop."""
    plain_model, closure_model = make_tiny_llama(), make_tiny_llama()
    plain, stepped = _build_lr(name, plain_model, LR), _build_lr(name, closure_model, LR)
    _run(plain, plain_model, 3)
    for batch in lm_batches(3):
        def closure(batch=batch):
            stepped.zero_grad()
            loss = closure_model(**batch).loss
            loss.backward()
            return loss

        with torch.no_grad():
            loss = stepped.step(closure)
        assert torch.is_tensor(loss) and loss.grad_fn is not None
    for a, b in zip(plain_model.parameters(), closure_model.parameters(), strict=True):
        assert torch.equal(a, b)


def _assert_same_state(got, want) -> None:
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and torch.equal(got, want)
    elif isinstance(want, dict):
        assert got.keys() == want.keys()
        for k in want:
            _assert_same_state(got[k], want[k])
    elif isinstance(want, list | tuple):
        assert len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            _assert_same_state(a, b)
    else:
        assert got == want


@pytest.mark.parametrize("name", NAMES)
def test_step_and_state_dict_hooks_run(name):
    """torch.optim's hooks for every catalogued optimizer and sampler: step pre/post hooks run once per step,
    state-dict pre/post hooks on ``state_dict()`` and load-state-dict pre/post hooks on ``load_state_dict``."""
    model = make_tiny_llama()
    opt = _build(name, model)
    seen: list[str] = []
    opt.register_step_pre_hook(lambda o, args, kwargs: seen.append("step_pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: seen.append("step_post"))
    opt.register_state_dict_pre_hook(lambda o: seen.append("sd_pre"))
    opt.register_state_dict_post_hook(lambda o, sd: seen.append("sd_post"))
    opt.register_load_state_dict_pre_hook(lambda o, sd: seen.append("load_pre"))
    opt.register_load_state_dict_post_hook(lambda o: seen.append("load_post"))
    _run(opt, model, 2)
    assert seen == ["step_pre", "step_post"] * 2
    seen.clear()
    opt.load_state_dict(opt.state_dict())
    assert seen == ["sd_pre", "sd_post", "load_pre", "load_post"]


@pytest.mark.parametrize("name", NAMES)
def test_lr_defaults_to_torch_adams(name):
    """Like ``torch.optim.Adam``/``AdamW``, every optimizer and sampler builds without an lr, at 1e-3."""
    opt = _build(name, make_tiny_llama(), lr=None)
    assert {group["lr"] for group in opt.param_groups} == {1e-3}
