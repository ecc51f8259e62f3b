"""``make(name, model_or_params, **kw)``: build a named memory-efficient optimizer."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .apollo import APOLLO, APOLLOMini
from .blocks import LISA, BAdam, OwLore
from .dct import DCTGaLore
from .fira import Fira
from .flora import Flora
from .frugal import FRUGAL
from .galore import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit
from .gradnormlorp import GradNormLoRP
from .groups import param_groups
from .osd import OnlineSubspaceDescent
from .q_galore import QGaLoreAdamW

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "galore": GaLoreAdamW,
    "galore_adafactor": GaLoreAdafactor,
    "galore_8bit": GaLoreAdamW8bit,
    "q_galore": QGaLoreAdamW,
    "fira": Fira,
    "frugal": FRUGAL,
    "apollo": APOLLO,
    "apollo_mini": APOLLOMini,
    "gradnormlorp": GradNormLoRP,
    "flora_opt": Flora,
    "osd": OnlineSubspaceDescent,
    "dct_proj": DCTGaLore,
    "adamw": torch.optim.AdamW,
}
#: Block/layer samplers: they decide themselves which parameters train, so they take the model.
SAMPLERS: dict[str, type[torch.optim.Optimizer]] = {"badam": BAdam, "lisa": LISA, "owlore": OwLore}
NAMES = sorted([*OPTIMIZERS, *SAMPLERS])


def make(
    name: str,
    model_or_params: nn.Module | Iterable[torch.Tensor] | Iterable[dict[str, Any]],
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """The optimizer ``name`` (see ``OPTIMIZERS``) with the same keyword arguments as its class.

    Given an ``nn.Module``, the groups come from ``param_groups(model, targets=..., rank=...)``
    (``targets`` default ``"all-linear"``, ``rank`` default 128; ``apollo_mini`` uses rank 1). Given
    parameters or groups, they are passed through unchanged (``rank``/``targets`` are then rejected).
    ``'adamw'`` is ``torch.optim.AdamW`` on every trainable parameter (the full-state baseline).
    ``'badam'``, ``'lisa'``, ``'owlore'`` (``SAMPLERS``) take the model and their own keyword arguments.
    """
    if name in SAMPLERS:
        if not isinstance(model_or_params, nn.Module):
            raise ValueError(f"optimizer {name!r} samples transformer layers and needs the model, not parameters")
        return SAMPLERS[name](model_or_params, **kwargs)
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; known: {NAMES}")
    cls = OPTIMIZERS[name]
    grouping = {k: kwargs.pop(k) for k in ("targets", "rank") if k in kwargs}
    if isinstance(model_or_params, nn.Module):
        model = model_or_params
        if name == "adamw":
            return cls([p for p in model.parameters() if p.requires_grad], **kwargs)
        rank = 1 if name == "apollo_mini" else grouping.get("rank", 128)
        groups = param_groups(model, targets=grouping.get("targets", "all-linear"), rank=rank)
        return cls(groups, **kwargs)
    if grouping:
        raise ValueError(
            f"{sorted(grouping)} only apply when make() gets a model; "
            "with parameters or groups, put 'rank' in the groups"
        )
    return cls(model_or_params, **kwargs)
