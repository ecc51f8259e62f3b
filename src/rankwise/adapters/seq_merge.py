"""Sequential continual merging by orthogonal projection (OPCM; Tang et al. 2025, "Merging Models on
the Fly Without Retraining: A Sequential Approach to Scalable Continual Model Merging").

Updates τ₁, τ₂, … (per layer, relative to W₀) arrive one at a time. The state is the running merged
update Δ⁽ᵗ⁾ of every layer and a few scalars, nothing per merged model, so memory is constant in the
number of models. With the full SVD Δ⁽ᵗ⁻¹⁾ = U Σ Vᵀ of a layer, the new update enters projected:

    P(τ) = U M ⊙ (Uᵀ τ V) Vᵀ,   M zeroes the diagonal (i, i) and the leading block i, j < k,

so ⟨P(τ), Δ⁽ᵗ⁻¹⁾⟩_F = Σᵢ σᵢ (Uᵀ P(τ) V)ᵢᵢ = 0 (orthogonal to the merged update) and P(τ) has no part
in the span of the top-k pairs uᵢ vⱼᵀ, where k is the first index at which the singular values'
cumulative share Σ_{j≤k} σⱼ / Σ σ exceeds ``alpha``. The adaptive scale keeps the merged update's
length at the mean length of the task vectors (over all layers together):

    λ_t = ‖λ_{t−1} Δ⁽ᵗ⁻¹⁾ + P(τ_t)‖ / mean_{i≤t} ‖τᵢ‖,   Δ⁽ᵗ⁾ = (λ_{t−1} Δ⁽ᵗ⁻¹⁾ + P(τ_t)) / λ_t,

with Δ⁽¹⁾ = τ₁ and λ₁ = 1 (so λ_{t−1}Δ⁽ᵗ⁻¹⁾ is the plain sum of the projected updates so far).

One departure from the paper's code: there the diagonal is zeroed for every singular index, also
where σᵢ = 0, whose singular vectors are an arbitrary completion of the null space chosen by LAPACK;
here only the σᵢ > 0 part is removed (the rest is orthogonal to Δ anyway). For a full-rank Δ, the
paper's CLIP setting, both are the same; for low-rank LoRA updates this keeps the result well defined.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ..checks import fraction
from ..linalg import svd_precision

__all__ = ["SequentialMerge", "orthogonal_update", "split_rank"]


def split_rank(singular_values: torch.Tensor, alpha: float) -> int:
    """The paper's k: the first index i at which Σ_{j≤i} σⱼ / Σ σ exceeds ``alpha`` (0 when all σ are 0)."""
    total = float(singular_values.sum())
    if total <= 0.0:
        return 0
    over = torch.nonzero(torch.cumsum(singular_values, 0) / total > alpha)
    return int(over[0]) if len(over) else 0


def orthogonal_update(update: torch.Tensor, merged: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """``P(update)``: the part of ``update`` (out, in) left after removing, in the singular basis of
    ``merged`` (full SVD U Σ Vᵀ), the diagonal coordinates uᵢᵀ·update·vᵢ with σᵢ > 0 and the leading
    k×k block (k = :func:`split_rank` of σ at ``alpha``). ``⟨P(update), merged⟩_F = 0``. Computed in
    fp32 (fp64 stays fp64); returned in ``update``'s dtype."""
    alpha = fraction("alpha", alpha, allow_zero=True)
    if update.shape != merged.shape or update.dim() != 2:
        raise ValueError(f"update {tuple(update.shape)} and merged {tuple(merged.shape)} must be 2-D of one shape")
    tau, delta = svd_precision(update), svd_precision(merged).to(svd_precision(update).dtype)
    u, s, vh = torch.linalg.svd(delta, full_matrices=True)
    coords = u.T @ tau @ vh.T
    tol = float(s.max()) * max(delta.shape) * torch.finfo(s.dtype).eps if s.numel() else 0.0
    nonzero = int((s > tol).sum())
    idx = torch.arange(nonzero, device=coords.device)
    coords[idx, idx] = 0.0
    k = split_rank(s, alpha)
    coords[:k, :k] = 0.0
    return (u @ coords @ vh).to(update.dtype)


def _norm(tensors: Mapping[str, torch.Tensor]) -> float:
    """‖·‖ of all layers' tensors taken together as one vector."""
    return math.sqrt(sum(float(svd_precision(t).pow(2).sum()) for t in tensors.values()))


class SequentialMerge:
    """The running state of OPCM (module docstring): ``delta`` (layer -> merged update Δ⁽ᵗ⁾),
    ``scale`` λ_t, ``norm_sum`` Σ‖τᵢ‖ and ``count`` t. :meth:`add` takes one model's update
    ``{layer: τ}`` (a layer it lacks counts as τ = 0 there) and needs nothing of earlier models."""

    def __init__(self, alpha: float = 0.5) -> None:
        self.alpha = fraction("alpha", alpha, allow_zero=True)
        self.delta: dict[str, torch.Tensor] = {}
        self.scale = 1.0
        self.norm_sum = 0.0
        self.count = 0

    @torch.no_grad()
    def add(self, update: Mapping[str, torch.Tensor]) -> None:
        """Merge one more model's update (module docstring: project, add, rescale)."""
        if not isinstance(update, Mapping) or not update:
            raise ValueError("update must be a non-empty dict {layer name: ΔW (out, in)}")
        self.norm_sum += _norm(update)
        self.count += 1
        if self.count == 1:
            self.delta = {name: t.detach().clone() for name, t in update.items()}
            return
        raw = {name: self.scale * d for name, d in self.delta.items()}
        for name, tau in update.items():
            previous = self.delta.get(name)
            raw[name] = tau.detach().clone() if previous is None else (
                raw[name] + orthogonal_update(tau, previous, self.alpha).to(previous.dtype))
        length = _norm(raw)
        mean = self.norm_sum / self.count
        self.scale = length / mean if length > 0.0 and mean > 0.0 else 1.0
        self.delta = {name: t / self.scale for name, t in raw.items()}

    def state_tensors(self) -> int:
        """How many tensors the state holds (one per layer, whatever the number of merged models)."""
        return len(self.delta)
