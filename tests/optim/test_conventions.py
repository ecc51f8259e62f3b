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
