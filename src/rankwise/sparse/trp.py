"""TRP — Trained Rank Pruning (Xu et al. 2020, "Trained Rank Pruning for Efficient Deep Neural
Networks", IJCAI 2020; reference code github.com/yuhuixu1993/Trained-Rank-Pruning).

Training alternates with low-rank approximation (§3.1, Alg. 1): every ``period`` steps each target
weight is replaced by its truncated SVD ``W ← U_k Σ_k V_kᵀ`` where the rank k is the smallest with
``Σ_{i≤k} σ_i² ≥ e · Σ_i σ_i²`` (the energy criterion, e = 0.9 in the paper's code), and the same
steps add the nuclear-norm regularizer ``λ‖W‖_*`` through its stochastic sub-gradient
``∂‖W‖_* ∋ U Vᵀ`` (§3.2, Eq. 6: U, V the singular vectors of the non-zero singular values). A
TRP-trained weight is low-rank "in nature", so the final decomposition into a
:class:`~rankwise.sparse.layers.FactorizedLinear` (σ below a small value threshold dropped, as the
reference code does) changes the function negligibly without fine-tuning.

``rw.sparsify(model, "trp")`` swaps target ``nn.Linear`` for :class:`TRPLinear` (same parameters);
call :class:`TRP` ``.step()`` after every ``optimizer.step()`` and :func:`decompose` at the end.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import checks
from ..callbacks import RankController
from ..linalg import energy_rank, svd_precision
from ..shards import full, write_full_
from ..targets import replace_module
from .layers import FactorizedLinear, check_linear


class _AddToGrad(torch.autograd.Function):
    """Identity on ``weight`` whose backward adds ``extra`` to the incoming gradient."""

    @staticmethod
    def forward(ctx, weight, extra):
        ctx.save_for_backward(extra)
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        (extra,) = ctx.saved_tensors
        return grad + extra.to(grad.dtype), None


def nuclear_subgradient(weight: torch.Tensor, rtol: float = 1e-6) -> torch.Tensor:
    """``U Vᵀ`` over the singular values above ``rtol·σ_max``: a sub-gradient of ‖W‖_* (the gradient
    when W has full rank and distinct σ)."""
    u, s, vh = torch.linalg.svd(svd_precision(weight), full_matrices=False)
    k = int((s > rtol * s[0]).sum()) if s.numel() and float(s[0]) > 0 else 0
    return (u[:, :k] @ vh[:k]).to(weight.dtype)


class TRPLinear(nn.Linear):
    """A dense ``nn.Linear`` that TRP periodically truncates and regularizes with λ‖W‖_*."""

    nuclear_weight: float = 0.0

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> TRPLinear:
        """Same ``weight`` / ``bias`` Parameter objects as ``linear`` (nothing is copied)."""
        check_linear(linear)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer.register_buffer("subgradient", None, persistent=False)
        layer.last_rank = min(linear.in_features, linear.out_features)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if self.training and self.subgradient is not None and self.nuclear_weight > 0 and w.requires_grad:
            w = _AddToGrad.apply(w, self.nuclear_weight * self.subgradient)
        return F.linear(x, w, self.bias)

    @torch.no_grad()
    def low_rank_approx_(self, energy: float) -> int:
        """``W ← U_k Σ_k V_kᵀ`` with the energy-criterion rank k; stores ``U_k V_kᵀ`` as the sub-gradient. Under
        FSDP2 the SVD is of the gathered W (each rank keeps its rows); the sub-gradient is kept whole."""
        u, s, vh = torch.linalg.svd(svd_precision(full(self.weight.detach())), full_matrices=False)
        k = energy_rank(s, energy)
        write_full_(self.weight, (u[:, :k] * s[:k]) @ vh[:k])
        self.subgradient = (u[:, :k] @ vh[:k]).to(self.weight.dtype)
        self.last_rank = k
        return k

    def clear_subgradient(self) -> None:
        self.subgradient = None

    @torch.no_grad()
    def to_factorized(self, rank: int) -> FactorizedLinear:
        return FactorizedLinear.from_linear(self, rank)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", last_rank={self.last_rank}"


class TRP(RankController):
    """TRP controller: truncation + nuclear sub-gradient every ``period`` steps (step 0 included); call
    :meth:`step` after every ``optimizer.step()`` or pass it to ``rankwise.train.train(callbacks=[trp])``."""

    def __init__(self, model: nn.Module, energy: float = 0.9, period: int = 1, nuclear_weight: float = 0.0) -> None:
        self.energy = checks.fraction("energy", energy)
        checks.integer("period", period, 1, what="a positive integer")
        checks.non_negative("nuclear_weight", nuclear_weight)
        self.layers = [(n, m) for n, m in model.named_modules() if isinstance(m, TRPLinear)]
        if not self.layers:
            raise ValueError("model has no TRPLinear layers; call rw.sparsify(model, 'trp') first")
        self.model, self.period, self.nuclear_weight = model, period, float(nuclear_weight)
        for _, layer in self.layers:
            layer.nuclear_weight = self.nuclear_weight
        self.steps = 0
        self.ranks: dict[str, int] = {}
        self.approximate()

    def approximate(self) -> dict[str, int]:
        """Truncate every layer by the energy criterion; returns the per-layer ranks."""
        self.ranks = {name: layer.low_rank_approx_(self.energy) for name, layer in self.layers}
        return self.ranks

    def state_dict(self) -> dict[str, Any]:
        """The step counter, the ranks and each layer's pending nuclear sub-gradient (whole; None after a step
        that was not a TRP step)."""
        return {"steps": self.steps, "ranks": dict(self.ranks),
                "layers": {name: {"last_rank": layer.last_rank,
                                  "subgradient": None if layer.subgradient is None else layer.subgradient.clone()}
                           for name, layer in self.layers}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if sorted(state["layers"]) != sorted(name for name, _ in self.layers):
            raise ValueError("TRP state is of other layers than this model's TRPLinear layers")
        self.steps, self.ranks = int(state["steps"]), dict(state["ranks"])
        for name, layer in self.layers:
            saved = state["layers"][name]
            layer.last_rank = int(saved["last_rank"])
            sub = saved["subgradient"]
            layer.subgradient = None if sub is None else sub.to(device=layer.weight.device, dtype=layer.weight.dtype)

    def step(self) -> None:
        """After ``optimizer.step()``: the next step is a TRP step when ``steps % period == 0``."""
        self.steps += 1
        if self.steps % self.period == 0:
            self.approximate()
        else:
            for _, layer in self.layers:
                layer.clear_subgradient()


def decomposition_rank(weight: torch.Tensor, threshold: float = 1e-2, energy: float | None = None) -> int:
    """Rank kept at the final decomposition: σ_i ≥ ``threshold``·σ_1 (value threshold, as the
    reference code uses for TRP-trained nets), or the energy criterion when ``energy`` is given."""
    s = torch.linalg.svdvals(svd_precision(weight))
    if energy is not None:
        return energy_rank(s, checks.fraction("energy", energy))
    checks.fraction("threshold", threshold, allow_zero=True, allow_one=False)
    return max(1, int((s >= threshold * s[0]).sum()))


@torch.no_grad()
def decompose(
    model: nn.Module,
    threshold: float = 1e-2,
    energy: float | None = None,
    ranks: dict[str, int] | None = None,
    keep_dense_if_larger: bool = False,
) -> dict[str, int]:
    """Replace every :class:`TRPLinear` by a :class:`FactorizedLinear`; the rank is ``ranks[name]``
    when given (e.g. ``TRP.ranks``, the last energy-criterion ranks), else :func:`decomposition_rank`.
    With ``keep_dense_if_larger`` a layer whose factors would hold more numbers than W
    (``k(m + n) ≥ m·n``) becomes a plain ``nn.Linear`` with the rank-k weight instead. Returns the ranks."""
    done = {}
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, TRPLinear)]:
        if ranks is not None and name in ranks:
            k = ranks[name]
        else:
            k = decomposition_rank(layer.weight, threshold, energy)
        factorized = layer.to_factorized(k)
        factored_size = k * (layer.in_features + layer.out_features)
        if keep_dense_if_larger and factored_size >= layer.in_features * layer.out_features:
            replace_module(model, name, factorized.to_linear())
        else:
            replace_module(model, name, factorized)
        done[name] = k
    return done
