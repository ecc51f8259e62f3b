"""INT2.1's Low-Rank Error Correction (LREC) — Chai et al. 2023, "INT2.1: Towards Fine-Tunable
Quantized Large Language Models with Error Correction through Low-Rank Adaptation" (arXiv 2306.08162).

A compressed (quantized, factorized or pruned) model gets a LoRA adapter on its compressed layers,
trained so the compressed model follows its full-precision original: the loss is the distillation
of the original's next-token distribution into the compressed model,

    L = T² · mean over tokens of KL( softmax(z_fp / T) ‖ softmax(z_c / T) ),

z_fp the original's logits (no gradients), z_c the compressed model's with the adapter. Only the
adapter trains (the compressed base stays bit-identical); the result is an ordinary LoRA adapter
over the compressed base (INT2.1's "EMEF": LoRA fine-tuning of a quantized model), which saves,
exports to PEFT and can be fine-tuned further on a task.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import catalogue, checks
from ..adapters import adapt
from ..targets import Targets, linear_weight
from .eora import _compressed_layers, check_pair, eora
from .finetune import finetune

INITS = ("zero", "eora")
PAPER = ("Chai et al. 2023, INT2.1: Towards Fine-Tunable Quantized Large Language Models with Error Correction "
         "through Low-Rank Adaptation")


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None,
               temperature: float = 1.0) -> torch.Tensor:
    """T²·mean over the tokens of KL(softmax(teacher/T) ‖ softmax(student/T)) (the forward KL: the
    full-precision model's distribution is the target). ``mask`` (same leading shape as the logits,
    1 = counted) drops padding. Its gradient in the student logits is T·(p_student − p_teacher)/n."""
    t = float(temperature)
    log_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    per_token = (log_t.exp() * (log_t - log_s)).sum(-1)
    if mask is None:
        return per_token.mean() * t * t
    weights = mask.to(per_token.dtype)
    return (per_token * weights).sum() / weights.sum().clamp_min(1.0) * t * t


def _inputs(batch: Any) -> dict[str, Any]:
    if not isinstance(batch, dict):
        raise ValueError(f"LREC batches must be dicts of model inputs (input_ids, attention_mask, ...), got "
                         f"{type(batch).__name__}")
    return {k: v for k, v in batch.items() if k != "labels"}


def model_kl(model: nn.Module, original: nn.Module, data: Iterable, temperature: float = 1.0) -> float:
    """The LREC objective of ``model`` against ``original`` averaged over the batches of ``data``
    (no gradients; both models are put in eval mode)."""
    model.eval()
    original.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in data:
            inputs = _inputs(batch)
            total += float(distill_kl(model(**inputs).logits, original(**inputs).logits,
                                      inputs.get("attention_mask"), temperature))
            count += 1
    if count == 0:
        raise ValueError("data holds no batches")
    return total / count


@dataclass
class LRECState:
    """What :func:`lrec` did: the adapter ``name``, its rank, init, the layers, the per-step losses."""

    name: str
    r: int
    init: str
    layers: list[str]
    history: list[dict[str, Any]] = field(default_factory=list)


def lrec(
    model: nn.Module,
    original: nn.Module,
    data: Iterable,
    r: int = 16,
    *,
    steps: int = 100,
    lr: float = 1e-3,
    temperature: float = 1.0,
    init: str = "zero",
    name: str = "lrec",
    targets: Targets | None = None,
    adapter_dtype: Any = "float32",
    progress: bool = False,
) -> nn.Module:
    """Correct the compressed ``model``'s error with INT2.1's LREC (in place; returns ``model``): a
    LoRA adapter ``name`` of rank ``r`` on every compressed layer, trained ``steps`` AdamW steps
    (``lr``) on :func:`distill_kl` against ``original``'s logits on the batches of ``data`` (dicts
    of model inputs; ``labels`` are ignored: the original's distribution is the target).

    ``model``: from ``rw.quantize`` or ``rw.compress``, holding no adapters; ``original``: the
    uncompressed model (only read, frozen, eval mode). ``init="zero"``: LoRA's default (B = 0, the
    correction starts from the compressed model); ``"eora"``: EoRA's training-free compensation
    from the same batches, then LREC. ``model.rankwise_lrec[name]`` is an :class:`LRECState`.
    """
    checks.choice("init", init, INITS)
    checks.integer("r", r, 1)
    checks.integer("steps", steps, 1)
    checks.positive("lr", lr)
    checks.positive("temperature", temperature)
    check_pair(model, original, "LREC corrects")
    layers = [n for n, module, orig in _compressed_layers(model, original, targets)
              if not torch.equal(linear_weight(module).detach().to(linear_weight(orig).dtype),
                                 linear_weight(orig).detach())]
    if not layers:
        raise ValueError("every targeted layer of model equals original's: nothing to correct (is model the "
                         "compressed copy of original?)")
    if init == "eora":
        eora(model, original, data, r, name=name, targets=layers, adapter_dtype=adapter_dtype)  # adapts: base frozen
    else:
        adapt(model, "lora", r=r, targets=layers, name=name, trainable=None, adapter_dtype=adapter_dtype)
    original.eval()
    for p in original.parameters():
        p.requires_grad_(False)

    def loss(student: nn.Module, batch: Any) -> torch.Tensor:
        inputs = _inputs(batch)
        with torch.no_grad():
            teacher = original(**inputs).logits
        return distill_kl(student(**inputs).logits, teacher, inputs.get("attention_mask"), temperature)

    params = [p for p in model.parameters() if p.requires_grad]
    history = finetune(model, params, data, steps, lr, loss, progress)
    model.rankwise_lrec = {**getattr(model, "rankwise_lrec", {}),  # type: ignore[assignment]
                           name: LRECState(name, r, init, layers, history)}
    return model


catalogue.register(catalogue.MethodRecord(
    "int21", "quantization", PAPER,
    "LREC: a LoRA adapter on the compressed layers trained to match the full-precision original's next-token "
    "distribution (forward KL of the logits), base frozen",
    api="compensate", config=lrec, exports="peft-lora", spec=lrec,
    builder=lambda model, **options: lrec(model, **options),
))
