"""Batches and losses, the ground floor every package shares.

A batch is what a data loader yields: a dict of tensors (Hugging Face style, ``model(**batch)``), a
tuple/list (``model(*batch)``) or a single tensor. The default loss is ``model(**batch).loss``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

LossFn = Callable[[nn.Module, Any], torch.Tensor]

__all__ = ["LossFn", "call_model", "default_loss", "loss_of", "model_device", "move_batch"]


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def move_batch(batch: Any, device: torch.device) -> Any:
    """A dict batch with its tensors on ``device`` (other values and non-dict batches unchanged)."""
    if isinstance(batch, dict):
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    return batch


def call_model(model: nn.Module, batch: Any) -> Any:
    """``model(**batch)`` for dicts, ``model(*batch)`` for tuples/lists, ``model(batch)`` otherwise."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, tuple | list):
        return model(*batch)
    return model(batch)


def default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """``model(**batch).loss`` for Hugging Face models fed dict batches with labels."""
    if not isinstance(batch, dict):
        raise ValueError("batches must be dicts for the default loss; pass loss_fn=... otherwise")
    out = model(**move_batch(batch, model_device(model)))
    if getattr(out, "loss", None) is None:
        raise ValueError("model(**batch) returned no loss: include 'labels' in the batches or pass loss_fn")
    return out.loss


def loss_of(model: nn.Module, batch: Any, loss_fn: LossFn | None = None) -> torch.Tensor:
    """``loss_fn(model, batch)``, default ``model(**batch).loss``."""
    return (loss_fn or default_loss)(model, batch)
