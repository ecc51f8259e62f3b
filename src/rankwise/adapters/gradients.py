"""Estimate the full-fine-tuning gradient ∂L/∂W₀ of chosen weights from a few batches.

Used by data-driven initializations (LoRA-GA, LoRA-SB): G ≈ (1/n) Σ_b ∇_W L(batch_b).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn


def default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """``model(**batch).loss`` for Hugging Face models fed dict batches with labels."""
    if not isinstance(batch, dict):
        raise ValueError("init_data batches must be dicts for the default loss; pass loss_fn=... otherwise")
    device = next(model.parameters()).device
    out = model(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
    if getattr(out, "loss", None) is None:
        raise ValueError("model(**batch) returned no loss: include 'labels' in the batches or pass loss_fn")
    return out.loss


def call_model(model: nn.Module, batch: Any) -> Any:
    """``model(**batch)`` for dicts, ``model(*batch)`` for tuples/lists, ``model(batch)`` otherwise."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, tuple | list):
        return model(*batch)
    return model(batch)


def estimate_gradients(
    model: nn.Module,
    names: list[str],
    data: Iterable,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    max_batches: int = 8,
) -> dict[str, torch.Tensor]:
    """Mean gradient (fp32) of ``module.weight`` for each module name, over at most ``max_batches``."""
    loss_fn = loss_fn or default_loss
    weights = {n: model.get_submodule(n).weight for n in names}
    saved = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    sums = {n: torch.zeros(w.shape, dtype=torch.float32, device=w.device) for n, w in weights.items()}
    count = 0
    was_training = model.training
    model.train()
    try:
        for w in weights.values():
            w.requires_grad_(True)
        for batch in data:
            if count >= max_batches:
                break
            grads = torch.autograd.grad(loss_fn(model, batch), list(weights.values()))
            for (n, _), g in zip(weights.items(), grads, strict=True):
                sums[n] += g.float()
            count += 1
    finally:
        for p in model.parameters():
            p.requires_grad_(saved[id(p)])
        model.train(was_training)
    if count == 0:
        raise ValueError("init_data yielded no batch")
    return {n: s / count for n, s in sums.items()}
