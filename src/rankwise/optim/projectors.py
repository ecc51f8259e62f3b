"""Subspace strategies for projected optimizers: find a rank-r basis, project a gradient, project back.

Every projector is a small object built per parameter from ``(rank, side, shape, opts)``; **all of
its state lives in the optimizer's per-parameter state dict as plain tensors / ints** (so
``optimizer.state_dict()`` is complete and loads with ``torch.load(weights_only=True)``). Derived
dense matrices are cached on the object only: the regenerated Gaussian across steps (as apollo-torch
keeps it), the DCT columns and the dequantized INT4 basis only within one step (``post_update`` drops
them). Whatever a projector keeps between steps is listed by ``resident_tensors`` and counted by
the optimizer's ``state_bytes()``. The DCT basis is shared through the optimizer's ``shared`` dict.

Sides follow galore-torch's ``proj_type``: for G ∈ R^{m×n}, a *left* projector keeps P ∈ R^{m×r}
and R = PᵀG (r×n), back = P·N; a *right* projector keeps P ∈ R^{r×n} and R = G·Pᵀ (m×r),
back = N·P. ``std`` projects the smaller side (right when m ≥ n, left otherwise), ``reverse_std``
the larger one.

Strategies (``PROJECTORS``):

* ``svd`` — top-r singular vectors of G by the exact (LAPACK) SVD (GaLore, Zhao et al. 2024, Alg. 2
  "Adam with GaLore");
* ``rsvd`` — the same subspace from a randomized range finder with power iterations (Halko,
  Martinsson & Tropp 2011, Alg. 4.4), warm-started from the previous basis: the default of every
  SVD-based optimizer (it captures ≥ 0.99 of the exact top-r energy on decaying-spectrum gradients,
  ``tests/optim/test_fast_projector.py``);
* ``gaussian`` — P with i.i.d. N(0, 1/r) entries regenerated bit-exactly from an int seed (APOLLO,
  Zhu et al. 2024; Flora, Hao et al. 2024); only the seed is stored;
* ``dct`` — r columns of the orthonormal DCT-II matrix D picked by the largest ‖Dᵀ G‖ column/row
  norms (Modoranu et al. 2025, "SVD-Free Low-Rank Adaptive Gradient Optimization", dynamic column selection); only the
  int index tensor is stored;
* ``svd_int4`` / ``rsvd_int4`` — the ``svd`` / ``rsvd`` basis stored as packed INT4 with per-group
  scales (Q-GaLore, Zhang et al. 2024);
* ``coords`` — r random coordinates (columns or rows) (FRUGAL, Zmushko et al. 2024, RandK);
* ``blocks`` — a contiguous block of r columns/rows that moves cyclically at each refresh (BAdam-style
  block coordinate selection inside the matrix);
* ``online`` — P updated every step by one AdamW step on the online-PCA loss ‖Ĝ − proj_P(Ĝ)‖²,
  Ĝ = G/‖G‖ (Online Subspace Descent, Liang et al. 2024); initialised without SVD by default.
* ``coap`` — every ``update_gap`` steps P takes one gradient step on COAP's correlation-aware loss
  (reconstruction error of G times one minus the cosine between the projected-back first moment and
  G), and every ``reproject_factor``-th time it is recomputed by a one-pass range finder started from
  the previous P (Xiao et al. 2025, "COAP: Memory-Efficient Training with Correlation-Aware Gradient
  Projection", Eq. 5–6); no SVD of G, only of an r×n sketch.
* ``cross_head`` — one basis for all attention heads of a weight, found by the range finder on one
  randomly drawn head's gradient block (GaLore+, Liao et al. 2024, cross-head projection); no exact
  SVD, not even as a fallback.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..checks import choice
from . import quant
from .sharding import RowShardedOperand, all_finite, full, is_dtensor, like, like_rows, row_sharded

SIDES = ("std", "reverse_std", "left", "right")

State = dict[str, Any]


def resolve_side(proj_side: str, shape: torch.Size | tuple[int, ...]) -> str:
    """``'left'`` or ``'right'`` for a gradient of ``shape`` under galore-torch's ``proj_type`` rule."""
    choice("proj_side", proj_side, SIDES)
    m, n = int(shape[0]), int(shape[1])
    if proj_side == "std":
        return "right" if m >= n else "left"
    if proj_side == "reverse_std":
        return "left" if m >= n else "right"
    return proj_side


def advance_seed(seed: int, steps: int = 15) -> int:
    """Next seed of a seed chain: the last of ``steps`` int64 draws from a generator seeded with ``seed``.

    The same chain rule as apollo-torch / flora-opt (so APOLLO's random projections match apollo-torch).
    """
    gen = torch.Generator().manual_seed(int(seed))
    return int(torch.randint(0, torch.iinfo(torch.int64).max, (steps,), generator=gen)[-1])


