"""Param groups from a model: ``param_groups`` (a projected group of 2-D Linear weights and a plain group)
for projected optimizers, ``decay_groups`` (weight decay on matrices only) for plain ones."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..checks import integer
from ..targets import Targets, find_targets
from .sharding import FLAT_HINT, is_flat


def param_groups(
    model: nn.Module, targets: Targets = "all-linear", rank: int = 128, **group_opts: Any
) -> list[dict[str, Any]]:
    """Param groups for a projected optimizer.

    The weights of the ``nn.Linear`` modules selected by ``targets`` (``"all-linear"`` skips output
    heads; a regex or a list of name suffixes otherwise, see ``rankwise.targets``) that require grad
    form the projected group ``{"params": [...], "rank": rank, **group_opts}``; every other trainable
    parameter (embeddings, norms, biases, heads) goes into a plain group without ``rank``. A weight
    shared with a non-target module (tied embeddings) stays plain. A model whose parameters are
    flattened (FSDP1 ``use_orig_params=False``, DeepSpeed ZeRO) raises ValueError: its weights
    cannot be projected.
    """
    integer("rank", rank, 1)
    flat = [name for name, p in model.named_parameters() if is_flat(p)]
    if flat:  # the Linear weights are views into these: every one would go to the plain group unprojected
        raise ValueError(f"param_groups: the model holds flattened parameters ({flat[:3]}); {FLAT_HINT}")
    projected, seen = [], set()
    for _, module in find_targets(model, targets, conv1d=False):
        w = module.weight
        if w.requires_grad and w.dim() == 2 and id(w) not in seen:
            projected.append(w)
            seen.add(id(w))
    if not projected:
        raise ValueError(f"targets={targets!r} selected no trainable 2-D Linear weight")
    too_small = [tuple(w.shape) for w in projected if rank > min(w.shape)]
    if too_small:
        raise ValueError(f"rank={rank} is larger than min(m, n) of selected weights with shapes {too_small[:4]}")
    plain, seen_all = [], set(seen)
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen_all:
            plain.append(p)
            seen_all.add(id(p))
    groups: list[dict[str, Any]] = [{"params": projected, "rank": rank, **group_opts}]
    if plain:
        groups.append({"params": plain})
    return groups


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The trainable parameters in two groups: matrices (≥ 2-D) get ``weight_decay``, vectors (biases,
    norms) none."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters (requires_grad=False everywhere)")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
