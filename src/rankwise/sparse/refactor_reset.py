"""Weight refactorization and momentum reset for low-rank pre-training — Glentis et al. 2025,
"Scalable Parameter and Memory Efficient Pretraining for LLM: Recent Algorithmic Advances and
Benchmarking" (arXiv 2505.22922), the two techniques the paper proposes for pure low-rank training.

Every target weight is a trained product ``W = B A`` (``rw.sparsify(model, "refactor_reset",
rank=r)``: a :class:`~rankwise.sparse.layers.FactorizedLinear` with ``B = U``, ``A = V``, from the
balanced truncated SVD of the initial weight). The factorization is not unique (``B A = (B M)(M⁻¹ A)``)
and training drifts to unbalanced factors; the controller :class:`RefactorReset` therefore

* **refactorizes** every ``refactor_every`` steps: ``B A = U Σ Vᵀ`` (thin SVD), ``B ← U √Σ``,
  ``A ← √Σ Vᵀ`` — the product, hence the function, is unchanged while both factors carry √σ_i per
  direction (``‖B‖_F = ‖A‖_F``); found from QR factors, never forming ``B A``
  (:func:`~rankwise.linalg.rebalanced_factors`);
* **resets the momentum** every ``reset_every`` steps: the optimizer's moment tensors of the factors
  (Adam's ``exp_avg`` / ``exp_avg_sq``) are zeroed and their step counter restarts, so the next
  update is a first Adam step; every other parameter's state is untouched.

The controller also works on SLTrain's layers (:class:`~rankwise.sparse.layers.SparseLowRankLinear`:
its ``B``, ``A``; the sparse part is left alone). Usage::

    model = rw.sparsify(model, "refactor_reset", rank=128)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ctl = RefactorReset(model, opt, refactor_every=200)    # reset_every defaults to refactor_every
    rw.train(model, data, cfg, optimizer=opt, callbacks=[ctl])   # or ctl.step() after opt.step()
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import checks
from ..callbacks import RankController, TrainState
from ..linalg import rebalanced_factors
from ..shards import full, write_full_
from .layers import FactorizedLinear, SparseLowRankLinear


def factor_pair(layer: nn.Module) -> tuple[nn.Parameter, nn.Parameter]:
    """``(B, A)`` of a low-rank structured layer: ``(U, V)`` of a FactorizedLinear, ``(B, A)`` of SLTrain's."""
    if isinstance(layer, FactorizedLinear):
        return layer.U, layer.V
    if isinstance(layer, SparseLowRankLinear):
        return layer.B, layer.A
    raise ValueError(f"{type(layer).__name__} has no low-rank factor pair (FactorizedLinear or SparseLowRankLinear)")


@torch.no_grad()
def refactorize_(b: torch.Tensor, a: torch.Tensor) -> None:
    """``(B, A) ← (U √Σ, √Σ Vᵀ)`` in place, ``U Σ Vᵀ = B A``: same product, balanced factors (of the gathered
    factors under FSDP2; each rank keeps its rows)."""
    new_b, new_a = rebalanced_factors(full(b.detach()), full(a.detach()))
    write_full_(b, new_b)
    write_full_(a, new_a)


@torch.no_grad()
def reset_moments_(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
    """Zero the moment tensors (states shaped like the parameter) of ``params`` and restart their step
    counter; scalars and other parameters are untouched."""
    for p in params:
        state = optimizer.state.get(p, {})
        for key, value in state.items():
            if key == "step":
                state[key] = value.zero_() if torch.is_tensor(value) else 0
            elif torch.is_tensor(value) and value.shape == p.shape:
                value.zero_()


class RefactorReset(RankController):
    """Refactorize ``B A`` every ``refactor_every`` steps and reset the factors' optimizer moments every
    ``reset_every`` steps (default: the same interval); :meth:`step` after every ``optimizer.step()``,
    or pass it to ``rankwise.train.train(..., optimizer=optimizer, callbacks=[controller])``."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        refactor_every: int = 200,
        reset_every: int | None = None,
    ) -> None:
        self.refactor_every = checks.integer("refactor_every", refactor_every, 1)
        self.reset_every = checks.integer("reset_every", refactor_every if reset_every is None else reset_every, 1)
        self.layers = [(n, m) for n, m in model.named_modules()
                       if isinstance(m, FactorizedLinear | SparseLowRankLinear)]
        if not self.layers:
            raise ValueError("model has no low-rank factorized layers; call rw.sparsify(model, 'refactor_reset', "
                             "rank=...) (or 'sltrain') first")
        self.factors = [factor_pair(m) for _, m in self.layers]
        in_opt = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if not all(id(p) in in_opt for pair in self.factors for p in pair):
            raise ValueError("optimizer must hold every factor (B, A) of the model: build it after rw.sparsify")
        self.optimizer = optimizer
        self.steps = self.refactors = self.resets = 0

    def on_train_begin(self, state: TrainState) -> None:
        if state.optimizer is not self.optimizer:
            raise ValueError("RefactorReset resets the state of the optimizer it was built with: pass that one to "
                             "train(..., optimizer=...)")

    def step(self) -> tuple[bool, bool]:
        """Count one optimizer step; returns (refactorized, reset) for this step."""
        self.steps += 1
        refactor = self.steps % self.refactor_every == 0
        reset = self.steps % self.reset_every == 0
        if refactor:
            self.refactorize()
        if reset:
            self.reset()
        return refactor, reset

    def refactorize(self) -> None:
        """Re-balance every layer's factors (product unchanged)."""
        for b, a in self.factors:
            refactorize_(b, a)
        self.refactors += 1

    def reset(self) -> None:
        """Zero the factors' optimizer moments (other parameters keep theirs)."""
        reset_moments_(self.optimizer, [p for pair in self.factors for p in pair])
        self.resets += 1

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "refactors": self.refactors, "resets": self.resets}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps, self.refactors, self.resets = (int(state[k]) for k in ("steps", "refactors", "resets"))