def seeded_gaussian(shape: tuple[int, int], seed: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """N(0, 1) tensor regenerated bit-exactly from ``seed`` on ``device``."""
    gen = torch.Generator(device=device).manual_seed(int(seed))
    return torch.randn(shape, generator=gen, device=device, dtype=dtype)


def next_proj_seed(state: State) -> int:
    """The seed chain per parameter: first refresh uses ``state['seed']``, each later one advances it."""
    prev = state.get("proj_seed")
    return int(state.get("seed", 0)) if prev is None else advance_seed(prev)


def _bump(state: State) -> None:
    state["proj_version"] = int(state.get("proj_version", 0)) + 1


_CLASSES: dict[str, type[Projector]] = {}


def _register(cls: type[Projector]) -> type[Projector]:
    """Add a projector class under its ``name``: a new strategy is one decorated class."""
    _CLASSES[cls.name] = cls
    return cls


class Projector:
    """Base class. Subclasses implement ``compute`` and either ``matrix`` (dense) or project/back."""

    name = "base"
    periodic = True  # refreshed every ``update_gap`` steps (``online`` refreshes itself every step)
    orthonormal = True  # P has orthonormal columns/rows, so ‖proj(G)‖²/‖G‖² is the captured energy
    sharded_refresh = False  # compute() takes a row-sharded DTensor G as is (else it gets the gathered G)
    step_cache = False  # True: the dense-matrix cache lives for one step only (dropped by post_update)
    state_keys: tuple[str, ...] = ()
    options: tuple[str, ...] = ()  # the group keys this strategy reads (passed to it as ``opts``)

    def __init__(
        self,
        rank: int,
        side: str,
        shape: tuple[int, int],
        opts: dict[str, Any] | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        shared: dict[Any, torch.Tensor] | None = None,
    ):
        self.rank, self.side, self.shape = int(rank), side, (int(shape[0]), int(shape[1]))
        self.opts = dict(opts or {})
        self.device, self.dtype = torch.device(device), dtype
        self.shared = {} if shared is None else shared  # tensors shared by an optimizer's projectors
        self._cache: tuple[int, torch.Tensor] | None = None

    def resident_tensors(self) -> list[torch.Tensor]:
        """Tensors this object keeps between steps besides the optimizer state (its cache now)."""
        return [] if self._cache is None else [self._cache[1]]

    @property
    def dim(self) -> int:
        """Length of the projected side (m for left, n for right)."""
        return self.shape[0] if self.side == "left" else self.shape[1]

    def has_basis(self, state: State) -> bool:
        return "proj_version" in state

    def compute(self, G: torch.Tensor, state: State) -> torch.Tensor | None:  # pragma: no cover - abstract
        """Refresh the basis from G; return ``project(G)`` when it falls out of the computation, else None."""
        raise NotImplementedError

    def matrix(self, state: State) -> torch.Tensor:  # pragma: no cover - abstract
        """Dense P: m×r (left) or r×n (right)."""
        raise NotImplementedError

    def project(self, G: torch.Tensor, state: State) -> torch.Tensor:
        P = like(self.matrix(state), G)  # a replicated DTensor when G is one (FSDP2), see sharding.py
        return P.t() @ G if self.side == "left" else G @ P.t()

    def back(self, N: torch.Tensor, state: State) -> torch.Tensor:
        if self.side == "left":  # FSDP2: P's rows are the weight's, so P·N comes out sharded like it
            return like_rows(self.matrix(state), N) @ N
        return N @ like(self.matrix(state), N)

    def dense(self, state: State) -> torch.Tensor | None:
        """P as a plain tensor when ``project``/``back`` are the dense products with it (so the engine
        may compute back(N) a block of rows at a time, ``fused.py``); None for other projectors."""
        cls = type(self)
        if cls.back is not Projector.back or cls.project is not Projector.project:
            return None
        P = self.matrix(state)
        return None if is_dtensor(P) else P

    def basis(self, state: State) -> torch.Tensor:
        """Basis as columns (dim×r), used to carry moments across a subspace change."""
        P = self.matrix(state)
        return P if self.side == "left" else P.t()

    def post_update(self, G: torch.Tensor, state: State) -> None:
        """Called after the parameter update (online projectors move P here; a one-step cache is dropped)."""
        if self.step_cache:
            self._cache = None

    def _cached(self, state: State, build) -> torch.Tensor:
        version = int(state["proj_version"])
        if self._cache is None or self._cache[0] != version:
            self._cache = (version, build())
        return self._cache[1]

    def robust_basis(
        self, G: torch.Tensor, state: State, order: tuple[str, ...] = ("exact", "randomized"),
        start: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(P, project(G) or None)``: the SVD basis of G by the first of ``order`` that works.

        ``"exact"`` is the truncated LAPACK SVD (:func:`svd_basis`), ``"randomized"`` the range finder
        (:func:`randomized_basis`, warm-started from ``start``). A method works when it neither raises
        (``torch.linalg.LinAlgError``: no convergence, non-finite input) nor returns a non-finite basis.
        When none works the previous basis is kept (the first r coordinates when there is none yet, so
        the update never collapses to zero). Every refresh that needed a fallback adds 1 to
        ``state["svd_fallbacks"]`` (saved with the state; ``ProjectedOptimizer.svd_fallbacks`` sums them).
        """
        for i, method in enumerate(order):
            try:
                if method == "exact":  # under FSDP2 from the gathered G
                    P, projected = svd_basis(full(G), self.rank, self.side), None
                else:
                    seed = advance_seed(int(state.get("seed", 0)) + int(state.get("svd_fallbacks", 0)))
                    if "proj_seed" in self.state_keys:
                        seed = next_proj_seed(state)
                        state["proj_seed"] = seed
                    gen = torch.Generator(device=G.device).manual_seed(seed)
                    P, projected = randomized_basis(G, self.rank, self.side, gen, start, self.opts)
            except RuntimeError:  # torch.linalg.LinAlgError and friends
                continue
            if bool(torch.isfinite(P).all()) and (projected is None or all_finite(projected)):
                if i:
                    state["svd_fallbacks"] = int(state.get("svd_fallbacks", 0)) + 1
                return P, projected
        state["svd_fallbacks"] = int(state.get("svd_fallbacks", 0)) + 1
        if self.has_basis(state):
            return self.matrix(state).clone(), None
        return identity_basis(self.dim, self.rank, self.side, G.device, G.dtype), None


# ----------------------------------------------------------------------------- SVD family


def _float(G: torch.Tensor) -> torch.Tensor:
    return G if G.dtype == torch.float32 or G.dtype == torch.float64 else G.float()


def svd_basis(G: torch.Tensor, rank: int, side: str) -> torch.Tensor:
    """GaLore's projector: U[:, :r] (left, m×r) or Vh[:r] (right, r×n) of the exact SVD of G."""
    U, _, Vh = torch.linalg.svd(_float(G), full_matrices=False)
    P = U[:, :rank] if side == "left" else Vh[:rank, :]
    # a copy: the slice Vh[:r] is a view that would keep the whole min(m, n)×n factor alive
    return P.to(dtype=G.dtype, memory_format=torch.contiguous_format, copy=True)


class DenseOperand:
    """A matrix held whole, with the products the range finder needs (:func:`randomized_left_basis`);
    ``sharding.RowShardedOperand`` is the same interface over a row-sharded gradient (FSDP2)."""

    def __init__(self, A: torch.Tensor):
        self.A = A

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.A.shape[0]), int(self.A.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self.A.dtype

    @property
    def device(self) -> torch.device:
        return self.A.device

    def amax(self) -> float:
        return float(self.A.abs().amax()) if self.A.numel() else 0.0

    def scaled(self, s: float) -> DenseOperand:
        return DenseOperand(self.A / s)

    def cast(self, dtype: torch.dtype) -> DenseOperand:
        return DenseOperand(self.A.to(dtype))

    def sketch(self, X: torch.Tensor) -> torch.Tensor:
        return self.A @ X

    def gram(self, Q: torch.Tensor) -> torch.Tensor:
        return self.A @ (self.A.t() @ Q)

    def rows(self, Q: torch.Tensor) -> torch.Tensor:
        return Q.t() @ self.A

    def gram_of(self, B: torch.Tensor) -> torch.Tensor:
        return B @ B.t()

    def lift(self, X: torch.Tensor) -> torch.Tensor:
        return X


def randomized_left_basis(
    A: torch.Tensor | Any,
    rank: int,
    oversample: int = 8,
    power_iters: int = 1,
    start: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    power_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Approximate top-``rank`` left singular vectors U (m×r) of A (m×n), and UᵀA (r×n) with them.

    Subspace iteration with a Rayleigh-Ritz step (Halko et al. 2011, Alg. 4.3/5.1): an orthonormal
    start Q (m×k, k = rank + oversample), ``power_iters`` rounds of Q ← qr(A·(AᵀQ)), then B = QᵀA and
    the top-r eigenvectors W of the k×k Gram B·Bᵀ (float64 ``eigh``; they are B's left singular
    vectors), U = Q·W. UᵀA = WᵀB comes for free, which saves the caller one projection of A.
    Cold start: Q = qr(A·Ω) for a Gaussian Ω (n×k). Warm start: ``start`` (m×r', the previous
    orthonormal basis) plus k − r' Gaussian columns orthonormalized against it, so consecutive
    refreshes continue one subspace iteration at the cost of ``power_iters`` extra passes over A; each
    warm-started vector gets the sign that points it like the previous basis's vector of the same rank
    (so the moments GaLore keeps across a refresh and Q-GaLore's cosine test see a continuous basis).
    A is first divided by a power of two near max|A| (exact; undone on UᵀA) so that huge gradients do
    not overflow the Gram matrix.

    A is a tensor or an operand (:class:`DenseOperand`, ``sharding.RowShardedOperand``): A enters
    only through its products, so a row-sharded gradient runs the same steps on its shards (Q, U and
    the draws are the same on every rank; UᵀA comes back as a DTensor).
    """
    op = DenseOperand(A) if torch.is_tensor(A) else A
    scale = _pow2(op.amax())  # exact; a huge A would overflow the Gram matrix B·Bᵀ
    if scale != 1.0:
        op = op.scaled(scale)
    m, n = op.shape
    k = min(rank + oversample, m, n)
    if start is None:
        omega = torch.randn((n, k), generator=generator, device=op.device, dtype=op.dtype)
        Q = torch.linalg.qr(op.sketch(omega)).Q
    else:
        Q = start.to(op.dtype)
        extra = k - Q.shape[1]
        if extra > 0:
            R = torch.randn((m, extra), generator=generator, device=op.device, dtype=op.dtype)
            R = R - Q @ (Q.t() @ R)
            Q = torch.cat([Q, torch.linalg.qr(R).Q], dim=1)
    Ap = op if power_dtype is None or power_iters == 0 else op.cast(power_dtype)
    for _ in range(power_iters):
        Qp = Q.to(Ap.dtype)
        Q = torch.linalg.qr(Ap.gram(Qp).to(op.dtype)).Q
    B = op.rows(Q)
    _, vecs = torch.linalg.eigh(op.gram_of(B).double())  # ascending eigenvalues
    W = vecs[:, -rank:].flip(1).to(op.dtype)
    U = Q @ W
    if start is not None:  # eigenvector signs are arbitrary: keep each vector pointing like its predecessor
        s = min(rank, start.shape[1])
        flip = (start[:, :s].to(op.dtype) * U[:, :s]).sum(0) < 0
        sign = torch.ones(rank, device=op.device, dtype=op.dtype)
        sign[:s] = 1.0 - 2.0 * flip.to(op.dtype)
        U, W = U * sign, W * sign
    UtA = op.lift(W.t() @ B)
    return U, UtA if scale == 1.0 else UtA * scale


def identity_basis(dim: int, rank: int, side: str, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """The first ``rank`` coordinate vectors: I[:, :r] (left, dim×r) or I[:r] (right, r×dim)."""
    E = torch.eye(dim, rank, device=device, dtype=dtype)
    return E if side == "left" else E.t().contiguous()


def power_of_two_scale(A: torch.Tensor) -> float:
    """2^e with max|A| in [2^(e−1), 2^e) (1.0 for a zero or non-finite A): dividing by it is exact and
    keeps A·Aᵀ far from overflow."""
    return _pow2(float(A.abs().amax()) if A.numel() else 0.0)


def _pow2(amax: float) -> float:
    """2^e with amax in [2^(e−1), 2^e) (1.0 for 0 or a non-finite amax)."""
    if not math.isfinite(amax) or amax == 0.0:
        return 1.0
    return math.ldexp(1.0, max(-120, min(120, math.frexp(amax)[1])))


def randomized_basis(
    G: torch.Tensor, rank: int, side: str, generator: torch.Generator,
    start: torch.Tensor | None = None, opts: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P, project(G))`` from :func:`randomized_left_basis` on G (left) or Gᵀ (right), in G's dtype;
    ``start`` is the previous P. ``opts``: ``oversample`` (8), ``power_iters`` (1: rounds after a warm
    start), ``cold_power_iters`` (3: rounds from a random start, i.e. the first refresh, whose basis
    then serves a whole ``update_gap``), ``power_dtype``."""
    opts = opts or {}
    if row_sharded(G):  # FSDP2: the same range finder on this rank's rows, G never gathered
        A: Any = RowShardedOperand(G, transposed=side == "right", local=_float(G.to_local()))
    else:
        A = _float(full(G)) if side == "left" else _float(full(G)).t()
    if start is not None:
        start = (start if side == "left" else start.t()).float()
    iters = int(opts.get("power_iters", 1)) if start is not None else int(opts.get("cold_power_iters", 3))
    U, UtA = randomized_left_basis(
        A, rank, int(opts.get("oversample", 8)), iters, start, generator,
        power_dtype(opts.get("power_dtype", "auto"), G.device),
    )
    P = (U if side == "left" else U.t()).to(G.dtype).contiguous()
    return P, (UtA if side == "left" else UtA.t()).to(G.dtype).contiguous()


@_register
class SVDProjector(Projector):
    """Exact SVD basis (GaLore). State: ``P``."""

    name = "svd"
    state_keys = ("P", "proj_version")

    def compute(self, G: torch.Tensor, state: State) -> None:
        state["P"] = self.robust_basis(G, state)[0]
        _bump(state)

    def matrix(self, state: State) -> torch.Tensor:
        return state["P"]


POWER_DTYPES = ("auto", "float32", "bfloat16")


def power_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """dtype of the range finder's power iterations (None = the float32 of A). ``auto`` picks bfloat16
    on a CUDA device with bf16 (the sketch only has to find the subspace; the Rayleigh-Ritz step and the
    projection stay in float32) and float32 on every CPU: a bf16 round on an AVX-512 CPU made a run's
    bases depend on the machine (a sharded and a one-process run drifted apart by 9e-4 by the third
    refresh, where float32 keeps them within 1e-8), so on CPU bf16 is opt-in (``"bfloat16"``)."""
    if name == "float32":
        return None
    if name == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return None


@_register
class RandomizedSVDProjector(Projector):
    """Randomized SVD basis, warm-started from the previous P. State: ``P``, ``proj_seed``."""

    name = "rsvd"
    options = ("oversample", "power_iters", "cold_power_iters", "power_dtype")
    sharded_refresh = True  # the range finder runs on the shards (sharding.RowShardedOperand)
    state_keys = ("P", "proj_seed", "proj_version")

    def compute(self, G: torch.Tensor, state: State) -> torch.Tensor | None:
        state["P"], projected = self.robust_basis(G, state, ("randomized", "exact"), start=state.get("P"))
        _bump(state)
        return projected

    def matrix(self, state: State) -> torch.Tensor:
        return state["P"]


@_register
class Int4SVDProjector(Projector):
    """Exact SVD basis kept as packed INT4 (Q-GaLore). State: ``P_q`` (uint8), ``P_scale``, ``P_zero``.

    Also keeps ``P_first`` (the leading singular vector, float) for Q-GaLore's lazy refresh test. The
    dequantized basis is built once per step and dropped after it (``step_cache``), so only the INT4
    codes stay resident.
    """

    name = "svd_int4"
    options = ("quant_group_size",)
    state_keys = ("P_q", "P_scale", "P_zero", "P_first", "proj_version")
    step_cache = True
    order: tuple[str, ...] = ("exact", "randomized")

    @property
    def group(self) -> int:
        return int(self.opts.get("quant_group_size", 256))

    def _shape(self) -> tuple[int, int]:
        return (self.shape[0], self.rank) if self.side == "left" else (self.rank, self.shape[1])

    def _start(self, state: State) -> torch.Tensor | None:
        """The previous (dequantized, re-orthonormalized) basis as P, the range finder's warm start."""
        if self.order[0] != "randomized" or not self.has_basis(state):
            return None
        Q, R = torch.linalg.qr(self.basis(state).float())
        Q = Q * torch.where(torch.diagonal(R) < 0, -1.0, 1.0)  # QR may flip a column: keep each one's sign
        return Q if self.side == "left" else Q.t()

    def compute(self, G: torch.Tensor, state: State) -> None:
        P = self.robust_basis(G, state, self.order, start=self._start(state))[0].float()
        state["P_first"] = (P[:, 0] if self.side == "left" else P[0, :]).clone()
        state["P_q"], state["P_scale"], state["P_zero"] = quant.quantize_int4(P, self.group)
        _bump(state)

    def matrix(self, state: State) -> torch.Tensor:
        def build() -> torch.Tensor:
            P = quant.dequantize_int4(state["P_q"], state["P_scale"], state["P_zero"], self._shape(), self.group)
            return P.to(self.dtype)

        return self._cached(state, build)


@_register
class Int4RandomizedSVDProjector(Int4SVDProjector):
    """The ``rsvd`` basis (warm-started from the dequantized previous one) kept as packed INT4.
    State adds ``proj_seed``."""

    name = "rsvd_int4"
    options = ("quant_group_size", "oversample", "power_iters", "cold_power_iters", "power_dtype")
    sharded_refresh = True
    state_keys = ("P_q", "P_scale", "P_zero", "P_first", "proj_seed", "proj_version")
    order = ("randomized", "exact")


# ----------------------------------------------------------------------------- seeded random


@_register
class GaussianProjector(Projector):
    """P with N(0, 1/r) entries from a seed (APOLLO / Flora). State: ``proj_seed`` (an int) only."""

    name = "gaussian"
    state_keys = ("proj_seed", "proj_version")
    sharded_refresh = True  # a new seed: the gradient is not read
    orthonormal = False

    def _shape(self) -> tuple[int, int]:
        return (self.shape[0], self.rank) if self.side == "left" else (self.rank, self.shape[1])

    def compute(self, G: torch.Tensor, state: State) -> None:
        state["proj_seed"] = next_proj_seed(state)
        _bump(state)

    def regenerate(self, seed: int) -> torch.Tensor:
        """The projection matrix for ``seed``, bit-exact (apollo-torch's ``stable_randn(shape, seed) / sqrt(r)``)."""
        return seeded_gaussian(self._shape(), seed, self.device, self.dtype) / math.sqrt(self.rank)

    def matrix(self, state: State) -> torch.Tensor:
        return self._cached(state, lambda: self.regenerate(int(state["proj_seed"])))


# ----------------------------------------------------------------------------- DCT


def dct_matrix(
    size: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
    cache: dict[Any, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Orthonormal DCT-II basis as columns: Q[t, k] = c_k·cos(π k (2t+1) / (2N)), c_0 = √(1/N), c_k = √(2/N).

    Qᵀx is the orthonormal DCT-II of x; QᵀQ = I. With ``cache`` (an optimizer's shared dict, so the
    optimizer owns and counts it) it is computed once per size, device and dtype and shared by layers.
    """
    key = ("dct", int(size), str(device), dtype)
    if cache is not None and key in cache:
        return cache[key]
    t = torch.arange(size, dtype=torch.float64).unsqueeze(1)
    k = torch.arange(size, dtype=torch.float64).unsqueeze(0)
    Q = torch.cos(math.pi * k * (2 * t + 1) / (2 * size)) * math.sqrt(2.0 / size)
    Q[:, 0] = math.sqrt(1.0 / size)
    Q = Q.to(device=device, dtype=dtype)
    if cache is not None:
        cache[key] = Q
    return Q


def dct_scores(
    G: torch.Tensor, side: str, norm: float = 1.0, cache: dict[Any, torch.Tensor] | None = None
) -> torch.Tensor:
    """Alignment of every DCT basis vector with G: ‖G·Q[:, k]‖_p (right) or ‖Q[:, k]ᵀ·G‖_p (left)."""
    G = _float(G)  # float32 or float64: the basis in the same dtype
    if side == "right":
        return torch.linalg.vector_norm(G @ dct_matrix(G.shape[1], G.device, G.dtype, cache), ord=norm, dim=0)
    return torch.linalg.vector_norm(dct_matrix(G.shape[0], G.device, G.dtype, cache).t() @ G, ord=norm, dim=1)


@_register
class DCTProjector(Projector):
    """Top-r DCT-II columns by alignment with G (one matmul + top-k). State: ``idx`` (int64, length r)."""

    name = "dct"
    options = ("dct_norm",)
    state_keys = ("idx", "proj_version")
    step_cache = True  # the r selected columns; the shared N×N basis stays (in ``shared``)

    def resident_tensors(self) -> list[torch.Tensor]:
        return [*super().resident_tensors(), *(t for k, t in self.shared.items() if k[0] == "dct")]

    def compute(self, G: torch.Tensor, state: State) -> None:
        scores = dct_scores(G, self.side, float(self.opts.get("dct_norm", 1.0)), self.shared)
        state["idx"] = torch.topk(scores, self.rank, sorted=True).indices.sort().values
        _bump(state)

    def matrix(self, state: State) -> torch.Tensor:
        def build() -> torch.Tensor:
            idx = state["idx"]
            cols = dct_matrix(self.dim, idx.device, self.dtype, self.shared).index_select(1, idx)
            return cols.contiguous() if self.side == "left" else cols.t().contiguous()

        return self._cached(state, build)


# ----------------------------------------------------------------------------- coordinates / blocks


@_register
class CoordinateProjector(Projector):
    """r coordinates (columns for right, rows for left): random (``coords``) or a cyclic block (``blocks``).

    State: ``idx`` (int64, sorted) and ``proj_seed`` (the seed the random draw came from).
    """

    name = "coords"
    state_keys = ("idx", "proj_seed", "proj_version")
    sharded_refresh = True  # new coordinates: the gradient is not read

    def compute(self, G: torch.Tensor, state: State) -> None:
        dim = self.dim
        if self.name == "blocks":
            start = 0 if "idx" not in state else (int(state["block_start"]) + self.rank) % dim
            state["block_start"] = start
            idx = (start + torch.arange(self.rank, device=G.device)) % dim
        else:
            seed = next_proj_seed(state)
            gen = torch.Generator(device=G.device).manual_seed(seed)
            idx = torch.randperm(dim, generator=gen, device=G.device)[: self.rank]
            state["proj_seed"] = seed
        state["idx"] = idx.sort().values
        _bump(state)

    def project(self, G: torch.Tensor, state: State) -> torch.Tensor:
        if is_dtensor(G) and self.side == "left":  # FSDP2: rows of other ranks; by the one-hot basis (exact)
            return like_rows(self.basis(state).to(G.dtype), G).t() @ G
        return G.index_select(0 if self.side == "left" else 1, like(state["idx"], G))

    def back(self, N: torch.Tensor, state: State) -> torch.Tensor:
        if is_dtensor(N):  # FSDP2: scatter by the one-hot basis (exact), which keeps N's sharding
            E = self.basis(state).to(N.dtype)
            return like_rows(E, N) @ N if self.side == "left" else N @ like(E.t(), N)
        out = N.new_zeros(self.shape)
        return out.index_copy_(0 if self.side == "left" else 1, state["idx"], N)

    def basis(self, state: State) -> torch.Tensor:
        idx = state["idx"]
        E = torch.zeros(self.dim, self.rank, device=idx.device, dtype=self.dtype)
        E[idx, torch.arange(self.rank, device=idx.device)] = 1.0
        return E


@_register
class BlockProjector(CoordinateProjector):
    """Contiguous block of r columns/rows, advanced by r (cyclically) at each refresh. State adds ``block_start``."""

    name = "blocks"
    state_keys = ("idx", "block_start", "proj_version")


# ----------------------------------------------------------------------------- online PCA (OSD)


def online_pca_grad(P: torch.Tensor, G: torch.Tensor, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, ∂loss/∂P) for the online-PCA loss L = ‖Ĝ − proj_P(Ĝ)‖²_F with Ĝ = G/‖G‖_F.

    Right side (P r×n): proj = Ĝ PᵀP, E = ĜPᵀP − Ĝ, ∂L/∂P = 2[(E Pᵀ)ᵀ Ĝ + (Ĝ Pᵀ)ᵀ E]. The left side
    (P m×r, proj = PPᵀĜ) is the right side applied to (Gᵀ, Pᵀ).
    """
    if side == "left":
        loss, grad = online_pca_grad(P.t(), G.t(), "right")
        return loss, grad.t()
    Gh = G / torch.linalg.vector_norm(G).clamp_min(1e-30)
    A = Gh @ P.t()
    E = A @ P - Gh
    grad = 2.0 * ((E @ P.t()).t() @ Gh + A.t() @ E)
    return (E * E).sum(), grad


@_register
class OnlineProjector(Projector):
    """Online Subspace Descent: P moves by one AdamW step on the online-PCA loss after every update.

    Initialised from a seeded Gaussian orthonormalised by QR (no SVD; ``osd_init='svd'`` reproduces
    the official code's SVD start). The PCA step size is ``proj_lr`` (default 1/update_gap, as in the
    official code); AdamW uses β=(0.9, 0.999), ε=1e-8 and weight decay ``proj_weight_decay`` (0.01,
    torch's AdamW default used by the official code). State: ``P``, ``P_exp_avg``, ``P_exp_avg_sq``,
    ``P_step``.
    """

    name = "online"
    options = ("proj_lr", "osd_init", "proj_weight_decay", "update_gap")
    periodic = False
    orthonormal = False  # P drifts off the Stiefel manifold between steps
    state_keys = ("P", "P_exp_avg", "P_exp_avg_sq", "P_step", "proj_seed", "proj_version")

    def compute(self, G: torch.Tensor, state: State) -> None:
        if self.opts.get("osd_init", "random") == "svd":
            P = self.robust_basis(G, state)[0]
        else:
            seed = next_proj_seed(state)
            state["proj_seed"] = seed
            gauss = seeded_gaussian((self.dim, self.rank), seed, G.device, torch.float32)
            Q = torch.linalg.qr(gauss).Q
            P = (Q if self.side == "left" else Q.t()).to(G.dtype).contiguous()
        state["P"] = P
        state["P_exp_avg"] = torch.zeros_like(P)
        state["P_exp_avg_sq"] = torch.zeros_like(P)
        state["P_step"] = 0
        _bump(state)

    def matrix(self, state: State) -> torch.Tensor:
        return state["P"]

    def post_update(self, G: torch.Tensor, state: State) -> None:
        P = state["P"]
        # under FSDP2 the full gradient, every step (P is the same plain tensor on every rank)
        G = _float(full(G))
        _, grad = online_pca_grad(P.to(G.dtype), G, self.side)
        lr = float(self.opts.get("proj_lr", 1.0 / float(self.opts.get("update_gap", 200))))
        wd = float(self.opts.get("proj_weight_decay", 0.01))
        b1, b2, eps = 0.9, 0.999, 1e-8
        state["P_step"] = t = int(state["P_step"]) + 1
        m, v = state["P_exp_avg"], state["P_exp_avg_sq"]
        P.mul_(1.0 - lr * wd)
        m.mul_(b1).add_(grad, alpha=1.0 - b1)
        v.mul_(b2).addcmul_(grad, grad, value=1.0 - b2)
        denom = (v.sqrt() / math.sqrt(1.0 - b2**t)).add_(eps)
        P.addcdiv_(m, denom, value=-lr / (1.0 - b1**t))


# ----------------------------------------------------------------------------- COAP


def coap_loss(P: torch.Tensor, M: torch.Tensor, G: torch.Tensor, side: str) -> torch.Tensor:
    """COAP's objective for P (Xiao et al. 2025, Eq. 5): mean((proj_P(G) − G)²)·(1 − mean_i cos(B_i, G_i)),
    proj_P(G) = G·PᵀP (right) or P·PᵀG (left), B = back(M) the first moment projected back, cos over rows."""
    if side == "right":
        recon, back = (G @ P.t()) @ P, M @ P
    else:
        recon, back = P @ (P.t() @ G), P @ M
    correlation = torch.nn.functional.cosine_similarity(back, G, dim=1).mean()
    return ((recon - G) ** 2).mean() * (1.0 - correlation)


def range_basis(A: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """Top right singular vectors (as rows, r×n) of QᵀA with Q = qr(A·Ω): the one-pass randomized
    range finder (Halko et al. 2011, Alg. 4.1 + 5.1) on A (m×n) with test matrix Ω (n×r); the SVD is of
    the r×n matrix QᵀA only."""
    Q = torch.linalg.qr(A @ omega).Q
    return torch.linalg.svd(Q.t() @ A, full_matrices=False).Vh


@_register
class COAPProjector(Projector):
    """COAP's projection (Xiao et al. 2025, Sec. 3.2; official ``MatrixCOAP``). At the refreshes the
    engine calls every ``update_gap`` (T_u) steps: every ``reproject_factor``-th one (and the first)
    recomputes P = :func:`range_basis` of G started from the previous P (Eq. 6; a seeded Gaussian
    test matrix the first time); the others move P by one gradient step of size ``proj_lr`` on
    :func:`coap_loss` with the inner update's first moment ``exp_avg`` (gradient norm clipped to 1),
    so consecutive subspaces stay correlated. State: ``P``, ``proj_seed``."""

    name = "coap"
    options = ("update_gap", "reproject_factor", "proj_lr")
    orthonormal = False  # the gradient steps move P off the Stiefel manifold
    state_keys = ("P", "proj_seed", "proj_version")

    def matrix(self, state: State) -> torch.Tensor:
        return state["P"]

    def compute(self, G: torch.Tensor, state: State) -> None:
        G = _float(G)
        period = int(self.opts.get("update_gap", 32)) * int(self.opts.get("reproject_factor", 5))
        if not self.has_basis(state) or int(state.get("step", 0)) % period == 0:
            P = self._guarded(state, lambda: self._recompute(G, state), G)
        else:
            P = self._guarded(state, lambda: self._correlate(G, state), G)
        state["P"] = P.to(self.dtype).contiguous()
        _bump(state)

    def _recompute(self, G: torch.Tensor, state: State) -> torch.Tensor:
        A = G if self.side == "right" else G.t()
        if self.has_basis(state):
            omega = self.basis(state).to(A.dtype)
        else:
            state["proj_seed"] = seed = next_proj_seed(state)
            omega = seeded_gaussian((A.shape[1], self.rank), seed, A.device, A.dtype)
        Vh = range_basis(A, omega)
        return Vh if self.side == "right" else Vh.t()

    def _correlate(self, G: torch.Tensor, state: State) -> torch.Tensor:
        if "exp_avg" not in state:
            raise ValueError(
                "projector='coap' moves P with the inner update's first moment 'exp_avg'; use inner='adamw' or 'lion'"
            )
        P0 = state["P"].to(G.dtype)
        M = full(state["exp_avg"]).to(G.dtype)
        with torch.enable_grad():
            P = P0.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(coap_loss(P, M, G, self.side), P)
        clip = (1.0 / (torch.linalg.vector_norm(grad) + 1e-6)).clamp(max=1.0)  # clip_grad_norm_(max_norm=1)
        return P0 - float(self.opts.get("proj_lr", 0.1)) * clip * grad

    def _guarded(self, state: State, build, G: torch.Tensor) -> torch.Tensor:
        """``build()``, or, when it raises (LinAlgError on a non-finite G) or is not finite, the previous
        P (the first r coordinates before there is one), counted in ``state["svd_fallbacks"]``."""
        try:
            P = build()
        except torch.linalg.LinAlgError:
            P = None
        if P is not None and bool(torch.isfinite(P).all()):
            return P
        state["svd_fallbacks"] = int(state.get("svd_fallbacks", 0)) + 1
        if self.has_basis(state):
            return state["P"].clone()
        return identity_basis(self.dim, self.rank, self.side, G.device, G.dtype)


def head_blocks(shape: tuple[int, int], side: str, rank: int, head_dim: int) -> int:
    """The number of attention heads of a weight whose un-projected side (rows for a right projection,
    columns for a left one) is split into blocks of ``head_dim``; a ValueError naming ``head_dim`` when
    it does not divide that side or is smaller than ``rank``."""
    heads_side = shape[0] if side == "right" else shape[1]
    if head_dim < rank or heads_side % head_dim:
        raise ValueError(
            f"head_dim={head_dim} must divide the head axis ({heads_side}, the "
            f"{'rows' if side == 'right' else 'columns'} of a {side}-projected weight of shape {tuple(shape)}) "
            f"and be at least rank={rank}"
        )
    return heads_side // head_dim


@_register
class CrossHeadProjector(RandomizedSVDProjector):
    """One basis for all attention heads of a weight (GaLore+, Liao et al. 2024, cross-head projection):
    at each refresh the range finder (randomized subspace iteration, never a full SVD) runs on the
    gradient block of one head j, drawn from the parameter's seed chain, and the resulting P projects
    every head's block. Heads lie on the un-projected side: rows of a right-projected weight (q, k, v:
    (heads·head_dim) × d, P r×d), columns of a left-projected one (o: d × (heads·head_dim), P d×r).
    ``head_dim`` None: the whole G (the ``rsvd`` basis without its exact-SVD fallback).
    State: ``P``, ``proj_seed``, ``head`` (j)."""

    name = "cross_head"
    options = (*RandomizedSVDProjector.options, "head_dim")
    sharded_refresh = False  # a head's block is sliced from the gathered G
    state_keys = ("P", "proj_seed", "head", "proj_version")

    def __init__(
        self, rank: int, side: str, shape: tuple[int, int], opts: dict[str, Any] | None = None,
        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
        shared: dict[Any, torch.Tensor] | None = None,
    ):
        super().__init__(rank, side, shape, opts, device, dtype, shared)
        head_dim = self.opts.get("head_dim")
        self.heads = 1 if head_dim is None else head_blocks(self.shape, side, self.rank, int(head_dim))

    def compute(self, G: torch.Tensor, state: State) -> torch.Tensor | None:
        block = G
        if self.heads > 1:
            j = advance_seed(int(state.get("seed", 0)) + int(state.get("proj_version", 0))) % self.heads
            d = self.shape[0 if self.side == "right" else 1] // self.heads
            block = G[j * d:(j + 1) * d] if self.side == "right" else G[:, j * d:(j + 1) * d]
            state["head"] = j
        state["P"], projected = self.robust_basis(block, state, ("randomized",), start=state.get("P"))
        _bump(state)
        return projected if self.heads == 1 else None


#: The strategy names, in registration order.
PROJECTORS = tuple(_CLASSES)
#: Every option some projector reads.
PROJECTOR_OPTIONS = tuple(sorted({o for cls in _CLASSES.values() for o in cls.options}))


def make_projector(
    name: str,
    rank: int,
    side: str,
    shape: tuple[int, int],
    opts: dict[str, Any] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    shared: dict[Any, torch.Tensor] | None = None,
) -> Projector:
    """Build the projector ``name`` (one of ``PROJECTORS``) for a gradient of ``shape`` on ``device``/``dtype``;
    ``shared`` is the optimizer's dict of tensors shared by its projectors (the DCT basis)."""
    return _CLASSES[choice("projector", name, PROJECTORS)](rank, side, shape, opts, device, dtype, shared)


def projector_options(name: str) -> tuple[str, ...]:
    """The group keys the projector ``name`` reads."""
    return _CLASSES[name].options
