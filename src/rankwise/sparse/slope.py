"""SLoPe — Mozaffari et al. 2024, "SLoPe: Double-Pruned Sparse Plus Lazy Low-Rank Adapter
Pretraining of LLMs" (arXiv 2405.16325).

Every target weight is N:M-sparse from the start: the mask M keeps the N largest-magnitude weights
of every group of M consecutive inputs of a row and stays fixed for the whole run (the forward is
``y = x (W ⊙ M)ᵀ + b``, and the weight gradient is masked, so pruned weights stay 0). The backward
is *double-pruned*: the input gradient uses ``(W ⊙ M ⊙ Mᵦ)`` where Mᵦ makes the transposed weight
N:M too (N largest of every group of M consecutive outputs of a column), ``∂L/∂x = ∂L/∂y · (W ⊙ M
⊙ Mᵦ)``; Mᵦ is read off W ⊙ M at build time and is fixed like M. In the final ``lazy_fraction`` of
the steps (the paper: 1%) the :class:`SLoPe` controller adds low-rank adapters, ``y += s·(x Aᵀ) Bᵀ``
(A Kaiming-uniform, B = 0, so the function is unchanged when they appear), trained with the sparse
weights until the end.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import checks
from ..callbacks import RankController, TrainState
from ..rng import kaiming_uniform_, layer_generator
from ..shards import require_resharding, shard_added
from .layers import check_linear


@torch.no_grad()
def nm_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask with the ``n`` largest |w| of every group of ``m`` consecutive entries of each row."""
    rows, cols = weight.shape
    if cols % m:
        raise ValueError(f"m={m} must divide the {cols} columns of a {rows}x{cols} weight")
    groups = weight.abs().reshape(rows, cols // m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, groups.topk(n, dim=2).indices, True)
    return keep.reshape(rows, cols)


class _DoublePruned(torch.autograd.Function):
    """y = x (W⊙M)ᵀ; ∂L/∂x with (W⊙M⊙Mᵦ), ∂L/∂W = (∂L/∂yᵀ x) ⊙ M."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor,
                back_mask: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight, mask, back_mask)
        return F.linear(x, weight * mask)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        # in the output gradient's dtype (bf16 under autocast, where the forward's GEMM ran in bf16), each
        # gradient returned in its input's dtype
        x, weight, mask, back_mask = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ (weight * mask * back_mask).to(grad.dtype)).to(x.dtype)
        grad_w = None
        if ctx.needs_input_grad[1]:
            g2, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1]).to(grad.dtype)
            grad_w = (g2.t() @ x2).to(weight.dtype) * mask
        return grad_x, grad_w, None, None


class SLoPeLinear(nn.Module):
    """``y = x (W ⊙ M)ᵀ + b [+ s·(x Aᵀ) Bᵀ once the lazy adapter is added]`` (see the module doc)."""

    def __init__(self, linear: nn.Linear, n: int, m: int, rank: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__()
        check_linear(linear)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        if self.out_features % m:
            raise ValueError(f"m={m} must divide out_features={self.out_features} (the backward prunes Wᵀ N:M)")
        self.n, self.m, self.rank, self.scale = n, m, rank, alpha / rank
        self.generator = generator
        mask = nm_mask(linear.weight, n, m)
        self.weight = nn.Parameter(linear.weight.detach() * mask)
        self.bias = linear.bias
        self.mask: torch.Tensor
        self.back_mask: torch.Tensor
        self.register_buffer("mask", mask)
        self.register_buffer("back_mask", nm_mask(self.weight.t(), n, m).t())
        self.lora_A: nn.Parameter | None = None
        self.lora_B: nn.Parameter | None = None

    def add_adapter(self) -> list[nn.Parameter]:
        """Create the lazy adapter (A Kaiming-uniform, B = 0) and return its new parameters (on a sharded model
        :class:`SLoPe` shards them with :func:`rankwise.shards.shard_added`)."""
        if self.lora_A is not None:
            raise ValueError("the SLoPe adapter is already added")
        dtype, device = self.weight.dtype, self.weight.device
        a = torch.empty(self.rank, self.in_features, dtype=dtype, device=device)
        self.lora_A = nn.Parameter(kaiming_uniform_(a, self.generator))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.rank, dtype=dtype, device=device))
        return [self.lora_A, self.lora_B]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _DoublePruned.apply(x, self.weight, self.mask.to(x.dtype), self.back_mask.to(x.dtype))
        if self.bias is not None:
            out = out + self.bias
        if self.lora_A is not None and self.lora_B is not None:
            out = out + self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)
        return out

    def dense_weight(self) -> torch.Tensor:
        """W ⊙ M (+ s·B A with the adapter)."""
        weight = self.weight * self.mask
        if self.lora_A is not None and self.lora_B is not None:
            weight = weight + self.scale * self.lora_B @ self.lora_A
        return weight

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        lin.weight.copy_(self.dense_weight())
        if self.bias is not None:
            lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, {self.n}:{self.m}, rank={self.rank}, "
                f"adapter={self.lora_A is not None}")


def slope_layer(linear: nn.Linear, opts: dict[str, Any], name: str) -> SLoPeLinear:
    """The SLoPe layer for ``linear`` from ``sparsify``'s options (``n``, ``m``, ``rank``, ``alpha``, ``seed``)."""
    m = checks.integer("m", opts["m"], 1, what="a positive integer")
    n = checks.integer("n", opts["n"], 1, m, what=f"an integer in [1, m={m}]")
    alpha = checks.positive("alpha", opts["alpha"])
    seed = checks.integer("seed", opts["seed"])
    return SLoPeLinear(linear, n, m, opts["rank"], alpha, layer_generator(seed, name))


class SLoPe(RankController):
    """Adds every :class:`SLoPeLinear`'s lazy adapter once ``lazy_fraction`` of ``total_steps`` are left
    (after step ⌈(1 − lazy_fraction)·total_steps⌉) and puts its parameters in the optimizer's first group."""

    def __init__(self, model: nn.Module, total_steps: int, optimizer: torch.optim.Optimizer | None = None,
                 lazy_fraction: float = 0.01) -> None:
        self.total_steps = checks.integer("total_steps", total_steps, 1, what="a positive integer")
        fraction = checks.fraction("lazy_fraction", lazy_fraction, allow_zero=True)
        self.start = math.ceil((1 - fraction) * total_steps)
        self.layers = [m for m in model.modules() if isinstance(m, SLoPeLinear)]
        if not self.layers:
            raise ValueError("model has no SLoPe layers; call rw.sparsify(model, 'slope') first")
        require_resharding(model, "slope")  # the lazy adapters join the sharded model
        self.model, self.optimizer, self.steps = model, optimizer, 0

    def step(self) -> bool:
        """Count one optimizer step; add the adapters when the lazy phase starts (True then)."""
        self.steps += 1
        if self.steps != self.start:
            return False
        params = []
        for layer in self.layers:  # under FSDP2 the adapter joins its layer's parameter group, sharded
            layer.add_adapter()
            params += shard_added(self.model, layer, layer, ["lora_A", "lora_B"])
        if self.optimizer is not None:  # joins the first group: the lr scheduler keeps its groups
            self.optimizer.param_groups[0]["params"].extend(params)
        return True

    def on_step_end(self, state: TrainState) -> None:
        self.optimizer = state.optimizer
        self.step()

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
