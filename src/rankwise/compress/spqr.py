"""SpQR — Dettmers et al. 2024, "SpQR: A Sparse-Quantized Representation for Near-Lossless LLM Weight
Compression" (ICLR 2024, arXiv 2306.03078; official code Vahe1994/SpQR).

GPTQ with small groups, quantized statistics and unstructured outliers, layer by layer on calibration
inputs. With ``H = 2XᵀX + damp·mean(diag)·I`` and ``R`` the upper Cholesky factor of ``H⁻¹``, columns are
quantized left to right; the error of column j, ``e = (w_j − q(w_j)) / R_jj``, is fed back to the columns
not yet quantized (``W_{:,>j} −= e R_{j,>j}``, blockwise as GPTQ). Quantization is asymmetric min-max
with ``bits`` bits per weight, its scale and zero fitted per output row on each group of ``group_size``
consecutive input columns (β₁), and the scales and zeros themselves quantized to ``stat_bits`` bits in
groups of ``stat_group`` rows (β₂; each such group keeps a 16-bit scale and zero: the second level).

Outliers: a weight whose Hessian-aware error ``((w − q(w)) / R_jj)²`` exceeds ``τ = threshold·mean_j
(Var W_{:,j} / R_jj²)`` is kept in 16 bits instead (a sparse matrix). Before a group's statistics are
fitted, the weights whose leave-one-out gain (how much the group's ``Σ((w − q(w))/R_jj)²`` drops when the
statistics are fitted without that weight) exceeds τ are replaced by their row's mean, so that likely
outliers do not stretch the group's range (the paper's Algorithm 1). The dequantized weight is the
dense group-quantized part (zero at outliers) plus the sparse fp16 outliers.

Storage (paper Sec. 4 and the official accounting): ``bits + (stat_bits + stat_bits)/β₁ + 2·32/(β₁β₂)
+ 32·outlier fraction`` bits per parameter (an outlier: 16-bit value + 16-bit column index).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import checks
from .layerwise import GramStats, collect_inputs, process_layerwise


@dataclass
class SpQRConfig:
    """``bits`` per weight (official ``--wbits``, 3–4 in the paper); ``group_size`` β₁ (``--groupsize``,
    16); ``stat_bits`` of the quantized scales and zeros (``--qq_scale_bits`` / ``--qq_zero_bits``, 3);
    ``stat_group`` β₂ (``--qq_groupsize``, 16); ``threshold``: τ relative to the mean column sensitivity
    (``--outlier_threshold``, 0.2; ``None``: no outliers); ``damp`` (``--percdamp``, 1e-2);
    ``block_size`` of the lazy GPTQ updates (128; does not change the result)."""

    bits: int = 3
    group_size: int = 16
    stat_bits: int = 3
    stat_group: int = 16
    threshold: float | None = 0.2
    damp: float = 1e-2
    block_size: int = 128

    def __post_init__(self) -> None:
        checks.integer("bits", self.bits, 1, 8)
        checks.integer("group_size", self.group_size, 2)
        checks.integer("stat_bits", self.stat_bits, 1, 16)
        checks.integer("stat_group", self.stat_group, 1)
        checks.number("threshold", self.threshold, 0, optional=True)
        checks.number("damp", self.damp, 0)
        checks.integer("block_size", self.block_size, 1)

    def bits_per_param(self, outlier_fraction: float) -> float:
        """Average storage bits per weight (the paper's formula)."""
        return (self.bits + 2 * self.stat_bits / self.group_size
                + 2 * 32 / (self.group_size * self.stat_group) + 32 * outlier_fraction)


@dataclass
class SpQRResult:
    """One quantized matrix: ``dense`` (group-quantized, 0 at outliers) + ``outliers`` (sparse, fp16)."""

    dense: torch.Tensor
    outliers: torch.Tensor  # sparse COO, float16
    codes: torch.Tensor  # integer codes of the dense part (uint8)

    def dequantized(self) -> torch.Tensor:
        return self.dense + self.outliers.to_dense().to(self.dense.dtype)

    @property
    def outlier_fraction(self) -> float:
        return self.outliers._nnz() / self.dense.numel()


def minmax_stats(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric min-max ``(scale, zero)`` per row of ``x``: ``x ≈ (round(x/scale + zero) − zero)·scale``."""
    lo, hi = x.min(-1).values, x.max(-1).values
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(1e-12)
    return scale, -lo / scale


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
               bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dequantized, codes)`` of ``x`` with per-row ``scale`` / ``zero`` (broadcast over the last dim)."""
    codes = torch.clamp(torch.round(x / scale[..., None] + zero[..., None]), 0, 2**bits - 1)
    return (codes - zero[..., None]) * scale[..., None], codes


def quantized_stat(values: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """The second level: ``values`` (one per row) min-max quantized to ``bits`` in groups of ``group`` rows."""
    n = values.numel()
    pad = (-n) % group
    grouped = torch.cat([values, values[-1:].expand(pad)]).reshape(-1, group)
    scale, zero = minmax_stats(grouped, bits)
    return fake_quant(grouped, scale, zero, bits)[0].flatten()[:n]


def group_stats(w: torch.Tensor, cfg: SpQRConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(scale, zero)`` of a column group, both quantized (second level); scale kept positive."""
    scale, zero = minmax_stats(w, cfg.bits)
    scale = quantized_stat(scale, cfg.stat_bits, cfg.stat_group).clamp_min(1e-12)
    return scale, quantized_stat(zero, cfg.stat_bits, cfg.stat_group)


def leave_one_out_gain(w: torch.Tensor, r_diag: torch.Tensor, bits: int) -> torch.Tensor:
    """Per weight of a column group: ``Σ_k ((w_k − q(w_k))/R_kk)²`` with the row's min-max statistics
    fitted on all its weights, minus the same sum over the others with statistics fitted without it."""
    g = w.shape[1]
    if g < 2:  # a last group of one column: nothing to leave out
        return torch.zeros_like(w)
    eye = torch.eye(g, dtype=torch.bool, device=w.device)
    others = torch.arange(g, device=w.device)[None].expand(g, g)[~eye].reshape(g, g - 1)
    loo = w[:, others]  # rows × left-out × (g − 1)
    scale, zero = minmax_stats(loo, bits)
    err_loo = ((fake_quant(loo, scale, zero, bits)[0] - loo) / r_diag[others]).square().sum(-1)
    scale, zero = minmax_stats(w, bits)
    err_all = ((fake_quant(w, scale, zero, bits)[0] - w) / r_diag).square().sum(-1, keepdim=True)
    return err_all - err_loo


def inverse_cholesky(gram: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(R, dead)``: the upper Cholesky factor of ``(H + damp·mean diag H·I)⁻¹`` (float64; dead inputs,
    never non-zero, get ``H_jj = 1``) and the dead-input mask."""
    h = gram.double().clone()
    dead = torch.diag(h) == 0
    idx = torch.arange(h.shape[0], device=h.device)
    h[idx, idx] += damp * torch.diag(h).mean()
    h[dead, dead] = 1
    inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inv, upper=True), dead


@torch.no_grad()
def spqr_quantize(weight: torch.Tensor, gram: torch.Tensor, cfg: SpQRConfig) -> SpQRResult:
    """SpQR of one ``out × in`` matrix given ``gram = XᵀX`` of its calibration inputs (module docstring)."""
    w = weight.detach().double().clone()
    r, dead = inverse_cholesky(2 * gram, cfg.damp)
    w[:, dead] = 0
    d = torch.diag(r)
    tau = torch.inf if cfg.threshold is None else cfg.threshold * float((w.var(dim=0) / d.square()).mean())
    rows, cols = w.shape
    dense = torch.zeros_like(w)
    codes = torch.zeros_like(w)
    outlier = torch.zeros_like(w, dtype=torch.bool)
    errors = torch.zeros_like(w)
    scale = zero = torch.zeros(0)
    for start in range(0, cols, cfg.block_size):
        end = min(start + cfg.block_size, cols)
        for j in range(start, end):
            if j % cfg.group_size == 0:
                group = w[:, j:j + cfg.group_size]
                likely = leave_one_out_gain(group, d[j:j + cfg.group_size], cfg.bits) > tau
                keep = (~likely).double()
                mean = (group * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp_min(1)
                scale, zero = group_stats(torch.where(likely, mean, group), cfg)
            col = w[:, j]
            q = fake_quant(col[:, None], scale, zero, cfg.bits)[0][:, 0]
            out = ((col - q) / d[j]).square() > tau
            q, code = fake_quant((col * ~out)[:, None], scale, zero, cfg.bits)
            kept = col.half().double()
            dense[:, j] = torch.where(out, 0.0, q[:, 0])
            codes[:, j] = code[:, 0]
            outlier[:, j] = out
            errors[:, j] = (col - torch.where(out, kept, q[:, 0])) / d[j]
            w[:, j + 1:end] -= errors[:, j:j + 1] * r[j, j + 1:end]
        w[:, end:] -= errors[:, start:end] @ r[start:end, end:]
    idx = outlier.nonzero().T
    sparse = torch.sparse_coo_tensor(idx, w[outlier].half(), (rows, cols), check_invariants=True).coalesce()
    return SpQRResult(dense.to(weight.dtype), sparse, codes.to(torch.uint8))


def spqr(model: nn.Module, data: Iterable, targets: set[str], progress: bool = False,
         **config: Any) -> dict[str, Any]:
    """Quantize the ``targets`` linears of ``model`` in place with SpQR, layer by layer on ``data``
    (their weights become the dequantized values); returns the per-layer and total outlier fractions and
    bits per parameter."""
    cfg = SpQRConfig(**config)
    fractions: dict[str, float] = {}
    sizes: dict[str, int] = {}

    def process(prefix: str, layer: nn.Module, forward: Any) -> None:
        linears, stats = collect_inputs(prefix, layer, targets, lambda m: GramStats(m.in_features, m.weight.device),
                                        forward)
        for sub, lin in linears.items():
            result = spqr_quantize(lin.weight, stats[sub].gram, cfg)
            lin.weight.copy_(result.dequantized())
            fractions[f"{prefix}.{sub}"] = result.outlier_fraction
            sizes[f"{prefix}.{sub}"] = lin.weight.numel()

    process_layerwise(model, data, process, "spqr", progress)
    total = sum(fractions[n] * sizes[n] for n in fractions) / max(sum(sizes.values()), 1)
    return {"outlier_fraction": total, "bits_per_param": cfg.bits_per_param(total), "outliers": fractions}
