"""Every trainable tensor of every adapter method reaches the loss: after one backward (adapter tensors
randomized, so that no zero-initialized factor blocks the others), each has a gradient and it is not all
zeros. A parameter the forward forgot (a factor left out, a detached path) is trained by nothing."""

from __future__ import annotations

import pytest
import torch

import rankwise as rw

from ..conftest import MODEL_KINDS
from .test_matrix import METHODS, _adapt, _randomize_feasibly


@pytest.mark.parametrize("kind", sorted(MODEL_KINDS))
@pytest.mark.parametrize("method", METHODS)
def test_every_trainable_tensor_gets_a_gradient(kind, method):
    model, data, logits = _adapt(kind, method)
    _randomize_feasibly(model, method)
    model.train()
    logits(model(**data[0])).float().pow(2).mean().backward()
    dead = [n for n, p in model.named_parameters()
            if p.requires_grad and (p.grad is None or not torch.any(p.grad != 0))]
    assert not dead, f"{method}: no gradient reaches {dead[:5]}{' ...' if len(dead) > 5 else ''}"
    assert rw.adapter_layers(model)
