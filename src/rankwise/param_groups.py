"""Optimizer param groups shared by ``rankwise.optim`` and the adapter configs that choose their own optimizer.

``loraplus_groups``: LoRA+ (Hayou, Ghosh & Yu 2024, ICML) trains ``lora_B`` at λ·lr and everything else at lr.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .checks import number


def loraplus_groups(
    model: nn.Module, lr: float, ratio: float = 16.0, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """Param groups for any ``torch.optim`` optimizer: ``lora_B`` params at ``lr·ratio``, the rest at ``lr``.

    ``ratio`` is LoRA+'s λ = η_B/η_A; ``weight_decay`` is set on both groups. Raises ValueError when
    the model has no trainable parameter named ``...lora_B``.
    """
    lr = number("lr", lr, 0.0, low_open=True, what="> 0 and finite")
    ratio = number("ratio", ratio, 0.0, low_open=True, what="> 0 and finite")
    weight_decay = number("weight_decay", weight_decay, 0.0, what=">= 0 and finite")
    b_params, other_params, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (b_params if name.endswith("lora_B") else other_params).append(p)
    if not b_params:
        raise ValueError(
            "model has no trainable parameter named '...lora_B': LoRA+ needs a LoRA-shaped adapter "
            "(e.g. rw.adapt(model, 'loraplus'))"
        )
    groups = [{"params": b_params, "lr": lr * ratio, "weight_decay": weight_decay, "name": "lora_B"}]
    if other_params:
        groups.insert(0, {"params": other_params, "lr": lr, "weight_decay": weight_decay, "name": "lora_A+other"})
    return groups
