"""A tiny Llama with anisotropic layer inputs, trained briefly: the test model of the data-aware
compression methods (LoRD with data, EoRA), whose point is the input distribution."""

from __future__ import annotations

import torch
from torch import nn

from ..conftest import VOCAB, make_tiny_llama


def pattern_batches(n: int, seed: int, batch: int = 8, seq: int = 16) -> list[dict]:
    """Arithmetic token sequences: a tiny Llama learns them in a few steps."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        start = torch.randint(1, VOCAB, (batch, 1), generator=g)
        step = torch.randint(1, 4, (batch, 1), generator=g)
        ids = (start + step * torch.arange(seq)) % (VOCAB - 1) + 1
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def trained_anisotropic_llama(epochs: int) -> tuple[nn.Module, list[dict]]:
    """A tiny Llama whose RMSNorm gains span 100× (anisotropic layer inputs, like the outlier
    features of real LLMs; frozen), trained ``epochs`` passes over 8 pattern batches so that
    compression visibly hurts; returns the model (eval mode) and those batches."""
    model = make_tiny_llama(0)
    g = torch.Generator().manual_seed(0)
    for name, module in model.named_modules():
        if name.endswith("layernorm"):
            module.weight.data = torch.logspace(0.5, -1.5, 32)[torch.randperm(32, generator=g)]
            module.weight.requires_grad_(False)
    data = pattern_batches(8, seed=0)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(epochs):
        for batch in data:
            opt.zero_grad()
            model(**batch).loss.backward()
            opt.step()
    return model.eval(), data
