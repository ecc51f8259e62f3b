"""ReLoRA (Lialin et al. 2023, "Stack More Layers Differently: High-Rank Training Through Low-Rank
Updates", ICLR 2024).

Training procedure (§3, Alg. 1): LoRA factors on every target linear layer, all other parameters
(embeddings, norms, head, biases) trained in full; every ``T`` steps merge ``W ← W + s·B A``,
re-initialize A (Kaiming-uniform) and B = 0, and partially reset the optimizer state of A and B
(magnitude pruning of 99-99.9% of each moment tensor); the learning rate follows a *jagged*
cosine schedule that re-warms from 0 after every merge. Each segment adds a rank ≤ r update, so
``W_T − W_0 = Σ_k s·B_k A_k`` reaches rank up to ``K·r``. A short full-rank warm start precedes
ReLoRA in the paper: train the dense model first, then call :func:`prepare_relora`.

Usage with a plain loop::

    model = rw.sparsify(model, "relora", rank=64)          # LoRA on targets, rest trainable
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    sched = relora_schedule(opt, total_steps=N, warmup_steps=50, restart_every=T, restart_warmup_steps=20)
    relora = ReLoRA(model, opt, merge_every=T)
    for batch in data:
        model(**batch).loss.backward(); opt.step(); sched.step(); relora.step(); opt.zero_grad()

The adapters are ``rankwise`` LoRA layers (``rw.adapt(model, "lora")``); after merges the frozen
base weights hold the accumulated updates, so save the full ``model.state_dict()`` (or
``rw.merge_and_unload``), not ``rw.save_adapter``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from .. import checks
from ..adapters import LoRALayer, adapt, adapter_layers, get_method
from ..callbacks import RankController, TrainState, replace_in_optimizer
from ..rng import layer_generator
from ..shards import editing, full, require_resharding, shard_added, sharded, write_full_
from ..targets import Targets, find_targets

RESETS = ("prune", "random", "zero")


def prepare_relora(
    model: nn.Module,
    rank: int = 128,
    targets: Targets = "all-linear",
    *,
    alpha: float | None = 32.0,
    dropout: float = 0.0,
    seed: int = 0,
    train_rest: bool = True,
    adapter_dtype: str | torch.dtype | None = "float32",
) -> nn.Module:
    """Put LoRA (A Kaiming, B = 0; ``adapter_dtype`` as ``rw.adapt``'s) on ``targets`` and, with ``train_rest``,
    unfreeze every other parameter as the ReLoRA reference does (only the target weights are frozen)."""
    adapt(model, "lora", targets=targets, r=rank, alpha=alpha, dropout=dropout, seed=seed, trainable=None,
          adapter_dtype=adapter_dtype)
    if train_rest:
        frozen = {id(layer.base_layer.weight) for _, layer in adapter_layers(model)}
        for p in model.parameters():
            if id(p) not in frozen:
                p.requires_grad_(True)
    return model


def relora_lr_lambda(
    step: int,
    *,
    total_steps: int,
    warmup_steps: int,
    restart_every: int,
    restart_warmup_steps: int,
    min_lr_ratio: float,
) -> float:
    """Jagged cosine multiplier: linear warmup, one cosine decay from 1 to ``min_lr_ratio`` over the
    run, and after every restart (multiples of ``restart_every``) a linear re-warm from 0 up to the
    cosine value reached at the end of the re-warm (ReLoRA §3, Fig. 2)."""

    def cosine(s: int) -> float:
        progress = min(1.0, max(0.0, (s - warmup_steps) / max(1, total_steps - warmup_steps)))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    if step < warmup_steps:
        return step / max(1, warmup_steps)
    into = step % restart_every
    if step >= restart_every and into < restart_warmup_steps:
        return into / restart_warmup_steps * cosine(step - into + restart_warmup_steps)
    return cosine(step)


def relora_schedule(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int,
    restart_every: int,
    restart_warmup_steps: int,
    min_lr_ratio: float = 0.1,
) -> LambdaLR:
    """The jagged cosine schedule as a ``LambdaLR``; ``restart_every`` must equal ReLoRA's ``merge_every``."""
    checks.integer("total_steps", total_steps, 1)
    checks.integer("restart_every", restart_every, 1)
    checks.integer("warmup_steps", warmup_steps, 0)
    checks.integer("restart_warmup_steps", restart_warmup_steps, 1)
    if warmup_steps > restart_every:
        raise ValueError(f"warmup_steps={warmup_steps} must be <= restart_every={restart_every}")
    if restart_warmup_steps >= restart_every:
        raise ValueError(
            f"restart_warmup_steps={restart_warmup_steps} must be < restart_every={restart_every}"
        )
    checks.fraction("min_lr_ratio", min_lr_ratio)
    fn = partial(
        relora_lr_lambda, total_steps=total_steps, warmup_steps=warmup_steps, restart_every=restart_every,
        restart_warmup_steps=restart_warmup_steps, min_lr_ratio=min_lr_ratio,
    )
    return LambdaLR(optimizer, fn)


@torch.no_grad()
def magnitude_prune_(t: torch.Tensor, ratio: float) -> None:
    """Zero the ``ratio`` fraction of entries of ``t`` with the smallest magnitude (in place)."""
    if ratio >= 1.0:
        t.zero_()
        return
    k = int(ratio * t.numel())
    if k == 0:
        return
    threshold = t.abs().flatten().float().kthvalue(k).values
    t.mul_((t.abs().float() > threshold).to(t.dtype))


@torch.no_grad()
def random_prune_(t: torch.Tensor, ratio: float, generator: torch.Generator | None = None) -> None:
    """Zero each entry of ``t`` independently with probability ``ratio`` (in place)."""
    keep = torch.rand(t.shape, generator=generator) >= ratio
    t.mul_(keep.to(device=t.device, dtype=t.dtype))


class ReLoRA(RankController):
    """Merge-and-restart controller: call :meth:`step` after every ``optimizer.step()``, or pass it to
    ``rankwise.train.train(..., optimizer=optimizer, callbacks=[relora])`` with the optimizer it was built with."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        merge_every: int,
        reset: str = "prune",
        prune_ratio: float = 0.999,
        seed: int = 0,
    ) -> None:
        self.merge_every = checks.integer("merge_every", merge_every, 1)
        checks.choice("reset", reset, RESETS)
        self.prune_ratio = checks.fraction("prune_ratio", prune_ratio)
        self.reset, self.seed = reset, seed
        self.model, self.optimizer = model, optimizer
        self.layers: list[tuple[str, LoRALayer]] = [
            (n, m) for n, m in adapter_layers(model) if isinstance(m, LoRALayer)
        ]
        if not self.layers:
            raise ValueError(
                "model has no LoRA layers; call prepare_relora(model, ...) (or rw.sparsify(model, 'relora')) first"
            )
        in_opt = {id(p) for group in optimizer.param_groups for p in group["params"]}
        self.lora_params = [p for _, m in self.layers for p in (m.lora_A, m.lora_B)]
        if not all(id(p) in in_opt for p in self.lora_params):
            raise ValueError(
                "optimizer must hold every LoRA A/B parameter of the model (build it after prepare_relora)"
            )
        self.steps = 0
        self.merges = 0
        self._generator = torch.Generator().manual_seed(seed)

    def on_train_begin(self, state: TrainState) -> None:
        if state.optimizer is not self.optimizer:
            raise ValueError("ReLoRA resets the state of the optimizer it was built with: pass that one to "
                             "train(..., optimizer=...)")

    def step(self) -> bool:
        """Count one optimizer step; every ``merge_every`` steps merge, re-init and reset. True if merged."""
        self.steps += 1
        if self.steps % self.merge_every:
            return False
        self.merge_and_reinit()
        self.reset_optimizer_state()
        return True

    @torch.no_grad()
    def merge_and_reinit(self) -> None:
        """``W ← W + s·B A``; then A ← Kaiming-uniform (fresh draw), B ← 0, so the output is unchanged
        (``LoRALayer.restart_``: on FSDP2 shards of the gathered factors)."""
        self.merges += 1
        for name, layer in self.layers:
            layer.restart_(layer_generator(self.seed + self.merges, name))

    @torch.no_grad()
    def reset_optimizer_state(self, params: Sequence[torch.Tensor] | None = None) -> None:
        """Prune (magnitude or random, ``prune_ratio``) or zero every tensor state of the LoRA factors; under
        FSDP2 the threshold (and the random draw) is over the whole gathered moment tensor."""
        for p in self.lora_params if params is None else params:
            for value in self.optimizer.state.get(p, {}).values():
                if not torch.is_tensor(value) or value.shape != p.shape:
                    continue  # step counters and scalars stay
                with editing(value) as v:
                    if self.reset == "zero":
                        v.zero_()
                    elif self.reset == "prune":
                        magnitude_prune_(v, self.prune_ratio)
                    else:
                        random_prune_(v, self.prune_ratio, self._generator)

    def state_dict(self) -> dict[str, Any]:
        """Counters and the frozen base weights, which the merges changed (a checkpoint of the trainable
        tensors alone would resume from the un-merged base)."""
        return {"steps": self.steps, "merges": self.merges,
                "base": {name: full(layer.base_layer.weight.detach()).clone() for name, layer in self.layers}}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        base = state["base"]
        if set(base) != {name for name, _ in self.layers}:
            raise ValueError(
                "ReLoRA state holds the base weights of other layers: build the model as for the first run"
            )
        for name, layer in self.layers:
            w = layer.base_layer.weight
            if base[name].shape != w.shape:
                raise ValueError(f"ReLoRA state: base weight of {name!r} has shape {tuple(base[name].shape)}, "
                                 f"the model's is {tuple(w.shape)}")
            write_full_(w, base[name])
        self.steps, self.merges = int(state["steps"]), int(state["merges"])


def lora_parameters(model: nn.Module) -> Iterable[nn.Parameter]:
    """The LoRA A and B parameters of ``model`` (what ReLoRA resets)."""
    for _, layer in adapter_layers(model):
        if isinstance(layer, LoRALayer):
            yield layer.lora_A
            yield layer.lora_B


class ReLoRAWarmStart(RankController):
    """ReLoRA's whole recipe inside one training loop (§3, Alg. 1, Fig. 2): the model trains dense for the first
    ``warm_start``·``total_steps`` steps; then LoRA of ``rank`` and ``alpha`` goes on ``targets``
    (:func:`prepare_relora`), each target weight's place in ``optimizer`` is taken by its A and B (every other
    parameter keeps its state), and :class:`ReLoRA` merges and restarts ``restarts`` times, evenly over the rest
    of the run. After the switch and after every merge the lr re-warms linearly from 0 over ``restart_warmup``
    steps on top of the loop's own schedule (ReLoRA's jagged schedule). Build it on the optimizer the loop steps,
    and pass both to ``rankwise.train.train(..., optimizer=optimizer, callbacks=[controller])``. ``adapter_dtype``:
    of A and B (as ``rw.adapt``'s); on a model sharded with FSDP2 it must be the target weights' dtype
    (``"base"``): A and B join their groups, sharded (:func:`rankwise.shards.shard_added`)."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        warm_start: float = 0.2,
        restarts: int = 4,
        rank: int = 128,
        alpha: float | None = 32.0,
        targets: Targets = "all-linear",
        reset: str = "prune",
        prune_ratio: float = 0.999,
        restart_warmup: int = 5,
        seed: int = 0,
        adapter_dtype: str | torch.dtype | None = "float32",
    ) -> None:
        checks.integer("total_steps", total_steps, 1)
        checks.fraction("warm_start", warm_start, allow_zero=True, allow_one=False)
        checks.integer("restarts", restarts, 0)
        checks.integer("rank", rank, 1)
        checks.integer("restart_warmup", restart_warmup, 1)
        checks.choice("reset", reset, RESETS)
        self.model, self.optimizer = model, optimizer
        require_resharding(model, "relora")  # the switch adds A and B to the sharded model
        self.switch_at = round(warm_start * total_steps)
        self.merge_every = max(1, (total_steps - self.switch_at) // (restarts + 1))
        if restart_warmup >= self.merge_every:
            raise ValueError(f"restart_warmup={restart_warmup} must be < the {self.merge_every} steps between "
                             f"merges ({total_steps} steps, warm_start={warm_start}, restarts={restarts})")
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        found = find_targets(model, targets, conv1d=False)
        missing = [name for name, lin in found if id(lin.weight) not in held]
        if missing:
            raise ValueError(f"the optimizer does not hold the target weights of {missing[:3]}"
                             f"{' ...' if len(missing) > 3 else ''}: build it on the dense model")
        lora = get_method("lora").make_config(r=rank, alpha=alpha, adapter_dtype=adapter_dtype)
        self.options = {"rank": rank, "alpha": alpha, "targets": targets, "seed": seed,
                        "adapter_dtype": lora.adapter_dtype}
        dtypes = {lin.weight.dtype for _, lin in found}
        if sharded(model) and any(lora.dtype_for(d) != d for d in dtypes):
            raise RuntimeError(
                f"relora: under FSDP2 the LoRA factors join their target layer's parameter group, whose gradients "
                f"FSDP2 reduces in one dtype; adapter_dtype={lora.adapter_dtype!r} differs from the target weights' "
                f"{sorted(str(d) for d in dtypes)}: pass adapter_dtype='base'")
        self.reset, self.prune_ratio, self.restart_warmup = reset, prune_ratio, restart_warmup
        self.steps = 0
        self.since_restart: int | None = None  # steps since the switch or the last merge, while re-warming
        self.relora: ReLoRA | None = None
        if self.switch_at == 0:
            self.switch()

    @property
    def switched(self) -> bool:
        return self.relora is not None

    @torch.no_grad()
    def switch(self) -> None:
        """End the dense warm start: LoRA on the targets, A and B in the target weights' place in the optimizer."""
        o = self.options
        prepare_relora(self.model, o["rank"], o["targets"], alpha=o["alpha"], seed=o["seed"],
                       adapter_dtype=o["adapter_dtype"])
        swap = {}
        for _, layer in adapter_layers(self.model):
            if isinstance(layer, LoRALayer):  # under FSDP2: A, B join the target's parameter group, sharded
                swap[layer.base_layer.weight] = shard_added(self.model, layer.base_layer, layer, ["lora_A", "lora_B"])
        replace_in_optimizer(self.optimizer, swap)
        self.relora = ReLoRA(self.model, self.optimizer, self.merge_every, self.reset, self.prune_ratio,
                             seed=o["seed"])
        self.since_restart = 0

    def step(self) -> bool:
        """One optimizer step done: switch at the end of the warm start, else count it for ReLoRA (True when it
        merged); then scale the lr of the next step by the re-warm."""
        self.steps += 1
        restarted = False
        if self.relora is None:
            if self.steps >= self.switch_at:
                self.switch()
        elif self.relora.step():
            restarted, self.since_restart = True, 0
        if self.since_restart is not None:
            self.since_restart += 1
            factor = self.since_restart / self.restart_warmup
            if factor >= 1:
                self.since_restart = None
            else:
                for group in self.optimizer.param_groups:  # the loop's scheduler set it for the next step
                    group["lr"] *= factor
        return restarted

    def before_load(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """A resume past the switch: put the LoRA factors in first, so the tensors and the optimizer state fit."""
        if not self.switched and any(k.endswith("lora_A") for k in tensors):
            self.switch()

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "since_restart": self.since_restart,
                "relora": self.relora.state_dict() if self.relora is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["relora"] is not None) != self.switched:
            raise ValueError("ReLoRAWarmStart state is from the other side of the switch: resume with before_load")
        self.steps, self.since_restart = int(state["steps"]), state["since_restart"]
        if self.relora is not None:
            self.relora.load_state_dict(state["relora"])
