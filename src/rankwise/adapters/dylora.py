"""DyLoRA (Valipour et al. 2023, "DyLoRA: Parameter Efficient Tuning of Pre-trained Models using Dynamic
Search-Free Low-Rank Adaptation").

LoRA factors A (r×in), B (out×r) trained so that every prefix rank works: at each step a rank
b ~ U{r_min, ..., r} is sampled (the same b in every layer, for every micro-batch of the step) and the
layer computes the truncated update

    h = W₀x + (α/b)·B[:, :b]·A[:b]·x                                  (DyLoRA Eq. 5)

so the loss L_{DY↓b} trains only the first b rows of A and columns of B (nested-dropout ordering: the
first components must work on their own). ``frozen=True`` is the paper's "frozen" variant: only the
b-th row of A and the b-th column of B are updated (Eq. 7-8), the first b−1 are held as trained.
The paper's update touches only W↓b; a plain optimizer step would still move the other entries by
momentum and weight decay, so the controller restores them after the step (their optimizer moments
keep decaying as with zero gradients).

After training one adapter serves every rank b in [r_min, r]: :func:`truncate_rank` keeps A[:b],
B[:, :b] with scale α/b (PEFT export then writes rank b, ``lora_alpha`` = α). Outside training, or
without the controller, the layer uses its full rank. Init as LoRA: A as ``nn.Linear``, B = 0.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ..callbacks import TrainState
from ..checks import integer
from ..rng import kaiming_uniform_, layer_generator
from ..shards import editing, full
from .base import AdapterLayer, AlphaScale
from .init import InitContext
from .rank_control import MethodController, scaled_update
from .registry import MethodSpec, adapter_layers, adapter_state, register

__all__ = ["DyLoRAConfig", "DyLoRAController", "DyLoRALayer", "truncate_rank"]


@dataclass
class DyLoRAConfig(AlphaScale):
    """``r`` the largest rank, ``r_min`` the smallest sampled rank, ``alpha`` (None: α = r) with scale
    α/b at rank b, ``frozen``: update only the b-th component at a step with rank b."""

    r_min: int = 1
    alpha: float | None = None
    frozen: bool = False

    def validate(self) -> None:
        super().validate()
        integer("r_min", self.r_min, 1, self.r)
        if not isinstance(self.frozen, bool):
            raise ValueError(f"frozen={self.frozen!r} must be True or False")


class DyLoRALayer(AdapterLayer):
    """``y = W x + (α/b)·B[:, :b](A[:b] x)``; b = ``sampled`` while training (set by the controller),
    else the full rank r. Trainable ``lora_A`` (r×in) and ``lora_B`` (out×r)."""

    method = "dylora"

    def __init__(self, base_layer: nn.Module, config: DyLoRAConfig, ctx: InitContext) -> None:
        super().__init__(base_layer, config)
        r, dtype, device = config.r, self.adapter_dtype, self.base_weight.device
        self.lora_A = nn.Parameter(torch.zeros(r, self.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=dtype, device=device))
        self.sampled: int | None = None
        if not ctx.skip:
            kaiming_uniform_(self.lora_A, generator=layer_generator(config.seed, ctx.name))

    @property
    def rank(self) -> int:
        """The rank b the forward uses now."""
        r = self.lora_A.shape[0]
        return min(self.sampled, r) if (self.training and self.sampled is not None) else r

    @property
    def scale(self) -> float:
        return self.config.alpha_value / self.rank

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        b = self.rank
        a, bb = self.lora_A[:b], self.lora_B[:, :b]
        if self.config.frozen and self.training and self.sampled is not None and b > 1:
            a = torch.cat([a[: b - 1].detach(), a[b - 1:]])
            bb = torch.cat([bb[:, : b - 1].detach(), bb[:, b - 1:]], dim=1)
        return bb, a, self.config.alpha_value / b

    def delta_weight(self) -> torch.Tensor:
        b, a, s = self.factors()
        return (b @ a) * s

    def updated_rows(self) -> slice:
        """The components the current step trains: [0, b), or [b−1, b) when ``frozen``."""
        b = self.rank
        return slice(b - 1 if self.config.frozen else 0, b)

    @torch.no_grad()
    def truncate(self, b: int) -> None:
        """Keep the first ``b`` components (same Parameter objects), scale α/b."""
        alpha = self.config.alpha_value
        self.lora_A.data = self.lora_A.data[:b].clone()
        self.lora_B.data = self.lora_B.data[:, :b].clone()
        self.config = replace(self.config, r=b, r_min=min(self.config.r_min, b), alpha=alpha)

    def trainable_count(self) -> int:
        return self.lora_A.shape[0] * (self.in_features + self.out_features)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", r={self.lora_A.shape[0]}, sampled={self.sampled}"


def _layers(model: nn.Module, name: str | None) -> list[tuple[str, DyLoRALayer]]:
    return [(n, m) for n, m in adapter_layers(model, name) if isinstance(m, DyLoRALayer)]


def truncate_rank(model: nn.Module, b: int, name: str | None = None) -> nn.Module:
    """Cut a DyLoRA adapter to rank ``b`` in place: A[:b], B[:, :b], scale α/b in every layer (the
    per-rank model DyLoRA trained; ``rw.export_peft`` then writes rank b). Returns ``model``."""
    layers = _layers(model, name)
    if not layers:
        raise ValueError("truncate_rank: the model has no DyLoRA adapter" + (f" named {name!r}" if name else ""))
    state = adapter_state(model, name)
    cfg: DyLoRAConfig = state.config  # type: ignore[assignment]
    integer("b", b, cfg.r_min, cfg.r)
    for layer_name, m in layers:
        m.truncate(min(b, m.lora_A.shape[0]))
        if layer_name in state.overrides:
            state.overrides[layer_name].update(r=m.config.r, r_min=m.config.r_min, alpha=m.config.alpha)
    state.config = replace(cfg, r=b, r_min=min(cfg.r_min, b), alpha=cfg.alpha_value)
    return model


class DyLoRAController(MethodController):
    """Samples the step's rank b ~ U{r_min, ..., r} (seeded by the config's ``seed``) and sets it in every
    layer; after the optimizer step it restores the entries the step must not change (beyond b, and
    below b−1 when ``frozen``), kept in :meth:`keep_untrained` between ``backward()`` and the step.
    The first b is drawn when the controller is built; :meth:`step` (after ``optimizer.step()``)
    draws the next. At the end of training the layers go back to their full rank."""

    def __init__(self, model: nn.Module, name: str = "default") -> None:
        super().__init__(model, name)
        self.config = cfg = self.adapter_config(DyLoRAConfig)
        self.layers = _layers(model, name)
        self.generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 29)
        self.t = 0
        self.b = 0
        self.history: list[int] = []
        self._kept: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.sample()

    def schedule(self) -> str:
        return f"rank sampled from {self.config.r_min}..{self.config.r} after every step"

    def sample(self) -> int:
        """Draw the next step's rank and set it in every layer."""
        self.b = int(torch.randint(self.config.r_min, self.config.r + 1, (1,), generator=self.generator))
        for _, m in self.layers:
            m.sampled = self.b
        return self.b

    @torch.no_grad()
    def keep_untrained(self) -> None:
        """Keep A, B as they are before the optimizer step (restored outside the step's rows after it)."""
        self._kept = [(full(m.lora_A.detach()).clone(), full(m.lora_B.detach()).clone()) for _, m in self.layers]

    @torch.no_grad()
    def restore_untrained(self) -> None:
        if self._kept is None:
            return
        for (_, m), (a0, b0) in zip(self.layers, self._kept, strict=True):
            rows = m.updated_rows()
            trained = torch.zeros(a0.shape[0])
            trained[rows] = 1.0
            with editing(m.lora_A) as A:  # whole under FSDP2 (gathered), this rank's rows written back
                A.copy_(scaled_update(A, a0, trained))
            with editing(m.lora_B) as B:
                B.copy_(scaled_update(B, b0, trained, dim=1))
        self._kept = None

    def step(self) -> None:
        self.restore_untrained()
        self.t += 1
        self.history.append(self.b)
        self.allocations += 1
        self.sample()

    def on_after_backward(self, state: TrainState) -> None:
        self.keep_untrained()
        state.log["dylora_rank"] = self.b

    def on_train_end(self, state: TrainState) -> None:
        for _, m in self.layers:
            m.sampled = None
        super().on_train_end(state)

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t, "b": self.b, "allocations": self.allocations, "history": list(self.history),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.t, self.allocations, self.history = state["t"], state["allocations"], list(state["history"])
        self.generator.set_state(state["generator"])
        self.b = state["b"]
        for _, m in self.layers:
            m.sampled = self.b


def _controller(model: nn.Module, name: str, optimizer: Any, total_steps: int) -> DyLoRAController:
    return DyLoRAController(model, name)


register(
    MethodSpec(
        "dylora",
        "rank-allocation",
        "Valipour et al. 2023, DyLoRA: Parameter Efficient Tuning of Pre-trained Models using Dynamic "
        "Search-Free Low-Rank Adaptation",
        DyLoRAConfig,
        DyLoRALayer,
        summary="each step trains the truncated (α/b)·B[:, :b]·A[:b] for a sampled b; any prefix rank works after",
        controller=_controller,
    )
)
