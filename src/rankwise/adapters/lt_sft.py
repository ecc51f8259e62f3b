"""LT-SFT — Ansell et al. 2022, "Composable Sparse Fine-Tuning for Cross-Lingual Transfer" (ACL 2022;
official code github.com/cambridgeltl/composable-sft), Sec. 3: Lottery-Ticket Sparse Fine-Tuning.

Phase 1 fine-tunes every parameter, θ₀ → θ₁. The K entries of the target matrices whose values changed
most, the top-K of |θ₁ − θ₀| over all of them together, become the mask; every parameter is reset to θ₀
and phase 2 fine-tunes only the masked entries. The result is the sparse difference vector φ = θ₂ − θ₀
(:mod:`.sparse_delta`): it composes with other such vectors by addition, W₀ + φ_task + φ_lang, and the
model keeps its architecture.

Phase 1 runs inside ``rw.adapt`` (the method's ``plan``, over ``init_data``: ``phase1_steps`` AdamW
steps at ``phase1_lr``, cycling through the batches), then phase 2 is the ordinary training of the
adapter (``rankwise train --method lt_sft``). K is the sum of the layers' budgets (``density`` or, by
default, a rank-r LoRA's count r·(in + out) per matrix), shared out by the global top-K, so layers get
different counts (saved per layer as ``nnz``; a layer with none is not adapted).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from ..batches import default_loss
from ..checks import integer, positive
from ..targets import is_linear4bit, linear_weight
from .base import AdapterConfig
from .init import InitContext
from .registry import MethodSpec, register
from .sparse_delta import SparseDeltaConfig, SparseDeltaLayer


@dataclass
class LTSFTConfig(SparseDeltaConfig):
    """``phase1_steps`` / ``phase1_lr``: the full fine-tuning of phase 1 (AdamW over ``init_data``)."""

    phase1_steps: int = 100
    phase1_lr: float = 1e-4

    def validate(self) -> None:
        super().validate()
        integer("phase1_steps", self.phase1_steps, 1)
        positive("phase1_lr", self.phase1_lr)


def full_finetune(model: nn.Module, data: Iterable, steps: int, lr: float) -> None:
    """Phase 1: ``steps`` AdamW steps on every floating parameter of ``model`` (in place), cycling ``data``."""
    params = [p for p in model.parameters() if p.is_floating_point()]
    flags = [p.requires_grad for p in params]
    was_training = model.training
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    try:
        for batch in itertools.islice(itertools.cycle(data), steps):
            default_loss(model, batch).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
        model.train(was_training)


def top_k_changes(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """``{name: sorted flat indices}`` of the ``k`` largest |after − before| over all matrices together."""
    names = list(before)
    changes = torch.cat([(after[n].float() - before[n].float()).abs().flatten().cpu() for n in names])
    chosen = changes.topk(min(k, changes.numel())).indices
    bounds = torch.tensor([0] + list(itertools.accumulate(before[n].numel() for n in names)))
    owner = torch.bucketize(chosen, bounds[1:], right=True)
    return {n: (chosen[owner == i] - bounds[i]).sort().values for i, n in enumerate(names)}


def lt_sft_plan(model: nn.Module, layer_cfgs: dict[str, AdapterConfig], init_data: Iterable | None,
                init_batches: int) -> dict[str, tuple[dict[str, Any], Any]]:
    """Phase 1 and the mask: fine-tune everything, take the global top-K of |θ₁ − θ₀| over the target
    weights, reset every parameter to θ₀; ``{layer: ({"nnz": count}, its indices)}`` for the layers
    that got entries."""
    if init_data is None:
        raise ValueError("method 'lt_sft' fine-tunes the whole model first (phase 1) and needs init_data "
                         "(an iterable of batches, e.g. a DataLoader)")
    quantized = [n for n in layer_cfgs if is_linear4bit(model.get_submodule(n))]
    if quantized:
        raise ValueError(
            f"method 'lt_sft' fine-tunes the target weights themselves in phase 1, which 4-bit quantized layers "
            f"({quantized[:3]}) cannot; adapt the full-precision model"
        )
    cfgs = cast(dict[str, LTSFTConfig], layer_cfgs)
    cfg = next(iter(cfgs.values()))
    weights = {n: linear_weight(model.get_submodule(n)) for n in cfgs}
    budget = sum(c.count(*weights[n].shape) for n, c in cfgs.items())
    theta0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    before = {n: w.detach().clone() for n, w in weights.items()}
    full_finetune(model, init_data, cfg.phase1_steps, cfg.phase1_lr)
    after = {n: linear_weight(model.get_submodule(n)).detach() for n in layer_cfgs}
    chosen = top_k_changes(before, after, budget)
    model.load_state_dict(theta0)  # the reset: phase 2 starts from θ₀
    return {n: ({"nnz": int(idx.numel())}, idx) for n, idx in chosen.items() if idx.numel()}


class LTSFTLayer(SparseDeltaLayer):
    """The sparse delta on the mask phase 1 chose (``ctx.extra["plan"]``); values start at 0 (θ₀)."""

    method = "lt_sft"

    @classmethod
    def needs_grad(cls, config: Any) -> bool:
        """True: LT-SFT needs ``init_data`` (its phase 1 runs on it in ``MethodSpec.plan``)."""
        return True

    def initial_index(self, ctx: InitContext, k: int) -> torch.Tensor:
        return ctx.extra["plan"]


register(
    MethodSpec(
        "lt_sft",
        "sparse-finetuning",
        "Ansell et al. 2022, Composable Sparse Fine-Tuning for Cross-Lingual Transfer",
        LTSFTConfig,
        LTSFTLayer,
        export="none",
        summary="phase 1 full fine-tune; mask = global top-K of |θ₁ − θ₀|; reset to θ₀; phase 2 trains the "
                "masked entries only (a sparse delta that composes by addition)",
        plan=lt_sft_plan,
    )
)
