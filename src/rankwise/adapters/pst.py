"""PST — Li et al. 2022, "Parameter-Efficient Sparsity for Large Language Models Fine-Tuning" (IJCAI
2022, arXiv 2205.11005): sparse-aware fine-tuning with a parameter-efficient importance score.

The weight is W' = W₀ + β·U V (a LoRA update, U random, V = 0) and its importance combines the
data-free magnitude with a data-driven score parameterised by small matrices:

    S = |W'| + α₁·A B + α₂·(R 1ᵀ + 1 Cᵀ),

A (out×r_m, random), B (r_m×in, 0) the low-rank part and R (out), C (in) the structured row/column
part (both 0 at init). The layer computes ``y = (M ⊙ W') x + b`` where M drops the ⌊s·out·in⌋ entries
of lowest S (s the current sparsity); M's gradient passes straight through to S (straight-through
estimator), so A, B, R, C learn from ∂L/∂(M⊙W') ⊙ W'. The sparsity follows the cubic schedule of the
authors' code: s₀ for the first ``initial_warmup`` fraction of steps, s for the last
``final_warmup``, ``s + (s₀ − s)(1 − (t − t_w)/(T − t_w − t_f))³`` in between
(:class:`PSTSchedule`, attached by ``rankwise.train.train``). Merging writes the pruned M ⊙ W'.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..callbacks import Callback, TrainState
from ..checks import fraction, integer, positive
from ..linalg import kth_smallest
from ..rng import layer_generator
from .base import AdapterConfig
from .init import InitContext
from .registry import MethodSpec, adapter_layers, register
from .unmerge import KeepsBaseOnMerge


@dataclass
class PSTConfig(AdapterConfig):
    """``r`` (rank of U V), ``beta`` (β), ``mask_rank`` (r_m of A B; None = r), ``alpha1`` / ``alpha2``
    (weights of the low-rank and the row/column score), ``sparsity`` (final s), ``initial_sparsity``
    (s₀) and the schedule's ``initial_warmup`` / ``final_warmup`` (fractions of the run's steps)."""

    beta: float = 1.0
    mask_rank: int | None = None
    alpha1: float = 1.0
    alpha2: float = 1.0
    sparsity: float = 0.5
    initial_sparsity: float = 0.0
    initial_warmup: float = 0.1
    final_warmup: float = 0.3

    def validate(self) -> None:
        super().validate()
        positive("beta", self.beta)
        integer("mask_rank", self.mask_rank, 1, optional=True)
        positive("alpha1", self.alpha1)
        positive("alpha2", self.alpha2)
        fraction("sparsity", self.sparsity, allow_zero=True, allow_one=False)
        fraction("initial_sparsity", self.initial_sparsity, allow_zero=True, allow_one=False)
        fraction("initial_warmup", self.initial_warmup, allow_zero=True)
        fraction("final_warmup", self.final_warmup, allow_zero=True)
        if self.initial_warmup + self.final_warmup >= 1:
            raise ValueError(f"initial_warmup={self.initial_warmup!r} + final_warmup={self.final_warmup!r} "
                             "must be below 1")

    def training_callbacks(self, model: nn.Module, adapter_name: str, optimizer: Any = None) -> list[Callback]:
        """What ``rankwise.train.train`` runs with this adapter: the sparsity schedule."""
        return [PSTSchedule(model, adapter_name)]


def pst_sparsity(step: int, total_steps: int, config: PSTConfig) -> float:
    """The cubic sparsity schedule (module doc) at ``step`` of ``total_steps``."""
    s0, s = config.initial_sparsity, config.sparsity
    warm, final = config.initial_warmup * total_steps, config.final_warmup * total_steps
    if step <= warm:
        return s0
    if step > total_steps - final:
        return s
    return s + (s0 - s) * (1 - (step - warm) / (total_steps - warm - final)) ** 3


class _Binarize(torch.autograd.Function):
    """Keep-mask dropping the ⌊s·numel⌋ lowest scores; the gradient passes straight through."""

    @staticmethod
    def forward(ctx: Any, scores: torch.Tensor, sparsity: float) -> torch.Tensor:
        drop = int(scores.numel() * sparsity)
        if not drop:
            return torch.ones_like(scores)
        # keep what lies above the drop-th smallest score (a selection: ``linalg.kth_smallest``, 12x faster than
        # topk at 590k scores); topk only when ties at that value would drop more than ⌊s·numel⌋ entries
        flat = scores.flatten()
        mask = (scores > kth_smallest(flat, drop)).to(scores.dtype)
        if int(mask.sum()) != flat.numel() - drop:
            mask = torch.ones_like(scores)
            mask.view(-1)[flat.topk(drop, largest=False).indices] = 0
        return mask

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        return grad, None


class PSTLayer(KeepsBaseOnMerge):  # W₀ cannot be read back from M ⊙ W'
    """``y = (M ⊙ W') x + b`` with W' = W₀ + β·U V and M from S (module doc); trainable ``weight_U``,
    ``weight_V``, ``score_A``, ``score_B``, ``score_R``, ``score_C``."""

    method = "pst"
    config: PSTConfig
    stackable = False  # merging prunes the base: another adapter sharing it would read M ⊙ W' as its W₀

    def __init__(self, base_layer: nn.Module, config: PSTConfig, ctx: InitContext) -> None:
        super().__init__(base_layer, config)
        r, rm = config.r, config.mask_rank or config.r
        out_f, in_f = self.out_features, self.in_features
        dtype, device = self.adapter_dtype, self.base_weight.device
        self.weight_U = nn.Parameter(torch.zeros(out_f, r, dtype=dtype, device=device))
        self.weight_V = nn.Parameter(torch.zeros(r, in_f, dtype=dtype, device=device))
        self.score_A = nn.Parameter(torch.zeros(out_f, rm, dtype=dtype, device=device))
        self.score_B = nn.Parameter(torch.zeros(rm, in_f, dtype=dtype, device=device))
        self.score_R = nn.Parameter(torch.zeros(out_f, dtype=dtype, device=device))
        self.score_C = nn.Parameter(torch.zeros(in_f, dtype=dtype, device=device))
        self.sparsity = 0.0  # the current s (a Python float: set by PSTSchedule / set_sparsity)
        if not ctx.skip:
            gen = layer_generator(config.seed, ctx.name)
            with torch.no_grad():
                self.weight_U.copy_(torch.randn(out_f, r, generator=gen))
                self.score_A.copy_(torch.randn(out_f, rm, generator=gen))

    def set_sparsity(self, sparsity: float) -> None:
        self.sparsity = fraction("sparsity", sparsity, allow_zero=True, allow_one=False)

    def scores(self, weight: torch.Tensor) -> torch.Tensor:
        """S = |W'| + α₁·A B + α₂·(R 1ᵀ + 1 Cᵀ)."""
        c = self.config
        return (weight.abs() + c.alpha1 * self.score_A @ self.score_B
                + c.alpha2 * (self.score_R.unsqueeze(1) + self.score_C.unsqueeze(0)))

    def delta_weight(self) -> torch.Tensor:
        """M ⊙ W' − W₀, written M ⊙ β·U V − (1 − M) ⊙ W₀ (no cancellation of W₀ in low precision). On a linear
        base of the adapter dtype the layer runs one GEMM with W₀ + this = M ⊙ W' (``AdapterLayer``'s dense
        route), not the base's and the delta's."""
        w0 = self.frozen_weight().to(self.adapter_dtype)
        update = self.config.beta * self.weight_U @ self.weight_V
        mask = _Binarize.apply(self.scores(w0 + update), self.sparsity)
        return mask * update - (1 - mask) * w0

    def trainable_count(self) -> int:
        r, rm = self.config.r, self.config.mask_rank or self.config.r
        return (r + rm) * (self.in_features + self.out_features) + self.in_features + self.out_features

    def extra_repr(self) -> str:
        return super().extra_repr() + f", sparsity={self.sparsity:g}"


class PSTSchedule(Callback):
    """Sets every PST layer's sparsity from the cubic schedule before each step (see module doc)."""

    def __init__(self, model: nn.Module, adapter_name: str | None = None) -> None:
        self.layers = [layer for _, layer in adapter_layers(model, adapter_name) if isinstance(layer, PSTLayer)]
        if not self.layers:
            raise ValueError("model has no PST layers (rw.adapt(model, 'pst') first)")

    def update(self, step: int, total_steps: int) -> None:
        for layer in self.layers:
            layer.set_sparsity(pst_sparsity(step, total_steps, layer.config))

    def on_train_begin(self, state: TrainState) -> None:
        self.update(state.step, state.total_steps)

    def on_step_end(self, state: TrainState) -> None:
        self.update(state.step, state.total_steps)


register(
    MethodSpec(
        "pst",
        "sparse+low-rank",
        "Li et al. 2022, Parameter-Efficient Sparsity for Large Language Models Fine-Tuning",
        PSTConfig,
        PSTLayer,
        export="none",
        summary="W' = W₀ + βUV pruned by S = |W'| + α₁AB + α₂(R⊕C) (straight-through), cubic sparsity "
                "schedule (PSTSchedule); merging writes the pruned weight",
    )
)
