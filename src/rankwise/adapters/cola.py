"""COLA, Chain of LoRA (Xia, Qin & Hazan 2024, "Chain of LoRA: Efficient Fine-tuning of Language Models
via Residual Learning").

Residual learning in the spirit of Frank-Wolfe: train a LoRA (one link of the chain), fold it into the
frozen weights, start a fresh LoRA and learn the residual; repeat. Every ``chain_every`` optimizer steps
(a restart of link k):

    W ← W + s·B_k·A_k;    A_{k+1} ← Kaiming-uniform (a fresh draw),  B_{k+1} ← 0;
    the optimizer state of A and B cleared (the new factors start with fresh moments),

so the model's function is unchanged by a restart, and after K links W_T − W_0 = Σ_k s·B_k·A_k
reaches rank up to K·r with r-rank trainable tensors. :class:`ChainOfLoRA` is the controller;
``rankwise.train.train`` attaches it by itself (``config.training_callbacks``). The merged links live
in the base weights: keep the whole model (``rw.merge_and_unload``), not the last link alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..callbacks import RankController, TrainState, clear_optimizer_state
from ..checks import integer
from ..rng import layer_generator
from ..shards import full
from .lora import LoRAConfig, LoRALayer
from .registry import MethodSpec, adapter_layers, register


@dataclass
class COLAConfig(LoRAConfig):
    """LoRA options plus ``chain_every``: optimizer steps per link of the chain (merge and restart after each)."""

    chain_every: int = 100

    def validate(self) -> None:
        super().validate()
        integer("chain_every", self.chain_every, 1)
        if self.init != "default":
            raise ValueError(f"init={self.init!r}: COLA restarts each link at A random, B = 0; use init='default'")

    def training_callbacks(self, model: nn.Module, adapter_name: str,
                           optimizer: torch.optim.Optimizer) -> list[RankController]:
        """What ``rankwise.train.train`` runs with this adapter: the chain's merge-and-restart."""
        return [ChainOfLoRA(model, optimizer, self.chain_every, adapter_name)]


class ChainOfLoRA(RankController):
    """Every ``every`` steps fold each LoRA link into its base and start the next (module doc). Call
    :meth:`step` after every ``optimizer.step()`` in a hand-written loop. ``optimizer=None``: the
    loop's (``state.optimizer``, e.g. inside the transformers Trainer through ``loop_callbacks``)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, every: int,
                 adapter_name: str | None = None) -> None:
        self.every = integer("every", every, 1)
        self.optimizer = optimizer
        self.layers: list[tuple[str, LoRALayer]] = [
            (n, m) for n, m in adapter_layers(model, adapter_name) if isinstance(m, LoRALayer)
        ]
        if not self.layers:
            raise ValueError("model has no LoRA layers to chain (rw.adapt(model, 'cola') first)")
        self.steps = 0
        self.links = 0  # restarts so far: the current link is number links + 1

    def on_step_end(self, state: TrainState) -> None:
        if self.optimizer is None:
            self.optimizer = state.optimizer
        self.step()

    def step(self) -> bool:
        """Count one optimizer step; at every ``every``-th, :meth:`restart`. True if it restarted."""
        self.steps += 1
        if self.steps % self.every:
            return False
        self.restart()
        return True

    @torch.no_grad()
    def restart(self) -> None:
        """W ← W + s·B·A in every layer, then a fresh link (A drawn anew, B = 0) with cleared optimizer state."""
        if self.optimizer is None:
            raise ValueError("ChainOfLoRA(optimizer=None) learns its optimizer in a training loop's on_step_end; "
                             "in a hand-written loop pass the optimizer")
        self.links += 1
        for name, layer in self.layers:
            layer.restart_(layer_generator(int(getattr(layer.config, "seed", 0)) + self.links, name))
            clear_optimizer_state(self.optimizer, (layer.lora_A, layer.lora_B))

    def state_dict(self) -> dict[str, Any]:
        """Counters and the base weights (the merged links), which a checkpoint of trainable tensors lacks."""
        return {"steps": self.steps, "links": self.links,
                "base": {name: full(layer.base_weight.detach()).clone() for name, layer in self.layers}}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        base = state["base"]
        if set(base) != {name for name, _ in self.layers}:
            raise ValueError("COLA state holds the base weights of other layers: build the model as for the first run")
        for name, layer in self.layers:
            if base[name].shape != layer.base_weight.shape:
                raise ValueError(f"COLA state: base weight of {name!r} has shape {tuple(base[name].shape)}, "
                                 f"the model's is {tuple(layer.base_weight.shape)}")
            layer._set_base_weight(base[name])
        self.steps, self.links = int(state["steps"]), int(state["links"])


register(
    MethodSpec(
        "cola",
        "training-dynamics",
        "Xia et al. 2024, Chain of LoRA: Efficient Fine-tuning of Language Models via Residual Learning",
        COLAConfig,
        LoRALayer,
        export="none",
        summary="every chain_every steps merge W ← W + s·B·A, restart A fresh, B = 0, optimizer state cleared "
                "(the loop runs it: ChainOfLoRA); W_T − W_0 reaches rank K·r",
    )
)
