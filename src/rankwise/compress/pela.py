"""PELA — Guo, Wang & Kankanhalli 2024, "PELA: Learning Parameter-Efficient Models with Low-Rank
Approximation" (CVPR 2024, arXiv 2310.10700; official code github.com/guoyang9/PELA).

1. Low-rank approximation: each linear W (out×in) becomes two linears with ``r = out·in // (c·(out+in))``
   (compression ratio c = 1/``ratio``), initialized from the truncated SVD ``W ≈ (U_r √Σ_r)(√Σ_r V_rᵀ)``.
2. Intermediate pre-training of the low-rank *student* against the original model as a frozen
   *teacher*, with loss (official ``engine.train_one_epoch``)

       L = L_task + α·L_fm + β·L_sr + γ·L_wpr,
       L_fm  = mean_ℓ MSE(h_ℓ^student, h_ℓ^teacher)          (feature distillation over block outputs)
       L_sr  = MSE(logits^student, logits^teacher)
       L_wpr = mean_layers (‖U V − W_teacher‖_∞ − ε)²         (weight-perturbation regularizer)

   Only the student is updated; the teacher (the original backbone) is frozen throughout.
3. Downstream fine-tuning of the student (any rankwise trainer).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..callbacks import Callback, TrainState
from ..checks import choice, integer, non_negative, positive
from ..targets import Targets
from .factorized import FactorizedLinear, factorized_layers
from .finetune import finetune
from .svd import SVDCache, factorize_layers, shapes_of, svd_ranks, target_linears

TRAINABLE = ("all", "factors")


@dataclass
class PELAConfig:
    """Low-rank stage: ``rank`` (None = from ``ratio``). Intermediate stage (run by ``rw.compress``
    when ``steps > 0`` and data is given): ``lr``, ``kd_alpha`` (α), ``kd_beta`` (β), ``wpr_weight``
    (γ), ``wpr_eps`` (ε), ``task_weight``, ``trainable`` ("all" student parameters or the "factors")."""

    rank: int | None = None
    lr: float = 1e-4
    kd_alpha: float = 1.0
    kd_beta: float = 1.0
    wpr_weight: float = 1.0
    wpr_eps: float = 1e-3
    task_weight: float = 1.0
    trainable: str = "all"

    def __post_init__(self) -> None:
        integer("rank", self.rank, 1, optional=True)
        positive("lr", self.lr)
        for name in ("kd_alpha", "kd_beta", "wpr_weight", "wpr_eps", "task_weight"):
            non_negative(name, getattr(self, name))
        choice("trainable", self.trainable, TRAINABLE)


def pela_compress(
    model: nn.Module,
    ratio: float,
    targets: Targets = "all-linear",
    cache: SVDCache | None = None,
    progress: bool = False,
    rank: int | None = None,
) -> dict[str, int | None]:
    """Stage 1: factorize every targeted linear at PELA's uniform rank (in place); return ranks."""
    found = target_linears(model, targets)
    ranks = svd_ranks(shapes_of(found), ratio, rank)
    factorize_layers(model, ranks, cache, progress)
    return dict(ranks)


def weight_perturbation(
    student: nn.Module, teacher: nn.Module, eps: float = 1e-3, names: Iterable[str] | None = None
) -> torch.Tensor:
    """``mean_layers (‖U V − W_teacher‖_∞ − ε)²`` over the student's factorized layers, where ‖·‖_∞ is
    the largest absolute entry (the official ``inf_norm``)."""
    layers = [(n, student.get_submodule(n)) for n in names] if names is not None else factorized_layers(student)
    if not layers:
        raise ValueError("the student has no factorized layer; compress it with method='pela' first")
    terms = []
    for name, layer in layers:
        if not isinstance(layer, FactorizedLinear):
            raise ValueError(f"student module '{name}' is not a FactorizedLinear")
        w_t = teacher.get_submodule(name).weight
        gap = (layer.U @ layer.V - w_t.to(layer.U.dtype)).abs().max()
        terms.append((gap - eps) ** 2)
    return torch.stack(terms).mean()


def _features(out: Any) -> tuple[torch.Tensor, ...]:
    hidden = getattr(out, "hidden_states", None)
    if not hidden:
        raise ValueError("the model returned no hidden_states; PELA's feature distillation needs them")
    return tuple(hidden[1:]) if len(hidden) > 1 else tuple(hidden)


