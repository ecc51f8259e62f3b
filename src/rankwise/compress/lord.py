"""LoRD — Kaushal, Vaidhya & Rish 2023, "LORD: Low Rank Decomposition Of Monolingual Code LLMs For
One-Shot Compression" (arXiv 2309.14021).

One-shot, data-free: each selected ``nn.Linear`` W (out×in) is replaced by two smaller dense linear
maps ``W ≈ U V`` with ``U = U_r √Σ_r`` (out×r) and ``V = √Σ_r V_rᵀ`` (r×in), the rank-r truncated
SVD (Sec. 2). Compression needs ``r < out·in/(out+in)``. Unlike quantization, both factors (and the
bias) stay ordinary dense, fully trainable parameters, so the compressed model fine-tunes directly
(or with LoRA/QLoRA on top).

Rank choice: the paper reports compression as a *rank reduction* percentage applied to the linear
layers; rankwise keeps the same fraction κ of every matrix's rank (:func:`rank.rank_fraction_ranks`),
with κ set so the targeted weights shrink to ``ratio``; matrices whose factors would not be smaller
stay dense. ``rank=`` gives every matrix one fixed rank instead. Not implemented: the paper's
optional data-aware decomposition of layer outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..targets import Targets
from .rank import rank_fraction_ranks
from .svd import SVDCache, factorize_layers, shapes_of, svd_ranks, target_linears


@dataclass
class LoRDConfig:
    """``rank``: one fixed inner rank for every targeted matrix (``None`` = from ``ratio``)."""

    rank: int | None = None

    def __post_init__(self) -> None:
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"rank={self.rank!r} must be a positive integer or None")


def lord_compress(
    model: nn.Module,
    ratio: float,
    targets: Targets = "all-linear",
    cache: SVDCache | None = None,
    progress: bool = False,
    **config: object,
) -> dict[str, int | None]:
    """Replace the targeted linears by trainable truncated-SVD factor pairs (in place); return ranks."""
    cfg = LoRDConfig(**config)
    found = target_linears(model, targets)
    shapes = shapes_of(found)
    ranks = svd_ranks(shapes, ratio, cfg.rank) if cfg.rank is not None else rank_fraction_ranks(shapes, ratio)
    factorize_layers(model, ranks, cache, progress)
    for name, r in ranks.items():
        if r is not None:
            for p in model.get_submodule(name).parameters():
                p.requires_grad_(True)
    return dict(ranks)
