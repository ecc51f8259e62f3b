"""WeLore — Jaiswal et al. 2024, "From GaLore to WeLore: How Low-Rank Weights Non-uniformly Emerge
from Low-Rank Gradients" (arXiv 2407.11239; official code github.com/VITA-Group/WeLore).

Data-agnostic, one-shot. Each matrix's singular values are min-max normalized, σ̂ = (σ − σ_min)/
(σ_max − σ_min); the values below one global threshold τ form its heavy tail and are dropped
(rank reduction k_ℓ = #{σ̂ < τ}, non-uniform across matrices). Matrices that express themselves in
low rank become **LRCs** — replaced by two factors ``U_r √S_r`` and ``√S_r V_rᵀ`` whose product is
the rank-(R − k_ℓ) truncated SVD; the others are **N-LRCs** and stay dense and untouched. τ is the
smallest threshold meeting the parameter budget (:func:`rank.welore_ranks`). For fine-tuning
(WeLore-PEFT, Sec. 5) only the LRC factors are trained; N-LRCs stay frozen.

rankwise differences: the target is a *parameter* budget (``ratio``) instead of the paper's
effective-rank reduction, so τ is found by bisection instead of the paper's per-model table; and a
matrix is an LRC only if its factors are smaller than the dense matrix (else it is an N-LRC).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..checks import fraction
from ..targets import Targets
from .factorized import FactorizedLinear
from .rank import WeLorePlan, welore_ranks
from .svd import SVDCache, factorize_layers, shapes_of, spectra, target_linears


@dataclass
class WeLoreConfig:
    """``min_reduction``: a matrix must drop more than this fraction of its rank to be an LRC
    (official ``--min_ratio``, default 0)."""

    min_reduction: float = 0.0

    def __post_init__(self) -> None:
        fraction("min_reduction", self.min_reduction, allow_zero=True, allow_one=False)


def welore_plan(
    model: nn.Module,
    ratio: float,
    targets: Targets = "all-linear",
    min_reduction: float = 0.0,
    cache: SVDCache | None = None,
    progress: bool = False,
) -> WeLorePlan:
    """WeLore's per-matrix ranks for ``model`` (None = N-LRC) — a function of the spectra only."""
    found = target_linears(model, targets)
    return welore_ranks(spectra(found, cache, progress), shapes_of(found), ratio, min_reduction)


def welore_compress(
    model: nn.Module,
    ratio: float,
    targets: Targets = "all-linear",
    cache: SVDCache | None = None,
    progress: bool = False,
    **config: object,
) -> tuple[WeLorePlan, dict[str, int | None]]:
    """Factorize the LRCs of ``model`` in place; N-LRCs stay dense. Returns (plan, ranks)."""
    cfg = WeLoreConfig(**config)
    cache = cache if cache is not None else SVDCache()
    plan = welore_plan(model, ratio, targets, cfg.min_reduction, cache, progress)
    factorize_layers(model, plan.ranks, cache, progress)
    return plan, dict(plan.ranks)


def welore_lrc_layers(model: nn.Module) -> list[tuple[str, FactorizedLinear]]:
    """The LRC layers of a WeLore-compressed model (its :class:`FactorizedLinear` modules)."""
    state = getattr(model, "rankwise_compress", None)
    if state is None or state.method != "welore":
        raise ValueError("model was not compressed with rw.compress(model, 'welore', ...)")
    return [(n, model.get_submodule(n)) for n, r in state.ranks.items() if r is not None]


def welore_finetune_params(model: nn.Module, freeze_others: bool = True) -> list[nn.Parameter]:
    """Only the LRC factors (``U``, ``V`` and bias of each factorized layer): the WeLore-PEFT
    trainable set. With ``freeze_others`` every other parameter (N-LRCs, embeddings, norms, head)
    gets ``requires_grad=False``, so no gradient is even formed for it and N-LRCs stay bit-identical."""
    params = [p for _, layer in welore_lrc_layers(model) for p in layer.parameters()]
    if freeze_others:
        keep = {id(p) for p in params}
        for p in model.parameters():
            p.requires_grad_(id(p) in keep)
    return params