def pela_losses(
    student: nn.Module,
    teacher: nn.Module,
    batch: dict,
    kd_alpha: float = 1.0,
    kd_beta: float = 1.0,
    wpr_weight: float = 1.0,
    wpr_eps: float = 1e-3,
    task_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """The PELA objective on one batch: ``{"task", "feature", "logits", "wpr", "total"}`` (the teacher
    runs under ``no_grad``); ``total = task_weight·task + α·feature + β·logits + γ·wpr``."""
    if not isinstance(batch, dict):
        raise ValueError("PELA batches must be dicts of model inputs (input_ids, attention_mask, labels, ...)")
    out_s = student(**batch, output_hidden_states=True)
    with torch.no_grad():
        out_t = teacher(**batch, output_hidden_states=True)
    feats_s, feats_t = _features(out_s), _features(out_t)
    feature = torch.stack([F.mse_loss(s, t) for s, t in zip(feats_s, feats_t, strict=True)]).mean()
    logits = F.mse_loss(out_s.logits, out_t.logits)
    task = out_s.loss if getattr(out_s, "loss", None) is not None else feature.new_zeros(())
    wpr = weight_perturbation(student, teacher, wpr_eps) if wpr_weight > 0 else feature.new_zeros(())
    total = task_weight * task + kd_alpha * feature + kd_beta * logits + wpr_weight * wpr
    return {"task": task, "feature": feature, "logits": logits, "wpr": wpr, "total": total}


class _Distill(Callback):
    """PELA's objective as the loop's loss (:func:`pela_losses` against the teacher) and, after each
    optimizer step, the step's loss components in ``history`` and ``on_step(step, record)``."""

    def __init__(self, teacher: nn.Module, weights: tuple[float, ...],
                 on_step: Callable[[int, dict[str, float]], None] | None) -> None:
        self.teacher, self.weights, self.on_step = teacher, weights, on_step
        self.losses: dict[str, torch.Tensor] = {}
        self.history: list[dict[str, float]] = []

    def loss(self, student: nn.Module, batch: Any) -> torch.Tensor:
        self.losses = pela_losses(student, self.teacher, batch, *self.weights)
        return self.losses["total"]

    def on_step_end(self, state: TrainState) -> None:
        record = {k: float(v.detach()) for k, v in self.losses.items()}
        self.history.append(record)
        if self.on_step is not None:
            self.on_step(state.step - 1, record)


def pela_distill(
    student: nn.Module,
    teacher: nn.Module,
    data: Iterable,
    steps: int,
    lr: float = 1e-4,
    kd_alpha: float = 1.0,
    kd_beta: float = 1.0,
    wpr_weight: float = 1.0,
    wpr_eps: float = 1e-3,
    task_weight: float = 1.0,
    trainable: str = "all",
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    progress: bool = False,
) -> list[dict[str, float]]:
    """Stage 2: ``steps`` AdamW steps on the PELA objective. The teacher is put in eval mode with
    every parameter frozen (it stays bit-identical); ``trainable="factors"`` trains only the
    factorized layers' parameters. Returns the per-step loss components."""
    integer("steps", steps, 0)
    PELAConfig(lr=lr, kd_alpha=kd_alpha, kd_beta=kd_beta, wpr_weight=wpr_weight,
               wpr_eps=wpr_eps, task_weight=task_weight, trainable=trainable)
    if student is teacher:
        raise ValueError("student and teacher must be different models (the teacher is the original, uncompressed one)")
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    if trainable == "factors":
        keep = {id(p) for _, layer in factorized_layers(student) for p in layer.parameters()}
        for p in student.parameters():
            p.requires_grad_(id(p) in keep)
    else:
        for p in student.parameters():
            p.requires_grad_(True)
    if steps == 0:
        student.eval()
        return []
    params = [p for p in student.parameters() if p.requires_grad]
    distill = _Distill(teacher, (kd_alpha, kd_beta, wpr_weight, wpr_eps, task_weight), on_step)
    finetune(student, params, data, steps, lr, distill.loss, progress, [distill])
    return distill.history
