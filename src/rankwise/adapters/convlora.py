"""ConvLoRA + AdaBN (Aleem et al. 2024, "ConvLoRA and AdaBN based Domain Adaptation via Self-Training").

Target-domain adaptation of a frozen source CNN:

* **ConvLoRA**: a trainable low-rank ΔW = s·B·A on each frozen convolution (the LoRA conv layer:
  A as the base's convolution with r output channels, B a 1×1 convolution, PEFT's conv layout):
  ``rw.adapt(model, "convlora", targets="all-conv")`` (or suffixes / a regex naming convolutions).
* **AdaBN** (Li et al. 2016, "Revisiting Batch Normalization For Practical Domain Adaptation"): every
  BatchNorm keeps *target* running statistics of its own (``AdaBNLayer``), re-estimated on target data
  with the BatchNorm's affine parameters frozen. ``adabn="reset"`` starts them at (mean 0, var 1,
  count 0) so they come from target data only; ``"keep"`` starts from the source statistics.
  ``bn_momentum=None`` (default) is a cumulative average (after n batches: the mean of the n batch
  means / unbiased variances), a float is PyTorch's update r ← (1 − m)·r + m·batch. The statistics
  move in training mode (``model.train()`` or ``adabn_pass``); disabling the adapter gives the source
  statistics back, ``merge`` writes the target ones into the BatchNorm.
* **Self-training** (``self_training_loss``): the paper's objective, cross-entropy of a prediction
  against the hard pseudo-labels argmax of another (the adapted network's final prediction as
  teacher, an early segmentation head on early features as student; no target labels).

The authors' code trains the BatchNorm affine parameters too; the paper's AdaBN (and this module)
re-estimates statistics only. Their conv LoRA factorizes the kernel as a (out·k, r·k)·(r·k, in·k) pair
(loralib); here the PEFT conv factorization is used so the adapter exports to PEFT.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..batches import call_model
from ..checks import choice, fraction
from ..targets import base_modules
from .base import AdapterConfig, AdapterLayer, KeepsBaseLayer
from .init import InitContext
from .lora import LoRAConfig, LoRALayer
from .registry import MethodSpec, register

ADABN_STARTS = ("reset", "keep")


@dataclass
class ConvLoRAConfig(LoRAConfig):
    """LoRA options plus AdaBN's start of the target statistics (``adabn``: "reset" or "keep") and
    their update (``bn_momentum``: None = cumulative average, or a momentum in (0, 1])."""

    adabn: str = "reset"
    bn_momentum: float | None = None

    def validate(self) -> None:
        super().validate()
        choice("adabn", self.adabn, ADABN_STARTS)
        fraction("bn_momentum", self.bn_momentum, optional=True)


def batch_norms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every BatchNorm (1d / 2d / 3d) of ``model`` that tracks running statistics (one an adapter wraps
    under the wrapper's name, as ``targets.base_modules`` sees it)."""
    return [(n, m) for n, m in base_modules(model)
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


class AdaBNLayer(KeepsBaseLayer):
    """A frozen BatchNorm with target-domain running statistics of its own (AdaBN): the forward is the
    BatchNorm with ``running_mean`` / ``running_var`` of this layer (batch statistics and an update of
    them in training mode, as ``nn.BatchNorm``), the base's frozen γ, β and eps. No trainable parameter."""

    method = "convlora"
    base_kinds = ("batchnorm",)

    def __init__(self, base_layer: nn.Module, config: ConvLoRAConfig, ctx: InitContext | None = None) -> None:
        nn.Module.__init__(self)
        self._adopt(base_layer, config, "batchnorm")
        self.out_features = self.in_features = int(base_layer.num_features)
        self.momentum = config.bn_momentum
        keep = config.adabn == "keep"
        self.identity_at_init = keep  # reset statistics normalize differently until target data passed
        self.train(base_layer.training)  # an adapted model in eval mode keeps normalizing with running statistics
        mean, var = base_layer.running_mean, base_layer.running_var
        self.register_buffer("running_mean", mean.clone() if keep else torch.zeros_like(mean))
        self.register_buffer("running_var", var.clone() if keep else torch.ones_like(var))
        self.register_buffer("num_batches_tracked", base_layer.num_batches_tracked.clone() if keep
                             else torch.zeros_like(base_layer.num_batches_tracked))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch_names is not None:
            raise ValueError("per-example adapters (adapter_names=...) are not supported on AdaBN statistics "
                             "(method 'convlora' on a model with BatchNorm layers)")
        if self.merged or not self.enabled:
            return self.base_layer(x)
        factor = 0.0  # a checkpointing recompute normalizes with the batch again but leaves the statistics
        if self.updates_statistics:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        bn = self.base_layer
        return F.batch_norm(x, self.running_mean, self.running_var, bn.weight, bn.bias, self.training, factor, bn.eps)

    def delta_weight(self) -> torch.Tensor:
        raise ValueError("AdaBN changes BatchNorm statistics, not a weight; it has no ΔW")

    @torch.no_grad()
    def _swap(self) -> None:
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            ours, base = getattr(self, key), getattr(self.base_layer, key)
            held = ours.clone()
            ours.copy_(base)
            base.copy_(held)

    def merge(self) -> None:
        """The BatchNorm takes the target statistics (this layer keeps the source ones until ``unmerge``)."""
        if not self.merged:
            self._swap()
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self._swap()
            self.merged = False

    def peft_module_state(self) -> dict[str, torch.Tensor]:
        """The BatchNorm's state with the target statistics (PEFT holds it as a ``modules_to_save`` copy)."""
        state = dict(self.base_layer.state_dict())
        if not self.merged:
            state.update({k: getattr(self, k) for k in ("running_mean", "running_var", "num_batches_tracked")})
        return state

    def trainable_count(self) -> int:
        return 0

    def extra_repr(self) -> str:
        return f"method={self.method}, features={self.in_features}, momentum={self.momentum}"


class ConvLoRALayer(LoRALayer):
    """LoRA on a frozen ``nn.Conv1d`` / ``nn.Conv2d`` (the LoRA layer's conv path; linear and embedding
    targets are plain LoRA), with AdaBN layers on every BatchNorm of the model as companions."""

    method = "convlora"

    @classmethod
    def companions(cls, model: nn.Module, config: AdapterConfig) -> list[tuple[str, nn.Module, type[AdapterLayer]]]:
        return [(n, m, AdaBNLayer) for n, m in batch_norms(model)]


@torch.no_grad()
def adabn_pass(
    model: nn.Module, batches: Iterable[Any], forward: Callable[[nn.Module, Any], Any] | None = None
) -> nn.Module:
    """AdaBN's re-estimation: run ``batches`` (target-domain data) through ``model`` with only the AdaBN
    layers in training mode (dropout and everything else in eval mode), without gradients, so each
    BatchNorm's target statistics take the batches' statistics (per ``bn_momentum``); the modes are restored.
    ``forward(model, batch)`` defaults to ``model(**batch)`` for a dict, ``model(batch)`` otherwise."""
    layers = [m for m in model.modules() if isinstance(m, AdaBNLayer)]
    if not layers:
        raise ValueError("model has no AdaBN layers; adapt it with rw.adapt(model, 'convlora', ...) first")
    modes = {m: m.training for m in model.modules()}
    model.eval()
    for layer in layers:
        layer.train()
    try:
        for batch in batches:
            forward(model, batch) if forward is not None else call_model(model, batch)
    finally:
        for m, mode in modes.items():
            m.training = mode
    return model


def self_training_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, class_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Self-training on unlabeled target data (Aleem et al. 2024): cross-entropy of ``student_logits``
    against the pseudo-labels ŷ = argmax_c ``teacher_logits`` (constants: no gradient reaches the
    teacher), classes on dim 1 ((N, C) or (N, C, H, W) segmentation maps), optionally class-weighted."""
    if student_logits.shape != teacher_logits.shape or student_logits.dim() < 2:
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)} must have the same shape (N, C, ...)")
    pseudo = teacher_logits.detach().argmax(dim=1)
    return F.cross_entropy(student_logits, pseudo, weight=class_weights)


register(
    MethodSpec(
        "convlora",
        "adapter",
        "Aleem et al. 2024, ConvLoRA and AdaBN based Domain Adaptation via Self-Training",
        ConvLoRAConfig,
        ConvLoRALayer,
        summary="LoRA on frozen convolutions + AdaBN (BatchNorm statistics re-estimated on target data, affine "
                "frozen); adabn_pass, self_training_loss (argmax pseudo-labels)",
    )
)
