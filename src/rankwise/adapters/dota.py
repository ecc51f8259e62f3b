"""DoTA and QDoTA (Hu, Cheng, Liu, Liu, Luan, Wang & Liu 2024, "DoTA: Weight-Decomposed Tensor Adaptation for
Large Language Models", arXiv 2412.20891): a tensor (matrix product operator) adapter initialised from the
MPO decomposition of W₀ instead of randomly.

W = W_res + MPO(T₁, …, T_n) with trainable cores T_k (D_{k−1} × o_k × i_k × D_k): W₀ (out × in,
out = Π o_k, in = Π i_k) is reshaped to the 2n-way tensor W[(o₁,i₁), …, (o_n,i_n)] and split by TT-SVD
truncated at the bond dimension D = ``r`` (``linalg.mpo_decompose``); the cores start at that decomposition
and W_res = W₀ − MPO(W₀) stays frozen, so the model starts at W₀. ``cores`` = n (the factors o_k, i_k of
out and in are as balanced as their prime factors allow, ``linalg.factor_shape``). QDoTA (``quant_type``
"nf4" / "fp4"): W_res is computed from the full-precision W₀ and stored 4-bit (bitsandbytes, blocks of 64,
``double_quant``), the cores stay full precision; the model then starts at W₀ up to the 4-bit error of
W_res. Over a base quantized already (``rw.quantize``), plain ``dota`` decomposes the dequantized W₀ and
writes W_res back in 4 bit.

What is the paper's and what is ours: the MPO init of the cores from W₀, the frozen residual
W_res = W₀ − MPO(W₀) and 4-bit QDoTA are the paper's (abstract and method summary; its code was not
released); the number of cores, the factorisation of the dimensions and the left-to-right TT-SVD (left
cores orthonormal, singular values carried right) are our choices.

The update ΔW = MPO(T) − MPO(T⁰) is not a fixed low-rank product of two matrices, so it does not export to
PEFT; it merges into the base (``delta_weight`` contracts the cores) and saves / loads in rankwise format.
The forward (``linalg.mpo_linear``) applies the cores to x one at a time for a few rows (decoding) and
through the dense MPO(T) for many (training: 8–12× faster on CPU), which it forms in forward and again in
backward but never keeps: only x and the cores are saved for backward (2048 rows on a 384 × 384 layer, bond 8:
3.2 MB against the core-by-core route's 78.7 MB of intermediate products).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..checks import choice, integer
from ..linalg import factor_shape, mpo_bond_dims, mpo_contract, mpo_decompose, mpo_linear
from ..quant import SCHEMES, dequantize, quantize_tensor, to_linear4bit
from ..targets import is_linear4bit, linear_weight
from .base import AdapterConfig, AdapterLayer, check_base
from .init import InitContext
from .registry import MethodSpec, register


@dataclass
class DoTAConfig(AdapterConfig):
    """DoTA: ``r`` is the MPO bond dimension D, ``cores`` the number n of MPO cores (≥ 2). QDoTA:
    ``quant_type`` "nf4" or "fp4" stores the frozen residual in 4 bit (None: full precision), with
    ``double_quant`` (quantized block scales, QLoRA's)."""

    cores: int = 4
    quant_type: str | None = None
    double_quant: bool = True

    def validate(self) -> None:
        super().validate()
        integer("cores", self.cores, 2)
        if self.quant_type is not None:
            choice("quant_type", self.quant_type, SCHEMES)
        if not isinstance(self.double_quant, bool):
            raise ValueError(f"double_quant={self.double_quant!r} must be True or False")


class DoTALayer(AdapterLayer):
    """``y = W_res x + MPO(T) x``: trainable cores ``dota_core_k`` (D_{k−1}, o_k, i_k, D_k); buffers
    ``init_core_k`` keep the cores of MPO(W₀) that moved out of the base."""

    method = "dota"

    @classmethod
    def replaces_base(cls, config: AdapterConfig, base_layer: nn.Module) -> bool:
        return getattr(config, "quant_type", None) is not None and not is_linear4bit(base_layer)

    def __init__(self, base_layer: nn.Module, config: DoTAConfig, ctx: InitContext) -> None:
        check_base(type(self), config, base_layer, ctx.name)  # before a base is quantized
        out_features, in_features = linear_weight(base_layer).shape
        self.out_shape = factor_shape(int(out_features), config.cores)
        self.in_shape = factor_shape(int(in_features), config.cores)
        self.quantizes = self.replaces_base(config, base_layer)
        cores = None
        if self.quantizes or not ctx.skip:
            w0 = (dequantize(base_layer) if is_linear4bit(base_layer) else linear_weight(base_layer)).detach()
            cores, _ = mpo_decompose(w0.float(), self.out_shape, self.in_shape, config.r)
        if self.quantizes:  # QDoTA: the 4-bit base is the residual of the full-precision W₀ (also on load)
            assert cores is not None
            w_res = (w0.float() - mpo_contract(cores)).to(w0.dtype)
            q = quantize_tensor(w_res, str(config.quant_type), config.double_quant)
            base_layer = to_linear4bit(base_layer, quantized=q)
        super().__init__(base_layer, config)
        self.identity_at_init = not self.quantizes
        dims = mpo_bond_dims(self.out_shape, self.in_shape, config.r)
        sites = zip(self.out_shape, self.in_shape, strict=True)
        shapes = [(dims[k], o, i, dims[k + 1]) for k, (o, i) in enumerate(sites)]
        dtype, device = self.adapter_dtype, self.base_weight.device
        self.n_cores = len(shapes)
        for k, s in enumerate(shapes):
            setattr(self, f"dota_core_{k}", nn.Parameter(torch.zeros(s, dtype=dtype, device=device)))
            self.register_buffer(f"init_core_{k}", torch.zeros(s, dtype=dtype, device=device))
        if cores is None:  # shapes only; the tensors come from a checkpoint
            return
        with torch.no_grad():
            for core, now, start in zip(cores, self.cores(), self.init_cores(), strict=True):
                now.copy_(core)
                start.copy_(core)
        if not self.quantizes:
            self.after_load()

    def cores(self) -> list[torch.Tensor]:
        """The trainable MPO cores T₁..T_n."""
        return [getattr(self, f"dota_core_{k}") for k in range(self.n_cores)]

    def init_cores(self) -> list[torch.Tensor]:
        """The cores of MPO(W₀) at bond dimension r (what moved out of the base)."""
        return [getattr(self, f"init_core_{k}") for k in range(self.n_cores)]

    def delta_weight(self) -> torch.Tensor:
        return mpo_contract(self.cores())

    def delta_forward(self, x: torch.Tensor) -> torch.Tensor:
        """MPO(T)·x (``linalg.mpo_linear``): the dense out × in ΔW is never kept for backward."""
        return mpo_linear(x, self.cores())

    def base_offset(self) -> torch.Tensor:
        """MPO(W₀), moved out of the base at init (the base holds W_res)."""
        return mpo_contract(self.init_cores()).float()

    def after_load(self) -> None:
        """W_res = W₀ − MPO(W₀) into the base, unless QDoTA built its 4-bit base from it already."""
        if not self.quantizes:
            super().after_load()

    def trainable_count(self) -> int:
        return sum(c.numel() for c in self.cores())

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", cores={list(zip(self.out_shape, self.in_shape, strict=True))}"
                + (f", residual={self.config.quant_type}" if self.quantizes else ""))


register(
    MethodSpec(
        "dota",
        "init",
        "Hu et al. 2024, DoTA: Weight-Decomposed Tensor Adaptation for Large Language Models",
        DoTAConfig,
        DoTALayer,
        export="none",
        summary="W = W_res + MPO(T₁..T_n): trainable MPO cores initialised by TT-SVD of W₀ at bond dimension r, "
                "frozen residual (QDoTA: quant_type='nf4' stores W_res in 4 bit)",
    )
)
