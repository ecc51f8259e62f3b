"""What the first decoder layer of a causal LM receives on calibration batches: the starting point of
methods that process a model layer by layer (SliceGPT, DSnoT) without storing more than one layer's
inputs."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..batches import call_model, model_device, move_batch

#: One calibration batch at a layer: (hidden states, the layer's keyword arguments, token mask).
LayerInput = tuple[torch.Tensor, dict[str, Any], torch.Tensor]


class _Stop(Exception):
    pass


@torch.no_grad()
def first_layer_inputs(model: nn.Module, first_layer: nn.Module, data: Iterable, who: str) -> list[LayerInput]:
    """``(hidden, kwargs, mask)`` per dict batch of ``data`` (``input_ids`` required; ``mask`` from
    ``attention_mask``, all ones without one): the forward stops at ``first_layer``. ``who`` names the
    caller in the errors."""
    device = model_device(model)
    captured: list[LayerInput] = []
    masks: list[torch.Tensor] = []

    def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        captured.append((hidden.detach(), {k: v for k, v in kwargs.items() if k != "hidden_states"}, masks[-1]))
        raise _Stop

    handle = first_layer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for batch in data:
            if not (isinstance(batch, dict) and "input_ids" in batch):
                raise ValueError(f"{who} calibration batches must be dicts with input_ids")
            batch = move_batch(batch, device)
            ids = batch["input_ids"]
            mask = batch.get("attention_mask")
            masks.append((mask if mask is not None else torch.ones_like(ids)).bool())
            try:
                call_model(model, {**batch, "use_cache": False})
            except _Stop:
                pass
    finally:
        handle.remove()
    if not captured:
        raise ValueError(f"{who}: data yielded no calibration batch")
    return captured
