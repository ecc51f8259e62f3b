"""BiLoRA (Qiang et al. 2024, "BiLoRA: A Bi-level Optimization Framework for Overfitting-Resilient
Low-Rank Adaptation of Large Pre-trained Models").

ΔW = s·P·Λ·Q (pseudo-SVD: P out×r ``lora_B``, Λ = diag(λ) ``lora_E``, Q r×in ``lora_A``; AdaLoRA's
layer, λ = 0 at init) trained bi-level on two splits of the training data:

    lower level:  P, Q ← step on  L(P, Q, Λ; D₁) + γ·R(P, Q),   R = AdaLoRA's ‖PᵀP − I‖ + ‖QQᵀ − I‖
    upper level:  Λ ← step on  L(P, Q, Λ; D₂)

so P and Q never see D₂'s gradient and Λ never sees D₁'s. The levels are solved by first-order
alternation (the usual DARTS-style approximation: P, Q are treated as fixed in Λ's gradient); the
paper's exact hypergradient and its inner-step schedule are not reproduced here (not knowable from
the abstract; the form of R is AdaLoRA's, which BiLoRA's pseudo-SVD follows).

Where D₁ and D₂ come from (:class:`BiLoRALevels`, attached by the loop):
``upper_every = k`` (default 2): the training stream is split by step, every k-th step's batch is a
D₂ batch (an upper-level step: only λ moves) and the others are D₁ batches (lower-level steps: only
P, Q move). With an unshuffled loader whose length is a multiple of k each example always falls in
the same split. Or pass ``BiLoRALevels(model, d2_data=loader)`` in ``callbacks``: every step then
takes P, Q's gradient from the loop's batch (D₁) and λ's from the next ``d2_data`` batch (D₂).
Other trainable modules (a classification head) train on every batch. The learned update is a
rank-r product (PEFT LoRA export: B = P, A = Λ·Q, scale s).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..batches import LossFn, loss_of, model_device, move_batch
from ..callbacks import TrainState
from ..checks import integer, non_negative
from ..shards import gradients
from .adalora import AdaLoRALayer, orthogonality_backward
from .base import AlphaConfig
from .rank_control import MethodController
from .registry import MethodSpec, adapter_layers, register


@dataclass
class BiLoRAConfig(AlphaConfig):
    """BiLoRA options: ``r``, ``alpha`` (None: α = r; s = α/r), ``orth_reg_weight`` γ of the
    orthogonality regulariser on P, Q, and ``upper_every`` k: every k-th training batch is a D₂ batch."""

    r: int = 8
    orth_reg_weight: float = 0.1
    upper_every: int = 2

    def validate(self) -> None:
        super().validate()
        non_negative("orth_reg_weight", self.orth_reg_weight)
        integer("upper_every", self.upper_every, 2)

    def training_callbacks(self, model: nn.Module, adapter_name: str, optimizer: Any = None) -> list[Any]:
        """What ``rankwise.train.train`` runs with this adapter: the two levels' gradient routing."""
        return [BiLoRALevels(model, adapter_name=adapter_name)]


class BiLoRALayer(AdaLoRALayer):
    """AdaLoRA's pseudo-SVD layer ``y = W x + s·P(Λ(Q x))`` (P, Q ~ N(0, 0.02²), λ = 0 at init)."""

    method = "bilora"


class BiLoRALevels(MethodController):
    """Routes each step's gradients to one level (module doc): after ``backward()``, :meth:`route`
    drops D₂-step gradients of P, Q (and D₁-step gradients of λ), adds γ∇R to P, Q on D₁ steps and,
    with ``d2_data``, sets λ's gradient from a D₂ batch. A dropped gradient is None, so the optimizer
    leaves that tensor and its state alone. Passed in ``callbacks`` it replaces the automatic one."""

    def __init__(self, model: nn.Module, d2_data: Iterable[Any] | None = None, adapter_name: str = "default",
                 loss_fn: LossFn | None = None) -> None:
        super().__init__(model, adapter_name)
        self.layers = [m for _, m in adapter_layers(model, adapter_name) if isinstance(m, BiLoRALayer)]
        if not self.layers:
            raise ValueError("model has no BiLoRA layers (rw.adapt(model, 'bilora') first)")
        cfg: BiLoRAConfig = self.layers[0].config
        self.upper_every, self.weight = cfg.upper_every, cfg.orth_reg_weight
        self.d2_data, self.loss_fn = d2_data, loss_fn
        self._d2: Iterator[Any] | None = None
        self.steps = 0

    def lower(self) -> list[nn.Parameter]:
        return [p for m in self.layers for p in (m.lora_A, m.lora_B)]

    def upper(self) -> list[nn.Parameter]:
        return [m.lora_E for m in self.layers]

    def is_upper_step(self, step: int) -> bool:
        """Whether the batch of (0-based) step ``step`` is a D₂ batch (split-by-step mode)."""
        return self.d2_data is None and step % self.upper_every == self.upper_every - 1

    def route(self, step: int | None = None) -> str:
        """Keep one level's gradients for this step (``step``: 0-based; None = this callback's count).
        Returns ``"upper"`` or ``"lower"`` (``"both"`` with ``d2_data``)."""
        step = self.steps if step is None else step
        self.steps = step + 1
        if self.is_upper_step(step):
            for p in self.lower():
                p.grad = None
            return "upper"
        self._regularize()
        if self.d2_data is None:
            for p in self.upper():
                p.grad = None
            return "lower"
        for p, g in zip(self.upper(), self._d2_gradients(), strict=True):
            p.grad = g
        return "both"

    def _regularize(self) -> None:
        """P, Q's gradients += γ∇R (of the gathered factors under FSDP2)."""
        orthogonality_backward(self.layers, self.weight)

    def _d2_gradients(self) -> list[torch.Tensor | None]:
        """∂L(D₂ batch)/∂λ for every layer, from the next batch of ``d2_data`` (cycled); under FSDP2 the mean
        over the ranks of their D₂ batches' gradients (:func:`rankwise.shards.gradients`)."""
        assert self.d2_data is not None
        if self._d2 is None:
            self._d2 = iter(self.d2_data)
        try:
            batch = next(self._d2)
        except StopIteration:  # the next pass over D₂
            self._d2 = iter(self.d2_data)
            batch = next(self._d2)
        loss = loss_of(self.model, move_batch(batch, model_device(self.model)), self.loss_fn)
        return gradients(loss, self.upper(), self.model)

    def on_train_begin(self, state: TrainState) -> None:
        if self.loss_fn is None:
            self.loss_fn = state.loss_fn

    def on_after_backward(self, state: TrainState) -> None:
        state.log["bilora_level"] = self.route(state.step)

    def on_step_end(self, state: TrainState) -> None:
        """Nothing after the step: the routing happened before it."""

    def on_train_end(self, state: TrainState) -> None:
        """No rank changes to check (MethodController's check is for rank controllers)."""

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])


register(
    MethodSpec(
        "bilora",
        "training-dynamics",
        "Qiang et al. 2024, BiLoRA: A Bi-level Optimization Framework for Overfitting-Resilient Low-Rank "
        "Adaptation of Large Pre-trained Models",
        BiLoRAConfig,
        BiLoRALayer,
        summary="ΔW = s·P·Λ·Q; P, Q step only on D₁ batches (+ orthogonality), Λ only on D₂ batches (every "
                "upper_every-th batch, or a second loader): first-order bi-level (the loop routes the gradients)",
    )
)
