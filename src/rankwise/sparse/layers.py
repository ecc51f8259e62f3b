"""Structured replacements for ``nn.Linear``: low-rank factorized and sparse-plus-low-rank.

* :class:`FactorizedLinear` — ``W = U V`` with ``U ∈ ℝ^{out×r}``, ``V ∈ ℝ^{r×in}``; built from a
  dense layer by truncated SVD with the singular values split evenly, ``U = U_r √Σ_r``,
  ``V = √Σ_r V_rᵀ`` (the balanced "spectral" factorization; Eckart–Young makes it the best rank-r
  approximation in Frobenius norm).
* :class:`SparseLowRankLinear` — ``W = s·B A + S`` with ``S`` supported on a fixed set of flat
  indices (an int64 buffer) and only its non-zero values trainable (Han et al. 2024, "SLTrain: a
  sparse plus low-rank approach for parameter and memory efficient pretraining", Eq. 2).

Sparse kernel (``kernel=``) — both are custom ``autograd.Function``\\ s that never *save* a dense
``out×in`` tensor for backward:

* ``"sparse"`` (default): ``(x Aᵀ) Bᵀ`` through the factors plus a CSR SpMM for ``x Sᵀ``; backward
  uses the CSR of ``Sᵀ`` for ``∂x`` and an SDDMM (``torch.sparse.sampled_addmm``) for the values of
  ``∂S``, so no ``out×in`` tensor exists at any time and the cost is ``O((r(m+n) + nnz)·N)``.
* ``"dense"``: forms ``W = s·BA`` plus an ``index_add`` of S for the one GEMM of the forward, frees
  it and re-forms it in backward (the scheme of the SLTrain reference C++ op). Transient memory: two
  ``out×in`` buffers (W and ∂L/∂W) during backward; cost ``O(mn(r + N))``.

Measured fwd+bwd on this 2-core CPU (1 thread, N = 1024 tokens, δ = 0.03; see ``docs/sparse.md``):
equal within noise for 256-wide layers, ``"sparse"`` 1.5-3× faster from 1024×1024 (r = 128) up,
and always without the dense transients — hence the default. ``"dense"`` stays for parity with the
reference implementation.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import checks
from ..linalg import balanced_svd_factors, svd_precision

KERNELS = ("sparse", "dense")


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """A CSR tensor without torch's "CSR support is in beta" warning (SpMM and SDDMM used here are stable)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


# ---------------------------------------------------------------------------- validation
def check_linear(module: Any, name: str = "linear") -> nn.Linear:
    if not isinstance(module, nn.Linear):
        raise ValueError(f"{name} must be an nn.Linear, got {type(module).__name__}")
    return module


def _copy_bias(linear: nn.Linear, bias: nn.Parameter | None) -> None:
    if bias is not None and linear.bias is not None:
        with torch.no_grad():
            bias.copy_(linear.bias)


# ---------------------------------------------------------------------------- factorized
class FactorizedLinear(nn.Module):
    """``y = U (V x) + b`` with trainable ``U`` (out×r) and ``V`` (r×in); ``r(in + out)`` weights."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.rank = checks.rank("rank", rank, min(out_features, in_features))
        kw = {"device": device, "dtype": dtype}
        self.U = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.V = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Spectral init: the balanced rank-r SVD factors of an ``nn.Linear``-initialized matrix."""
        bound = 1.0 / math.sqrt(self.in_features)
        w = torch.empty(self.out_features, self.in_features).uniform_(-bound, bound, generator=generator)
        u, v = balanced_svd_factors(w, self.rank)
        self.U.copy_(u)
        self.V.copy_(v)
        if self.bias is not None:
            self.bias.uniform_(-bound, bound, generator=generator)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int | None = None) -> FactorizedLinear:
        """Truncated SVD of ``linear.weight`` with the √σ split; ``rank=None`` keeps full rank (exact)."""
        check_linear(linear)
        w = linear.weight
        rank = min(w.shape) if rank is None else checks.rank("rank", rank, min(w.shape))
        layer = cls(linear.in_features, linear.out_features, rank, linear.bias is not None,
                    device=w.device, dtype=w.dtype)
        u, v = balanced_svd_factors(w, rank)
        with torch.no_grad():
            layer.U.copy_(u)
            layer.V.copy_(v)
        _copy_bias(linear, layer.bias)
        return layer

    def dense_weight(self) -> torch.Tensor:
        """``U V`` (out×in)."""
        return self.U @ self.V

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A dense ``nn.Linear`` with ``W = U V`` (merge for export)."""
        lin = nn.Linear(self.in_features, self.out_features, self.bias is not None,
                        device=self.U.device, dtype=self.U.dtype)
        lin.weight.copy_(self.dense_weight())
        if self.bias is not None:
            lin.bias.copy_(self.bias)
        return lin

    def trainable_count(self) -> int:
        return self.rank * (self.in_features + self.out_features) + (self.out_features if self.bias is not None else 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.V), self.U, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.bias is not None}"
        )


# ---------------------------------------------------------------------------- sparse support
def support_size(out_features: int, in_features: int, density: float) -> int:
    """Number of non-zeros ⌊δ·m·n⌋ (at least 1), the count SLTrain's reference code uses."""
    return max(1, int(density * out_features * in_features))


