"""EoRA — Liu et al. 2024, "EoRA: Training-free Compensation for Compressed LLM with Eigenspace
Low-Rank Approximation" (arXiv 2410.21271).

Training-free compensation of a compressed model. For each compressed layer (a factorized
``FactorizedLinear`` from ``rw.compress``, a 4-bit ``Linear4bit`` from ``rw.quantize``, or a dense
layer whose weights were pruned) with weight W_c and the original weight W, both (out, in) with
y = W x, the compression error ΔW = W − W_c is approximated at rank r by B·A, chosen to minimise the
error of the layer's *outputs* on calibration inputs X (rows = tokens),

    ‖(ΔW − B A) Xᵀ‖_F,

rather than the error of the weights ‖ΔW − B A‖_F that a plain truncated SVD of ΔW minimises. With
the input covariance C = XᵀX / n = Q Λ Qᵀ, ‖E Xᵀ‖_F² = n·‖E Q Λ^{1/2}‖_F², so projecting into the
eigenspace, ΔW' = ΔW Q Λ^{1/2}, and truncating its SVD U_r Σ_r V_rᵀ (Eckart–Young) gives the optimum,
mapped back by Λ^{-1/2} Qᵀ:

    B = U_r Σ_r,    A = V_rᵀ Λ^{-1/2} Qᵀ.

The result is added as a named LoRA adapter (scale 1, per-layer rank), so W_c + B·A runs as an
ordinary low-rank path beside the compressed layer, saves and exports to PEFT like any LoRA adapter
and can be fine-tuned further.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import catalogue, checks
from ..adapters import adapter_names, lora_from_factors
from ..layout import head_module_names
from ..targets import Targets, is_linear, linear_shape, linear_weight, name_matches
from .lord import second_moments

PROJECTIONS = ("eigen", "none")
ACTIVATIONS = ("original", "compressed")
PAPER = ("Liu et al. 2024, EoRA: Training-free Compensation for Compressed LLM with Eigenspace Low-Rank "
         "Approximation")


@torch.no_grad()
def eora_factors(
    error: torch.Tensor, covariance: torch.Tensor, r: int, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """EoRA's rank-``r`` compensation ``(B, A)`` (float64, B out×r, A r×in) of the compression error
    ``error`` = ΔW = W − W_c (out×in) under the input covariance ``covariance`` = C = XᵀX/n (in×in).

    With C = Q Λ Qᵀ: ΔW' = ΔW Q Λ^{1/2}, its truncated SVD U_r Σ_r V_rᵀ, then B = U_r Σ_r and
    A = V_rᵀ Λ^{-1/2} Qᵀ. B·A minimises ‖(ΔW − B A) Xᵀ‖_F = √n·‖(ΔW − B A) Q Λ^{1/2}‖_F over all
    rank-r products (the activation-weighted error; Liu et al. 2024, Sec. 3, "eigenspace projection").
    Only the products matter: B·A = U_r U_rᵀ ΔW, the projection of ΔW's columns on the r output
    directions that carry most of the output error.

    Eigenvalue floor: eigenvalues below ``eps``·λ_max (round-off negatives of a positive
    semi-definite C, and input directions the calibration tokens never excite, e.g. when there are
    fewer tokens than inputs) are raised to ``eps``·λ_max. Such a direction then counts with a tiny
    positive weight instead of zero (the optimum is not unique there) and Λ^{-1/2} stays finite;
    since A is mapped back with the same floored Λ, B·A = U_r U_rᵀ ΔW stays bounded. A covariance
    without a positive eigenvalue (all inputs zero) is an error.
    """
    if error.dim() != 2:
        raise ValueError(f"error must be a matrix (out×in), got shape {tuple(error.shape)}")
    out_f, in_f = error.shape
    if covariance.shape != (in_f, in_f):
        raise ValueError(f"covariance {tuple(covariance.shape)} must be (in×in) = ({in_f}, {in_f}) for an error "
                         f"of shape {tuple(error.shape)}")
    checks.rank("r", r, min(out_f, in_f))
    checks.number("eps", eps, 0.0, 1.0, low_open=True, high_open=True)
    c = covariance.detach().double()
    lam, q = torch.linalg.eigh((c + c.T) / 2)  # ascending
    top = float(lam[-1])
    if not top > 0:
        raise ValueError("covariance has no positive eigenvalue (the layer's calibration inputs are all zero)")
    lam = lam.clamp_min(eps * top)
    root = lam.sqrt()
    projected = (error.detach().double() @ q) * root  # ΔW Q Λ^{1/2}
    u, s, vh = torch.linalg.svd(projected, full_matrices=False)
    b = u[:, :r] * s[:r]
    a = (vh[:r] / root) @ q.T  # V_rᵀ Λ^{-1/2} Qᵀ
    return b, a


@torch.no_grad()
def svd_factors(error: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain compensation: the rank-``r`` truncated SVD of ``error`` (least ‖ΔW − B A‖_F), as
    ``(U_r Σ_r, V_rᵀ)`` in float64 — EoRA without the eigenspace projection, the baseline it beats."""
    checks.rank("r", r, min(error.shape))
    u, s, vh = torch.linalg.svd(error.detach().double(), full_matrices=False)
    return u[:, :r] * s[:r], vh[:r]


