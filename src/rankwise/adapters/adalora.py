"""AdaLoRA (Zhang et al. 2023, "AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning").

ΔW = s·P·Λ·Q with P (out×r, ``lora_B``), Λ = diag(λ) (``lora_E``, r×1) and Q (r×in, ``lora_A``),
s = α/(r + 1e-5) (PEFT's ``scaling / ranknum``). Training adds w·R(P, Q) to the loss, with the
orthogonality regulariser R = mean over matrices of ‖PᵀP − I‖_F and ‖QQᵀ − I‖_F. After each optimizer
step the :class:`AdaLoRAController` scores every weight by its sensitivity I = |w·∇w|, smoothed
Ī ← β₁Ī + (1−β₁)I and its uncertainty Ū ← β₂Ū + (1−β₂)|I − Ī|, score Ī·Ū; triplet i of a layer scores
S(λᵢ) + mean_j S(Qᵢⱼ) + mean_j S(Pⱼᵢ), and the triplets at or below the k-th smallest score over all
layers (k = initial budget − budget) have λᵢ set to 0. The total budget follows the cubic schedule
b(t) = b_T + (b₀ − b_T)·(1 − (t − t_i)/(T − t_f − t_i))³ from b₀ = Σ r_l to b_T = target_r·n between
``tinit`` and ``total_step − tfinal`` (every ``deltaT`` steps); from ``total_step − tfinal`` on, the
final pattern is re-applied at every step.

Semantics and defaults are PEFT 0.21.2's ``AdaLoraConfig`` (``r`` is PEFT's ``init_r``, also accepted
by that name) so a run here and a PEFT run take the same steps (tests/adapters/test_adalora.py).
Deliberate differences: ``alpha=None`` means α = r (rankwise's LoRA convention; PEFT's default is
``lora_alpha=8``); ``total_step=None`` takes the loop's number of steps; a budget equal to the initial
one masks nothing (PEFT's ``kthvalue(k=0)`` fails); the regulariser's gradient is added after the task
loss's backward (the same gradient as adding it to the loss, and it works with any ``loss_fn``) and
only while the model trains. The regulariser is the Frobenius norm, not its square as written in the
paper's Eq. 4, as in the paper's own code and PEFT.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..callbacks import TrainState
from ..checks import fraction, integer, non_negative
from ..rng import layer_generator
from ..shards import backward_full, editing, full
from .base import AdapterLayer, AlphaScale
from .init import InitContext
from .rank_control import MethodController, rank_at_least_one
from .registry import MethodSpec, adapter_layers, register

__all__ = ["AdaLoRAConfig", "AdaLoRAController", "AdaLoRALayer", "budget_schedule", "orthogonal_regularizer",
           "orthogonality", "orthogonality_backward", "rank_pattern", "smooth_importance_", "svd_form_parameters"]


@dataclass
class AdaLoRAConfig(AlphaScale):
    """AdaLoRA options, PEFT's names: ``r`` (= ``init_r``) initial rank per layer, ``target_r`` the
    average final rank, ``tinit`` / ``tfinal`` the steps before / after the budget decreases,
    ``deltaT`` steps between allocations, ``beta1`` / ``beta2`` the EMA rates of sensitivity and
    uncertainty, ``orth_reg_weight`` the regulariser's coefficient, ``total_step`` the schedule's
    length (None: the run's steps), ``alpha`` (None: α = r)."""

    r: int = 12
    init_r: int | None = None
    target_r: int = 8
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1  # noqa: N815  (PEFT's name)
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    alpha: float | None = None

    def __post_init__(self) -> None:
        integer("init_r", self.init_r, 1, optional=True)
        if self.init_r is not None:  # PEFT's name for the initial rank: kept as r
            self.r, self.init_r = self.init_r, None
        super().__post_init__()

    def validate(self) -> None:
        super().validate()
        integer("target_r", self.target_r, 1)
        integer("tinit", self.tinit, 0)
        integer("tfinal", self.tfinal, 0)
        integer("deltaT", self.deltaT, 1)
        integer("total_step", self.total_step, 1, optional=True)
        fraction("beta1", self.beta1, allow_one=False, what="a number in (0, 1)")
        fraction("beta2", self.beta2, allow_one=False, what="a number in (0, 1)")
        non_negative("orth_reg_weight", self.orth_reg_weight)

    @property
    def scale(self) -> float:
        """s = α/(r + 1e-5): PEFT's ``scaling / (ranknum + 1e-5)`` with ranknum = r, fixed while λ is masked."""
        return self.alpha_value / (self.r + 1e-5)


class AdaLoRALayer(AdapterLayer):
    """``y = W x + s·P(Λ(Q x))``: trainable ``lora_A`` = Q (r×in), ``lora_E`` = λ (r×1), ``lora_B`` = P (out×r).
    Init as PEFT: λ = 0 (so the model starts at the base), P, Q ~ N(0, 0.02²)."""

    method = "adalora"

    def __init__(self, base_layer: nn.Module, config: AdaLoRAConfig, ctx: InitContext) -> None:
        super().__init__(base_layer, config)
        self.scale = config.scale
        svd_form_parameters(self, config.r, ctx)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self.lora_B, self.lora_A * self.lora_E, self.scale

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ (self.lora_A * self.lora_E)) * self.scale

    def kept(self) -> torch.Tensor:
        """Indices of the triplets with λᵢ ≠ 0 (the others add nothing to ΔW)."""
        return torch.nonzero(full(self.lora_E.detach()).view(-1)).view(-1)

    def peft_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(P_k, Λ_k Q_k, s)`` over the kept triplets only: a LoRA pair of rank = the allocated rank
        (one zero triplet when none is kept, since PEFT needs r ≥ 1); same ΔW as :meth:`factors`."""
        keep = self.kept()
        b, a = rank_at_least_one(self.lora_B[:, keep], (self.lora_A * self.lora_E)[keep])
        return b, a, self.scale

    def trainable_count(self) -> int:
        return self.config.r * (self.in_features + self.out_features + 1)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", scale={self.scale:g}, kept={int(self.kept().numel())}"


def svd_form_parameters(layer: AdapterLayer, rows: int, ctx: InitContext) -> None:
    """Give ``layer`` AdaLoRA's ``lora_A`` = Q (rows×in), ``lora_E`` = λ (rows×1), ``lora_B`` = P (out×rows),
    initialized as PEFT's AdaLoRA (λ = 0, P, Q ~ N(0, 0.02²) from the seed and the layer name) unless
    ``ctx.skip``. Shared by AdaLoRA and ElaLoRA."""
    dtype, device = layer.adapter_dtype, layer.base_weight.device
    layer.lora_A = nn.Parameter(torch.zeros(rows, layer.in_features, dtype=dtype, device=device))
    layer.lora_E = nn.Parameter(torch.zeros(rows, 1, dtype=dtype, device=device))
    layer.lora_B = nn.Parameter(torch.zeros(layer.out_features, rows, dtype=dtype, device=device))
    if not ctx.skip:
        g = layer_generator(layer.config.seed, ctx.name)
        with torch.no_grad():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.02)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.02)


@torch.no_grad()
def smooth_importance_(ipt: torch.Tensor, unc: torch.Tensor, sens: torch.Tensor, beta1: float, beta2: float) -> None:
    """In place: Ī ← β₁Ī + (1−β₁)I (smoothed sensitivity), Ū ← β₂Ū + (1−β₂)|I − Ī| (uncertainty); the
    importance is then S = Ī·Ū (AdaLoRA's Eq. 8-10). Shared with IncreLoRA, which applies it to one
    sensitivity per module."""
    ipt.mul_(beta1).add_(sens, alpha=1 - beta1)
    unc.mul_(beta2).add_((sens - ipt).abs(), alpha=1 - beta2)


def orthogonality(factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """R = mean over the matrices of ‖Q Qᵀ − I‖_F and ‖Pᵀ P − I‖_F (AdaLoRA's Eq. 4, unsquared as in its code);
    ``factors`` = Q₁, P₁, Q₂, P₂, ... (``lora_A``, ``lora_B`` of each layer)."""
    terms = []
    for q, p in zip(factors[::2], factors[1::2], strict=True):
        for gram in (q @ q.T, p.T @ p):
            eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
            terms.append(torch.linalg.matrix_norm(gram - eye, "fro"))
    return torch.stack(terms).mean()


def orthogonal_regularizer(layers: Sequence[AdapterLayer]) -> torch.Tensor:
    """:func:`orthogonality` of the layers' ``lora_A`` (Q) and ``lora_B`` (P)."""
    return orthogonality([t for m in layers for t in (m.lora_A, m.lora_B)])


def orthogonality_backward(layers: Sequence[AdapterLayer], weight: float) -> float:
    """Add the gradient of w·R (:func:`orthogonality`) to the layers' ``lora_A`` / ``lora_B`` gradients and
    return w·R; under FSDP2 R is taken over the gathered factors (:func:`rankwise.shards.backward_full`)."""
    if weight == 0 or not layers:
        return 0.0
    factors = [t for m in layers for t in (m.lora_A, m.lora_B)]
    return float(backward_full(lambda *f: weight * orthogonality(f), factors))


def budget_schedule(step: int, init_budget: int, target_budget: int, tinit: int, tfinal: int, total_step: int,
                    delta_t: int) -> tuple[int, bool]:
    """``(budget, allocate)`` at ``step``: the initial budget up to ``tinit``, the target after
    ``total_step − tfinal``, in between b_T + (b₀ − b_T)·(1 − (t − tinit)/(T − tfinal − tinit))³
    (truncated to an integer), allocating every ``delta_t`` steps (AdaLoRA's Eq. 12)."""
    if step <= tinit:
        return init_budget, False
    if step > total_step - tfinal:
        return target_budget, True
    progress = 1 - (step - tinit) / (total_step - tfinal - tinit)
    return int((init_budget - target_budget) * progress**3 + target_budget), step % delta_t == 0


def rank_pattern(model: nn.Module, name: str | None = None) -> dict[str, int]:
    """``{layer: allocated rank}`` of an AdaLoRA adapter: the number of λᵢ ≠ 0 in each layer."""
    return {n: int(layer.kept().numel()) for n, layer in adapter_layers(model, name) if isinstance(layer, AdaLoRALayer)}


class AdaLoRAController(MethodController):
    """AdaLoRA's budget allocation (PEFT's ``update_and_allocate``), run after every optimizer step.

    ``on_after_backward`` adds the orthogonality regulariser's gradient; ``on_step_end`` (or
    :meth:`step` in a hand-written loop, after ``optimizer.step()`` and before ``zero_grad()``)
    updates the importance and masks Λ to the scheduled budget. ``total_steps``: the run's length,
    used when the config's ``total_step`` is None; a schedule that cannot finish within it is a
    ValueError here, before training."""

    def __init__(self, model: nn.Module, name: str = "default", total_steps: int | None = None) -> None:
        super().__init__(model, name)
        self.config = cfg = self.adapter_config(AdaLoRAConfig)
        self.layers = [(n, m) for n, m in adapter_layers(model, name) if isinstance(m, AdaLoRALayer)]
        self.total_step = cfg.total_step if cfg.total_step is not None else total_steps
        if self.total_step is None:
            raise ValueError("AdaLoRA needs total_step (in the adapter's config) or the run's total_steps")
        self.init_budget = sum(m.config.r for _, m in self.layers)
        self.target_budget = cfg.target_r * len(self.layers)
        self._check(total_steps)
        self.t = 0  # steps taken (step() counts them; the loop's on_step_end sets it)
        self.pattern: list[torch.Tensor] | None = None  # per layer: which triplets the final allocation kept
        self.final_done = False
        self.reset_importance()

    def schedule(self) -> str:
        c = self.config
        return (f"tinit={c.tinit}, tfinal={c.tfinal}, deltaT={c.deltaT}, total_step={self.total_step}: allocations "
                f"every {c.deltaT} step(s) from step {c.tinit + 1}, final at step {self.total_step - c.tfinal}")

    def _check(self, total_steps: int | None) -> None:
        c, final = self.config, self.total_step - self.config.tfinal
        if c.tinit >= final:
            raise ValueError(f"AdaLoRA's schedule has no budgeting phase: tinit={c.tinit} >= total_step - tfinal = "
                             f"{self.total_step} - {c.tfinal}; decrease tinit / tfinal or increase total_step")
        if total_steps is not None and final > total_steps:
            raise ValueError(f"AdaLoRA's final allocation is at step total_step - tfinal = {final}, after the run's "
                             f"{total_steps} steps (max_steps); set total_step <= {total_steps + c.tfinal} or "
                             "train longer")
        if self.target_budget >= self.init_budget:
            raise ValueError(f"AdaLoRA's target budget target_r={c.target_r} x {len(self.layers)} layers = "
                             f"{self.target_budget} is not below the initial budget {self.init_budget} (r per layer); "
                             "choose target_r < r")

    def params(self) -> list[tuple[nn.Parameter, nn.Parameter, nn.Parameter]]:
        return [(m.lora_A, m.lora_E, m.lora_B) for _, m in self.layers]

    def reset_importance(self) -> None:
        """Ī and Ū of every A, E, B entry back to 0 (lazily created at the first update)."""
        self.ipt_avg: list[list[torch.Tensor]] | None = None
        self.unc_avg: list[list[torch.Tensor]] | None = None

    @torch.no_grad()
    def update_importance(self) -> None:
        """I = |w·∇w| of every entry; Ī ← β₁Ī + (1−β₁)I; Ū ← β₂Ū + (1−β₂)|I − Ī| (AdaLoRA's Eq. 8-10)."""
        b1, b2 = self.config.beta1, self.config.beta2
        params = self.params()
        if self.ipt_avg is None or self.unc_avg is None:
            self.ipt_avg = [[torch.zeros(p.shape, dtype=p.dtype, device=p.device) for p in trip] for trip in params]
            self.unc_avg = [[torch.zeros(p.shape, dtype=p.dtype, device=p.device) for p in trip] for trip in params]
        for trip, ipts, uncs in zip(params, self.ipt_avg, self.unc_avg, strict=True):
            for p, ipt, unc in zip(trip, ipts, uncs, strict=True):  # whole matrices under FSDP2 (gathered)
                sens = (full(p) * full(p.grad)).abs() if p.grad is not None else torch.zeros_like(ipt)
                smooth_importance_(ipt, unc, sens, b1, b2)

    def triplet_scores(self) -> list[torch.Tensor]:
        """Per layer, S(λᵢ) + mean_j S(Qᵢⱼ) + mean_j S(Pⱼᵢ) with S = Ī·Ū (AdaLoRA's Eq. 7 and 11)."""
        assert self.ipt_avg is not None and self.unc_avg is not None
        out = []
        for (ia, ie, ib), (ua, ue, ub) in zip(self.ipt_avg, self.unc_avg, strict=True):
            out.append((ie * ue).view(-1) + (ia * ua).mean(dim=1) + (ib * ub).mean(dim=0))
        return out

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> list[torch.Tensor]:
        """Zero λᵢ of every triplet scoring at or below the (b₀ − budget)-th smallest score over all
        layers; returns the kept triplets per layer."""
        scores = self.triplet_scores()
        k = self.init_budget - budget
        threshold = torch.kthvalue(torch.cat(scores), k).values if k > 0 else None
        kept = []
        for (_, layer), s in zip(self.layers, scores, strict=True):
            keep = s > threshold if threshold is not None else torch.ones_like(s, dtype=torch.bool)
            with editing(layer.lora_E) as e:
                e.masked_fill_(~keep.view(-1, 1), 0.0)
            kept.append(keep)
        self.allocations += 1
        return kept

    @torch.no_grad()
    def apply_pattern(self) -> None:
        """Re-apply the final allocation (λᵢ = 0 outside it) after a step of the final phase."""
        assert self.pattern is not None
        for (_, layer), keep in zip(self.layers, self.pattern, strict=True):
            with editing(layer.lora_E) as e:
                e.masked_fill_(~keep.view(-1, 1), 0.0)

    def allocate(self, step: int) -> None:
        """PEFT's ``update_and_allocate(step)``: importance before the final phase, a mask at each
        scheduled allocation, the final allocation at ``total_step − tfinal``, then its pattern."""
        self.t = step
        c, final = self.config, self.total_step - self.config.tfinal
        if step < final:
            self.update_importance()
            budget, allocate = budget_schedule(step, self.init_budget, self.target_budget, c.tinit, c.tfinal,
                                               self.total_step, c.deltaT)
            if allocate:
                self.mask_to_budget(budget)
        elif step == final:
            if self.ipt_avg is None:  # a schedule whose final allocation is its first step: score it now
                self.update_importance()
            self.pattern = self.mask_to_budget(self.target_budget)
            self.final_done = True
            self.reset_importance()
        elif self.pattern is not None:
            self.apply_pattern()

    def step(self) -> None:
        self.allocate(self.t + 1)

    def regularizer_backward(self) -> float:
        """Add the gradient of w·R (orthogonality) to the adapters' gradients; returns w·R."""
        return orthogonality_backward([m for _, m in self.layers], self.config.orth_reg_weight)

    def on_after_backward(self, state: TrainState) -> None:
        if self.model.training:
            state.log["orth_reg"] = self.regularizer_backward()

    def on_step_end(self, state: TrainState) -> None:
        self.allocate(state.step)
        state.log["adalora_rank"] = sum(int(m.kept().numel()) for _, m in self.layers)

    def on_train_end(self, state: TrainState) -> None:
        super().on_train_end(state)
        if not self.final_done:
            warnings.warn(f"AdaLoRA's run ended at step {state.step} before its final allocation ({self.schedule()}): "
                          "the total rank has not reached its target", stacklevel=2)

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t, "allocations": self.allocations, "final_done": self.final_done,
                "pattern": self.pattern, "ipt_avg": self.ipt_avg, "unc_avg": self.unc_avg}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.t, self.allocations, self.final_done = state["t"], state["allocations"], state["final_done"]
        self.pattern, self.ipt_avg, self.unc_avg = state["pattern"], state["ipt_avg"], state["unc_avg"]


def _controller(model: nn.Module, name: str, optimizer: Any, total_steps: int) -> AdaLoRAController:
    return AdaLoRAController(model, name, total_steps)


register(
    MethodSpec(
        "adalora",
        "rank-allocation",
        "Zhang et al. 2023, AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning",
        AdaLoRAConfig,
        AdaLoRALayer,
        summary="ΔW = P·Λ·Q; Λ entries masked by EMA sensitivity along a cubic budget schedule",
        controller=_controller,
    )
)
