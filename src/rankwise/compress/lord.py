"""LoRD — Kaushal, Vaidhya & Rish 2023, "LORD: Low Rank Decomposition Of Monolingual Code LLMs For
One-Shot Compression" (arXiv 2309.14021).

One-shot: each selected ``nn.Linear`` W (out×in) is replaced by two smaller dense linear maps
``W ≈ U V`` (U out×r, V r×in; bias kept). Compression needs ``r < out·in/(out+in)``. Unlike
quantization, both factors (and the bias) stay ordinary dense, fully trainable parameters, so the
compressed model fine-tunes directly (or with LoRA/QLoRA on top). Two ways to get the factors:

* data-free (default): the rank-r truncated SVD, ``U = U_r √Σ_r``, ``V = √Σ_r V_rᵀ`` (Sec. 2);
* data-aware (``calibration=`` batches): decompose the layer *outputs* instead of the weights.
  Over the calibration tokens collect ``G = Σ y yᵀ`` (out×out, float64) of ``y = W x`` (the layer
  output without its bias), take its top-r eigenvectors ``U_r`` and set ``U = U_r``,
  ``V = U_rᵀ W``. Since ``U V X = U_r U_rᵀ Y``, Eckart–Young on Y makes this the rank-r map with the
  least output error ``‖W X − U V X‖_F`` on the calibration data; with isotropic inputs
  (``X Xᵀ ∝ I``) G ∝ W Wᵀ and it equals the truncated SVD. Caveat: only the paper's abstract could
  be checked here, not its method section, so this is the standard output-covariance form of a
  data-aware decomposition (uncentred second moment, so it minimises exactly the output error
  above), not a transcription of the paper's equations.
  The output statistics of all targeted layers are collected in one pass over the calibration
  batches through the *uncompressed* model (forward hooks, no activations stored); every token
  position counts, padding included.

Rank choice: the paper reports compression as a *rank reduction* percentage applied to the linear
layers; rankwise keeps the same fraction κ of every matrix's rank (:func:`rank.rank_fraction_ranks`),
with κ set so the targeted weights shrink to ``ratio``; matrices whose factors would not be smaller
stay dense. ``rank=`` gives every matrix one fixed rank instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import checks
from ..batches import call_model, move_batch
from ..targets import Targets, linear_shape, replace_module
from .factorized import factorized_from_factors
from .rank import rank_fraction_ranks
from .svd import SVDCache, factorize_layers, shapes_of, svd_ranks, target_linears


@dataclass
class LoRDConfig:
    """``rank``: one fixed inner rank for every targeted matrix (``None`` = from ``ratio``)."""

    rank: int | None = None

    def __post_init__(self) -> None:
        checks.integer("rank", self.rank, 1, optional=True)


@torch.no_grad()
def second_moments(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    calibration: Iterable,
    side: str = "output",
    progress: bool = False,
    *,
    counts: dict[str, int] | None = None,
    source: str = "calibration",
) -> dict[str, torch.Tensor]:
    """``Σ_tokens z zᵀ`` (float64) for every module in ``layers`` from one forward pass of ``model``
    over ``calibration`` (forward hooks on all layers at once, removed afterwards; nothing stored but
    the sums): ``side="output"``, z = y − b, the layer output without its bias (out×out, LoRD);
    ``side="input"``, z = x, the layer input (in×in, EoRA). Every token position counts, padding
    included. ``counts``: filled with the number of tokens each layer saw; ``source``: what the error
    for an empty ``calibration`` calls it (the caller's parameter name)."""
    checks.choice("side", side, ("input", "output"))
    dims = {name: linear_shape(m)[0 if side == "output" else 1] for name, m in layers.items()}
    seen = counts if counts is not None else {}
    seen.update({name: 0 for name in layers})
    device = next(model.parameters()).device
    grams = {name: torch.zeros(d, d, dtype=torch.float64, device=device) for name, d in dims.items()}

    def hook(name: str, module: nn.Module):
        def accumulate(mod: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if side == "input":
                z = inputs[0].detach()
            else:
                z = output.detach()
                if module.bias is not None:
                    z = z - module.bias
            z = z.reshape(-1, dims[name]).double()
            grams[name].addmm_(z.T, z)
            seen[name] += z.shape[0]
        return accumulate

    handles = [m.register_forward_hook(hook(name, m)) for name, m in layers.items()]
    was_training = model.training
    model.eval()
    batches = 0
    try:
        for batch in tqdm(calibration, desc="calibration", disable=not progress, leave=False):
            call_model(model, move_batch(batch, device))
            batches += 1
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if batches == 0:
        raise ValueError(f"{source} yielded no batch")
    return grams


def output_grams(
    model: nn.Module, layers: dict[str, nn.Linear], calibration: Iterable, progress: bool = False
) -> dict[str, torch.Tensor]:
    """``G = Σ_tokens y yᵀ`` (out×out, float64) of ``y = W x`` for every layer in ``layers``, from one
    forward pass over ``calibration`` (hooks on all layers at once; the bias is subtracted)."""
    return second_moments(model, layers, calibration, "output", progress)


def output_factors(weight: torch.Tensor, gram: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Data-aware LoRD factors ``(U_r, U_rᵀ W)``: ``U_r`` = top-``rank`` eigenvectors of the output
    second moment ``gram`` (out×out), so ``U V = U_r U_rᵀ W`` projects the outputs on their top-r
    principal directions (least ‖W X − U V X‖_F over rank-r maps)."""
    if gram.shape != (weight.shape[0], weight.shape[0]):
        raise ValueError(f"gram {tuple(gram.shape)} must be (out×out) for a weight of shape {tuple(weight.shape)}")
    checks.rank("rank", rank, min(weight.shape))
    _, vectors = torch.linalg.eigh(gram.double())  # ascending eigenvalues
    top = vectors[:, -rank:].flip(1)
    up = top.to(torch.float32)
    down = (top.T @ weight.detach().double()).to(torch.float32)
    return up, down


def factorize_from_outputs(
    model: nn.Module, ranks: dict[str, int], grams: dict[str, torch.Tensor], progress: bool = False
) -> None:
    """Replace each module ``name`` by the :class:`FactorizedLinear` with its data-aware factors."""
    for name, rank in tqdm(ranks.items(), desc="factorizing", disable=not progress, leave=False):
        lin = model.get_submodule(name)
        checks.rank("rank", rank, min(lin.out_features, lin.in_features), where=name)
        up, down = output_factors(lin.weight, grams[name], rank)
        replace_module(model, name, factorized_from_factors(up, down, lin.bias, dtype=lin.weight.dtype))


def lord_compress(
    model: nn.Module,
    ratio: float,
    targets: Targets = "all-linear",
    cache: SVDCache | None = None,
    progress: bool = False,
    *,
    calibration: Iterable | None = None,
    **config: object,
) -> dict[str, int | None]:
    """Replace the targeted linears by trainable factor pairs (in place); return the ranks (None =
    kept dense). Truncated-SVD factors without ``calibration``; with it (an iterable of model
    inputs: dict batches as in :mod:`.evaluate`), the output-covariance factors of the module
    docstring (``cache`` is then unused)."""
    cfg = LoRDConfig(**config)
    found = target_linears(model, targets)
    shapes = shapes_of(found)
    ranks = svd_ranks(shapes, ratio, cfg.rank) if cfg.rank is not None else rank_fraction_ranks(shapes, ratio)
    chosen = {name: r for name, r in ranks.items() if r is not None}
    if calibration is None:
        factorize_layers(model, ranks, cache, progress)
    elif chosen:
        layers = {name: lin for name, lin in found if name in chosen}
        grams = output_grams(model, layers, calibration, progress)
        factorize_from_outputs(model, chosen, grams, progress)
    for name in chosen:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    return dict(ranks)
