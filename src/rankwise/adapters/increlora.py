"""IncreLoRA (Zhang et al. 2023, "IncreLoRA: Incremental Parameter Allocation Method for
Parameter-Efficient Fine-tuning").

The adapter is AdaLoRA's SVD-like form ΔW = s·P·Λ·Q = s·Σᵢ λᵢ pᵢ qᵢᵀ (``lora_B`` = P, ``lora_E`` = λ,
``lora_A`` = Q; s = α/r₀ fixed), but the rank *grows*: every ``incre_interval`` steps after
``init_warmup`` the ``top_h`` modules with the highest importance get ``incre_rank_num`` new rank-1
components each, until the total rank reaches the budget b_T = ``target_r``·(number of layers).

* Module importance (the released code's score): I_k = Σ|ΔW_k ⊙ ∇_{ΔW_k} L| / √(d_out·d_in), smoothed as
  AdaLoRA's sensitivity: Ī ← β₁Ī + (1−β₁)I, Ū ← β₂Ū + (1−β₂)|I − Ī|, S_k = Ī·Ū
  (:func:`adalora.smooth_importance_`, shared).
* Advance learning: each module holds ``incre_rank_num`` *reserve* components (p, q ~ N(0, 0.02²),
  λ = 1e-5 held fixed) whose p, q train before they are added; adding one makes its λ trainable
  (from the 1e-5 it holds, so ΔW does not jump) and appends a new reserve. Without advance learning
  (``advance_learn=False``) the reserve is frozen with λ = 0, so adding it leaves ΔW exactly unchanged.
* Restart warmup: a newly trainable entry (an added λ, a new reserve's p, q) gets its own linear
  warm-up: its update at its τ-th step (τ = 0, 1, ...) is scaled by min(1, τ/W), W = ``restart_warmup``
  (0: off). It is applied as an exact per-entry learning-rate factor: the entries' values before the
  optimizer step are kept and the step's change is scaled after it (frozen entries: factor 0).
* Orthogonality: w·R with AdaLoRA's R over the whole P and Q (``orth_reg_weight`` = w).
* When the budget is reached the reserve components are removed (their λ is set to 0 in the code)
  and scoring stops.

The rank grows in place: the same ``nn.Parameter`` objects hold larger tensors and the optimizer
state is resized with them (old rows keep their moments, new rows start at 0; an activated row's
moments are reset). Per-layer growth is recorded as ``overrides`` of the adapter (``grown``,
``reserve``) so ``rw.save_adapter`` / ``rw.load_adapter`` rebuild the shapes; to resume a checkpoint
taken after a growth, call :func:`grow_to_match` with the checkpoint's tensors before ``train(...,
resume_from=...)``.

Departures from the released code: s = α/r₀ stays fixed (the code divides by the current rank, which
rescales every component at each growth; the paper's ΔW = PΛQ has no rank-dependent factor); the
restart warmup scales updates by min(1, τ/W) against the run's own schedule (the code restarts the
whole linear warmup-then-decay schedule for a new parameter group); the orthogonality term covers the
whole P, Q (the code sums it per added block); the number of modules grown is exactly ``top_h``
(the code's threshold admits ties) and the total never exceeds the budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..callbacks import TrainState
from ..checks import fraction, integer, non_negative
from ..rng import layer_generator
from ..shards import average_over_ranks_, editing, full, require_resharding, set_parameter, shard_like
from .adalora import orthogonality_backward, smooth_importance_
from .base import AdapterLayer, AlphaScale
from .init import InitContext
from .rank_control import MethodController, checkpoint_tensor, scaled_update
from .registry import MethodSpec, adapter_layers, adapter_state, register

__all__ = ["IncreLoRAConfig", "IncreLoRAController", "IncreLoRALayer", "grow_to_match", "growth_steps",
           "rank_pattern"]

RESERVE_LAMBDA = 1e-5  # λ of a reserve component under advance learning (the released code's value)


@dataclass
class IncreLoRAConfig(AlphaScale):
    """``r`` the initial rank per layer (also r₀ of the scale s = α/r₀), ``target_r`` the average final
    rank (budget = target_r × layers), ``init_warmup`` steps before the first growth, ``incre_interval``
    steps between growths, ``top_h`` modules grown each time, ``incre_rank_num`` components each gets,
    ``advance_learn`` (train the reserve before adding it), ``beta1`` / ``beta2`` the EMA rates,
    ``orth_reg_weight``, ``restart_warmup`` W of the new entries' warm-up (0: off), ``alpha`` (None: r).
    ``grown`` / ``reserve`` are per-layer state written by the controller (as overrides), not options."""

    r: int = 2
    target_r: int = 8
    init_warmup: int = 0
    incre_interval: int = 10
    top_h: int = 2
    incre_rank_num: int = 1
    advance_learn: bool = True
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.1
    restart_warmup: int = 0
    alpha: float | None = None
    grown: int = 0
    reserve: int | None = None

    def validate(self) -> None:
        super().validate()
        integer("target_r", self.target_r, 1)
        integer("init_warmup", self.init_warmup, 0)
        integer("incre_interval", self.incre_interval, 1)
        integer("top_h", self.top_h, 1)
        integer("incre_rank_num", self.incre_rank_num, 1)
        if not isinstance(self.advance_learn, bool):
            raise ValueError(f"advance_learn={self.advance_learn!r} must be True or False")
        fraction("beta1", self.beta1, allow_one=False, what="a number in (0, 1)")
        fraction("beta2", self.beta2, allow_one=False, what="a number in (0, 1)")
        non_negative("orth_reg_weight", self.orth_reg_weight)
        integer("restart_warmup", self.restart_warmup, 0)
        integer("grown", self.grown, 0)
        integer("reserve", self.reserve, 0, optional=True)

    @property
    def reserve_count(self) -> int:
        return self.incre_rank_num if self.reserve is None else self.reserve

    @property
    def reserve_lambda(self) -> float:
        return RESERVE_LAMBDA if self.advance_learn else 0.0


class IncreLoRALayer(AdapterLayer):
    """``y = W x + s·P(Λ(Q x))`` over ``rows`` = rank + reserve components: ``lora_A`` = Q (rows×in),
    ``lora_E`` = λ (rows×1), ``lora_B`` = P (out×rows); the first ``rank`` are added components, the
    rest the reserve. Init as AdaLoRA (λ = 0, P, Q ~ N(0, 0.02²)); reserve λ = 1e-5 (advance learning)
    or 0. ``ranknum`` (a buffer) holds the rank."""

    method = "increlora"

    def __init__(self, base_layer: nn.Module, config: IncreLoRAConfig, ctx: InitContext) -> None:
        super().__init__(base_layer, config)
        rank = config.r + config.grown
        rows, dtype, device = rank + config.reserve_count, self.adapter_dtype, self.base_weight.device
        self.scale = config.scale
        self.lora_A = nn.Parameter(torch.zeros(rows, self.in_features, dtype=dtype, device=device))
        self.lora_E = nn.Parameter(torch.zeros(rows, 1, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rows, dtype=dtype, device=device))
        self.register_buffer("ranknum", torch.tensor([float(rank)], device=device))
        self.tracking = False  # ΔW is formed in the forward and its gradient kept (for the module score)
        self.delta_seen: torch.Tensor | None = None
        self.delta_grad: torch.Tensor | None = None
        if not ctx.skip:
            g = layer_generator(config.seed, ctx.name)
            with torch.no_grad():
                self.lora_A.copy_(torch.randn(self.lora_A.shape, generator=g) * 0.02)
                self.lora_B.copy_(torch.randn(self.lora_B.shape, generator=g) * 0.02)
                self.lora_E[rank:] = config.reserve_lambda

    @property
    def rank(self) -> int:
        """Added components (the reserve excluded)."""
        return int(self.ranknum.item())

    @property
    def rows(self) -> int:
        return self.lora_A.shape[0]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self.lora_B, self.lora_A * self.lora_E, self.scale

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ (self.lora_A * self.lora_E)) * self.scale

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        return None if self.tracking else super()._fused_forward(x)

    def delta_forward(self, x: torch.Tensor) -> torch.Tensor:
        """ΔW·x; while the module is scored, through the dense ΔW, whose gradient is accumulated."""
        if not self.tracking:
            return super().delta_forward(x)
        dw = self.delta_weight()
        if dw.requires_grad:
            self.delta_seen = dw.detach()
            dw.register_hook(self._keep_grad)
        return self.base_map(x, dw)

    def _keep_grad(self, grad: torch.Tensor) -> None:
        self.delta_grad = grad.detach().clone() if self.delta_grad is None else self.delta_grad + grad.detach()

    def sensitivity(self) -> torch.Tensor:
        """I = Σ|ΔW ⊙ ∇ΔW| / √(d_out·d_in) of the last step's forward and backward (0 without one); resets.
        Under FSDP2 ∇ΔW (this rank's batch) is first averaged over the ranks, as FSDP2 averages gradients."""
        if self.delta_seen is None or self.delta_grad is None:
            out = torch.zeros((), device=self.lora_A.device)
        else:
            grad = average_over_ranks_(self.delta_grad, self.lora_A)
            out = (self.delta_seen.float() * grad.float()).abs().sum() / math.sqrt(self.delta_seen.numel())
        self.delta_seen = self.delta_grad = None
        return out

    @torch.no_grad()
    def grow(self, n: int, generator: torch.Generator, root: nn.Module | None = None) -> None:
        """Add ``n`` reserve components (their λ becomes trainable from its current value) and append
        ``n`` new reserve components (p, q ~ N(0, 0.02²), λ = the reserve value): ΔW changes only by
        the new reserve's s·λ·p·qᵀ (0 without advance learning). ``root``: the model, when FSDP2 sharded
        it (the factors are re-sharded at their new size, :func:`rankwise.shards.set_parameter`)."""
        if n > self.rows - self.rank:
            raise ValueError(f"cannot add {n} components: the reserve holds {self.rows - self.rank}")
        A, B, E = (full(p.detach()) for p in (self.lora_A, self.lora_B, self.lora_E))
        a = (torch.randn(n, self.in_features, generator=generator) * 0.02).to(A)
        b = (torch.randn(self.out_features, n, generator=generator) * 0.02).to(B)
        e = torch.full((n, 1), self.config.reserve_lambda).to(E)
        self._set(root, torch.cat([A, a]), torch.cat([B, b], dim=1), torch.cat([E, e]))
        self.ranknum += n

    @torch.no_grad()
    def drop_reserve(self, root: nn.Module | None = None) -> None:
        """Remove the reserve components (the budget is spent)."""
        r = self.rank
        A, B, E = (full(p.detach()) for p in (self.lora_A, self.lora_B, self.lora_E))
        self._set(root, A[:r].clone(), B[:, :r].clone(), E[:r].clone())

    def _set(self, root: nn.Module | None, a: torch.Tensor, b: torch.Tensor, e: torch.Tensor) -> None:
        for name, value in (("lora_A", a), ("lora_B", b), ("lora_E", e)):
            set_parameter(root or self, self, name, value)

    @torch.no_grad()
    def resize(self, rank: int, rows: int) -> None:
        """Zero tensors of ``rows`` components of which ``rank`` are added (to load a checkpoint into)."""
        z = self.lora_A.new_zeros
        self._set(None, z(rows, self.in_features), z(self.out_features, rows), z(rows, 1))
        self.ranknum.fill_(float(rank))

    def trainable_count(self) -> int:
        return self.rows * (self.in_features + self.out_features + 1)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", scale={self.scale:g}, rank={self.rank}, reserve={self.rows - self.rank}"


def rank_pattern(model: nn.Module, name: str | None = None) -> dict[str, int]:
    """``{layer: rank}`` of an IncreLoRA adapter (added components; the reserve left out)."""
    return {n: m.rank for n, m in adapter_layers(model, name) if isinstance(m, IncreLoRALayer)}


def grow_to_match(model: nn.Module, tensors: dict[str, torch.Tensor], name: str | None = None) -> None:
    """Resize ``model``'s IncreLoRA layers to the shapes in ``tensors`` (a state dict by the model's
    names, e.g. a checkpoint's tensors from ``rankwise.checkpoint.read_checkpoint``), so that a run
    checkpointed after a growth can be resumed (``train(..., resume_from=...)`` loads the values)."""
    for layer_name, layer in adapter_layers(model, name):
        if not isinstance(layer, IncreLoRALayer):
            continue
        rows = checkpoint_tensor(tensors, layer_name, layer.adapter_name, "lora_A").shape[0]
        layer.resize(int(checkpoint_tensor(tensors, layer_name, layer.adapter_name, "ranknum").item()), int(rows))


def growth_steps(config: IncreLoRAConfig, layers: int) -> list[int]:
    """The steps at which the rank grows until the budget is spent: t > ``init_warmup`` with
    t % ``incre_interval`` = 0, one per round of min(top_h, layers)·incre_rank_num components."""
    need = config.target_r * layers - config.r * layers
    per_round = min(config.top_h, layers) * config.incre_rank_num
    rounds = max(0, math.ceil(need / per_round))
    k = config.incre_interval
    first = (config.init_warmup // k + 1) * k
    return [first + i * k for i in range(rounds)]


def _resize_state(optimizer: torch.optim.Optimizer | None, p: torch.Tensor, dim: int, old: int,
                  reset: slice | None = None) -> None:
    """Fit ``p``'s optimizer state to its new size along ``dim``: the first min(old, new) slices keep
    their values, new ones start at 0, the slices in ``reset`` are zeroed; a state entry of another
    shape (not per-entry) is cleared, so the optimizer re-creates it. Under FSDP2 the state is resized
    whole and sharded like the re-sharded ``p``."""
    if optimizer is None or p not in optimizer.state:
        return
    state = optimizer.state[p]
    for key, value in list(state.items()):
        if not torch.is_tensor(value) or value.dim() == 0:
            continue
        if value.dim() != p.dim() or value.shape[dim] != old:
            state.clear()
            return
        value = full(value)
        new = value.new_zeros(p.shape)
        keep = min(old, p.shape[dim])
        new.narrow(dim, 0, keep).copy_(value.narrow(dim, 0, keep))
        if reset is not None:
            new.narrow(dim, reset.start, reset.stop - reset.start).zero_()
        state[key] = shard_like(new, p)


class IncreLoRAController(MethodController):
    """IncreLoRA's growth (the released code's ``update_and_increase``), run every step.

    In the loop: ``on_after_backward`` adds the orthogonality gradient and keeps the values of the
    entries whose update is scaled (frozen reserve entries, warming-up new ones); ``on_step_end``
    scales their change, updates the module importance, and grows the top modules at the scheduled
    steps. In a hand-written loop call :meth:`after_backward` between ``backward()`` and
    ``optimizer.step()``, and :meth:`step` after it."""

    def __init__(self, model: nn.Module, name: str = "default", optimizer: torch.optim.Optimizer | None = None,
                 total_steps: int | None = None) -> None:
        super().__init__(model, name)
        self.config = cfg = self.adapter_config(IncreLoRAConfig)
        self.optimizer = optimizer
        self.layers = [(n, m) for n, m in adapter_layers(model, name) if isinstance(m, IncreLoRALayer)]
        require_resharding(model, "increlora")
        self.budget = cfg.target_r * len(self.layers)
        if self.budget <= cfg.r * len(self.layers):
            raise ValueError(f"IncreLoRA's budget target_r={cfg.target_r} x {len(self.layers)} layers is not above the "
                             f"initial rank r={cfg.r} per layer; choose target_r > r")
        self.steps = growth_steps(cfg, len(self.layers))
        if total_steps is not None and self.steps and self.steps[-1] > total_steps:
            raise ValueError(f"IncreLoRA needs {len(self.steps)} growth rounds (init_warmup={cfg.init_warmup}, "
                             f"incre_interval={cfg.incre_interval}, top_h={cfg.top_h}, incre_rank_num="
                             f"{cfg.incre_rank_num}) up to step {self.steps[-1]}, after the run's {total_steps} "
                             "steps; grow faster (top_h, incre_rank_num, incre_interval) or train longer")
        self.t = 0
        self.generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 17)
        n = len(self.layers)
        self.ipt = torch.zeros(n)
        self.unc = torch.zeros(n)
        # per layer: the step after which each row of P, Q / each λ became trainable (-inf: from the start,
        # +inf: frozen)
        self.born_pq: list[torch.Tensor] = []
        self.born_e: list[torch.Tensor] = []
        for _, m in self.layers:
            r, rows = m.rank, m.rows
            pq = torch.full((rows,), -math.inf)
            if not cfg.advance_learn:
                pq[r:] = math.inf
            e = torch.full((rows,), -math.inf)
            e[r:] = math.inf
            self.born_pq.append(pq)
            self.born_e.append(e)
        self._kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
        self._track(not self.done)

    def before_load(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """A resume: grow the layers to the checkpoint's ranks first (:func:`grow_to_match`)."""
        if model is self.model:
            grow_to_match(model, tensors, self.adapter_name)

    # ------------------------------------------------------------------ state
    @property
    def total_rank(self) -> int:
        return sum(m.rank for _, m in self.layers)

    @property
    def done(self) -> bool:
        return self.total_rank >= self.budget

    def schedule(self) -> str:
        c = self.config
        return (f"init_warmup={c.init_warmup}, incre_interval={c.incre_interval}, top_h={c.top_h}, incre_rank_num="
                f"{c.incre_rank_num}: growth at steps {self.steps[:4]}{' ...' if len(self.steps) > 4 else ''}")

    def _track(self, on: bool) -> None:
        for _, m in self.layers:
            m.tracking = on
            if not on:
                m.delta_seen = m.delta_grad = None

    def factor(self, born: torch.Tensor, step: int) -> torch.Tensor:
        """The update factor of each row at ``step``: 0 frozen, min(1, τ/W) warming (τ = steps since it
        became trainable, before this one), 1 otherwise."""
        w = self.config.restart_warmup
        tau = step - 1 - born
        out = torch.ones_like(born)
        out[torch.isinf(born) & (born > 0)] = 0.0
        if w > 0:
            warming = torch.isfinite(born)
            out[warming] = torch.clamp(tau[warming] / w, max=1.0)
        return out

    # ------------------------------------------------------------------ per step
    def regularizer_backward(self) -> float:
        """Add the gradient of w·R (AdaLoRA's orthogonality term over the whole P, Q); returns w·R."""
        return orthogonality_backward([m for _, m in self.layers], self.config.orth_reg_weight)

    @torch.no_grad()
    def keep_scaled_entries(self) -> None:
        """Keep the values of the rows whose update the next step scales (factor < 1)."""
        kept = []
        for (_, m), pq, e in zip(self.layers, self.born_pq, self.born_e, strict=True):
            rows_pq = torch.nonzero(self.factor(pq, self.t + 1) < 1).view(-1)
            rows_e = torch.nonzero(self.factor(e, self.t + 1) < 1).view(-1)
            A, B, E = (full(p.detach()) for p in (m.lora_A, m.lora_B, m.lora_E))  # whole under FSDP2
            kept.append((rows_pq, A[rows_pq].clone(), B[:, rows_pq].clone(), rows_e, E[rows_e].clone()))
        self._kept = kept

    def after_backward(self) -> float:
        reg = self.regularizer_backward() if self.model.training else 0.0
        self.keep_scaled_entries()
        return reg

    @torch.no_grad()
    def scale_updates(self, step: int) -> None:
        """θ ← θ_before + f·(θ − θ_before) for the kept rows: the per-entry learning-rate factor f."""
        if self._kept is None:
            if any(bool((self.factor(b, step) < 1).any()) for b in self.born_pq + self.born_e):
                raise RuntimeError("IncreLoRAController.step() needs after_backward() before optimizer.step(): "
                                   "the reserve components must stay frozen")
            return
        for (_, m), pq, e, (rows_pq, a0, b0, rows_e, e0) in zip(self.layers, self.born_pq, self.born_e, self._kept,
                                                                strict=True):
            if rows_pq.numel():
                f = self.factor(pq, step)[rows_pq]
                with editing(m.lora_A) as A:
                    A[rows_pq] = scaled_update(A[rows_pq], a0, f)
                with editing(m.lora_B) as B:
                    B[:, rows_pq] = scaled_update(B[:, rows_pq], b0, f, dim=1)
            if rows_e.numel():
                with editing(m.lora_E) as E:
                    E[rows_e] = scaled_update(E[rows_e], e0, self.factor(e, step)[rows_e])
        self._kept = None

    @torch.no_grad()
    def update_importance(self) -> None:
        """I_k of each module from the last step, then AdaLoRA's smoothing (Ī, Ū)."""
        sens = torch.stack([m.sensitivity().cpu() for _, m in self.layers])
        smooth_importance_(self.ipt, self.unc, sens, self.config.beta1, self.config.beta2)

    def scores(self) -> torch.Tensor:
        """S_k = Ī_k·Ū_k per module, in the order of ``self.layers``."""
        return self.ipt * self.unc

    @torch.no_grad()
    def grow(self, step: int) -> dict[str, int]:
        """Give the ``top_h`` highest-scoring modules ``incre_rank_num`` components each (in score order,
        never beyond the budget); returns ``{layer: components added}``."""
        c, left = self.config, self.budget - self.total_rank
        order = torch.argsort(self.scores(), descending=True, stable=True)[: c.top_h].tolist()
        added = {}
        state = adapter_state(self.model, self.adapter_name)
        for i in order:
            n = min(c.incre_rank_num, left)
            if n <= 0:
                break
            name, m = self.layers[i]
            r, rows = m.rank, m.rows
            m.grow(n, self.generator, self.model)
            for p, dim in ((m.lora_A, 0), (m.lora_E, 0), (m.lora_B, 1)):
                # the activated rows start fresh (their λ, and their p, q if they were frozen)
                reset = slice(r, r + n) if (p is m.lora_E or not c.advance_learn) else None
                _resize_state(self.optimizer, p, dim, rows, reset)
            new_pq = torch.full((n,), float(step) if c.advance_learn else math.inf)
            self.born_pq[i] = torch.cat([self.born_pq[i], new_pq])
            if not c.advance_learn:
                self.born_pq[i][r:r + n] = float(step)
            self.born_e[i][r:r + n] = float(step)
            self.born_e[i] = torch.cat([self.born_e[i], torch.full((n,), math.inf)])
            state.overrides.setdefault(name, {})["grown"] = m.rank - c.r
            left -= n
            added[name] = n
        self.allocations += 1
        if self.done:
            self.finish()
        return added

    @torch.no_grad()
    def finish(self) -> None:
        """The budget is spent: remove the reserve components and stop scoring."""
        state = adapter_state(self.model, self.adapter_name)
        for i, (name, m) in enumerate(self.layers):
            rows = m.rows
            m.drop_reserve(self.model)
            for p, dim in ((m.lora_A, 0), (m.lora_E, 0), (m.lora_B, 1)):
                _resize_state(self.optimizer, p, dim, rows)
            self.born_pq[i] = self.born_pq[i][: m.rank]
            self.born_e[i] = self.born_e[i][: m.rank]
            state.overrides.setdefault(name, {}).update(grown=m.rank - self.config.r, reserve=0)
        self._track(False)

    def step(self) -> None:
        self.t += 1
        self.scale_updates(self.t)
        if self.done:
            return
        self.update_importance()
        if self.t in self.steps:
            self.grow(self.t)

    # ------------------------------------------------------------------ loop hooks
    def on_train_begin(self, state: TrainState) -> None:
        self.optimizer = self.optimizer or state.optimizer

    def on_after_backward(self, state: TrainState) -> None:
        state.log["orth_reg"] = self.after_backward()

    def on_step_end(self, state: TrainState) -> None:
        self.step()
        state.log["increlora_rank"] = self.total_rank

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t, "allocations": self.allocations, "ipt": self.ipt, "unc": self.unc,
                "born_pq": self.born_pq, "born_e": self.born_e, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.t, self.allocations = state["t"], state["allocations"]
        self.ipt, self.unc = state["ipt"].clone(), state["unc"].clone()
        self.born_pq = [b.clone() for b in state["born_pq"]]
        self.born_e = [b.clone() for b in state["born_e"]]
        self.generator.set_state(state["generator"])
        st = adapter_state(self.model, self.adapter_name)
        for name, m in self.layers:
            if m.rank != self.config.r or m.rows != m.rank + self.config.incre_rank_num:
                st.overrides.setdefault(name, {}).update(grown=m.rank - self.config.r, reserve=m.rows - m.rank)
        self._track(not self.done)


def _controller(model: nn.Module, name: str, optimizer: Any, total_steps: int) -> IncreLoRAController:
    return IncreLoRAController(model, name, optimizer, total_steps)


register(
    MethodSpec(
        "increlora",
        "rank-allocation",
        "Zhang et al. 2023, IncreLoRA: Incremental Parameter Allocation Method for Parameter-Efficient Fine-tuning",
        IncreLoRAConfig,
        IncreLoRALayer,
        summary="ΔW = P·Λ·Q grown by rank-1 components in the top-scored modules up to a budget (advance learning)",
        controller=_controller,
    )
)
