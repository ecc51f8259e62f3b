"""Honest optimizer-state bytes: for every name ``rw.optim.make`` accepts, ``state_bytes()`` equals the
bytes of every distinct tensor storage reachable from the optimizer object (its attributes, state,
param groups, projectors and their caches, inner optimizers), the parameters excluded.

The walk below is independent of ``rankwise.optim.accounting``: it follows every attribute, so a
cache added to a projector or an optimizer without being counted fails here.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rankwise as rw
from rankwise.optim.accounting import state_bytes

from ..conftest import lm_batches, make_tiny_llama

NAMES = rw.optim.factory.names()
VARIANTS = [
    ("galore", {"projector": "svd"}),
    ("q_galore", {"projector": "svd"}),
    ("frugal", {"selector": "randk"}),
    ("frugal", {"selector": "block", "density": 0.5}),
    ("osd", {"osd_init": "svd"}),
    ("apollo", {"projector": "svd"}),
    ("galore", {"master_weights": True}),
    ("ist", {"importance_every": 2}),  # two scoring rounds within the 5 steps
]
CASES = [(name, {}) for name in NAMES] + VARIANTS
IDS = [name + "".join(f"-{k}={v}" for k, v in kw.items()) for name, kw in CASES]


def _key(t: torch.Tensor) -> tuple[str, int]:
    return str(t.device), t.untyped_storage().data_ptr()


def reachable_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Σ nbytes of the distinct storages of every tensor reachable from ``optimizer`` through instance
    attributes, dict keys and values, lists, tuples and sets; modules and parameters are not followed
    (the model is not optimizer state) and tensors sharing a parameter's storage are not counted."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    skip = {_key(p) for p in params}
    found: dict[tuple[str, int], int] = {}
    seen: set[int] = set()
    stack: list[object] = [optimizer]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, nn.Module | nn.Parameter | type):
            continue
        seen.add(id(obj))
        if torch.is_tensor(obj):
            if _key(obj) not in skip:
                found[_key(obj)] = obj.untyped_storage().nbytes()
        elif isinstance(obj, dict):
            stack += [*obj.keys(), *obj.values()]
        elif isinstance(obj, list | tuple | set | frozenset):
            stack += list(obj)
        elif type(obj).__module__.startswith(("rankwise", "torch.optim")) and hasattr(obj, "__dict__"):
            stack += list(vars(obj).values())
    return sum(found.values())


def build(name: str, model: nn.Module, **kwargs) -> torch.optim.Optimizer:
    """``make(name)`` on the tiny Llama: rank 4, refresh every 2 steps, samplers switching every 2 steps."""
    if name in rw.optim.factory.SAMPLERS:
        options = {"switch_every": 2}
        if name == "owlore":
            options.update(rank=4, ratios=[1.0, 1.0], n_layers=1, update_gap=2)
    elif name == "adamw":
        options = {}
    else:
        options = {"rank": 4, "update_gap": 2}
        if name in ("galore_8bit", "q_galore"):
            options["min_8bit_size"] = 64
    return rw.optim.make(name, model, lr=1e-3, **{**options, **kwargs})


@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=IDS)
def test_state_bytes_is_every_reachable_tensor(name, kwargs):
    model = make_tiny_llama()
    if kwargs.get("master_weights"):
        model = model.to(torch.bfloat16)
    opt = build(name, model, **kwargs)
    for batch in lm_batches(5):  # 5 steps: a refresh (gap 2) and a sampler swap (every 2) on the way
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    assert reachable_bytes(opt) > 0
    assert state_bytes(opt) == reachable_bytes(opt)
    assert rw.memory.optimizer_state_bytes(opt) == state_bytes(opt)  # what the training loop reports


def test_a_cache_left_out_of_the_count_is_caught():
    """The guard of the test above: a tensor stashed on a projector is reachable but not counted."""
    model = make_tiny_llama()
    opt = build("galore", model)
    for batch in lm_batches(2):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    proj = next(iter(opt._projectors.values()))
    proj._stash = torch.zeros(10)
    assert reachable_bytes(opt) == state_bytes(opt) + 40


def test_apollo_counts_its_cached_projection_matrix():
    """APOLLO keeps the regenerated N(0, 1/r) matrix between steps (as apollo-torch): 4·r·d bytes per
    weight on top of the moments, the limiter's norm and the seed."""
    W = nn.Parameter(torch.randn(40, 30))
    opt = rw.optim.APOLLO([{"params": [W], "rank": 5}])
    W.grad = torch.randn(40, 30)
    opt.step()
    assert opt.state_bytes() == 4 * (2 * 5 * 40 + 5 * 30) + 4


@pytest.mark.parametrize("name", ["adamw", "apollo"])
def test_layerwise_state_bytes_is_every_reachable_tensor(name):
    """The layer-wise mode keeps one optimizer per parameter (its own ``state`` stays empty)."""
    model = make_tiny_llama()

    def factory(groups):
        return rw.optim.make(name, [{**g, "rank": 4} if g["params"][0].dim() == 2 and name != "adamw" else g
                                    for g in groups], lr=1e-3)

    opt = rw.optim.layerwise(model, factory)
    for batch in lm_batches(3):
        model(**batch).loss.backward()
    opt.remove_hooks()
    assert state_bytes(opt) == reachable_bytes(opt) > 0
    assert rw.memory.optimizer_state_bytes(opt) == state_bytes(opt)
