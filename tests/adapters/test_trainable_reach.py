"""Every trainable tensor of every adapter method reaches the loss: after one backward (adapter tensors
randomized, so that no zero-initialized factor blocks the others), each has a gradient and it is not all
zeros. A parameter the forward forgot (a factor left out, a detached path) is trained by nothing."""

from __future__ import annotations

import pytest
import torch

import rankwise as rw

from ..conftest import MODEL_KINDS
from .test_matrix import METHODS, _adapt, _randomize


@pytest.mark.parametrize("kind", sorted(MODEL_KINDS))
@pytest.mark.parametrize("method", METHODS)
def test_every_trainable_tensor_gets_a_gradient(kind, method):
    model, data, logits = _adapt(kind, method)
    _randomize(model)
    if method == "ard_lora":  # back into its feasible set: α ∈ [0, 1] (its controller projects there after every
        with torch.no_grad():  # step); above 1 every component is fully on and ∂m/∂α = 0 by design
            for _, layer in rw.adapter_layers(model):
                layer.head_scale.clamp_(0.0, 1.0)
    model.train()
    logits(model(**data[0])).float().pow(2).mean().backward()
    dead = [n for n, p in model.named_parameters()
            if p.requires_grad and (p.grad is None or not torch.any(p.grad != 0))]
    assert not dead, f"{method}: no gradient reaches {dead[:5]}{' ...' if len(dead) > 5 else ''}"
    assert rw.adapter_layers(model)
