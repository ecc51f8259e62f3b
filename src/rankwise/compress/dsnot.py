"""DSnoT — Zhang et al. 2024, "Dynamic Sparse No Training: Training-Free Fine-tuning for Sparse LLMs"
(ICLR 2024, arXiv 2310.08915; official code zyxxmu/DSnoT).

Training-free mask refinement of a pruned model, layer by layer on calibration inputs. Start from a
per-output-row mask (Wanda ``|W_ij|·‖x_j‖₂`` or magnitude ``|W_ij|``, the same count pruned in every
row); the *expected reconstruction error* of row i is ``ε_i = Σ_{j pruned} W_ij x̄_j`` (the mean of the
dense minus the sparse output, x̄ the input mean). Each cycle, in every row with ``|ε_i| > threshold``:

* grow the pruned weight with the largest ``sign(ε_i)·W_ij x̄_j / Var(x_j)^p`` (its contribution has
  the sign of ε and little variance),
* prune the kept weight whose contribution ``W_ij x̄_j`` has the opposite sign and whose Wanda score
  is the least,

so ``ε_i ← ε_i − W_ig x̄_g + W_ip x̄_p`` moves toward 0 while the row's sparsity stays exactly the same;
a swap that would flip the sign of ε_i is not made (``same_sign``), so |ε_i| only decreases.
Weights keep their dense values (no update, no backpropagation). A row stops for good once
``|ε_i| ≤ threshold``, a swap would flip its sign, or a candidate list is exhausted; at most
``max_cycles`` cycles. Layers are pruned in order, each on the outputs of the already-pruned layers
before it (as the official code).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import checks
from .layerwise import InputStats, prune_layerwise

INITIAL = ("wanda", "magnitude")


@dataclass
class DSnoTConfig:
    """``initial``: the starting mask (official ``--initial_method``); ``max_cycles`` (``--max_cycle_time``,
    50); ``threshold`` on |ε| (``--update_threshold``, 0.1); ``var_power`` p of the growing criterion
    (``--pow_of_var_regrowing``, 1); ``skip``: sublayers (first name part inside a block, e.g.
    ``"mlp"``) that keep their initial mask (official ``--skip_layer``, default ``mlp``; ``None``: refine all);
    ``same_sign``: a swap that would flip the sign of ε_i stops the row instead (so |ε_i| never grows;
    the official code's sign check, which its ``--without_same_sign`` flag leaves off)."""

    initial: str = "wanda"
    max_cycles: int = 50
    threshold: float = 0.1
    var_power: float = 1.0
    skip: str | None = "mlp"
    same_sign: bool = True

    def __post_init__(self) -> None:
        checks.choice("initial", self.initial, INITIAL)
        checks.integer("max_cycles", self.max_cycles, 0)
        checks.number("threshold", self.threshold, 0)
        checks.number("var_power", self.var_power, 0)
        if not isinstance(self.same_sign, bool):
            raise ValueError(f"same_sign={self.same_sign!r} must be true or false")
        if self.skip is not None and not isinstance(self.skip, str):
            raise ValueError(f"skip={self.skip!r} must be a sublayer name (e.g. 'mlp') or None")


def initial_mask(weight: torch.Tensor, stats: InputStats, sparsity: float, initial: str) -> torch.Tensor:
    """``True`` = pruned: in every row the ``⌊sparsity·in⌋`` weights with the least score."""
    score = weight.detach().double().abs()
    if initial == "wanda":
        score = score * stats.sum_sq.sqrt()
    k = int(weight.shape[1] * sparsity)
    mask = torch.zeros_like(score, dtype=torch.bool)
    mask.scatter_(1, score.argsort(dim=1, stable=True)[:, :k], True)
    return mask


def mean_error(weight: torch.Tensor, pruned: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """ε per row: ``Σ_{j pruned} W_ij x̄_j``, the expected dense-minus-sparse output (float64)."""
    return (weight.detach().double() * mean * pruned).sum(1)


def _ordered(valid: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the column indices of the ``valid`` entries by ascending ``key`` (invalid ones last),
    and their count."""
    return torch.where(valid, key, torch.inf).argsort(dim=1, stable=True), valid.sum(1)


@torch.no_grad()
def refine_mask(weight: torch.Tensor, stats: InputStats, pruned: torch.Tensor, max_cycles: int = 50,
                threshold: float = 0.1, var_power: float = 1.0, same_sign: bool = True) -> tuple[torch.Tensor, int]:
    """DSnoT's prune-and-grow cycles on the mask ``pruned`` (see the module docstring); returns the
    new mask and the number of swaps. Every row keeps its count of pruned weights."""
    pruned = pruned.clone()
    w = weight.detach().double()
    contrib = w * stats.mean  # W_ij x̄_j
    growth = contrib / stats.var.clamp_min(1e-12).pow(var_power)
    wanda = w.abs() * stats.sum_sq.sqrt()
    eps = (contrib * pruned).sum(1)
    kept = ~pruned
    # (order, count) for ε > 0 and ε < 0: grow the largest / most negative sign-matching growth score,
    # prune the least-Wanda weight of the opposite contribution sign
    grow = (_ordered(pruned & (contrib > 0), -growth), _ordered(pruned & (contrib < 0), growth))
    prune = (_ordered(kept & (contrib < 0), wanda), _ordered(kept & (contrib > 0), wanda))
    rows = torch.arange(w.shape[0], device=w.device)
    ptr = torch.zeros(4, w.shape[0], dtype=torch.long, device=w.device)  # grow+, grow-, prune+, prune-
    active = torch.ones(w.shape[0], dtype=torch.bool, device=w.device)
    last = w.shape[1] - 1
    swaps = 0
    for _ in range(max_cycles):
        up = eps > 0
        g_ptr, p_ptr = torch.where(up, ptr[0], ptr[1]), torch.where(up, ptr[2], ptr[3])
        g_count = torch.where(up, grow[0][1], grow[1][1])
        p_count = torch.where(up, prune[0][1], prune[1][1])
        g_col = torch.where(up, grow[0][0][rows, ptr[0].clamp(max=last)], grow[1][0][rows, ptr[1].clamp(max=last)])
        p_col = torch.where(up, prune[0][0][rows, ptr[2].clamp(max=last)], prune[1][0][rows, ptr[3].clamp(max=last)])
        after = eps + contrib[rows, p_col] - contrib[rows, g_col]
        active &= (eps.abs() > threshold) & (g_ptr < g_count) & (p_ptr < p_count)
        if same_sign:
            active &= torch.sign(after) == torch.sign(eps)
        if not active.any():
            break
        pruned[rows[active], g_col[active]] = False
        pruned[rows[active], p_col[active]] = True
        eps = torch.where(active, after, eps)
        ptr += torch.stack([active & up, active & ~up, active & up, active & ~up]).long()
        swaps += int(active.sum())
    return pruned, swaps


def dsnot(model: nn.Module, data: Iterable, ratio: float, targets: set[str], progress: bool = False,
          **config: Any) -> dict[str, Any]:
    """Prune the ``targets`` linears of ``model`` in place to ``1 − ratio`` sparsity per row with
    DSnoT's refinement; returns ``{"swaps", "mean_error": {layer: [‖ε‖ initial, ‖ε‖ refined]}}``."""
    cfg = DSnoTConfig(**config)
    swaps, errors = 0, {}

    def mask_of(name: str, sub: str, lin: nn.Linear, stats: InputStats) -> torch.Tensor:
        nonlocal swaps
        mask = initial_mask(lin.weight, stats, 1.0 - ratio, cfg.initial)
        before = float(mean_error(lin.weight, mask, stats.mean).norm())
        if sub.split(".")[0] != cfg.skip:
            mask, n = refine_mask(lin.weight, stats, mask, cfg.max_cycles, cfg.threshold, cfg.var_power, cfg.same_sign)
            swaps += n
        errors[name] = [before, float(mean_error(lin.weight, mask, stats.mean).norm())]
        return mask

    prune_layerwise(model, data, targets, mask_of, "dsnot", progress)
    return {"swaps": swaps, "mean_error": errors}
