"""SST — Sparse Spectral Training (Zhao et al. 2024, "Sparse Spectral Training and Inference on
Euclidean and Hyperbolic Neural Networks", ICML 2025).

The layer keeps its weight in SVD form, ``h = U Σ Vᵀ x`` with ``U Σ Vᵀ = SVD(W₀)`` (§4.1; the dense
W is removed). Training (§4.2-4.5, App. A, Alg. 1):

* **every step** all singular values are updated, ``Σ ← max(Σ − η ∇Σ, 0)`` with
  ``∇Σ_i = U_iᵀ (∂L/∂W) V_i``;
* only ``r`` singular-vector pairs — the *active* set I, drawn without replacement from the
  multinomial ``p(i) = ½ (1/m + Σ_i / Σ_j Σ_j)`` (uniform mixture weighted by singular-value
  magnitude) — are updated, with the *enhanced gradient* ``∇̃U_i = (∂L/∂W) V_i`` and
  ``∇̃V_i = (∂L/∂W)ᵀ U_i`` (the plain gradient divided by Σ_i, Eq. 4), then re-normalized to unit
  norm; the other vectors are frozen buffers with no optimizer state;
* every ``iteration_steps`` (T₃) steps I is resampled and the active vectors' optimizer state is
  reset; after a *round* of ``iterations_per_round`` iterations (default ⌈m/r⌉) the weight is
  re-decomposed, ``U, Σ, V ← SVD(U Σ Vᵀ)`` (periodic re-initialization, §4.3).

Call :class:`SST` ``.step()`` after every ``optimizer.step()``, or pass it to
``rankwise.train.train(..., callbacks=[sst])``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import checks
from ..callbacks import RankController, TrainState, clear_optimizer_state
from ..linalg import svd_precision
from ..shards import editing, full, write_full_
from .layers import check_linear


def sampling_probabilities(sigma: torch.Tensor, uniform_mix: float = 0.5) -> torch.Tensor:
    """``p(i) = u/m + (1 − u)·Σ_i / Σ_j Σ_j`` (SST uses u = ½); uniform when all Σ are zero."""
    s = sigma.detach().float().clamp_min(0)
    m = s.numel()
    total = float(s.sum())
    weighted = s / total if total > 0 else torch.full_like(s, 1.0 / m)
    return uniform_mix / m + (1.0 - uniform_mix) * weighted


def sample_active(
    sigma: torch.Tensor, r: int, generator: torch.Generator | None = None, uniform_mix: float = 0.5
) -> torch.Tensor:
    """``r`` distinct indices drawn from :func:`sampling_probabilities` (multinomial, no replacement), sorted."""
    p = sampling_probabilities(sigma, uniform_mix)
    idx = torch.multinomial(p.cpu(), r, replacement=False, generator=generator)
    return idx.sort().values.to(sigma.device)


class _EnhancedSpectral(torch.autograd.Function):
    """``y = ((x V_I) ⊙ Σ_I) U_Iᵀ`` whose backward gives U_I, V_I the enhanced gradients (no Σ factor)."""

    @staticmethod
    def forward(ctx, x, u, s, vh):
        x2 = x.reshape(-1, x.shape[-1])
        a = x2 @ vh.t()  # N×r
        ctx.save_for_backward(x2, a, u, s, vh)
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return ((a * s) @ u.t()).reshape(*x.shape[:-1], u.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x2, a, u, s, vh = ctx.saved_tensors
        x2, a = x2.to(u.dtype), a.to(u.dtype)  # under autocast the activations are bf16; gradients in u's dtype
        g = grad_out.reshape(-1, u.shape[0]).to(u.dtype)
        b = g @ u  # N×r
        grad_x = ((b * s) @ vh).reshape(ctx.x_shape).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        grad_u = g.t() @ a if ctx.needs_input_grad[1] else None  # (∂L/∂W) V_I
        grad_s = (a * b).sum(0) if ctx.needs_input_grad[2] else None  # U_iᵀ (∂L/∂W) V_i
        grad_vh = b.t() @ x2 if ctx.needs_input_grad[3] else None  # ((∂L/∂W)ᵀ U_I)ᵀ
        return grad_x, grad_u, grad_s, grad_vh


class SpectralLinear(nn.Module):
    """``y = U diag(Σ) Vᵀ x + b`` with all Σ trainable and r active singular-vector pairs trainable.

    Buffers ``U`` (out×m) and ``Vh`` (m×in) hold every singular vector (the entries at the active
    positions are stale while those vectors train as ``u_active`` / ``vh_active``); ``active`` holds
    the r active indices. m = min(out, in).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.rank = checks.rank("rank", rank, min(out_features, in_features))
        m = min(in_features, out_features)
        kw = {"device": device, "dtype": dtype}
        self.register_buffer("U", torch.zeros(out_features, m, **kw))
        self.register_buffer("Vh", torch.zeros(m, in_features, **kw))
        self.register_buffer("active", torch.arange(rank, device=device))
        self.sigma = nn.Parameter(torch.zeros(m, **kw))
        self.u_active = nn.Parameter(torch.zeros(out_features, rank, **kw))
        self.vh_active = nn.Parameter(torch.zeros(rank, in_features, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        self._rebuild_mask()

    @property
    def inner_dim(self) -> int:
        return self.sigma.numel()

    def _rebuild_mask(self) -> None:
        mask = torch.ones(self.inner_dim, dtype=self.sigma.dtype, device=self.sigma.device)
        mask[self.active] = 0
        self.register_buffer("frozen_mask", mask, persistent=False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._rebuild_mask()

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, generator: torch.Generator | None = None,
                    uniform_mix: float = 0.5) -> SpectralLinear:
        """SVD initialization ``U Σ Vᵀ = W`` (zero distortion), then a first sample of the active set."""
        check_linear(linear)
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, rank, linear.bias is not None,
                    device=w.device, dtype=w.dtype)
        layer.set_svd(w.detach())
        layer.resample(generator, uniform_mix)
        if linear.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(linear.bias)
        return layer

    @torch.no_grad()
    def set_svd(self, weight: torch.Tensor) -> None:
        """Load ``U, Σ, Vᵀ = SVD(weight)`` (the active vectors are re-read from the new bases)."""
        u, s, vh = torch.linalg.svd(svd_precision(weight), full_matrices=False)
        self.U.copy_(u)
        self.Vh.copy_(vh)
        write_full_(self.sigma, s)
        self._load_active()

    @torch.no_grad()
    def _load_active(self) -> None:
        """The active vectors ← their columns of ``U`` / rows of ``Vh`` (under FSDP2 each rank keeps its rows)."""
        write_full_(self.u_active, self.U[:, self.active])
        write_full_(self.vh_active, self.Vh[self.active])

    def full_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, Vᵀ) with the active vectors written in (detached)."""
        u, vh = self.U.clone(), self.Vh.clone()
        u[:, self.active] = full(self.u_active.detach())
        vh[self.active] = full(self.vh_active.detach())
        return u, vh

    @torch.no_grad()
    def commit(self) -> None:
        """Write the trained active vectors back into the ``U`` / ``Vh`` buffers (gathered under FSDP2)."""
        self.U[:, self.active] = full(self.u_active.detach())
        self.Vh[self.active] = full(self.vh_active.detach())

    @torch.no_grad()
    def resample(self, generator: torch.Generator | None = None, uniform_mix: float = 0.5) -> torch.Tensor:
        """Commit, draw a new active set from the Σ-weighted multinomial, load its vectors."""
        self.commit()
        self.active.copy_(sample_active(full(self.sigma.detach()), self.rank, generator, uniform_mix))
        self._load_active()
        self._rebuild_mask()
        return self.active

    @torch.no_grad()
    def redecompose(self) -> None:
        """Periodic re-initialization: ``U, Σ, Vᵀ ← SVD(U Σ Vᵀ)``; keeps the same active positions."""
        self.set_svd(self.dense_weight())

    @torch.no_grad()
    def project_(self) -> None:
        """After an optimizer step: ``Σ ← max(Σ, 0)``, active vectors back to unit norm (of the gathered
        vectors under FSDP2: a column of U is spread over the ranks)."""
        self.sigma.clamp_(min=0)
        with editing(self.u_active) as u:
            u.div_(u.norm(dim=0, keepdim=True).clamp_min(1e-12))
        with editing(self.vh_active) as vh:
            vh.div_(vh.norm(dim=1, keepdim=True).clamp_min(1e-12))

    def dense_weight(self) -> torch.Tensor:
        """``U diag(Σ) Vᵀ`` (out×in), detached."""
        u, vh = self.full_factors()
        return (u * full(self.sigma.detach())) @ vh

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, self.bias is not None,
                        device=self.U.device, dtype=self.U.dtype)
        lin.weight.copy_(self.dense_weight())
        if self.bias is not None:
            lin.bias.copy_(self.bias)
        return lin

    def trainable_count(self) -> int:
        bias = self.out_features if self.bias is not None else 0
        return self.inner_dim + self.rank * (self.in_features + self.out_features) + bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frozen = F.linear(F.linear(x, self.Vh) * (self.sigma * self.frozen_mask), self.U)
        active = _EnhancedSpectral.apply(x, self.u_active, self.sigma[self.active], self.vh_active)
        out = frozen + active
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"m={self.inner_dim}, active={self.rank}, bias={self.bias is not None}")


class SST(RankController):
    """Sparse Spectral Training controller: call :meth:`step` after every ``optimizer.step()``, or
    pass it to ``rankwise.train.train(callbacks=[sst])``; without an ``optimizer`` of its own it then
    resets the state of the loop's optimizer."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        iteration_steps: int = 200,
        iterations_per_round: int | None = None,
        uniform_mix: float = 0.5,
        seed: int = 0,
    ) -> None:
        checks.integer("iteration_steps", iteration_steps, 1)
        checks.integer("iterations_per_round", iterations_per_round, 1, optional=True)
        checks.fraction("uniform_mix", uniform_mix, allow_zero=True)
        self.layers = [m for m in model.modules() if isinstance(m, SpectralLinear)]
        if not self.layers:
            raise ValueError("model has no SpectralLinear layers; call rw.sparsify(model, 'sst', rank=...) first")
        self.model, self.optimizer = model, optimizer
        self.iteration_steps = iteration_steps
        self.iterations_per_round = iterations_per_round or max(
            math.ceil(layer.inner_dim / layer.rank) for layer in self.layers
        )
        self.uniform_mix = float(uniform_mix)
        self.generator = torch.Generator().manual_seed(seed)
        self.steps = 0
        self.iterations = 0

    def on_train_begin(self, state: TrainState) -> None:
        if self.optimizer is None:
            self.optimizer = state.optimizer
        elif state.optimizer is not self.optimizer:
            raise ValueError("SST resets the state of the optimizer it was built with: pass that one to "
                             "train(..., optimizer=...)")

    def state_dict(self) -> dict[str, Any]:
        """Counters and the sampling generator (the active sets and Σ are the model's buffers and parameters)."""
        return {"steps": self.steps, "iterations": self.iterations, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps, self.iterations = int(state["steps"]), int(state["iterations"])
        self.generator.set_state(state["generator"])

    def step(self) -> None:
        """Project (Σ ≥ 0, unit vectors); at iteration ends resample I and reset its state; at round ends re-SVD."""
        self.steps += 1
        for layer in self.layers:
            layer.project_()
        if self.steps % self.iteration_steps:
            return
        self.iterations += 1
        new_round = self.iterations % self.iterations_per_round == 0
        for layer in self.layers:
            layer.commit()
            if new_round:
                layer.redecompose()
            layer.resample(self.generator, self.uniform_mix)
        if self.optimizer is not None:
            params = [p for layer in self.layers for p in (layer.u_active, layer.vh_active)]
            if new_round:  # Σ entries now belong to new singular triplets
                params += [layer.sigma for layer in self.layers]
            clear_optimizer_state(self.optimizer, params)


__all__ = ["SST", "SpectralLinear", "sample_active", "sampling_probabilities"]
