"""LaMDA (Azizi et al. 2024, "LaMDA: Large Model Fine-Tuning via Spectrally Decomposed Low-Dimensional
Adaptation", EMNLP 2024 Findings).

A LoRA path with a small square matrix S between the two projections (paper Sec. 3):

    ΔW = s · PMB · S · PMA,    PMA ∈ ℝ^{r×in} frozen,  S ∈ ℝ^{r×r} trained,  PMB ∈ ℝ^{out×r} trained, then frozen

PMA starts as LoRA's A (``nn.Linear`` init, U(±1/√in)) and never trains, S as ``nn.Linear(r, r)``'s init,
PMB at 0 (ΔW = 0), s = α/r, as in the authors' code. PMB is frozen gradually, one rank column at a
time from the first: at optimizer step k its first t = ⌊k / (η·T)⌋ columns are frozen (T the run's
total steps, η = ``freeze_eta``; the authors' schedule), and once t ≥ r the whole PMB stops training
(``requires_grad=False``, the trainable count drops to r²). :class:`LaMDAFreeze` is the loop callback
that does it (``config.training_callbacks``). ΔW is the rank-r product (PMB·S)·PMA: PEFT LoRA export.
LaMDA++'s spectrum-based rank allocation is not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..callbacks import Callback, TrainState
from ..checks import fraction
from ..rng import kaiming_uniform_, layer_generator
from ..shards import editing, full
from .base import AdapterLayer, AlphaConfig
from .init import InitContext
from .registry import MethodSpec, adapter_layers, register


@dataclass
class LaMDAConfig(AlphaConfig):
    """LaMDA: ``alpha`` the LoRA α (None: r; scale α/r); ``freeze_eta`` η: one more column of PMB is
    frozen every η·T steps (authors' default 0.3)."""

    freeze_eta: float = 0.3

    def validate(self) -> None:
        super().validate()
        fraction("freeze_eta", self.freeze_eta, what="in (0, 1]")

    def training_callbacks(self, model: nn.Module, adapter_name: str, optimizer: Any = None) -> list[Callback]:
        """What ``rankwise.train.train`` runs with this adapter: the gradual freezing of PMB."""
        return [LaMDAFreeze(model, adapter_name)]


class LaMDALayer(AdapterLayer):
    """Frozen buffer ``lamda_A`` (PMA, r×in); trainable ``lamda_S`` (r×r) and ``lamda_B`` (PMB, out×r)."""

    method = "lamda"

    def __init__(self, base_layer: nn.Module, config: LaMDAConfig, ctx: InitContext) -> None:
        super().__init__(base_layer, config)
        r, device, dtype = config.r, self.base_weight.device, self.adapter_dtype
        self.scale = config.scale
        g = layer_generator(config.seed, ctx.name)
        a = kaiming_uniform_(torch.empty(r, self.in_features), generator=g)
        core = kaiming_uniform_(torch.empty(r, r), generator=g)
        self.register_buffer("lamda_A", a.to(device=device, dtype=dtype))
        self.lamda_S = nn.Parameter(core.to(device=device, dtype=dtype))
        self.lamda_B = nn.Parameter(torch.zeros(self.out_features, r, device=device, dtype=dtype))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self.lamda_B @ self.lamda_S, self.lamda_A, self.scale

    def delta_weight(self) -> torch.Tensor:
        return (self.lamda_B @ self.lamda_S @ self.lamda_A) * self.scale

    def trainable_count(self) -> int:
        r = self.config.r
        return r * r + (self.out_features * r if self.lamda_B.requires_grad else 0)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", scale={self.scale:g}, freeze_eta={self.config.freeze_eta:g}"


def frozen_columns(step: int, total_steps: int, eta: float) -> int:
    """t = ⌊k / (η·T)⌋: how many leading columns of PMB are frozen at (0-based) step k of T."""
    return int(step / (eta * total_steps)) if total_steps > 0 else 0


class LaMDAFreeze(Callback):
    """Freezes the leading columns of every LaMDA PMB as the schedule says (see module doc): their
    gradient is zeroed and their values restored after the step (the optimizer's momentum and weight
    decay cannot move them), and PMB leaves training once all r columns are frozen. In a hand-written
    loop call ``before_step(k, T)`` after ``backward()`` and ``after_step()`` after ``optimizer.step()``."""

    def __init__(self, model: nn.Module, adapter_name: str | None = None) -> None:
        self.layers = [layer for _, layer in adapter_layers(model, adapter_name) if isinstance(layer, LaMDALayer)]
        if not self.layers:
            raise ValueError("model has no LaMDA layers to freeze (rw.adapt(model, 'lamda') first)")
        self._held: list[tuple[nn.Parameter, int, torch.Tensor]] = []

    @torch.no_grad()
    def before_step(self, step: int, total_steps: int) -> None:
        """Zero the gradient of the frozen columns of PMB and keep their values; drop PMB when all are."""
        self._held = []
        for layer in self.layers:
            b = layer.lamda_B
            t = frozen_columns(step, total_steps, float(layer.config.freeze_eta))
            if t >= b.shape[1]:
                b.requires_grad_(False)
                b.grad = None
            elif t > 0 and b.grad is not None:  # on FSDP2 shards: the gathered columns, each rank its rows
                with editing(b.grad) as g:
                    g[:, :t] = 0
                self._held.append((b, t, full(b.detach())[:, :t].clone()))

    @torch.no_grad()
    def after_step(self) -> None:
        """Put the frozen columns back as they were before the step."""
        for b, t, cols in self._held:
            with editing(b) as v:
                v[:, :t] = cols
        self._held = []

    def on_after_backward(self, state: TrainState) -> None:
        self.before_step(state.step, state.total_steps)

    def on_step_end(self, state: TrainState) -> None:
        self.after_step()


register(
    MethodSpec(
        "lamda",
        "adapter",
        "Azizi et al. 2024, LaMDA: Large Model Fine-Tuning via Spectrally Decomposed Low-Dimensional Adaptation",
        LaMDAConfig,
        LaMDALayer,
        summary="ΔW = s·PMB·S·PMA: frozen PMA, trained r×r S, PMB frozen column by column every η·T steps "
                "(LaMDAFreeze)",
    )
)