def random_support(
    out_features: int, in_features: int, density: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Sorted flat indices of a support drawn uniformly at random without replacement (SLTrain §3.2)."""
    checks.fraction("density", density)
    nnz = support_size(out_features, in_features, density)
    perm = torch.randperm(out_features * in_features, generator=generator)
    return perm[:nnz].sort().values


class _DenseKernel(torch.autograd.Function):
    """``y = x (s·BA + S)ᵀ + b``: W is formed for the GEMM and re-formed in backward, never saved."""

    @staticmethod
    def _weight(b, a, values, index, scale):
        w = torch.mm(b, a)
        if scale != 1.0:
            w.mul_(scale)
        w.view(-1).index_add_(0, index, values.to(w.dtype))
        return w

    @staticmethod
    def forward(ctx, x, b, a, values, index, bias, scale: float):
        w = _DenseKernel._weight(b, a, values, index, scale)
        ctx.save_for_backward(x, b, a, values, index)
        ctx.scale, ctx.has_bias = scale, bias is not None
        return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, b, a, values, index = ctx.saved_tensors
        s = ctx.scale
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(b.dtype)  # under autocast grad_out may be bf16
        grad_x = grad_b = grad_a = grad_v = grad_bias = None
        if ctx.needs_input_grad[0]:
            w = _DenseKernel._weight(b, a, values, index, s)
            grad_x = (g @ w).reshape(x.shape).to(x.dtype)
            del w
        if any(ctx.needs_input_grad[1:4]):
            gw = g.t() @ x.reshape(-1, x.shape[-1]).to(g.dtype)  # ∂L/∂W, out×in
            if ctx.needs_input_grad[1]:
                grad_b = (gw @ a.t()).mul_(s)
            if ctx.needs_input_grad[2]:
                grad_a = (b.t() @ gw).mul_(s)
            if ctx.needs_input_grad[3]:
                grad_v = gw.view(-1)[index]
        if ctx.has_bias and ctx.needs_input_grad[5]:
            grad_bias = g.sum(0)
        return grad_x, grad_b, grad_a, grad_v, None, grad_bias, None


class _SparseMatmul(torch.autograd.Function):
    """``x Sᵀ`` with S in CSR (crow, col, values); backward: ``g S`` via the CSR of Sᵀ, ∂values via SDDMM."""

    @staticmethod
    def forward(ctx, x, values, crow, col, crow_t, col_t, perm_t, shape):
        s = _csr(crow, col, values, shape)
        x2 = x.reshape(-1, x.shape[-1]).to(values.dtype)
        with torch.autocast(x.device.type, enabled=False):  # CSR matmul in the values' dtype (no bf16 CSR on CPU)
            out = (s @ x2.t()).t()
        ctx.save_for_backward(x2, values, crow, col, crow_t, col_t, perm_t)
        ctx.shape, ctx.x_shape, ctx.x_dtype = shape, x.shape, x.dtype
        return out.reshape(*x.shape[:-1], shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x2, values, crow, col, crow_t, col_t, perm_t = ctx.saved_tensors
        m, n = ctx.shape
        g = grad_out.reshape(-1, m).to(values.dtype)
        grad_x = grad_v = None
        if ctx.needs_input_grad[0]:
            st = _csr(crow_t, col_t, values[perm_t], (n, m))
            grad_x = (st @ g.t()).t().reshape(ctx.x_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            pattern = _csr(crow, col, torch.zeros_like(values), (m, n))
            grad_v = torch.sparse.sampled_addmm(pattern, g.t().contiguous(), x2.to(g.dtype), beta=0.0).values()
        return grad_x, grad_v, None, None, None, None, None, None


def _csr_structure(index: torch.Tensor, m: int, n: int) -> tuple[torch.Tensor, ...]:
    """(crow, col, crow_t, col_t, perm_t) for sorted flat ``index`` of an m×n matrix and of its transpose."""
    rows, cols = index // n, index % n
    crow = torch.zeros(m + 1, dtype=torch.long, device=index.device)
    crow[1:] = torch.bincount(rows, minlength=m).cumsum(0)
    perm_t = torch.argsort(cols * m + rows)  # order of the entries in Sᵀ's row-major layout
    crow_t = torch.zeros(n + 1, dtype=torch.long, device=index.device)
    crow_t[1:] = torch.bincount(cols, minlength=n).cumsum(0)
    return crow, cols.contiguous(), crow_t, rows[perm_t].contiguous(), perm_t


class SparseLowRankLinear(nn.Module):
    """``y = x (s·B A + S)ᵀ + b``; trainable ``B`` (out×r), ``A`` (r×in) and the nnz ``values`` of S.

    The support of S is the persistent int64 buffer ``index`` (sorted flat row-major indices); it
    never changes. No dense ``out×in`` parameter or buffer exists.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        index: torch.Tensor,
        bias: bool = True,
        scale: float = 1.0,
        kernel: str = "sparse",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        checks.choice("kernel", kernel, KERNELS)
        self.in_features, self.out_features = in_features, out_features
        self.rank = checks.rank("rank", rank, min(out_features, in_features))
        index = torch.as_tensor(index, dtype=torch.long, device=device)
        if index.dim() != 1 or index.numel() == 0:
            raise ValueError("index must be a non-empty 1-D tensor of flat indices")
        if bool((index[1:] <= index[:-1]).any()) or int(index[0]) < 0 or int(index[-1]) >= in_features * out_features:
            raise ValueError(f"index must be strictly increasing flat indices in [0, {in_features * out_features})")
        self.scale = float(scale)
        self.kernel = kernel
        kw = {"device": device, "dtype": dtype}
        self.B = nn.Parameter(torch.zeros(out_features, rank, **kw))
        self.A = nn.Parameter(torch.zeros(rank, in_features, **kw))
        self.values = nn.Parameter(torch.zeros(index.numel(), **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        self.register_buffer("index", index)
        self._rebuild_structure()

    def _rebuild_structure(self) -> None:
        names = ("crow", "col", "crow_t", "col_t", "perm_t")
        for name, t in zip(names, _csr_structure(self.index, self.out_features, self.in_features), strict=True):
            self.register_buffer(name, t, persistent=False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._rebuild_structure()

    @property
    def nnz(self) -> int:
        return self.index.numel()

    @property
    def density(self) -> float:
        return self.nnz / (self.in_features * self.out_features)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        rank: int,
        density: float,
        *,
        scale: float = 1.0,
        kernel: str = "sparse",
        generator: torch.Generator | None = None,
        index: torch.Tensor | None = None,
    ) -> SparseLowRankLinear:
        """L + S split of a dense layer: ``s·BA`` = balanced rank-r SVD part, S = the residual on a
        uniformly random support of ⌊δ·m·n⌋ entries (or on ``index``)."""
        check_linear(linear)
        density = checks.fraction("density", density)
        w = linear.weight
        if index is None:
            index = random_support(linear.out_features, linear.in_features, density, generator)
        layer = cls(linear.in_features, linear.out_features, rank, index, linear.bias is not None,
                    scale, kernel, device=w.device, dtype=w.dtype)
        u, v = balanced_svd_factors(w, layer.rank)
        with torch.no_grad():
            root = 1.0 / math.sqrt(layer.scale)
            layer.B.copy_(u * root)
            layer.A.copy_(v * root)
            residual = svd_precision(w) - u @ v
            layer.values.copy_(residual.view(-1)[layer.index])
        _copy_bias(linear, layer.bias)
        return layer

    def sparse_dense(self) -> torch.Tensor:
        """``scatter(S)`` as a dense out×in tensor (for tests and export only)."""
        s = torch.zeros(self.out_features * self.in_features, dtype=self.values.dtype, device=self.values.device)
        return s.index_add_(0, self.index, self.values.detach()).view(self.out_features, self.in_features)

    def dense_weight(self) -> torch.Tensor:
        """``s·B A + scatter(S)`` (out×in); builds the dense matrix, use for export only."""
        return _DenseKernel._weight(self.B.detach(), self.A.detach(), self.values.detach(), self.index, self.scale)

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A dense ``nn.Linear`` with ``W = s·BA + S`` (merge for export)."""
        lin = nn.Linear(self.in_features, self.out_features, self.bias is not None,
                        device=self.B.device, dtype=self.B.dtype)
        lin.weight.copy_(self.dense_weight())
        if self.bias is not None:
            lin.bias.copy_(self.bias)
        return lin

    def trainable_count(self) -> int:
        bias = self.out_features if self.bias is not None else 0
        return self.rank * (self.in_features + self.out_features) + self.nnz + bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "dense":
            return _DenseKernel.apply(x, self.B, self.A, self.values, self.index, self.bias, self.scale)
        low = F.linear(F.linear(x, self.A), self.B)
        if self.scale != 1.0:
            low = low * self.scale
        sparse = _SparseMatmul.apply(x, self.values, self.crow, self.col, self.crow_t, self.col_t,
                                     self.perm_t, (self.out_features, self.in_features))
        out = low + sparse
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"nnz={self.nnz} (density={self.density:.4f}), scale={self.scale:g}, kernel={self.kernel}"
        )
