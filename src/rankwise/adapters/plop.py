"""PLoP (Hayou, Ghosh & Yu 2025, "PLoP: Precise LoRA Placement for Efficient Finetuning of Large Models").

Before training, one forward pass of the pretrained model over a few batches of the task's data scores every
candidate layer by its Normalized Feature Norm: with ẑ = z/‖z‖ the unit layer inputs (the real tokens) and û
random unit directions (Gaussian, seeded),

    NFN_l = mean_t ‖W_l ẑ_t‖ / mean_t ‖W_l û_t‖

(how much the pretrained weight is aligned with the task's inputs compared with a random input). A module type
(the layer name without its block index: ``attention.self.query``, ``mlp.up_proj``, ...) scores
NFN_type = Σ_l mean‖W_l ẑ‖ / Σ_l mean‖W_l û‖ over its layers (each W_l scaled by its RMS), as the authors'
code aggregates it. The ``plop_types`` types with the *lowest* NFN, the least aligned with the task, get LoRA
adapters; the others none. Training is then plain LoRA (PEFT LoRA export of the placed layers).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..batches import call_model, model_device, move_batch
from ..checks import integer
from ..rng import layer_generator
from ..targets import linear_weight
from .eva import _Inputs
from .init import INITS
from .lora import LoRAConfig, LoRALayer
from .registry import MethodSpec, register

__all__ = ["PLoPConfig", "choose_types", "module_type", "nfn_scores", "type_scores"]

_BLOCK = re.compile(r"^.*?\.\d+\.")


@dataclass
class PLoPConfig(LoRAConfig):
    """LoRA options plus PLoP's: ``plop_types`` the number of module types that get adapters (the lowest NFN;
    3 as in the paper, e.g. value, output and down projections on Llama-3.2)."""

    plop_types: int = 3

    def validate(self) -> None:
        super().validate()
        integer("plop_types", self.plop_types, 1)
        if INITS[self.init].needs_grad:
            raise ValueError(f"init={self.init!r} needs the estimated gradient, which PLoP's placement pass does "
                             "not compute; choose an init without one (e.g. 'default')")


def module_type(name: str) -> str:
    """The layer's module type: its name after the first numeric (block index) component, else the name."""
    return _BLOCK.sub("", name)


@torch.no_grad()
def nfn_scores(model: nn.Module, names: list[str], data: Iterable[Any], batches: int = 1,
               seed: int = 0) -> dict[str, tuple[float, float]]:
    """``{layer: (mean_t ‖Ŵẑ_t‖, mean_t ‖Ŵû_t‖)}`` over the real tokens of the first ``batches`` batches of
    ``data`` (Ŵ = W/RMS(W), ẑ the unit layer inputs, û seeded Gaussian unit directions), in eval mode."""
    sums = {n: [0.0, 0.0, 0] for n in names}
    weights = {n: linear_weight(model.get_submodule(n)).detach().float() for n in names}
    weights = {n: w / w.pow(2).mean().sqrt().clamp(min=1e-12) for n, w in weights.items()}
    gens = {n: layer_generator(seed, n) for n in names}

    def sink(name: str, rows: torch.Tensor) -> None:
        w, z = weights[name], rows.float()
        z = z / z.norm(dim=1, keepdim=True).clamp(min=1e-12)
        u = torch.randn(z.shape, generator=gens[name]).to(z.device)
        u = u / u.norm(dim=1, keepdim=True).clamp(min=1e-12)
        s = sums[name]
        s[0] += float((z @ w.T).norm(dim=1).sum())
        s[1] += float((u @ w.T).norm(dim=1).sum())
        s[2] += z.shape[0]

    hooks = _Inputs(model, names, sink)
    was_training, device = model.training, model_device(model)
    model.eval()
    try:
        seen = 0
        for batch in data:
            if seen >= batches:
                break
            mask = batch.get("attention_mask") if isinstance(batch, dict) else None
            hooks.mask = mask.bool() if torch.is_tensor(mask) else None
            call_model(model, move_batch(batch, device))
            seen += 1
    finally:
        hooks.remove()
        model.train(was_training)
    if seen == 0:
        raise ValueError("init_data gave no batch: PLoP scores the layers on the task's data")
    return {n: (a / max(k, 1), b / max(k, 1)) for n, (a, b, k) in sums.items()}


def type_scores(layer_scores: dict[str, tuple[float, float]]) -> dict[str, float]:
    """NFN per module type: Σ_l mean‖Ŵẑ‖ / Σ_l mean‖Ŵû‖ over the type's layers."""
    totals: dict[str, list[float]] = {}
    for name, (real, rand) in layer_scores.items():
        t = totals.setdefault(module_type(name), [0.0, 0.0])
        t[0] += real
        t[1] += rand
    return {t: real / rand for t, (real, rand) in totals.items()}


def choose_types(scores: dict[str, float], k: int) -> list[str]:
    """The ``k`` module types with the lowest NFN (ties by name)."""
    return sorted(scores, key=lambda t: (scores[t], t))[:k]


def _plan(model: nn.Module, layer_cfgs: dict[str, Any], init_data: Iterable | None, init_batches: int
          ) -> dict[str, tuple[dict[str, Any], Any]]:
    """``MethodSpec.plan``: NFN of every candidate layer; the layers of the chosen types are adapted."""
    if init_data is None:
        raise ValueError("method 'plop' places adapters by scoring the layers on the task's data and needs "
                         "init_data (an iterable of batches, e.g. a DataLoader)")
    cfg = next(iter(layer_cfgs.values()))
    scores = type_scores(nfn_scores(model, list(layer_cfgs), init_data, init_batches, cfg.seed))
    chosen = set(choose_types(scores, cfg.plop_types))
    return {n: ({}, None) for n in layer_cfgs if module_type(n) in chosen}


class PLoPLayer(LoRALayer):
    """Plain LoRA on a layer PLoP placed (the placement is ``rw.adapt``'s plan)."""

    method = "plop"
    base_kinds = ("linear",)

    @classmethod
    def needs_grad(cls, config: Any) -> bool:
        """True: PLoP needs ``init_data`` (its placement pass scores the layers on it)."""
        return True


register(
    MethodSpec(
        "plop",
        "rank-allocation",
        "Hayou, Ghosh & Yu 2025, PLoP: Precise LoRA Placement for Efficient Finetuning of Large Models",
        PLoPConfig,
        PLoPLayer,
        summary="before training, NFN = mean‖Wẑ‖/mean‖Wû‖ (task inputs vs random directions) per module type "
                "from one pass over init_data; LoRA only on the plop_types lowest-NFN types",
        plan=_plan,
    )
)
