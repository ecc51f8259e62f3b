"""Initializations of adapter factors: pure functions of the weight (and, for data-driven inits, of
an estimated full gradient), one contract for every adapter that has factors.

Each init is ``fn(weight, ctx) -> Factors`` with ``weight`` the fp32 W₀ (out × in) and ``ctx`` the
layer's :class:`InitContext` (its name, config, rank ``r``, scale ``s``, estimated gradient). The
factors give ΔW₀ = s·(P·B)·C·A: ``B`` (out × r), ``A`` (r × in), an optional core ``C`` (r×r, or r
for a diagonal core) and an optional row permutation P. ``Init`` states what the layer needs to know
without running the init: the core's shape, whether the init takes s·(P·B)·C·A out of the frozen
base (``moves_base``: W_base = W₀ − ΔW₀, so the adapted model starts equal to W₀), whether it needs
an estimated gradient, and whether the adapted model starts equal to the base.

LoRA-shaped inits (no core; ``init=`` of the LoRA layer): ``pissa`` (Meng et al. 2024), ``olora``
(Büyükakyüz 2024), ``lora_ga`` (Wang et al. 2024), ``loftq`` (Li et al. 2023) and ``lq_lora`` (Guo
et al. 2024), the last two also choosing the 4-bit base (``Factors.base``) by one shared alternation.
Core-matrix inits (the ``CoreLayer`` methods of ``core.py``): ``lora_xs`` (Bałazy et al. 2024),
``lora_sb`` (Ponkshe et al. 2024), ``loldu`` (Shi et al. 2024), ``svfit`` (Sun et al. 2024), ``pmss``
(Wang et al. 2024); ``nlora`` (Guo et al. 2025) is the Nyström init of the ``adapters.nlora`` layer.
Truncated SVDs come from :mod:`rankwise.linalg`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..linalg import deim_indices, truncated_svd
from ..quant import BLOCKSIZE, QuantConfig, Quantized, dequantize_tensor
from ..rng import layer_generator


@dataclass
class InitContext:
    """What an init may need beyond the weight: the layer name, an estimated gradient, a generator,
    the layer's config (set by ``adapt``; None when an init is called directly), and the rank and
    scale the layer chose (set by the layer before it calls the init)."""

    name: str = ""
    grad: torch.Tensor | None = None
    skip: bool = False  # build shapes only (tensors come from a checkpoint)
    generator: torch.Generator | None = None
    extra: dict = field(default_factory=dict)
    config: Any = None
    r: int = 0
    scale: float = 1.0


@dataclass
class Factors:
    """ΔW₀ = s·(P·B)·C·A: ``left`` B (out × r), ``right`` A (r × in), ``core`` C (r×r, r for a
    diagonal core, None for none) and ``row_perm`` (P·B == B[row_perm], None for no permutation)."""

    left: torch.Tensor
    right: torch.Tensor
    core: torch.Tensor | None = None
    row_perm: torch.Tensor | None = None
    base: Quantized | None = None  # the 4-bit frozen base the init chose (LoFTQ's Q_T), if it chose one


CORES = ("none", "full", "diagonal")


@dataclass(frozen=True)
class Init:
    """One initialization: ``fn(weight, ctx) -> Factors`` (None: the layer's own default init) and
    what the layer must know before running it."""

    fn: Callable[[torch.Tensor, InitContext], Factors] | None
    moves_base: bool = False  # the init took s·(P·B)·C·A out of the frozen base
    needs_grad: bool = False  # needs the estimated full gradient (init_data)
    core: str = "none"  # shape of the trainable core: "none" (ΔW = s·B·A), "full" (r×r) or "diagonal" (r)
    permuted: bool = False  # B carries a row permutation (LoLDU's P)
    identity: bool = True  # the adapted model starts equal to the base
    quantizes: bool = False  # the init returns the 4-bit base itself (``Factors.base``; needs a full-precision W₀)


# ---------------------------------------------------------------------- shared helpers
def context_generator(ctx: InitContext) -> torch.Generator:
    """``ctx.generator``, else a generator seeded from the config's seed and the layer name."""
    if ctx.generator is not None:
        return ctx.generator
    return layer_generator(int(getattr(ctx.config, "seed", 0)), ctx.name)


def ldu(w: torch.Tensor, r: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """LDU with partial pivoting: W = P·L·diag(d)·U, L unit lower-trapezoidal (out × k), U unit
    upper-trapezoidal (k × in), k = min(out, in). Returns ``(row_perm, L[:, :r], d[:r], U[:r])``
    (all k when ``r`` is None) with ``P·M == M[row_perm]``, the row permutation as indices."""
    p, lower, upper = torch.linalg.lu(w)
    k = lower.shape[1] if r is None else r
    d = torch.diagonal(upper)[:k].clone()
    if bool((d == 0).any()):
        raise ValueError(
            f"the weight has a zero LU pivot among its first {k}: its LDU factors are undefined there; "
            "choose a smaller r"
        )
    return p.argmax(dim=1), lower[:, :k], d, upper[:k] / d[:, None]


# ---------------------------------------------------------------------- LoRA-shaped inits
def pissa_init(weight: torch.Tensor, ctx: InitContext) -> Factors:
    """PiSSA (Meng et al. 2024, arXiv 2404.02948, Sec. 3): W₀ = U S Vᵀ; B = U_r (S_r/s)^{1/2},
    A = (S_r/s)^{1/2} V_rᵀ so s·B·A = U_r S_r V_rᵀ (the principal part); W_res = W₀ − s·B·A.
    Same factors as PEFT's ``pissa_init``; ``init_iters=k`` uses a randomized SVD (Sec. 4.4)."""
    iters = int(getattr(ctx.config, "init_iters", 0))
    u, s, vh = truncated_svd(weight, ctx.r, iters, context_generator(ctx) if iters else None)
    root = torch.sqrt(s / ctx.scale)
    return Factors(u * root, root[:, None] * vh)


def olora_init(weight: torch.Tensor, ctx: InitContext) -> Factors:
    """OLoRA (Büyükakyüz 2024, arXiv 2406.01775, Sec. 3): W₀ = QR (reduced QR of the out × in
    weight); B = Q[:, :r] (orthonormal columns, BᵀB = I_r), A = R[:r, :]; W_base = W₀ − s·B·A.
    As PEFT's ``olora_init``: no division by the scale."""
    q, rr = torch.linalg.qr(weight)
    return Factors(q[:, : ctx.r], rr[: ctx.r, :])


def lora_ga_init(weight: torch.Tensor, ctx: InitContext) -> Factors:
    """LoRA-GA (Wang et al. 2024, arXiv 2407.05000, Sec. 3.2 Thm 3.1 and Sec. 3.3 Thm 3.2): from
    the SVD G = U S Vᵀ of the estimated full gradient, A₀ = ζ·V[:, :r]ᵀ, B₀ = ζ·U[:, r:2r] with the
    stable scale ζ = d_out^{1/4}/√γ; W_base = W₀ − s·B₀A₀. Then the first LoRA step
    s(B₀ g_A + g_B A₀) = s²ζ² · (best rank-2r approximation of G). This is the paper's rule and the
    official code's default (direction "ArB2r", scale "stable"); PEFT 0.21.2's ``lora_ga`` differs
    (it folds S into B and scales only B), so there is no PEFT parity for this init."""
    if ctx.grad is None:
        raise ValueError("init='lora_ga' needs the estimated gradient (pass init_data to rw.adapt)")
    r = ctx.r
    out_features, in_features = weight.shape
    if 2 * r > min(out_features, in_features):
        raise ValueError(
            f"r={r} is too large for LoRA-GA on '{ctx.name}' ({out_features}x{in_features}): "
            f"it uses 2r singular vectors; choose r <= {min(out_features, in_features) // 2}"
        )
    gamma = float(getattr(ctx.config, "stable_gamma", 16.0))
    iters = int(getattr(ctx.config, "init_iters", 0))
    grad = ctx.grad.to(device=weight.device, dtype=torch.float32)
    u, _, vh = truncated_svd(grad, 2 * r, iters, context_generator(ctx) if iters else None)
    zeta = out_features**0.25 / math.sqrt(gamma)
    return Factors(zeta * u[:, r : 2 * r], zeta * vh[:r])


def lora_one_init(weight: torch.Tensor, ctx: InitContext) -> Factors:
    """LoRA-One (Zhang, Liu & Chen 2025, arXiv 2502.01235, "One-Step Full Gradient Could Suffice for
    Fine-Tuning Large Language Models, Provably and Efficiently", Alg. 1, spectral init): from the SVD
    −G = U S Vᵀ of the negative estimated full gradient, B₀ = U_r S_r^{1/2}/√(γ·s₁) and
    A₀ = S_r^{1/2} V_rᵀ/√(γ·s₁) (s₁ the top singular value; the official code's "stable" scale), so
    B₀A₀ = U_r S_r V_rᵀ/(γ·s₁): the best rank-r approximation of one full gradient-descent step,
    normalized by ‖G‖₂. Unlike LoRA-GA, B and A share the *top* r singular pairs (LoRA-GA takes B from
    pairs r+1..2r), S is kept in the factors, and the base is NOT offset: the adapted model starts at
    W₀ + s·B₀A₀, one (rank-r, normalized) full fine-tuning step from W₀ (``identity=False``)."""
    if ctx.grad is None:
        raise ValueError("init='lora_one' needs the estimated gradient (pass init_data to rw.adapt)")
    gamma = float(getattr(ctx.config, "stable_gamma", 128.0))
    iters = int(getattr(ctx.config, "init_iters", 0))
    grad = ctx.grad.to(device=weight.device, dtype=torch.float32)
    u, s, vh = truncated_svd(-grad, ctx.r, iters, context_generator(ctx) if iters else None)
    if float(s[0]) == 0.0:
        raise ValueError(f"init='lora_one': the estimated gradient of '{ctx.name}' is zero; its spectral init "
                         "is undefined (check init_data and the loss)")
    root = torch.sqrt(s / (gamma * s[0]))
    return Factors(u * root, root[:, None] * vh)


def riemannlora_init(weight: torch.Tensor, ctx: InitContext) -> Factors:
    """RiemannLoRA's locally optimal initialization (Bogachev et al. 2025, arXiv 2507.12142): the point
    X₀ ∈ M_r whose tangent space holds the largest part of the estimated full gradient G = U S Vᵀ. With
    B₀ ∝ U[:, :r] and A₀ ∝ V[:, r:2r]ᵀ the tangent projection P_T(G) = UUᵀG + GVVᵀ − UUᵀGVVᵀ is the best
    rank-2r approximation of G (the maximum of ‖P_T(G)‖ over M_r); X₀ = s·B₀A₀ has every singular value
    equal to ``init_scale`` and is taken out of the base (W_base = W₀ − X₀), so the model starts at W₀."""
    if ctx.grad is None:
        raise ValueError("init='riemannlora' needs the estimated gradient (pass init_data to rw.adapt)")
    r = ctx.r
    out_features, in_features = weight.shape
    if 2 * r > min(out_features, in_features):
        raise ValueError(f"r={r} is too large for RiemannLoRA's init on '{ctx.name}' ({out_features}x{in_features}): "
                         f"it uses 2r singular vectors; choose r <= {min(out_features, in_features) // 2}")
    iters = int(getattr(ctx.config, "init_iters", 0))
    grad = ctx.grad.to(device=weight.device, dtype=torch.float32)
    u, s, vh = truncated_svd(grad, 2 * r, iters, context_generator(ctx) if iters else None)
    if float(s[0]) == 0.0:
        raise ValueError(f"init='riemannlora': the estimated gradient of '{ctx.name}' is zero (check init_data)")
    root = math.sqrt(float(getattr(ctx.config, "init_scale", 1e-3)) / ctx.scale)
    return Factors(root * u[:, :r], root * vh[r : 2 * r])


def eva_init(weight: torch.Tensor, ctx: InitContext) -> Factors:
    """EVA (Paischer et al. 2024, arXiv 2410.07170): A = the layer's top right-singular vectors of its
    centred inputs X (tokens × in), computed over ``init_data`` by ``adapters.eva`` (incremental SVD and
    rank redistribution; handed over as ``ctx.extra["plan"]``, r_l' × in), B = 0: the model starts at
    the base."""
    a = ctx.extra.get("plan")
    if a is None:
        raise ValueError(f"init='eva' on '{ctx.name}' needs EVA's data pass over init_data: use method 'eva'")
    return Factors(torch.zeros(weight.shape[0], a.shape[0], device=weight.device), a.to(weight.device))


@dataclass
class QuantizedLowRank:
    """W ≈ deq(Q) + s·B·A from :func:`quantized_low_rank`; ``errors[t]`` = ‖W − deq(Q_t) − s·B_t·A_t‖_F
    after each alternation t that was kept (fp32)."""

    base: Quantized
    left: torch.Tensor
    right: torch.Tensor
    errors: list[float]


def quantized_low_rank(
    weight: torch.Tensor,
    ctx: InitContext,
    qconfig: QuantConfig,
    iters: int,
    *,
    svd_first: bool,
    stop_on_increase: bool = False,
) -> QuantizedLowRank:
    """The alternation shared by LoftQ and LQ-LoRA: Q = q(W − s·B·A) (bitsandbytes, ``qconfig``) and
    s·B·A = best rank-r approximation of W − deq(Q) (truncated SVD U_r S_r V_rᵀ, split as PiSSA does:
    B = U_r (S_r/s)^{1/2}, A = (S_r/s)^{1/2} V_rᵀ), ``iters`` times. ``svd_first``: start from Q = 0
    with the SVD (LQ-LoRA, Guo et al. 2024, Alg. 1), else from B·A = 0 with the quantization (LoftQ,
    Li et al. 2023, Alg. 1). ``stop_on_increase``: stop as soon as an alternation raises
    ‖W − deq(Q) − s·B·A‖_F and keep the one before (LQ-LoRA). ``init_iters=k`` in the config:
    randomized SVDs."""
    svd_iters = int(getattr(ctx.config, "init_iters", 0))
    w = weight.float()
    low_rank = deq = torch.zeros_like(w)
    kept: QuantizedLowRank | None = None
    errors: list[float] = []
    for t in range(2 * iters):
        if (t % 2 == 0) == svd_first:  # the SVD half-step
            u, s, vh = truncated_svd(w - deq, ctx.r, svd_iters, context_generator(ctx) if svd_iters else None)
            root = torch.sqrt(s / ctx.scale)
            b, a = u * root, root[:, None] * vh
            low_rank = (u * s) @ vh  # = s·B·A
        else:
            q = qconfig.quantize(w - low_rank)
            deq = dequantize_tensor(q).float()
        if t % 2 == 1:  # a whole alternation: both parts are set
            err = float((w - deq - low_rank).norm())
            if stop_on_increase and errors and err > errors[-1]:
                break
            errors.append(err)
            kept = QuantizedLowRank(q, b, a, errors)
    assert kept is not None
    return kept


def loftq_init(weight: torch.Tensor, ctx: InitContext) -> Factors:
    """LoftQ (Li et al. 2023, arXiv 2310.08659, Algorithm 1): alternate, for t = 1..T
    (``loftq_iter``), Q_t = q_N(W − s·B_{t−1}A_{t−1}) (bitsandbytes NF4/FP4, ``quant_type``,
    ``double_quant``; B₀A₀ = 0) and s·B_t·A_t = best rank-r approximation of W − Q_t (truncated SVD
    U_r S_r V_rᵀ, split as PiSSA does: B = U_r (S_r/s)^{1/2}, A = (S_r/s)^{1/2} V_rᵀ, so the LoRA scale
    s is accounted for; PEFT's ``loftq_init`` assumes s = 1). The frozen base becomes Q_T (returned
    as ``Factors.base``, 4-bit) and the adapter starts at B_T, A_T, so the model starts at
    Q_T + s·B_T·A_T ≈ W: ‖W − Q_T − s·B_T·A_T‖_F is the tail of the spectrum of W − Q_T, at most
    QLoRA's ‖W − q_N(W)‖_F. T = 1 is the paper's and PEFT's default. ``init_iters=k``: randomized SVDs
    (k power iterations) instead of exact ones (W − Q_t has a flat spectrum: less accurate than for PiSSA)."""
    qconfig = QuantConfig(str(getattr(ctx.config, "quant_type", "nf4")), BLOCKSIZE,
                          bool(getattr(ctx.config, "double_quant", True)))
    d = quantized_low_rank(weight, ctx, qconfig, int(getattr(ctx.config, "loftq_iter", 1)), svd_first=False)
    return Factors(d.left, d.right, base=d.base)


def lq_lora_init(weight: torch.Tensor, ctx: InitContext) -> Factors:
    """LQ-LoRA (Guo et al. 2024, arXiv 2311.12023, Alg. 1): from Q = 0 alternate s·B·A = rank-r SVD
    of W − deq(Q) and Q = q(W − s·B·A), ``lq_iter`` times, stopping when the error rises. The
    quantization config is the layer's ILP choice (``ctx.extra["quant_config"]``, set by the
    ``lq_lora`` layer), else NF4, blocks of 64, double quantization (QLoRA's)."""
    qconfig = ctx.extra.get("quant_config") or QuantConfig()
    d = quantized_low_rank(weight, ctx, qconfig, int(getattr(ctx.config, "lq_iter", 1)), svd_first=True,
                           stop_on_increase=True)
    ctx.extra["lq_errors"] = d.errors
    return Factors(d.left, d.right, base=d.base)


# ---------------------------------------------------------------------- core-matrix inits
def lora_xs_init(weight: torch.Tensor, ctx: InitContext) -> Factors:
    """LoRA-XS (arXiv 2405.17604, Sec. 3): B = U_r, A = S_r V_rᵀ, R ~ N(0, init_std²)."""
    u, s, vh = truncated_svd(weight, ctx.r)
    noise = torch.randn(ctx.r, ctx.r, generator=context_generator(ctx))
    return Factors(u, s[:, None] * vh, core=noise.to(weight.device) * ctx.config.init_std)


def lora_sb_init(weight: torch.Tensor, ctx: InitContext) -> Factors:
    """LoRA-SB (arXiv 2411.19557, Sec. 4): ΔW₁ = −η·A(Ḡ) ≈ U S Vᵀ; B = U_r, R = S_r/s, A = V_rᵀ."""
    if ctx.grad is None:
        raise ValueError("method 'lora_sb' needs the estimated gradient (pass init_data to rw.adapt)")
    grad = ctx.grad.to(device=weight.device, dtype=torch.float32)
    step = torch.sign(grad) if ctx.config.update == "adam" else grad
    u, s, vh = truncated_svd(-ctx.config.init_lr * step, ctx.r)
    return Factors(u, vh, core=torch.diag(s) / ctx.scale)


def loldu_init(weight: torch.Tensor, ctx: InitContext) -> Factors:
    """LoLDU (arXiv 2410.13618, Sec. 3): W₀ = P L D U; B = P·L_r, z = D_r (trainable), A = U_r."""
    perm, lower, d, upper = ldu(weight, ctx.r)
    return Factors(lower, upper, core=d, row_perm=perm)


def svfit_init(weight: torch.Tensor, ctx: InitContext) -> Factors:
    """SVFit (arXiv 2409.05926, Sec. III): W_r = U_r diag(σ_r) V_rᵀ with σ_r trainable."""
    u, s, vh = truncated_svd(weight, ctx.r)
    return Factors(u, vh, core=s)


def sorsa_init(weight: torch.Tensor, ctx: InitContext) -> Factors:
    """SORSA (Cao 2024, arXiv 2409.00055, Sec. 3): W₀ = U Σ Vᵀ; the principal part
    W_p = U_p diag(σ_p) V_pᵀ with U_p = U[:, :r] (B), σ_p = σ[:r] (the diagonal core, trainable) and
    V_pᵀ = Vᵀ[:r] (A), all three trained; W_res = W₀ − s·W_p stays frozen, so the model starts at W₀.
    ``init_iters=k``: a randomized SVD."""
    iters = int(getattr(ctx.config, "init_iters", 0))
    u, s, vh = truncated_svd(weight, ctx.r, iters, context_generator(ctx) if iters else None)
    return Factors(u, vh, core=s)


def pmss_init(weight: torch.Tensor, ctx: InitContext) -> Factors:
    """PMSS (Wang et al. 2024, arXiv 2409.16722, COLING 2025): W₀ ≈ C·U·R with C = W₀[:, J] and
    R = W₀[I, :] exact skeleton columns / rows of W₀ (frozen) and U (r × r) the trained core. Our
    reading (the paper's text is not reachable from here and its code was never released): the r
    skeletons are chosen by DEIM on the top-r left / right singular vectors of W₀ (DEIM-CUR, Sorensen &
    Embree 2016) and U₀ = C⁺·W₀·R⁺, the core that minimises ‖W₀ − C·U·R‖_F for these skeletons; the
    product s·C·U₀·R moves out of the base, so the model starts at W₀. ``init_iters=k``: randomized SVD."""
    iters = int(getattr(ctx.config, "init_iters", 0))
    u, _, vh = truncated_svd(weight, ctx.r, iters, context_generator(ctx) if iters else None)
    rows, cols = deim_indices(u), deim_indices(vh.T)
    c, r = weight[:, cols], weight[rows, :]
    core = torch.linalg.pinv(c) @ weight @ torch.linalg.pinv(r)
    return Factors(c, r, core=core / ctx.scale)


def skeleton_indices(n: int, r: int, sampling: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """r of ``n`` indices: the first r (``"first"``) or r drawn uniformly without replacement, sorted
    (``"uniform"``, the classic Nyström sampling)."""
    if sampling == "first":
        return torch.arange(r)
    return torch.randperm(n, generator=generator)[:r].sort().values


def nystrom_init(weight: torch.Tensor, ctx: InitContext) -> Factors:
    """NLoRA (Guo, Chang & Wu 2025, arXiv 2502.14482, Fig. 3): W₀ is partitioned around r sampled rows I
    and columns J; B = C = W₀[:, J], A = R = W₀[I, :] and the r×r core M = K/s with K = W₀[I, J]⁺
    (``core_init="pinv"``: s·B·M·A = C·W₀[I, J]⁺·R, the Nyström approximation of W₀, exact when
    rank W₀[I, J] = rank W₀) or K = W₀[I, J] (``"intersection"``, the official code's ``nlora_init``).
    ``sampling``: the first r rows / columns (the official code) or uniform ones (seeded)."""
    cfg = ctx.config
    sampling = str(getattr(cfg, "sampling", "first"))
    gen = context_generator(ctx) if sampling != "first" else None
    rows = skeleton_indices(weight.shape[0], ctx.r, sampling, gen).to(weight.device)
    cols = skeleton_indices(weight.shape[1], ctx.r, sampling, gen).to(weight.device)
    corner = weight[rows][:, cols]
    core = torch.linalg.pinv(corner) if getattr(cfg, "core_init", "intersection") == "pinv" else corner
    return Factors(weight[:, cols], weight[rows, :], core=core / ctx.scale)


#: Every initialization by name ("default": the layer's own, e.g. LoRA's A ~ U(±1/√k), B = 0).
INITS: dict[str, Init] = {
    "default": Init(None),
    "pissa": Init(pissa_init, moves_base=True),
    "olora": Init(olora_init, moves_base=True),
    "lora_ga": Init(lora_ga_init, moves_base=True, needs_grad=True),
    "eva": Init(eva_init),
    "lora_one": Init(lora_one_init, needs_grad=True, identity=False),
    "riemannlora": Init(riemannlora_init, moves_base=True, needs_grad=True),
    "loftq": Init(loftq_init, moves_base=True, identity=False, quantizes=True),
    "lq_lora": Init(lq_lora_init, moves_base=True, identity=False, quantizes=True),
    "lora_xs": Init(lora_xs_init, core="full"),
    "lora_sb": Init(lora_sb_init, needs_grad=True, core="full", identity=False),
    "loldu": Init(loldu_init, moves_base=True, core="diagonal", permuted=True),
    "svfit": Init(svfit_init, moves_base=True, core="diagonal"),
    "sorsa": Init(sorsa_init, moves_base=True, core="diagonal"),
    "pmss": Init(pmss_init, moves_base=True, core="full"),
    "nlora": Init(nystrom_init, moves_base=True, core="full"),  # unless NLoRAConfig.residual is False
}


def lora_inits() -> list[str]:
    """The inits of LoRA-shaped factors (no core): the values ``LoRAConfig.init`` accepts."""
    return [name for name, init in INITS.items() if init.core == "none"]