def weighted_error(error: torch.Tensor, covariance: torch.Tensor) -> float:
    """‖E Xᵀ‖_F / √n = √tr(E C Eᵀ) for C = XᵀX/n: the per-token RMS output error of a weight error E."""
    e = error.detach().double()
    return float(((e @ covariance.double()) * e).sum().clamp_min(0).sqrt())


@dataclass
class EoRAState:
    """What ``eora`` did; ``model.rankwise_eora[name]``. ``errors[layer]``: the activation-weighted
    error √tr(E C Eᵀ) of the compressed weight (``before``, E = ΔW) and of the compensated one
    (``after``, E = ΔW − B A), when calibration data was given."""

    name: str
    r: int
    projection: str
    activations: str
    layers: list[str]
    skipped: list[str] = field(default_factory=list)  # targeted layers whose weight equals the original's
    errors: dict[str, dict[str, float]] = field(default_factory=dict)


def check_pair(model: nn.Module, original: nn.Module, action: str) -> None:
    """A compensation's two models: ``original`` is another model than the compressed ``model`` and
    neither holds adapters yet (``action`` names the method in the error, e.g. "EoRA compensates")."""
    if original is model:
        raise ValueError("original is model: pass the uncompressed model as original (e.g. a copy made before "
                         "rw.compress / rw.quantize)")
    for who, m in (("model", model), ("original", original)):
        if adapter_names(m):
            raise ValueError(f"{who} has rankwise adapters {adapter_names(m)}; {action} the compressed "
                             "base: apply it before adding adapters (or merge/unload them first)")


def _compressed_layers(
    model: nn.Module, original: nn.Module, targets: Targets | None
) -> list[tuple[str, nn.Module, nn.Module]]:
    """``(name, compressed layer, original layer)`` for every linear layer of ``model`` outside the
    output head (selected by ``targets`` when given), checked against ``original``."""
    heads = head_module_names(model)
    found = []
    for name, module in model.named_modules():
        if not name or not is_linear(module) or any(name == h or name.startswith(h + ".") for h in heads):
            continue
        if targets is not None and not name_matches(name, targets):
            continue
        try:
            orig = original.get_submodule(name)
        except AttributeError:
            raise ValueError(f"original has no module '{name}' (a linear layer of model): original must be the "
                             "uncompressed model that model was compressed from") from None
        if not is_linear(orig):
            raise ValueError(f"original's '{name}' is a {type(orig).__name__}, not a linear layer: original must "
                             "be the uncompressed model that model was compressed from")
        if linear_shape(orig) != linear_shape(module):
            raise ValueError(f"original's '{name}' has shape (out, in)={linear_shape(orig)} but model's has "
                             f"{linear_shape(module)}: EoRA compensates layers that keep their shape (not pruned "
                             "heads or channels, e.g. loraprune)")
        found.append((name, module, orig))
    if not found:
        what = "no linear layer outside the output head" if targets is None else f"targets={targets!r} matched none"
        raise ValueError(f"model has {what}; nothing to compensate")
    return found


