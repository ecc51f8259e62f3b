"""Every adapter under Hugging Face gradient checkpointing (activation recomputation in backward): the same
gradients as without it, and running statistics (SingLoRA's step count, PRILoRA's input norms) updated once
per batch, not again by the recompute."""

from __future__ import annotations

import copy

import pytest
import torch

import rankwise as rw

from ..conftest import lm_batches, make_tiny_llama
from .test_precision import METHODS, RANK, TAME, _needs_data, _randomize


def _statistics(model) -> dict[str, torch.Tensor]:
    return {f"{n}.{s}": getattr(layer, s).clone() for n, layer in rw.adapter_layers(model)
            for s in layer.running_statistics}


@pytest.mark.parametrize("reentrant", [False, pytest.param(True, marks=pytest.mark.slow)])
@pytest.mark.parametrize("method", METHODS)
def test_gradient_checkpointing_gives_the_same_step(method, reentrant):
    data = lm_batches(seed=3)
    model = rw.adapt(make_tiny_llama(0), method, r=RANK, init_data=data if _needs_data(method) else None,
                     **TAME.get(method, {}))
    _randomize(model)
    model.train()
    ref = copy.deepcopy(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    for m in (ref, model):
        torch.manual_seed(1)  # the same adapter-dropout masks (checkpointing replays the RNG state)
        m(**data[0]).loss.backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    want = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    assert got.keys() == want.keys()
    for n, g in got.items():
        assert (g is None) == (want[n] is None), n
        if g is not None:
            torch.testing.assert_close(g, want[n], atol=1e-5, rtol=1e-4, msg=n)
    expected = _statistics(ref)
    for n, value in _statistics(model).items():
        torch.testing.assert_close(value, expected[n], msg=n)


def test_the_recompute_is_what_the_statistics_skip():
    """SingLoRA and PRILoRA do update their statistics in a plain training forward (the test above would pass
    trivially if they never did)."""
    data = lm_batches(seed=3)
    for method, stat in (("singlora", "singlora_step"), ("prilora", "input_norm")):
        model = rw.adapt(make_tiny_llama(0), method, r=RANK).train()
        before = _statistics(model)
        model(**data[0]).loss.backward()
        after = _statistics(model)
        assert all(not torch.equal(before[n], after[n]) for n in before if n.endswith(stat)), method
