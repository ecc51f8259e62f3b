"""The fine-tuning steps of the compression methods, taken by the one training loop.

LoRAPrune's pruning and recovery, :func:`~.api.recover`, DSEE's fine-tune and PELA's distillation
all train with AdamW (no weight decay) on a parameter list of their own, for a number of steps over
data that is restarted when it runs out: :func:`rankwise.train.train` with that optimizer and
:meth:`~rankwise.train.TrainConfig.plain` (no reseeding, clipping, schedule or device move), their
schedules as callbacks (:mod:`rankwise.callbacks`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from ..batches import LossFn
from ..train import TrainConfig, train

__all__ = ["finetune"]


def finetune(
    model: nn.Module,
    params: Sequence[torch.Tensor],
    data: Iterable,
    steps: int,
    lr: float,
    loss_fn: LossFn | None = None,
    progress: bool = False,
    callbacks: Sequence[Any] = (),
) -> list[dict]:
    """``steps`` AdamW steps (lr ``lr``, no weight decay) on ``params`` through the loop; the model
    trains in train mode and ends in eval mode. Returns ``[{"step", "loss", **logged}]`` per step,
    ``step`` counted from 0 and ``logged`` what the callbacks put in ``state.log``."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    result = train(model, data, config=TrainConfig.plain(steps, progress), callbacks=callbacks,
                   optimizer=optimizer, loss_fn=loss_fn)
    return [
        {"step": h["step"] - 1, "loss": h["loss"], **{k: v for k, v in h.items() if k not in ("step", "loss", "lr")}}
        for h in result.history
    ]
