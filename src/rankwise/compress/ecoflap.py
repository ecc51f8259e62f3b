"""ECoFLaP — Sung et al. 2024, "ECoFLaP: Efficient Coarse-to-Fine Layer-Wise Pruning for
Vision-Language Models" (ICLR 2024, arXiv 2310.02998; official code ylsung/ECoFLaP).

Coarse stage (global, forward-only): for every targeted weight tensor W a zeroth-order gradient
magnitude ``g_W = Σ_batches Σ_noise |L(W + εz) − L(W − εz)| / 2ε`` (z ~ N(0, I) over W alone, MeZO-style,
no backpropagation); the importance of W's entries is ``(W_ij·g_W)²`` and a block's score is their
mean over the block's weights (official ``MEZO-GradMagSquare_avg``). The kept-weight budget
``(1 − s)·N`` is then shared among the blocks in proportion to their scores, every block keeping at
least ``1 − max_sparsity`` of its weights (official ``compute_the_sparsity_per_group``), so block
sparsities differ but their weighted mean is the target ``s``. Fine stage (local): every linear of a
block is pruned with Wanda (``|W_ij|·‖x_j‖``, the least per output row) at its block's sparsity,
layer by layer on calibration inputs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import checks
from ..batches import LossFn, loss_of, model_device, move_batch
from ..layout import layer_list
from .dsnot import initial_mask
from .layerwise import InputStats, prune_layerwise


@dataclass
class ECoFLaPConfig:
    """``max_sparsity``: no block prunes more than this (official ``max_sparsity_per_layer``, 0.8);
    ``noise``: perturbations per batch and tensor (official ``num_noise``, 1); ``eps``: the
    perturbation size (official ``noise_eps``, 1e-3); ``seed``: of the perturbations."""

    max_sparsity: float = 0.8
    noise: int = 1
    eps: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        checks.fraction("max_sparsity", self.max_sparsity)
        checks.integer("noise", self.noise, 1)
        checks.number("eps", self.eps, 0, low_open=True)
        checks.integer("seed", self.seed)


@torch.no_grad()
def zeroth_order_gradients(model: nn.Module, weights: dict[str, nn.Parameter], data: list, noise: int = 1,
                           eps: float = 1e-3, seed: int = 0, loss_fn: LossFn | None = None,
                           progress: bool = False) -> dict[str, float]:
    """``g_W = Σ_batches Σ_noise |L(W + εz) − L(W − εz)| / 2ε`` per tensor (forward passes only; each
    W is restored bit for bit after its two evaluations). ``progress``: a bar over the tensors (2·batches·noise
    forwards each: the long part of ECoFLaP, e.g. 840 forwards of SmolLM2 for 210 tensors and 2 batches)."""
    gen = torch.Generator().manual_seed(seed)
    device = model_device(model)
    batches = [move_batch(b, device) for b in data]
    out = {}
    for name, w in tqdm(weights.items(), desc="zeroth-order gradients", disable=not progress, leave=False):
        original = w.detach().clone()
        total = 0.0
        for batch in batches:
            for _ in range(noise):
                z = torch.randn(w.shape, generator=gen, dtype=torch.float32).to(w.device, w.dtype)
                w.copy_(original + eps * z)
                plus = float(loss_of(model, batch, loss_fn))
                w.copy_(original - eps * z)
                minus = float(loss_of(model, batch, loss_fn))
                total += abs(plus - minus) / (2 * eps)
        w.copy_(original)
        out[name] = total
    return out


def kept_per_group(scores: dict[str, float], sizes: dict[str, int], keep: int, max_sparsity: float) -> dict[str, int]:
    """Weights kept per group: each at least ``⌈(1 − max_sparsity)·n⌉``, the rest of ``keep`` shared in
    proportion to the scores (a full group passes its share on), exactly ``keep`` in total."""
    names = list(scores)
    kept = {g: min(sizes[g], math.ceil(sizes[g] * (1 - max_sparsity))) for g in names}
    if sum(kept.values()) > keep:
        raise ValueError(f"max_sparsity={max_sparsity} keeps more weights than the target sparsity allows")
    open_groups = [g for g in names if kept[g] < sizes[g]]
    while sum(kept.values()) < keep and open_groups:
        rest = keep - sum(kept.values())
        total = sum(scores[g] for g in open_groups)
        shares = {g: (scores[g] / total if total > 0 else 1 / len(open_groups)) * rest for g in open_groups}
        for g in open_groups:
            kept[g] = min(sizes[g], kept[g] + math.floor(shares[g]))
        if all(math.floor(shares[g]) == 0 for g in open_groups):  # the remainder: one weight at a time by share
            for g in sorted(open_groups, key=lambda g: -shares[g])[: keep - sum(kept.values())]:
                kept[g] += 1
        open_groups = [g for g in open_groups if kept[g] < sizes[g]]
    return kept


def ecoflap(model: nn.Module, data: Iterable, ratio: float, targets: list[str], progress: bool = False,
            loss_fn: LossFn | None = None, **config: Any) -> dict[str, Any]:
    """Prune the ``targets`` linears of ``model`` in place so that ``ratio`` of their weights stay
    (see the module docstring); returns ``{"gradients", "scores", "sparsity"}`` per block."""
    cfg = ECoFLaPConfig(**config)
    checks.fraction("1 - ratio (the target sparsity)", 1.0 - ratio, allow_zero=True, allow_one=False)
    if 1.0 - ratio > cfg.max_sparsity:
        raise ValueError(f"max_sparsity={cfg.max_sparsity} is below the target sparsity {1.0 - ratio:g}")
    data = list(data)
    prefix, _ = layer_list(model)
    outside = [n for n in targets if not n.startswith(prefix + ".")]
    if outside:
        raise ValueError(f"ecoflap prunes linears of the repeated layers ({prefix}) only; also targeted: {outside}")
    group = {n: ".".join(n.split(".")[: len(prefix.split(".")) + 1]) for n in targets}
    weights = {n: model.get_submodule(n).weight for n in targets}
    was_training = model.training
    model.eval()
    grads = zeroth_order_gradients(model, weights, data, cfg.noise, cfg.eps, cfg.seed, loss_fn, progress)
    model.train(was_training)
    sizes: dict[str, int] = {}
    sums: dict[str, float] = {}
    for n, w in weights.items():
        sizes[group[n]] = sizes.get(group[n], 0) + w.numel()
        sums[group[n]] = sums.get(group[n], 0.0) + float(w.detach().double().pow(2).sum()) * grads[n] ** 2
    scores = {g: sums[g] / sizes[g] for g in sizes}
    kept = kept_per_group(scores, sizes, int(sum(sizes.values()) * ratio), cfg.max_sparsity)
    sparsity = {g: 1.0 - kept[g] / sizes[g] for g in sizes}

    def mask_of(name: str, sub: str, lin: nn.Linear, stats: InputStats) -> torch.Tensor:
        return initial_mask(lin.weight, stats, sparsity[group[name]], "wanda")

    prune_layerwise(model, data, set(targets), mask_of, "ecoflap", progress)
    return {"gradients": grads, "scores": scores, "sparsity": sparsity}
