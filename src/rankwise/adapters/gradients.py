"""Estimate the full-fine-tuning gradient ∂L/∂W₀ of chosen weights from a few batches.

Used by data-driven initializations (LoRA-GA, LoRA-SB): G ≈ (1/n) Σ_b ∇_W L(batch_b).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..batches import LossFn, default_loss
from ..targets import is_conv1d, is_linear4bit


def estimate_gradients(
    model: nn.Module,
    names: list[str],
    data: Iterable,
    loss_fn: LossFn | None = None,
    max_batches: int = 8,
) -> dict[str, torch.Tensor]:
    """Mean gradient (fp32) of each named module's weight, over at most ``max_batches``, as an (out, in)
    matrix: the gradient of a transformers ``Conv1D`` weight (stored (in, out)) is transposed, like
    the weight every init reads (``AdapterLayer.base_weight``)."""
    loss_fn = loss_fn or default_loss
    quantized = [n for n in names if is_linear4bit(model.get_submodule(n))]
    if quantized:
        raise ValueError(
            f"this init needs the full gradient of W₀, which 4-bit quantized layers ({quantized[:3]}) have not; "
            "estimate it on the full-precision model (e.g. method 'qlora' with init='lora_ga' quantizes after)"
        )
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
    return {n: (s / count).t() if is_conv1d(model.get_submodule(n)) else s / count for n, s in sums.items()}
