"""C³A (Chen et al. 2025, "Parameter-Efficient Fine-Tuning via Circular Convolution", ACL 2025).

ΔW (out × in) is a grid of b × b circulant blocks: block (m, n) is built from one trainable kernel
w_{mn} ∈ ℝ^b, each row the previous one shifted right by one (wrapped), so ΔW·x is a sum of circular
correlations of the input slices with the kernels, computed with FFTs in O(b log b) per block:

    ΔW_{mn}[j, k] = w_{mn}[(k − j) mod b] / in ,   (ΔW x)_m = IDFT(Σ_n conj(DFT(w_{mn})) ⊙ DFT(x_n)) / in

The 1/in normalisation is the authors' (and PEFT 0.21.2's ``C3AConfig``). ``c3a_kernel`` has shape
(out/b, in/b, b), so a layer trains out·in/b values; b (``block_size``) must divide both dimensions
(None: their greatest common divisor, the fewest parameters). A circulant block can have full rank b,
so ΔW is not a low-rank product: it merges, it does not export. The kernels start as PEFT's default
``xavier_uniform`` (U(±√(6/(in+out))), so the model starts slightly away from the base), or as
``kaiming_uniform`` (U(±1/√in)), ``gaussian`` (N(0, 1)) or ``zeros`` (``kernel_init``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..checks import choice, rank
from ..rng import layer_generator
from .base import AdapterConfig, AdapterLayer
from .init import InitContext
from .registry import MethodSpec, register

KERNEL_INITS = ("xavier_uniform", "kaiming_uniform", "gaussian", "zeros")


@dataclass
class C3AConfig(AdapterConfig):
    """C³A hyper-parameters (``r`` is not used): ``block_size`` b of the circulant blocks (None: the
    gcd of the layer's in and out features), ``kernel_init`` one of ``KERNEL_INITS``."""

    block_size: int | None = None
    kernel_init: str = "xavier_uniform"

    def validate(self) -> None:
        super().validate()
        if self.block_size is not None:
            rank("block_size", self.block_size)
        choice("kernel_init", self.kernel_init, KERNEL_INITS)


def circulant_blocks(kernel: torch.Tensor) -> torch.Tensor:
    """The dense (m·b, n·b) matrix whose block (m, n) has entries ``kernel[m, n, (k − j) mod b]``."""
    m, n, b = kernel.shape
    steps = torch.arange(b, device=kernel.device)
    shift = (steps.view(1, b) - steps.view(b, 1)) % b  # [j, k] -> (k − j) mod b
    return kernel[:, :, shift].permute(0, 2, 1, 3).reshape(m * b, n * b)


def circular_correlation(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """``circulant_blocks(kernel) @ x`` for x (..., n·b) through real FFTs, without forming the matrix."""
    m, n, b = kernel.shape
    xf = torch.fft.rfft(x.reshape(*x.shape[:-1], 1, n, b), dim=-1)
    wf = torch.fft.rfft(kernel, dim=-1).conj()
    return torch.fft.irfft((xf * wf).sum(dim=-2), n=b, dim=-1).reshape(*x.shape[:-1], m * b)


class C3ALayer(AdapterLayer):
    """Trainable ``c3a_kernel`` (out/b, in/b, b): one circulant block per kernel."""

    method = "c3a"

    def __init__(self, base_layer: nn.Module, config: C3AConfig, ctx: InitContext) -> None:
        super().__init__(base_layer, config)
        b = math.gcd(self.in_features, self.out_features) if config.block_size is None else config.block_size
        if self.in_features % b or self.out_features % b:
            raise ValueError(
                f"block_size={b} must divide in_features={self.in_features} and out_features={self.out_features} "
                f"of '{ctx.name or 'the layer'}'; choose a common divisor of both (or None: their gcd)"
            )
        self.block_size = b
        self.identity_at_init = config.kernel_init == "zeros"
        kernel = torch.zeros(self.out_features // b, self.in_features // b, b)
        g = layer_generator(config.seed, ctx.name)
        if config.kernel_init == "xavier_uniform":
            bound = math.sqrt(6.0 / (self.in_features + self.out_features))
            kernel.uniform_(-bound, bound, generator=g)
        elif config.kernel_init == "kaiming_uniform":
            kernel.uniform_(-1 / math.sqrt(self.in_features), 1 / math.sqrt(self.in_features), generator=g)
        elif config.kernel_init == "gaussian":
            kernel.normal_(generator=g)
        self.c3a_kernel = nn.Parameter(kernel.to(device=self.base_weight.device, dtype=self.adapter_dtype))

    def _fft_dtype(self) -> torch.dtype:
        return torch.promote_types(self.adapter_dtype, torch.float32)

    def delta_weight(self) -> torch.Tensor:
        return circulant_blocks(self.c3a_kernel) / self.in_features

    def delta_forward(self, x: torch.Tensor) -> torch.Tensor:
        """ΔW·x by FFTs (in float32 at least), without forming ΔW."""
        dtype = self._fft_dtype()
        return (circular_correlation(x.to(dtype), self.c3a_kernel.to(dtype)) / self.in_features).to(x.dtype)

    def trainable_count(self) -> int:
        return self.out_features * self.in_features // self.block_size

    def extra_repr(self) -> str:
        return (f"method={self.method}, in={self.in_features}, out={self.out_features}, "
                f"block_size={self.block_size}, kernel_init={self.config.kernel_init}")


register(
    MethodSpec(
        "c3a",
        "adapter",
        "Chen et al. 2025, Parameter-Efficient Fine-Tuning via Circular Convolution",
        C3AConfig,
        C3ALayer,
        export="none",
        summary="ΔW = b×b circulant blocks (circular correlation by FFT), one trainable kernel per block, scaled 1/in",
    )
)
