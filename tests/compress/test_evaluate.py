"""Held-out perplexity of compressed causal LMs: equal to the manual token-weighted loss."""

from __future__ import annotations

import math

import pytest
import torch

from rankwise.compress import perplexity

from ..conftest import make_tiny_llama


def test_perplexity_matches_manual_loss():
    model = make_tiny_llama(0)
    blocks = torch.randint(1, 100, (5, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        losses = [model(input_ids=b[None], labels=b[None]).loss for b in blocks]
    expected = math.exp(float(torch.stack(losses).mean()))
    assert perplexity(model, blocks, batch_size=2) == pytest.approx(expected, rel=1e-5)
