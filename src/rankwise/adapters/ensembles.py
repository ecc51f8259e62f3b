"""LoRA ensembles (Wang et al. 2023, "LoRA ensembles for large language model fine-tuning"): a deep
ensemble of k LoRA adapters on one shared frozen base, differing only by their random init.

Member i is a named LoRA adapter whose config seed is ``seed + i`` (its A is drawn from
``rng.layer_generator(seed + i, layer)``; B starts at 0), so the members' initial A differ and
nothing else does. The ensemble's prediction is the mean of the members' probabilities,

    p(y | x) = (1/k) Σᵢ softmax(f(x; W₀ + BᵢAᵢ)),

computed in one forward: the batch repeated k times, example j of copy i through member i alone
(``model(..., adapter_names=[...])``, the mixed-batch path). Training all members together uses the
same repeated batch: with ``adapter_names``, each member's parameters get gradients only from its own
copy, so k · (mean loss over the repeated batch) = Σᵢ lossᵢ and one step on it is the k
single-member steps at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .. import catalogue
from ..checks import integer
from .ops import set_active
from .registry import adapt, adapter_names, check_new_name

__all__ = ["ensemble_batch", "ensemble_probs", "lora_ensemble"]

PAPER = "LoRA ensembles for large language model fine-tuning"


def lora_ensemble(
    model: nn.Module, members: int = 5, *, prefix: str = "member", seed: int = 0, **lora_options: Any
) -> nn.Module:
    """Add ``members`` LoRA adapters ``f"{prefix}{i}"`` (``rw.adapt(model, "lora", name=...,
    seed=seed + i, trainable=None, **lora_options)``: same targets, rank and options, their own seed)
    and make all of them trainable. The base (and any head) is shared and frozen. A plain forward runs
    every member summed, which is not the ensemble: use :func:`ensemble_probs` / :func:`ensemble_batch`.
    Returns ``model``; ``model.rankwise_ensemble`` lists the members."""
    members = integer("members", members, 1)
    seed = integer("seed", seed, 0)
    if "trainable" in lora_options or "name" in lora_options:
        raise ValueError("lora_ensemble names its members f'{prefix}{i}' and trains no module besides them; "
                         "options 'name' and 'trainable' are not allowed")
    names = [f"{prefix}{i}" for i in range(members)]
    for name in names:
        check_new_name(model, name)
    for i, name in enumerate(names):
        adapt(model, "lora", name=name, seed=seed + i, trainable=None, **lora_options)
    set_active(model, names)
    model.rankwise_ensemble = names  # type: ignore[assignment]  # Module attribute
    return model


def _members(model: nn.Module, names: Sequence[str] | None) -> list[str]:
    names = list(names) if names is not None else list(getattr(model, "rankwise_ensemble", None) or
                                                         adapter_names(model))
    unknown = [n for n in names if n not in adapter_names(model)]
    if not names or unknown:
        raise ValueError(f"names={names!r} must name adapters of the model; its adapters are {adapter_names(model)}")
    return names


def ensemble_batch(model: nn.Module, batch: dict[str, Any], names: Sequence[str] | None = None) -> dict[str, Any]:
    """``batch`` (a dict with batch dimension n) repeated once per member, member-major, with
    ``adapter_names`` routing copy i through member ``names[i]`` (default: the ensemble's members).
    ``k * model(**ensemble_batch(...)).loss`` is the sum of the members' mean losses."""
    names = _members(model, names)
    if not isinstance(batch, dict) or "adapter_names" in batch:
        raise ValueError("batch must be a dict of model inputs without 'adapter_names'")
    sizes = {v.shape[0] for v in batch.values() if torch.is_tensor(v) and v.dim() > 0}
    if len(sizes) != 1:
        raise ValueError(f"batch's tensors must share one batch size, got sizes {sorted(sizes)}")
    n = sizes.pop()
    out = {key: v.repeat(len(names), *([1] * (v.dim() - 1))) if torch.is_tensor(v) and v.dim() > 0 else v
           for key, v in batch.items()}
    out["adapter_names"] = [name for name in names for _ in range(n)]
    return out


def ensemble_probs(model: nn.Module, inputs: dict[str, Any], names: Sequence[str] | None = None) -> torch.Tensor:
    """The ensemble's predictive distribution (1/k) Σᵢ softmax(logitsᵢ) over the last dimension, in
    fp32, from one batched forward (:func:`ensemble_batch`); ``inputs`` without labels is enough."""
    names = _members(model, names)
    batch = ensemble_batch(model, {k: v for k, v in inputs.items() if k != "labels"}, names)
    out = model(**batch)
    logits = out.logits if hasattr(out, "logits") else out[0]
    probs = logits.float().softmax(dim=-1)
    return probs.view(len(names), -1, *probs.shape[1:]).mean(dim=0)


catalogue.register(catalogue.MethodRecord(
    "lora_ensembles", "multi-adapter", PAPER,
    "deep ensemble of k LoRA adapters differing only by init seed on one shared frozen base; prediction = mean "
    "of the members' softmax, one batched forward over the repeated batch (mixed-adapter path)",
    api="adapt", config=lora_ensemble, exports="peft-lora", spec=lora_ensemble,
    builder=lambda model, **options: lora_ensemble(model, **options),
))
