"""LTE, LoRA-the-Explorer (Huh et al. 2024, "Training Neural Networks from Scratch with Parallel
Low-Rank Adapters"; reference code github.com/minyoungg/LTE), simulated in one process.

Every target weight W is frozen and gets ``heads`` LoRA heads (B_h, A_h), one per virtual worker.
A training batch is split into ``heads`` equal chunks along dim 0 and chunk h goes through head h
only. Between merges each head trains on its own chunks; every ``merge_every`` steps (the
``LTE`` controller) the heads are averaged into the shared weight,

    W ← W + (s/H)·Σ_h (B_h A_h − B̂_h Â_h),    (B̂_h, Â_h) ← (B_h, A_h),

where (B̂_h, Â_h) are the head's factors at the previous merge. This is the paper's *reset-less*
variant (its code's default): the heads are not re-initialised and keep their optimizer state; the
forward subtracts what a head already contributed, ``y_h = W x_h + s·(B_h A_h − B̂_h Â_h) x_h``.
Outside training the layer is ``W x`` (the last merge). A is initialised orthogonal scaled by
√(in/r), B = 0. Layers that are not targets stay shared and trainable (the reference's DDP
"replica" layers: one copy, averaged every step).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import checks
from ..callbacks import RankController, TrainState
from ..shards import editing, full
from .layers import check_linear


class LTELinear(nn.Module):
    """A frozen ``nn.Linear`` with ``heads`` parallel LoRA heads (see the module docstring)."""

    def __init__(self, linear: nn.Linear, heads: int, rank: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__()
        check_linear(linear)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.heads, self.rank, self.scale = heads, rank, alpha / rank
        self.weight, self.bias = linear.weight, linear.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        kw = {"device": linear.weight.device, "dtype": linear.weight.dtype}
        a = torch.empty(heads, rank, self.in_features, dtype=torch.float32)
        for h in range(heads):
            nn.init.orthogonal_(a[h], generator=generator)
        self.lora_A = nn.Parameter((a * math.sqrt(self.in_features / rank)).to(**kw))
        self.lora_B = nn.Parameter(torch.zeros(heads, self.out_features, rank, **kw))
        self.register_buffer("merged_A", torch.zeros_like(self.lora_A))
        self.register_buffer("merged_B", torch.zeros_like(self.lora_B))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if not self.training:
            return out
        if x.shape[0] % self.heads:
            raise ValueError(f"LTE: the batch ({x.shape[0]} rows) must split evenly over heads={self.heads}")
        xs = x.reshape(self.heads, -1, self.in_features)  # chunk h: rows h·b/H … (h+1)·b/H − 1
        new = torch.bmm(torch.bmm(xs, self.lora_A.transpose(1, 2)), self.lora_B.transpose(1, 2))
        old = torch.bmm(torch.bmm(xs, self.merged_A.transpose(1, 2)), self.merged_B.transpose(1, 2))
        return out + (self.scale * (new - old)).reshape(out.shape)

    def pending_delta(self) -> torch.Tensor:
        """(s/H)·Σ_h (B_h A_h − B̂_h Â_h): what the next merge adds to W (of the gathered heads under FSDP2)."""
        b, a = full(self.lora_B.detach()), full(self.lora_A.detach())
        return self.scale * (torch.bmm(b, a) - torch.bmm(self.merged_B, self.merged_A)).mean(0)

    @torch.no_grad()
    def merge_(self) -> None:
        """W ← W + pending delta; the heads' current factors become the merged ones (FSDP2: each rank keeps its
        rows of W; the merged factors are buffers, whole on every rank)."""
        with editing(self.weight) as w:
            w.add_(self.pending_delta().to(w.dtype))
        self.merged_A.copy_(full(self.lora_A.detach()))
        self.merged_B.copy_(full(self.lora_B.detach()))

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """The shared weight as a plain ``nn.Linear`` (the last merge; ``LTE`` merges at the end of training)."""
        lin = nn.Linear(self.in_features, self.out_features, self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        lin.weight.copy_(self.weight)
        if self.bias is not None:
            lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, heads={self.heads}, rank={self.rank}"


class LTE(RankController):
    """Merge every :class:`LTELinear`'s heads into its shared weight every ``merge_every`` steps and at
    the end of training; call :meth:`step` after every ``optimizer.step()`` or pass it to
    ``rankwise.train.train(callbacks=[lte])``."""

    def __init__(self, model: nn.Module, merge_every: int = 10) -> None:
        self.merge_every = checks.integer("merge_every", merge_every, 1, what="a positive integer")
        self.layers = [m for m in model.modules() if isinstance(m, LTELinear)]
        if not self.layers:
            raise ValueError("model has no LTE layers; call rw.sparsify(model, 'lte') first")
        self.steps = 0

    def step(self) -> bool:
        self.steps += 1
        if self.steps % self.merge_every:
            return False
        self.merge()
        return True

    def merge(self) -> None:
        for layer in self.layers:
            layer.merge_()

    def finish(self) -> None:
        """The end of training: merge the heads' updates since the last scheduled merge (if any)."""
        if self.steps % self.merge_every:
            self.merge()

    def on_train_end(self, state: TrainState) -> None:
        self.finish()

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