def eora(
    model: nn.Module,
    original: nn.Module,
    data: Iterable | None,
    r: int = 16,
    *,
    name: str = "eora",
    targets: Targets | None = None,
    projection: str = "eigen",
    activations: str = "original",
    eps: float = 1e-6,
    adapter_dtype: Any = "float32",
    progress: bool = False,
) -> nn.Module:
    """Compensate the compressed ``model`` for its compression error with EoRA (in place; returns
    ``model``): a LoRA adapter ``name`` of rank ``r`` on every compressed layer, B·A = the rank-r
    approximation of W − W_c with the least activation-weighted error (:func:`eora_factors`).

    ``model``: the compressed model — from ``rw.compress`` (factorized layers, pruned dense layers)
    or ``rw.quantize`` (4-bit layers; W_c is the dequantized weight); it must hold no adapters yet.
    ``original``: the uncompressed model it came from (same architecture and layer shapes; only
    read). ``data``: calibration batches (an iterable of model inputs, dict batches as for
    ``rw.compress(..., data=)``), one forward pass. ``targets``: restrict to these layers (suffix
    list or full-match regex); by default every linear layer outside the output head. Layers whose
    weight equals the original's (e.g. WeLore's dense N-LRCs) are skipped.

    ``activations``: whose layer inputs X form the covariance C — ``"original"`` (the uncompressed
    model's, the default) or ``"compressed"`` (``model``'s own, before compensation).
    ``projection="none"`` gives the plain baseline instead: the truncated SVD of ΔW (least
    unweighted error; ``data`` may then be None). ``eps``: the eigenvalue floor of
    :func:`eora_factors`. ``adapter_dtype``: of the adapter's tensors (float32 by default).

    The adapter is an ordinary LoRA adapter (scale 1): ``rw.save_adapter`` / ``rw.export_peft`` /
    training work as usual; over factorized layers it must stay unmerged (``docs/compress.md``).
    ``model.rankwise_eora[name]`` is an :class:`EoRAState` (layers, ranks, weighted errors before
    and after when ``data`` was given).
    """
    checks.choice("projection", projection, PROJECTIONS)
    checks.choice("activations", activations, ACTIVATIONS)
    checks.integer("r", r, 1)
    checks.number("eps", eps, 0.0, 1.0, low_open=True, high_open=True)
    check_pair(model, original, "EoRA compensates")
    if data is None and projection == "eigen":
        raise ValueError("data=None: EoRA needs calibration batches (an iterable of model inputs, e.g. a few "
                         "training batches) for the input covariances; projection='none' is the data-free SVD")
    layers = _compressed_layers(model, original, targets)
    for layer_name, module, _ in layers:
        checks.rank("r", r, min(linear_shape(module)), where=layer_name)
    errors = {}
    skipped = []
    for layer_name, module, orig in layers:
        w = linear_weight(orig).detach().double()
        delta = w - linear_weight(module).detach().double().to(w.device)
        if bool((delta == 0).all()):
            skipped.append(layer_name)
        else:
            errors[layer_name] = delta
    if not errors:
        raise ValueError("every targeted layer of model equals original's: nothing to compensate (is model the "
                         "compressed copy of original?)")
    covariances: dict[str, torch.Tensor] = {}
    if data is not None:
        source = original if activations == "original" else model
        hooked = {n: source.get_submodule(n) for n in errors}
        counts: dict[str, int] = {}
        grams = second_moments(source, hooked, data, "input", progress, counts=counts, source="data")
        covariances = {n: g / max(counts[n], 1) for n, g in grams.items()}
    factors = {}
    report = {}
    for layer_name, delta in errors.items():
        if projection == "eigen":
            b, a = eora_factors(delta, covariances[layer_name], r, eps)
        else:
            b, a = svd_factors(delta, r)
        factors[layer_name] = (b, a)
        if layer_name in covariances:
            c = covariances[layer_name].to(delta.device)
            report[layer_name] = {"before": weighted_error(delta, c), "after": weighted_error(delta - b @ a, c)}
    lora_from_factors(model, factors, name, adapter_dtype=adapter_dtype)  # copied into the adapter dtype
    state = EoRAState(name, r, projection, activations, list(factors), skipped, report)
    model.rankwise_eora = {**getattr(model, "rankwise_eora", {}), name: state}  # type: ignore[assignment]
    return model


catalogue.register(catalogue.MethodRecord(
    "eora", "quantization", PAPER,
    "training-free: W − W_c projected into the eigenspace of the input covariance, truncated there, mapped "
    "back as a LoRA adapter B·A beside the compressed layer (least activation-weighted error)",
    api="compensate", config=eora, exports="peft-lora", spec=eora,
    builder=lambda model, **options: eora(model, **options),
))
