"""ElaLoRA (Chang et al. 2025, "ElaLoRA: Elastic & Learnable Low-Rank Adaptation for Efficient Model
Fine-Tuning").

Ranks are both pruned and expanded per layer while the model trains, by gradient-derived importance. The
layer is AdaLoRA's ΔW = s·P·diag(λ)·Q (``lora_B`` = P, ``lora_E`` = λ, ``lora_A`` = Q; s = α/r₀ fixed at
the initial rank r₀) whose number of components changes in place. After every optimizer step each
component i gets the sensitivity Iᵢ = |λᵢ·∂λᵢ| + mean_j |Qᵢⱼ·∂Qᵢⱼ| + mean_j |Pⱼᵢ·∂Pⱼᵢ|, smoothed as AdaLoRA's
(Ī ← β₁Ī + (1−β₁)I, Ū ← β₂Ū + (1−β₂)|I − Ī|, score Sᵢ = Īᵢ·Ūᵢ). Every ``adjust_interval`` steps from
``warmup`` on (until ``total_step − tfinal``), the ``adjust_k`` components with the lowest score over all
layers are removed, and the ``adjust_k`` layers with the highest mean component score each get one new
component (p, q ~ N(0, 0.02²), λ = 0, so ΔW does not move): the total rank stays r₀·(number of layers),
some layers grow and others shrink. A layer keeps at least one component.

Only the abstract was available (ranks pruned and expanded per layer by gradient-derived importance): the
score (AdaLoRA's sensitivity, smoothed per component), the budget-preserving swap of ``adjust_k``
components, the layer score (mean of its component scores), the new components' init and the schedule are
rankwise's choices. The optimizer state of a resized tensor is cleared (its moments restart).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..callbacks import TrainState, clear_optimizer_state
from ..checks import fraction, integer
from ..shards import full, require_resharding, set_parameter
from .adalora import smooth_importance_, svd_form_parameters
from .base import AdapterLayer, AlphaScale
from .init import InitContext
from .rank_control import MethodController, checkpoint_tensor
from .registry import MethodSpec, adapter_layers, adapter_state, register

__all__ = ["ElaLoRAConfig", "ElaLoRAController", "ElaLoRALayer", "rank_pattern"]


@dataclass
class ElaLoRAConfig(AlphaScale):
    """``r`` the initial rank per layer (r₀ of s = α/r₀), ``warmup`` steps before the first adjustment,
    ``adjust_interval`` steps between adjustments, ``adjust_k`` components pruned and added per adjustment,
    ``tfinal`` steps at the end without adjustment, ``total_step`` (None: the run's steps), ``beta1`` /
    ``beta2`` the EMA rates, ``alpha`` (None: α = r). ``rank_now`` is per-layer state (the current rank)."""

    r: int = 8
    warmup: int = 10
    adjust_interval: int = 10
    adjust_k: int = 2
    tfinal: int = 0
    total_step: int | None = None
    beta1: float = 0.85
    beta2: float = 0.85
    alpha: float | None = None
    rank_now: int | None = None

    def validate(self) -> None:
        super().validate()
        integer("warmup", self.warmup, 0)
        integer("adjust_interval", self.adjust_interval, 1)
        integer("adjust_k", self.adjust_k, 1)
        integer("tfinal", self.tfinal, 0)
        integer("total_step", self.total_step, 1, optional=True)
        fraction("beta1", self.beta1, allow_one=False, what="a number in (0, 1)")
        fraction("beta2", self.beta2, allow_one=False, what="a number in (0, 1)")
        integer("rank_now", self.rank_now, 1, optional=True)


class ElaLoRALayer(AdapterLayer):
    """``y = W x + s·P(λ ⊙ (Q x))`` with a changing number of components; init as AdaLoRA (λ = 0, P, Q ~
    N(0, 0.02²)), so the model starts at the base."""

    method = "elalora"

    def __init__(self, base_layer: nn.Module, config: ElaLoRAConfig, ctx: InitContext) -> None:
        super().__init__(base_layer, config)
        self.scale = config.scale
        svd_form_parameters(self, config.r if config.rank_now is None else config.rank_now, ctx)

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self.lora_B, self.lora_A * self.lora_E, self.scale

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ (self.lora_A * self.lora_E)) * self.scale

    def sensitivity(self) -> torch.Tensor:
        """Iᵢ = |λᵢ·∂λᵢ| + mean_j |Qᵢⱼ·∂Qᵢⱼ| + mean_j |Pⱼᵢ·∂Pⱼᵢ| (0 without gradients; whole matrices under
        FSDP2, gathered)."""
        out = torch.zeros(self.rank, device=self.lora_A.device)
        for p, reduce in ((self.lora_E, lambda t: t.view(-1)), (self.lora_A, lambda t: t.mean(dim=1)),
                          (self.lora_B, lambda t: t.mean(dim=0))):
            if p.grad is not None:
                out += reduce((full(p.detach()) * full(p.grad)).abs().float())
        return out

    @torch.no_grad()
    def keep_and_add(self, keep: torch.Tensor, add: int, generator: torch.Generator,
                     root: nn.Module | None = None) -> None:
        """Keep the components ``keep`` and append ``add`` new ones (p, q ~ N(0, 0.02²), λ = 0): in place.
        ``root``: the model, when FSDP2 sharded it (the factors are re-sharded at their new size)."""
        A, B, E = (full(p.detach()) for p in (self.lora_A, self.lora_B, self.lora_E))
        a = (torch.randn(add, self.in_features, generator=generator) * 0.02).to(A)
        b = (torch.randn(self.out_features, add, generator=generator) * 0.02).to(B)
        for name, value in (("lora_A", torch.cat([A[keep], a])), ("lora_B", torch.cat([B[:, keep], b], dim=1)),
                            ("lora_E", torch.cat([E[keep], E.new_zeros(add, 1)]))):
            set_parameter(root or self, self, name, value)

    @torch.no_grad()
    def resize(self, rows: int) -> None:
        """Zero tensors of ``rows`` components (to load a checkpoint into)."""
        self.lora_A.data = self.lora_A.data.new_zeros(rows, self.in_features)
        self.lora_B.data = self.lora_B.data.new_zeros(self.out_features, rows)
        self.lora_E.data = self.lora_E.data.new_zeros(rows, 1)

    def trainable_count(self) -> int:
        return self.rank * (self.in_features + self.out_features + 1)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", scale={self.scale:g}, rank={self.rank}"


def rank_pattern(model: nn.Module, name: str | None = None) -> dict[str, int]:
    """``{layer: current rank}`` of an ElaLoRA adapter."""
    return {n: m.rank for n, m in adapter_layers(model, name) if isinstance(m, ElaLoRALayer)}


class ElaLoRAController(MethodController):
    """ElaLoRA's elastic ranks. ``on_step_end`` (or :meth:`step` after ``optimizer.step()``, before
    ``zero_grad()``) smooths each component's sensitivity and, at the scheduled steps, removes the
    ``adjust_k`` lowest-scoring components and gives the ``adjust_k`` top-scoring layers one new each."""

    def __init__(self, model: nn.Module, name: str = "default", optimizer: torch.optim.Optimizer | None = None,
                 total_steps: int | None = None) -> None:
        super().__init__(model, name)
        self.config = cfg = self.adapter_config(ElaLoRAConfig)
        self.optimizer = optimizer
        self.layers = [(n, m) for n, m in adapter_layers(model, name) if isinstance(m, ElaLoRALayer)]
        require_resharding(model, "elalora")
        self.total_step = cfg.total_step if cfg.total_step is not None else total_steps
        if self.total_step is None:
            raise ValueError("ElaLoRA needs total_step (in the adapter's config) or the run's total_steps")
        if cfg.adjust_k > len(self.layers):
            raise ValueError(f"ElaLoRA's adjust_k={cfg.adjust_k} exceeds the {len(self.layers)} adapted layers")
        self.t = 0
        self.generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 29)
        self.ipt = [torch.zeros(m.rank) for _, m in self.layers]
        self.unc = [torch.zeros(m.rank) for _, m in self.layers]

    def schedule(self) -> str:
        c = self.config
        return (f"warmup={c.warmup}, adjust_interval={c.adjust_interval}, tfinal={c.tfinal}, "
                f"total_step={self.total_step}")

    def allocates_at(self, step: int) -> bool:
        """ElaLoRA adjusts ranks every ``adjust_interval`` steps from ``warmup`` to ``total_step − tfinal``."""
        c = self.config
        return c.warmup <= step <= self.total_step - c.tfinal and step % c.adjust_interval == 0

    def scores(self) -> list[torch.Tensor]:
        """Sᵢ = Īᵢ·Ūᵢ per component, per layer."""
        return [i * u for i, u in zip(self.ipt, self.unc, strict=True)]

    @torch.no_grad()
    def update_importance(self) -> None:
        for (_, m), ipt, unc in zip(self.layers, self.ipt, self.unc, strict=True):
            smooth_importance_(ipt, unc, m.sensitivity().cpu(), self.config.beta1, self.config.beta2)

    @torch.no_grad()
    def adjust(self) -> tuple[dict[str, int], dict[str, int]]:
        """Remove the ``adjust_k`` lowest-scoring components over all layers (a layer keeps one) and give the
        ``adjust_k`` layers with the highest mean score one new component each; returns ``({layer: removed},
        {layer: added})``."""
        scores = self.scores()
        flat = [(float(s), li, i) for li, layer_scores in enumerate(scores) for i, s in enumerate(layer_scores)]
        left = [m.rank for _, m in self.layers]
        removed: dict[int, list[int]] = {}
        for _, li, i in sorted(flat):
            if sum(len(v) for v in removed.values()) == self.config.adjust_k:
                break
            if left[li] > 1:
                removed.setdefault(li, []).append(i)
                left[li] -= 1
        means = torch.stack([s.mean() for s in scores])
        grow = torch.argsort(means, descending=True, stable=True)[: self.config.adjust_k].tolist()
        state = adapter_state(self.model, self.adapter_name)
        for li, (name, m) in enumerate(self.layers):
            out, add = removed.get(li, []), int(li in grow)
            if not out and not add:
                continue
            keep = torch.tensor([i for i in range(m.rank) if i not in out], dtype=torch.long)
            m.keep_and_add(keep.to(m.lora_A.device), add, self.generator, self.model)
            zeros = torch.zeros(add)
            self.ipt[li] = torch.cat([self.ipt[li][keep], zeros])
            self.unc[li] = torch.cat([self.unc[li][keep], zeros])
            if self.optimizer is not None:
                clear_optimizer_state(self.optimizer, [m.lora_A, m.lora_B, m.lora_E])
            state.overrides.setdefault(name, {})["rank_now"] = m.rank
        self.allocations += 1
        return ({self.layers[li][0]: len(v) for li, v in removed.items()},
                {self.layers[li][0]: 1 for li in grow})

    def before_load(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """A resume: give every layer the checkpoint's number of components before its values are loaded."""
        if model is not self.model:
            return
        state = adapter_state(self.model, self.adapter_name)
        for name, m in self.layers:
            m.resize(int(checkpoint_tensor(tensors, name, self.adapter_name, "lora_A").shape[0]))
            state.overrides.setdefault(name, {})["rank_now"] = m.rank

    def step(self) -> None:
        self.t += 1
        self.update_importance()
        if self.allocates_at(self.t):
            self.adjust()

    def on_train_begin(self, state: TrainState) -> None:
        self.optimizer = self.optimizer or state.optimizer

    def on_step_end(self, state: TrainState) -> None:
        self.t = state.step - 1
        self.step()
        state.log["elalora_ranks"] = sum(m.rank for _, m in self.layers)

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t, "allocations": self.allocations, "ipt": self.ipt, "unc": self.unc,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.t, self.allocations = state["t"], state["allocations"]
        self.ipt, self.unc = [t.clone() for t in state["ipt"]], [t.clone() for t in state["unc"]]
        self.generator.set_state(state["generator"])


def _controller(model: nn.Module, name: str, optimizer: Any, total_steps: int) -> ElaLoRAController:
    return ElaLoRAController(model, name, optimizer, total_steps)


register(
    MethodSpec(
        "elalora",
        "rank-allocation",
        "Chang et al. 2025, ElaLoRA: Elastic & Learnable Low-Rank Adaptation for Efficient Model Fine-Tuning",
        ElaLoRAConfig,
        ElaLoRALayer,
        summary="ΔW = P·Λ·Q whose per-layer ranks shrink (lowest smoothed sensitivity) and grow (top layers) "
                "during training at a fixed total",
        controller=_controller,
    )
)
