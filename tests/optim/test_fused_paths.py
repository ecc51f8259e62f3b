"""The row-blocked (fused) CPU steps against the whole-tensor steps that CUDA, DTensor (FSDP2) and
non-contiguous parameters take: for every name ``rw.optim.make`` accepts, the same run with the fused
paths switched off (``fused.chunkable`` answering False) ends at the same weights. A change to one path's
math that the other does not share (a dropped scale, a swapped ratio) fails here, on one process."""

from __future__ import annotations

import copy

import pytest
import torch

import rankwise as rw
from rankwise.optim import fused

from ..conftest import lm_batches, make_tiny_llama
from .test_state_bytes import build

NAMES = rw.optim.factory.names()
#: steps with no row-blocked variant: torch's AdamW (also the inner optimizer of the BAdam, LISA and IST
#: samplers) and Flora's compressed momentum
NO_FUSED_PATH = {"adamw", "badam", "lisa", "ist", "flora_opt"}


def _run(model, name: str, kwargs: dict, blocked: bool, monkeypatch) -> tuple[list[torch.Tensor], int]:
    """Weights after 5 steps (a refresh every 2) and how many times a fused path was taken."""
    taken = 0
    real = fused.chunkable

    def chunkable(*tensors):
        nonlocal taken
        ok = blocked and real(*tensors)
        taken += ok
        return ok

    monkeypatch.setattr(fused, "chunkable", chunkable)
    torch.manual_seed(0)
    opt = build(name, model, **kwargs)
    for batch in lm_batches(5):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()], taken


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("name", NAMES)
def test_fused_and_whole_tensor_steps_agree(name, weight_decay, monkeypatch):
    base = make_tiny_llama()
    kwargs = {"weight_decay": weight_decay} if weight_decay else {}
    blocked, taken = _run(copy.deepcopy(base), name, kwargs, True, monkeypatch)
    whole, not_taken = _run(copy.deepcopy(base), name, kwargs, False, monkeypatch)
    assert not_taken == 0
    assert (taken > 0) == (name not in NO_FUSED_PATH)  # the comparison below is not vacuous
    for a, b in zip(blocked, whole, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
